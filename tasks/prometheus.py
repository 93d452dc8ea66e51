"""Talking to Prometheus' HTTP API, and the GPU sweep's fixed set of dcgm-exporter queries.

`query_vector` runs one instant query (`/api/v1/query`) with a timeout and raises
`PrometheusUnavailable` (transient: connection errors, timeouts, 429, 5xx: worth a retry) or
`PrometheusQueryError` (the query or the answer is wrong: a 4xx, a non-success status, a body that is
not Prometheus' JSON: never retried).

`fetch_dcgm` asks the *whole fleet* four queries whatever its size, evaluated at one instant so
they agree, and `fetch_dcgm_detail` one follow-up for the few GPUs that need more (see "the sweep's
queries" below). Queries aggregate `by (Hostname, gpu)` in PromQL, which drops the labels the sweep
does not read (driver version, device, instance, job...), merges duplicated series (two scrape jobs
of one exporter) and shrinks the answer; the metrics of one query are told apart by a label `m`
added with `label_replace`, so one round trip carries several metrics.
"""

from __future__ import annotations

import math
import re
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
    params = {"query": expr, "timeout": f"{max(1, int(timeout_s * 1000) - 500)}ms"}
    if at is not None:
        params["time"] = f"{at:.3f}"
    url = f"{base_url.rstrip('/')}/api/v1/query"
    try:
        response = client.post(url, data=params, timeout=timeout_s)
    except httpx.TimeoutException as exc:
        raise PrometheusUnavailable(f"Prometheus at {base_url} did not answer within {timeout_s:g}s") from exc
    except httpx.TransportError as exc:
        raise PrometheusUnavailable(f"cannot reach Prometheus at {base_url}: {exc}") from exc
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
# Prometheus' cost is per series it touches, so the sweep touches each metric it needs once and
# returns full per-GPU vectors only for utilisation and temperature (the heatmap, idleness, and
# the proof that every GPU reports); every other check is a filter evaluated in Prometheus that
# returns only the GPUs that fail it (usually none). Filters keep NaN: `x != 0` is true for NaN,
# and `clamp_min(x, T) != T` keeps values over T *and* NaN, so a NaN is never read as healthy.
# GPUs that need more (a UUID for an RMA, utilisation's max and sample count for idleness, which
# GPU fell off the bus) are asked in one follow-up query restricted to their Hostnames.

MAX_DETAIL_HOSTS = 400


def _window_ok(window: str) -> str:
    """`window` itself once it reads as a duration (`parse_duration`'s syntax is also PromQL's)."""
    try:
        parse_duration(window)
    except ValueError as exc:
        raise ValueError(f"window: {exc}") from None
    return window


_LABEL_VALUE_RE = re.compile(r'^[^"\\\n]*$')


def _tag(expr: str, name: str) -> str:
    return f'label_replace({expr}, "m", "{name}", "", "")'


def _sel(selector: str, *more: str) -> str:
    """`job="x"` + `Hostname=~"a"` -> `{job="x",Hostname=~"a"}`; nothing -> ''."""
    parts = [p.strip().strip("{}").strip() for p in (selector, *more)]
    parts = [p for p in parts if p]
    return "{" + ",".join(parts) + "}" if parts else ""


