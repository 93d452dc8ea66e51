"""GPU monitoring sweep: which GPUs are broken, missing, hot or held by a pod that does nothing.

Every 5 minutes, for one cluster: two Kubernetes listings (GPU nodes; unfinished pods, of which
the dcgm-exporter pods and the pods holding GPUs are kept) and four PromQL queries run together,
then one follow-up query for the few GPUs that need details; the pure join and classification of
`tasks.gpu_health` turn them into findings, each with severity, evidence and a recommended action.
A handful of tasks and a constant number of API calls, whatever the fleet's size.

The run leaves a markdown summary with a fleet heatmap (nodes x GPUs, utilisation, faulty GPUs
marked), a table of findings and, when nodes have critical hardware findings, the cordon plan.
`dry_run=False` pauses for an operator's approval (the plan shown in the UI) and then cordons and
taints at most `max_share` of the GPU nodes; `drain=True` also evicts their pods, respecting
PodDisruptionBudgets. `gpu_node_uncordon` returns repaired nodes to service.

When Prometheus cannot be asked, every GPU is `unknown`, the report says so, and the run fails.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Failed

from blocks.platform import Platform
from tasks.approval import Approval, ask_approval
from tasks.gpu_health import (
    FINDING_ANNOTATION,
    UNHEALTHY_TAINT_KEY,
    CordonPlan,
    FleetSnapshot,
    Severity,
    SweepResult,
    SweepThresholds,
    classify,
    heatmap,
    needs_detail,
    plan_cordon,
    plan_uncordon,
    render_heatmap_png,
)
from tasks.kubernetes import (
    DEFAULT_EXPORTER_SELECTOR,
    SWEEP_PAGE_SIZE,
    cordon_gpu_nodes,
    drain_gpu_nodes,
    fetch_gpu_fleet,
    list_gpu_fleet,
    uncordon_gpu_nodes,
)
from tasks.prometheus import (
    DCGMSnapshot,
    PrometheusError,
    fetch_dcgm,
    fetch_dcgm_detail,
    query_dcgm_details,
    query_dcgm_metrics,
)
from tasks.reports import md_table, png_data_uri, publish_markdown, publish_table

# --- the sweep without Prefect (the benchmark times exactly this) ------------------------------


def sweep(api: Any, prometheus_url: str, thresholds: SweepThresholds, *, cluster: str = "default",
          gpu_node_label: str = "nvidia.com/gpu.product", exporter_selector: str = DEFAULT_EXPORTER_SELECTOR,
          metric_selector: str = "", exporter_job: str = ".*dcgm.*", page_size: int = SWEEP_PAGE_SIZE,
          timeout_s: float = 15.0) -> SweepResult:
    """Fetch (Kubernetes and Prometheus together), join and classify one cluster's GPUs.

    Prometheus errors become a `prometheus-unavailable` finding (every GPU unknown); Kubernetes
    errors raise, since without the node list there is nothing to judge.
    """
    timings: dict[str, float] = {}
    start = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="sweep") as pool:
        fleet_f = pool.submit(fetch_gpu_fleet, api, gpu_node_label=gpu_node_label,
                              exporter_selector=exporter_selector, page_size=page_size, timeout_s=timeout_s)
        metrics_f = pool.submit(_metrics_or_error, prometheus_url, thresholds, metric_selector, exporter_job,
                                timeout_s)
        fleet: FleetSnapshot = fleet_f.result()
        metrics: DCGMSnapshot = metrics_f.result()
    timings["fetch_s"] = time.perf_counter() - start
    hosts = needs_detail(fleet, metrics, thresholds)
    if hosts:
        t = time.perf_counter()
        try:
            fetch_dcgm_detail(prometheus_url, metrics, hosts, metric_selector=metric_selector, timeout_s=timeout_s)
        except PrometheusError as exc:
            metrics = DCGMSnapshot.unavailable(thresholds.window, str(exc), metrics.round_trips + 1)
        timings["detail_s"] = time.perf_counter() - t
    t = time.perf_counter()
    result = classify(fleet, metrics, thresholds, cluster=cluster)
    timings["classify_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    result.timings = timings
    return result


def _metrics_or_error(url: str, th: SweepThresholds, metric_selector: str, exporter_job: str,
                      timeout_s: float) -> DCGMSnapshot:
    try:
        return fetch_dcgm(url, th.window, memory_temp_c=th.memory_temp_c,
                          stale_after_s=th.stale_after_s, metric_selector=metric_selector, exporter_job=exporter_job,
                          timeout_s=timeout_s)
    except PrometheusError as exc:
        return DCGMSnapshot.unavailable(th.window, str(exc))


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
        f"{datetime.fromtimestamp(result.at, tz=timezone.utc):%Y-%m-%d %H:%M:%S} UTC, window {result.window}",
        "",
        f"- **Findings:** {counts['critical']} critical, {counts['warning']} warning, {counts['info']} info",
        f"- **Fleet:** {result.gpu_nodes} GPU nodes, {result.gpus_expected} GPUs, {result.gpus_reporting} reporting",
        f"- **Utilisation (window average over reporting GPUs):** {util}; **held by pods:** {result.gpus_held} "
        f"GPUs ({alloc})",
        f"- **GPU status:** {statuses}",
        f"- **Cost:** {result.round_trips} API round trips, {result.timings.get('total_s', 0):.2f}s",
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


def _thresholds(platform_cfg: Any, **overrides: Any) -> SweepThresholds:
    return SweepThresholds.from_config(platform_cfg.thresholds.gpu, **overrides)


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
    metric_selector: str = "",
    exporter_job: str = ".*dcgm.*",
    exporter_selector: str = DEFAULT_EXPORTER_SELECTOR,
    page_size: int = SWEEP_PAGE_SIZE,
) -> Any:
    """Sweep one cluster's GPUs; plan (dry run) or, approved, apply cordons of nodes with critical findings.

    Thresholds come from the platform config (`thresholds.gpu`); any parameter given overrides them.
    """
    logger = get_run_logger()
    plat = Platform(platform)
    cfg = plat.config
    cluster_cfg = cfg.cluster(cluster)
    api = plat.kubernetes(cluster)
    prom = plat.prometheus()
    th = _thresholds(cfg, window=window, temp_c=temp_c, memory_temp_c=memory_temp_c,
                     idle_util_pct=idle_util_pct, stale_after=stale_after)
    share = max_share if max_share is not None else cfg.thresholds.gpu.cordon_max_share
    start = time.perf_counter()

    fleet_f = list_gpu_fleet.submit(api, cluster_cfg, page_size, exporter_selector)
    metrics_f = query_dcgm_metrics.submit(prom, th.window, th.memory_temp_c, th.stale_after_s, metric_selector,
                                          exporter_job)
    fleet: FleetSnapshot = fleet_f.result()  # no node list: nothing to judge, the run fails here
    metrics = _snapshot_or_unknown(metrics_f, th)
    hosts = needs_detail(fleet, metrics, th)
    if hosts:
        detail_f = query_dcgm_details.submit(prom, metrics, hosts, metric_selector)
        metrics = _snapshot_or_unknown(detail_f, th, round_trips=metrics.round_trips + 1)
    result = classify(fleet, metrics, th, cluster=cluster_cfg.name)
    result.timings["total_s"] = time.perf_counter() - start

    plan = plan_cordon(result, fleet.nodes, share)
    publish_sweep_report(platform, result, plan, dry_run)
    logger.info("GPU sweep %s/%s: %s; %s; would cordon %s", platform, cluster_cfg.name, result.status,
                result.counts, plan.nodes or "none")
    summary: dict[str, Any] = {
        "status": result.status, "counts": result.counts, "findings": [f.row() for f in result.findings],
        "gpu_nodes": result.gpu_nodes, "gpus": result.gpus_expected, "gpus_reporting": result.gpus_reporting,
        "fleet_util_pct": result.fleet_util_pct, "round_trips": result.round_trips,
        "cordon_plan": plan.nodes, "cordon_over_cap": [a.node for a in plan.over_cap],
        "cordon_already": plan.already, "dry_run": dry_run, "cordoned": [], "approved_by": None,
    }

    if not dry_run and plan.actions:
        approval = pause_for_approval(plan.markdown(dry_run=False), approval_timeout_s)
        summary["approved_by"] = approval.who()
        if not approval.approve:
            logger.warning("cordon plan rejected by %s: nothing changed", approval.who())
            summary["rejected"] = True
        else:
            note = {"by": "ai-platform-ops gpu-monitoring-sweep", "approved_by": approval.who(),
                    "at": datetime.now(tz=timezone.utc).isoformat(timespec="seconds"), "flow_run": _flow_run_id()}
            changes = cordon_gpu_nodes(api, cluster_cfg, plan.actions, note)
            summary["cordoned"] = [c["node"] for c in changes if c["changed"]]
            evictions = drain_gpu_nodes(api, cluster_cfg, plan.nodes) if drain else []
            summary["evictions"] = evictions
            publish_action_report(platform, cluster_cfg.name, "cordon", approval.who(), changes, evictions)

    if result.metrics_error is not None:
        return Failed(message=f"GPU sweep could not read metrics, every GPU is unknown: {result.metrics_error}",
                      data=summary)
    return summary


def _snapshot_or_unknown(future: Any, th: SweepThresholds, round_trips: int = 0) -> DCGMSnapshot:
    """The Prometheus task's snapshot; when it failed (after its retries), an unavailable one: unknown, not healthy."""
    future.wait()
    if future.state.is_completed():
        return future.result()
    return DCGMSnapshot.unavailable(th.window, _error_of(future.state), round_trips)


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


