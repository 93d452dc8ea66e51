"""Certificate analysis as pure functions, on real X.509 made here: no network, no Prefect."""

from __future__ import annotations

import base64
import datetime as dt
import stat

import pytest
import yaml

from sandbox import pki
from tasks.tls_analysis import (
    analyse,
    expiry_status,
    name_matches,
    timer_findings,
    weak_crypto,
)
from tasks.tls_model import (
    ENDPOINT,
    HOST,
    SECRET,
    TimerState,
    cert_info,
    parse_pem,
    sightings,
    systemd_time,
)

NOW = dt.datetime(2026, 6, 1, 12, 0, tzinfo=dt.UTC)


@pytest.fixture(scope="module")
def ca():
    return pki.issue("kubernetes", is_ca=True, not_before=NOW - dt.timedelta(days=400),
                     not_after=NOW + dt.timedelta(days=3000))


def leaf(ca, days_left: float, cn="leaf", **kw):
    return pki.issue(cn, issuer=ca, not_before=NOW - dt.timedelta(days=10), not_after=NOW + dt.timedelta(days=days_left),
                     **kw)


def seen(issued, where="cp-1:/etc/kubernetes/ssl/x.crt", source=HOST, group=None, **kw):
    return sightings([cert_info(issued.cert)], source, where, group, **kw)


@pytest.mark.parametrize(("days", "status"), [(-0.5, "expired"), (0.5, "critical"), (7, "critical"),
                                              (7.5, "warning"), (30, "warning"), (30.5, "ok")])
def test_expiry_status_at_the_thresholds(ca, days, status):
    assert expiry_status(cert_info(leaf(ca, days).cert), NOW, 30, 7) == status


def test_not_yet_valid(ca):
    future = pki.issue("future", issuer=ca, not_before=NOW + dt.timedelta(days=2), not_after=NOW + dt.timedelta(days=300))
    assert expiry_status(cert_info(future.cert), NOW, 30, 7) == "not-yet-valid"
    report = analyse(seen(future), now=NOW)
    assert [(f.severity, f.title) for f in report.findings] == [("critical", "not-yet-valid")]


def test_cas_are_reported_apart_with_their_own_findings(ca):
    old_ca = pki.issue("front-proxy-ca", is_ca=True, not_before=NOW - dt.timedelta(days=3640),
                       not_after=NOW + dt.timedelta(days=5))
    report = analyse(seen(ca, "a") + seen(old_ca, "b") + seen(leaf(ca, 200), "c"), now=NOW)
    assert [e.cert.common_name for e in report.cas] == ["front-proxy-ca", "kubernetes"]
    assert [e.cert.common_name for e in report.leaves] == ["leaf"]
    assert [(f.severity, f.title) for f in report.findings] == [("critical", "ca-expires-soon")]


def test_entries_are_sorted_by_expiry_and_deduplicated_by_fingerprint(ca):
    a, b = leaf(ca, 100, "a"), leaf(ca, 20, "b")
    found = seen(a, "cp-1:/x.crt") + seen(a, "cp-2:/x.crt") + seen(a, "secret ns/a (tls.crt)", SECRET) + seen(b, "y")
    report = analyse(found, now=NOW)
    assert [e.cert.common_name for e in report.entries] == ["b", "a"]
    entry = report.entries[1]
    assert entry.places == ["cp-1:/x.crt", "cp-2:/x.crt", "secret ns/a (tls.crt)"]
    assert entry.sources == ["host", "secret"]
    assert report.entries[0].row()["days_left"] == 20.0


def test_names_follow_rfc_6125():
    c = cert_info(pki.issue("cn-is-ignored.example", dns=("*.apps.example", "api.example"), ips=("10.0.0.1",)).cert)
    assert name_matches("api.example", c) and name_matches("API.example.", c)
    assert name_matches("x.apps.example", c)
    assert not name_matches("a.b.apps.example", c)  # a wildcard covers one label only
    assert not name_matches("apps.example", c)
    assert not name_matches("cn-is-ignored.example", c)  # the CN is not a name (Go ignores it)
    assert name_matches("10.0.0.1", c) and not name_matches("10.0.0.2", c)
    assert not name_matches("10.0.0.1", cert_info(pki.issue("10.0.0.1", dns=("10.0.0.1",)).cert))  # IPs: IP SANs only


