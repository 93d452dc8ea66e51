"""What a certificate is and where it was found; reading PEM, kubeconfigs, TLS secrets and systemd (pure).

Everything here is a pure function over bytes or text already fetched: no network, no Prefect.
`tasks/tls.py` fetches (SSH, TLS handshakes, the Kubernetes API, local files), `tasks/tls_analysis.py`
says what the certificates mean, `tasks/tls_report.py` renders the reports.

Private keys never pass through here: the host scan extracts only `CERTIFICATE` blocks on the host
(`tasks/tls.py`), secrets lose `tls.key` as each page arrives, and a kubeconfig's `client-key-data`
is never read.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtensionOID, NameOID

PEM_BLOCK = re.compile(rb"-----BEGIN CERTIFICATE-----\r?\n.*?-----END CERTIFICATE-----", re.DOTALL)
_SHA256 = hashes.SHA256()
_DER = Encoding.DER

# Where a certificate was seen.
HOST, ENDPOINT, SECRET, KUBECONFIG = "host", "endpoint", "secret", "kubeconfig"


@dataclass(frozen=True)
class CertInfo:
    """The facts of one X.509 certificate that the analysis needs (DER kept for chain verification)."""

    fingerprint: str  # SHA-256 of the DER, hex
    subject: str  # RFC 4514
    common_name: str
    issuer: str
    serial: str
    not_before: datetime
    not_after: datetime
    is_ca: bool
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    key_type: str  # RSA, EC, Ed25519, DSA, ...
    key_bits: int
    signature_hash: str | None  # sha256, sha1, ... (None for Ed25519)
    der: bytes = field(repr=False, compare=False)

    @property
    def self_signed(self) -> bool:
        return self.subject == self.issuer

    def days_left(self, now: datetime) -> float:
        return (self.not_after - now).total_seconds() / 86400.0


@dataclass(frozen=True)
class Sighting:
    """One place a certificate was found. Certificates found together (one file, one served chain, one
    secret) share a `group`, which is where the chain is first verified."""

    cert: CertInfo
    source: str  # host | endpoint | secret | kubeconfig
    where: str  # "cp-1:/etc/kubernetes/ssl/apiserver.crt", "endpoint apiserver cp-1 (127.0.0.1:6443)", ...
    group: str
    position: int = 0  # 0: the leaf of a served chain, the first certificate of a file
    expected_name: str | None = None  # endpoints: the SNI name its leaf must carry
    host: str | None = None  # hosts: the node's label


@dataclass(frozen=True)
class SourceProblem:
    """Something that could not be checked. `unknown` is never healthy: it is reported as a finding."""

    source: str
    where: str
    kind: str  # unreachable | timeout | unreadable | unparseable | no-certificate | missing | error
    message: str


@dataclass(frozen=True)
class TimerState:
    """kubespray's `k8s-certs-renew.timer` and its service on one control-plane host (`systemctl show`)."""

    host: str
    timer_load: str = ""  # LoadState: loaded | not-found
    timer_active: str = ""  # ActiveState of the timer: active | inactive
    timer_enabled: str = ""  # UnitFileState: enabled | disabled
    last_trigger: datetime | None = None
    next_elapse: datetime | None = None
    service_active: str = ""  # inactive | activating | failed | active
    service_result: str = ""  # success | exit-code | timeout | signal | ...
    exit_status: int | None = None
    last_exit: datetime | None = None
    state_since: datetime | None = None  # when the service entered its current state


# --- certificates ------------------------------------------------------------------------------------


def _attr(name: x509.Name, oid) -> str:
    values = name.get_attributes_for_oid(oid)
    return str(values[0].value) if values else ""


def _key(cert: x509.Certificate) -> tuple[str, int]:
    key = cert.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        return "RSA", key.key_size
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "EC", key.curve.key_size
    if isinstance(key, dsa.DSAPublicKey):
        return "DSA", key.key_size
    name = type(key).__name__.replace("PublicKey", "").lstrip("_")
    return name, {"Ed25519": 256, "Ed448": 456}.get(name, 0)


