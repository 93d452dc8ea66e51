"""Talking to Prometheus' HTTP API, and the GPU sweep's fixed set of dcgm-exporter queries.

`query_vector` runs one instant query (`/api/v1/query`) with a timeout and raises
`PrometheusUnavailable` (transient: connection errors, timeouts, 429, 5xx: worth a retry) or
`PrometheusQueryError` (the query or the answer is wrong: a 4xx, a non-success status, a body that is
not Prometheus' JSON: never retried).

`fetch_dcgm` asks the *whole fleet* four queries whatever its size, evaluated at one instant so
they agree (or, where Prometheus has the sweep's recording rules loaded, reads their recorded answers:
"the sweep's recording rules" below), and `fetch_dcgm_detail` one follow-up for the few GPUs that need more (see "the sweep's
queries" below). Queries aggregate `by (Hostname, gpu)` in PromQL, which drops the labels the sweep
does not read (driver version, device, instance, job...), merges duplicated series (two scrape jobs
of one exporter) and shrinks the answer; the metrics of one query are told apart by a label `m`
added with `label_replace`, so one round trip carries several metrics.
"""

from __future__ import annotations

import copy
import math
import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx
import orjson
from prefect import task
from prefect.cache_policies import NONE

from blocks.config import parse_duration
from tasks._retry import TRANSIENT_RETRIES, TransientError
from tasks.gpu_model import timestamp_of


class PrometheusError(RuntimeError):
    """Prometheus did not give a usable answer."""


class PrometheusUnavailable(PrometheusError, TransientError):
    """Prometheus could not be reached or answered 429/5xx: retried by TRANSIENT_RETRIES."""


class PrometheusQueryError(PrometheusError):
    """Prometheus refused the query or answered something that is not its API's JSON: not retried."""


# --- one query -----------------------------------------------------------------------------


def query_vector(client: httpx.Client, base_url: str, expr: str, at: float | None = None,
                 timeout_s: float = 15.0) -> tuple[list[dict[str, Any]], list[str]]:
    """Run an instant query; return (result series, warnings).

    The timeout goes both to the HTTP request and, as `timeout=`, to Prometheus' evaluation, so
    a slow query is stopped on the server too.
    """
    return parse_vector(base_url, post_query(client, base_url, expr, at, timeout_s))


def post_query(client: httpx.Client, base_url: str, expr: str, at: float | None = None,
               timeout_s: float = 15.0) -> httpx.Response:
    """`query_vector`'s request: the answer, not parsed yet (transport faults raised as `PrometheusUnavailable`)."""
    params = {"query": expr, "timeout": f"{max(1, int(timeout_s * 1000) - 500)}ms"}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = f"{base_url.rstrip('/')}/api/v1/query"
    try:
        return client.post(url, data=params, timeout=timeout_s)
    except httpx.TimeoutException as exc:
        raise PrometheusUnavailable(f"Prometheus at {base_url} did not answer within {timeout_s:g}s") from exc
    except httpx.TransportError as exc:
        raise PrometheusUnavailable(f"cannot reach Prometheus at {base_url}: {exc}") from exc


def parse_vector(base_url: str, response: httpx.Response) -> tuple[list[dict[str, Any]], list[str]]:
    """`query_vector`'s answer: (result series, warnings), or the typed error."""
    status = response.status_code
    if status == 429 or status >= 500:
        raise PrometheusUnavailable(f"Prometheus at {base_url} answered HTTP {status}: {_error_text(response)}")
    try:
        body = orjson.loads(response.content)
    except orjson.JSONDecodeError:
        raise PrometheusQueryError(
            f"Prometheus at {base_url} answered HTTP {status} with a body that is not JSON: "
            f"{response.text[:200]!r} (is the URL Prometheus' own, not a proxy or UI?)"
        ) from None
    if status >= 400 or not isinstance(body, dict) or body.get("status") != "success":
        detail = body.get("error") if isinstance(body, dict) else None
        kind = body.get("errorType") if isinstance(body, dict) else None
        if kind in ("timeout", "canceled") or "deadline exceeded" in str(detail) or "timed out" in str(detail):
            raise PrometheusUnavailable(f"Prometheus at {base_url} ran out of time for the query ({kind}): {detail}")
        raise PrometheusQueryError(f"Prometheus refused the query (HTTP {status}, {kind}): {detail}")
    data = body.get("data") or {}
    if data.get("resultType") != "vector":
        raise PrometheusQueryError(f"expected a vector result, got {data.get('resultType')!r}")
    return list(data.get("result") or []), list(body.get("warnings") or [])