def test_served_certificate_without_the_name_is_critical(ca):
    served = leaf(ca, 200, "etcd", dns=("cp-1",), ips=("10.0.0.11",))
    ok = leaf(ca, 200, "etcd", dns=("cp-2",), ips=("10.0.0.12",))
    report = analyse(seen(served, "endpoint etcd cp-2", ENDPOINT, expected_name="10.0.0.12")
                     + seen(ok, "endpoint etcd cp-2b", ENDPOINT, expected_name="cp-2"), now=NOW)
    assert [(f.title, f.where) for f in report.findings] == [("name-mismatch", "endpoint etcd cp-2")]
    assert "10.0.0.12" in report.findings[0].summary


def test_weak_keys_and_signatures(ca):
    assert weak_crypto(cert_info(leaf(ca, 100, key=pki.new_key("RSA-1024")).cert)) == [
        "RSA key of 1024 bits (under 2048)"]
    assert weak_crypto(cert_info(leaf(ca, 100, key=pki.new_key("RSA-2048")).cert)) == []
    assert weak_crypto(cert_info(leaf(ca, 100).cert)) == []  # EC P-256
    rsa_ca = pki.issue("etcd-ca", is_ca=True, key=pki.new_key("RSA-2048"))
    sha1 = pki.issue("etcd-admin", issuer=rsa_ca, hash_name="sha1")
    assert weak_crypto(cert_info(sha1.cert)) == ["signed with SHA1"]
    report = analyse(seen(sha1, "s") + seen(rsa_ca, "s"), now=dt.datetime.now(dt.UTC))
    assert [(f.title, f.summary) for f in report.findings] == [("weak-crypto", "signed with SHA1")]
    assert report.entry(cert_info(sha1.cert).fingerprint).chain == "verified"  # SHA-1 checked by hand


def test_chain_verified_against_the_ca_found_beside_it(ca):
    good = leaf(ca, 200, "apiserver")
    replaced = pki.issue("kubernetes", is_ca=True)  # a new CA of the same name: the old leaf no longer verifies
    orphan_ca = pki.issue("elsewhere", is_ca=True)
    orphan = leaf(orphan_ca, 200, "orphan")
    report = analyse(seen(good, "cp-1:/ssl/apiserver.crt", group="g1") + seen(ca, "cp-1:/ssl/ca.crt", group="g1")
                     + seen(good, "cp-2:/ssl/apiserver.crt", group="g2")
                     + seen(replaced, "cp-2:/ssl/ca.crt", group="g2") + seen(orphan, "o"), now=NOW)
    by_cn = {e.cert.common_name: e for e in report.entries if not e.is_ca}
    assert by_cn["apiserver"].chain == "verified"  # cp-1's CA signed it (found beside it there)
    assert by_cn["orphan"].chain == "unknown-ca"
    leafless = [pki.issue("x", issuer=replaced)]
    report2 = analyse(seen(good, "a", group="g") + seen(replaced, "b", group="g") + seen(leafless[0], "c"), now=NOW)
    assert report2.entry(cert_info(good.cert).fingerprint).chain == "bad-signature"
    assert any(f.title == "bad-signature" and f.severity == "critical" for f in report2.findings)


def _timer(**kw) -> TimerState:
    base = {"host": "cp-1", "timer_load": "loaded", "timer_active": "active", "timer_enabled": "enabled",
            "last_trigger": NOW - dt.timedelta(days=10), "service_active": "inactive", "service_result": "success",
            "exit_status": 0, "state_since": NOW - dt.timedelta(days=10)}
    return TimerState(**{**base, **kw})