def cert_info(cert: x509.Certificate) -> CertInfo:
    """The facts of a parsed certificate (the fast path: only what the analysis reads)."""
    dns: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    is_ca = False
    for ext in cert.extensions:
        oid = ext.oid
        if oid == ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            dns = tuple(ext.value.get_values_for_type(x509.DNSName))
            ips = tuple(str(i) for i in ext.value.get_values_for_type(x509.IPAddress))
        elif oid == ExtensionOID.BASIC_CONSTRAINTS:
            is_ca = bool(ext.value.ca)
    try:
        sig = cert.signature_hash_algorithm
        sig_name = sig.name if sig is not None else None
    except Exception:  # noqa: BLE001 - an algorithm cryptography does not know (e.g. MD2): name it by OID
        sig_name = cert.signature_algorithm_oid.dotted_string
    key_type, key_bits = _key(cert)
    subject = cert.subject
    der = cert.public_bytes(_DER)
    return CertInfo(
        fingerprint=cert.fingerprint(_SHA256).hex(), subject=subject.rfc4514_string(),
        common_name=_attr(subject, NameOID.COMMON_NAME), issuer=cert.issuer.rfc4514_string(),
        serial=format(cert.serial_number, "x"), not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc, is_ca=is_ca, dns_names=dns, ip_addresses=ips, key_type=key_type,
        key_bits=key_bits, signature_hash=sig_name, der=der,
    )


def parse_pem(data: bytes | str) -> tuple[list[CertInfo], list[str]]:
    """Every certificate in a PEM text, and a message per block that does not parse.

    A text without any `BEGIN CERTIFICATE` block gives ([], []): the caller decides whether that is
    a problem (a `.crt` file) or not (a kubeconfig line)."""
    if isinstance(data, str):
        data = data.encode()
    try:  # the whole bundle at once: one call into the Rust parser
        return [cert_info(c) for c in x509.load_pem_x509_certificates(data)], []
    except ValueError:
        pass
    certs, errors = [], []
    for n, block in enumerate(PEM_BLOCK.findall(data)):
        try:
            certs.append(cert_info(x509.load_pem_x509_certificate(block)))
        except ValueError as exc:
            errors.append(f"certificate block {n + 1} does not parse: {exc}")
    if not certs and not errors and b"-----BEGIN CERTIFICATE-----" in data:
        errors.append("a BEGIN CERTIFICATE line without a complete block")
    return certs, errors


def parse_der(chain: Iterable[bytes]) -> tuple[list[CertInfo], list[str]]:
    """Certificates given as DER (a chain served in a TLS handshake)."""
    certs, errors = [], []
    for n, der in enumerate(chain):
        try:
            certs.append(cert_info(x509.load_der_x509_certificate(der)))
        except ValueError as exc:
            errors.append(f"served certificate {n + 1} does not parse: {exc}")
    return certs, errors


def sightings(certs: list[CertInfo], source: str, where: str, group: str | None = None, *,
              expected_name: str | None = None, host: str | None = None) -> list[Sighting]:
    """The sightings of certificates found together at one place, in their order."""
    return [Sighting(c, source, where, group or where, n, expected_name if n == 0 else None, host)
            for n, c in enumerate(certs)]


# --- kubeconfigs -------------------------------------------------------------------------------------

# The certificate fields of a kubeconfig (client-go `clientcmd/api/v1/types.go`): the cluster's CA and the
# user's client certificate, inline (`*-data`, base64 PEM) or as a file path. `client-key-data` is never read.
KUBECONFIG_CERT_FIELDS = ("certificate-authority-data", "client-certificate-data", "certificate-authority",
                          "client-certificate")


