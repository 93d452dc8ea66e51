"""GPU monitoring sweep: which GPUs are broken, missing, hot or held by a pod that does nothing.

Every 5 minutes, for one cluster: two Kubernetes listings (GPU nodes; unfinished pods, of which
the dcgm-exporter pods and the pods holding GPUs are kept) and, together with them, the fleet's
metrics (the series recorded by the sweep's recording rules where Prometheus has them loaded, else
four PromQL queries), then one follow-up query for the few GPUs that need details; the pure join and classification of
`tasks.gpu_classify` turn them into findings, each with severity, evidence and a recommended action.
A handful of tasks and a constant number of API calls, whatever the fleet's size.

The run leaves a markdown summary with a fleet heatmap (nodes x GPUs, utilisation, faulty GPUs
marked), a table of findings and, when nodes have critical hardware findings, the cordon plan.

The cordon is an operation (`tasks.operation`): the target is the cluster by its `kube-system` namespace
UID, each planned node is named by its uid, and each node's cordon is one step. A dry run (the default)
publishes the plan; `dry_run=False` pauses for approval, then sweeps again and refuses when the plan
changed (a node repaired meanwhile, another node under the same name, a new finding); then it cordons and
taints at most `max_share` of the GPU nodes, and `drain=True` also evicts their pods, respecting
PodDisruptionBudgets. The way back is `gpu-node-uncordon` with the cordoned nodes, which is also how
repaired nodes return to service (`cordon=true` there is the way back of an uncordon).

When Prometheus cannot be asked, every GPU is `unknown`, the report says so, and the run fails.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import State

from blocks.platform import Platform
from tasks._gc import gc_paused
from tasks.events import emit_critical_findings
from tasks.gpu_classify import classify, needs_detail
from tasks.gpu_model import (
    FINDING_ANNOTATION,
    FleetSnapshot,
    Severity,
    SweepResult,
    SweepSettings,
    SweepThresholds,
)
from tasks.gpu_pictures import heatmap, render_heatmap_png
from tasks.gpu_plans import (
    UNHEALTHY_TAINT_KEY,
    CordonPlan,
    NodeAction,
    UncordonPlan,
    plan_cordon,
    plan_uncordon,
    repair_note,
)
from tasks.kubernetes import (
    cluster_identity,
    cordon_and_taint,
    drain_nodes,
    fetch_gpu_fleet,
    is_cordoned_by_us,
    list_gpu_fleet,
    read_node,
    uncordon_and_untaint,
)
from tasks.operation import (
    Operation,
    Plan,
    Step,
    Target,
    WayBack,
    approval_timeout,
    approver,
    lock_timeout,
    run_operation_sync,
)
from tasks.prometheus import (
    DCGMSnapshot,
    fetch_dcgm,
    fetch_dcgm_detail,
    query_args,
    query_dcgm_details,
    query_dcgm_metrics,
    with_detail_error,
)
from tasks.reports import md_table, png_data_uri, publish_markdown, publish_table

# --- the one sweep path ------------------------------------------------------------------------
#
# `run_sweep` is the sweep: the flow, the uncordon flow, the tests and the benchmark all run it.
# It takes three callables that start the fetches and return something with `.result()`: the flow
# passes Prefect task submissions (retries, task runs in the UI), `sweep` plain threads.


def run_sweep(settings: SweepSettings, start_fleet: Callable[[], Any], start_metrics: Callable[[], Any],
              start_detail: Callable[[DCGMSnapshot, set[str]], Any]) -> tuple[SweepResult, FleetSnapshot]:
    """Fetch (Kubernetes and Prometheus together), ask details for the GPUs that need them, classify.

    Kubernetes errors raise (without the node list there is nothing to judge). A failed first
    Prometheus phase makes every GPU unknown; a failed detail query leaves the established findings
    standing, with a `details-missing` finding.
    """
    th = settings.thresholds
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Everything here is parsing and folding acyclic data: the cyclic collector only re-walks it
    # (4.1 -> 1.8 s of CPU at 10,000 nodes; tasks/_gc.py).
    with gc_paused():
        fleet_f, metrics_f = start_fleet(), start_metrics()
        fleet: FleetSnapshot = fleet_f.result()
        metrics = _result_or(metrics_f, lambda err: DCGMSnapshot.unavailable(th.window, err))
        timings["fetch_s"] = time.perf_counter() - start
        hosts = needs_detail(fleet, metrics, th)
        if hosts:
            t = time.perf_counter()
            first = metrics
            metrics = _result_or(start_detail(first, hosts), lambda err: with_detail_error(first, err))
            timings["detail_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result = classify(fleet, metrics, th, cluster=settings.cluster, xid_baseline_kind=settings.xid_baseline)
        timings["classify_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    result.timings = timings
    return result, fleet


def _result_or(future: Any, fallback: Callable[[str], DCGMSnapshot]) -> DCGMSnapshot:
    """The future's snapshot; when it failed (after a task's retries), `fallback(error)`: unknown, not healthy."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - reported as unknown, never as healthy
        return fallback(f"{type(exc).__name__}: {exc}")


