"""What the GPU sweep's data means: dcgm-exporter metrics joined with Kubernetes, classified.

Pure: `FleetSnapshot` (Kubernetes) and `DCGMSnapshot` (Prometheus) in, a `SweepResult` out.

**The join.** dcgm-exporter labels every series with ``Hostname``: the exporter *pod's* name when it
runs as a DaemonSet without ``NODE_NAME`` (older GPU-operator installs), the node's name when the
pod sets ``NODE_NAME`` from ``spec.nodeName`` (the standalone chart: deployment/templates/daemonset.yaml;
dcgm-exporter internal/pkg/hostname/hostname.go) or runs with ``hostNetwork``, a short or fully
qualified host name outside Kubernetes. A Hostname maps to a node as an exporter pod's name, a node's
name, or either one's first DNS label (short vs FQDN). Where relabelling dropped it, the series'
``instance`` (the scrape target's address: the exporter pod's IP and port) maps to the exporter pod
with that IP. Series that map to no node are always a finding, with counts.

**Attribution.** The pod holding a GPU is dcgm-exporter's ``pod``/``namespace`` labels (kubelet's
pod-resources API), renamed ``exported_pod``/``exported_namespace`` by Prometheus when the scrape
does not honour the exporter's labels; then ``pod`` is the exporter's own pod and is never taken
as the holder. Without attribution, the node's GPU pods are named.

**XIDs.** ``DCGM_FI_DEV_XID_ERRORS`` holds the *last* XID and keeps it until the exporter restarts
(NVIDIA/dcgm-exporter issues 95 and 500, NVIDIA/DCGM issue 277): every distinct value the window
saw is read, and an XID counts only when seen after the node's last repair (its annotation records
the values the gauge kept then) or after the exporter restarted. Where the exporter exports
``DCGM_EXP_XID_ERRORS_COUNT`` (one series per XID within its own window) that counter is used.

**Unknown is not healthy.** No metrics (Prometheus down, exporter down, stale or absent, a metric
missing or NaN) never reads as healthy: the GPU's status is ``unknown`` and a finding says why; a
sweep where most GPUs are unknown is ``unknown``. A failed follow-up query leaves what the first
queries established standing, with a finding that names what is missing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, replace
from typing import Any

from tasks.gpu_model import (
    XID_COUNTER,
    XID_GAUGE,
    ExporterPod,
    FleetSnapshot,
    GPUFinding,
    GPUNode,
    GPUPod,
    GPUState,
    GPUStatus,
    Kind,
    Severity,
    SweepResult,
    SweepThresholds,
    XIDBaseline,
    _age_s,
    timestamp_of,
    xid_baseline,
    xid_text,
)
from tasks.gpu_plans import gpu_sort
from tasks.prometheus import XID_COUNTER_WINDOW_S, DCGMSnapshot, address_host


def _finite(v: float | None) -> bool:
    return v is not None and not math.isnan(v) and not math.isinf(v)


def _fmt(v: float | None) -> float | str:
    if v is None:
        return "absent"
    return round(v, 2) if not math.isnan(v) else math.nan


_STATUS_RANK = {GPUStatus.FAULTY: 0, GPUStatus.MISSING: 0, GPUStatus.UNKNOWN: 1, GPUStatus.WARNING: 2,
                GPUStatus.IDLE: 3, GPUStatus.HEALTHY: 4}
_FAULT_KEYS = ("rows_max", "row_fail_max", "row_pending_max", "memory_temp_max")


def _worse(a: GPUStatus, b: GPUStatus) -> GPUStatus:
    return a if _STATUS_RANK[a] <= _STATUS_RANK[b] else b


# --- the join --------------------------------------------------------------------------------


@dataclass
class _Join:
    """The fleet and its metrics joined by node (what `needs_detail` and `classify` both read)."""

    exporters_on: dict[str, list[ExporterPod]]
    exporter_names: set[str]
    holders_on: dict[str, list[GPUPod]]
    pods_by_ref: dict[tuple[str, str], GPUPod]
    per_node: dict[str, dict[str, tuple[tuple[str, str], dict[str, float]]]]
    xids_on: dict[str, dict[str, dict[int, float]]]
    counts_on: dict[str, dict[str, dict[int, float]]]
    hosts_on: dict[str, set[str]]
    node_values: dict[str, dict[str, float]]
    targets_on: dict[str, list[Any]]
    unmapped: dict[str, dict[str, float]]


class HostMap:
    """Which node an exporter (a Hostname, or `@instance`) belongs to."""

    def __init__(self, fleet: FleetSnapshot):
        self.nodes = {n.name for n in fleet.nodes}
        short: dict[str, set[str]] = defaultdict(set)
        for n in fleet.nodes:
            short[n.name.split(".", 1)[0]].add(n.name)
        self.short = {k: next(iter(v)) for k, v in short.items() if len(v) == 1}
        self.pods: dict[str, str] = {}
        ips: dict[str, set[str]] = defaultdict(set)
        for e in fleet.exporters:
            if e.node:
                self.pods[e.name] = e.node
                if e.ip:
                    ips[e.ip].add(e.node)
        self.ips = {ip: next(iter(ns)) for ip, ns in ips.items() if len(ns) == 1}
        self._cache: dict[str, str | None] = {}

    def name(self, name: str) -> str | None:
        """A pod name, a node name, or either one short or fully qualified."""
        if name in self.pods:
            return self.pods[name]
        if name in self.nodes:
            return name
        if name in self.ips:
            return self.ips[name]
        return self.short.get(name) or self.short.get(name.split(".", 1)[0])

    def host(self, host: str) -> str | None:
        node = self._cache.get(host, "")
        if node == "":
            node = self.name(address_host(host[1:])) if host.startswith("@") else self.name(host)
            self._cache[host] = node
        return node


def _join(fleet: FleetSnapshot, metrics: DCGMSnapshot) -> _Join:
    hosts = HostMap(fleet)
    exporters_on: dict[str, list[ExporterPod]] = defaultdict(list)
    for e in fleet.exporters:
        if e.node:
            exporters_on[e.node].append(e)
    holders_on: dict[str, list[GPUPod]] = defaultdict(list)
    for p in fleet.pods:
        if p.node and p.gpus_held and not p.daemonset:
            holders_on[p.node].append(p)
    per_node: dict[str, dict[str, tuple[tuple[str, str], dict[str, float]]]] = defaultdict(dict)
    hosts_on: dict[str, set[str]] = defaultdict(set)
    unmapped: dict[str, dict[str, float]] = defaultdict(lambda: {"series": 0})
    for key, vals in metrics.values.items():
        node = hosts.host(key[0])
        if node is None:
            unmapped[key[0]]["series"] += 1
            continue
        hosts_on[node].add(key[0])
        prev = per_node[node].get(key[1])
        if prev is None:
            per_node[node][key[1]] = (key, vals)
        else:  # one GPU under two exporter keys (pod name and node name): keep the worst of both
            merged = dict(prev[1])
            for name, v in vals.items():
                old = merged.get(name)
                if old is None or (math.isnan(old) and not math.isnan(v)) or v > old:
                    merged[name] = v
            per_node[node][key[1]] = (prev[0], merged)
    xids_on: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
    counts_on: dict[str, dict[str, dict[int, float]]] = defaultdict(dict)
    for source, out in ((metrics.xids, xids_on), (metrics.xid_counts, counts_on)):
        for (host, gpu), seen in source.items():
            node = hosts.host(host)
            if node is None:
                unmapped[host]["series"] += 1
                continue
            hosts_on[node].add(host)
            slot = out[node].setdefault(gpu, {})
            for code, ts in seen.items():
                slot[code] = max(ts, slot.get(code, ts))
    node_values: dict[str, dict[str, float]] = defaultdict(dict)
    for host, vals in metrics.per_host.items():
        node = hosts.host(host)
        if node is None:
            u = unmapped[host]
            u["series"] += 1
            u["gpus"] = max(u.get("gpus", 0), vals.get("gpus_now", vals.get("util_n", 0)))
            continue
        hosts_on[node].add(host)
        slot = node_values[node]
        for name, v in vals.items():
            if _finite(v) and v > slot.get(name, -math.inf):
                slot[name] = v
    targets_on: dict[str, list[Any]] = defaultdict(list)
    for t in metrics.targets:
        node = (hosts.pods.get(t.pod or "") or hosts.name(t.host))
        if node is not None:
            targets_on[node].append(t)
    return _Join(exporters_on, {e.name for e in fleet.exporters} | {t.pod for t in metrics.targets if t.pod},
                 holders_on, {(p.namespace, p.name): p for p in fleet.pods}, per_node, xids_on, counts_on,
                 hosts_on, node_values, targets_on, unmapped)


def holder_of(labels: dict[str, str], exporter_names: set[str]) -> tuple[str, str] | None:
    """(namespace, pod) holding a GPU by its series' labels: `exported_*` first (a relabelled scrape),
    else `pod`/`namespace` unless that is the exporter's own pod."""
    if labels.get("exported_pod"):
        return labels.get("exported_namespace", ""), labels["exported_pod"]
    pod = labels.get("pod")
    if pod and pod not in exporter_names:
        return labels.get("namespace", ""), pod
    return None