def sweep_queries(window: str, *, memory_temp_c: float = 95.0, stale_after_s: float = 120.0, metric_selector: str = "",
                  exporter_job: str = ".*dcgm.*") -> dict[str, str]:
    """The sweep's first four queries, whatever the fleet's size.

    `metric_selector` narrows the DCGM series (e.g. `cluster="gpu-prod"` when one Prometheus
    holds several clusters); `exporter_job` is a regular expression for the exporter's scrape job.
    """
    w = _window_ok(window)
    if not _LABEL_VALUE_RE.match(exporter_job):
        raise ValueError(f"exporter_job: expected a regular expression without quotes, got {exporter_job!r}")
    s = _sel(metric_selector)
    key = "Hostname, gpu"
    up = f'up{{job=~"{exporter_job}"}}'
    faults = [
        _tag(f"max by ({key}) (max_over_time(DCGM_FI_DEV_XID_ERRORS{s}[{w}])) != 0", "xid_max"),
        _tag(f"max by ({key}) (max_over_time(DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{s}[{w}])) != 0", "rows_max"),
        _tag(f"max by ({key}) (max_over_time(DCGM_FI_DEV_ROW_REMAP_FAILURE{s}[{w}])) != 0", "row_fail_max"),
        _tag(f"clamp_min(max by ({key}) (max_over_time(DCGM_FI_DEV_MEMORY_TEMP{s}[{w}])), {memory_temp_c:g})"
             f" != {memory_temp_c:g}", "memory_temp_max"),
    ]
    exporters = [
        _tag(f"count by (Hostname) (DCGM_FI_DEV_GPU_UTIL{s})", "gpus_now"),
        _tag(f"max by (instance, pod, job) ({up}) == 0", "up"),
        _tag(f"max by (instance, pod, job) (time() - timestamp({up})) > {stale_after_s:g}", "up_age"),
    ]
    return {
        "util": _tag(f"avg by ({key}, pod, namespace) (avg_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_avg"),
        "temp": _tag(f"max by ({key}) (max_over_time(DCGM_FI_DEV_GPU_TEMP{s}[{w}]))", "temp_max"),
        "faults": " or ".join(faults),
        "exporters": " or ".join(exporters),
    }


def _regex_escape(value: str) -> str:
    """Escape a literal for a PromQL (RE2) regex inside a double-quoted string."""
    return re.sub(r"([.^$*+?()\[\]{}|\\])", r"\\\\\1", value)


def detail_query(window: str, hosts: list[str], *, metric_selector: str = "") -> str:
    """The follow-up query for the GPUs of `hosts`: current attribution and UUID, utilisation's max and
    sample count, graphics-engine activity, memory used and power over the window."""
    w = _window_ok(window)
    hosts_re = "|".join(_regex_escape(h) for h in sorted(hosts))
    s = _sel(metric_selector, f'Hostname=~"{hosts_re}"')
    key = "Hostname, gpu"
    return " or ".join([
        _tag(f"max by ({key}, UUID, pod, namespace) (DCGM_FI_DEV_GPU_UTIL{s})", "util"),
        _tag(f"max by ({key}) (max_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_max"),
        _tag(f"max by ({key}) (count_over_time(DCGM_FI_DEV_GPU_UTIL{s}[{w}]))", "util_samples"),
        _tag(f"max by ({key}) (max_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE{s}[{w}]))", "gr_max"),
        _tag(f"max by ({key}) (DCGM_FI_DEV_FB_USED{s})", "fb_used"),
        _tag(f"max by ({key}) (avg_over_time(DCGM_FI_DEV_POWER_USAGE{s}[{w}]))", "power_avg"),
        _tag(f"max by ({key}) (DCGM_FI_DEV_XID_ERRORS{s})", "xid"),
    ])


# --- what the answers mean -------------------------------------------------------------------


def _value(sample: Any) -> float:
    """A Prometheus sample value ('12.5', 'NaN', '+Inf') as a float; unparseable -> NaN."""
    try:
        return float(sample[1])
    except (TypeError, ValueError, IndexError):
        return math.nan


@dataclass
class ExporterTarget:
    """A scrape target of the exporter job that is down (`up`=0) or stale (`age_s` over the limit)."""

    instance: str
    pod: str | None
    job: str | None
    up: float | None = None
    age_s: float | None = None

    @property
    def host(self) -> str:
        """The instance without its port (`nvidia-dcgm-exporter-abcde:9400` -> `nvidia-dcgm-exporter-abcde`)."""
        host = self.instance
        if host.startswith("["):  # [ipv6]:port
            return host[1:].split("]", 1)[0]
        return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