def sweep(api: Any, prometheus_url: str, settings: SweepSettings | SweepThresholds, *, cluster: str | None = None,
          timeout_s: float | None = None, **overrides: Any) -> SweepResult:
    """`run_sweep` without Prefect, in threads (the tests and the benchmark time exactly this)."""
    if isinstance(settings, SweepThresholds):
        settings = SweepSettings(thresholds=settings)
    changes = {k: v for k, v in {"cluster": cluster, "timeout_s": timeout_s, **overrides}.items() if v is not None}
    if changes:
        settings = dataclasses.replace(settings, **changes)
    s = settings
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="sweep") as pool:
        result, _ = run_sweep(
            s,
            lambda: pool.submit(fetch_gpu_fleet, api, gpu_node_label=s.gpu_node_label,
                                exporter_selectors=s.exporter_selectors, resources=s.resources,
                                page_size=s.page_size, timeout_s=s.timeout_s),
            lambda: pool.submit(fetch_dcgm, prometheus_url, s.thresholds.window, timeout_s=s.timeout_s,
                                source=s.metrics_source, **query_args(s)),
            lambda snap, hosts: pool.submit(fetch_dcgm_detail, prometheus_url, snap, hosts,
                                            metric_selector=s.metric_selector, timeout_s=s.timeout_s),
        )
    return result


def _flow_sweep(plat: Platform, api: Any, settings: SweepSettings) -> tuple[SweepResult, FleetSnapshot]:
    """`run_sweep` with each fetch a Prefect task (retries for transient faults)."""
    prom = plat.prometheus()
    return run_sweep(
        settings,
        lambda: list_gpu_fleet.submit(api, settings),
        lambda: query_dcgm_metrics.submit(prom, settings),
        lambda snap, hosts: query_dcgm_details.submit(prom, snap, hosts, settings.metric_selector),
    )


# --- reports ---------------------------------------------------------------------------------


