"""A simulated dcgm-exporter for every GPU node of the sandbox cluster.

It serves `/nodes/<node>/metrics` in the Prometheus text format with dcgm-exporter's default
counters (the names and types of `contracts/dcgm-exporter-default-counters.csv`) and its labels:
``gpu``, ``UUID``, ``device``, ``modelName``, ``Hostname`` (the exporter *pod's* name, as in a
real DaemonSet), ``DCGM_FI_DRIVER_VERSION``, and ``container``/``namespace``/``pod`` when a pod
holds the GPU. Faults change what it serves: XID errors, a GPU gone from the bus, a hot GPU, an
idle GPU held by a pod, remapped rows (remap succeeded, pending or failed), an exporter that answers
503 or restarts.

Real installations differ, and each scrape picks its variant with URL parameters (Prometheus sets
them from a target's `__param_<name>` labels):

- ``hostname``: what ``Hostname`` holds. ``pod`` (default): the exporter pod's name, as
  ``os.Hostname()`` inside a pod without ``NODE_NAME``; ``node``: the node's name, as with the
  standalone chart, which sets ``NODE_NAME`` from ``spec.nodeName`` (dcgm-exporter
  internal/pkg/hostname/hostname.go, deployment/templates/daemonset.yaml); ``short``: the node's
  first DNS label (a host whose hostname is short while the kubelet registers its FQDN); ``none``:
  no Hostname (relabelling may drop it: the scrape config's `metric_relabel_configs`).
- ``counters=extended``: a counters file that adds ``DCGM_FI_DEV_ROW_REMAP_PENDING`` (DCGM field 396,
  dcgm_fields.h) and dcgm-exporter's ``DCGM_EXP_XID_ERRORS_COUNT``: per GPU one series per XID seen in
  the last ``--xid-count-window-size`` (label ``window_size_in_ms``, default 300000), or one series
  with value 0 and no ``xid`` label when there was none (internal/pkg/collector/expcollector.go).

``DCGM_FI_DEV_XID_ERRORS`` is the *last* XID and keeps its value until the exporter restarts
(NVIDIA/dcgm-exporter issues 95 and 500, NVIDIA/DCGM issue 277): a repair does not clear it here
either; the ``exporter-restart`` fault does.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from typing import Any

from sandbox.cluster import (
    DRIVER_VERSION,
    EXPORTER_APP,
    GPU_MODEL_NAME,
    GPUS_PER_NODE,
    SeededCluster,
    gpu_holders,
    gpu_uuid,
)

# dcgm-exporter's default counters: (name, type). `tests/test_sandbox_dcgm.py` checks this list
# against contracts/dcgm-exporter-default-counters.csv so it cannot drift.
DEFAULT_COUNTERS: list[tuple[str, str]] = [
    ("DCGM_FI_DEV_SM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEM_CLOCK", "gauge"),
    ("DCGM_FI_DEV_MEMORY_TEMP", "gauge"),
    ("DCGM_FI_DEV_GPU_TEMP", "gauge"),
    ("DCGM_FI_DEV_POWER_USAGE", "gauge"),
    ("DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION", "counter"),
    ("DCGM_FI_DEV_PCIE_REPLAY_COUNTER", "counter"),
    ("DCGM_FI_DEV_GPU_UTIL", "gauge"),
    ("DCGM_FI_DEV_MEM_COPY_UTIL", "gauge"),
    ("DCGM_FI_DEV_ENC_UTIL", "gauge"),
    ("DCGM_FI_DEV_DEC_UTIL", "gauge"),
    ("DCGM_FI_DEV_XID_ERRORS", "gauge"),
    ("DCGM_FI_DEV_FB_FREE", "gauge"),
    ("DCGM_FI_DEV_FB_USED", "gauge"),
    ("DCGM_FI_DEV_FB_RESERVED", "gauge"),
    ("DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL", "counter"),
    ("DCGM_FI_DEV_VGPU_LICENSE_STATUS", "gauge"),
    ("DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS", "counter"),
    ("DCGM_FI_DEV_ROW_REMAP_FAILURE", "gauge"),
    ("DCGM_FI_PROF_GR_ENGINE_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_PIPE_TENSOR_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_DRAM_ACTIVE", "gauge"),
    ("DCGM_FI_PROF_PCIE_TX_BYTES", "gauge"),
    ("DCGM_FI_PROF_PCIE_RX_BYTES", "gauge"),
]
# What the GPU sweep reads: large sandboxes serve only these to keep Prometheus small.
SWEEP_COUNTERS = {
    "DCGM_FI_DEV_GPU_UTIL", "DCGM_FI_PROF_GR_ENGINE_ACTIVE", "DCGM_FI_DEV_GPU_TEMP", "DCGM_FI_DEV_MEMORY_TEMP",
    "DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE", "DCGM_FI_DEV_XID_ERRORS",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS", "DCGM_FI_DEV_ROW_REMAP_FAILURE", "DCGM_FI_DEV_POWER_USAGE",
}
FB_TOTAL_MIB = 81559


@dataclass
class GPU:
    node: str
    index: int
    uuid: str
    util: float
    temp: float
    memory_temp: float
    fb_used: float
    power: float
    xid: int = 0
    uncorrectable_rows: int = 0
    row_remap_failure: int = 0
    row_remap_pending: int = 0
    xid_events: list[tuple[float, int]] = field(default_factory=list)  # (when, XID): for the XID counter
    missing: bool = False
    pod: dict[str, str] | None = None  # {"pod":..., "namespace":..., "container":...}


@dataclass
class Exporter:
    node: str
    pod_name: str
    gpus: list[GPU]
    down: bool = False
    _cache: dict[tuple[str, str], bytes] = field(default_factory=dict, repr=False)


class DCGMSimulator:
    """State of every simulated GPU, rendered per node on demand (cached until a fault changes it)."""

    def __init__(self, cluster: SeededCluster, profile: str = "full", seed: int = 11,
                 exporter_labels: dict[str, str] | None = None):
        self.profile = profile
        rng = random.Random(seed)
        holders = gpu_holders(cluster)
        exporter_pods = {
            p["spec"]["nodeName"]: p["metadata"]["name"]
            for p in cluster.pods
            if all(p["metadata"]["labels"].get(k) == v
                   for k, v in (exporter_labels or {"app": EXPORTER_APP}).items())
        }
        self.exporters: dict[str, Exporter] = {}
        for node in cluster.gpu_nodes:
            name = node["metadata"]["name"]
            gpus = []
            for i in range(GPUS_PER_NODE):
                pod = holders.get((name, i))
                held = pod is not None
                util = rng.uniform(55, 98) if held else 0.0
                gpus.append(GPU(
                    node=name, index=i, uuid=gpu_uuid(name, i), util=round(util, 1),
                    temp=round(rng.uniform(52, 74) if held else rng.uniform(32, 40), 1),
                    memory_temp=round(rng.uniform(55, 80) if held else rng.uniform(35, 45), 1),
                    fb_used=round(rng.uniform(30000, 78000) if held else 0.0),
                    power=round(rng.uniform(350, 690) if held else rng.uniform(60, 75), 1),
                    pod=({"pod": pod["metadata"]["name"], "namespace": pod["metadata"]["namespace"],
                          "container": pod["spec"]["containers"][0]["name"]} if held else None),
                ))
            self.exporters[name] = Exporter(node=name, pod_name=exporter_pods.get(name, f"{EXPORTER_APP}-{name}"),
                                            gpus=gpus)
        counters = DEFAULT_COUNTERS if profile == "full" else [c for c in DEFAULT_COUNTERS if c[0] in SWEEP_COUNTERS]
        self.counters = counters
        self.xid_window_s = 300.0

    # -- faults ------------------------------------------------------------------------------

    def gpu(self, node: str, index: int) -> GPU:
        try:
            return self.exporters[node].gpus[index]
        except (KeyError, IndexError):
            raise KeyError(f"no GPU {index} on node {node!r}") from None

    def touch(self, node: str) -> None:
        self.exporters[node]._cache = {}

    def apply(self, kind: str, node: str, gpu: int | None = None, value: float | None = None) -> dict[str, Any]:
        """Inject one fault. Returns what changed, for the control API's answer."""
        if node not in self.exporters:
            raise KeyError(f"no GPU node {node!r}")
        exporter = self.exporters[node]
        if kind == "exporter-down":
            exporter.down = True
        elif kind == "exporter-restart":  # a new exporter process: the XID gauge starts from 0 again
            for g in exporter.gpus:
                g.xid = 0
        else:
            g = self.gpu(node, gpu if gpu is not None else 0)
            if kind == "xid":
                g.xid = int(value if value is not None else 79)
                g.xid_events.append((time.time(), g.xid))
            elif kind == "gpu-missing":
                g.missing = True
            elif kind == "hot-gpu":
                g.temp = float(value if value is not None else 93.0)
            elif kind == "idle-gpu":
                g.util = float(value if value is not None else 0.0)
            elif kind == "remapped-rows":  # remapped and applied: the count stays after the reset
                g.uncorrectable_rows = int(value if value is not None else 3)
            elif kind == "row-remap-pending":  # recorded, applied at the next GPU reset
                g.uncorrectable_rows = int(value if value is not None else 1)
                g.row_remap_pending = 1
            elif kind == "row-remap-failure":  # no spare row left: the GPU must be replaced
                g.uncorrectable_rows = int(value if value is not None else 3)
                g.row_remap_failure = 1
            else:
                raise ValueError(f"unknown GPU fault {kind!r}")
        self.touch(node)
        return {"kind": kind, "node": node, "gpu": gpu, "value": value}

    # -- exposition --------------------------------------------------------------------------

    def render(self, node: str, hostname: str = "pod", counters: str = "default") -> bytes | None:
        """The node's /metrics body in the asked variant, or None when its exporter is down."""
        exporter = self.exporters.get(node)
        if exporter is None or exporter.down:
            return None
        if hostname not in ("pod", "node", "short", "none") or counters not in ("default", "extended"):
            raise ValueError(f"unknown variant hostname={hostname!r} counters={counters!r}")
        key = (hostname, counters)
        timed = counters == "extended" and any(g.xid_events for g in exporter.gpus)
        body = exporter._cache.get(key)
        if body is None or timed:  # the XID counter's window moves with time
            body = self._render(exporter, hostname, counters).encode()
            exporter._cache[key] = body
        return body

    def _values(self, g: GPU) -> dict[str, float]:
        return {
            "DCGM_FI_DEV_SM_CLOCK": 1980 if g.util else 345,
            "DCGM_FI_DEV_MEM_CLOCK": 2619,
            "DCGM_FI_DEV_MEMORY_TEMP": g.memory_temp,
            "DCGM_FI_DEV_GPU_TEMP": g.temp,
            "DCGM_FI_DEV_POWER_USAGE": g.power,
            "DCGM_FI_DEV_TOTAL_ENERGY_CONSUMPTION": 9_876_543_210,
            "DCGM_FI_DEV_PCIE_REPLAY_COUNTER": 0,
            "DCGM_FI_DEV_GPU_UTIL": g.util,
            "DCGM_FI_DEV_MEM_COPY_UTIL": round(g.util * 0.4, 1),
            "DCGM_FI_DEV_ENC_UTIL": 0,
            "DCGM_FI_DEV_DEC_UTIL": 0,
            "DCGM_FI_DEV_XID_ERRORS": g.xid,
            "DCGM_FI_DEV_FB_FREE": FB_TOTAL_MIB - g.fb_used - 500,
            "DCGM_FI_DEV_FB_USED": g.fb_used,
            "DCGM_FI_DEV_FB_RESERVED": 500,
            "DCGM_FI_DEV_NVLINK_BANDWIDTH_TOTAL": 123_456_789,
            "DCGM_FI_DEV_VGPU_LICENSE_STATUS": 0,
            "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS": g.uncorrectable_rows,
            "DCGM_FI_DEV_CORRECTABLE_REMAPPED_ROWS": 0,
            "DCGM_FI_DEV_ROW_REMAP_FAILURE": g.row_remap_failure,
            "DCGM_FI_PROF_GR_ENGINE_ACTIVE": round(g.util / 100.0, 3),
            "DCGM_FI_PROF_PIPE_TENSOR_ACTIVE": round(g.util / 160.0, 3),
            "DCGM_FI_PROF_DRAM_ACTIVE": round(g.util / 200.0, 3),
            "DCGM_FI_PROF_PCIE_TX_BYTES": 1_200_000 if g.util else 0,
            "DCGM_FI_PROF_PCIE_RX_BYTES": 3_400_000 if g.util else 0,
        }

    def _render(self, exporter: Exporter, hostname: str = "pod", counters: str = "default") -> str:
        gpus = [g for g in exporter.gpus if not g.missing]
        host = {"pod": exporter.pod_name, "node": exporter.node, "short": exporter.node.split(".", 1)[0],
                "none": None}[hostname]
        label_sets = []
        for g in gpus:
            labels = f'gpu="{g.index}",UUID="{g.uuid}",device="nvidia{g.index}",modelName="{GPU_MODEL_NAME}"'
            if host is not None:
                labels += f',Hostname="{host}"'
            labels += f',DCGM_FI_DRIVER_VERSION="{DRIVER_VERSION}"'
            if g.pod:
                labels += f',container="{g.pod["container"]}",namespace="{g.pod["namespace"]}",pod="{g.pod["pod"]}"'
            label_sets.append((labels, self._values(g), g))
        fields = list(self.counters)
        if counters == "extended":
            fields.append(("DCGM_FI_DEV_ROW_REMAP_PENDING", "gauge"))
        lines: list[str] = []
        for name, mtype in fields:
            lines.append(f"# HELP {name} {name}.")
            lines.append(f"# TYPE {name} {mtype}")
            for labels, values, g in label_sets:
                value = g.row_remap_pending if name == "DCGM_FI_DEV_ROW_REMAP_PENDING" else values[name]
                lines.append(f"{name}{{{labels}}} {value}")
        if counters == "extended":
            name = "DCGM_EXP_XID_ERRORS_COUNT"
            lines.append(f"# HELP {name} Count of XID Errors within user-specified time window "
                         "(see xid-count-window-size param).")
            lines.append(f"# TYPE {name} gauge")
            since = time.time() - self.xid_window_s
            window = f'window_size_in_ms="{int(self.xid_window_s * 1000)}"'
            for labels, _, g in label_sets:
                seen: dict[int, int] = {}
                for at, code in g.xid_events:
                    if at >= since:
                        seen[code] = seen.get(code, 0) + 1
                if not seen:
                    lines.append(f"{name}{{{labels},{window}}} 0")
                for code, count in sorted(seen.items()):
                    lines.append(f'{name}{{{labels},{window},xid="{code}"}} {count}')
        return "\n".join(lines) + "\n"
