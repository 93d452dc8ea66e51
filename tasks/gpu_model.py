"""What the GPU sweep talks about: its vocabulary, settings, the fleet it reads and the results it gives.

Pure data, no network, no Prefect. The sweep reads two systems: Kubernetes (`FleetSnapshot`:
GPU nodes, the pods holding GPUs, the dcgm-exporter pods) and Prometheus
(`tasks.prometheus.DCGMSnapshot`); `tasks.gpu_classify` joins them into a `SweepResult` of
`GPUFinding`s (the one finding model, `tasks.findings`, with the GPU's kind, node and index; `Severity`
is that model's), `tasks.gpu_plans` turns those into cordon plans, `tasks.gpu_pictures` into a heatmap;
`tasks.gpu_sweep` is the one sweep that fetches and classifies.

**Critical XIDs.** Which XIDs are critical is the platform config's `thresholds.gpu.critical_xids`;
its default (`blocks.config.CRITICAL_XIDS`, here `DEFAULT_CRITICAL_XIDS`) is the project's one list,
which the rendered alert rules repeat. The default set, from NVIDIA's XID catalogue: each means the
GPU or its memory is unreliable until reset or replaced, whatever the workload did:

- 48 double-bit ECC error (DBE): uncorrectable memory error; the GPU must be reset.
- 63 ECC page retirement or row-remapping recording event: a reset is needed to apply it.
- 64 ECC page retirement or row-remapper recording *failure*: the memory cannot be repaired.
- 74 NVLink error: the link is down or flapping; multi-GPU jobs hang or crash.
- 79 GPU has fallen off the bus: the GPU is gone until the node reboots (often power/PCIe).
- 92 high single-bit ECC error rate: memory is degrading.
- 94 contained ECC error: the affected application was killed; reset the GPU when drained.
- 95 uncontained ECC error: every application on the GPU is affected; reset or reboot.

Other XIDs (13, 31, 43, 45 ...) are usually the application's own faults: reported as `info`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime
from enum import Enum
from typing import Any

from blocks.config import CRITICAL_XIDS, parse_duration
from tasks.findings import Finding, Severity, counts, format_evidence

# --- vocabulary ------------------------------------------------------------------------------


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
    ROW_REMAP_PENDING = "row-remap-pending"
    REMAPPED_ROWS = "remapped-rows"
    DETAILS_MISSING = "details-missing"


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


def xid_text(codes: list[int]) -> str:
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
    Kind.UNMAPPED_EXPORTER: "dcgm series match no node of this cluster (by Hostname, scrape target or exporter "
                            "pod): check the exporter's Hostname / relabelling, the exporter selectors "
                            "(thresholds.gpu.exporter_selectors) or the metric selector.",
    Kind.XID: "An application-level XID, or a critical one from before the node's last repair (dcgm-exporter's "
              "XID gauge keeps its last value): inspect the workload's logs; not a hardware fault by itself.",
    Kind.ROW_REMAP_PENDING: "A row remap is pending: drain the node and reset the GPU (`nvidia-smi -r -i N`) so the "
                            "remap takes effect.",
    Kind.REMAPPED_ROWS: "Rows were remapped for uncorrectable errors and the remap succeeded: nothing to do now; "
                        "a count that keeps growing means the GPU should be replaced.",
    Kind.DETAILS_MISSING: "The follow-up query failed (usually a Prometheus timeout): the findings stand, their "
                          "details (UUIDs, idleness, which GPU is missing) are unknown; raise prometheus.timeout_s.",
}

# Findings that make a node unfit for new work: the cordon action acts on these only.
CORDON_KINDS = (Kind.CRITICAL_XID, Kind.ROW_REMAP, Kind.GPU_MISSING)
METRIC_NAMES = {
    "util_avg": "DCGM_FI_DEV_GPU_UTIL", "temp_max": "DCGM_FI_DEV_GPU_TEMP",
    "rows_max": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "row_fail_max": "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "row_pending_max": "DCGM_FI_DEV_ROW_REMAP_PENDING", "memory_temp_max": "DCGM_FI_DEV_MEMORY_TEMP",
}
XID_GAUGE = "DCGM_FI_DEV_XID_ERRORS"
XID_COUNTER = "DCGM_EXP_XID_ERRORS_COUNT"

# Where dcgm-exporter runs, by the labels of its pods: the GPU operator's DaemonSet
# (`app=nvidia-dcgm-exporter`, gpu-operator's assets/state-dcgm-exporter) and the standalone helm
# chart's (`app.kubernetes.io/name=dcgm-exporter`, NVIDIA/dcgm-exporter deployment/templates/_helpers.tpl).
DEFAULT_EXPORTER_SELECTORS = ("app=nvidia-dcgm-exporter", "app.kubernetes.io/name=dcgm-exporter")
# Extended resources that hold (part of) a GPU. Whole GPUs: the device plugin's `nvidia.com/gpu`;
# time-slicing with `renameByDefault` advertises `nvidia.com/gpu.shared` (k8s-device-plugin README,
# "Shared Access to GPUs"); MIG with the mixed strategy `nvidia.com/mig-<profile>` (e.g.
# `nvidia.com/mig-1g.10gb`, k8s-device-plugin docs); HAMi's shares (`nvidia.com/gpumem`,
# `nvidia.com/gpucores`, `nvidia.com/gpumem-percentage`); Alibaba's gpushare (`aliyun.com/gpu-mem`).
DEFAULT_WHOLE_GPU_RESOURCES = ("nvidia.com/gpu",)
DEFAULT_SHARED_GPU_RESOURCES = ("nvidia.com/gpu.shared", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage",
                                "nvidia.com/gpucores", "aliyun.com/gpu-mem", "aliyun.com/gpu-count")
DEFAULT_GPU_RESOURCE_PREFIXES = ("nvidia.com/mig-",)


@dataclass(frozen=True)
class GPUResources:
    """Which pod resource names hold a GPU: whole GPUs, shares, and name prefixes (MIG profiles)."""

    whole: tuple[str, ...] = DEFAULT_WHOLE_GPU_RESOURCES
    shared: tuple[str, ...] = DEFAULT_SHARED_GPU_RESOURCES
    prefixes: tuple[str, ...] = DEFAULT_GPU_RESOURCE_PREFIXES

    def holds(self, name: str) -> bool:
        return name in self.whole or name in self.shared or name.startswith(self.prefixes)


@dataclass(frozen=True)
class SweepThresholds:
    window: str = "15m"
    temp_c: float = 85.0
    memory_temp_c: float = 95.0
    idle_util_pct: float = 5.0
    stale_after_s: float = 120.0
    critical_xids: frozenset[int] = DEFAULT_CRITICAL_XIDS
    min_window_samples: int = 2  # idle is judged on at least this many scrapes
    xid_resolution: str = "1m"  # the step at which the XID gauge's distinct values are read
    unknown_share: float = 0.5  # a sweep with more unknown GPUs than this share is `unknown`

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
            "xid_resolution": getattr(gpu, "xid_resolution", "1m"),
            "unknown_share": float(getattr(gpu, "unknown_share", 0.5)),
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
        parse_duration(values["xid_resolution"])
        return cls(**values)


@dataclass(frozen=True)
class SweepSettings:
    """Where one sweep looks: what the flow, the uncordon flow, the tests and the benchmark all pass to
    `tasks.gpu_sweep.sweep` (built from the platform config by `from_config`)."""

    thresholds: SweepThresholds = SweepThresholds()
    cluster: str = "default"
    gpu_node_label: str = "nvidia.com/gpu.product"
    exporter_selectors: tuple[str, ...] = DEFAULT_EXPORTER_SELECTORS
    exporter_jobs: tuple[str, ...] = ("nvidia-dcgm-exporter", "dcgm-exporter")
    metric_selector: str = ""
    resources: GPUResources = GPUResources()
    page_size: int = 1_000  # pages of the node and pod listings: a page of raw objects is the peak of memory (402 MB
    # at 10,000 nodes with pages of 2,000 and the recorded series arriving during the listing, 340 MB with 1,000)
    timeout_s: float = 15.0
    xid_baseline: str = "repair"  # "repair" (sweeps) or "cordon" (uncordon: XIDs since the node was cordoned)
    metrics_source: str = "auto"  # "auto": the sweep's recording rules when loaded, else raw queries; "raw"

    def __post_init__(self) -> None:
        # a bad value fails the run at its start, not as a metrics error inside the fetch (every GPU unknown)
        for name, allowed in (("metrics_source", ("auto", "raw")), ("xid_baseline", ("repair", "cordon"))):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(map(repr, allowed))}, "
                                 f"got {getattr(self, name)!r}")

    @classmethod
    def from_gpu(cls, gpu: Any, **values: Any) -> SweepSettings:
        """What `blocks.config.GPUThresholds` (`thresholds.gpu`) sets, plus `values` as they are: the
        sweep's queries depend on nothing else (so the sweep's recording rules are rendered from this)."""
        return cls(**{
            "thresholds": SweepThresholds.from_config(gpu),
            "exporter_selectors": tuple(gpu.exporter_selectors), "exporter_jobs": tuple(gpu.exporter_jobs),
            "metric_selector": gpu.metric_selector,
            "resources": GPUResources(tuple(gpu.whole_gpu_resources), tuple(gpu.shared_gpu_resources),
                                      tuple(gpu.gpu_resource_prefixes)),
            **values})

    @classmethod
    def from_config(cls, cfg: Any, cluster: Any, **overrides: Any) -> SweepSettings:
        gpu = cfg.thresholds.gpu
        th_keys = {"window", "temp_c", "memory_temp_c", "idle_util_pct", "stale_after", "critical_xids"}
        th = SweepThresholds.from_config(gpu, **{k: v for k, v in overrides.items() if k in th_keys})
        prom = cfg.prometheus
        values: dict[str, Any] = {
            "thresholds": th, "cluster": cluster.name, "gpu_node_label": cluster.gpu_node_label,
            "timeout_s": float(prom.timeout_s) if prom is not None else 15.0,
        }
        for key, value in overrides.items():
            if key in th_keys or value is None:
                continue
            if key in ("exporter_selectors", "exporter_jobs") and isinstance(value, str):
                value = (value,)
            values[key] = tuple(value) if isinstance(value, list) else value
        return cls.from_gpu(gpu, **values)


# --- the Kubernetes side ---------------------------------------------------------------------

# Annotations this project writes on a node: the cordon's finding (with its time and the XIDs the
# exporter showed then) and the last repair, written by uncordon (its time and the XIDs still shown
# by dcgm-exporter's last-value gauge, which keeps them until the exporter restarts).
FINDING_ANNOTATION = "ai-platform-ops.io/gpu-unhealthy"
REPAIR_ANNOTATION = "ai-platform-ops.io/gpu-repaired"
# The taint a cordon puts on a node (`tasks.gpu_plans`), with the finding's reason as its value.
UNHEALTHY_TAINT_KEY = "nvidia.com/gpu-unhealthy"


@dataclass(slots=True)
class GPUNode:
    name: str
    ready: bool | None
    unschedulable: bool
    capacity: int
    allocatable: int
    taints: list[dict[str, Any]] = field(default_factory=list)
    annotations: dict[str, str] = field(default_factory=dict)
    uid: str = ""  # metadata.uid: a node re-created under the same name is another node


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
    workflow: str | None = None  # the Argo Workflow that runs the pod (`workflows.argoproj.io/workflow`)

    @property
    def ref(self) -> str:
        return f"{self.namespace}/{self.name}"

    @property
    def gpus_held(self) -> int:
        """GPUs this pod occupies at least partly: its whole GPUs, or one for a share or a MIG slice."""
        return self.whole_gpus or (1 if any(v > 0 for v in self.shares.values()) else 0)


@dataclass(slots=True)
class ExporterPod:
    namespace: str
    name: str
    node: str | None
    ip: str | None
    phase: str | None = None
    started: str | None = None  # when its container last started (a restart resets the XID gauge)


@dataclass
class FleetSnapshot:
    """The GPU nodes, the pods holding GPUs and the exporter pods of one cluster."""

    nodes: list[GPUNode]
    pods: list[GPUPod]
    exporters: list[ExporterPod]
    round_trips: int = 0


def timestamp_of(ts: str | None) -> float | None:
    if not ts:
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _age_s(ts: str | None, now: float) -> float | None:
    t = timestamp_of(ts)
    return None if t is None else now - t


@dataclass(frozen=True)
class XIDBaseline:
    """What a node's XID gauges showed at its last repair (or cordon): XIDs seen then are not new."""

    at: float
    xids: dict[str, int]  # gpu index -> the value dcgm-exporter's gauge kept