def summary_markdown(platform: str, result: SweepResult, plan: CordonPlan | None, dry_run: bool,
                     heatmap_uri: str | None) -> str:
    counts = result.counts
    util = f"{result.fleet_util_pct:.1f}%" if result.fleet_util_pct is not None else "unknown"
    alloc = f"{100.0 * result.gpus_held / result.gpus_expected:.1f}%" if result.gpus_expected else "n/a"
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.gpu_status_counts.items())) or "none"
    lines = [
        f"# GPU monitoring sweep: {platform}/{result.cluster}",
        "",
        f"**Status: {result.status.upper()}** at "
        f"{datetime.fromtimestamp(result.at, tz=UTC):%Y-%m-%d %H:%M:%S} UTC, window {result.window}",
        "",
        f"- **Findings:** {counts['critical']} critical, {counts['warning']} warning, {counts['info']} info",
        f"- **Fleet:** {result.gpu_nodes} GPU nodes, {result.gpus_expected} GPUs, {result.gpus_reporting} reporting",
        f"- **Utilisation (window average over reporting GPUs):** {util}; **held by pods:** {result.gpus_held} "
        f"GPUs ({alloc})",
        f"- **GPU status:** {statuses}",
        f"- **Cost:** {result.round_trips} API round trips, {result.timings.get('total_s', 0):.2f}s",
        f"- **Metrics from:** {result.metrics_source}" + (f" ({result.metrics_source_note})"
                                                           if result.metrics_source_note else ""),
    ]
    if result.metrics_error:
        lines += ["", f"> **Prometheus gave no usable answer; every GPU is unknown.** {result.metrics_error}"]
    for w in result.warnings[:5]:
        lines.append(f"- _warning:_ {w}")
    lines += ["", "## Findings", "",
              md_table([f.row() for f in result.findings],
                       columns=["severity", "finding", "node", "gpu", "pod", "owner", "summary", "evidence"], limit=30)]
    if plan is not None and (plan.actions or plan.over_cap or plan.already):
        lines += ["", "## Cordon", "", plan.markdown(dry_run)]
    if heatmap_uri:
        lines += ["", "## Fleet heatmap", "",
                  "Utilisation per GPU over the window; red x: faulty or missing, orange o: idle-but-held or hot, "
                  "grey: unknown.", "", f"![GPU fleet heatmap]({heatmap_uri})"]
    return "\n".join(lines) + "\n"


@task(name="publish-gpu-sweep-report", cache_policy=NONE)
def publish_sweep_report(platform: str, result: SweepResult, plan: CordonPlan | None, dry_run: bool) -> str:
    """The summary (with the heatmap) and the findings table, as artifacts."""
    import matplotlib.pyplot as plt

    uri = None
    if result.gpus:
        fig = render_heatmap_png(heatmap(result), f"{platform}/{result.cluster}: GPU utilisation, window "
                                                  f"{result.window}")
        try:
            uri = png_data_uri(fig)
        finally:
            plt.close(fig)
    key = f"gpu-sweep-{platform}-{result.cluster}"
    publish_markdown(key, summary_markdown(platform, result, plan, dry_run, uri),
                     description=f"GPU sweep: {result.status}")
    publish_table(f"gpu-findings-{platform}-{result.cluster}", [f.row() for f in result.findings],
                  description="GPU findings: severity, evidence, recommended action")
    return key


# --- flows -----------------------------------------------------------------------------------


def _settings(plat: Platform, cluster: str | None, **overrides: Any) -> SweepSettings:
    cfg = plat.config
    return SweepSettings.from_config(cfg, cfg.cluster(cluster), **overrides)


def _lock(platform: str, cluster: str) -> str:
    """The one lock of a cluster's GPU node cordons and uncordons."""
    return f"gpu-nodes-{platform}-{cluster}"


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


def cordon_operation(plat: Platform, api: Any, cluster: Any, plan_now: Callable[[], CordonPlan], *, drain: bool,
                     approval_timeout_s: int | None, poll_interval_s: float, by: str) -> Operation:
    """The cordon of the nodes `plan_now()` plans (it reads the live nodes and findings each time it is called)."""
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

    return Operation("gpu-monitoring-sweep", plat.name, planner, lock=_lock(plat.name, cluster.name),
                     approval_timeout_s=approval_timeout(plat.config, approval_timeout_s),
                     lock_timeout_s=lock_timeout(plat.config), poll_interval_s=poll_interval_s, key=cluster.name)


