"""Real X.509 for the sandbox: keys, CAs and certificates issued with `cryptography`, and kubeadm's PKI.

Used by the emulated control-plane hosts (`sandbox/control_plane.py`), the stand-in `kubeadm`
(`sandbox/control_plane_scripts/kubeadm.py`), the TLS listeners, the tests and `benchmarks/cert_scan.py`.

kubeadm's layout (kubernetes.io *PKI certificates and requirements*, *Certificate Management with
kubeadm*): under the cert dir (kubespray's `kube_cert_dir`, /etc/kubernetes/ssl, with /etc/kubernetes/pki
a symlink to it) `ca`, `front-proxy-ca`, `etcd/ca` (CAs, ten years: kubeadm `CACertificateValidityPeriod`),
and leaves of one year (`CertificateValidityPeriod`): `apiserver`, `apiserver-kubelet-client`,
`apiserver-etcd-client`, `front-proxy-client`, `etcd/server`, `etcd/peer`, `etcd/healthcheck-client`; the
kubeconfigs `admin.conf`, `super-admin.conf`, `controller-manager.conf`, `scheduler.conf` embed a client
certificate signed by `ca`; `kubelet.conf` points to the kubelet's rotating
`/var/lib/kubelet/pki/kubelet-client-current.pem` (certificate and key in one file, a symlink to the
dated file the kubelet wrote last).
"""

from __future__ import annotations

import base64
import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

UTC = dt.UTC
YEAR = dt.timedelta(days=365)
CA_VALIDITY = dt.timedelta(days=3650)


def new_key(kind: str = "ECDSA-P256"):
    """A private key of kubeadm's `encryptionAlgorithm` kinds (RSA-2048, RSA-3072, RSA-4096, ECDSA-P256),
    plus RSA-1024 for the weak-key case."""
    if kind == "ECDSA-P256":
        return ec.generate_private_key(ec.SECP256R1())
    if kind.startswith("RSA-"):
        return rsa.generate_private_key(65537, int(kind[4:]))
    raise ValueError(f"unknown key kind {kind!r}")


def _name(cn: str, orgs: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, o) for o in orgs]
    return x509.Name([*attrs, x509.NameAttribute(NameOID.COMMON_NAME, cn)])


@dataclass
class Issued:
    cert: x509.Certificate
    key: object

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL,
                                      serialization.NoEncryption())


def issue(cn: str, *, issuer: Issued | None = None, key=None, orgs: tuple[str, ...] = (),
          dns: tuple[str, ...] = (), ips: tuple[str, ...] = (), is_ca: bool = False,
          not_before: dt.datetime | None = None, not_after: dt.datetime | None = None,
          usages: tuple[str, ...] = (), hash_name: str = "sha256", serial: int | None = None) -> Issued:
    """A certificate for `cn` signed by `issuer` (self-signed without one)."""
    now = dt.datetime.now(UTC)
    key = key or new_key()
    not_before = not_before or now - dt.timedelta(minutes=5)
    not_after = not_after or now + (CA_VALIDITY if is_ca else YEAR)
    subject = _name(cn, orgs)
    b = (x509.CertificateBuilder().subject_name(subject).public_key(key.public_key())
         .serial_number(serial or x509.random_serial_number()).not_valid_before(not_before)
         .not_valid_after(not_after)
         .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True))
    if is_ca:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, True, False, False, False), critical=True)
    else:
        b = b.add_extension(x509.KeyUsage(True, False, True, False, False, False, False, False, False), critical=True)
    eku = [{"server": ExtendedKeyUsageOID.SERVER_AUTH, "client": ExtendedKeyUsageOID.CLIENT_AUTH}[u] for u in usages]
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(eku), critical=False)
    sans = [x509.DNSName(d) for d in dns] + [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    signer = issuer.key if issuer else key
    if hash_name == "sha1":  # cryptography refuses to sign with SHA-1; openssl still does, as old tooling did
        self_signed = b.issuer_name(subject).sign(key, hashes.SHA256())  # openssl x509 -CA re-signs this
        return Issued(_openssl_sha1(self_signed, issuer), key)
    return Issued(b.issuer_name(issuer.cert.subject if issuer else subject).sign(signer, hashes.SHA256()), key)


def _openssl_sha1(cert: x509.Certificate, issuer: Issued | None) -> x509.Certificate:
    """`cert` re-signed with SHA-1 by `openssl x509 -sha1` (same subject, issuer, key, dates, extensions)."""
    import subprocess
    import tempfile

    if issuer is None:
        raise ValueError("a SHA-1 certificate needs an issuer here")
    with tempfile.TemporaryDirectory() as d:
        paths = {n: Path(d) / n for n in ("in.pem", "ca.pem", "ca.key", "out.pem")}
        paths["in.pem"].write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        paths["ca.pem"].write_bytes(issuer.cert_pem)
        paths["ca.key"].write_bytes(issuer.key_pem)
        days = max(1, (cert.not_valid_after_utc - dt.datetime.now(UTC)).days)
        subprocess.run(["openssl", "x509", "-in", str(paths["in.pem"]), "-CA", str(paths["ca.pem"]), "-CAkey",
                        str(paths["ca.key"]), "-sha1", "-days", str(days),
                        "-set_serial", str(cert.serial_number), "-out", str(paths["out.pem"])],
                       check=True, capture_output=True)
        return x509.load_pem_x509_certificate(paths["out.pem"].read_bytes())


def renew(old: x509.Certificate, issuer: Issued, key_kind_name: str, validity: dt.timedelta = YEAR) -> Issued:
    """What `kubeadm certs renew` does to one certificate (`cmd/kubeadm/app/phases/certs/renewal/`
    `manager.go`, `readwriter.go`): the existing certificate is the source of its attributes (subject,
    organisations, SANs, usages), a new key of the cluster's encryption algorithm is made and the CA
    signs a certificate valid for a year from now."""
    cn = old.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value
    orgs = tuple(a.value for a in old.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME))
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    usages: list[str] = []
    for ext in old.extensions:
        if isinstance(ext.value, x509.SubjectAlternativeName):
            dns = tuple(ext.value.get_values_for_type(x509.DNSName))
            ips = tuple(str(i) for i in ext.value.get_values_for_type(x509.IPAddress))
        elif isinstance(ext.value, x509.ExtendedKeyUsage):
            usages = [{ExtendedKeyUsageOID.SERVER_AUTH: "server", ExtendedKeyUsageOID.CLIENT_AUTH: "client"}[u]
                      for u in ext.value if u in (ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH)]
    now = dt.datetime.now(UTC)
    return issue(cn, issuer=issuer, key=new_key(key_kind_name), orgs=orgs, dns=dns, ips=ips,
                 not_before=now - dt.timedelta(minutes=5), not_after=now + validity, usages=tuple(usages))