def test_timer_findings():
    kinds = lambda t: [f.title for f in timer_findings(t, NOW, 35)]
    assert kinds(_timer()) == []
    assert kinds(_timer(last_trigger=NOW - dt.timedelta(days=34))) == []
    assert kinds(_timer(last_trigger=NOW - dt.timedelta(days=36))) == ["renew-timer-stale"]
    assert kinds(_timer(last_trigger=None)) == ["renew-timer-never-ran"]
    assert kinds(_timer(service_active="failed", service_result="exit-code", exit_status=1)) == ["renew-service-failed"]
    assert kinds(_timer(service_active="activating", state_since=NOW - dt.timedelta(hours=30))) == [
        "renew-service-hung"]
    assert kinds(_timer(service_active="activating", state_since=NOW - dt.timedelta(minutes=5))) == []
    assert kinds(_timer(timer_load="not-found")) == ["renew-timer-missing"]
    assert kinds(_timer(timer_active="inactive", timer_enabled="disabled")) == ["renew-timer-disabled",
                                                                                "renew-timer-inactive"]


def test_systemd_timestamps():
    assert systemd_time("Mon 2026-06-01 03:00:00 UTC") == dt.datetime(2026, 6, 1, 3, tzinfo=dt.UTC)
    assert systemd_time("@1780282800") == dt.datetime(2026, 6, 1, 3, tzinfo=dt.UTC)
    assert systemd_time("n/a") is None and systemd_time("") is None


def test_garbage_and_truncated_pem_are_reported_not_raised(ca):
    good = leaf(ca, 100).cert_pem
    certs, errors = parse_pem(good + b"-----BEGIN CERTIFICATE-----\nnot base64!!\n-----END CERTIFICATE-----\n")
    assert len(certs) == 1 and len(errors) == 1 and "block 2" in errors[0]
    assert parse_pem(b"-----BEGIN CERTIFICATE-----\nMIIB")[1] == ["a BEGIN CERTIFICATE line without a complete block"]
    assert parse_pem(b"just text") == ([], [])


def test_host_scan_output_is_parsed_with_faults(ca):
    from tasks.tls import parse_collect

    a = leaf(ca, 100, "apiserver")
    kc = base64.b64encode(leaf(ca, 50, "kubernetes-admin").cert_pem).decode()
    lines = ["==D /r/etc/kubernetes/ssl", "==F /r/etc/kubernetes/ssl/apiserver.crt", *a.cert_pem.decode().splitlines(),
             "==F /r/etc/kubernetes/ssl/empty.crt", ("==E /r/etc/kubernetes/ssl/gone.crt sed: can't read "
             "/r/etc/kubernetes/ssl/gone.crt: No such file or directory"), "==S /r/etc/kubernetes/pki",
             "==X /r/etc/ssl/etcd/ssl", "==K /r/etc/kubernetes/admin.conf",
             f"    certificate-authority-data: {base64.b64encode(ca.cert_pem).decode()}",
             f"    client-certificate-data: {kc}", "==M /r/etc/kubernetes/super-admin.conf"]
    scan = parse_collect("cp-1", "/r", lines)
    assert [(s.cert.common_name, s.where) for s in scan.sightings] == [
        ("apiserver", "cp-1:/etc/kubernetes/ssl/apiserver.crt"),
        ("kubernetes", "cp-1:/etc/kubernetes/admin.conf (cluster certificate-authority-data)"),
        ("kubernetes-admin", "cp-1:/etc/kubernetes/admin.conf (user client-certificate-data)")]
    assert [(p.kind, p.where, p.message) for p in scan.problems] == [
        ("no-certificate", "cp-1:/etc/kubernetes/ssl/empty.crt", "no certificate in this file"),
        ("unreadable", "cp-1:/etc/kubernetes/ssl/gone.crt",
         "can't read /etc/kubernetes/ssl/gone.crt: No such file or directory")]