@flow(name="gpu-monitoring-sweep", log_prints=False)
def gpu_monitoring_sweep(
    platform: str = "main",
    cluster: str | None = None,
    window: str | None = None,
    temp_c: float | None = None,
    memory_temp_c: float | None = None,
    idle_util_pct: float | None = None,
    stale_after: str | None = None,
    dry_run: bool = True,
    max_share: float | None = None,
    drain: bool = False,
    approval_timeout_s: int | None = None,
    metric_selector: str | None = None,
    exporter_jobs: list[str] | None = None,
    exporter_selectors: list[str] | None = None,
    page_size: int | None = None,
    note_training_commits: bool = True,
    metrics_source: Literal["auto", "raw"] | None = None,
    poll_interval_s: float = 10,
) -> Any:
    """Sweep one cluster's GPUs; plan (dry run) or, approved, apply cordons of nodes with critical findings.

    Thresholds, exporter jobs and selectors come from the platform config (`thresholds.gpu`); any
    parameter given overrides them. A critical finding on a node running a `train-on-push` training
    leaves a note on its commit (`note_training_commits`). `metrics_source`: "auto" (default) reads the
    series recorded by the sweep's recording rules where Prometheus has them loaded (`python -m
    tasks.gpu_rules render-sweep`), else runs the raw queries; "raw" always runs the raw queries.
    Returns the cordon operation's record, with the sweep's summary under `sweep`.
    """
    logger = get_run_logger()
    plat = Platform(platform)
    cfg = plat.config
    settings = _settings(plat, cluster, window=window, temp_c=temp_c, memory_temp_c=memory_temp_c,
                         idle_util_pct=idle_util_pct, stale_after=stale_after, metric_selector=metric_selector,
                         exporter_jobs=exporter_jobs, exporter_selectors=exporter_selectors, page_size=page_size,
                         metrics_source=metrics_source)
    api = plat.kubernetes(cluster)
    cluster_cfg = cfg.cluster(cluster)
    share = max_share if max_share is not None else cfg.thresholds.gpu.cordon_max_share
    result, fleet = _flow_sweep(plat, api, settings)  # no node list: nothing to judge, the run fails here

    plan = plan_cordon(result, fleet.nodes, share)
    publish_sweep_report(platform, result, plan, dry_run)
    emit_critical_findings(platform, "gpu-monitoring-sweep", [  # for the automations' webhook notice
        f"{f.node or 'fleet'}{'/gpu-' + str(f.gpu) if f.gpu is not None else ''}: {f.kind.value}"
        for f in result.findings if f.severity.value == "critical"])
    logger.info("GPU sweep %s/%s: %s; %s; metrics from %s (%s); XIDs from %s; would cordon %s", platform,
                cluster_cfg.name, result.status, result.counts, result.metrics_source,
                result.metrics_source_note or "-", result.xid_source, plan.nodes or "none")
    summary: dict[str, Any] = {
        "status": result.status, "counts": result.counts, "findings": [f.row() for f in result.findings],
        "gpu_nodes": result.gpu_nodes, "gpus": result.gpus_expected, "gpus_reporting": result.gpus_reporting,
        "gpus_unknown": result.gpus_unknown, "fleet_util_pct": result.fleet_util_pct,
        "round_trips": result.round_trips, "xid_source": result.xid_source,
        "metrics_source": result.metrics_source, "metrics_source_note": result.metrics_source_note,
        "cordon_plan": plan.nodes, "cordon_over_cap": [a.node for a in plan.over_cap],
        "cordon_already": plan.already, "training_notes": [],
    }
    if note_training_commits and cfg.argo is not None and cfg.gitlab is not None:
        summary["training_notes"] = _note_training_commits(plat, platform, result)
    if result.metrics_error is not None:
        raise RuntimeError(f"GPU sweep could not read metrics, every GPU is unknown: {result.metrics_error}")

    swept = [plan]  # the plan just made; after the approval the planner sweeps again (live nodes and findings)

    def plan_now() -> CordonPlan:
        if swept:
            return swept.pop()
        r, f = _flow_sweep(plat, api, settings)
        return plan_cordon(r, f.nodes, share)

    op = cordon_operation(plat, api, cluster_cfg, plan_now, drain=drain, approval_timeout_s=approval_timeout_s,
                          poll_interval_s=poll_interval_s, by="ai-platform-ops gpu-monitoring-sweep")
    record = run_operation_sync(op, dry_run=dry_run)
    if isinstance(record, State):  # cancelled during the apply
        return record
    record["sweep"] = summary
    return record