def _error_text(response: httpx.Response) -> str:
    try:
        body = orjson.loads(response.content)
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])[:200]
    except orjson.JSONDecodeError:
        pass
    return response.text[:200]


# --- the sweep's queries --------------------------------------------------------------------
#
# Prometheus' cost is per series it touches and per series it returns. The sweep touches each
# metric it needs once and returns, for the whole fleet, only per-exporter aggregates (GPUs
# reporting, the sum and count of window utilisation, GPUs with a temperature) and the GPUs that
# fail a filter evaluated in Prometheus: low or NaN utilisation, hot or NaN temperature, any XID,
# remapped rows, remap failure or pending, hot memory. Filters keep NaN (`x != x` is true only
# for NaN; `clamp_min(x, T) != T` keeps values over T *and* NaN), so a NaN is never read as healthy.
# Filters run on each series before the `max by (exporter, gpu)` that merges duplicates (two scrape
# jobs), so that aggregation touches the few series that fail, not all 80,000 of a 10,000-node fleet
# (a NaN in one duplicate is then kept, not hidden by the other's number: stricter, never healthier).
# GPUs that need more (a UUID for an RMA, utilisation's max and sample count for idleness, which
# GPU fell off the bus) are asked in one follow-up query restricted to their exporters.
#
# Series are keyed by (exporter, gpu): the exporter is its `Hostname` label, or, where relabelling
# dropped it, the scrape target's `instance` (written `@<instance>`), which the join maps to the
# exporter pod's IP. Attribution reads `pod`/`namespace` and, where the scrape did not honour the
# exporter's labels (ServiceMonitor `honorLabels: false`, the standalone chart's default), Prometheus'
# renamed `exported_pod`/`exported_namespace` (Prometheus docs, scrape_config `honor_labels`).

MAX_DETAIL_HOSTS = 400
EXPORTER_KEY = "Hostname, instance"
HOLDER_LABELS = ("pod", "namespace", "exported_pod", "exported_namespace")
# Per exporter (one series each): summed by the join, never per GPU.
PER_HOST = ("util_sum", "util_n", "temp_n", "gpus_now", "xid_counter")
# dcgm-exporter's counter (`DCGM_EXP_XID_ERRORS_COUNT{xid="N"}`: how many XIDs N in the exporter's
# `--xid-count-window-size`, label `window_size_in_ms`; one series with value 0 and no `xid` label
# when there were none: internal/pkg/collector/expcollector.go, xid_collector.go).
XID_COUNTER_WINDOW_S = 300.0


def _window_ok(window: str, name: str = "window") -> str:
    """`window` itself once it reads as a duration (`parse_duration`'s syntax is also PromQL's)."""
    try:
        parse_duration(window)
    except ValueError as exc:
        raise ValueError(f"{name}: {exc}") from None
    return window


_LABEL_VALUE_RE = re.compile(r'^[^"\\\n{}]*$')


def _tag(expr: str, name: str) -> str:
    return f'label_replace({expr}, "m", "{name}", "", "")'


def _sel(selector: str, *more: str) -> str:
    """`job="x"` + `Hostname=~"a"` -> `{job="x",Hostname=~"a"}`; nothing -> ''."""
    parts = [p.strip().strip("{}").strip() for p in (selector, *more)]
    parts = [p for p in parts if p]
    return "{" + ",".join(parts) + "}" if parts else ""


def _regex_escape(value: str) -> str:
    """Escape a literal for a PromQL (RE2) regex inside a double-quoted string."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\\\1", value)


def jobs_regex(jobs: tuple[str, ...] | list[str] | str) -> str:
    """The exporter's scrape jobs (exact names) as one anchored regex: `a|b`."""
    jobs = (jobs,) if isinstance(jobs, str) else tuple(jobs)
    for job in jobs:
        if not job or not _LABEL_VALUE_RE.match(job):
            raise ValueError(f"exporter_jobs: expected plain job names, got {job!r}")
    return "|".join(_regex_escape(j) for j in jobs)


