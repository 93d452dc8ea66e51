"""The platform health check's pure side: what each answer means, the score, the grade, the transitions.

Every function here takes plain data (what the probes in `tasks.health_probes` fetched) and returns a
`Check`: a status (ok, warning, critical, unknown: a `tasks.findings.Severity`, info reading as ok) and
its evidence. A component whose analysis gives findings (etcd, the certificates, the GPU sweep) gets its
check from them (`Check.from_findings`): its status is their worst severity in the one `Severity` order
(ok < info < warning < unknown < critical). No Prefect, no network.

Scoring, in Popeye's style (a 0-100 score over every linter, a letter grade; popeye `pkg/report`):
each check has a weight (`WEIGHTS`: the API server, etcd and the nodes weigh most); a check earns its
full weight when ok, half when warning, nothing when critical or unknown (unknown is never healthy).
The score is the earned share of the total, rounded down. A critical check caps the score at
`CRITICAL_CAP` (69, grade D), so that one broken component always shows in the grade however many
others are fine. Grades: A >= 90, B >= 80, C >= 70, D >= 60, E >= 50, F below (Popeye's letters).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from tasks.findings import Finding, Severity

STATUSES = (Severity.OK, Severity.WARNING, Severity.UNKNOWN, Severity.CRITICAL)  # what a check can show
_EARN = {Severity.OK: 1.0, Severity.WARNING: 0.5, Severity.CRITICAL: 0.0, Severity.UNKNOWN: 0.0}
CRITICAL_CAP = 69
GRADES = (("A", 90), ("B", 80), ("C", 70), ("D", 60), ("E", 50), ("F", 0))
WEIGHTS: dict[str, int] = {
    "kube-api": 3, "etcd": 3, "nodes": 3, "system-workloads": 2, "pvcs": 1, "argo": 1, "gitlab": 2,
    "gitlab-runners": 1, "prometheus": 2, "prometheus-targets": 1, "registry": 2, "gitlab-backup-age": 2,
    "certificates": 2, "gpu-sweep": 1,
}


@dataclass
class Check:
    """One component's verdict. `status` is always a `Severity` (text is read as one, info as ok)."""

    name: str
    status: Severity
    summary: str
    evidence: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def __setattr__(self, key: str, value: Any) -> None:
        if key == "status":
            value = Severity(value).status  # a typo raises; info reads as ok; unknown stays unknown
        object.__setattr__(self, key, value)

    @classmethod
    def from_findings(cls, name: str, findings: Sequence[Finding], *, summary: str | None = None,
                      evidence: list[str] | None = None, subjects: bool = True,
                      empty: Severity = Severity.UNKNOWN) -> Check:
        """The check of a component from its findings: the worst severity (no findings at all: `empty`,
        unknown unless said otherwise); by default the unhealthy findings' summaries (else the first
        three) as summary and one line per finding (`Finding.line`, without the subject when
        `subjects` is False) as evidence."""
        status = Severity.worst((f.severity for f in findings), default=empty)
        if summary is None:
            bad = [f for f in findings if not f.severity.healthy]
            summary = "; ".join(f.summary for f in (bad or findings[:3]))[:400]
        if evidence is None:
            evidence = [f.line(subject=subjects) for f in findings]
        return cls(name, status, summary, evidence)

    def row(self) -> dict[str, Any]:
        return {"check": self.name, "status": self.status.value, "summary": self.summary,
                "evidence": "; ".join(self.evidence[:8]) + (f" (+{len(self.evidence) - 8} more)"
                                                            if len(self.evidence) > 8 else ""),
                "seconds": round(self.seconds, 2)}


def unknown(name: str, error: str) -> Check:
    """A check whose source could not be read: unknown, with the reason as evidence."""
    return Check(name, "unknown", f"could not read the source: {error}", [error])


def worst(*statuses: Severity | str) -> Severity:
    return Severity.worst(statuses)


# --- the score --------------------------------------------------------------------------------


def grade_of(score: int) -> str:
    return next(letter for letter, floor in GRADES if score >= floor)


def score(checks: list[Check]) -> int:
    """0-100: the weighted share of checks that are ok (warning half), capped when one is critical."""
    total = sum(WEIGHTS.get(c.name, 1) for c in checks)
    if not total:
        return 0
    earned = sum(WEIGHTS.get(c.name, 1) * _EARN[c.status] for c in checks)
    value = math.floor(100 * earned / total)
    if any(c.status == "critical" for c in checks):
        value = min(value, CRITICAL_CAP)
    return value