def needs_detail(fleet: FleetSnapshot, metrics: DCGMSnapshot, th: SweepThresholds) -> set[str]:
    """Exporters whose GPUs need the follow-up query: a fault or XID to name by UUID, a GPU gone, or GPUs
    that may be idle while held (their max and sample count decide)."""
    if not metrics.available:
        return set()
    j = _join(fleet, metrics)
    hosts: set[str] = set()
    capacity = {n.name: n.capacity for n in fleet.nodes}
    for node in set(j.per_node) | set(j.xids_on) | set(j.counts_on) | set(j.node_values):
        gpus = j.per_node.get(node, {})
        node_hosts = j.hosts_on.get(node, set())
        idle_unattributed = 0
        attributed = False
        flagged = bool(j.xids_on.get(node) or j.counts_on.get(node))
        for (host, gpu), v in gpus.values():
            labels = metrics.labels.get((host, gpu)) or {}
            util_avg = v.get("util_avg")
            if any(k in v for k in _FAULT_KEYS) or "temp_max" in v or (util_avg is not None and math.isnan(util_avg)):
                flagged = True
            if holder_of(labels, j.exporter_names):
                attributed = True
                if _finite(util_avg) and util_avg < th.idle_util_pct:
                    flagged = True
            elif _finite(util_avg) and util_avg < th.idle_util_pct:
                idle_unattributed += 1
        now = j.node_values.get(node, {}).get("gpus_now", 0)
        if now and now < capacity.get(node, 0):
            flagged = True  # which GPU is gone
        holders = j.holders_on.get(node, [])
        if holders and not attributed:
            free = max(0, capacity.get(node, 0) - sum(p.gpus_held for p in holders))
            if idle_unattributed > free:
                flagged = True
        if flagged:
            hosts |= node_hosts
    return hosts


