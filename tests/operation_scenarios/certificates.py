"""renew-control-plane-certificates as the operation contract drives it: the sandbox's control-plane hosts
cp-1 and cp-2 (real sshd, a kubeadm PKI of real X.509, the stand-in `kubeadm certs renew all`).

Applied and restored are read from the hosts' disks with `cryptography`: the serial numbers of kubeadm's
leaves and of the kubeconfigs' client certificates, against the pristine copy the sandbox laid out.
The change while the approval waits: cp-2's apiserver-kubelet-client certificate is replaced (re-issued by
its CA, as an operator renewing it by hand would), so its serial in the re-plan differs.
The failure is injected before cp-2's backup (step 5): cp-1 is renewed, and its way back is the same
flow with `restore_backup` (the stamp the failure message names) and `nodes=["cp-1"]`.
"""

from __future__ import annotations

import base64
import re
from pathlib import Path

from tests.operation_scenarios import Scenario

NODES = ("cp-1", "cp-2")
LEAVES = ("apiserver.crt", "apiserver-kubelet-client.crt", "apiserver-etcd-client.crt", "front-proxy-client.crt",
          "etcd/server.crt", "etcd/peer.crt", "etcd/healthcheck-client.crt")
KUBECONFIGS = ("admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf")
CHANGED = ("cp-2", "apiserver-kubelet-client")


def serials(root: Path) -> dict[str, int]:
    """kubeadm's certificates under a host root, by name -> serial number (read with cryptography)."""
    import yaml
    from cryptography import x509

    out = {}
    for leaf in LEAVES:
        out[leaf] = x509.load_pem_x509_certificate((root / "etc/kubernetes/ssl" / leaf).read_bytes()).serial_number
    for conf in KUBECONFIGS:
        path = root / "etc/kubernetes" / conf
        if path.exists():
            data = yaml.safe_load(path.read_text())["users"][0]["user"]["client-certificate-data"]
            out[conf] = x509.load_pem_x509_certificate(base64.b64decode(data)).serial_number
    return out


def _now_and_pristine(sb, node: str) -> tuple[dict[str, int], dict[str, int]]:
    from sandbox.control_plane import base, host_root

    return serials(host_root(sb, node)), serials(base(sb) / node / "pristine")


def _reset(sb) -> None:
    from sandbox.control_plane import reset_control_plane, wait_serving

    reset_control_plane(sb)
    wait_serving(sb)


def _renewed(sb) -> bool:
    """Every certificate of cp-1 and cp-2 has a serial the sandbox did not lay out."""
    for node in NODES:
        now, pristine = _now_and_pristine(sb, node)
        if set(now) != set(pristine) or any(now[n] == pristine[n] for n in now):
            return False
    return True


def _as_laid_out(sb) -> bool:
    """Every certificate of every control-plane host is the one the sandbox laid out (same serial)."""
    from sandbox.control_plane import CONTROL_PLANE

    return all(now == pristine for now, pristine in (_now_and_pristine(sb, n) for n in CONTROL_PLANE))


def _replace_a_certificate(sb) -> None:
    from sandbox import pki
    from sandbox.control_plane import host_root

    node, name = CHANGED
    ssl_dir = host_root(sb, node) / "etc/kubernetes/ssl"
    new = pki.renew(pki.load(ssl_dir / f"{name}.crt").cert, pki.load(ssl_dir / "ca.crt", ssl_dir / "ca.key"),
                    "RSA-2048")
    pki.write_pair(new, ssl_dir / f"{name}.crt", ssl_dir / f"{name}.key")


def _applied(sb) -> bool:
    return _renewed(sb)


def _way_back(sb, failed):
    """The failure message names the way back: this flow with restore_backup=<stamp> and the renewed hosts."""
    import json

    from flows.certificate_renewal import renew_control_plane_certificates
    from tests.approvals import APPROVE, run_and_answer

    m = re.search(r'restore_backup="(\w+)" nodes=(\[[^\]]*\])', failed.message)
    assert m, failed.message
    nodes = json.loads(m.group(2))
    assert nodes == ["cp-1"], nodes
    return run_and_answer(renew_control_plane_certificates, {
        "platform": "sandbox", "restore_backup": m.group(1), "nodes": nodes, "dry_run": False,
        "poll_interval_s": 0.5}, APPROVE)


SCENARIOS = [Scenario("renew-control-plane-certificates", lambda sb: {"nodes": list(NODES)}, _applied,
                      _replace_a_certificate, _way_back, restored=_as_laid_out, reset=_reset, fail_at=5,
                      fixtures=("cert_sandbox",))]