@dataclass
class HealthReport:
    checks: list[Check]
    score: int
    grade: str

    @property
    def healthy(self) -> bool:
        return self.grade in ("A", "B") and not self.critical

    @property
    def critical(self) -> list[str]:
        return [c.name for c in self.checks if c.status == "critical"]

    def counts(self) -> dict[str, int]:
        out = {s.value: 0 for s in STATUSES}
        for c in self.checks:
            out[c.status.value] += 1
        return out

    def state(self) -> dict[str, Any]:
        """What the next run compares itself with (kept in a Prefect Variable)."""
        return {"score": self.score, "grade": self.grade, "checks": {c.name: c.status.value for c in self.checks}}

    def result(self) -> dict[str, Any]:
        return {**self.state(), "healthy": self.healthy, "critical": self.critical,
                "details": [{**asdict(c), "status": c.status.value} for c in self.checks]}


def build_report(checks: list[Check]) -> HealthReport:
    ordered = sorted(checks, key=lambda c: (-c.status.rank, c.name))
    value = score(ordered)
    return HealthReport(ordered, value, grade_of(value))


def transitions(previous: dict[str, Any] | None, report: HealthReport) -> list[str]:
    """What the webhook hears: the grade dropping or rising, checks turning critical or recovering.

    `previous` is the last run's `state()` (None on the first run: only critical checks are news).
    """
    prev_grade = (previous or {}).get("grade")
    prev_checks: dict[str, str] = (previous or {}).get("checks") or {}
    out = []
    if prev_grade and report.grade != prev_grade:
        verb = "dropped" if report.grade > prev_grade else "recovered"
        out.append(f"grade {verb}: {prev_grade} -> {report.grade} (score {report.score})")
    for c in report.checks:
        before = prev_checks.get(c.name)
        if c.status == "critical" and before != "critical":
            out.append(f"{c.name} is CRITICAL: {c.summary}")
        elif before == "critical" and c.status != "critical":
            out.append(f"{c.name} recovered ({c.status}): {c.summary}")
    return out


def report_markdown(platform: str, report: HealthReport, notices: list[str]) -> str:
    icon = {"ok": "OK", "warning": "WARN", "critical": "CRIT", "unknown": "UNKNOWN"}
    lines = [f"# Platform health: {platform}", "",
             (f"**Score {report.score}/100, grade {report.grade}** "
              f"({'healthy' if report.healthy else 'NOT healthy'})"), "",
             "- " + ", ".join(f"{n} {s}" for s, n in report.counts().items()), ""]
    if report.critical:
        lines += [f"**Critical:** {', '.join(report.critical)}", ""]
    if notices:
        lines += ["## Changes since the last run", ""] + [f"- {n}" for n in notices] + [""]
    lines += ["## Checks", "", "| check | status | summary | evidence |", "|---|---|---|---|"]
    esc = lambda v: str(v).replace("|", "\\|").replace("\n", " ")
    for c in report.checks:
        ev = "; ".join(c.evidence[:5]) + (f" (+{len(c.evidence) - 5} more)" if len(c.evidence) > 5 else "")
        lines.append(f"| {c.name} | {icon[c.status]} | {esc(c.summary)} | {esc(ev)} |")
    lines += ["", "Score: each check earns its weight when ok, half when warning, nothing when critical or "
              f"unknown; any critical check caps the score at {CRITICAL_CAP}. Weights: "
              + ", ".join(f"{k} {v}" for k, v in WEIGHTS.items()) + "."]
    return "\n".join(lines) + "\n"


# --- what each answer means -------------------------------------------------------------------


def parse_healthz(text: str) -> dict[str, bool]:
    """The `[+]name ok` / `[-]name failed` lines of a verbose `/readyz` or `/livez` (k8s.io/apiserver healthz)."""
    out = {}
    for line in text.splitlines():
        m = re.match(r"^\[([+-])\](\S+)", line.strip())
        if m:
            out[m.group(2)] = m.group(1) == "+"
    return out