# --- XIDs ------------------------------------------------------------------------------------


@dataclass
class _XIDs:
    counted: list[int]
    before_repair: list[int]
    source: str
    last: int | None  # the gauge's latest value (what a repair note records)


def _xids(node: str, gpu: str, j: _Join, metrics: DCGMSnapshot, baseline: XIDBaseline | None,
          exporter_started: float | None) -> _XIDs:
    counter_hosts = [h for h in j.hosts_on.get(node, ()) if h in metrics.per_host
                     and "xid_counter" in metrics.per_host[h]]
    gauge = j.xids_on.get(node, {}).get(gpu, {})
    last = max(gauge, key=lambda c: gauge[c]) if gauge else None
    if counter_hosts:
        seen = j.counts_on.get(node, {}).get(gpu, {})
        ws = max(metrics.xid_counter_window_s.get(h, XID_COUNTER_WINDOW_S) for h in counter_hosts)
        counted = [c for c, ts in seen.items() if baseline is None or ts > baseline.at + ws]
        stale = [c for c in seen if c not in counted]
        return _XIDs(sorted(counted), sorted(stale), XID_COUNTER, last)
    counted, stale = [], []
    for code, ts in gauge.items():
        if baseline is None:
            counted.append(code)
            continue
        restarted = exporter_started is not None and exporter_started > baseline.at and ts > exporter_started
        if ts > baseline.at and (code != baseline.xids.get(gpu) or restarted):
            counted.append(code)
        else:
            stale.append(code)
    return _XIDs(sorted(counted), sorted(stale), XID_GAUGE, last)


# --- classification --------------------------------------------------------------------------


