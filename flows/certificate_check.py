"""Certificate check (daily): every certificate the platform depends on, how long each has left.

Four sources are gathered concurrently, each within its own timeout, so a hung endpoint or a host that
is down costs its timeout and is reported as `unknown`, while the rest of the scan carries on:

- the cluster's control-plane and etcd hosts over SSH (`tasks/tls.py` `scan_hosts_task`): the PKI
  folders of kubeadm and kubespray, the kubeconfigs with embedded client certificates, the kubelet's
  rotating client certificate, and kubespray's `k8s-certs-renew.timer` and its service;
- live TLS endpoints (API servers, etcd and the events cluster, GitLab, the registry, Argo, ingress
  hosts): the chain actually served, through a real handshake with SNI set;
- Kubernetes secrets of type `kubernetes.io/tls` and Opaque ones holding `tls.crt`, in pages;
- the kubeconfigs named by the platform config.

`tasks/tls_analysis.py` says what it all means; the run leaves a summary with an expiry timeline, a
table of every certificate sorted by expiry, and a table of findings. The run fails (and notifies the
webhook) when there are critical or unknown findings, unless `fail_on` says otherwise.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any, Literal

from prefect import flow, get_run_logger
from prefect.states import Completed, Failed

from blocks.platform import Platform
from tasks.findings import Severity, notice_text
from tasks.notify import notify
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table, png_data_uri
from tasks.tls import (
    Gathered,
    endpoint_targets,
    kubeconfigs_task,
    probe_endpoints_task,
    scan_hosts_task,
    tls_secrets_task,
)
from tasks.tls_analysis import CertReport, analyse
from tasks.tls_model import SourceProblem
from tasks.tls_report import (
    certificate_rows,
    finding_rows,
    summary_markdown,
    timeline_figure,
)


def _source_failed(source: str, exc: BaseException, redactor: Redactor) -> Gathered:
    return Gathered(source, problems=[SourceProblem(source, f"{source} source", "error", redactor.error(exc))])


async def gather_certificates(plat: Platform, cluster: str | None, redactor: Redactor,
                              page_size: int | None = None) -> tuple[list[Gathered], dict[str, Any]]:
    """Every source, concurrently; each source's failure is a `SourceProblem`, never an exception."""
    cfg = plat.config
    cl = cfg.cluster(cluster)
    c, t = cfg.certificates, cfg.certificates.timeouts

    async def hosts() -> Gathered:
        blocks = await asyncio.to_thread(plat.cluster_hosts, cl.name)
        return await scan_hosts_task(blocks, c.layout, t.ssh_s, t.source_s, redactor)

    async def secrets() -> Gathered:
        api = await asyncio.to_thread(plat.kubernetes, cl.name)
        return await tls_secrets_task(api, page_size or c.page_size, list(c.secret_namespaces), t.source_s, redactor)

    targets = endpoint_targets(cfg, cl)
    kubeconfigs = [str(k.path) for k in c.kubeconfigs]
    names = ("host", "endpoint", "secret", "kubeconfig")
    results = await asyncio.gather(hosts(), probe_endpoints_task(targets, t.endpoint_s, t.source_s), secrets(),
                                   kubeconfigs_task(kubeconfigs), return_exceptions=True)
    gathered = [r if isinstance(r, Gathered) else _source_failed(n, r, redactor) for n, r in zip(names, results)]
    stats = {"hosts": len(cl.control_plane) + len(cl.etcd), "endpoints": len(targets),
             "TLS secrets": next((g.stats.get("secrets", 0) for g in gathered if g.source == "secret"), 0),
             "secret listing round trips": next((g.stats.get("round_trips", 0) for g in gathered
                                                 if g.source == "secret"), 0),
             "kubeconfigs": len(kubeconfigs)}
    return gathered, stats


def report_result(report: CertReport, stats: dict[str, Any]) -> dict[str, Any]:
    """What the run returns (plain data, no certificate bytes)."""
    return {
        "worst": report.worst(), "counts": report.counts(), "stats": stats,
        "certificates": [{**e.row(), "fingerprint": e.cert.fingerprint, "not_after": e.cert.not_after.isoformat(),
                          "places": e.places} for e in report.entries],
        "findings": finding_rows(report),
        "timers": [{"host": t.host, "last_trigger": t.last_trigger.isoformat() if t.last_trigger else None,
                    "service": t.service_active, "result": t.service_result} for t in report.timers],
    }


@flow(name="certificate-check", log_prints=False)
async def certificate_check(platform: str = "main", cluster: str | None = None,
                            fail_on: Literal["critical", "unknown", "never"] = "critical",
                            warn_days: int | None = None, critical_days: int | None = None,
                            page_size: int | None = None) -> dict[str, Any]:
    """Check every certificate of one cluster and the platform around it.

    fail_on: `critical` (default) fails the run on critical or unknown findings, `unknown` only on unknown
    ones (a source that could not be read), `never` always completes with the report."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, "notifier")
    cfg = plat.config
    thresholds = cfg.thresholds.certificates
    warn = warn_days if warn_days is not None else thresholds.warn_days
    critical = critical_days if critical_days is not None else thresholds.critical_days
    redactor = Redactor.of(await plat.asecrets())
    gathered, stats = await gather_certificates(plat, cluster, redactor, page_size)
    layout = cfg.certificates.layout
    report = analyse([s for g in gathered for s in g.sightings], [p for g in gathered for p in g.problems],
                     [t for g in gathered for t in g.timers], now=datetime.now(UTC), warn_days=warn,
                     critical_days=critical, timer_max_age_days=cfg.certificates.timer_max_age_days,
                     timer_unit=layout.renew_timer, service_unit=layout.renew_service)
    figure = await asyncio.to_thread(timeline_figure, report, warn, critical)
    picture = png_data_uri(figure)
    import matplotlib.pyplot as plt

    plt.close(figure)
    name = cfg.cluster(cluster).name
    title = f"Certificates: {platform} / {name}"
    await apublish_markdown(f"certificate-check-{platform}-{name}", redactor.text(
        summary_markdown(report, title, stats, picture, warn, critical)), description=title)
    await apublish_table(f"certificate-table-{platform}-{name}", redactor.value(certificate_rows(report)),
                         description="every certificate, soonest expiry first")
    await apublish_table(f"certificate-findings-{platform}-{name}", redactor.value(finding_rows(report)),
                         description="findings, most severe first")
    result = redactor.value(report_result(report, stats))
    counts = report.counts()
    logger.info("%s: %s critical, %s unknown, %s warning; %s certificates", title, counts["critical"],
                counts["unknown"], counts["warning"], len(report.entries))
    failing = {"critical": counts["critical"] + counts["unknown"], "unknown": counts["unknown"], "never": 0}[fail_on]
    if failing:
        message = (f"{counts['critical']} critical and {counts['unknown']} unknown certificate findings on "
                   f"{platform}/{name}; see the certificate-check report")
        counted = (Severity.CRITICAL, Severity.UNKNOWN) if fail_on == "critical" else (Severity.UNKNOWN,)
        failed = [f for f in report.findings if f.severity in counted]  # the notice lists them, worst first
        await notify(plat.notifier(), f"certificate check failed: {platform}/{name}",
                     redactor.text(f"{message}\n\n{notice_text(failed)}"))
        return Failed(message=message, data=result)
    return Completed(message=f"{len(report.entries)} certificates checked", data=result)
