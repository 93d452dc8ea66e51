"""renew-control-plane-certificates against the sandbox: dry run, approval, a node at a time, rollback.

The stand-in `kubeadm certs renew all` really re-issues the certificates with the cluster's CAs, the TLS
listeners restart like static pods when their manifests leave and come back, so every check here is
on real X.509: fingerprints, expiry dates, the certificate an API server serves.
"""

from __future__ import annotations

import hashlib
import ssl
import stat
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509

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
    import base64

    import yaml

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


def _run_and_answer(sb, platform: str, approve: bool, **params):
    from prefect.flow_runs import resume_flow_run

    from flows.certificate_renewal import renew_control_plane_certificates
    from tests.test_gitlab_restore import _paused_run_id

    box = {}
    t = threading.Thread(target=lambda: box.setdefault("state", run_flow_sync(
        renew_control_plane_certificates, platform=platform, dry_run=False, poll_interval_s=0.5,
        approval_timeout_s=120, **params)), daemon=True)
    t.start()
    resume_flow_run(_paused_run_id("renew-control-plane-certificates"),
                    run_input={"approve": approve, "approver": "alice" if approve else "bob"})
    t.join(300)
    assert not t.is_alive(), "the renewal did not finish"
    return box["state"]


def test_dry_run_plans_every_node_and_changes_nothing(fresh_control_plane, sandbox_platform):
    from flows.certificate_renewal import renew_control_plane_certificates
    from sandbox.control_plane import CONTROL_PLANE

    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in CONTROL_PLANE}
    state = run_flow_sync(renew_control_plane_certificates, platform=sandbox_platform)
    assert state.is_completed(), state.message
    plan = state.result()["plan"]
    assert list(plan) == list(CONTROL_PLANE)
    assert set(plan["cp-1"]) == set(MANAGED) | {"admin.conf", "super-admin.conf", "controller-manager.conf",
                                                "scheduler.conf"}
    assert set(plan["cp-2"]) == set(MANAGED) | {"admin.conf", "controller-manager.conf", "scheduler.conf"}
    assert {n: _files(sb, n) for n in CONTROL_PLANE} == before


def test_declined_renewal_changes_nothing(fresh_control_plane, sandbox_platform):
    from sandbox.control_plane import CONTROL_PLANE

    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in CONTROL_PLANE}
    state = _run_and_answer(sb, sandbox_platform, approve=False)
    assert state.is_completed(), state.message
    assert (state.result()["approved"], state.result()["approver"]) == (False, "bob")
    assert {n: _files(sb, n) for n in CONTROL_PLANE} == before


def test_failure_on_the_second_node_restores_it_and_leaves_the_third_untouched(fresh_control_plane,
                                                                                sandbox_platform):
    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in ("cp-1", "cp-2", "cp-3")}
    old_leaves = _leaves(sb, "cp-1")
    served_cp2 = _served(sb, "cp-2")
    fault = _root(sb, "cp-2") / "faults" / "kubeadm-renew"
    fault.parent.mkdir(parents=True, exist_ok=True)
    fault.write_text("apiserver-kubelet-client\n")  # kubeadm fails half-way: admin.conf, apiserver, ... renewed
    try:
        state = _run_and_answer(sb, sandbox_platform, approve=True)
    finally:
        fault.unlink()
    assert state.is_failed()
    assert "cp-2" in state.message and "backup was put back" in state.message
    result = state.result(raise_on_failure=False)
    nodes = {n["node"]: n for n in result["nodes"]}
    assert nodes["cp-1"]["ok"] and not nodes["cp-2"]["ok"] and nodes["cp-2"]["restored"] is True
    assert result["untouched"] == ["cp-3"] and "cp-3" not in nodes
    # cp-1 renewed: every kubeadm leaf has a new certificate, expiring later
    new_leaves = _leaves(sb, "cp-1")
    assert all(new_leaves[n].not_valid_after_utc > old_leaves[n].not_valid_after_utc for n in MANAGED)
    # cp-2: byte for byte what it was, and its API server serves its old certificate again
    assert _files(sb, "cp-2") == before["cp-2"]
    assert _served(sb, "cp-2") == served_cp2
    steps = [(s["step"], s["status"]) for s in result["steps"] if s["node"] == "cp-2"]
    assert ("kubeadm certs renew all", "failed") in steps and ("restore: verify", "done") in steps
    # cp-3: untouched
    assert _files(sb, "cp-3") == before["cp-3"]


