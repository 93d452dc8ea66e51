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

The sweep is `tasks.gpu_sweep`, the report `tasks.gpu_pictures`, the cordon and uncordon plans and operations
`tasks.gpu_plans`, the commit notes `tasks.gpu_training_notes`; this module only composes them.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import State

from blocks.platform import Platform
from tasks.events import emit_critical_findings
from tasks.gpu_model import SweepSettings
from tasks.gpu_pictures import publish_sweep_report
from tasks.gpu_plans import (
    CordonPlan,
    UncordonPlan,
    cordon_operation,
    manual_cordon_plan,
    plan_cordon,
    plan_uncordon,
    uncordon_operation,
)
from tasks.gpu_sweep import sweep_with_tasks
from tasks.gpu_training_notes import note_gpu_faults_on_commits
from tasks.kubernetes import list_gpu_fleet
from tasks.operation import run_operation_sync


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
    cluster_cfg = cfg.cluster(cluster)
    settings = SweepSettings.from_config(cfg, cluster_cfg, window=window, temp_c=temp_c, memory_temp_c=memory_temp_c,
                                         idle_util_pct=idle_util_pct, stale_after=stale_after,
                                         metric_selector=metric_selector, exporter_jobs=exporter_jobs,
                                         exporter_selectors=exporter_selectors, page_size=page_size,
                                         metrics_source=metrics_source)
    api = plat.kubernetes(cluster)
    share = max_share if max_share is not None else cfg.thresholds.gpu.cordon_max_share
    # no node list: nothing to judge, the run fails here
    result, fleet = sweep_with_tasks(plat.prometheus(), api, settings)

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
        summary["training_notes"] = note_gpu_faults_on_commits(platform, result, argo=plat.argo,
                                                               gitlab_api=plat.gitlab_api, secrets=plat.secrets)
    if result.metrics_error is not None:
        raise RuntimeError(f"GPU sweep could not read metrics, every GPU is unknown: {result.metrics_error}")

    swept = [plan]  # the plan just made; after the approval the planner sweeps again (live nodes and findings)

    def plan_now() -> CordonPlan:
        if swept:
            return swept.pop()
        r, f = sweep_with_tasks(plat.prometheus(), api, settings)
        return plan_cordon(r, f.nodes, share)

    op = cordon_operation(platform, cfg, api, cluster_cfg, plan_now, drain=drain,
                          approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                          by="ai-platform-ops gpu-monitoring-sweep")
    record = run_operation_sync(op, dry_run=dry_run)
    if isinstance(record, State):  # cancelled during the apply
        return record
    record["sweep"] = summary
    return record


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
    settings = dataclasses.replace(SweepSettings.from_config(plat.config, cluster_cfg, window=window),
                                   xid_baseline="cordon")
    if cordon:
        def cordon_now() -> CordonPlan:
            return manual_cordon_plan(nodes or [], list_gpu_fleet(api, settings))

        op = cordon_operation(platform, plat.config, api, cluster_cfg, cordon_now, drain=False,
                              approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s,
                              by="ai-platform-ops gpu-node-uncordon cordon=true", name="gpu-node-uncordon")
        return run_operation_sync(op, dry_run=dry_run)

    def plan_now() -> tuple[UncordonPlan, Any]:
        result, fleet = sweep_with_tasks(plat.prometheus(), api, settings)
        return plan_uncordon(nodes or [], fleet.nodes, result, force=force), result

    op = uncordon_operation(platform, plat.config, api, cluster_cfg, plan_now,
                            approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s)
    return run_operation_sync(op, dry_run=dry_run)