def analyse_apiserver(readyz: tuple[int, str], livez: tuple[int, str]) -> tuple[Check, Check]:
    """The API server check (readyz and livez) and etcd as the API server reports it (readyz's `etcd`)."""
    (rcode, rtext), (lcode, _ltext) = readyz, livez
    checks = parse_healthz(rtext)
    failed = [n for n, ok in checks.items() if not ok]
    ev = [f"/readyz HTTP {rcode}", f"/livez HTTP {lcode}"] + [f"[-]{n}" for n in failed]
    if rcode == 200 and lcode == 200:
        api = Check("kube-api", "ok", f"ready and live ({len(checks)} readyz checks pass)", ev)
    elif lcode == 200:
        api = Check("kube-api", "critical", f"live but not ready: {', '.join(failed) or rtext.strip()[:80]}", ev)
    else:
        api = Check("kube-api", "critical", f"not live (HTTP {lcode})", ev)
    etcd_checks = {n: ok for n, ok in checks.items() if n == "etcd" or n.startswith("etcd-")}
    if not etcd_checks:
        etcd = Check("etcd", "unknown", "the API server's /readyz?verbose lists no etcd check", ev[:1])
    elif all(etcd_checks.values()):
        etcd = Check("etcd", "ok", "the API server reaches etcd", [f"[+]{n}" for n in etcd_checks])
    else:
        etcd = Check("etcd", "critical", "the API server cannot reach etcd",
                     [f"[-]{n}" for n, ok in etcd_checks.items() if not ok])
    return api, etcd


PRESSURES = ("MemoryPressure", "DiskPressure", "PIDPressure")


def analyse_nodes(nodes: list[dict[str, Any]]) -> Check:
    """Nodes not Ready (critical) and nodes under memory, disk or PID pressure (warning)."""
    if not nodes:
        return Check("nodes", "unknown", "the API listed no nodes")
    not_ready, pressure = [], []
    for n in nodes:
        name = (n.get("metadata") or {}).get("name", "?")
        conds = {c.get("type"): c for c in (n.get("status") or {}).get("conditions") or []}
        ready = conds.get("Ready", {})
        if ready.get("status") != "True":
            not_ready.append(f"{name}: Ready={ready.get('status', 'missing')} {ready.get('reason') or ''}".strip())
        for p in PRESSURES:
            if (conds.get(p) or {}).get("status") == "True":
                pressure.append(f"{name}: {p}")
    ev = not_ready + pressure
    if not_ready:
        return Check("nodes", "critical", f"{len(not_ready)} of {len(nodes)} nodes not Ready"
                     + (f", {len(pressure)} under pressure" if pressure else ""), ev)
    if pressure:
        return Check("nodes", "warning", f"{len(pressure)} node conditions under pressure", ev)
    return Check("nodes", "ok", f"{len(nodes)} nodes Ready, none under pressure")