def test_approved_renewal_renews_every_leaf_of_the_control_plane(fresh_control_plane, sandbox_platform):
    from sandbox.control_plane import CONTROL_PLANE

    sb = fresh_control_plane
    old = {n: {**_leaves(sb, n), **_kubeconfig_certs(sb, n)} for n in CONTROL_PLANE}
    ci_kubeconfig = Path(sb.extra["control_plane"]["ci_kubeconfig"])
    state = _run_and_answer(sb, sandbox_platform, approve=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["approver"] == "alice" and all(n["ok"] for n in result["nodes"])
    now = datetime.now(UTC)
    for node in CONTROL_PLANE:
        new = {**_leaves(sb, node), **_kubeconfig_certs(sb, node)}
        assert set(new) == set(old[node])
        for name, cert in new.items():
            assert cert.fingerprint(cert.signature_hash_algorithm) != old[node][name].fingerprint(
                cert.signature_hash_algorithm), (node, name)
            assert cert.not_valid_after_utc > now + timedelta(days=364), (node, name)
            assert cert.not_valid_before_utc <= now, (node, name)  # the not-yet-valid one is fixed too
        assert _served(sb, node) == new["apiserver.crt"]  # the API server restarted with it
        backup = Path(next(n["backup"] for n in result["nodes"] if n["node"] == node))
        assert stat.S_IMODE(backup.stat().st_mode) == 0o600
    # the CA is the same; the kubeconfig handed to CI now holds the last node's renewed admin certificate
    assert {n: (_root(sb, n) / "etc/kubernetes/ssl/ca.crt").read_bytes() for n in CONTROL_PLANE} == {
        n: (_root(sb, n).parent / "pristine" / "etc/kubernetes/ssl/ca.crt").read_bytes() for n in CONTROL_PLANE}
    import base64

    import yaml

    ci = yaml.safe_load(ci_kubeconfig.read_text())
    ci_cert = x509.load_pem_x509_certificate(base64.b64decode(ci["users"][0]["user"]["client-certificate-data"]))
    assert ci_cert == _kubeconfig_certs(sb, "cp-3")["admin.conf"]
    assert stat.S_IMODE(ci_kubeconfig.stat().st_mode) == 0o600


def test_a_second_renewal_waits_for_the_cluster_limit(fresh_control_plane, sandbox_platform):
    import asyncio

    from prefect.concurrency.asyncio import concurrency

    from flows.certificate_renewal import ensure_renewal_limit
    from sandbox.control_plane import CONTROL_PLANE

    sb = fresh_control_plane
    before = {n: _files(sb, n) for n in CONTROL_PLANE}
    limit = asyncio.run(ensure_renewal_limit(sandbox_platform, "sandbox"))
    held, release = threading.Event(), threading.Event()

    def hold():
        async def run():
            async with concurrency(limit, occupy=1, timeout_seconds=30):
                held.set()
                await asyncio.to_thread(release.wait, 60)
        asyncio.run(run())

    holder = threading.Thread(target=hold, daemon=True)
    holder.start()
    assert held.wait(30)
    try:
        state = _run_and_answer(sb, sandbox_platform, approve=True, lock_timeout_s=2)
    finally:
        release.set()
        holder.join(30)
    assert state.is_failed() and "holds the concurrency limit" in state.message
    assert {n: _files(sb, n) for n in CONTROL_PLANE} == before
