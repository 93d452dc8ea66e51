"""renew-control-plane-certificates against the sandbox, beyond the operation contract (tests/test_operations.py,
scenario tests/operation_scenarios/certificates.py): what the plan covers and whom it targets, a real kubeadm
failure half-way (that host's backup put back at once, the hosts after it untouched, the way back named), a
complete renewal of one host (served certificate, expiry, the CI kubeconfig, the backup's mode) and a way back
that names a backup the hosts do not have.

The stand-in `kubeadm certs renew all` really re-issues the certificates with the cluster's CAs, the TLS
listeners restart like static pods when their manifests leave and come back, so every check here is
on real X.509: fingerprints, expiry dates, the certificate an API server serves.
"""

from __future__ import annotations

import base64
import hashlib
import ssl
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from cryptography import x509

from tests.approvals import APPROVE, run_and_answer
from tests.conftest import run_flow_sync

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]

MANAGED = ("apiserver.crt", "apiserver-kubelet-client.crt", "apiserver-etcd-client.crt", "front-proxy-client.crt",
           "etcd/server.crt", "etcd/peer.crt", "etcd/healthcheck-client.crt")


def _root(sb, node: str) -> Path:
    from sandbox.control_plane import host_root

    return host_root(sb, node)


def _files(sb, node: str) -> dict[str, str]:
    """Every file of a host's Kubernetes and kubelet folders with its SHA-256 (backups excluded)."""
    root = _root(sb, node)
    out = {}
    for top in ("etc/kubernetes", "var/lib/kubelet"):
        for p in sorted((root / top).rglob("*")):
            if p.is_file() and not p.is_symlink():
                out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _leaves(sb, node: str) -> dict[str, x509.Certificate]:
    ssl_dir = _root(sb, node) / "etc/kubernetes/ssl"
    return {name: x509.load_pem_x509_certificate((ssl_dir / name).read_bytes()) for name in MANAGED}


def _kubeconfig_certs(sb, node: str) -> dict[str, x509.Certificate]:
    out = {}
    for conf in ("admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf"):
        path = _root(sb, node) / "etc/kubernetes" / conf
        if path.exists():
            data = yaml.safe_load(path.read_text())["users"][0]["user"]["client-certificate-data"]
            out[conf] = x509.load_pem_x509_certificate(base64.b64decode(data))
    return out


def _served(sb, node: str) -> x509.Certificate:
    port = next(h["apiserver_port"] for h in sb.config["clusters"][0]["control_plane"] if h["name"] == node)
    return x509.load_pem_x509_certificate(ssl.get_server_certificate(("127.0.0.1", port), timeout=5).encode())


def _renew(platform: str, **params):
    from flows.certificate_renewal import renew_control_plane_certificates

    return run_and_answer(renew_control_plane_certificates, {"platform": platform, "dry_run": False,
                                                              "poll_interval_s": 0.5, **params}, APPROVE)


def test_the_plan_targets_the_host_keys_and_names_each_certificate(fresh_control_plane, sandbox_platform):
    import asyncssh

    from flows.certificate_renewal import renew_control_plane_certificates
    from sandbox.control_plane import CONTROL_PLANE, base

    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in CONTROL_PLANE}
    state = run_flow_sync(renew_control_plane_certificates, platform=sandbox_platform)
    assert state.is_completed(), state.message
    record = state.result()
    keys = {n: asyncssh.read_public_key(str(base(sb) / n / "sshd" / "ssh_host_ed25519_key.pub")).get_fingerprint()
            for n in CONTROL_PLANE}
    assert record["identity"] == "; ".join(f"{n}={keys[n]}" for n in CONTROL_PLANE)
    facts = record["facts"]
    assert list(facts) == list(CONTROL_PLANE) and all(facts[n]["host_key"] == keys[n] for n in CONTROL_PLANE)
    assert set(facts["cp-1"]["certificates"]) == set(MANAGED) | {"admin.conf", "super-admin.conf",
                                                                 "controller-manager.conf", "scheduler.conf"}
    assert set(facts["cp-2"]["certificates"]) == set(MANAGED) | {"admin.conf", "controller-manager.conf",
                                                                 "scheduler.conf"}
    leaves = _leaves(sb, "cp-2")
    assert {n: facts["cp-2"]["certificates"][n]["serial"] for n in MANAGED} == {
        n: format(c.serial_number, "x") for n, c in leaves.items()}
    assert [s["step"] for s in record["plan"][:4]] == ["back up cp-1", "renew on cp-1", "restart static pods on cp-1",
                                                        "check cp-1"]
    assert record["plan"][-1]["step"] == "refresh kubeconfigs" and len(record["plan"]) == 13
    assert {n: _files(sb, n) for n in CONTROL_PLANE} == before


