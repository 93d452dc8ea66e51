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
and again when either recovers. Scoring: `tasks/health.py`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed
from prefect.variables import Variable

from blocks.platform import Platform
from tasks import health_probes as probes
from tasks.etcd_health import etcd_probe as probe_etcd
from tasks.events import emit_critical_findings
from tasks.health import Check, build_report, report_markdown, transitions, unknown
from tasks.notify import notify
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table, artifact_key

DEFAULT_NAMESPACES = ("kube-system", "monitoring", "argo", "gitlab-runner")
# A check whose own component gives no answer in time is critical (the component is down for us);
# the other checks read through a source, and a silent source makes them unknown.
_COMPONENTS = {"kube-api", "argo", "gitlab", "prometheus", "registry"}


@task(name="health-check", task_run_name="check-{names}", cache_policy=NONE, persist_result=False)
async def run_check(names: str, probe: Callable[[], Any], timeout_s: float, redactor: Redactor) -> list[Check]:
    """Run one probe (sync probes in a thread) under `timeout_s`; whatever goes wrong is that check's evidence."""
    started = time.monotonic()
    try:
        result = probe()
        if asyncio.iscoroutine(result):
            out = await asyncio.wait_for(result, timeout_s)
        else:
            out = result
    except TimeoutError:
        out = [Check(n, "critical" if n in _COMPONENTS else "unknown", f"no answer within {timeout_s:g} s",
                     [f"timeout {timeout_s:g} s"]) for n in names.split(",")]
    except Exception as exc:  # noqa: BLE001 - a probe that breaks makes its checks unknown, never ok
        out = [unknown(n, redactor.error(exc)[:300]) for n in names.split(",")]
    checks = list(out) if isinstance(out, (list, tuple)) else [out]
    for c in checks:
        c.seconds = time.monotonic() - started
        c.summary, c.evidence = redactor.text(c.summary), [redactor.text(e) for e in c.evidence]
    return checks


def _threaded(fn: Callable[..., Any], *args: Any) -> Callable[[], Any]:
    return lambda: asyncio.to_thread(fn, *args)


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
        "kube-api,etcd": _threaded(probes.apiserver_checks, api, t),
        "nodes": _threaded(probes.nodes_check, api, t),
        "system-workloads": _threaded(probes.workloads_check, api, namespaces, t),
        "pvcs": _threaded(probes.pvcs_check, api, t),
        "gitlab-backup-age,certificates,gpu-sweep": lambda: probes.lifecycle_checks(
            platform, cfg.thresholds.certificates.warn_days, cfg.thresholds.certificates.critical_days,
            backup_warn_hours, backup_critical_hours),
    }
    if cfg.argo is not None:
        probes_by_name["argo"] = _threaded(probes.argo_check, plat.argo(), api, argo_controller_namespace,
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
