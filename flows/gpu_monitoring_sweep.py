"""GPU monitoring sweep: which GPUs are broken, missing, hot or held by a pod that does nothing.

Every 5 minutes, for one cluster: two Kubernetes listings (GPU nodes; unfinished pods, of which
the dcgm-exporter pods and the pods holding GPUs are kept) and, together with them, the fleet's
metrics (the series recorded by the sweep's recording rules where Prometheus has them loaded, else
four PromQL queries), then one follow-up query for the few GPUs that need details; the pure join and classification of
`tasks.gpu_classify` turn them into findings, each with severity, evidence and a recommended action.
A handful of tasks and a constant number of API calls, whatever the fleet's size.

The run leaves a markdown summary with a fleet heatmap (nodes x GPUs, utilisation, faulty GPUs
marked), a table of findings and, when nodes have critical hardware findings, the cordon plan.
`dry_run=False` pauses for an operator's approval (the plan shown in the UI) and then cordons and
taints at most `max_share` of the GPU nodes; `drain=True` also evicts their pods, respecting
PodDisruptionBudgets. `gpu_node_uncordon` returns repaired nodes to service.

When Prometheus cannot be asked, every GPU is `unknown`, the report says so, and the run fails.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Failed

from blocks.platform import Platform
from tasks._gc import gc_paused
from tasks.approval import Approval, ask_approval
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
    plan_cordon,
    plan_uncordon,
    repair_note,
)
from tasks.kubernetes import (
    cordon_gpu_nodes,
    drain_gpu_nodes,
    fetch_gpu_fleet,
    list_gpu_fleet,
    uncordon_gpu_nodes,
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
    approval_timeout_s: int = 3600,
    metric_selector: str | None = None,
    exporter_jobs: list[str] | None = None,
    exporter_selectors: list[str] | None = None,
    page_size: int | None = None,
    note_training_commits: bool = True,
    metrics_source: Literal["auto", "raw"] | None = None,
) -> Any:
    """Sweep one cluster's GPUs; plan (dry run) or, approved, apply cordons of nodes with critical findings.

    Thresholds, exporter jobs and selectors come from the platform config (`thresholds.gpu`); any
    parameter given overrides them. A critical finding on a node running a `train-on-push` training
    leaves a note on its commit (`note_training_commits`). `metrics_source`: "auto" (default) reads the
    series recorded by the sweep's recording rules where Prometheus has them loaded (`python -m
    tasks.gpu_rules render-sweep`), else runs the raw queries; "raw" always runs the raw queries.
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
        "cordon_already": plan.already, "dry_run": dry_run, "cordoned": [], "approved_by": None,
        "training_notes": [],
    }
    if note_training_commits and cfg.argo is not None and cfg.gitlab is not None:
        summary["training_notes"] = _note_training_commits(plat, platform, result)

    if not dry_run and plan.actions:
        approval = pause_for_approval(plan.markdown(dry_run=False), approval_timeout_s)
        summary["approved_by"] = approval.who()
        if not approval.approve:
            logger.warning("cordon plan rejected by %s: nothing changed", approval.who())
            summary["rejected"] = True
        else:
            note = {"by": "ai-platform-ops gpu-monitoring-sweep", "approved_by": approval.who(),
                    "at": datetime.now(tz=UTC).isoformat(timespec="seconds"), "flow_run": _flow_run_id()}
            changes = cordon_gpu_nodes(api, cluster_cfg, plan.actions, note)
            summary["cordoned"] = [c["node"] for c in changes if c["changed"]]
            evictions = drain_gpu_nodes(api, cluster_cfg, plan.nodes) if drain else []
            summary["evictions"] = evictions
            publish_action_report(platform, cluster_cfg.name, "cordon", approval.who(), changes, evictions)

    if result.metrics_error is not None:
        return Failed(message=f"GPU sweep could not read metrics, every GPU is unknown: {result.metrics_error}",
                      data=summary)
    return summary


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


def pause_for_approval(plan_markdown: str, timeout_s: int) -> Approval:
    """Publish the plan as the pending-approval artifact, then pause until an operator answers in the UI."""
    publish_markdown("gpu-pending-approval", plan_markdown + "\n\nWaiting for approval: set **approve** and write "
                     "your name in **approver** in the paused run's form, then resume it.",
                     description="Waiting for approval")
    return ask_approval(plan_markdown, timeout_s)


@task(name="publish-gpu-action-report", cache_policy=NONE)
def publish_action_report(platform: str, cluster: str, action: str, approver: str, changes: list[dict],
                          evictions: list[dict]) -> None:
    lines = [f"# GPU node {action}: {platform}/{cluster}", "", f"Approved by **{approver}**.", "",
             md_table(changes, columns=["node", "changed", "detail"])]
    if evictions:
        blocked = [e for e in evictions if e["result"] == "blocked"]
        lines += ["", "## Drain", "", f"{len(evictions) - len(blocked)} evicted, {len(blocked)} blocked by a "
                  "PodDisruptionBudget (left running: resolve the budget, then drain again)", "",
                  md_table(evictions, columns=["node", "pod", "result", "detail"])]
    publish_markdown(f"gpu-{action}-{platform}-{cluster}", "\n".join(lines) + "\n", description=f"GPU node {action}")


def _flow_run_id() -> str | None:
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return str(ctx.flow_run.id) if ctx and ctx.flow_run else None


@flow(name="gpu-node-uncordon", log_prints=False)
def gpu_node_uncordon(platform: str = "main", nodes: list[str] | None = None, cluster: str | None = None,
                      dry_run: bool = True, force: bool = False, window: str | None = None,
                      approval_timeout_s: int = 3600) -> dict:
    """Return repaired GPU nodes to service: remove the unhealthy taint and annotation, uncordon, and
    record the repair (`ai-platform-ops.io/gpu-repaired`: when, who, the XIDs dcgm-exporter still shows).

    A fresh sweep (the same sweep as `gpu-monitoring-sweep`) must show the node without critical
    findings and with its exporter reporting (`force=True` overrides); an XID that dcgm-exporter's
    last-value gauge still shows from before the cordon does not count. Only nodes this project
    cordoned are touched. Dry run by default; a real run pauses for approval.
    """
    logger = get_run_logger()
    plat = Platform(platform)
    cluster_cfg = plat.config.cluster(cluster)
    api = plat.kubernetes(cluster)
    settings = dataclasses.replace(_settings(plat, cluster, window=window), xid_baseline="cordon")
    result, fleet = _flow_sweep(plat, api, settings)
    plan = plan_uncordon(nodes or [], fleet.nodes, result, force=force)
    publish_markdown(f"gpu-uncordon-plan-{platform}-{cluster_cfg.name}", plan.markdown(dry_run),
                     description="GPU nodes to return to service")
    summary: dict[str, Any] = {"plan": plan.actions, "refused": plan.refused, "dry_run": dry_run, "uncordoned": [],
                               "approved_by": None}
    if dry_run or not plan.actions:
        return summary
    approval = pause_for_approval(plan.markdown(dry_run=False), approval_timeout_s)
    summary["approved_by"] = approval.who()
    if not approval.approve:
        logger.warning("uncordon rejected by %s", approval.who())
        return summary
    at = datetime.now(tz=UTC).isoformat(timespec="seconds")
    notes = {n: repair_note(result, n, approval.who(), at) for n in plan.actions}
    changes = uncordon_gpu_nodes(api, cluster_cfg, plan.actions, notes)
    summary["uncordoned"] = [c["node"] for c in changes if c["changed"]]
    publish_action_report(platform, cluster_cfg.name, "uncordon", approval.who(), changes, [])
    return summary


__all__ = [
    "FINDING_ANNOTATION",
    "UNHEALTHY_TAINT_KEY",
    "Severity",
    "gpu_monitoring_sweep",
    "gpu_node_uncordon",
    "run_sweep",
    "sweep",
]
