"""What to do about the sweep's findings: which nodes to cordon (capped) and which to return to service.

Pure functions over a `SweepResult` and the GPU nodes; the Kubernetes calls that apply a plan are
`tasks.kubernetes.cordon_and_taint` / `uncordon_and_untaint`, one step per node of the operations in
`flows.gpu_monitoring_sweep`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from tasks.gpu_model import (
    CORDON_KINDS,
    FINDING_ANNOTATION,
    GPUFinding,
    GPUNode,
    Kind,
    Severity,
    SweepResult,
)


def gpu_sort(g: str) -> tuple[int, str]:
    first = g.split(",", 1)[0]
    return (int(first), g) if first.isdigit() else (1 << 30, g)


UNHEALTHY_TAINT_KEY = "nvidia.com/gpu-unhealthy"


@dataclass
class NodeAction:
    node: str
    reason: str  # the taint's value, e.g. xid-79
    findings: list[str]
    xids: dict[str, int] = field(default_factory=dict)  # gpu -> the XID gauge's value when cordoned
    uid: str = ""  # the node's metadata.uid when planned
    kinds: list[str] = field(default_factory=list)  # the findings that justify it: "kind gpu N"

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

    def facts(self) -> dict[str, Any]:
        """What an approval of this plan is about: each node (by uid), its taint and the findings behind it;
        the cap. Not the evidence's values (temperatures, sample counts), which change by themselves."""
        return {"cordon": [{"node": a.node, "uid": a.uid, "taint": a.reason, "findings": a.kinds}
                           for a in self.actions],
                "over_cap": sorted(a.node for a in self.over_cap), "cap": self.cap}

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
    reasons: dict[str, list[GPUFinding]] = defaultdict(list)
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
        fs.sort(key=lambda f: (order.get(f.kind, 99), gpu_sort(f.gpu or "")))
        candidates.append(NodeAction(
            name, fs[0].cordon_reason or "unhealthy",
            [f"{f.kind.value}" + (f" gpu {f.gpu}" if f.gpu else "") + f": {f.summary}" for f in fs],
            dict(result.xid_last.get(name, {})), uid=node.uid,
            kinds=[f"{f.kind.value}" + (f" gpu {f.gpu}" if f.gpu else "") for f in fs],
        ))
    candidates.sort(key=lambda a: (-len(a.findings), a.node))
    return CordonPlan(actions=candidates[:cap], over_cap=candidates[cap:], already=sorted(already), cap=cap,
                      gpu_nodes=len(by_name), max_share=max_share)


@dataclass
class UncordonPlan:
    actions: list[str]
    refused: dict[str, str]
    in_service: list[str] = field(default_factory=list)  # asked for, already schedulable and untainted
    uids: dict[str, str] = field(default_factory=dict)

    def facts(self) -> dict[str, Any]:
        return {"uncordon": [{"node": n, "uid": self.uids.get(n, "")} for n in self.actions],
                "in_service": sorted(self.in_service)}


def plan_uncordon(requested: Iterable[str], nodes: Iterable[GPUNode], result: SweepResult | None,
                  force: bool = False) -> UncordonPlan:
    """Repaired nodes to return to service: only nodes this project tainted, and only when healthy now.

    A node that still has a critical finding, or whose GPUs are unknown, is refused unless `force`.
    `result` is a sweep judged against each node's cordon (`SweepSettings.xid_baseline="cordon"`): an
    XID that dcgm-exporter's gauge still shows from before the cordon does not block it.
    """
    by_name = {n.name: n for n in nodes}
    actions, refused, in_service = [], {}, []
    for name in dict.fromkeys(requested):
        node = by_name.get(name)
        if node is None:
            refused[name] = "no such GPU node"
            continue
        if not is_tainted_unhealthy(node) and FINDING_ANNOTATION not in node.annotations:
            if node.unschedulable:
                refused[name] = f"cordoned, but not by this project (no {UNHEALTHY_TAINT_KEY} taint): left as it is"
            else:
                in_service.append(name)
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
    return UncordonPlan(actions, refused, in_service, {n: by_name[n].uid for n in actions})


def repair_note(result: SweepResult | None, node: str, by: str, at: str) -> str:
    """The repair annotation uncordon writes: when, by whom, and the XIDs the gauge still shows then."""
    import json

    xids = dict(result.xid_last.get(node, {})) if result is not None else {}
    return json.dumps({"at": at, "by": by, "xids": xids}, sort_keys=True)