def sweep_queries(window: str, *, temp_c: float = 85.0, memory_temp_c: float = 95.0, idle_util_pct: float = 5.0,
                  stale_after_s: float = 120.0, metric_selector: str = "",
                  exporter_jobs: tuple[str, ...] | list[str] | str = ("nvidia-dcgm-exporter", "dcgm-exporter"),
                  xid_resolution: str = "1m") -> dict[str, str]:
    """The sweep's first four queries, whatever the fleet's size (see the comment above)."""
    w = _window_ok(window)
    step = _window_ok(xid_resolution, "xid_resolution")
    jobs = jobs_regex(exporter_jobs)
    s = _sel(metric_selector)
    k = EXPORTER_KEY
    # one value per GPU even when two scrape jobs of one exporter duplicate its series
    util = f"avg by ({k}, gpu) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))"
    held = f"avg_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}])"
    temp = f"max by ({k}, gpu) (max_over_time(DCGM_FI_DEV_GPU_TEMP{s}[{w}]))"
    up = f'up{{job=~"{jobs}"}}'
    counter = _sel(metric_selector, 'xid!=""')
    return {
        "util": " or ".join([
            _tag(f"sum by ({k}) ({util} >= 0)", "util_sum"),
            _tag(f"count by ({k}) ({util} >= 0)", "util_n"),
            # under the idle threshold, or NaN, in one evaluation of the window (clamp_max(v, T) != T)
            _tag(f"max by ({k}, gpu, {', '.join(HOLDER_LABELS)}) (clamp_max({held}, {idle_util_pct:g}) != "
                 f"{idle_util_pct:g})", "util_avg"),
        ]),
        "temp": " or ".join([
            _tag(f"count by ({k}) ({temp})", "temp_n"),
            # filtered per series first, then merged: the aggregation touches only the few that fail
            _tag(f"max by ({k}, gpu) (clamp_min(max_over_time(DCGM_FI_DEV_GPU_TEMP{s}[{w}]), {temp_c:g}) != "
                 f"{temp_c:g})", "temp_max"),
        ]),
        "faults": " or ".join([
            # every distinct value the last-value gauge held in the window, with when it was last seen
            _tag(f'max by ({k}, gpu, xid) (max_over_time(timestamp(count_values by ({k}, gpu) ("xid", '
                 f"DCGM_FI_DEV_XID_ERRORS{s} != 0))[{w}:{step}]))", "xid_seen"),
            _tag(f"max by ({k}, gpu, xid, window_size_in_ms) (max_over_time(timestamp("
                 f"DCGM_EXP_XID_ERRORS_COUNT{counter} > 0)[{w}:{step}]))", "xid_count_seen"),
            _tag(f"max by ({k}, gpu) (max_over_time(DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{s}[{w}]) != 0)",
                 "rows_max"),
            _tag(f"max by ({k}, gpu) (max_over_time(DCGM_FI_DEV_ROW_REMAP_FAILURE{s}[{w}]) != 0)", "row_fail_max"),
            _tag(f"max by ({k}, gpu) (max_over_time(DCGM_FI_DEV_ROW_REMAP_PENDING{s}[{w}]) != 0)",
                 "row_pending_max"),
            _tag(f"max by ({k}, gpu) (clamp_min(max_over_time(DCGM_FI_DEV_MEMORY_TEMP{s}[{w}]), {memory_temp_c:g})"
                 f" != {memory_temp_c:g})", "memory_temp_max"),
        ]),
        "exporters": " or ".join([
            # per scrape job (the join keeps the larger count when two jobs scrape one exporter): one
            # aggregation over the fleet's series, and the (instance, job) pairs that tell `empty` below
            _tag(f"count by ({k}, job) (DCGM_FI_DEV_GPU_UTIL{s})", "gpus_now"),
            _tag(f"count by ({k}) (DCGM_EXP_XID_ERRORS_COUNT{s})", "xid_counter"),
            _tag(f"max by (instance, job, pod, namespace) ({up}) == 0", "up"),
            _tag(f"max by (instance, job, pod, namespace) (time() - timestamp({up})) > {stale_after_s:g}", "up_age"),
            # the targets that answer; one that answers but serves no GPU (DCGM not ready, or sees no GPU)
            # is `empty`: no `gpus_now` series of its (instance, job) (`merge_answers`; a second pass over
            # every GPU series in PromQL, `unless on (instance, job) count by (instance, job) (...)`, costs
            # Prometheus as much as `gpus_now` itself)
            _tag(f"max by (instance, job, pod, namespace) ({up}) == 1", "up_ok"),
        ]),
    }


