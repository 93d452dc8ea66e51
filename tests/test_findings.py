"""The one finding model (`tasks.findings`): the severity order, unknown never ok, the renderings, and the GPU,
etcd and certificate analyses mapping onto it; the health check reading it. Pure: no Prefect, no network."""

from __future__ import annotations

import dataclasses
import datetime as dt

import pytest

from sandbox import pki
from tasks.etcd_health import check_of
from tasks.etcd_rules import ClusterStatus, MemberStatus, health_findings, overall
from tasks.findings import COLUMNS, Finding, Severity, counts, markdown_table, notice_text, sort_findings
from tasks.gpu_classify import classify
from tasks.gpu_model import ACTIONS, FleetSnapshot, GPUFinding, GPUNode, GPUPod, Kind, SweepThresholds
from tasks.health import Check, analyse_certificates, analyse_gpu_sweep, build_report, score
from tasks.prometheus import DCGMSnapshot
from tasks.tls_analysis import ADVICE, CertFinding, analyse, timer_findings
from tasks.tls_model import HOST, SourceProblem, TimerState, cert_info, sightings

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)
OK, INFO, WARNING, UNKNOWN, CRITICAL = Severity


def _f(severity, subject="s", title="t", **kw) -> Finding:
    return Finding(severity=severity, subject=subject, title=title, **kw)


# --- the severity order ----------------------------------------------------------------------------


def test_one_order_ok_info_warning_unknown_critical():
    assert list(Severity) == [OK, INFO, WARNING, UNKNOWN, CRITICAL]
    assert [s.rank for s in Severity] == [0, 1, 2, 3, 4]
    assert OK < INFO < WARNING < UNKNOWN < CRITICAL
    assert max([WARNING, CRITICAL, UNKNOWN]) is CRITICAL and min([WARNING, UNKNOWN, INFO]) is INFO
    # the order is the rank, never the text's ("critical" < "ok" alphabetically)
    assert sorted(["ok", "critical", "warning", "unknown", "info"], key=Severity) == [OK, INFO, WARNING, UNKNOWN, CRITICAL]
    assert CRITICAL > "ok" and "warning" < UNKNOWN  # plain text compares in the same order
    assert Severity.worst(["info", WARNING, "unknown"]) is UNKNOWN and Severity.worst([]) is OK
    assert Severity.worst([], default="unknown") is UNKNOWN


def test_a_member_is_its_text():
    assert CRITICAL == "critical" and f"{WARNING}" == "warning" and {"ok": 1}[OK] == 1
    assert Severity("critical") is CRITICAL and Severity.parse(" Critical ") is CRITICAL
    with pytest.raises(ValueError):
        Severity("fatal")


def test_unknown_is_never_ok():
    assert not UNKNOWN.healthy and UNKNOWN.status is UNKNOWN
    assert OK.healthy and INFO.healthy and INFO.status is OK  # info is healthy: a component with only info is ok
    assert not WARNING.healthy and not CRITICAL.healthy
    assert Severity.parse("garbage") is UNKNOWN and Severity.parse(None) is UNKNOWN  # unreadable text is not ok
    assert Severity.worst([OK, INFO, UNKNOWN]) is UNKNOWN
    check = Check.from_findings("x", [_f(OK), _f(INFO), _f(UNKNOWN, summary="source down")])
    assert check.status is UNKNOWN and check.summary == "source down"
    assert Check.from_findings("x", []).status is UNKNOWN  # nothing read: unknown, not ok
    assert score([check]) == 0  # unknown earns nothing


# --- the model and its renderings --------------------------------------------------------------------


def test_finding_is_frozen_and_checks_its_severity():
    f = _f("warning", "n1 gpu 2", "gpu-hot", summary="93 C", evidence={"temp": 93.0}, advice="cool it")
    assert f.severity is WARNING
    with pytest.raises(dataclasses.FrozenInstanceError):
        f.severity = OK  # type: ignore[misc]
    with pytest.raises(ValueError):
        _f("warn")
    assert hash(f) == hash(_f("warning", "n1 gpu 2", "gpu-hot", summary="93 C", evidence={"temp": 1}, advice="cool it"))


