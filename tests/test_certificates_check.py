"""certificate-check against the sandbox: real X.509 on sshd hosts, real TLS listeners, TLS secrets.

Every deliberate case of the sandbox PKI (`sandbox/control_plane.py` CASES) must be flagged, every
certificate's expiry must agree with `openssl x509 -enddate`, and each fault (hung endpoint, garbage PEM,
unreadable file, host down) must be reported while the rest of the scan carries on.
"""

from __future__ import annotations

import subprocess
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from tests.conftest import run_flow_sync

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]


@pytest.fixture(scope="module")
def check(cert_sandbox, sandbox_platform):
    """One certificate-check run over the freshly laid out sandbox: (final state, its data, seconds)."""
    from flows.certificate_check import certificate_check
    from sandbox.control_plane import reset_control_plane, wait_serving

    reset_control_plane(cert_sandbox)
    wait_serving(cert_sandbox)
    start = time.monotonic()
    state = run_flow_sync(certificate_check, platform=sandbox_platform, page_size=10)
    return state, state.result(raise_on_failure=False), time.monotonic() - start


def _by_place(result: dict) -> dict[str, dict]:
    return {place: c for c in result["certificates"] for place in c["places"]}


def _findings(result: dict, kind: str) -> list[dict]:
    return [f for f in result["findings"] if f["finding"] == kind]


def _openssl_enddate(path: Path) -> datetime:
    out = subprocess.run(["openssl", "x509", "-noout", "-enddate", "-in", str(path)], capture_output=True,
                         text=True, check=True).stdout.strip()
    return datetime.strptime(out.split("=", 1)[1].replace("  ", " "), "%b %d %H:%M:%S %Y GMT").replace(tzinfo=UTC)


def test_run_fails_on_critical_and_unknown_findings_and_says_so(check):
    state, result, _ = check
    assert state.is_failed()
    assert "critical" in state.message and "unknown" in state.message
    assert result["worst"] == "critical"
    assert result["counts"]["critical"] >= 6 and result["counts"]["unknown"] >= 4


def test_every_certificate_of_the_test_pki_agrees_with_openssl(check, cert_sandbox):
    """days left and expiry of every certificate file on every emulated host, against openssl x509 -enddate."""
    from sandbox.control_plane import CASES, CONTROL_PLANE, ETCD_HOSTS, host_root

    _, result, _ = check
    places = _by_place(result)
    now = datetime.now(UTC)
    checked = 0
    skip = {CASES["garbage-pem"], CASES["dangling-symlink"]}
    for node in (*CONTROL_PLANE, *ETCD_HOSTS):
        root = host_root(cert_sandbox, node)
        for path in sorted(root.rglob("*")):
            rel = str(path.relative_to(root))
            if (node, rel) in skip or not (rel.endswith((".crt", ".pem"))) or "key" in path.name:
                continue
            if rel.startswith("etc/kubernetes/pki/") or not path.is_file():
                continue  # kube_cert_compat_dir: the same folder as ssl/, read once
            if rel.startswith("var/lib/kubelet/pki/"):
                rel = "var/lib/kubelet/pki/kubelet-client-current.pem"  # read through the kubelet's symlink
            want = _openssl_enddate(path)
            entry = places.get(f"{node}:/{rel}")
            assert entry is not None, f"{node}:/{rel} was not reported"
            got = datetime.fromisoformat(entry["not_after"])
            assert got == want, (rel, got, want)
            assert entry["days_left"] == pytest.approx((want - now).total_seconds() / 86400, abs=0.2)
            checked += 1
    assert checked >= 3 * 11 + 3  # every CA and leaf of three control-plane hosts, etcd-1's, kubelet's


def test_each_deliberate_case_is_flagged(check):
    from sandbox.control_plane import CASES

    _, result, _ = check
    places = _by_place(result)

    def status_of(case):
        node, rel = CASES[case]
        return places[f"{node}:/{rel}"]

    assert status_of("expired")["status"] == "expired"
    assert status_of("not-yet-valid")["status"] == "not-yet-valid"
    assert status_of("expires-in-5-days")["status"] == "critical"
    assert status_of("expires-in-20-days")["status"] == "warning"
    flagged = {(f["finding"], f["where"].split(";")[0]) for f in result["findings"]}
    for case, kind in (("expired", "expired"), ("not-yet-valid", "not-yet-valid"),
                       ("expires-in-5-days", "expires-soon")):
        node, rel = CASES[case]
        assert (kind, f"{node}:/{rel}") in flagged, case
    weak = {f["where"]: f["detail"] for f in _findings(result, "weak-crypto")}
    node, rel = CASES["rsa-1024"]
    assert "RSA key of 1024 bits" in weak[f"{node}:/{rel}"]
    node, rel = CASES["sha1"]
    assert weak[f"{node}:/{rel}"] == "signed with SHA1"
    mismatch = {f["where"].split(" (")[0]: f["detail"] for f in _findings(result, "name-mismatch")}
    assert "without 127.0.0.1" in mismatch["endpoint etcd cp-2"]  # cp-2's etcd server cert carries cp-1's SANs
    assert "kibana.sandbox.internal" in mismatch["endpoint ingress kibana"]  # the ingress' fake certificate
    assert not any(k.startswith("endpoint kube-apiserver") for k in mismatch)