def _host_matchers(hosts: list[str]) -> list[str]:
    """Matchers for exporters keyed by Hostname and by `@instance`, as one or two selectors."""
    named = sorted(h for h in hosts if not h.startswith("@"))
    by_instance = sorted(h[1:] for h in hosts if h.startswith("@"))
    out = []
    if named:
        out.append(f'Hostname=~"{"|".join(_regex_escape(h) for h in named)}"')
    if by_instance:
        out.append(f'Hostname="",instance=~"{"|".join(_regex_escape(h) for h in by_instance)}"')
    return out


def detail_query(window: str, hosts: list[str], *, metric_selector: str = "") -> str:
    """The follow-up query for the GPUs of `hosts`: current attribution and UUID, the window's average,
    utilisation's max and sample count, graphics-engine activity, memory used and power."""
    w = _window_ok(window)
    k = f"{EXPORTER_KEY}, gpu"
    parts = []
    for matcher in _host_matchers(list(hosts)):
        s = _sel(metric_selector, matcher)
        parts += [
            _tag(f"max by ({k}, UUID, {', '.join(HOLDER_LABELS)}) (DCGM_FI_DEV_GPU_UTIL{s})", "util"),
            _tag(f"max by ({k}) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_avg"),
            _tag(f"max by ({k}) (max_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_max"),
            _tag(f"max by ({k}) (count_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_samples"),
            _tag(f"max by ({k}) (max_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE{s}[{w}]))", "gr_max"),
            _tag(f"max by ({k}) (DCGM_FI_DEV_FB_USED{s})", "fb_used"),
            _tag(f"max by ({k}) (avg_over_time(DCGM_FI_DEV_POWER_USAGE{s}[{w}]))", "power_avg"),
            _tag(f"max by ({k}, UUID) (max_over_time(DCGM_FI_DEV_GPU_TEMP{s}[{w}]))", "uuid"),
        ]
    return " or ".join(parts)


# --- what the answers mean -------------------------------------------------------------------


def _value(sample: Any) -> float:
    """A Prometheus sample value ('12.5', 'NaN', '+Inf') as a float; unparseable -> NaN."""
    try:
        return float(sample[1])
    except (TypeError, ValueError, IndexError):
        return math.nan


def host_key(metric: dict[str, str]) -> str | None:
    """The exporter a series came from: its Hostname, else `@<instance>` (Hostname dropped by relabelling)."""
    if metric.get("Hostname"):
        return metric["Hostname"]
    if metric.get("instance"):
        return "@" + metric["instance"]
    return None


def address_host(address: str) -> str:
    """`10.0.0.5:9400` -> `10.0.0.5`, `[fd00::1]:9400` -> `fd00::1`, `pod-name:9400` -> `pod-name`."""
    if address.startswith("["):
        return address[1:].split("]", 1)[0]
    return address.rsplit(":", 1)[0] if address.count(":") == 1 else address


@dataclass
class ExporterTarget:
    """A scrape target of the exporter jobs that is down (`up`=0), stale, or answers without GPUs."""

    instance: str
    pod: str | None
    job: str | None
    up: float | None = None
    age_s: float | None = None
    empty: bool = False
    namespace: str | None = None

    @property
    def host(self) -> str:
        """The instance without its port (`nvidia-dcgm-exporter-abcde:9400` -> `nvidia-dcgm-exporter-abcde`)."""
        return address_host(self.instance)


