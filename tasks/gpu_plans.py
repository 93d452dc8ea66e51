"""What to do about the sweep's findings: which nodes to cordon (capped) and which to return to service,
and the two operations (`tasks.operation`) that do it.

`plan_cordon` / `plan_uncordon` are pure functions over a `SweepResult` and the GPU nodes.
`cordon_operation` / `uncordon_operation` declare `gpu-monitoring-sweep`'s cordon and `gpu-node-uncordon`:
the target (the cluster by its `kube-system` namespace UID), one step per node (the Kubernetes calls
`tasks.kubernetes.cordon_and_taint` / `uncordon_and_untaint`, each read back) and the way back.
"""

from __future__ import annotations

import asyncio
import json
import math
from collections import defaultdict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from tasks.gpu_model import (
    CORDON_KINDS,
    FINDING_ANNOTATION,
    UNHEALTHY_TAINT_KEY,
    GPUFinding,
    GPUNode,
    Kind,
    Severity,
    SweepResult,
)
from tasks.kubernetes import (
    cluster_identity,
    cordon_and_taint,
    drain_nodes,
    is_cordoned_by_us,
    read_node,
    uncordon_and_untaint,
)
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, approver, lock_timeout


def gpu_sort(g: str) -> tuple[int, str]:
    first = g.split(",", 1)[0]
    return (int(first), g) if first.isdigit() else (1 << 30, g)


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
    xids = dict(result.xid_last.get(node, {})) if result is not None else {}
    return json.dumps({"at": at, "by": by, "xids": xids}, sort_keys=True)


def manual_cordon_plan(requested: list[str], fleet: Any) -> CordonPlan:
    """`cordon=true`: the named GPU nodes back out of service (the way back of an uncordon), no cap."""
    by_name = {n.name: n for n in fleet.nodes}
    unknown = sorted(set(requested) - set(by_name))
    if unknown:
        raise ValueError(f"nodes: no GPU node named {unknown}")
    todo = [n for n in dict.fromkeys(requested)
            if not (by_name[n].unschedulable and is_tainted_unhealthy(by_name[n]))]
    return CordonPlan([NodeAction(n, "manual", ["put back out of service by gpu-node-uncordon cordon=true"],
                                  uid=by_name[n].uid, kinds=["manual"]) for n in todo], [],
                      sorted(set(requested) - set(todo)), len(todo), len(by_name), 1.0)


# --- the operations ----------------------------------------------------------------------------


def gpu_nodes_lock(platform: str, cluster: str) -> str:
    """The one lock of a cluster's GPU node cordons and uncordons."""
    return f"gpu-nodes-{platform}-{cluster}"


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def _node_steps(api: Any, cluster: Any, verb: str, nodes: list[tuple[str, str]], apply: Callable[[str, str], str],
                changes: Callable[[str], str], undo: str) -> list[Step]:
    """One step per node (`verb` it, then read it back); each step is one read and one patch of that node."""
    timeout = cluster.request_timeout_s
    want = verb == "cordon"

    def check(node: str, uid: str) -> Callable[[Any], str]:
        def read_back(_: Any) -> str:
            obj = read_node(api, node, uid, timeout)
            if is_cordoned_by_us(obj) != want:
                raise RuntimeError(f"{node} reads back {'schedulable' if want else 'still cordoned'}")
            return "read back"
        return read_back

    return [Step(f"{verb} {node}", changes(node), f"the node reads back {'cordoned with' if want else 'without'} "
                 f"`{UNHEALTHY_TAINT_KEY}`", undo,
                 lambda n=node, u=uid: asyncio.to_thread(apply, n, u), check(node, uid)) for node, uid in nodes]