def _error_of(state: Any) -> str:
    try:
        state.result()
    except BaseException as exc:  # noqa: BLE001 - we report it, never re-raise here
        return f"{type(exc).__name__}: {exc}"
    return state.message or "failed"


@flow(name="gpu-node-uncordon", log_prints=False)
def gpu_node_uncordon(platform: str = "main", nodes: list[str] | None = None, cluster: str | None = None,
                      dry_run: bool = True, force: bool = False, window: str | None = None,
                      approval_timeout_s: int = 3600) -> dict:
    """Return repaired GPU nodes to service: remove the unhealthy taint and annotation, uncordon.

    A fresh sweep must show the node without critical findings and with its exporter reporting
    (`force=True` overrides). Only nodes this project cordoned are touched. Dry run by default; a
    real run pauses for approval.
    """
    logger = get_run_logger()
    plat = Platform(platform)
    cfg = plat.config
    cluster_cfg = cfg.cluster(cluster)
    api = plat.kubernetes(cluster)
    th = _thresholds(cfg, window=window)
    metrics_f = query_dcgm_metrics.submit(plat.prometheus(), th.window, th.memory_temp_c, th.stale_after_s)
    fleet: FleetSnapshot = list_gpu_fleet(api, cluster_cfg)
    metrics = _snapshot_or_unknown(metrics_f, th)
    result = classify(fleet, metrics, th, cluster=cluster_cfg.name)
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
    changes = uncordon_gpu_nodes(api, cluster_cfg, plan.actions)
    summary["uncordoned"] = [c["node"] for c in changes if c["changed"]]
    publish_action_report(platform, cluster_cfg.name, "uncordon", approval.who(), changes, [])
    return summary


__all__ = ["gpu_monitoring_sweep", "gpu_node_uncordon", "sweep", "FINDING_ANNOTATION",
           "UNHEALTHY_TAINT_KEY", "Severity"]