@dataclass
class DCGMSnapshot:
    """The fleet's dcgm-exporter metrics at one instant (see `sweep_queries` for what is asked).

    `per_host[exporter]`: util_sum, util_n, temp_n, gpus_now, xid_counter. `values[(exporter, gpu)]`:
    what failed a filter (util_avg, temp_max, rows_max, row_fail_max, row_pending_max,
    memory_temp_max) and, for GPUs of `detail_hosts`, util (present now), util_avg, util_max,
    util_samples, gr_max, fb_used, power_avg. `xids[(exporter, gpu)]` and `xid_counts[...]`: each XID
    seen in the window (gauge, counter) -> when it was last seen.
    """

    window: str
    at: float
    values: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    labels: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    per_host: dict[str, dict[str, float]] = field(default_factory=dict)
    xids: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    xid_counts: dict[tuple[str, str], dict[int, float]] = field(default_factory=dict)
    xid_counter_window_s: dict[str, float] = field(default_factory=dict)
    targets: list[ExporterTarget] = field(default_factory=list)
    detail_hosts: set[str] = field(default_factory=set)
    detail_error: str | None = None  # the follow-up failed: what it would have added is unknown
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    round_trips: int = 0
    # where the first phase's answers came from: "recording rules" (evaluated by Prometheus at `at`) or
    # "raw queries"; `source_note` says why the rules were not used, or how old their evaluation was
    source: str = "raw queries"
    source_note: str = ""

    @property
    def available(self) -> bool:
        return self.error is None

    @property
    def gpus_now(self) -> dict[str, float]:
        return {h: v["gpus_now"] for h, v in self.per_host.items() if "gpus_now" in v}

    @classmethod
    def unavailable(cls, window: str, error: str, round_trips: int = 0) -> DCGMSnapshot:
        return cls(window=window, at=time.time(), error=error, round_trips=round_trips)


def keep_worst(slot: dict[str, float], name: str, v: float) -> None:
    old = slot.get(name)
    if old is None or (math.isnan(old) and not math.isnan(v)) or v > old:
        slot[name] = v


def merge_answers(snap: DCGMSnapshot, answers: dict[str, list[dict[str, Any]]]) -> DCGMSnapshot:
    """Fold query answers (of `sweep_queries` or `detail_query`) into `snap` (pure; tolerant of any shape).

    Duplicated series for one GPU and metric keep the worst value (max; a real number beats NaN),
    so a second scrape job can never hide a fault.
    """
    values = snap.values
    targets = {(t.instance, t.pod, t.job): t for t in snap.targets}
    answering: list[tuple[str, str | None, str | None, str | None]] = []  # `up_ok`: targets that answer
    serving: set[tuple[str | None, str | None]] = set()  # (instance, job) of the `gpus_now` series
    for series_list in answers.values():
        for series in series_list or []:
            metric = series.get("metric") or {}
            name = metric.get("m")
            if name == "up_ok":
                if metric.get("instance"):
                    answering.append((metric["instance"], metric.get("pod"), metric.get("job"),
                                      metric.get("namespace")))
                continue
            v = _value(series.get("value"))
            if name == "gpus_now":
                serving.add((metric.get("instance"), metric.get("job")))
            if name in ("up", "up_age", "empty"):
                if not metric.get("instance"):
                    continue
                tkey = (metric["instance"], metric.get("pod"), metric.get("job"))
                target = targets.get(tkey)
                if target is None:
                    target = targets[tkey] = ExporterTarget(metric["instance"], metric.get("pod"), metric.get("job"),
                                                            namespace=metric.get("namespace"))
                if name == "up":
                    target.up = v
                elif name == "up_age":
                    target.age_s = v
                else:
                    target.empty = True
                continue
            host = host_key(metric)
            if not name or host is None:
                continue
            if name in PER_HOST:
                keep_worst(snap.per_host.setdefault(host, {}), name, v)
                continue
            gpu = metric.get("gpu")
            if gpu is None:
                continue
            key = (host, gpu)
            if name in ("xid_seen", "xid_count_seen"):
                try:
                    code = int(metric.get("xid", ""))
                except ValueError:
                    continue
                seen = (snap.xids if name == "xid_seen" else snap.xid_counts).setdefault(key, {})
                if code and (code not in seen or v > seen[code]):
                    seen[code] = v
                if name == "xid_count_seen" and metric.get("window_size_in_ms", "").isdigit():
                    snap.xid_counter_window_s[host] = int(metric["window_size_in_ms"]) / 1000.0
                continue
            if name == "uuid":
                if metric.get("UUID"):
                    snap.labels.setdefault(key, {}).setdefault("UUID", metric["UUID"])
                continue
            slot = values.get(key)
            if slot is None:
                slot = values[key] = {}
            keep_worst(slot, name, v)
            if name in ("util", "util_avg"):
                _attribute(snap, key, metric)
    for instance, pod, job, namespace in answering:
        if (instance, job) not in serving:
            target = targets.get((instance, pod, job))
            if target is None:
                target = targets[(instance, pod, job)] = ExporterTarget(instance, pod, job, namespace=namespace)
            target.empty = True
    snap.targets = list(targets.values())
    return snap