def _ts(value: str | None) -> datetime | None:
    if not value:
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def pod_problems(pod: dict[str, Any], now: datetime, *, max_restarts: int = 5,
                 restart_window: timedelta = timedelta(hours=1),
                 pending_for: timedelta = timedelta(minutes=10)) -> list[tuple[Severity, str]]:
    """A system pod's problems: CrashLoopBackOff, more than `max_restarts` restarts within the window (the
    last restart inside it: Kubernetes keeps a count, not a history), not ready, Pending too long."""
    meta, status = pod.get("metadata") or {}, pod.get("status") or {}
    name = f"{meta.get('namespace')}/{meta.get('name')}"
    phase = status.get("phase")
    if phase in ("Succeeded",):
        return []
    out: list[tuple[Severity, str]] = []
    if phase == "Pending":
        created = _ts(meta.get("creationTimestamp"))
        if created and now - created > pending_for:
            out.append(("critical", f"{name}: Pending for {int((now - created).total_seconds() // 60)} min"))
        return out
    ready = True
    for cs in status.get("containerStatuses") or []:
        waiting = (cs.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") == "CrashLoopBackOff":
            out.append(("critical", f"{name}: {cs.get('name')} CrashLoopBackOff"))
        restarts = int(cs.get("restartCount") or 0)
        last = _ts(((cs.get("lastState") or {}).get("terminated") or {}).get("finishedAt"))
        if restarts > max_restarts and (last is None or now - last <= restart_window):
            window_min = int(restart_window.total_seconds() // 60)
            out.append(("warning", f"{name}: {cs.get('name')} restarted {restarts} times (last within {window_min} min)"))
        ready = ready and bool(cs.get("ready"))
    if phase == "Failed" or (phase == "Running" and not ready and not out):
        out.append(("warning", f"{name}: {phase}, not ready"))
    return out


def analyse_workloads(pods_by_ns: dict[str, list[dict[str, Any]]], now: datetime, **limits: Any) -> Check:
    problems = [p for pods in pods_by_ns.values() for pod in pods for p in pod_problems(pod, now, **limits)]
    counts = ", ".join(f"{ns} {len(p)}" for ns, p in pods_by_ns.items())
    if not problems:
        return Check("system-workloads", "ok", f"every system pod healthy ({counts})")
    status = worst(*(s for s, _ in problems))
    return Check("system-workloads", status, f"{len(problems)} problems in system pods ({counts})",
                 [e for _, e in sorted(problems, key=lambda p: -Severity(p[0]).rank)])


def analyse_pvcs(pvcs: list[dict[str, Any]], now: datetime, pending_for: timedelta = timedelta(minutes=10)) -> Check:
    """PVCs Pending for longer than `pending_for` (warning), Lost (critical)."""
    lost, pending = [], []
    for pvc in pvcs:
        meta = pvc.get("metadata") or {}
        name, phase = f"{meta.get('namespace')}/{meta.get('name')}", (pvc.get("status") or {}).get("phase")
        created = _ts(meta.get("creationTimestamp"))
        if phase == "Lost":
            lost.append(f"{name}: Lost")
        elif phase == "Pending" and (created is None or now - created > pending_for):
            pending.append(f"{name}: Pending")
    if lost:
        return Check("pvcs", "critical", f"{len(lost)} PVCs Lost, {len(pending)} pending", lost + pending)
    if pending:
        return Check("pvcs", "warning", f"{len(pending)} PVCs pending", pending)
    return Check("pvcs", "ok", f"{len(pvcs)} PVCs, none pending")


def analyse_argo(version: tuple[int, Any], controllers: list[dict[str, Any]]) -> Check:
    """The Argo Server answering `/api/v1/version` and the workflow controller's pods Running and ready."""
    code, body = version
    ev = [f"argo-server /api/v1/version HTTP {code}" + (f" {body.get('version')}" if isinstance(body, dict) else "")]
    ready = [p for p in controllers if (p.get("status") or {}).get("phase") == "Running"
             and all(cs.get("ready") for cs in (p.get("status") or {}).get("containerStatuses") or [{}])]
    ev.append(f"workflow-controller pods: {len(ready)} ready of {len(controllers)}")
    if code != 200:
        return Check("argo", "critical", f"the Argo Server answers HTTP {code}", ev)
    if not controllers:
        return Check("argo", "warning", "no workflow-controller pods found", ev)
    if not ready:
        return Check("argo", "critical", "no workflow-controller pod is ready", ev)
    return Check("argo", "ok", f"server {ev[0].split()[-1]}, {len(ready)} controller pods ready", ev)


def analyse_gitlab(readiness: tuple[int, Any], liveness: tuple[int, Any]) -> Check:
    """`/-/readiness?all=1` and `/-/liveness` (GitLab health check docs: 200 with status ok, else 503)."""
    (rc, rb), (lc, _lb) = readiness, liveness
    failed = []
    if isinstance(rb, dict):
        for name, results in rb.items():
            if name.endswith("_check") and isinstance(results, list):
                failed += [f"{name}: {r.get('status')} {r.get('message') or ''}".strip()
                           for r in results if isinstance(r, dict) and r.get("status") != "ok"]
    ev = [f"/-/readiness?all=1 HTTP {rc}", f"/-/liveness HTTP {lc}"] + failed
    if lc != 200:
        return Check("gitlab", "critical", f"GitLab is not live (HTTP {lc})", ev)
    if rc != 200 or failed:
        return Check("gitlab", "critical", f"GitLab is not ready: {', '.join(failed) or f'HTTP {rc}'}", ev)
    return Check("gitlab", "ok", "ready and live", ev)


def analyse_runners(runners: list[dict[str, Any]]) -> Check:
    """Runners from `GET /runners/all`: online and not paused is serving; none serving is critical."""
    if not runners:
        return Check("gitlab-runners", "warning", "GitLab has no runners registered")
    serving = [r for r in runners if r.get("status") == "online" and not r.get("paused")]
    bad = [f"{r.get('description') or r.get('id')}: {r.get('status')}{' (paused)' if r.get('paused') else ''}"
           for r in runners if r not in serving]
    if not serving:
        return Check("gitlab-runners", "critical", f"none of {len(runners)} runners is online", bad)
    if bad:
        return Check("gitlab-runners", "warning", f"{len(bad)} of {len(runners)} runners not serving", bad)
    return Check("gitlab-runners", "ok", f"{len(runners)} runners online")


def analyse_targets(active: list[dict[str, Any]], critical_share: float = 0.5) -> Check:
    """Prometheus' active targets (`/api/v1/targets`): any down is a warning, half or more a critical (targets
    not scraped yet count as neither)."""
    if not active:
        return Check("prometheus-targets", "unknown", "Prometheus has no active targets")
    # Prometheus says "unknown" for a target it has not scraped yet (just started or just discovered):
    # not down, but not evidence of up either
    down = [t for t in active if t.get("health") == "down"]
    if not down and all(t.get("health") == "unknown" for t in active):
        return Check("prometheus-targets", "unknown", f"none of {len(active)} targets scraped yet")
    ev = [f"{(t.get('labels') or {}).get('job', '?')} {t.get('scrapeUrl', '')}: {t.get('health')} "
          f"{t.get('lastError') or ''}".strip() for t in down]
    if not down:
        up = sum(t.get("health") == "up" for t in active)
        return Check("prometheus-targets", "ok", f"{up} targets up" + (f", {len(active) - up} not scraped yet"
                                                                       if up < len(active) else ""))
    status = Severity.CRITICAL if len(down) >= critical_share * len(active) else Severity.WARNING
    return Check("prometheus-targets", status, f"{len(down)} of {len(active)} targets down", ev)


def analyse_backup_age(finished_at: datetime | None, run_name: str | None, now: datetime,
                       warn: timedelta = timedelta(hours=26), critical: timedelta = timedelta(hours=48)) -> Check:
    """Age of the newest verified backup: the end of the latest completed `gitlab-backup` run (a run that
    completes has verified its copy; a failed one raises)."""
    if finished_at is None:
        return Check("gitlab-backup-age", "unknown", "no completed gitlab-backup run found")
    age = now - finished_at
    hours = age.total_seconds() / 3600
    ev = [f"run {run_name} finished {finished_at:%Y-%m-%d %H:%M} UTC"]
    status = Severity.CRITICAL if age > critical else Severity.WARNING if age > warn else Severity.OK
    return Check("gitlab-backup-age", status, f"newest verified backup is {hours:.1f} h old", ev)


def analyse_certificates(rows: list[dict[str, Any]] | None, run_name: str | None, warn_days: float = 30,
                         critical_days: float = 7) -> Check:
    """The latest certificate-check's table read as findings (one per certificate, by days left): the status
    is the worst of them, the one with the fewest days left."""
    if rows is None:
        return Check("certificates", "unknown", "no certificate-check run with a certificate table found")
    days = [(float(r["days_left"]), str(r.get("subject", "?"))) for r in rows if _number(r.get("days_left"))]
    if not days:
        return Check("certificates", "unknown", f"run {run_name} listed no certificates")
    findings = [Finding(severity=(Severity.CRITICAL if left <= critical_days else Severity.WARNING
                                  if left <= warn_days else Severity.OK),
                        subject=subject, title="expiry", summary=f"{left:g} days left", evidence={"days_left": left})
                for left, subject in days]
    left, subject = min(days)
    return Check.from_findings("certificates", findings, summary=f"fewest days left: {left:g} ({subject})",
                               evidence=[f"run {run_name}: {len(days)} certificates"])


def sweep_finding(row: dict[str, Any]) -> Finding:
    """A row of the GPU sweep's findings table (`GPUFinding.row`) read back as a finding."""
    return Finding(severity=Severity.parse(row.get("severity")), subject=f"{row.get('node')} gpu {row.get('gpu')}",
                   title=str(row.get("finding")), summary=str(row.get("summary") or ""),
                   advice=str(row.get("action") or ""))


def analyse_gpu_sweep(rows: list[dict[str, Any]] | None, run_name: str | None, run_state: str | None) -> Check:
    """The last GPU sweep's critical findings (its findings table); a sweep that failed reads as unknown.
    Only critical findings count: the sweep's warnings (hot, idle, an exporter down) are its own report's."""
    if rows is None:
        return Check("gpu-sweep", "unknown", "no gpu-monitoring-sweep run with a findings table found")
    crit = [f for f in map(sweep_finding, rows) if f.severity is Severity.CRITICAL]
    ev = [f"run {run_name} ({run_state})"] + [f"{f.subject}: {f.title}" for f in crit]
    if run_state not in ("COMPLETED", "PAUSED"):
        return Check("gpu-sweep", "unknown", f"the last sweep ended {run_state}", ev)
    return Check.from_findings("gpu-sweep", crit, empty=Severity.OK, evidence=ev,
                               summary=f"{len(crit)} critical GPU findings" if crit else
                               f"no critical GPU findings ({len(rows)} findings in all)")


def _number(value: Any) -> bool:
    try:
        float(value)
    except (TypeError, ValueError):
        return False
    return True