def test_endpoints_from_config_and_hosts():
    from blocks.config import parse_platform_config
    from tasks.tls import endpoint_targets

    cfg = parse_platform_config({
        "name": "p", "clusters": [{"name": "c", "control_plane": [{"host": "cp-1.x", "name": "cp-1"}],
                                   "etcd": [{"host": "etcd-1.x", "apiserver_port": None, "etcd_events_port": 2383}]}],
        "gitlab": {"api_url": "https://gitlab.x", "token": {"env": "T"}, "ssh": {"host": "gitlab.x"}},
        "registry": {"url": "http://registry.x:5000"},
        "certificates": {"endpoints": [{"name": "grafana", "host": "ingress.x", "server_name": "grafana.x",
                                        "kind": "ingress"}]}})
    got = [(t.name, t.host, t.port, t.server_name) for t in endpoint_targets(cfg, cfg.cluster())]
    assert got == [("grafana", "ingress.x", 443, "grafana.x"), ("kube-apiserver cp-1", "cp-1.x", 6443, None),
                   ("etcd cp-1", "cp-1.x", 2379, None), ("etcd etcd-1.x", "etcd-1.x", 2379, None),
                   ("etcd-events etcd-1.x", "etcd-1.x", 2383, None), ("gitlab", "gitlab.x", 443, "gitlab.x")]
    off = cfg.model_copy(update={"certificates": cfg.certificates.model_copy(update={"derive_endpoints": False})})
    assert [t.name for t in endpoint_targets(off, off.cluster())] == ["grafana"]


def test_config_errors_name_the_certificate_fields():
    from blocks.config import ConfigError, parse_platform_config

    with pytest.raises(ConfigError) as info:
        parse_platform_config({"name": "p", "clusters": [{"name": "c"}], "certificates": {
            "layout": {"pki_dirs": ["etc/relative"], "static_pods": ["../x.yaml"]},
            "kubeconfigs": [{"path": "/k", "refresh_from": "/etc/kubernetes/admin.conf"}]}})
    text = "\n".join(info.value.problems)
    assert "certificates.layout.pki_dirs: expected an absolute path" in text
    assert "certificates.layout.static_pods: expected a plain file name" in text
    assert "certificates.kubeconfigs[0].refresh_from: expected text matching" in text


def test_refreshing_a_kubeconfig_keeps_its_cluster_and_is_private(ca, tmp_path):
    from tasks.tls_renewal import embedded_client_cert, refresh_kubeconfig

    old, new = pki.issue("kubernetes-admin", issuer=ca), pki.issue("kubernetes-admin", issuer=ca)
    path = tmp_path / "ci.yaml"
    path.write_text(pki.kubeconfig("https://lb.example:6443", ca, old, "ci"))
    host_conf = pki.kubeconfig("https://127.0.0.1:6443", ca, new, "kubernetes-admin")
    assert refresh_kubeconfig(path, host_conf) == "ci"
    doc = yaml.safe_load(path.read_text())
    assert doc["clusters"][0]["cluster"]["server"] == "https://lb.example:6443"
    assert embedded_client_cert(path.read_text()) == new.cert_pem
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_check_renewed_accepts_a_replacement_of_an_invalid_certificate(ca):
    from tasks.tls_renewal import StepFailed, check_renewed

    now = dt.datetime.now(dt.UTC)
    old_ok, old_future = cert_info(leaf(ca, 100).cert), cert_info(pki.issue(
        "f", issuer=ca, not_before=now + dt.timedelta(days=2), not_after=now + dt.timedelta(days=400)).cert)
    new = cert_info(pki.issue("n", issuer=ca, not_after=now + dt.timedelta(days=365)).cert)
    assert set(check_renewed({"a": old_future}, {"a": new}, now)) == {"a"}
    with pytest.raises(StepFailed, match="unchanged"):
        check_renewed({"a": old_ok}, {"a": old_ok}, now)
    with pytest.raises(StepFailed, match="missing"):
        check_renewed({"a": old_ok}, {}, now)


def test_timeline_picture_renders(ca):
    from tasks.reports import png_data_uri
    from tasks.tls_report import summary_markdown, timeline_figure

    report = analyse(seen(ca, "a") + seen(leaf(ca, 3), "b") + seen(leaf(ca, -2, "gone"), "c"), now=NOW)
    uri = png_data_uri(timeline_figure(report, 30, 7))
    assert uri.startswith("data:image/png;base64,") and len(uri) > 2000
    md = summary_markdown(report, "t", {"hosts": 1}, uri, 30, 7)
    assert "**CRITICAL**" in md and "## Certificate authorities" in md