def _attribute(snap: DCGMSnapshot, key: tuple[str, str], metric: dict[str, str]) -> None:
    """Keep the labels that may name the GPU's holder (the join decides which pod that is)."""
    attr = {k: metric[k] for k in (*HOLDER_LABELS, "UUID") if metric.get(k)}
    prev = snap.labels.get(key)
    if prev is None:
        snap.labels[key] = attr
        return
    for k, v in attr.items():
        if k == "UUID" or not prev.get(k):
            prev.setdefault(k, v)
        elif prev.get(k) != v:  # two holders under one key (two scrape jobs disagree): keep both
            others = prev.setdefault(f"other_{k}", "")
            if v not in others.split(","):
                prev[f"other_{k}"] = ",".join(x for x in (others, v) if x)


def _run_into(client: httpx.Client, base_url: str, snap: DCGMSnapshot, queries: dict[str, str],
              timeout_s: float) -> list[str]:
    """Run `queries` concurrently at `snap.at`, folding each answer into `snap` as soon as it is parsed (under
    a lock, one answer at a time), so the fleet's answers are never all held at once; returns the warnings."""
    lock = threading.Lock()

    def one(name: str, expr: str) -> list[str]:
        response = post_query(client, base_url, expr, snap.at, timeout_s)  # concurrently: Prometheus' work
        with lock:  # one parsed answer at a time: parsed, folded in, dropped
            result, warns = parse_vector(base_url, response)
            del response
            merge_answers(snap, {name: result})
        return warns

    with ThreadPoolExecutor(max_workers=max(1, len(queries)), thread_name_prefix="promql") as pool:
        futures = [pool.submit(one, name, expr) for name, expr in queries.items()]
        return [w for future in futures for w in future.result()]


def fetch_dcgm(base_url: str, window: str, *, timeout_s: float = 15.0, client: httpx.Client | None = None,
               source: str = "auto", at: float | None = None, **query_args: Any) -> DCGMSnapshot:
    """The sweep's first phase at one instant. Raises `PrometheusError`.

    `source`: "auto" reads the series recorded by the sweep's recording rules when Prometheus has them
    loaded, healthy, fresh and rendered from these very queries (`recorded_state`), else runs the four
    raw queries; "raw" always runs the raw queries (at `at`, default now). `query_args` are
    `sweep_queries`' keywords (thresholds, metric selector, exporter jobs)."""
    if source not in ("auto", "raw"):
        raise ValueError(f"metrics_source: expected 'auto' or 'raw', got {source!r}")
    queries = sweep_queries(window, **query_args)
    own = client is None
    client = client or httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=len(queries)))
    try:
        note, trips = "", 0
        if source == "auto":
            rules = sweep_recording_rules(queries)
            at_rules, note, trips = recorded_state(client, base_url, rules, timeout_s)
            if at_rules is not None:
                # the recorded series, read at their evaluation's timestamp (where a series that stopped
                # failing a filter has its staleness marker): instant vectors, whatever the window
                snap = DCGMSnapshot(window=window, at=at_rules, source="recording rules", source_note=note)
                reads = recorded_reads(rules)
                snap.warnings = _run_into(client, base_url, snap, reads, timeout_s)
                snap.round_trips = trips + len(reads)
                return snap
        snap = DCGMSnapshot(window=window, at=time.time() if at is None else at, source="raw queries",
                            source_note=note)
        snap.warnings = _run_into(client, base_url, snap, queries, timeout_s)
        snap.round_trips = trips + len(queries)
        return snap
    finally:
        if own:
            client.close()