def classify(fleet: FleetSnapshot, metrics: DCGMSnapshot, th: SweepThresholds, *, cluster: str = "default",
             now: float | None = None, xid_baseline_kind: str = "repair") -> SweepResult:
    """Join the fleet with its metrics and classify every GPU node and GPU."""
    now = metrics.at if now is None else now
    window = th.window
    findings: list[GPUFinding] = []
    states: list[GPUState] = []
    j = _join(fleet, metrics) if metrics.available else _join(fleet, DCGMSnapshot(window=window, at=now))
    xid_sources: set[str] = set()
    xid_last: dict[str, dict[str, int]] = {}

    if not metrics.available:
        findings.append(GPUFinding(
            kind=Kind.PROMETHEUS_UNAVAILABLE, severity=Severity.CRITICAL, node=None,
            summary=f"Prometheus gave no usable answer: every GPU of {len(fleet.nodes)} nodes is unknown",
            evidence={"error": metrics.error, "window": window},
        ))
    elif metrics.detail_error is not None:
        findings.append(GPUFinding(
            kind=Kind.DETAILS_MISSING, severity=Severity.WARNING, node=None,
            summary="the follow-up query failed: the findings below stand, but UUIDs, idleness and which GPU is "
                    "missing are unknown for the GPUs that needed them",
            evidence={"error": metrics.detail_error, "window": window},
        ))

    gpus_expected = gpus_reporting = 0
    util_sum, util_n = 0.0, 0
    for node in sorted(fleet.nodes, key=lambda n: n.name):
        holders = j.holders_on.get(node.name, [])
        held = sum(p.gpus_held for p in holders)
        expected = node.capacity
        gpus_expected += expected
        held_refs = [p.ref for p in holders]

        if node.ready is not True:
            findings.append(GPUFinding(
                kind=Kind.NODE_NOT_READY, severity=Severity.CRITICAL if holders else Severity.WARNING, node=node.name,
                summary=f"node is {'NotReady' if node.ready is False else 'Unknown'}"
                + (f" while {len(holders)} pod(s) hold {held} GPU(s)" if holders else ""),
                evidence={"ready": node.ready if node.ready is not None else "Unknown", "gpu_pods": held_refs},
            ))
        if node.unschedulable and holders:
            findings.append(GPUFinding(
                kind=Kind.CORDONED_HELD, severity=Severity.WARNING, node=node.name,
                summary=f"node is cordoned while {len(holders)} pod(s) hold {held} GPU(s)",
                evidence={"unschedulable": True, "gpu_pods": held_refs},
            ))
        if not metrics.available:
            states += [GPUState(node.name, str(i), GPUStatus.UNKNOWN) for i in range(expected)]
            continue
        node_states, reporting, node_util = _classify_node(node, holders, held, j, metrics, th, now, findings,
                                                           xid_baseline_kind, xid_sources, xid_last)
        gpus_reporting += reporting
        if node_util is not None:
            util_sum += node_util[0]
            util_n += node_util[1]
        for i in range(expected):  # slots with no data at all
            if str(i) not in node_states:
                node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.UNKNOWN)
        states += sorted(node_states.values(), key=lambda s: gpu_sort(s.gpu))

    if j.unmapped:
        gpus = sum(int(u.get("gpus", 0)) for u in j.unmapped.values())
        series = sum(int(u["series"]) for u in j.unmapped.values())
        names = sorted(j.unmapped)
        no_hostname = [h for h in names if h.startswith("@")]
        findings.append(GPUFinding(
            kind=Kind.UNMAPPED_EXPORTER, severity=Severity.WARNING, node=None,
            summary=f"dcgm series of {len(names)} exporter(s) ({gpus} GPUs, {series} series) match no node of this "
                    "cluster" + (f"; {len(no_hostname)} without a Hostname label and no exporter pod at their target's "
                                 "address" if no_hostname else ""),
            evidence={"exporters": len(names), "gpus": gpus, "series": series, "examples": names[:5]},
        ))
    _name_workflows(findings, j)
    findings.sort(key=lambda f: (-f.severity.rank, f.kind.value, f.node or "", gpu_sort(f.gpu or "")))
    gpus_held = sum(p.gpus_held for p in fleet.pods if p.node and not p.daemonset)
    source = "none" if not xid_sources else (xid_sources.pop() if len(xid_sources) == 1 else "mixed: "
                                              + ", ".join(sorted(xid_sources)))
    return SweepResult(
        cluster=cluster, window=window, at=metrics.at, findings=findings, gpus=states,
        gpu_nodes=len(fleet.nodes), gpus_expected=gpus_expected, gpus_reporting=gpus_reporting,
        gpus_held=gpus_held, fleet_util_pct=(util_sum / util_n) if util_n else None,
        metrics_error=metrics.error, round_trips=fleet.round_trips + metrics.round_trips,
        warnings=list(metrics.warnings), xid_source=source, xid_last=xid_last, unknown_share=th.unknown_share,
        metrics_source=metrics.source, metrics_source_note=metrics.source_note,
    )