@dataclass
class DCGMSnapshot:
    """The fleet's dcgm-exporter metrics at one instant, keyed by (Hostname, gpu).

    `values[key]` holds what was asked for that GPU: always `util_avg` and `temp_max` when the GPU
    reported in the window; `xid_max`, `rows_max`, `row_fail_max`, `memory_temp_max` only when they
    fail their filter; and, for GPUs of `detail_hosts`, `util` (present now), `util_max`,
    `util_samples`, `gr_max`, `fb_used`, `power_avg`, `xid`.
    """

    window: str
    at: float
    values: dict[tuple[str, str], dict[str, float]] = field(default_factory=dict)
    labels: dict[tuple[str, str], dict[str, str]] = field(default_factory=dict)
    conflicts: dict[tuple[str, str], list[str]] = field(default_factory=dict)  # several holders at once
    gpus_now: dict[str, float] = field(default_factory=dict)  # Hostname -> GPUs reporting now
    targets: list[ExporterTarget] = field(default_factory=list)
    detail_hosts: set[str] = field(default_factory=set)
    warnings: list[str] = field(default_factory=list)
    error: str | None = None
    round_trips: int = 0

    @property
    def available(self) -> bool:
        return self.error is None

    @classmethod
    def unavailable(cls, window: str, error: str, round_trips: int = 0) -> DCGMSnapshot:
        return cls(window=window, at=time.time(), error=error, round_trips=round_trips)


def _keep_worst(slot: dict[str, float], name: str, v: float) -> None:
    old = slot.get(name)
    if old is None or (math.isnan(old) and not math.isnan(v)) or v > old:
        slot[name] = v


def merge_answers(snap: DCGMSnapshot, answers: dict[str, list[dict[str, Any]]]) -> DCGMSnapshot:
    """Fold query answers (of `sweep_queries` or `detail_query`) into `snap` (pure; tolerant of any shape).

    Duplicated series for one GPU and metric keep the worst value (max; a real number beats NaN),
    so a second scrape job can never hide a fault; two different holders of one GPU are recorded
    in `conflicts`.
    """
    values = snap.values
    targets = {(t.instance, t.pod, t.job): t for t in snap.targets}
    for series_list in answers.values():
        for series in series_list or []:
            metric = series.get("metric") or {}
            name = metric.get("m")
            v = _value(series.get("value"))
            if name == "gpus_now":
                if metric.get("Hostname") is not None:
                    snap.gpus_now[metric["Hostname"]] = snap.gpus_now.get(metric["Hostname"], 0) + v
                continue
            if name in ("up", "up_age"):
                if not metric.get("instance"):
                    continue
                tkey = (metric["instance"], metric.get("pod"), metric.get("job"))
                target = targets.get(tkey)
                if target is None:
                    target = targets[tkey] = ExporterTarget(metric["instance"], metric.get("pod"), metric.get("job"))
                if name == "up":
                    target.up = v
                else:
                    target.age_s = v
                continue
            host, gpu = metric.get("Hostname"), metric.get("gpu")
            if not name or host is None or gpu is None:
                continue
            key = (host, gpu)
            slot = values.get(key)
            if slot is None:
                slot = values[key] = {}
            _keep_worst(slot, name, v)
            if name in ("util", "util_avg"):
                _attribute(snap, key, metric)
    snap.targets = list(targets.values())
    return snap


def _attribute(snap: DCGMSnapshot, key: tuple[str, str], metric: dict[str, str]) -> None:
    attr = {k: metric[k] for k in ("pod", "namespace", "UUID") if metric.get(k)}
    prev = snap.labels.get(key)
    if prev is None:
        snap.labels[key] = attr
        return
    if attr.get("UUID") and not prev.get("UUID"):
        prev["UUID"] = attr["UUID"]
    if attr.get("pod") and prev.get("pod") != attr["pod"]:
        if not prev.get("pod"):  # a series without a holder loses to one with a holder
            prev.update(attr)
        else:
            holders = snap.conflicts.setdefault(key, [_holder(prev)])
            if _holder(attr) not in holders:
                holders.append(_holder(attr))


def _holder(labels: dict[str, str]) -> str:
    return f"{labels.get('namespace', '?')}/{labels.get('pod')}"