def test_renderings_are_stable():
    f = _f(CRITICAL, "cp-1 | etcd", "quota", summary="db at 91%\nof quota", evidence={"share": 0.91, "members": [1, 2],
                                                                                      "nan": float("nan")},
           advice="defragment")
    assert tuple(f.to_dict()) == COLUMNS
    assert f.to_dict() == {"severity": "critical", "subject": "cp-1 | etcd", "title": "quota",
                           "summary": "db at 91%\nof quota", "evidence": "share=0.91; members=1,2; nan=NaN",
                           "advice": "defragment"}
    assert f.markdown_row() == ("| critical | cp-1 \\| etcd | quota | db at 91% of quota | share=0.91; members=1,2; "
                                "nan=NaN | defragment |")
    assert f.line() == "critical quota (cp-1 | etcd): db at 91%\nof quota -> defragment"
    assert f.line(subject=False, advice=False) == "critical quota: db at 91%\nof quota"


def test_sorting_tables_counts_and_notices_worst_first():
    fs = [_f(INFO, "a"), _f(CRITICAL, "b"), _f(WARNING, "c"), _f(UNKNOWN, "d"), _f(OK, "e")]
    assert [f.subject for f in sort_findings(fs)] == ["b", "d", "c", "a", "e"]
    assert counts(fs) == {"critical": 1, "unknown": 1, "warning": 1, "info": 1, "ok": 1}
    table = markdown_table(fs, limit=2).splitlines()
    assert table[0] == "| " + " | ".join(COLUMNS) + " |" and table[2].startswith("| critical | b")
    assert table[3].startswith("| unknown | d") and table[-1] == "_3 more findings_"
    assert markdown_table([]) == "_no findings_\n"
    assert notice_text(fs, limit=2).splitlines() == ["- critical t (b)", "- unknown t (d)",
                                                     "- (+3 more in the run's findings table)"]


# --- the three domains ---------------------------------------------------------------------------------


def test_gpu_findings_are_the_model():
    node = GPUNode("g0", False, False, 8, 8)
    fleet = FleetSnapshot([node], [GPUPod("ml", "train", "g0", "Workflow/wf", 8, {})], [])
    result = classify(fleet, DCGMSnapshot.unavailable("20s", "connection refused"), SweepThresholds(window="20s"))
    by_kind = {f.kind: f for f in result.findings}
    assert all(isinstance(f, Finding) for f in result.findings)
    prom, not_ready = by_kind[Kind.PROMETHEUS_UNAVAILABLE], by_kind[Kind.NODE_NOT_READY]
    assert (prom.severity, prom.subject, prom.title) == (CRITICAL, "(fleet)", "prometheus-unavailable")
    assert prom.advice == ACTIONS[Kind.PROMETHEUS_UNAVAILABLE] and prom.evidence["error"] == "connection refused"
    assert (not_ready.severity, not_ready.subject) == (CRITICAL, "g0")  # NotReady while a pod holds its GPUs
    assert result.status == "unknown" and result.counts == {"critical": 2, "warning": 0, "info": 0}
    xid = GPUFinding(kind=Kind.XID, severity=Severity.INFO, node="g0", gpu="2", summary="XID 13")
    assert (xid.subject, xid.title, xid.to_dict()["severity"]) == ("g0 gpu 2", "xid", "info")
    named = dataclasses.replace(xid, workflow="ml/wf")  # frozen: changed by replacing, derived fields kept
    assert named.workflow == "ml/wf" and named.subject == "g0 gpu 2" and named.advice == ACTIONS[Kind.XID]


def _member(name, mid, leader=False, healthy=True, size=100):
    return MemberStatus(endpoint=f"https://127.0.0.1:{mid}", name=name, member_id=mid, reachable=healthy,
                        healthy=healthy, is_leader=leader, leader_id=1, revision=10, db_size=size, db_size_in_use=size)