# --- the sweep's recording rules ---------------------------------------------------------------
#
# Each of the four queries above is also a recording rule (`tasks.gpu_rules.render_sweep`, from the
# same platform config): `gpu_sweep:<query>` records exactly the query's answer, `m` labels included,
# at each evaluation of the group, labelled `sweep_query=<hash of the expression>`. A sweep then reads
# one instant vector of recorded series (no 15-minute window over every GPU series in its path) at
# the group's evaluation timestamp, so its answers are exactly the raw queries' answers at that
# instant. Prometheus evaluates a group's rules in order at one timestamp and commits each rule's
# samples (and the staleness markers of series it no longer returns) before the next
# (prometheus/prometheus rules/group.go `Eval`), so `gpu_sweep:evaluated`, the group's last rule, is
# present at a timestamp only once every other rule's samples for it are.
# The rules are used only when every one is loaded with the hash of the expression this sweep would
# run (a config changed after rendering, other thresholds, another window: a different hash), healthy
# (`/api/v1/rules`: health "ok") and evaluated within two group intervals; otherwise the raw queries.

SWEEP_RECORD_PREFIX = "gpu_sweep:"
SWEEP_DONE_RECORD = "gpu_sweep:evaluated"
SWEEP_RULES_GROUP = "gpu-sweep"


def query_hash(expr: str) -> str:
    import hashlib

    return hashlib.sha256(expr.encode()).hexdigest()[:16]


def sweep_recording_rules(queries: dict[str, str]) -> list[tuple[str, str, str]]:
    """(record name, expression, `sweep_query` hash) for each sweep query, then the completion marker."""
    out = [(f"{SWEEP_RECORD_PREFIX}{name}", expr, query_hash(expr)) for name, expr in queries.items()]
    out.append((SWEEP_DONE_RECORD, "vector(1)", query_hash("\n".join(h for _, _, h in out))))
    return out


def recorded_reads(rules: list[tuple[str, str, str]]) -> dict[str, str]:
    """One instant selector per recorded query (read concurrently, each answer folded in as it comes)."""
    # `max without (sweep_query)`: the same series without their name and hash (two labels fewer to parse)
    return {name.removeprefix(SWEEP_RECORD_PREFIX): f'max without (sweep_query) ({name}{{sweep_query="{h}"}})'
            for name, _, h in rules if name != SWEEP_DONE_RECORD}


def rules_verdict(body: Any, rules: list[tuple[str, str, str]], now: float) -> str | None:
    """Why the recorded series cannot stand in for the raw queries (None: they can), from the answer of
    `/api/v1/rules?type=record` (pure)."""
    want = {name: h for name, _, h in rules}
    loaded = [(group, rule) for group in ((body or {}).get("data") or {}).get("groups") or []
              for rule in group.get("rules") or [] if str(rule.get("name", "")).startswith(SWEEP_RECORD_PREFIX)]
    found = {rule["name"]: (group, rule) for group, rule in loaded
             if rule["name"] in want and want[rule["name"]] == (rule.get("labels") or {}).get("sweep_query")}
    if not found:
        if loaded:
            return ("the loaded gpu_sweep recording rules were rendered from other settings (window, thresholds, "
                    "exporter jobs or metric selector): render them again from this config")
        return "the sweep's recording rules are not loaded in Prometheus"
    missing = sorted(set(want) - set(found))
    if missing:
        return f"recording rules missing or rendered from other settings: {', '.join(missing)}"
    for name, (group, rule) in found.items():
        if rule.get("health") != "ok":
            return f"recording rule {name} is {rule.get('health')!r}: {str(rule.get('lastError') or '')[:200]}"
        last = timestamp_of(rule.get("lastEvaluation"))  # Go's zero time (never evaluated): year 1, stale
        interval = float(group.get("interval") or 60)
        if last is None or now - last > 2 * interval + float(group.get("evaluationTime") or 0) + 5:
            return f"recording rule {name} was last evaluated {rule.get('lastEvaluation')} (group interval {interval:g}s)"
    return None