def _run_queries(client: httpx.Client, base_url: str, queries: dict[str, str], at: float,
                 timeout_s: float) -> tuple[dict[str, list[dict[str, Any]]], list[str]]:
    with ThreadPoolExecutor(max_workers=max(1, len(queries)), thread_name_prefix="promql") as pool:
        futures = {name: pool.submit(query_vector, client, base_url, expr, at, timeout_s)
                   for name, expr in queries.items()}
        answers: dict[str, list[dict[str, Any]]] = {}
        warnings: list[str] = []
        for name, future in futures.items():
            answers[name], warns = future.result()
            warnings += warns
    return answers, warnings


def fetch_dcgm(base_url: str, window: str, *, memory_temp_c: float = 95.0, stale_after_s: float = 120.0,
               metric_selector: str = "", exporter_job: str = ".*dcgm.*", timeout_s: float = 15.0,
               client: httpx.Client | None = None) -> DCGMSnapshot:
    """The sweep's first phase: four queries, concurrently, at one instant. Raises `PrometheusError`."""
    queries = sweep_queries(window, memory_temp_c=memory_temp_c, stale_after_s=stale_after_s,
                            metric_selector=metric_selector, exporter_job=exporter_job)
    at = time.time()
    own = client is None
    client = client or httpx.Client(timeout=timeout_s, limits=httpx.Limits(max_connections=len(queries)))
    try:
        answers, warnings = _run_queries(client, base_url, queries, at, timeout_s)
    finally:
        if own:
            client.close()
    snap = merge_answers(DCGMSnapshot(window=window, at=at), answers)
    snap.warnings = warnings
    snap.round_trips = len(queries)
    return snap


def fetch_dcgm_detail(base_url: str, snap: DCGMSnapshot, hosts: set[str], *, metric_selector: str = "",
                      timeout_s: float = 15.0, client: httpx.Client | None = None) -> DCGMSnapshot:
    """The sweep's follow-up: details for the GPUs of `hosts` (at most MAX_DETAIL_HOSTS), merged into `snap`."""
    if not hosts or not snap.available:
        return snap
    chosen = sorted(hosts)[:MAX_DETAIL_HOSTS]
    expr = detail_query(snap.window, chosen, metric_selector=metric_selector)
    own = client is None
    client = client or httpx.Client(timeout=timeout_s)
    try:
        answers, warnings = _run_queries(client, base_url, {"detail": expr}, snap.at, timeout_s)
    finally:
        if own:
            client.close()
    # `snap` changes only once the answer is in, so a retried task never merges or warns twice
    if len(hosts) > len(chosen):
        snap.warnings.append(f"details (idleness, UUIDs) asked for {len(chosen)} of {len(hosts)} exporters; "
                             "the rest are judged on the window average only")
    merge_answers(snap, answers)
    snap.detail_hosts.update(chosen)
    snap.warnings += warnings
    snap.round_trips += 1
    return snap


@task(name="query-dcgm-metrics", cache_policy=NONE, **TRANSIENT_RETRIES)
def query_dcgm_metrics(prometheus: Any, window: str, memory_temp_c: float = 95.0, stale_after_s: float = 120.0,
                       metric_selector: str = "", exporter_job: str = ".*dcgm.*") -> DCGMSnapshot:
    """The fleet's dcgm-exporter metrics over `window`: four PromQL queries, whatever the fleet's size.

    `prometheus` is the platform's `PrometheusServer` block (its `url` and `timeout_s`).
    """
    return fetch_dcgm(prometheus.url, window, memory_temp_c=memory_temp_c, stale_after_s=stale_after_s,
                      metric_selector=metric_selector, exporter_job=exporter_job, timeout_s=prometheus.timeout_s)


@task(name="query-dcgm-details", cache_policy=NONE, **TRANSIENT_RETRIES)
def query_dcgm_details(prometheus: Any, snap: DCGMSnapshot, hosts: set[str], metric_selector: str = ""
                       ) -> DCGMSnapshot:
    """Details for the GPUs that need them (one query restricted to their exporters)."""
    return fetch_dcgm_detail(prometheus.url, snap, hosts, metric_selector=metric_selector,
                             timeout_s=prometheus.timeout_s)