def kubeconfig_cert_refs(doc: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, field, value) of every certificate a parsed kubeconfig holds or points to."""
    out = []
    for entry in doc.get("clusters") or []:
        c = (entry or {}).get("cluster") or {}
        for f in ("certificate-authority-data", "certificate-authority"):
            if c.get(f):
                out.append((f"cluster {entry.get('name')}", f, str(c[f])))
    for entry in doc.get("users") or []:
        u = (entry or {}).get("user") or {}
        for f in ("client-certificate-data", "client-certificate"):
            if u.get(f):
                out.append((f"user {entry.get('name')}", f, str(u[f])))
    return out


def kubeconfig_lines(text: str) -> list[tuple[str, str, str]]:
    """(label, field, value) from the certificate lines a host printed for one kubeconfig (`grep`)."""
    out = []
    for line in text.splitlines():
        key, _, value = line.strip().partition(":")
        if key in KUBECONFIG_CERT_FIELDS and value.strip():
            out.append(("cluster" if "authority" in key else "user", key, value.strip()))
    return out


def decode_b64_pem(value: str) -> bytes:
    """The PEM inside a kubeconfig's `*-data` field or a secret's data value; ValueError when not base64."""
    try:
        return base64.b64decode(value.encode(), validate=True)
    except (ValueError, base64.binascii.Error) as exc:
        raise ValueError(f"not base64: {exc}") from None


# --- Kubernetes secrets ------------------------------------------------------------------------------

TLS_SECRET_KEYS = ("tls.crt", "ca.crt")


def secret_tls_fields(obj: dict[str, Any]) -> dict[str, Any] | None:
    """What a listed Secret holds that concerns certificates, or None: `kubernetes.io/tls` secrets and
    Opaque ones with a `tls.crt` (cert-manager and hand-made secrets). `tls.key` is dropped here."""
    data = obj.get("data") or {}
    if "tls.crt" not in data:
        return None
    meta = obj.get("metadata") or {}
    return {"namespace": meta.get("namespace", ""), "name": meta.get("name", ""), "type": obj.get("type", ""),
            **{k: data[k] for k in TLS_SECRET_KEYS if data.get(k)}}


# --- systemd -----------------------------------------------------------------------------------------

_TS = re.compile(r"(\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2})(?:\s+(UTC|GMT))?")


def parse_systemctl_show(text: str) -> dict[str, str]:
    """`systemctl show -p A -p B UNIT` output (`Key=Value` lines) as a dict."""
    out = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            out[key.strip()] = value.strip()
    return out


def systemd_time(value: str | None) -> datetime | None:
    """A systemd timestamp as `systemctl show` prints it under TZ=UTC (`Mon 2024-05-06 03:00:00 UTC`);
    None for `n/a`, empty or 0 (never)."""
    if not value or value in ("n/a", "0"):
        return None
    if value.startswith("@") and value[1:].isdigit():  # --timestamp=unix (systemd 248+)
        return datetime.fromtimestamp(int(value[1:]), UTC)
    m = _TS.search(value)
    if not m:
        return None
    return datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)


# The properties read (systemd.timer(5), systemd.service(5), org.freedesktop.systemd1(5)).
TIMER_PROPERTIES = ("LoadState", "ActiveState", "UnitFileState", "LastTriggerUSec", "NextElapseUSecRealtime")
SERVICE_PROPERTIES = ("LoadState", "ActiveState", "SubState", "Result", "ExecMainStatus", "ExecMainExitTimestamp",
                      "StateChangeTimestamp")


def timer_state(host: str, timer: dict[str, str], service: dict[str, str]) -> TimerState:
    status = service.get("ExecMainStatus", "")
    return TimerState(
        host=host, timer_load=timer.get("LoadState", ""), timer_active=timer.get("ActiveState", ""),
        timer_enabled=timer.get("UnitFileState", ""), last_trigger=systemd_time(timer.get("LastTriggerUSec")),
        next_elapse=systemd_time(timer.get("NextElapseUSecRealtime")),
        service_active=service.get("ActiveState", ""), service_result=service.get("Result", ""),
        exit_status=int(status) if status.lstrip("-").isdigit() else None,
        last_exit=systemd_time(service.get("ExecMainExitTimestamp")),
        state_since=systemd_time(service.get("StateChangeTimestamp")),
    )