def _exporter_unknown(node: GPUNode, j: _Join, th: SweepThresholds, now_count: int, window: str,
                      gpus_in_window: int) -> GPUFinding | None:
    targets = j.targets_on.get(node.name, [])
    down = [t for t in targets if _finite(t.up) and t.up < 1]
    stale = [t for t in targets if _finite(t.age_s) and t.age_s > th.stale_after_s]
    empty = [t for t in targets if t.empty]
    exporter_ref = ", ".join(f"{e.namespace}/{e.name}" for e in j.exporters_on.get(node.name, [])) or None
    expected = node.capacity
    if down:
        return GPUFinding(
            kind=Kind.EXPORTER_DOWN, severity=Severity.WARNING, node=node.name,
            summary=f"dcgm-exporter is down (up=0): the node's {expected} GPU(s) are unknown",
            evidence={"up": 0, "instance": ",".join(t.instance for t in down), "exporter_pod": exporter_ref},
        )
    if stale:
        age = max(t.age_s for t in stale)
        return GPUFinding(
            kind=Kind.EXPORTER_STALE, severity=Severity.WARNING, node=node.name,
            summary=f"dcgm-exporter last scraped {age:.0f}s ago (over {th.stale_after_s:.0f}s): the node's GPUs are "
                    "unknown",
            evidence={"last_scrape_age_s": round(age, 1), "stale_after_s": th.stale_after_s,
                      "exporter_pod": exporter_ref},
        )
    if now_count == 0 and exporter_ref is None and not targets:
        return GPUFinding(
            kind=Kind.NO_EXPORTER, severity=Severity.WARNING, node=node.name,
            summary=f"no dcgm-exporter pod and no current dcgm metrics for this GPU node: its {expected} GPU(s) are "
                    "unknown", evidence={"exporter_pods": 0, "gpus_reporting": 0, "window": window},
        )
    if now_count == 0:
        return GPUFinding(
            kind=Kind.EXPORTER_STALE, severity=Severity.WARNING, node=node.name,
            summary=f"no current dcgm metrics from {exporter_ref or ', '.join(t.instance for t in targets)}"
            + (" (it answers its scrapes but serves no GPU)" if empty else "")
            + f": the node's {expected} GPU(s) are unknown",
            evidence={"exporter_pod": exporter_ref, "gpus_reporting": 0, "gpus_in_window": gpus_in_window,
                      "window": window},
        )
    return None