# --- the training lifecycle: a note on the commit whose training runs on a faulty node ---------------


def training_commits(result: SweepResult, workflows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """(project, commit, workflow, findings) for each `train-on-push` workflow named by a critical finding.

    `workflows` maps "namespace/name" to the Workflow as Argo returns it; a workflow started by
    `train-on-push` carries the annotations `ai-platform-ops/repository` (the GitLab project) and
    `ai-platform-ops/commit` (its SHA), written by `flows.training.argo_training_run`.
    """
    from tasks.gitlab_ci import PROJECT_RE, SHA_RE

    out: dict[str, dict[str, Any]] = {}
    for f in result.findings:
        if f.severity is not Severity.CRITICAL or not f.workflow:
            continue
        for ref in f.workflow.split(", "):
            wf = workflows.get(ref) or {}
            notes = (wf.get("metadata") or {}).get("annotations") or {}
            project, sha = notes.get("ai-platform-ops/repository", ""), notes.get("ai-platform-ops/commit", "")
            if not (PROJECT_RE.match(project) and SHA_RE.match(sha)):
                continue
            item = out.setdefault(ref, {"project": project, "commit": sha, "workflow": ref, "findings": []})
            item["findings"].append(f"{f.kind.value} on {f.node}" + (f" gpu {f.gpu}" if f.gpu else "")
                                    + f": {f.summary}")
    return list(out.values())


@task(name="note-gpu-faults-on-training-commits", cache_policy=NONE)
def _note_training_commits_task(plat: Platform, platform: str, result: SweepResult) -> list[str]:
    from tasks.argo import read_workflow
    from tasks.gitlab_ci import post_note
    from tasks.redact import Redactor

    read = getattr(read_workflow, "fn", read_workflow)  # one task for the whole note: no task run per workflow
    redactor = Redactor.of(plat.secrets())
    argo = plat.argo()
    refs = sorted({r for f in result.findings if f.severity is Severity.CRITICAL and f.workflow
                   for r in f.workflow.split(", ")})
    workflows: dict[str, dict[str, Any]] = {}
    for ref in refs:
        ns, name = ref.split("/", 1)
        try:
            workflows[ref] = read(argo, ns, name, redactor=redactor)
        except Exception as exc:  # noqa: BLE001 - a workflow gone (deleted, archived) has no commit to note
            get_run_logger().warning("no commit note for workflow %s: %s", ref, redactor.error(exc))
    gitlab = plat.gitlab_api().get_client()
    where = []
    for item in training_commits(result, workflows):
        body = (f"**GPU fault under this commit's training** (`{item['workflow']}`), found by the GPU sweep of "
                f"{platform}/{result.cluster}:\n\n" + "\n".join(f"- {x}" for x in item["findings"])
                + "\n\nThe node is planned for cordon; the training may fail or slow down.")
        where.append(post_note(gitlab, item["project"], item["commit"], body, redactor=redactor))
    return where


def _note_training_commits(plat: Platform, platform: str, result: SweepResult) -> list[str]:
    if not any(f.severity is Severity.CRITICAL and f.workflow for f in result.findings):
        return []
    state = _note_training_commits_task(plat, platform, result, return_state=True)
    if not state.is_completed():  # a note is a courtesy: it never fails the sweep
        get_run_logger().warning("could not note GPU faults on training commits: %s", state.message)
        return []
    return state.result()


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


def uncordon_operation(plat: Platform, api: Any, cluster: Any, plan_now: Callable[[], tuple[UncordonPlan, Any]],
                       *, approval_timeout_s: int | None, poll_interval_s: float) -> Operation:
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

    return Operation("gpu-node-uncordon", plat.name, planner, lock=_lock(plat.name, cluster.name),
                     approval_timeout_s=approval_timeout(plat.config, approval_timeout_s),
                     lock_timeout_s=lock_timeout(plat.config), poll_interval_s=poll_interval_s, key=cluster.name)


def manual_cordon_plan(requested: list[str], fleet: Any) -> CordonPlan:
    """`cordon=true`: the named GPU nodes back out of service (the way back of an uncordon), no cap."""
    by_name = {n.name: n for n in fleet.nodes}
    unknown = sorted(set(requested) - set(by_name))
    if unknown:
        raise ValueError(f"nodes: no GPU node named {unknown}")
    todo = [n for n in dict.fromkeys(requested) if not (by_name[n].unschedulable and is_tainted(by_name[n]))]
    return CordonPlan([NodeAction(n, "manual", ["put back out of service by gpu-node-uncordon cordon=true"],
                                  uid=by_name[n].uid, kinds=["manual"]) for n in todo], [],
                      sorted(set(requested) - set(todo)), len(todo), len(by_name), 1.0)


def is_tainted(node: Any) -> bool:
    return any(t.get("key") == UNHEALTHY_TAINT_KEY for t in node.taints)


@flow(name="gpu-node-uncordon", log_prints=False)
def gpu_node_uncordon(platform: str = "main", nodes: list[str] | None = None, cluster: str | None = None,
                      dry_run: bool = True, force: bool = False, cordon: bool = False, window: str | None = None,
                      approval_timeout_s: int | None = None, poll_interval_s: float = 10) -> Any:
    """Return repaired GPU nodes to service: remove the unhealthy taint and annotation, uncordon, and
    record the repair (`ai-platform-ops.io/gpu-repaired`: when, which run, the XIDs dcgm-exporter still shows).

    A fresh sweep (the same sweep as `gpu-monitoring-sweep`) must show the node without critical
    findings and with its exporter reporting (`force=True` overrides); an XID that dcgm-exporter's
    last-value gauge still shows from before the cordon does not count. A node cordoned by someone else
    refuses the run; a node already in service is left as it is. Dry run by default; a real run pauses for
    approval, sweeps again and refuses if the plan changed. `cordon=True` does the opposite for the named
    nodes (cordon and taint them): the way back of an uncordon.
    """
    plat = Platform(platform)
    cluster_cfg = plat.config.cluster(cluster)
    api = plat.kubernetes(cluster)
    settings = dataclasses.replace(_settings(plat, cluster, window=window), xid_baseline="cordon")
    if cordon:
        def cordon_now() -> CordonPlan:
            return manual_cordon_plan(nodes or [], list_gpu_fleet(api, settings))

        op = cordon_operation(plat, api, cluster_cfg, cordon_now, drain=False, approval_timeout_s=approval_timeout_s,
                              poll_interval_s=poll_interval_s, by="ai-platform-ops gpu-node-uncordon cordon=true")
        op.name = "gpu-node-uncordon"
        return run_operation_sync(op, dry_run=dry_run)

    def plan_now() -> tuple[UncordonPlan, Any]:
        result, fleet = _flow_sweep(plat, api, settings)
        return plan_uncordon(nodes or [], fleet.nodes, result, force=force), result

    op = uncordon_operation(plat, api, cluster_cfg, plan_now, approval_timeout_s=approval_timeout_s,
                            poll_interval_s=poll_interval_s)
    return run_operation_sync(op, dry_run=dry_run)


__all__ = [
    "FINDING_ANNOTATION",
    "UNHEALTHY_TAINT_KEY",
    "Severity",
    "gpu_monitoring_sweep",
    "gpu_node_uncordon",
    "run_sweep",
    "sweep",
]
