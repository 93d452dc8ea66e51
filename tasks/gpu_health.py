"""What the GPU sweep's data means: dcgm-exporter metrics joined with Kubernetes, classified.

Everything here is pure: plain data in (`FleetSnapshot` from the Kubernetes API, `DCGMSnapshot`
from Prometheus), typed results out (`SweepResult`, `Finding`, `CordonPlan`), no network, no Prefect.

**The join.** dcgm-exporter labels every series with ``Hostname``: the exporter *pod's* name when it
runs as a DaemonSet (as in the sandbox and in most GPU-operator installs), the node's name when it
runs with ``hostNetwork`` or outside Kubernetes. A Hostname is mapped to a node through the exporter
pod's ``spec.nodeName``, else taken as a node name. A GPU is ``(node, gpu index)`` with its ``UUID``.
The pod holding it is dcgm-exporter's ``pod``/``namespace`` labels (kubelet's pod-resources
attribution), else the pods on that node that request GPUs.

**Unknown is not healthy.** No metrics (Prometheus down, exporter down, stale or absent, a metric
missing or NaN) never reads as healthy: the GPU's status is ``unknown`` and a finding says why.

**Critical XIDs.** Which XIDs are critical is the platform config's `thresholds.gpu.critical_xids`;
its default (`blocks.config.CRITICAL_XIDS`, here `DEFAULT_CRITICAL_XIDS`) is the project's one list,
which the Prometheus alert rule and the Grafana panel repeat (tests/test_prometheus_rules.py derives
their expressions from it). The default set, from NVIDIA's XID catalogue: each means the GPU or its
memory is unreliable until reset or replaced, whatever the workload did:

- 48 double-bit ECC error (DBE): uncorrectable memory error; the GPU must be reset.
- 63 ECC page retirement or row-remapping recording event: a reset is needed to apply it.
- 64 ECC page retirement or row-remapper recording *failure*: the memory cannot be repaired.
- 74 NVLink error: the link is down or flapping; multi-GPU jobs hang or crash.
- 79 GPU has fallen off the bus: the GPU is gone until the node reboots (often power/PCIe).
- 92 high single-bit ECC error rate: memory is degrading.
- 94 contained ECC error: the affected application was killed; reset the GPU when drained.
- 95 uncontained ECC error: every application on the GPU is affected; reset or reboot.

Other XIDs (13, 31, 43, 45 ...) are usually the application's own faults: reported as `info`.
`XID_MEANINGS` names the XIDs a finding may show, critical or not.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any, Iterable

from blocks.config import CRITICAL_XIDS, parse_duration
from tasks.prometheus import DCGMSnapshot

# --- vocabulary ------------------------------------------------------------------------------


class Severity(str, Enum):
    CRITICAL = "critical"
    WARNING = "warning"
    INFO = "info"

    @property
    def rank(self) -> int:
        return {"critical": 0, "warning": 1, "info": 2}[self.value]


class Kind(str, Enum):
    PROMETHEUS_UNAVAILABLE = "prometheus-unavailable"
    CRITICAL_XID = "critical-xid"
    ROW_REMAP = "row-remap"
    GPU_MISSING = "gpu-missing"
    NODE_NOT_READY = "node-not-ready"
    EXPORTER_DOWN = "exporter-down"
    EXPORTER_STALE = "exporter-stale"
    NO_EXPORTER = "no-exporter"
    GPU_HOT = "gpu-hot"
    MEMORY_HOT = "memory-hot"
    CORDONED_HELD = "cordoned-with-gpus-held"
    IDLE_HELD = "idle-but-held"
    METRIC_MISSING = "metric-missing"
    METRIC_NAN = "metric-nan"
    UNMAPPED_EXPORTER = "unmapped-exporter"
    XID = "xid"


class GPUStatus(str, Enum):
    HEALTHY = "healthy"
    IDLE = "idle"  # held by a pod that does nothing
    WARNING = "warning"  # hot
    FAULTY = "faulty"  # a critical finding
    MISSING = "missing"  # fell off the bus
    UNKNOWN = "unknown"  # no trustworthy data


# The critical XIDs unless the platform config says otherwise: the config's default, defined there once.
DEFAULT_CRITICAL_XIDS: frozenset[int] = frozenset(CRITICAL_XIDS)

# What an XID means, for a finding's summary (NVIDIA's XID catalogue); which are critical is configured.
XID_MEANINGS: dict[int, str] = {
    13: "graphics engine exception",
    31: "GPU memory page fault",
    43: "GPU stopped processing",
    45: "preemptive cleanup",
    48: "double-bit ECC error",
    63: "ECC page retirement / row-remap event",
    64: "ECC page retirement / row-remap failure",
    74: "NVLink error",
    79: "GPU fell off the bus",
    92: "high single-bit ECC error rate",
    94: "contained ECC error",
    95: "uncontained ECC error",
}


def _xid_text(codes: list[int]) -> str:
    """`[79, 13]` -> `79 (GPU fell off the bus), 13 (graphics engine exception)`."""
    return ", ".join(f"{c} ({XID_MEANINGS[c]})" if c in XID_MEANINGS else str(c) for c in codes)


ACTIONS: dict[Kind, str] = {
    Kind.PROMETHEUS_UNAVAILABLE: "Check Prometheus (its URL in the platform config, `/-/ready`); every GPU is unknown "
                                 "until it answers.",
    Kind.CRITICAL_XID: "Cordon and drain the node, reset the GPU (`nvidia-smi -r -i N`) or reboot the node; "
                       "if the XID returns, open an RMA for the GPU (UUID in the evidence).",
    Kind.ROW_REMAP: "Cordon and drain the node, reset the GPU so pending row remaps apply; a remap failure or "
                    "remapped rows that keep growing mean the GPU must be replaced.",
    Kind.GPU_MISSING: "A GPU fell off the bus: cordon and drain, check `dmesg` for XID 79 and the PCIe/power of "
                      "the slot, reboot the node; replace the GPU if it does not come back.",
    Kind.NODE_NOT_READY: "The kubelet stopped reporting: pods holding GPUs there are stranded. Check the node "
                         "(kubelet, network, power); delete the stranded pods if it does not recover.",
    Kind.EXPORTER_DOWN: "Restart the dcgm-exporter pod (`kubectl -n <ns> delete pod <pod>`) and read its logs; "
                        "the node's GPUs are unknown until it is scraped again.",
    Kind.EXPORTER_STALE: "Prometheus has no fresh dcgm metrics for this node: check the scrape target and the "
                         "exporter pod; the node's GPUs are unknown.",
    Kind.NO_EXPORTER: "No dcgm-exporter runs on this GPU node: check the DaemonSet's node selector and "
                      "tolerations; the node's GPUs are unknown.",
    Kind.GPU_HOT: "Check the node's cooling (fans, airflow, inlet temperature); a hot GPU throttles. Drain it if "
                  "the temperature keeps rising.",
    Kind.MEMORY_HOT: "Check the node's cooling; HBM over its limit throttles and raises ECC error rates.",
    Kind.CORDONED_HELD: "The node is cordoned but pods still hold its GPUs: drain it (evict those pods) before "
                        "repair, or uncordon it if the maintenance is over.",
    Kind.IDLE_HELD: "Ask the owner to release the GPUs (finish, scale down or delete the pod); they are allocated "
                    "but unused for the whole window.",
    Kind.METRIC_MISSING: "dcgm-exporter does not report every counter for this GPU: check its counters file and "
                         "the GPU's health (`dcgmi diag -r 1`); what is missing is unknown.",
    Kind.METRIC_NAN: "dcgm-exporter reports NaN for this GPU: DCGM cannot read it; run `dcgmi diag -r 1` and "
                     "restart the exporter; what is NaN is unknown.",
    Kind.UNMAPPED_EXPORTER: "Metrics carry a Hostname that is neither a dcgm-exporter pod nor a node of this "
                            "cluster: check the exporter's Hostname / relabelling or the metric selector.",
    Kind.XID: "An application-level XID: inspect the workload's logs; not a hardware fault by itself.",
}

# Findings that make a node unfit for new work: the cordon action acts on these only.
CORDON_KINDS = (Kind.CRITICAL_XID, Kind.ROW_REMAP, Kind.GPU_MISSING)
# Metrics every GPU must report (the rest are optional: older GPUs have no row remapper, no HBM sensor).
# Metrics every GPU must report, asked for every GPU (the rest are filters: older GPUs have no
# row remapper or HBM sensor, and their absence is not a fault).
REQUIRED_METRICS = ("util_avg", "temp_max")
METRIC_NAMES = {
    "util_avg": "DCGM_FI_DEV_GPU_UTIL", "temp_max": "DCGM_FI_DEV_GPU_TEMP", "xid_max": "DCGM_FI_DEV_XID_ERRORS",
    "rows_max": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "row_fail_max": "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "memory_temp_max": "DCGM_FI_DEV_MEMORY_TEMP",
}


@dataclass(frozen=True)
class SweepThresholds:
    window: str = "15m"
    temp_c: float = 85.0
    memory_temp_c: float = 95.0
    idle_util_pct: float = 5.0
    stale_after_s: float = 120.0
    critical_xids: frozenset[int] = DEFAULT_CRITICAL_XIDS
    min_window_samples: int = 2  # idle is judged on at least this many scrapes

    @property
    def window_s(self) -> int:
        return parse_duration(self.window)

    @classmethod
    def from_config(cls, gpu: Any, **overrides: Any) -> SweepThresholds:
        """From `blocks.config.GPUThresholds`, with any non-None keyword overriding it."""
        values = {
            "window": gpu.window, "temp_c": float(gpu.temp_c), "memory_temp_c": float(gpu.memory_temp_c),
            "idle_util_pct": float(gpu.idle_util_pct), "stale_after_s": float(parse_duration(gpu.stale_after)),
            "critical_xids": frozenset(int(x) for x in gpu.critical_xids),
        }
        for key, value in overrides.items():
            if value is None:
                continue
            if key == "stale_after":
                key, value = "stale_after_s", float(parse_duration(value))
            elif key == "critical_xids":
                value = frozenset(int(x) for x in value)
            values[key] = value
        parse_duration(values["window"])
        return cls(**values)


# --- the Kubernetes side ---------------------------------------------------------------------


@dataclass(slots=True)
class GPUNode:
    name: str
    ready: bool | None
    unschedulable: bool
    capacity: int
    allocatable: int
    taints: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)


@dataclass(slots=True)
class GPUPod:
    namespace: str
    name: str
    node: str | None
    owner: str | None
    whole_gpus: int
    shares: dict[str, float]
    started: str | None = None  # RFC 3339 (status.startTime, else creationTimestamp)
    daemonset: bool = False

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def gpus_held(self) -> int:
        """GPUs this pod occupies at least partly: its whole GPUs, or one for a share."""
        return self.whole_gpus or (1 if any(v > 0 for v in self.shares.values()) else 0)


@dataclass(slots=True)
class ExporterPod:
    namespace: str
    name: str
    node: str | None
    ip: str | None
    phase: str | None = None


@dataclass
class FleetSnapshot:
    """The GPU nodes, the pods holding GPUs and the exporter pods of one cluster."""

    nodes: list[GPUNode]
    pods: list[GPUPod]
    exporters: list[ExporterPod]
    round_trips: int = 0


def _age_s(ts: str | None, now: float) -> float | None:
    if not ts:
        return None
    try:
        return now - datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


# --- results ---------------------------------------------------------------------------------


@dataclass
class Finding:
    kind: Kind
    severity: Severity
    node: str | None
    summary: str
    evidence: dict[str, Any] = field(default_factory=dict)
    gpu: str | None = None
    uuid: str | None = None
    pod: str | None = None
    namespace: str | None = None
    owner: str | None = None
    cordon_reason: str | None = None  # the taint value when this finding warrants a cordon

    @property
    def action(self) -> str:
        return ACTIONS[self.kind]

    def row(self) -> dict[str, Any]:
        return {
            "severity": self.severity.value, "finding": self.kind.value, "node": self.node or "(fleet)",
            "gpu": self.gpu if self.gpu is not None else "", "uuid": self.uuid or "",
            "pod": f"{self.namespace}/{self.pod}" if self.pod else "", "owner": self.owner or "",
            "summary": self.summary, "evidence": format_evidence(self.evidence), "action": self.action,
        }


def format_evidence(evidence: dict[str, Any]) -> str:
    parts = []
    for key, value in evidence.items():
        if isinstance(value, float):
            value = "NaN" if math.isnan(value) else f"{value:g}"
        elif isinstance(value, (list, tuple, set)):
            value = ",".join(str(v) for v in value)
        parts.append(f"{key}={value}")
    return "; ".join(parts)


@dataclass(slots=True)
class GPUState:
    node: str
    gpu: str
    status: GPUStatus
    util_avg: float | None = None
    holder: str | None = None


@dataclass
class SweepResult:
    cluster: str
    window: str
    at: float
    findings: list[Finding]
    gpus: list[GPUState]
    gpu_nodes: int
    gpus_expected: int
    gpus_reporting: int
    gpus_held: int
    fleet_util_pct: float | None
    metrics_error: str | None = None
    round_trips: int = 0
    warnings: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in Severity}
        for f in self.findings:
            out[f.severity.value] += 1
        return out

    @property
    def status(self) -> str:
        """'unknown' when the metrics could not be read, else the worst severity, else 'ok'."""
        if self.metrics_error is not None:
            return "unknown"
        for sev in Severity:
            if any(f.severity is sev for f in self.findings):
                return sev.value
        return "ok"

    @property
    def gpu_status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.gpus:
            out[g.status.value] = out.get(g.status.value, 0) + 1
        return out

    def findings_on(self, node: str) -> list[Finding]:
        return [f for f in self.findings if f.node == node]


# --- classification --------------------------------------------------------------------------


def _finite(v: float | None) -> bool:
    return v is not None and not math.isnan(v)


def _fmt(v: float | None) -> float | str:
    if v is None:
        return "absent"
    return round(v, 2) if not math.isnan(v) else math.nan


_STATUS_RANK = {GPUStatus.FAULTY: 0, GPUStatus.MISSING: 0, GPUStatus.UNKNOWN: 1, GPUStatus.WARNING: 2,
                GPUStatus.IDLE: 3, GPUStatus.HEALTHY: 4}
_FAULT_KEYS = ("xid_max", "rows_max", "row_fail_max", "memory_temp_max")


def _worse(a: GPUStatus, b: GPUStatus) -> GPUStatus:
    return a if _STATUS_RANK[a] <= _STATUS_RANK[b] else b


@dataclass
class _Join:
    """The fleet and its metrics joined by node (what `needs_detail` and `classify` both read)."""

    host_node: dict[str, str]
    exporters_on: dict[str, list[ExporterPod]]
    holders_on: dict[str, list[GPUPod]]
    pods_by_ref: dict[tuple[str, str], GPUPod]
    per_node: dict[str, dict[str, tuple[tuple[str, str], dict[str, float]]]]
    hosts_on: dict[str, set[str]]
    gpus_now_on: dict[str, int]
    targets_on: dict[str, list[Any]]
    unmapped: dict[str, int]


def _join(fleet: FleetSnapshot, metrics: DCGMSnapshot) -> _Join:
    # Hostname -> node: the exporter pod's node, else a node's own name; an IP when it is unique.
    host_node: dict[str, str] = {n.name: n.name for n in fleet.nodes}
    exporters_on: dict[str, list[ExporterPod]] = defaultdict(list)
    ip_nodes: dict[str, set[str]] = defaultdict(set)
    for e in fleet.exporters:
        if e.node:
            host_node[e.name] = e.node
            exporters_on[e.node].append(e)
            if e.ip:
                ip_nodes[e.ip].add(e.node)
    ip_node = {ip: next(iter(ns)) for ip, ns in ip_nodes.items() if len(ns) == 1}
    holders_on: dict[str, list[GPUPod]] = defaultdict(list)
    for p in fleet.pods:
        if p.node and p.gpus_held and not p.daemonset:
            holders_on[p.node].append(p)
    node_names = {n.name for n in fleet.nodes}
    per_node: dict[str, dict[str, tuple[tuple[str, str], dict[str, float]]]] = defaultdict(dict)
    hosts_on: dict[str, set[str]] = defaultdict(set)
    unmapped: dict[str, int] = defaultdict(int)
    for key, vals in metrics.values.items():
        node = host_node.get(key[0])
        if node is None or node not in node_names:
            unmapped[key[0]] += 1
            continue
        hosts_on[node].add(key[0])
        prev = per_node[node].get(key[1])
        if prev is None:
            per_node[node][key[1]] = (key, vals)
        else:  # one GPU under two Hostnames (pod name and node name): keep the worst of both
            merged = dict(prev[1])
            for name, v in vals.items():
                old = merged.get(name)
                if old is None or (math.isnan(old) and not math.isnan(v)) or v > old:
                    merged[name] = v
            per_node[node][key[1]] = (prev[0], merged)
    gpus_now_on: dict[str, int] = defaultdict(int)
    for host, count in metrics.gpus_now.items():
        node = host_node.get(host)
        if node is not None and node in node_names and _finite(count):
            hosts_on[node].add(host)
            gpus_now_on[node] = max(gpus_now_on[node], int(count))
        elif node is None:
            unmapped.setdefault(host, 0)
    targets_on: dict[str, list[Any]] = defaultdict(list)
    for t in metrics.targets:
        node = host_node.get(t.pod or "") or host_node.get(t.host) or ip_node.get(t.host)
        if node is not None:
            targets_on[node].append(t)
    return _Join(host_node, exporters_on, holders_on, {(p.namespace, p.name): p for p in fleet.pods}, per_node,
                 hosts_on, gpus_now_on, targets_on, unmapped)


def needs_detail(fleet: FleetSnapshot, metrics: DCGMSnapshot, th: SweepThresholds) -> set[str]:
    """Hostnames whose GPUs need the follow-up query: a fault to name by UUID, a GPU gone since the
    window began, or GPUs that may be idle while held (their max and sample count decide)."""
    if not metrics.available:
        return set()
    j = _join(fleet, metrics)
    hosts: set[str] = set()
    capacity = {n.name: n.capacity for n in fleet.nodes}
    for node, gpus in j.per_node.items():
        idle_unattributed = 0
        attributed = False
        for (host, _gpu), v in gpus.values():
            labels = metrics.labels.get((host, _gpu)) or {}
            util_avg = v.get("util_avg")
            temp_max = v.get("temp_max")
            if any(k in v for k in _FAULT_KEYS) or (temp_max is not None and not temp_max <= th.temp_c):
                hosts.add(host)
            if labels.get("pod"):
                attributed = True
                if _finite(util_avg) and util_avg < th.idle_util_pct:
                    hosts.add(host)
            elif _finite(util_avg) and util_avg < th.idle_util_pct:
                idle_unattributed += 1
        if j.gpus_now_on.get(node, 0) and j.gpus_now_on[node] < max(len(gpus), capacity.get(node, 0)):
            hosts |= {k[0] for k, _ in gpus.values()}  # which GPU is gone
        holders = j.holders_on.get(node, [])
        if holders and not attributed:
            free = max(0, capacity.get(node, 0) - sum(p.gpus_held for p in holders))
            if idle_unattributed > free:
                hosts |= {k[0] for k, _ in gpus.values()}
    return hosts


def classify(fleet: FleetSnapshot, metrics: DCGMSnapshot, th: SweepThresholds, *, cluster: str = "default",
             now: float | None = None) -> SweepResult:
    """Join the fleet with its metrics and classify every GPU node and GPU."""
    now = metrics.at if now is None else now
    window = th.window
    findings: list[Finding] = []
    states: list[GPUState] = []
    j = _join(fleet, metrics) if metrics.available else _join(fleet, DCGMSnapshot(window=window, at=now))

    if not metrics.available:
        findings.append(Finding(
            Kind.PROMETHEUS_UNAVAILABLE, Severity.CRITICAL, None,
            f"Prometheus gave no usable answer: every GPU of {len(fleet.nodes)} nodes is unknown",
            {"error": metrics.error, "window": window},
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
            findings.append(Finding(
                Kind.NODE_NOT_READY, Severity.CRITICAL if holders else Severity.WARNING, node.name,
                f"node is {'NotReady' if node.ready is False else 'Unknown'}"
                + (f" while {len(holders)} pod(s) hold {held} GPU(s)" if holders else ""),
                {"ready": node.ready if node.ready is not None else "Unknown", "gpu_pods": held_refs},
            ))
        if node.unschedulable and holders:
            findings.append(Finding(
                Kind.CORDONED_HELD, Severity.WARNING, node.name,
                f"node is cordoned while {len(holders)} pod(s) hold {held} GPU(s)",
                {"unschedulable": True, "gpu_pods": held_refs},
            ))
        if not metrics.available:
            states += [GPUState(node.name, str(i), GPUStatus.UNKNOWN) for i in range(expected)]
            continue

        gpu_data = j.per_node.get(node.name, {})
        now_count = j.gpus_now_on.get(node.name, 0)
        targets = j.targets_on.get(node.name, [])
        down = [t for t in targets if _finite(t.up) and t.up < 1]
        stale = [t for t in targets if _finite(t.age_s) and t.age_s > th.stale_after_s]
        exporter_ref = ", ".join(f"{e.namespace}/{e.name}" for e in j.exporters_on.get(node.name, [])) or None
        node_unknown: Finding | None = None
        if down:
            node_unknown = Finding(
                Kind.EXPORTER_DOWN, Severity.WARNING, node.name,
                f"dcgm-exporter is down (up=0): the node's {expected} GPU(s) are unknown",
                {"up": 0, "instance": ",".join(t.instance for t in down), "exporter_pod": exporter_ref},
            )
        elif stale:
            age = max(t.age_s for t in stale)
            node_unknown = Finding(
                Kind.EXPORTER_STALE, Severity.WARNING, node.name,
                f"dcgm-exporter last scraped {age:.0f}s ago (over {th.stale_after_s:.0f}s): the node's GPUs are unknown",
                {"last_scrape_age_s": round(age, 1), "stale_after_s": th.stale_after_s, "exporter_pod": exporter_ref},
            )
        elif now_count == 0 and exporter_ref is None:
            node_unknown = Finding(
                Kind.NO_EXPORTER, Severity.WARNING, node.name,
                f"no dcgm-exporter pod and no current dcgm metrics for this GPU node: its {expected} GPU(s) are "
                "unknown", {"exporter_pods": 0, "gpus_reporting": 0, "window": window},
            )
        elif now_count == 0:
            node_unknown = Finding(
                Kind.EXPORTER_STALE, Severity.WARNING, node.name,
                f"no current dcgm metrics from {exporter_ref}: the node's {expected} GPU(s) are unknown",
                {"exporter_pod": exporter_ref, "gpus_reporting": 0,
                 "gpus_in_window": len(gpu_data), "window": window},
            )

        node_states: dict[str, GPUState] = {}
        if node_unknown is not None:
            findings.append(node_unknown)
            for i in range(expected):
                node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.UNKNOWN)
        else:
            gpus_reporting += now_count

        detailed = all(k[0] in metrics.detail_hosts for k, _ in gpu_data.values()) and bool(gpu_data)
        present = {g for g, (_, v) in gpu_data.items() if "util" in v} if detailed else None
        if node_unknown is None and now_count < expected:
            slots = set(gpu_data) | {str(i) for i in range(expected)}
            gone = sorted(slots - present, key=_gpu_sort) if present is not None else []
            f = Finding(
                Kind.GPU_MISSING, Severity.CRITICAL, node.name,
                f"{now_count} of {expected} GPUs report: {expected - now_count} missing"
                + (f" (GPU {', '.join(gone)})" if gone else ""),
                {"gpus_reporting": now_count, "capacity": expected, "allocatable": node.allocatable,
                 "missing_gpus": gone or "unknown (not seen in the window)", "window": window},
                gpu=",".join(gone) or None, cordon_reason="gpu-missing",
            )
            if len(gone) == 1 and gone[0] in gpu_data:
                f.uuid = (metrics.labels.get(gpu_data[gone[0]][0]) or {}).get("UUID")
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

        unattributed_idle: list[str] = []
        attributed_any = False
        for g in sorted(gpu_data, key=_gpu_sort):
            key, v = gpu_data[g]
            labels = metrics.labels.get(key) or {}
            uuid = labels.get("UUID")
            holder_pod: GPUPod | None = None
            if labels.get("pod"):
                attributed_any = True
                holder_pod = j.pods_by_ref.get((labels.get("namespace", ""), labels["pod"]))
            util_avg = v.get("util_avg")
            state = node_states.get(g)
            holder_ref = holder_pod.ref if holder_pod else (
                f"{labels.get('namespace')}/{labels['pod']}" if labels.get("pod") else None)
            if state is None:
                state = node_states[g] = GPUState(node.name, g, GPUStatus.HEALTHY, None, holder_ref)
            if _finite(util_avg) and state.status is not GPUStatus.MISSING:
                state.util_avg = util_avg
                if node_unknown is None:
                    util_sum += util_avg
                    util_n += 1
            common: dict[str, Any] = {"gpu": g, "uuid": uuid}
            if holder_pod is not None:
                common.update(pod=holder_pod.name, namespace=holder_pod.namespace, owner=holder_pod.owner)
            elif labels.get("pod"):
                common.update(pod=labels["pod"], namespace=labels.get("namespace"))
            if key in metrics.conflicts:
                common["owner"] = f"conflicting holders: {', '.join(metrics.conflicts[key])}"

            # hardware faults: judged on whatever the window holds, even when the exporter is down now
            has_fault = not _FAULT_FREE.isdisjoint(v)
            xids = [x for x in (v.get("xid"), v.get("xid_max")) if x is not None] if has_fault else []
            codes = sorted({int(x) for x in xids if _finite(x) and x > 0 and not math.isinf(x)})
            critical = [c for c in codes if c in th.critical_xids]
            if critical:
                findings.append(Finding(
                    Kind.CRITICAL_XID, Severity.CRITICAL, node.name,
                    f"XID {_xid_text(critical)}",
                    {"DCGM_FI_DEV_XID_ERRORS": critical, "last": _fmt(v.get("xid")),
                     "max_over_window": _fmt(v.get("xid_max")), "window": window},
                    cordon_reason=f"xid-{critical[0]}", **common,
                ))
                state.status = _worse(state.status, GPUStatus.FAULTY)
            elif codes:
                findings.append(Finding(
                    Kind.XID, Severity.INFO, node.name, f"XID {_xid_text(codes)}: not in the critical set",
                    {"DCGM_FI_DEV_XID_ERRORS": codes, "window": window}, **common,
                ))
            rows = v.get("rows_max", 0.0) if has_fault else 0.0
            row_fail = v.get("row_fail_max", 0.0) if has_fault else 0.0
            rows = rows if _finite(rows) else 0.0
            row_fail = row_fail if _finite(row_fail) else 0.0
            if rows > 0 or row_fail > 0:
                findings.append(Finding(
                    Kind.ROW_REMAP, Severity.CRITICAL, node.name,
                    ("row remapping FAILED" if row_fail > 0 else "uncorrectable memory errors remapped")
                    + f" ({rows:g} uncorrectable remapped rows)",
                    {"DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": rows, "DCGM_FI_DEV_ROW_REMAP_FAILURE": row_fail,
                     "window": window},
                    cordon_reason="row-remap-failure" if row_fail > 0 else "row-remap", **common,
                ))
                state.status = _worse(state.status, GPUStatus.FAULTY)
            temp_max = v.get("temp_max")
            if _finite(temp_max) and temp_max > th.temp_c:
                findings.append(Finding(
                    Kind.GPU_HOT, Severity.WARNING, node.name,
                    f"GPU temperature reached {temp_max:g} C, over {th.temp_c:g} C",
                    {"DCGM_FI_DEV_GPU_TEMP_max": temp_max, "threshold_c": th.temp_c, "window": window}, **common,
                ))
                state.status = _worse(state.status, GPUStatus.WARNING)
            mem_max = v.get("memory_temp_max")
            if _finite(mem_max) and mem_max > th.memory_temp_c:
                findings.append(Finding(
                    Kind.MEMORY_HOT, Severity.WARNING, node.name,
                    f"GPU memory temperature reached {mem_max:g} C, over {th.memory_temp_c:g} C",
                    {"DCGM_FI_DEV_MEMORY_TEMP_max": mem_max, "threshold_c": th.memory_temp_c, "window": window},
                    **common,
                ))
                state.status = _worse(state.status, GPUStatus.WARNING)
            nans = (sorted(METRIC_NAMES.get(m, m) for m in _CHECKED if m in v and math.isnan(v[m]))
                    if has_fault or not (util_avg == util_avg and temp_max == temp_max) else [])
            if nans:
                findings.append(Finding(
                    Kind.METRIC_NAN, Severity.WARNING, node.name,
                    f"NaN for {', '.join(nans)}: those checks are unknown", {"nan": nans, "window": window},
                    **common,
                ))
                state.status = _worse(state.status, GPUStatus.UNKNOWN)
            if node_unknown is not None or state.status is GPUStatus.MISSING:
                continue  # what follows needs current data
            missing = [METRIC_NAMES[m] for m in REQUIRED_METRICS if m not in v]
            if missing:
                findings.append(Finding(
                    Kind.METRIC_MISSING, Severity.WARNING, node.name,
                    f"no {', '.join(missing)} for this GPU in the window: those checks are unknown",
                    {"missing": missing, "window": window}, **common,
                ))
                state.status = _worse(state.status, GPUStatus.UNKNOWN)

            idle = _idle(v, th)
            if idle is None:
                continue
            if holder_pod is not None:
                age = _age_s(holder_pod.started, now)
                if age is not None and age < th.window_s:
                    continue  # the pod is younger than the window: not judged yet
                findings.append(Finding(
                    Kind.IDLE_HELD, Severity.WARNING, node.name,
                    f"held by {holder_pod.ref} ({holder_pod.owner or 'no owner'}) but idle for the whole window",
                    {**idle, "window": window, "fb_used_mib": _fmt(v.get("fb_used")),
                     "power_avg_w": _fmt(v.get("power_avg"))}, **common,
                ))
                state.status = _worse(state.status, GPUStatus.IDLE)
            elif not labels.get("pod"):
                unattributed_idle.append(g)

        # No pod attribution from dcgm-exporter on this node: when more GPUs are idle than are free,
        # some held GPUs are idle; name the node's GPU pods (the holder cannot be narrowed further).
        if unattributed_idle and holders and not attributed_any and node_unknown is None:
            judged = [p for p in holders if (_age_s(p.started, now) or math.inf) >= th.window_s]
            free = max(0, expected - held)
            if judged and len(unattributed_idle) > free:
                pod = judged[0] if len(judged) == 1 else None
                findings.append(Finding(
                    Kind.IDLE_HELD, Severity.WARNING, node.name,
                    f"{len(unattributed_idle)} GPUs idle for the whole window but only {free} free: "
                    f"held idle by {', '.join(p.ref for p in judged)}",
                    {"idle_gpus": unattributed_idle, "free_gpus": free, "gpu_pods": [p.ref for p in judged],
                     "owners": sorted({p.owner or "none" for p in judged}), "window": window,
                     "attribution": "node (dcgm-exporter has no pod labels)"},
                    gpu=",".join(unattributed_idle), pod=pod.name if pod else None,
                    namespace=pod.namespace if pod else None, owner=pod.owner if pod else None,
                ))
                for g in unattributed_idle:
                    node_states[g].status = _worse(node_states[g].status, GPUStatus.IDLE)

        for i in range(expected):  # slots with no data at all (never seen in the window)
            if str(i) not in node_states:
                node_states[str(i)] = GPUState(node.name, str(i), GPUStatus.UNKNOWN)
        states += sorted(node_states.values(), key=lambda s: _gpu_sort(s.gpu))

    for host, count in sorted(j.unmapped.items()):
        findings.append(Finding(
            Kind.UNMAPPED_EXPORTER, Severity.WARNING, None,
            f"dcgm series with Hostname {host!r} match no exporter pod and no GPU node of this cluster",
            {"Hostname": host, "gpus": count or "unknown"},
        ))

    findings.sort(key=lambda f: (f.severity.rank, f.kind.value, f.node or "", _gpu_sort(f.gpu or "")))
    gpus_held = sum(p.gpus_held for p in fleet.pods if p.node and not p.daemonset)
    return SweepResult(
        cluster=cluster, window=window, at=metrics.at, findings=findings, gpus=states,
        gpu_nodes=len(fleet.nodes), gpus_expected=gpus_expected, gpus_reporting=gpus_reporting,
        gpus_held=gpus_held, fleet_util_pct=(util_sum / util_n) if util_n else None,
        metrics_error=metrics.error, round_trips=fleet.round_trips + metrics.round_trips,
        warnings=list(metrics.warnings),
    )


_CHECKED = ("util_avg", "temp_max", "xid_max", "rows_max", "row_fail_max", "memory_temp_max")
_FAULT_FREE = frozenset(("xid", "xid_max", "rows_max", "row_fail_max", "memory_temp_max"))


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


def _gpu_sort(g: str) -> tuple[int, str]:
    first = g.split(",", 1)[0]
    return (int(first), g) if first.isdigit() else (1 << 30, g)


# --- the cordon action -----------------------------------------------------------------------

UNHEALTHY_TAINT_KEY = "nvidia.com/gpu-unhealthy"
FINDING_ANNOTATION = "ai-platform-ops.io/gpu-unhealthy"


@dataclass
class NodeAction:
    node: str
    reason: str  # the taint's value, e.g. xid-79
    findings: list[str]

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "taint": f"{UNHEALTHY_TAINT_KEY}={self.reason}:NoSchedule",
                "findings": "; ".join(self.findings)}


@dataclass
class CordonPlan:
    actions: list[NodeAction]
    over_cap: list[NodeAction]
    already: list[str]
    cap: int
    gpu_nodes: int
    max_share: float

    @property
    def nodes(self) -> list[str]:
        return [a.node for a in self.actions]

    def markdown(self, dry_run: bool) -> str:
        head = "Dry run: would cordon" if dry_run else "Cordon plan"
        lines = [f"### {head} {len(self.actions)} node(s)",
                 "",
                 f"Cap: at most {self.cap} of {self.gpu_nodes} GPU nodes per run ({self.max_share:.0%}).",
                 f"Each node gets `spec.unschedulable: true`, the taint `{UNHEALTHY_TAINT_KEY}=<reason>:NoSchedule` "
                 f"and the annotation `{FINDING_ANNOTATION}` with the finding.", ""]
        for a in self.actions:
            lines.append(f"- **{a.node}**: `{a.reason}`: {'; '.join(a.findings)}")
        if self.over_cap:
            lines += ["", f"Over the cap, left for a later run: {', '.join(a.node for a in self.over_cap)}"]
        if self.already:
            lines += ["", f"Already cordoned and tainted (unchanged): {', '.join(self.already)}"]
        return "\n".join(lines) + "\n"


def is_tainted_unhealthy(node: GPUNode) -> bool:
    return any(t.get("key") == UNHEALTHY_TAINT_KEY for t in node.taints)


def plan_cordon(result: SweepResult, nodes: Iterable[GPUNode], max_share: float) -> CordonPlan:
    """Which nodes to cordon: those with a critical hardware finding, at most `max_share` of GPU nodes.

    Idempotent: a node already cordoned with the unhealthy taint is left alone and does not count
    against the cap. Nodes with more cordon-worthy findings come first; the rest wait for a later run.
    The cap is at least one node, so a small cluster can still isolate a broken node.
    """
    if not 0 < max_share <= 1:
        raise ValueError(f"max_share: expected a share in (0, 1], got {max_share!r}")
    by_name = {n.name: n for n in nodes}
    cap = max(1, math.floor(max_share * len(by_name) + 1e-9))
    reasons: dict[str, list[Finding]] = defaultdict(list)
    for f in result.findings:
        if f.cordon_reason and f.node in by_name and f.severity is Severity.CRITICAL:
            reasons[f.node].append(f)
    already, candidates = [], []
    for name, fs in reasons.items():
        node = by_name[name]
        if node.unschedulable and is_tainted_unhealthy(node):
            already.append(name)
            continue
        order = {k: i for i, k in enumerate(CORDON_KINDS)}
        fs.sort(key=lambda f: (order.get(f.kind, 99), _gpu_sort(f.gpu or "")))
        candidates.append(NodeAction(
            name, fs[0].cordon_reason or "unhealthy",
            [f"{f.kind.value}" + (f" gpu {f.gpu}" if f.gpu else "") + f": {f.summary}" for f in fs],
        ))
    candidates.sort(key=lambda a: (-len(a.findings), a.node))
    return CordonPlan(actions=candidates[:cap], over_cap=candidates[cap:], already=sorted(already), cap=cap,
                      gpu_nodes=len(by_name), max_share=max_share)


@dataclass
class UncordonPlan:
    actions: list[str]
    refused: dict[str, str]

    def markdown(self, dry_run: bool) -> str:
        head = "Dry run: would uncordon" if dry_run else "Uncordon plan"
        lines = [f"### {head} {len(self.actions)} node(s)", ""]
        lines += [f"- **{n}**: remove `{UNHEALTHY_TAINT_KEY}`, the annotation, and uncordon" for n in self.actions]
        if self.refused:
            lines += ["", "Refused:"] + [f"- **{n}**: {why}" for n, why in sorted(self.refused.items())]
        return "\n".join(lines) + "\n"


def plan_uncordon(requested: Iterable[str], nodes: Iterable[GPUNode], result: SweepResult | None,
                  force: bool = False) -> UncordonPlan:
    """Repaired nodes to return to service: only nodes this project tainted, and only when healthy now.

    A node that still has a critical finding, or whose GPUs are unknown, is refused unless `force`.
    """
    by_name = {n.name: n for n in nodes}
    actions, refused = [], {}
    for name in dict.fromkeys(requested):
        node = by_name.get(name)
        if node is None:
            refused[name] = "no such GPU node"
            continue
        if not is_tainted_unhealthy(node) and FINDING_ANNOTATION not in node.annotations:
            refused[name] = f"not cordoned by this project (no {UNHEALTHY_TAINT_KEY} taint): left as it is"
            continue
        if result is not None and not force:
            if result.metrics_error is not None:
                refused[name] = "its GPUs are unknown (Prometheus gave no answer): pass force=true to override"
                continue
            blocking = [f for f in result.findings_on(name)
                        if f.severity is Severity.CRITICAL or f.kind in (Kind.EXPORTER_DOWN, Kind.EXPORTER_STALE,
                                                                         Kind.NO_EXPORTER)]
            if blocking:
                refused[name] = "still " + "; ".join(f"{f.kind.value}: {f.summary}" for f in blocking[:3])
                continue
        actions.append(name)
    return UncordonPlan(actions, refused)


# --- the fleet heatmap -----------------------------------------------------------------------

MAX_HEATMAP_ROWS = 64
_BAD = (GPUStatus.FAULTY, GPUStatus.MISSING)


@dataclass
class Heatmap:
    util: list[list[float]]  # rows x GPU columns, NaN where nothing is known
    bad: list[list[int]]  # faulty or missing GPUs per cell
    flagged: list[list[int]]  # idle-but-held or hot GPUs per cell
    unknown: list[list[int]]
    row_labels: list[str]
    columns: int
    nodes_per_row: int


def heatmap(result: SweepResult, max_rows: int = MAX_HEATMAP_ROWS) -> Heatmap:
    """Nodes x GPUs: utilisation per cell; big fleets are binned (consecutive nodes per row, mean util)."""
    by_node: dict[str, list[GPUState]] = defaultdict(list)
    for s in result.gpus:
        by_node[s.node].append(s)
    names = sorted(by_node)
    columns = max((len(v) for v in by_node.values()), default=0)
    per_row = max(1, math.ceil(len(names) / max_rows))
    util, bad, flagged, unknown, labels = [], [], [], [], []
    for start in range(0, len(names), per_row):
        group = names[start:start + per_row]
        sums = [0.0] * columns
        counts = [0] * columns
        b, fl, u = [0] * columns, [0] * columns, [0] * columns
        for name in group:
            for i, s in enumerate(by_node[name]):
                if s.util_avg is not None and s.status not in (GPUStatus.UNKNOWN, GPUStatus.MISSING):
                    sums[i] += s.util_avg
                    counts[i] += 1
                b[i] += s.status in _BAD
                fl[i] += s.status in (GPUStatus.IDLE, GPUStatus.WARNING)
                u[i] += s.status is GPUStatus.UNKNOWN
        util.append([sums[i] / counts[i] if counts[i] else math.nan for i in range(columns)])
        bad.append(b)
        flagged.append(fl)
        unknown.append(u)
        labels.append(group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}")
    return Heatmap(util, bad, flagged, unknown, labels, columns, per_row)


def render_heatmap_png(hm: Heatmap, title: str) -> Any:
    """A matplotlib figure of the heatmap (red x: faulty/missing, o: idle-held or hot, grey: unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = max(1, len(hm.row_labels))
    data = np.array(hm.util, dtype=float) if hm.util else np.full((1, 1), np.nan)
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * max(hm.columns, 1), 1.2 + 0.2 * rows))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0, vmax=100,
                      interpolation="nearest")
    for r in range(len(hm.bad)):
        for c in range(hm.columns):
            if hm.bad[r][c]:
                ax.text(c, r, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
            elif hm.flagged[r][c]:
                ax.text(c, r, "o", ha="center", va="center", color="orange", fontsize=8, fontweight="bold")
    ax.set_xticks(range(hm.columns))
    ax.set_xlabel("GPU")
    step = max(1, rows // 40)
    ax.set_yticks(range(0, rows, step))
    ax.set_yticklabels(hm.row_labels[::step], fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="utilisation % (window average)", fraction=0.04)
    return fig