def _classify_node(node: GPUNode, holders: list[GPUPod], held: int, j: _Join, metrics: DCGMSnapshot,
                   th: SweepThresholds, now: float, findings: list[GPUFinding], baseline_kind: str,
                   xid_sources: set[str], xid_last: dict[str, dict[str, int]]
                   ) -> tuple[dict[str, GPUState], int, tuple[float, int] | None]:
    window = th.window
    expected = node.capacity
    gpu_data = j.per_node.get(node.name, {})
    nv = j.node_values.get(node.name, {})
    now_count = int(nv.get("gpus_now", 0))
    nan_util = [g for g, (_, v) in gpu_data.items() if "util_avg" in v and math.isnan(v["util_avg"])]
    util_count = int(nv.get("util_n", 0)) + len(nan_util)
    temp_count = int(nv.get("temp_n", 0))
    node_unknown = _exporter_unknown(node, j, th, now_count, window, max(util_count, temp_count))
    node_states: dict[str, GPUState] = {}
    reporting = 0
    if node_unknown is not None:
        findings.append(node_unknown)
        for i in range(expected):
            node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.UNKNOWN)
    else:
        reporting = now_count
    node_avg = nv["util_sum"] / nv["util_n"] if nv.get("util_n") else None
    util_total = (nv["util_sum"], int(nv["util_n"])) if nv.get("util_n") and node_unknown is None else None

    detailed = bool(gpu_data) and all(k[0] in metrics.detail_hosts for k, _ in gpu_data.values())
    present = {g for g, (_, v) in gpu_data.items() if "util" in v} if detailed else None
    if node_unknown is None and now_count < expected:
        slots = {g for g, (_, v) in gpu_data.items() if "util_avg" in v or "util" in v} | {
            str(i) for i in range(expected)}
        gone = sorted(slots - present, key=gpu_sort) if present is not None else []
        f = GPUFinding(
            kind=Kind.GPU_MISSING, severity=Severity.CRITICAL, node=node.name,
            summary=f"{now_count} of {expected} GPUs report: {expected - now_count} missing"
            + (f" (GPU {', '.join(gone)})" if gone else ""),
            evidence={"gpus_reporting": now_count, "capacity": expected, "allocatable": node.allocatable,
                      "missing_gpus": gone or ("unknown (the follow-up query failed)" if metrics.detail_error
                                               else "unknown (not seen in the window)"), "window": window},
            gpu=",".join(gone) or None, cordon_reason="gpu-missing",
        )
        if len(gone) == 1 and gone[0] in gpu_data:
            f = replace(f, uuid=(metrics.labels.get(gpu_data[gone[0]][0]) or {}).get("UUID"))
        findings.append(f)
        for g in gone:
            node_states[g] = GPUState(node.name, g, GPUStatus.MISSING)
        unnamed = expected - now_count - len(gone)
        for i in range(expected):  # missing GPUs that cannot be named: mark empty slots
            if unnamed <= 0:
                break
            if str(i) not in gpu_data and str(i) not in node_states:
                node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.MISSING)
                unnamed -= 1
    if node_unknown is None and util_count != temp_count and now_count:
        which = "DCGM_FI_DEV_GPU_UTIL" if util_count < temp_count else "DCGM_FI_DEV_GPU_TEMP"
        findings.append(GPUFinding(
            kind=Kind.METRIC_MISSING, severity=Severity.WARNING, node=node.name,
            summary=f"{which} is missing for {abs(util_count - temp_count)} GPU(s) in the window: those checks are "
                    "unknown",
            evidence={"missing": [which], "gpus_with_util": util_count, "gpus_with_temp": temp_count,
                      "window": window},
        ))

    baseline = xid_baseline(node, baseline_kind)
    exporter_started = max((t for t in (timestamp_of(e.started) for e in j.exporters_on.get(node.name, []))
                            if t is not None), default=None)
    unattributed_idle: list[str] = []
    attributed_any = False
    xid_gpus = set(j.xids_on.get(node.name, {})) | set(j.counts_on.get(node.name, {}))
    for g in sorted(set(gpu_data) | xid_gpus, key=gpu_sort):
        key, v = gpu_data.get(g, ((next(iter(j.hosts_on.get(node.name, {""}))), g), {}))
        labels = metrics.labels.get(key) or {}
        uuid = labels.get("UUID")
        ref = holder_of(labels, j.exporter_names)
        holder_pod = j.pods_by_ref.get(ref) if ref else None
        if ref:
            attributed_any = True
        util_avg = v.get("util_avg")
        state = node_states.get(g)
        holder_ref = holder_pod.ref if holder_pod else (f"{ref[0]}/{ref[1]}" if ref else None)
        if state is None:
            state = node_states[g] = GPUState(node.name, g, GPUStatus.HEALTHY, None, holder_ref)
        if _finite(util_avg) and state.status is not GPUStatus.MISSING:
            state.util_avg = util_avg
        common: dict[str, Any] = {"gpu": g, "uuid": uuid}
        if holder_pod is not None:
            common.update(pod=holder_pod.name, namespace=holder_pod.namespace, owner=holder_pod.owner)
        elif ref:
            common.update(pod=ref[1], namespace=ref[0])
        if labels.get("other_pod") or labels.get("other_exported_pod"):
            others = [x for x in (labels.get("other_exported_pod"), labels.get("other_pod")) if x]
            common["owner"] = f"conflicting holders: {holder_ref}, {', '.join(others)}"

        # hardware faults: judged on whatever the window holds, even when the exporter is down now
        x = _xids(node.name, g, j, metrics, baseline, exporter_started)
        if x.source and (x.counted or x.before_repair):
            xid_sources.add(x.source)
        if x.last is not None:
            xid_last.setdefault(node.name, {})[g] = x.last
        critical = [c for c in x.counted if c in th.critical_xids]
        other = [c for c in x.counted if c not in th.critical_xids]
        if critical:
            findings.append(GPUFinding(
                kind=Kind.CRITICAL_XID, severity=Severity.CRITICAL, node=node.name, summary=f"XID {xid_text(critical)}",
                evidence={x.source: critical, "source": x.source, "window": window,
                          **({"before_last_repair": x.before_repair} if x.before_repair else {})},
                cordon_reason=f"xid-{critical[0]}", **common,
            ))
            state.status = _worse(state.status, GPUStatus.FAULTY)
        if other or x.before_repair:
            stale = [c for c in x.before_repair if c not in x.counted]
            summary = []
            if other:
                summary.append(f"XID {xid_text(other)}: not in the critical set")
            if stale:
                summary.append(f"XID {xid_text(stale)} still shown from before the last repair"
                               + (" (cordon)" if baseline_kind == "cordon" else "") + ": not counted")
            findings.append(GPUFinding(
                kind=Kind.XID, severity=Severity.INFO, node=node.name, summary="; ".join(summary),
                evidence={x.source: other + stale, "source": x.source, "window": window,
                          **({"repaired_at": baseline.at} if baseline and stale else {})}, **common,
            ))
        rows = v.get("rows_max", 0.0)
        row_fail = v.get("row_fail_max", 0.0)
        pending = v.get("row_pending_max", 0.0)
        if (row_fail != 0 and row_fail == row_fail) or (rows > 0 and math.isinf(rows)):
            findings.append(GPUFinding(
                kind=Kind.ROW_REMAP, severity=Severity.CRITICAL, node=node.name,
                summary=f"row remapping FAILED: the GPU's memory cannot be repaired ({_fmt(rows)} uncorrectable "
                        "remapped rows)",
                evidence={"DCGM_FI_DEV_ROW_REMAP_FAILURE": row_fail,
                          "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": _fmt(rows), "window": window},
                cordon_reason="row-remap-failure", **common,
            ))
            state.status = _worse(state.status, GPUStatus.FAULTY)
        elif _finite(pending) and pending > 0:
            findings.append(GPUFinding(
                kind=Kind.ROW_REMAP_PENDING, severity=Severity.WARNING, node=node.name,
                summary="a row remap is pending: the GPU needs a reset for it to take effect",
                evidence={"DCGM_FI_DEV_ROW_REMAP_PENDING": pending,
                          "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": _fmt(rows), "window": window}, **common,
            ))
            state.status = _worse(state.status, GPUStatus.WARNING)
        elif _finite(rows) and rows > 0:
            findings.append(GPUFinding(
                kind=Kind.REMAPPED_ROWS, severity=Severity.INFO, node=node.name,
                summary=f"{rows:g} rows remapped for uncorrectable errors; the remap succeeded",
                evidence={"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": rows, "window": window}, **common,
            ))
        temp_max = v.get("temp_max")
        if _finite(temp_max) and temp_max > th.temp_c:
            findings.append(GPUFinding(
                kind=Kind.GPU_HOT, severity=Severity.WARNING, node=node.name,
                summary=f"GPU temperature reached {temp_max:g} C, over {th.temp_c:g} C",
                evidence={"DCGM_FI_DEV_GPU_TEMP_max": temp_max, "threshold_c": th.temp_c, "window": window}, **common,
            ))
            state.status = _worse(state.status, GPUStatus.WARNING)
        mem_max = v.get("memory_temp_max")
        if _finite(mem_max) and mem_max > th.memory_temp_c:
            findings.append(GPUFinding(
                kind=Kind.MEMORY_HOT, severity=Severity.WARNING, node=node.name,
                summary=f"GPU memory temperature reached {mem_max:g} C, over {th.memory_temp_c:g} C",
                evidence={"DCGM_FI_DEV_MEMORY_TEMP_max": mem_max, "threshold_c": th.memory_temp_c, "window": window},
                **common,
            ))
            state.status = _worse(state.status, GPUStatus.WARNING)
        nans = sorted({"util_avg": "DCGM_FI_DEV_GPU_UTIL", "temp_max": "DCGM_FI_DEV_GPU_TEMP",
                       "rows_max": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
                       "row_fail_max": "DCGM_FI_DEV_ROW_REMAP_FAILURE", "row_pending_max": "DCGM_FI_DEV_ROW_REMAP_PENDING",
                       "memory_temp_max": "DCGM_FI_DEV_MEMORY_TEMP"}[m]
                      for m in ("util_avg", "temp_max", *_FAULT_KEYS) if m in v and math.isnan(v[m]))
        if nans:
            findings.append(GPUFinding(
                kind=Kind.METRIC_NAN, severity=Severity.WARNING, node=node.name,
                summary=f"NaN for {', '.join(nans)}: those checks are unknown",
                evidence={"nan": nans, "window": window}, **common,
            ))
            state.status = _worse(state.status, GPUStatus.UNKNOWN)
        if node_unknown is not None or state.status is GPUStatus.MISSING:
            continue  # what follows needs current data

        idle = _idle(v, th)
        if idle is None:
            continue
        if holder_pod is not None or ref:
            age = _age_s(holder_pod.started, now) if holder_pod else None
            if age is not None and age < th.window_s:
                continue  # the pod is younger than the window: not judged yet
            who = holder_pod.ref if holder_pod else holder_ref
            owner = holder_pod.owner if holder_pod else None
            findings.append(GPUFinding(
                kind=Kind.IDLE_HELD, severity=Severity.WARNING, node=node.name,
                summary=f"held by {who} ({owner or 'no owner'}) but idle for the whole window",
                evidence={**idle, "window": window, "fb_used_mib": _fmt(v.get("fb_used")),
                          "power_avg_w": _fmt(v.get("power_avg"))}, **common,
            ))
            state.status = _worse(state.status, GPUStatus.IDLE)
        else:
            unattributed_idle.append(g)

    # No pod attribution from dcgm-exporter on this node: when more GPUs are idle than are free,
    # some held GPUs are idle; name the node's GPU pods (the holder cannot be narrowed further).
    if unattributed_idle and holders and not attributed_any and node_unknown is None and not metrics.detail_error:
        judged = [p for p in holders if (_age_s(p.started, now) or math.inf) >= th.window_s]
        free = max(0, expected - held)
        if judged and len(unattributed_idle) > free:
            pod = judged[0] if len(judged) == 1 else None
            findings.append(GPUFinding(
                kind=Kind.IDLE_HELD, severity=Severity.WARNING, node=node.name,
                summary=f"{len(unattributed_idle)} GPUs idle for the whole window but only {free} free: "
                        f"held idle by {', '.join(p.ref for p in judged)}",
                evidence={"idle_gpus": unattributed_idle, "free_gpus": free, "gpu_pods": [p.ref for p in judged],
                          "owners": sorted({p.owner or "none" for p in judged}), "window": window,
                          "attribution": "node (dcgm-exporter has no pod labels)"},
                gpu=",".join(unattributed_idle), pod=pod.name if pod else None,
                namespace=pod.namespace if pod else None, owner=pod.owner if pod else None,
            ))
            for g in unattributed_idle:
                node_states[g].status = _worse(node_states[g].status, GPUStatus.IDLE)

    # the GPUs that passed every filter: healthy, at the node's average utilisation
    if node_unknown is None:
        for i in range(expected):
            s = node_states.get(str(i))
            if s is None:
                node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.HEALTHY, node_avg)
            elif s.util_avg is None and s.status is not GPUStatus.MISSING:
                s.util_avg = node_avg
    return node_states, reporting, util_total