def test_kubeadm_failing_on_the_second_host_puts_its_backup_back_and_names_the_way_back(fresh_control_plane,
                                                                                      sandbox_platform):
    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in ("cp-1", "cp-2", "cp-3")}
    old_leaves = _leaves(sb, "cp-1")
    served_cp2 = _served(sb, "cp-2")
    fault = _root(sb, "cp-2") / "faults" / "kubeadm-renew"
    fault.parent.mkdir(parents=True, exist_ok=True)
    fault.write_text("apiserver-kubelet-client\n")  # kubeadm fails half-way: admin.conf, apiserver, ... renewed
    try:
        state = _renew(sandbox_platform)
    finally:
        fault.unlink()
    assert state.is_failed(), state.message
    msg = state.message
    assert "failed at step 6 (renew on cp-2)" in msg and "steps 1-5 applied" in msg
    assert "automatic rollback: cp-2's backup" in msg and "put back and compared equal" in msg
    assert 'restore_backup="' in msg and 'nodes=["cp-1", "cp-2"]' in msg
    # cp-1 renewed: every kubeadm leaf has a new certificate, expiring later
    new_leaves = _leaves(sb, "cp-1")
    assert all(new_leaves[n].not_valid_after_utc > old_leaves[n].not_valid_after_utc for n in MANAGED)
    # cp-2: byte for byte what it was, and its API server serves its old certificate again
    assert _files(sb, "cp-2") == before["cp-2"]
    assert _served(sb, "cp-2") == served_cp2
    # cp-3: untouched
    assert _files(sb, "cp-3") == before["cp-3"]


def test_a_renewed_host_serves_its_new_certificate_and_ci_gets_its_admin_certificate(fresh_control_plane,
                                                                                    sandbox_platform):
    sb = fresh_control_plane
    node = "cp-3"  # holds the not-yet-valid and the 1024-bit cases
    old = {**_leaves(sb, node), **_kubeconfig_certs(sb, node)}
    ca_before = (_root(sb, node) / "etc/kubernetes/ssl/ca.crt").read_bytes()
    ci_kubeconfig = Path(sb.extra["control_plane"]["ci_kubeconfig"])
    state = _renew(sandbox_platform, nodes=[node])
    assert state.is_completed(), state.message
    assert [r["status"] for r in state.result()["steps"]] == ["ok"] * 5
    now = datetime.now(UTC)
    new = {**_leaves(sb, node), **_kubeconfig_certs(sb, node)}
    assert set(new) == set(old)
    for name, cert in new.items():
        assert cert.serial_number != old[name].serial_number, name
        assert cert.not_valid_after_utc > now + timedelta(days=364), name
        assert cert.not_valid_before_utc <= now, name  # the not-yet-valid one is fixed too
    assert _served(sb, node) == new["apiserver.crt"]  # the API server restarted with it
    assert (_root(sb, node) / "etc/kubernetes/ssl/ca.crt").read_bytes() == ca_before
    backups = list((_root(sb, node) / "var/backups/ai-platform-ops/certificates").glob("certificates-cp-3-*.tar"))
    assert len(backups) == 1 and stat.S_IMODE(backups[0].stat().st_mode) == 0o600
    ci = yaml.safe_load(ci_kubeconfig.read_text())
    ci_cert = x509.load_pem_x509_certificate(base64.b64decode(ci["users"][0]["user"]["client-certificate-data"]))
    assert ci_cert == new["admin.conf"] and stat.S_IMODE(ci_kubeconfig.stat().st_mode) == 0o600


def test_a_way_back_to_a_backup_the_hosts_do_not_have_is_refused(fresh_control_plane, sandbox_platform):
    from flows.certificate_renewal import renew_control_plane_certificates

    state = run_flow_sync(renew_control_plane_certificates, platform=sandbox_platform,
                          restore_backup="20000101T000000Z", nodes=["cp-1"])
    assert state.is_failed()
    assert "refused, nothing was changed" in state.message and "cp-1: no backup" in state.message