def recorded_state(client: httpx.Client, base_url: str, rules: list[tuple[str, str, str]], timeout_s: float
                   ) -> tuple[float | None, str, int]:
    """(the timestamp of the rules' last complete evaluation or None, a note, round trips)."""
    url = f"{base_url.rstrip('/')}/api/v1/rules"
    try:
        response = client.get(url, params={"type": "record"}, timeout=timeout_s)
        body = orjson.loads(response.content) if response.status_code == 200 else None
    except (httpx.HTTPError, orjson.JSONDecodeError) as exc:
        return None, f"the rules API did not answer ({type(exc).__name__}); raw queries", 1
    if body is None:
        return None, f"the rules API answered HTTP {response.status_code}; raw queries", 1
    verdict = rules_verdict(body, rules, time.time())
    if verdict is not None:
        return None, verdict, 1
    done_name, _, done_hash = rules[-1]
    series, _ = query_vector(client, base_url, f'timestamp({done_name}{{sweep_query="{done_hash}"}})',
                             timeout_s=timeout_s)
    if not series:
        return None, "the recording rules have not completed an evaluation yet", 2
    evaluated = _value(series[0].get("value"))
    return evaluated, f"evaluated {max(0.0, time.time() - evaluated):.0f}s before the sweep", 2


def fetch_dcgm_detail(base_url: str, snap: DCGMSnapshot, hosts: set[str], *, metric_selector: str = "",
                      timeout_s: float = 15.0, client: httpx.Client | None = None) -> DCGMSnapshot:
    """The sweep's follow-up: details for the GPUs of `hosts` (at most MAX_DETAIL_HOSTS), merged into a copy
    of `snap`; raises `PrometheusError` (the caller keeps `snap` and notes what is missing)."""
    if not hosts or not snap.available:
        return snap
    chosen = sorted(hosts)[:MAX_DETAIL_HOSTS]
    expr = detail_query(snap.window, chosen, metric_selector=metric_selector)
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    try:
        result, warnings = query_vector(client, base_url, expr, snap.at, timeout_s)
    finally:
        if own:
            client.close()
    out = copy.copy(snap)  # `snap` itself never changes, so a retried task never merges or warns twice
    out.values = {k: dict(v) for k, v in snap.values.items()}
    out.labels = {k: dict(v) for k, v in snap.labels.items()}
    out.detail_hosts = set(snap.detail_hosts) | set(chosen)
    out.warnings = list(snap.warnings) + warnings
    if len(hosts) > len(chosen):
        out.warnings.append(f"details (idleness, UUIDs) asked for {len(chosen)} of {len(hosts)} exporters; "
                            "the rest are judged on the window average only")
    merge_answers(out, {"detail": result})
    out.round_trips = snap.round_trips + 1
    return out


def with_detail_error(snap: DCGMSnapshot, error: str) -> DCGMSnapshot:
    """`snap` as it was, noting that its follow-up query failed: the established findings stand."""
    out = copy.copy(snap)
    out.detail_error = error
    out.round_trips = snap.round_trips + 1
    return out


def query_args(settings: Any) -> dict[str, Any]:
    """`sweep_queries`' keywords from a `tasks.gpu_model.SweepSettings`."""
    th = settings.thresholds
    return {"temp_c": th.temp_c, "memory_temp_c": th.memory_temp_c, "idle_util_pct": th.idle_util_pct,
            "stale_after_s": th.stale_after_s, "metric_selector": settings.metric_selector,
            "exporter_jobs": settings.exporter_jobs, "xid_resolution": th.xid_resolution}


@task(name="query-dcgm-metrics", cache_policy=NONE, **TRANSIENT_RETRIES)
def query_dcgm_metrics(prometheus: Any, settings: Any) -> DCGMSnapshot:
    """The fleet's dcgm-exporter metrics over the window: the sweep's recorded series where its recording
    rules are loaded, else four PromQL queries, whatever the fleet's size.

    `prometheus` is the platform's `PrometheusServer` block (its `url` and `timeout_s`); `settings` a
    `tasks.gpu_model.SweepSettings`.
    """
    return fetch_dcgm(prometheus.url, settings.thresholds.window, timeout_s=prometheus.timeout_s,
                      source=settings.metrics_source, **query_args(settings))


@task(name="query-dcgm-details", cache_policy=NONE, **TRANSIENT_RETRIES)
def query_dcgm_details(prometheus: Any, snap: DCGMSnapshot, hosts: set[str], metric_selector: str = ""
                       ) -> DCGMSnapshot:
    """Details for the GPUs that need them (one query restricted to their exporters)."""
    return fetch_dcgm_detail(prometheus.url, snap, hosts, metric_selector=metric_selector,
                             timeout_s=prometheus.timeout_s)