def test_faults_are_reported_and_the_scan_carries_on(check, cert_sandbox):
    from sandbox.control_plane import CASES

    _, result, seconds = check
    problems = {(f["finding"], f["where"]) for f in result["findings"] if f["severity"] == "unknown"}
    node, rel = CASES["garbage-pem"]
    assert ("unparseable", f"{node}:/{rel}") in problems
    node, rel = CASES["dangling-symlink"]
    assert ("unreadable", f"{node}:/{rel}") in problems
    assert ("unreachable", "etcd-2") in problems  # the host that is down
    assert any(k == "timeout" and w.startswith("endpoint hung endpoint") for k, w in problems)
    # the rest carried on: every other host and endpoint was read
    hosts = {p.split(":")[0] for c in result["certificates"] for p in c["places"] if not p.startswith(("endpoint",
                                                                                                       "secret", "kubeconfig"))}
    assert hosts == {"cp-1", "cp-2", "cp-3", "etcd-1"}
    served = {p.split(" (")[0] for c in result["certificates"] for p in c["places"] if p.startswith("endpoint")}
    assert {"endpoint kube-apiserver cp-1", "endpoint kube-apiserver cp-2", "endpoint kube-apiserver cp-3",
            "endpoint etcd cp-1", "endpoint etcd-events etcd-1", "endpoint ingress grafana",
            "endpoint ingress argo"} <= served
    # the hung endpoint cost its timeout once, not more (sources run concurrently)
    timeout_s = cert_sandbox.config["certificates"]["timeouts"]["endpoint_s"]
    assert seconds < 2 * timeout_s + 20


def test_same_certificate_found_in_several_places_is_one_entry(check):
    _, result, _ = check
    grafana = [c for c in result["certificates"] if c["subject"] == "grafana.sandbox.internal"]
    assert len(grafana) == 1
    assert {p.split(" (")[0] for p in grafana[0]["places"]} == {"endpoint ingress grafana", "secret monitoring/grafana-tls"}
    cluster_ca = [c for c in result["certificates"] if c["subject"] == "kubernetes" and c["kind"] == "CA"]
    assert len(cluster_ca) == 1 and {p.split(":")[0] for p in cluster_ca[0]["places"]} >= {"cp-1", "cp-2", "cp-3"}
    tenants = [c for c in result["certificates"] if c["subject"] == "*.apps.sandbox.internal"]
    assert len(tenants) == 1 and len(tenants[0]["places"]) == 24


def test_tls_secrets_are_listed_in_pages_and_only_tls_ones_kept(check):
    _, result, _ = check
    # 26 kubernetes.io/tls secrets and one Opaque with tls.crt (argo-server-tls; app-config has none, regcred is
    # a dockerconfigjson); page size 10: 3 pages + 1 page, never one call per secret
    assert result["stats"]["TLS secrets"] == 26 + 1
    assert result["stats"]["secret listing round trips"] == 4
    places = [p for c in result["certificates"] for p in c["places"] if p.startswith("secret")]
    assert not any("regcred" in p or "app-config" in p for p in places)
    kibana = next(c for c in result["certificates"] if c["subject"] == "kibana.sandbox.internal")
    assert kibana["status"] == "expired"


def test_chains_are_verified_against_their_ca(check):
    _, result, _ = check
    by_subject = {c["subject"]: c for c in result["certificates"]}
    assert by_subject["grafana.sandbox.internal"]["chain"] == "verified"  # leaf + intermediate in the secret
    assert by_subject["kube-apiserver"]["chain"] == "verified"
    assert by_subject["Kubernetes Ingress Controller Fake Certificate"]["chain"] == "self-signed"
    assert by_subject["kubernetes"]["kind"] == "CA" and by_subject["kubernetes"]["chain"] == "self-signed"
    assert not _findings(result, "bad-signature")


def test_renewal_timer_findings(check):
    _, result, _ = check
    timers = {f["finding"]: f["where"] for f in result["findings"] if f["finding"].startswith("renew-")}
    assert timers == {"renew-timer-stale": "cp-2", "renew-service-failed": "cp-2", "renew-service-hung": "cp-3"}


def test_reports_are_published(check, sandbox_platform):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    state, _, _ = check

    async def keys():
        async with get_client() as client:
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(
                like_="certificate-")))
            return {a.key: a for a in arts if a.flow_run_id == state.state_details.flow_run_id}

    found = asyncio.run(keys())
    summary = found[f"certificate-check-{sandbox_platform}-sandbox"]
    assert "data:image/png;base64," in summary.data and "Certificate authorities" in summary.data
    table = found[f"certificate-table-{sandbox_platform}-sandbox"]
    import json

    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    expiries = [r["expires"] for r in rows]
    assert expiries == sorted(expiries)
    assert f"certificate-findings-{sandbox_platform}-sandbox" in found