def load(cert_path: Path, key_path: Path | None = None) -> Issued:
    cert = x509.load_pem_x509_certificate(Path(cert_path).read_bytes())
    key = serialization.load_pem_private_key(Path(key_path).read_bytes(), None) if key_path else None
    return Issued(cert, key)


def write_pair(issued: Issued, cert_path: Path, key_path: Path | None) -> None:
    """`cert_path` (0644) and `key_path` (0600), as kubeadm writes them; written beside, then renamed."""
    cert_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic(cert_path, issued.cert_pem, 0o644)
    if key_path is not None:
        _atomic(key_path, issued.key_pem, 0o600)


def _atomic(path: Path, data: bytes, mode: int) -> None:
    import os

    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def kubeconfig(server: str, ca: Issued, client: Issued, user: str, cluster: str = "kubernetes") -> str:
    """A kubeconfig as kubeadm writes one (`cmd/kubeadm/app/phases/kubeconfig`): the cluster CA and the
    client certificate and key embedded as base64 PEM."""
    import yaml

    b64 = lambda b: base64.b64encode(b).decode()
    context = f"{user}@{cluster}"
    return yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": context, "preferences": {},
        "clusters": [{"name": cluster, "cluster": {"server": server, "certificate-authority-data": b64(ca.cert_pem)}}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user}}],
        "users": [{"name": user, "user": {"client-certificate-data": b64(client.cert_pem),
                                          "client-key-data": b64(client.key_pem)}}],
    }, sort_keys=False)


# kubeadm's leaves: (file under the cert dir, CA file, CN, orgs, usages, SAN kind). `kubeadm certs renew all`
# renews these and the kubeconfigs of KUBECONFIG_USERS (`cmd/kubeadm/app/phases/certs/certlist.go`).
LEAVES: tuple[tuple[str, str, str, tuple[str, ...], tuple[str, ...], str], ...] = (
    ("apiserver", "ca", "kube-apiserver", (), ("server",), "apiserver"),
    ("apiserver-kubelet-client", "ca", "kube-apiserver-kubelet-client", ("kubeadm:cluster-admins",), ("client",), ""),
    ("front-proxy-client", "front-proxy-ca", "front-proxy-client", (), ("client",), ""),
    ("etcd/server", "etcd/ca", "{node}", (), ("server", "client"), "etcd"),
    ("etcd/peer", "etcd/ca", "{node}", (), ("server", "client"), "etcd"),
    ("etcd/healthcheck-client", "etcd/ca", "kube-etcd-healthcheck-client", (), ("client",), ""),
    ("apiserver-etcd-client", "etcd/ca", "kube-apiserver-etcd-client", (), ("client",), ""),
)
# kubeconfig file -> (user name in the file, client CN, orgs) (`cmd/kubeadm/app/phases/kubeconfig/kubeconfig.go`)
KUBECONFIG_USERS: dict[str, tuple[str, str, tuple[str, ...]]] = {
    "admin.conf": ("kubernetes-admin", "kubernetes-admin", ("kubeadm:cluster-admins",)),
    "super-admin.conf": ("kubernetes-super-admin", "kubernetes-super-admin", ("system:masters",)),
    "controller-manager.conf": ("system:kube-controller-manager", "system:kube-controller-manager", ()),
    "scheduler.conf": ("system:kube-scheduler", "system:kube-scheduler", ()),
}
