"""The certificate reports people read: a summary, a table sorted by expiry, findings, an expiry timeline.

Pure rendering of a `tasks.tls_analysis.CertReport` (markdown text, table rows, a matplotlib figure, and
`report_result`: what the check returns); the flows publish them with `tasks.reports`.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from tasks.reports import md_table
from tasks.tls_analysis import CertEntry, CertReport
from tasks.tls_model import CertInfo

MAX_TIMELINE_ROWS = 40
_COLOURS = {"expired": "#c0392b", "not-yet-valid": "#8e44ad", "critical": "#e74c3c", "warning": "#f39c12",
            "ok": "#27ae60"}


def finding_rows(report: CertReport) -> list[dict[str, Any]]:
    """The findings table (the `tasks.findings` model's fields, the certificate's name and place apart)."""
    return [{"severity": f.severity.value, "finding": f.title, "subject": f.name, "where": f.where,
             "detail": f.summary, "days_left": f.days_left, "advice": f.advice} for f in report.findings]


def certificate_rows(report: CertReport) -> list[dict[str, Any]]:
    """Every distinct certificate, soonest expiry first (leaves and CAs, the kind in a column)."""
    return [e.row() for e in report.entries]


def timer_rows(report: CertReport) -> list[dict[str, Any]]:
    fmt = lambda t: t.strftime("%Y-%m-%d %H:%M") if t else "never"
    return [{"host": t.host, "timer": f"{t.timer_load}/{t.timer_active}/{t.timer_enabled}",
             "last_fired": fmt(t.last_trigger), "next": fmt(t.next_elapse),
             "service": f"{t.service_active} ({t.service_result or '-'}, exit {t.exit_status})"} for t in report.timers]


def summary_markdown(report: CertReport, title: str, stats: dict[str, Any], picture_uri: str | None,
                     warn_days: float, critical_days: float) -> str:
    counts = report.counts()
    leaves, cas = report.leaves, report.cas
    soonest = next((e for e in leaves if e.status not in ("not-yet-valid",)), None)
    lines = [f"# {title}", "",
             (f"**{report.worst().value.upper()}**: {counts['critical']} critical, {counts['unknown']} unknown, "
             f"{counts['warning']} warning findings; {len(leaves)} leaf certificates and {len(cas)} CAs "
             f"(distinct by SHA-256), found in {sum(len(e.places) for e in report.entries)} places."), "",
             (f"Thresholds: warning within {warn_days:g} days, critical within {critical_days:g} days. "
             "`unknown` means a source could not be read: it is not healthy."), ""]
    if soonest:
        lines += [(f"- **Next leaf to expire:** {soonest.cert.common_name or soonest.cert.subject} in "
                  f"{soonest.days_left:.1f} days ({soonest.cert.not_after:%Y-%m-%d}), at {soonest.places[0]}")]
    lines += [f"- **Sources:** {', '.join(f'{k}: {v}' for k, v in stats.items())}", ""]
    if picture_uri:
        lines += [f"![certificate expiry timeline]({picture_uri})", ""]
    worst = [r for r in finding_rows(report) if r["severity"] in ("critical", "unknown")]
    lines += ["## Critical and unknown", "", md_table(worst, ["severity", "finding", "subject", "where", "detail"],
                                                      limit=40)]
    lines += ["## Leaf certificates (soonest first)", "", md_table(_short(leaves), limit=30)]
    lines += ["## Certificate authorities", "",
              ("CAs last ten years and are renewed by another procedure (kubeadm: *Manual rotation of CA "
              "certificates*); they are listed apart."), "", md_table(_short(cas), limit=30)]
    if report.timers:
        lines += ["## k8s-certs-renew.timer", "", md_table(timer_rows(report))]
    return "\n".join(lines)


def _short(entries: list[CertEntry]) -> list[dict[str, Any]]:
    return [{k: e.row()[k] for k in ("expires", "days_left", "status", "subject", "chain", "key", "places", "where")}
            for e in entries]


def timeline_figure(report: CertReport, warn_days: float, critical_days: float) -> Any:
    """Expiry dates on a time axis: one bar per certificate from now (or its start) to its expiry, coloured
    by status, CAs hatched; the warning and critical horizons drawn. At most MAX_TIMELINE_ROWS rows: the
    soonest to expire (the rest are in the table)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.dates as mdates
    import matplotlib.pyplot as plt

    entries = report.entries[:MAX_TIMELINE_ROWS]
    now = report.now
    fig, ax = plt.subplots(figsize=(9, 1.2 + 0.24 * max(1, len(entries))))
    horizon = now + timedelta(days=400)
    for row, e in enumerate(entries):
        start = max(e.cert.not_before, now - timedelta(days=30))
        end = min(e.cert.not_after, horizon)
        width = max((end - start).total_seconds() / 86400.0, 0.5)
        ax.barh(row, width, left=mdates.date2num(start), color=_COLOURS.get(e.status, "#7f8c8d"),
                hatch="//" if e.is_ca else None, edgecolor="white", height=0.7)
        ax.plot(mdates.date2num(e.cert.not_after) if e.cert.not_after <= horizon else mdates.date2num(horizon),
                row, marker="|", color="black")
    ax.axvline(mdates.date2num(now), color="black", linewidth=1)
    ax.axvline(mdates.date2num(now + timedelta(days=critical_days)), color=_COLOURS["critical"], linestyle="--",
               linewidth=1, label=f"critical ({critical_days:g} d)")
    ax.axvline(mdates.date2num(now + timedelta(days=warn_days)), color=_COLOURS["warning"], linestyle="--",
               linewidth=1, label=f"warning ({warn_days:g} d)")
    ax.set_yticks(range(len(entries)))
    ax.set_yticklabels([_label(e) for e in entries], fontsize=6)
    ax.invert_yaxis()
    ax.xaxis_date()
    ax.xaxis.set_major_formatter(mdates.DateFormatter("%Y-%m"))
    ax.set_title(f"Certificate expiry (soonest {len(entries)} of {len(report.entries)}; hatched: CA)", fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def _label(e: CertEntry) -> str:
    name = e.cert.common_name or e.cert.subject
    where = e.places[0].split(" (")[0] if e.places else ""
    text = f"{name[:28]} @ {where[-34:]}"
    return text + (f" +{len(e.places) - 1}" if len(e.places) > 1 else "")


def report_result(report: CertReport, stats: dict[str, Any]) -> dict[str, Any]:
    """What the certificate check returns (plain data, no certificate bytes)."""
    return {
        "worst": report.worst(), "counts": report.counts(), "stats": stats,
        "certificates": [{**e.row(), "fingerprint": e.cert.fingerprint, "not_after": e.cert.not_after.isoformat(),
                          "places": e.places} for e in report.entries],
        "findings": finding_rows(report),
        "timers": [{"host": t.host, "last_trigger": t.last_trigger.isoformat() if t.last_trigger else None,
                    "service": t.service_active, "result": t.service_result} for t in report.timers],
    }


def cert_rows(label: str, certs: dict[str, CertInfo], now: datetime) -> list[dict[str, Any]]:
    """One host's certificates as plan rows: serial, expiry, days left."""
    return [{"host": label, "certificate": name, "serial": c.serial[:16], "expires": f"{c.not_after:%Y-%m-%d %H:%M}",
             "days left": round(c.days_left(now), 1)} for name, c in certs.items()]