def cordon_operation(platform: str, config: Any, api: Any, cluster: Any, plan_now: Callable[[], CordonPlan], *,
                     drain: bool, approval_timeout_s: int | None, poll_interval_s: float, by: str,
                     name: str = "gpu-monitoring-sweep") -> Operation:
    """The cordon of the nodes `plan_now()` plans (it reads the live nodes and findings each time it is called).

    `config` is the platform config (its approval and lock timeouts), `api` the cluster's ApiClient, `cluster`
    its config section; `by` is recorded in each node's finding annotation."""
    timeout = cluster.request_timeout_s

    def cordon(action: NodeAction) -> Callable[[str, str], str]:
        def run(node: str, uid: str) -> str:
            note = json.dumps({"by": by, "approved_by": approver(), "flow_run": _flow_run_id(), "reason": action.reason,
                               "findings": action.findings, "xids": action.xids,
                               "at": datetime.now(tz=UTC).isoformat(timespec="seconds")}, sort_keys=True)
            return cordon_and_taint(api, node, action.reason, note, taint_key=UNHEALTHY_TAINT_KEY,
                                    annotation_key=FINDING_ANNOTATION, uid=uid, timeout_s=timeout)
        return run

    async def planner(_: Any) -> Plan:
        identity = await asyncio.to_thread(cluster_identity, api, timeout)
        cp = await asyncio.to_thread(plan_now)
        steps: list[Step] = []
        for a in cp.actions:
            steps += _node_steps(api, cluster, "cordon", [(a.node, a.uid)], cordon(a),
                                 lambda n, a=a: f"node {n} (uid {a.uid}): unschedulable, taint "
                                                f"`{UNHEALTHY_TAINT_KEY}={a.reason}:NoSchedule`, annotation "
                                                f"`{FINDING_ANNOTATION}`",
                                 "gpu-node-uncordon with this node (force: its finding stands)")
        if drain and cp.actions:
            async def do_drain() -> str:
                ev = await asyncio.to_thread(drain_nodes, api, cp.nodes, timeout)
                blocked = [e for e in ev if e["result"] == "blocked"]
                return (f"{len(ev) - len(blocked)} evicted, {len(blocked)} blocked by a PodDisruptionBudget (left "
                        "running: resolve the budget, then drain again)")
            steps.append(Step(f"drain {len(cp.actions)} node(s)", "the non-DaemonSet pods of " + ", ".join(cp.nodes)
                              + " are evicted (a PodDisruptionBudget that forbids it is respected)",
                              "each eviction answered (evicted, gone or blocked)",
                              "not undone: evicted pods are re-created by their controllers on other nodes",
                              do_drain))

        def way_back(applied: int) -> WayBack:
            nodes = cp.nodes[:applied]
            return WayBack("Return the cordoned nodes to service (their findings still stand, hence force).",
                           "gpu-node-uncordon", {"nodes": nodes, "cluster": cluster.name, "force": True,
                                                 "dry_run": False})

        return Plan(Target("Kubernetes cluster", cluster.name, identity), steps, title="GPU node cordon",
                    details=cp.markdown(dry_run=False), facts={**cp.facts(), "drain": drain}, way_back=way_back)

    return Operation(name, platform, planner, lock=gpu_nodes_lock(platform, cluster.name),
                     approval_timeout_s=approval_timeout(config, approval_timeout_s),
                     lock_timeout_s=lock_timeout(config), poll_interval_s=poll_interval_s, key=cluster.name)


def uncordon_operation(platform: str, config: Any, api: Any, cluster: Any,
                       plan_now: Callable[[], tuple[UncordonPlan, Any]], *, approval_timeout_s: int | None,
                       poll_interval_s: float) -> Operation:
    """Return the nodes `plan_now()` finds repaired to service, one step per node."""
    timeout = cluster.request_timeout_s

    async def planner(_: Any) -> Plan:
        identity = await asyncio.to_thread(cluster_identity, api, timeout)
        up, result = await asyncio.to_thread(plan_now)

        def uncordon(node: str, uid: str) -> str:
            note = repair_note(result, node, f"{approver()} (gpu-node-uncordon run {_flow_run_id()})",
                               datetime.now(tz=UTC).isoformat(timespec="seconds"))
            return uncordon_and_untaint(api, node, taint_key=UNHEALTHY_TAINT_KEY, annotation_key=FINDING_ANNOTATION,
                                        uid=uid, timeout_s=timeout, repair_note=note)

        steps = _node_steps(api, cluster, "uncordon", [(n, up.uids[n]) for n in up.actions], uncordon,
                            lambda n: f"node {n} (uid {up.uids[n]}): schedulable, taint `{UNHEALTHY_TAINT_KEY}` and "
                                      f"annotation `{FINDING_ANNOTATION}` removed, the repair recorded",
                            "gpu-node-uncordon cordon=true with this node")
        lines = [f"- **{n}**: remove `{UNHEALTHY_TAINT_KEY}`, the annotation, and uncordon" for n in up.actions]
        lines += [f"- {n}: already in service, nothing to do" for n in up.in_service]
        return Plan(Target("Kubernetes cluster", cluster.name, identity), steps, title="GPU node uncordon",
                    details="\n".join(lines), facts=up.facts(),
                    refusals=[f"{n}: {why}" for n, why in sorted(up.refused.items())],
                    way_back=lambda applied: WayBack(
                        "Put the nodes back out of service.", "gpu-node-uncordon",
                        {"nodes": up.actions[:applied], "cluster": cluster.name, "cordon": True, "dry_run": False}))

    return Operation("gpu-node-uncordon", platform, planner, lock=gpu_nodes_lock(platform, cluster.name),
                     approval_timeout_s=approval_timeout(config, approval_timeout_s),
                     lock_timeout_s=lock_timeout(config), poll_interval_s=poll_interval_s, key=cluster.name)