def test_etcd_findings_are_the_model():
    s = ClusterStatus("main", [_member("a", 1, leader=True, size=90), _member("b", 2), _member("c", 3)],
                      alarms=[{"member_id": 1, "alarm": "NOSPACE"}])
    fs = health_findings(s, quota_bytes=100)
    assert all(type(f) is Finding and f.subject == "etcd-main" for f in fs)
    alarm = next(f for f in fs if f.title == "alarm NOSPACE")
    assert alarm.severity is CRITICAL and "alarm disarm" in alarm.advice and overall(fs) is CRITICAL
    check = check_of("main", fs)
    assert check.name == "etcd-main" and check.status is CRITICAL
    assert "critical alarm NOSPACE: alarm NOSPACE raised on a -> free space" in check.evidence[2]
    blind = health_findings(ClusterStatus("main", [_member("a", 1, healthy=False)], errors=["timeout"]), 100)
    assert [(f.title, f.severity) for f in blind] == [("reachable", UNKNOWN)]
    assert check_of("main", blind).status is UNKNOWN and overall([]) is UNKNOWN
    healthy = health_findings(ClusterStatus("main", [_member("a", 1, leader=True)]), 1000,
                              previous={"leader_id": 1, "revision": 5})
    assert overall(healthy) is INFO and check_of("main", healthy).status is OK  # info counts as ok


def test_certificate_findings_are_the_model():
    ca = pki.issue("kubernetes", is_ca=True, not_before=NOW - dt.timedelta(days=400),
                   not_after=NOW + dt.timedelta(days=3000))
    old = pki.issue("apiserver", issuer=ca, not_before=NOW - dt.timedelta(days=400),
                    not_after=NOW - dt.timedelta(days=2))
    found = sightings([cert_info(old.cert), cert_info(ca.cert)], HOST, "cp-1:/etc/kubernetes/ssl/apiserver.crt", None)
    problem = SourceProblem(HOST, "cp-2", "unreachable", "ssh: connection refused")
    report = analyse(found, [problem], now=NOW)
    assert all(isinstance(f, CertFinding) and isinstance(f, Finding) for f in report.findings)
    expired, unreachable = report.findings  # critical before unknown: the one order
    assert (expired.severity, expired.title, expired.subject) == (
        CRITICAL, "expired", "apiserver @ cp-1:/etc/kubernetes/ssl/apiserver.crt")
    assert expired.days_left == -2 and expired.evidence["days_left"] == -2 and expired.advice == ADVICE["expired"]
    assert (unreachable.severity, unreachable.subject) == (UNKNOWN, "host @ cp-2")
    assert "unknown" in unreachable.advice
    assert report.worst() is CRITICAL and report.counts() == {"critical": 1, "unknown": 1, "warning": 0, "info": 0}
    timer = TimerState(host="cp-1", timer_load="not-found")
    [missing] = timer_findings(timer, NOW, 35)
    assert (missing.severity, missing.title, missing.subject) == (WARNING, "renew-timer-missing",
                                                                  "k8s-certs-renew.timer @ cp-1")


# --- the health check reads the model ------------------------------------------------------------------


def test_health_checks_from_findings_in_the_one_order():
    rows = [{"days_left": 40, "subject": "a"}, {"days_left": 5, "subject": "b"}, {"days_left": "?", "subject": "c"}]
    certs = analyse_certificates(rows, "run-1", warn_days=30, critical_days=7)
    assert certs.status is CRITICAL and certs.summary == "fewest days left: 5 (b)"
    assert analyse_certificates([{"days_left": 20, "subject": "a"}], "r").status is WARNING
    sweep = analyse_gpu_sweep([{"severity": "critical", "node": "g1", "gpu": 3, "finding": "critical-xid"},
                               {"severity": "warning", "node": "g2", "gpu": "", "finding": "gpu-hot"}], "r", "COMPLETED")
    assert sweep.status is CRITICAL and sweep.evidence == ["run r (COMPLETED)", "g1 gpu 3: critical-xid"]
    checks = [Check("a", "warning", ""), Check("b", "unknown", ""), Check("c", "info", ""), Check("d", "critical", "")]
    assert checks[2].status is OK  # a check shows info as ok
    report = build_report(checks)
    assert [c.name for c in report.checks] == ["d", "b", "a", "c"]  # unknown ranks above warning
    assert report.state()["checks"] == {"d": "critical", "b": "unknown", "a": "warning", "c": "ok"}
    assert report.counts() == {"ok": 1, "warning": 1, "unknown": 1, "critical": 1}