def _name_workflows(findings: list[GPUFinding], j: _Join) -> None:
    """A critical finding on a node running Argo workflow pods names their workflows."""
    for i, f in enumerate(findings):
        if f.severity is not Severity.CRITICAL or f.node is None:
            continue
        pod = j.pods_by_ref.get((f.namespace or "", f.pod or "")) if f.pod else None
        pods = [pod] if pod is not None else j.holders_on.get(f.node, [])
        workflows = sorted({f"{p.namespace}/{p.workflow}" for p in pods if p.workflow})
        if workflows:
            findings[i] = replace(f, workflow=", ".join(workflows))  # findings are frozen (tasks.findings)


def _idle(v: dict[str, float], th: SweepThresholds) -> dict[str, Any] | None:
    """Evidence that a GPU was idle for the whole window, or None when it was busy or cannot be judged."""
    util_max = v.get("util_max")
    samples = v.get("util_samples")
    if not _finite(util_max) or util_max >= th.idle_util_pct:
        return None
    if not _finite(samples) or samples < th.min_window_samples:
        return None
    gr = v.get("gr_max")
    if _finite(gr) and gr * 100.0 >= th.idle_util_pct:
        return None  # the graphics engine was busy although the coarse utilisation says otherwise
    evidence: dict[str, Any] = {"DCGM_FI_DEV_GPU_UTIL_max": util_max, "threshold_pct": th.idle_util_pct,
                                "samples": int(samples)}
    if _finite(gr):
        evidence["DCGM_FI_PROF_GR_ENGINE_ACTIVE_max"] = gr
    return evidence
