"""Stand-in `kubeadm certs renew all` / `kubeadm certs check-expiration` for the emulated control-plane hosts.

It really re-issues certificates with the cluster's CAs (`sandbox/pki.py`), so what the renewal flow
verifies afterwards is real X.509. Modelled on kubeadm (kubernetes/kubernetes `cmd/kubeadm/app/cmd/certs.go`,
`cmd/kubeadm/app/phases/certs/renewal/manager.go`; kubernetes.io *kubeadm certs*, *Certificate Management
with kubeadm*):

- `--cert-dir` (default /etc/kubernetes/pki; kubespray passes its `kube_cert_dir`, /etc/kubernetes/ssl);
  `--rootfs R`: kubeadm chroots into R first, so every path is under R; the kubeconfigs are in
  /etc/kubernetes (kubeadm's `KubernetesDir`, not a flag);
- renewals are unconditional, in kubeadm's order; each reuses the existing certificate's attributes (CN,
  organisations, SANs, usages), makes a new key of the ClusterConfiguration's `encryptionAlgorithm`
  (default RSA-2048) and is valid one year; a file that is not there is reported `MISSING!` and skipped;
  a CA whose key is absent (external CA mode) cannot renew what it signed;
- `kubelet.conf` is not renewed (the kubelet rotates its own client certificate);
- at the end it says the control-plane components must be restarted: it restarts nothing itself.

Faults (files under `<rootfs>/faults/`): `kubeadm-renew` holding a certificate's name (e.g.
`apiserver-etcd-client`): renewal fails at that certificate after renewing the ones before it, as a
signing error would, leaving a half-renewed PKI behind.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository

from sandbox import pki

# kubeadm's renewal handlers in the order `renew all` runs them, with their long names (certlist.go).
ORDER = [
    ("admin.conf", "certificate embedded in the kubeconfig file for the admin to use and for kubeadm itself"),
    ("super-admin.conf", "certificate embedded in the kubeconfig file for the super-admin"),
    ("apiserver", "certificate for serving the Kubernetes API"),
    ("apiserver-etcd-client", "certificate the apiserver uses to access etcd"),
    ("apiserver-kubelet-client", "certificate for the API server to connect to kubelet"),
    ("controller-manager.conf", "certificate embedded in the kubeconfig file for the controller manager to use"),
    ("etcd-healthcheck-client", "certificate for liveness probes to healthcheck etcd"),
    ("etcd-peer", "certificate for etcd nodes to communicate with each other"),
    ("etcd-server", "certificate for serving etcd"),
    ("front-proxy-client", "certificate for the front proxy client"),
    ("scheduler.conf", "certificate embedded in the kubeconfig file for the scheduler manager to use"),
]
CA_OF = {leaf.replace("/", "-"): ca for leaf, ca, *_ in pki.LEAVES}
FILE_OF = {leaf.replace("/", "-"): leaf for leaf, *_ in pki.LEAVES}


_ALIASES = {"-o": "output", "--output": "output", "--experimental-output": "output", "--cert-dir": "cert-dir",
            "--rootfs": "rootfs", "--config": "config", "--kubeconfig": "kubeconfig"}


def _flags(args: list[str]) -> tuple[list[str], dict[str, str]]:
    """Positional words and flags (`--flag value` or `--flag=value`), as cobra parses them."""
    pos, flags = [], {}
    i = 0
    while i < len(args):
        a = args[i]
        if a.startswith("--") and "=" in a:
            k, v = a.split("=", 1)
            flags[_ALIASES.get(k, k.lstrip("-"))] = v
        elif a in _ALIASES and i + 1 < len(args):
            flags[_ALIASES[a]] = args[i + 1]
            i += 1
        else:
            pos.append(a)
        i += 1
    return pos, flags


def _algorithm(root: Path) -> str:
    cfg = root / "etc" / "kubernetes" / "kubeadm-config.yaml"
    if cfg.exists():
        m = re.search(r"^\s*encryptionAlgorithm:\s*(\S+)", cfg.read_text(), re.MULTILINE)
        if m:
            return m.group(1)
    return "RSA-2048"  # kubeadm's default (v1beta4 ClusterConfiguration.encryptionAlgorithm)


def _ca(cert_dir: Path, name: str) -> pki.Issued | None:
    key = cert_dir / f"{name}.key"
    if not key.exists():
        return None
    return pki.load(cert_dir / f"{name}.crt", key)


def renew_all(root: Path, cert_dir: Path) -> int:
    print("[renew] Reading configuration from the cluster...")
    print("[renew] Error reading configuration from the Cluster. Falling back to default configuration")
    print()
    algorithm = _algorithm(root)
    fault_file = root / "faults" / "kubeadm-renew"
    fail_at = fault_file.read_text().strip() if fault_file.exists() else None
    kube_dir = root / "etc" / "kubernetes"
    for name, long_name in ORDER:
        if name == fail_at:
            print(f"error: failed to renew certificate {name}: unable to sign certificate: the CA's signer "
                  "returned an error (sandbox fault)", file=sys.stderr)
            return 1
        if name.endswith(".conf"):
            path = kube_dir / name
            if not path.exists():
                print(f"MISSING! {long_name}")
                continue
            ca = _ca(cert_dir, "ca")
            if ca is None:
                print(f"Detected external ca, {long_name} can't be renewed")
                continue
            _renew_kubeconfig(path, ca, algorithm)
        else:
            rel = FILE_OF[name]
            crt, key = cert_dir / f"{rel}.crt", cert_dir / f"{rel}.key"
            if not crt.exists():
                print(f"MISSING! {long_name}")
                continue
            ca = _ca(cert_dir, CA_OF[name])
            if ca is None:
                print(f"Detected external {CA_OF[name]}, {long_name} can't be renewed")
                continue
            new = pki.renew(pki.load(crt).cert, ca, algorithm)
            pki.write_pair(new, crt, key)
        print(f"{long_name} renewed")
    print()
    print("Done renewing certificates. You must restart the kube-apiserver, kube-controller-manager, "
          "kube-scheduler and etcd, so that they can use the new certificates.")
    return 0


def _renew_kubeconfig(path: Path, ca: pki.Issued, algorithm: str) -> None:
    import yaml
    from cryptography import x509

    doc = yaml.safe_load(path.read_text())
    user = doc["users"][0]["user"]
    old = x509.load_pem_x509_certificate(base64.b64decode(user["client-certificate-data"]))
    new = pki.renew(old, ca, algorithm)
    user["client-certificate-data"] = base64.b64encode(new.cert_pem).decode()
    user["client-key-data"] = base64.b64encode(new.key_pem).decode()
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)


def check_expiration(root: Path, cert_dir: Path, output: str) -> int:
    """`kubeadm certs check-expiration` (-o json: `output.kubeadm.k8s.io/v1alpha3` CertificateExpirationInfo,
    the fields kubespray's k8s-certs-renew.py reads: name, expirationDate, missing)."""
    import yaml
    from cryptography import x509

    now = dt.datetime.now(dt.UTC)
    rows = []
    for name, _ in ORDER:
        if name.endswith(".conf"):
            path = root / "etc" / "kubernetes" / name
            cert = None
            if path.exists():
                data = yaml.safe_load(path.read_text())["users"][0]["user"]["client-certificate-data"]
                cert = x509.load_pem_x509_certificate(base64.b64decode(data))
            ca_name = "ca"
        else:
            path = cert_dir / f"{FILE_OF[name]}.crt"
            cert = x509.load_pem_x509_certificate(path.read_bytes()) if path.exists() else None
            ca_name = CA_OF[name].replace("/", "-")
        rows.append({"name": name, "expirationDate": cert.not_valid_after_utc.strftime("%Y-%m-%dT%H:%M:%SZ")
                     if cert else "0001-01-01T00:00:00Z",
                     "residualTime": int((cert.not_valid_after_utc - now).total_seconds() * 1e9) if cert else 0,
                     "caName": ca_name, "externallyManaged": False, "missing": cert is None})
    if output == "json":
        print(json.dumps({"kind": "CertificateExpirationInfo", "apiVersion": "output.kubeadm.k8s.io/v1alpha3",
                          "certificates": rows, "certificateAuthorities": []}, indent=2))
        return 0
    print(f"{'CERTIFICATE':<27}{'EXPIRES':<25}{'RESIDUAL TIME':<16}{'CERTIFICATE AUTHORITY':<24}EXTERNALLY MANAGED")
    for r in rows:
        if r["missing"]:
            continue
        when = dt.datetime.strptime(r["expirationDate"], "%Y-%m-%dT%H:%M:%SZ")
        days = r["residualTime"] / 1e9 / 86400
        residual = f"{int(days)}d" if days >= 0 else "<invalid>"
        print(f"{r['name']:<27}{when:%b %d, %Y %H:%M} UTC   {residual:<16}{r['caName']:<24}no")
    return 0


def main(argv: list[str]) -> int:
    pos, flags = _flags(argv)
    root = Path(flags.get("rootfs", "/"))
    cert_dir = Path(flags.get("cert-dir", "/etc/kubernetes/pki"))
    cert_dir = root / cert_dir.relative_to("/")
    if pos[:3] == ["certs", "renew", "all"]:
        return renew_all(root, cert_dir)
    if pos[:2] == ["certs", "check-expiration"]:
        return check_expiration(root, cert_dir, flags.get("output", "text"))
    if pos[:1] == ["version"]:
        print('kubeadm version: &version.Info{Major:"1", Minor:"29", GitVersion:"v1.29.5-sandbox"}')
        return 0
    print(f'Error: unknown command "{" ".join(pos)}" for "kubeadm"\nRun \'kubeadm --help\' for usage.',
          file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
