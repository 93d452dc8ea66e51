"""platform-health-check: every component of the platform checked at once, scored and graded.

Every check runs concurrently under its own timeout (`check_timeout_s`): the Kubernetes API server
(`/readyz?verbose`, `/livez`) and etcd as it reports it; node conditions; system pods in
`system_namespaces`; pending PVCs; the Argo Server and its workflow controller's pods; GitLab's
readiness, liveness and runners; Prometheus and its targets; the registry's `/v2/`; and three results
read from the other lifecycles' latest runs through the Prefect API (the newest verified GitLab backup's
age, the fewest days left on a certificate, the last GPU sweep's critical findings).

The run publishes a report artifact (score 0-100, grade A-F as Popeye grades, each check with its
evidence) and a table, keeps the grade and each check's status in the Prefect Variable
``platform-health-<platform>``, and tells the webhook when the grade drops or a check turns critical,
and again when either recovers. Scoring: `tasks/health.py`; the probes, and `run_check` that runs each under
its timeout: `tasks/health_probes.py`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Completed
from prefect.variables import Variable

from blocks.platform import Platform
from tasks import health_probes as probes
from tasks.etcd_health import etcd_probe as probe_etcd
from tasks.events import emit_critical_findings
from tasks.health import build_report, report_markdown, transitions
from tasks.health_probes import run_check, threaded
from tasks.notify import notify
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table, artifact_key

DEFAULT_NAMESPACES = ("kube-system", "monitoring", "argo", "gitlab-runner")


@flow(name="platform-health-check", log_prints=False)
async def platform_health_check(
    platform: str = "main",
    cluster: str | None = None,
    system_namespaces: list[str] | None = None,
    check_timeout_s: float = 20.0,
    argo_controller_namespace: str = "argo",
    argo_controller_selector: str = "app=workflow-controller",
    backup_warn_hours: float = 26.0,
    backup_critical_hours: float = 48.0,
) -> dict[str, Any]:
    """Check every component concurrently, score and grade the platform, publish a report, notify on change.

    `system_namespaces` (default: kube-system, monitoring, argo, gitlab-runner) are the namespaces whose
    pods must be healthy. Certificate thresholds come from the platform config
    (`thresholds.certificates`).
    """
    logger = get_run_logger()
    plat = await Platform.aopen(platform, "notifier")
    cfg = plat.config
    parts = [p for p, there in (("gitlab_api", cfg.gitlab), ("prometheus", cfg.prometheus), ("argo", cfg.argo),
                                ("registry", cfg.registry)) if there is not None]
    await plat.aprefetch(*parts)
    redactor = Redactor.of(await plat.asecrets())
    api = await asyncio.to_thread(plat.kubernetes, cluster)
    t = check_timeout_s
    namespaces = list(system_namespaces or DEFAULT_NAMESPACES)
    probes_by_name: dict[str, Callable[[], Any]] = {
        "kube-api,etcd": threaded(probes.apiserver_checks, api, t),
        "nodes": threaded(probes.nodes_check, api, t),
        "system-workloads": threaded(probes.workloads_check, api, namespaces, t),
        "pvcs": threaded(probes.pvcs_check, api, t),
        "gitlab-backup-age,certificates,gpu-sweep": lambda: probes.lifecycle_checks(
            platform, cfg.thresholds.certificates.warn_days, cfg.thresholds.certificates.critical_days,
            backup_warn_hours, backup_critical_hours),
    }
    if cfg.argo is not None:
        probes_by_name["argo"] = threaded(probes.argo_check, plat.argo(), api, argo_controller_namespace,
                                           argo_controller_selector, t)
    if cfg.gitlab is not None:
        probes_by_name["gitlab"] = lambda: probes.gitlab_check(plat.gitlab_api(), t)
        probes_by_name["gitlab-runners"] = lambda: probes.runners_check(plat.gitlab_api(), t)
    if cfg.prometheus is not None:
        probes_by_name["prometheus,prometheus-targets"] = lambda: probes.prometheus_checks(plat.prometheus(), t)
    if cfg.registry is not None:
        probes_by_name["registry"] = lambda: probes.registry_check(plat.registry(), t)
    etcd_probe, etcd_names = probe_etcd(platform, plat, redactor)  # etcd itself, over SSH (issue 16)
    if etcd_probe is not None:
        probes_by_name[etcd_names] = etcd_probe
    results = await asyncio.gather(*(run_check(names, probe, t, redactor) for names, probe in probes_by_name.items()))
    report = build_report([c for checks in results for c in checks])

    var_name = artifact_key("platform-health", platform).replace("-", "_")
    previous = await Variable.aget(var_name, default=None)
    notices = transitions(previous if isinstance(previous, dict) else None, report)
    await Variable.aset(var_name, report.state(), overwrite=True)
    await apublish_markdown(f"platform-health-{platform}", report_markdown(platform, report, notices),
                            description=f"Platform health: {report.score}/100, grade {report.grade}")
    await apublish_table(f"platform-health-checks-{platform}", [c.row() for c in report.checks],
                         description="every check, worst first")
    if notices:
        await notify(plat.notifier(), f"platform health {platform}: grade {report.grade} ({report.score}/100)",
                     "\n".join(notices), what="health change notice")
    emit_critical_findings(platform, "platform-health-check", report.critical)  # for the automations' notice
    logger.info("platform %s: score %s, grade %s; critical: %s", platform, report.score, report.grade,
                ", ".join(report.critical) or "none")
    return Completed(message=f"grade {report.grade} ({report.score}/100)"
                     + (f"; critical: {', '.join(report.critical)}" if report.critical else ""),
                     data=report.result())
