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

`tasks/tls.py` `gather_certificates` reads the four; `tasks/tls_analysis.py` says what it all means; the
run leaves a summary with an expiry timeline, a table of every certificate sorted by expiry, and a table of
findings (`tasks/tls_report.py`). The run fails (and notifies the webhook) when there are critical or
unknown findings, unless `fail_on` says otherwise.
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
from tasks.tls import gather_certificates
from tasks.tls_analysis import analyse
from tasks.tls_report import (
    certificate_rows,
    finding_rows,
    report_result,
    summary_markdown,
    timeline_figure,
)


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
    cl = cfg.cluster(cluster)
    gathered, stats = await gather_certificates(cfg, cl, plat.cluster_hosts, plat.kubernetes, redactor, page_size)
    layout = cfg.certificates.layout
    report = analyse([s for g in gathered for s in g.sightings], [p for g in gathered for p in g.problems],
                     [t for g in gathered for t in g.timers], now=datetime.now(UTC), warn_days=warn,
                     critical_days=critical, timer_max_age_days=cfg.certificates.timer_max_age_days,
                     timer_unit=layout.renew_timer, service_unit=layout.renew_service)
    figure = await asyncio.to_thread(timeline_figure, report, warn, critical)
    picture = png_data_uri(figure)
    import matplotlib.pyplot as plt

    plt.close(figure)
    name = cl.name
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