def xid_baseline(node: GPUNode, kind: str = "repair") -> XIDBaseline | None:
    """The node's baseline from our annotation: `repair` (written by uncordon) or, for uncordon's own
    check, `cordon` (written when the node was cordoned; the later of the two wins)."""
    keys = [REPAIR_ANNOTATION] + ([FINDING_ANNOTATION] if kind == "cordon" else [])
    best: XIDBaseline | None = None
    for key in keys:
        raw = node.annotations.get(key)
        if not raw:
            continue
        try:
            note = json.loads(raw)
            at = timestamp_of(note.get("at"))
            xids = {str(k): int(v) for k, v in (note.get("xids") or {}).items()}
        except (ValueError, TypeError, AttributeError):
            continue
        if at is not None and (best is None or at > best.at):
            best = XIDBaseline(at, xids)
    return best


# --- results ---------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class GPUFinding(Finding):
    """A finding of the sweep: `tasks.findings.Finding` with the GPU's domain (its kind, node, GPU index,
    UUID, the pod holding it). Its title is the kind, its subject the node and GPU (`(fleet)` for none),
    its advice the kind's `ACTIONS`; severity, summary and evidence as given."""

    kind: Kind
    node: str | None
    gpu: str | None = None
    uuid: str | None = None
    pod: str | None = None
    namespace: str | None = None
    owner: str | None = None
    cordon_reason: str | None = None  # the taint value when this finding warrants a cordon
    workflow: str | None = None  # "namespace/name" of the Argo Workflow running the pod
    subject: str = field(init=False, default="")
    title: str = field(init=False, default="")
    advice: str = field(init=False, default="")

    def __post_init__(self) -> None:
        super().__post_init__()
        where = self.node or "(fleet)"
        object.__setattr__(self, "subject", f"{where} gpu {self.gpu}" if self.gpu is not None else where)
        object.__setattr__(self, "title", self.kind.value)
        object.__setattr__(self, "advice", ACTIONS[self.kind])

    def row(self) -> dict[str, Any]:
        """The sweep's findings table (the health check reads its `severity`, `node`, `gpu`, `finding`)."""
        return {
            "severity": self.severity.value, "finding": self.kind.value, "node": self.node or "(fleet)",
            "gpu": self.gpu if self.gpu is not None else "", "uuid": self.uuid or "",
            "pod": f"{self.namespace}/{self.pod}" if self.pod else "", "owner": self.owner or "",
            "workflow": self.workflow or "",
            "summary": self.summary, "evidence": format_evidence(self.evidence), "action": self.advice,
        }


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
    findings: list[GPUFinding]
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
    xid_source: str = "none"  # which dcgm-exporter metric the XIDs were read from
    metrics_source: str = "raw queries"  # or "recording rules" (`tasks.prometheus.fetch_dcgm`)
    metrics_source_note: str = ""  # why the rules were not used, or how old their evaluation was
    xid_last: dict[str, dict[str, int]] = field(default_factory=dict)  # node -> gpu -> the gauge's last XID
    unknown_share: float = 0.5

    @property
    def counts(self) -> dict[str, int]:
        return counts(self.findings, (Severity.CRITICAL, Severity.WARNING, Severity.INFO))

    @property
    def gpus_unknown(self) -> int:
        return sum(1 for g in self.gpus if g.status is GPUStatus.UNKNOWN)

    @property
    def status(self) -> str:
        """'unknown' when the metrics could not be read or most GPUs are unknown; else 'critical' when
        anything is, else (a minority unknown) the worst severity, else 'ok'."""
        if self.metrics_error is not None:
            return "unknown"
        worst = Severity.worst(f.severity for f in self.findings).value
        if worst == "critical":
            return worst
        if self.gpus_expected and self.gpus_unknown > self.unknown_share * self.gpus_expected:
            return "unknown"
        return worst

    @property
    def gpu_status_counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for g in self.gpus:
            out[g.status.value] = out.get(g.status.value, 0) + 1
        return out

    def findings_on(self, node: str) -> list[GPUFinding]:
        return [f for f in self.findings if f.node == node]
