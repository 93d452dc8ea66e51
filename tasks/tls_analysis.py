"""What the certificates found mean: expiry, CA or leaf, chains, names, weak crypto, the renewal timer (pure).

`analyse(...)` takes every sighting, every problem a source reported and the renewal timers' states,
and returns a `CertReport`: one `CertEntry` per distinct certificate (deduplicated by SHA-256
fingerprint, listing every place it was found), sorted by expiry, and the findings. No network, no
Prefect: tested with real X.509 made in the tests.

Severities: `critical` (expired, not yet valid, within `critical_days`, a hostname the served
certificate does not cover, a signature that does not verify against its CA), `warning` (within
`warn_days`, weak keys and signatures, a self-signed certificate served to clients, the renewal timer
stale, failed, hung or missing), `unknown` (a source that could not be read: never healthy). Each
is a `CertFinding`: the one finding model (`tasks.findings`) with where it was found, the certificate's
fingerprint and days left; its advice comes from `ADVICE`.
"""

from __future__ import annotations

import ipaddress
from collections import defaultdict
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tasks.findings import Finding, Severity, counts
from tasks.tls_model import ENDPOINT, CertInfo, Sighting, SourceProblem, TimerState

MIN_RSA_BITS = 2048
MIN_EC_BITS = 256
WEAK_HASHES = {"sha1", "md5", "md2", "md4"}
HUNG_AFTER = timedelta(hours=1)  # k8s-certs-renew.service is a oneshot of a few minutes when it works


_RENEW_TIMER = ("check `systemctl status k8s-certs-renew.timer k8s-certs-renew.service` and `journalctl -u "
                "k8s-certs-renew.service` on the host; until it runs, renew with the certificate-renewal flow")
# What to do next, by finding title; an unknown finding (a source that could not be read: its title is
# the SourceProblem's kind) gets _SOURCE_ADVICE.
ADVICE: dict[str, str] = {
    "expired": "renew it now (the certificate-renewal flow, or `kubeadm certs renew` on the control plane) and "
               "restart what serves it",
    "expires-soon": "renew it before it expires (the certificate-renewal flow, or `kubeadm certs renew`)",
    "not-yet-valid": "check the clocks (NTP) of the host that issued it and of the hosts that use it",
    "ca-expired": "rotate the CA (kubeadm: *Manual rotation of CA certificates*) and reissue what it signed",
    "ca-expires-soon": "plan the CA rotation (kubeadm: *Manual rotation of CA certificates*)",
    "ca-not-yet-valid": "check the clocks (NTP) of the host that made the CA",
    "weak-crypto": "reissue it with an RSA key of 2048 bits or more (or EC P-256) and a SHA-256 signature",
    "bad-signature": "deploy the CA that signed it, or reissue it from the CA deployed beside it",
    "name-mismatch": "reissue it with the name in its subject alternative names",
    "self-signed": "serve a certificate issued by the platform's CA (is an ingress default certificate served?)",
    "renew-timer-missing": "enable kubespray's auto_renew_certificates (or renew with the certificate-renewal flow)",
    "renew-timer-disabled": _RENEW_TIMER, "renew-timer-inactive": _RENEW_TIMER,
    "renew-timer-never-ran": _RENEW_TIMER, "renew-timer-stale": _RENEW_TIMER, "renew-service-failed": _RENEW_TIMER,
    "renew-service-hung": "stop the hung k8s-certs-renew.service, check that the API server answers on "
                          "127.0.0.1 (its bind address), then start it again",
}
_SOURCE_ADVICE = "make the source readable (access, network, timeouts); until then its certificates are unknown"


@dataclass(frozen=True, kw_only=True)
class CertFinding(Finding):
    """A certificate finding: `tasks.findings.Finding` with `name` (the certificate's name, the timer unit
    or the source that could not be read), `where` it was found, its `fingerprint` and `days_left`. The
    subject is `name @ where`, the evidence the days left and fingerprint, the advice `ADVICE[title]`."""

    name: str
    where: str
    fingerprint: str | None = None
    days_left: float | None = None
    subject: str = field(init=False, default="")
    evidence: Mapping[str, object] = field(init=False, default_factory=dict, hash=False)
    advice: str = field(init=False, default="")

    def __post_init__(self) -> None:
        super().__post_init__()
        facts = {"days_left": self.days_left, "fingerprint": self.fingerprint[:16] if self.fingerprint else None}
        object.__setattr__(self, "subject", f"{self.name} @ {self.where}" if self.where else self.name)
        object.__setattr__(self, "evidence", {k: v for k, v in facts.items() if v is not None})
        fallback = _SOURCE_ADVICE if self.severity is Severity.UNKNOWN else ""
        object.__setattr__(self, "advice", ADVICE.get(self.title, fallback))


@dataclass
class CertEntry:
    """One distinct certificate and everything known about it."""

    cert: CertInfo
    places: list[str]
    sources: list[str]
    days_left: float
    status: str  # expired | not-yet-valid | critical | warning | ok
    chain: str = "n/a"  # verified | bad-signature | unknown-ca | self-signed
    issuer_fingerprint: str | None = None

    @property
    def is_ca(self) -> bool:
        return self.cert.is_ca

    def row(self) -> dict:
        c = self.cert
        return {
            "expires": c.not_after.strftime("%Y-%m-%d %H:%M"), "days_left": round(self.days_left, 1),
            "status": self.status, "kind": "CA" if c.is_ca else "leaf", "subject": c.common_name or c.subject,
            "issuer": c.issuer, "chain": self.chain, "key": f"{c.key_type}-{c.key_bits}",
            "signature": c.signature_hash or "-", "places": len(self.places), "where": "; ".join(self.places[:5])
            + (f" (+{len(self.places) - 5} more)" if len(self.places) > 5 else ""),
            "fingerprint": c.fingerprint[:16],
        }


@dataclass
class CertReport:
    now: datetime
    entries: list[CertEntry]  # sorted by expiry, soonest first
    findings: list[CertFinding]  # sorted by severity (worst first), then days left
    problems: list[SourceProblem] = field(default_factory=list)
    timers: list[TimerState] = field(default_factory=list)

    @property
    def leaves(self) -> list[CertEntry]:
        return [e for e in self.entries if not e.is_ca]

    @property
    def cas(self) -> list[CertEntry]:
        return [e for e in self.entries if e.is_ca]

    def counts(self) -> dict[str, int]:
        return counts(self.findings, (Severity.CRITICAL, Severity.UNKNOWN, Severity.WARNING, Severity.INFO))

    def worst(self) -> Severity:
        """The worst finding's severity (info reads as ok), ok when there are none."""
        return Severity.worst(f.severity for f in self.findings).status

    def entry(self, fingerprint: str) -> CertEntry | None:
        return next((e for e in self.entries if e.cert.fingerprint == fingerprint), None)


# --- single-certificate checks -----------------------------------------------------------------------


def expiry_status(cert: CertInfo, now: datetime, warn_days: float, critical_days: float) -> str:
    if now < cert.not_before:
        return "not-yet-valid"
    days = cert.days_left(now)
    if days <= 0:
        return "expired"
    if days <= critical_days:
        return "critical"
    if days <= warn_days:
        return "warning"
    return "ok"


def name_matches(name: str, cert: CertInfo) -> bool:
    """Does `cert` cover host `name`? RFC 6125: IP addresses only against IP SANs, names against DNS SANs
    with a wildcard only as the whole left-most label; the CN is ignored when there are DNS SANs (and Go,
    thus Kubernetes and etcd clients, ignores it always since 1.15: so do we)."""
    try:
        ip = ipaddress.ip_address(name.strip("[]"))
    except ValueError:
        ip = None
    if ip is not None:
        return any(ipaddress.ip_address(a) == ip for a in cert.ip_addresses)
    host = name.lower().rstrip(".")
    for pattern in cert.dns_names:
        p = pattern.lower().rstrip(".")
        if p == host:
            return True
        if p.startswith("*.") and "." in host and host.split(".", 1)[1] == p[2:] and host.split(".", 1)[0]:
            return True
    return False


def weak_crypto(cert: CertInfo) -> list[str]:
    out = []
    if cert.key_type == "RSA" and cert.key_bits < MIN_RSA_BITS:
        out.append(f"RSA key of {cert.key_bits} bits (under {MIN_RSA_BITS})")
    elif cert.key_type == "EC" and cert.key_bits < MIN_EC_BITS:
        out.append(f"EC key of {cert.key_bits} bits (under {MIN_EC_BITS})")
    elif cert.key_type == "DSA":
        out.append("DSA key")
    if cert.signature_hash in WEAK_HASHES:
        out.append(f"signed with {cert.signature_hash.upper()}")
    return out


# --- chains ------------------------------------------------------------------------------------------


class _Verifier:
    """Verifies 'issued by' once per (certificate, issuer) pair; certificates parsed from DER once."""

    def __init__(self) -> None:
        self._parsed: dict[str, x509.Certificate] = {}
        self._done: dict[tuple[str, str], bool] = {}

    def _x509(self, c: CertInfo) -> x509.Certificate:
        if c.fingerprint not in self._parsed:
            self._parsed[c.fingerprint] = x509.load_der_x509_certificate(c.der)
        return self._parsed[c.fingerprint]

    def issued_by(self, cert: CertInfo, issuer: CertInfo) -> bool:
        key = (cert.fingerprint, issuer.fingerprint)
        if key not in self._done:
            try:
                _verify_issued_by(self._x509(cert), self._x509(issuer))
                self._done[key] = True
            except (InvalidSignature, ValueError, TypeError, UnsupportedAlgorithm):
                self._done[key] = False  # wrong issuer name, bad signature, or an algorithm not supported
        return self._done[key]


def _verify_issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> None:
    """cryptography's `verify_directly_issued_by`; for SHA-1 signatures, which it refuses to check, the
    same check by hand (issuer name, then the signature with the issuer's RSA or EC key)."""
    try:
        cert.verify_directly_issued_by(issuer)
        return
    except ValueError:
        if cert.issuer != issuer.subject or cert.signature_hash_algorithm is None:
            raise
    key = issuer.public_key()
    if isinstance(key, rsa.RSAPublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, padding.PKCS1v15(), cert.signature_hash_algorithm)
    elif isinstance(key, ec.EllipticCurvePublicKey):
        key.verify(cert.signature, cert.tbs_certificate_bytes, ec.ECDSA(cert.signature_hash_algorithm))
    else:
        raise ValueError("unsupported issuer key")


def verify_chains(unique: dict[str, CertInfo], by_group: dict[str, list[CertInfo]],
                  groups_of: dict[str, set[str]]) -> dict[str, tuple[str, str | None]]:
    """fingerprint -> (chain status, issuer fingerprint). The issuer is looked for first among the
    certificates found with it (the same file, served chain or secret), then among every certificate
    found anywhere whose subject is this one's issuer."""
    by_subject: dict[str, list[CertInfo]] = defaultdict(list)
    for c in unique.values():
        by_subject[c.subject].append(c)
    verifier = _Verifier()
    out: dict[str, tuple[str, str | None]] = {}
    for fp, cert in unique.items():
        if cert.self_signed:
            out[fp] = ("self-signed" if verifier.issued_by(cert, cert) else "bad-signature", fp)
            continue
        near = [c for g in groups_of.get(fp, ()) for c in by_group.get(g, ())
                if c.subject == cert.issuer and c.fingerprint != fp]
        candidates = near + [c for c in by_subject.get(cert.issuer, ()) if c not in near and c.fingerprint != fp]
        if not candidates:
            out[fp] = ("unknown-ca", None)
            continue
        issuer = next((c for c in candidates if verifier.issued_by(cert, c)), None)
        out[fp] = ("verified", issuer.fingerprint) if issuer else ("bad-signature", candidates[0].fingerprint)
    return out


# --- the renewal timer -------------------------------------------------------------------------------


def timer_findings(t: TimerState, now: datetime, max_age_days: int, timer: str = "k8s-certs-renew.timer",
                   service: str = "k8s-certs-renew.service") -> list[CertFinding]:
    """kubespray's `auto_renew_certificates` timer (`roles/kubernetes/control-plane/templates/
    k8s-certs-renew.timer.j2`, first Monday of each month): missing, disabled, not run in `max_age_days`,
    last run failed, or its oneshot service stuck `activating` (the renew script waits forever for
    127.0.0.1:<apiserver port>, which never answers when the API server's bind address was changed)."""
    out = []

    def add(kind: str, message: str, severity: Severity = Severity.WARNING) -> None:
        out.append(CertFinding(severity=severity, title=kind, name=timer, where=t.host, summary=message))

    if t.timer_load and t.timer_load != "loaded":
        add("renew-timer-missing", f"{timer} is {t.timer_load} on {t.host}: kubeadm's leaf certificates are not "
            "renewed automatically (kubespray auto_renew_certificates)")
        return out
    if t.timer_enabled and t.timer_enabled not in ("enabled", "static", "enabled-runtime"):
        add("renew-timer-disabled", f"{timer} is {t.timer_enabled} on {t.host}")
    if t.timer_active and t.timer_active != "active":
        add("renew-timer-inactive", f"{timer} is {t.timer_active} on {t.host}: it will not fire")
    if t.last_trigger is None:
        add("renew-timer-never-ran", f"{timer} has never fired on {t.host}")
    elif now - t.last_trigger > timedelta(days=max_age_days):
        days = (now - t.last_trigger).days
        add("renew-timer-stale", f"{timer} last fired {days} days ago on {t.host} (more than {max_age_days})")
    if t.service_active == "activating" and t.state_since and now - t.state_since > HUNG_AFTER:
        hours = (now - t.state_since).total_seconds() / 3600
        add("renew-service-hung", f"{service} has been starting for {hours:.0f} h on {t.host}: the renew script "
            "is probably waiting for the API server on 127.0.0.1 (bind address changed?)")
    elif t.service_active == "failed" or (t.service_result and t.service_result != "success") or (
            t.exit_status not in (None, 0)):
        add("renew-service-failed", f"{service}'s last run failed on {t.host} (result {t.service_result or '?'}, "
            f"exit status {t.exit_status})")
    return out


# --- the whole analysis ------------------------------------------------------------------------------


def analyse(found: Iterable[Sighting], problems: Iterable[SourceProblem] = (), timers: Iterable[TimerState] = (),
            *, now: datetime, warn_days: float = 30, critical_days: float = 7, timer_max_age_days: int = 35,
            timer_unit: str = "k8s-certs-renew.timer", service_unit: str = "k8s-certs-renew.service") -> CertReport:
    """Every sighting, problem and timer state of one scan -> the report (see the module docstring)."""
    unique: dict[str, CertInfo] = {}
    places: dict[str, list[str]] = defaultdict(list)
    sources: dict[str, set[str]] = defaultdict(set)
    by_group: dict[str, list[CertInfo]] = defaultdict(list)
    groups_of: dict[str, set[str]] = defaultdict(set)
    served: list[Sighting] = []
    for s in found:
        fp = s.cert.fingerprint
        unique.setdefault(fp, s.cert)
        places[fp].append(s.where)
        sources[fp].add(s.source)
        by_group[s.group].append(s.cert)
        groups_of[fp].add(s.group)
        if s.source == ENDPOINT and s.position == 0:
            served.append(s)
    chains = verify_chains(unique, by_group, groups_of)
    entries, findings = [], []
    for fp, cert in unique.items():
        status = expiry_status(cert, now, warn_days, critical_days)
        chain, issuer_fp = chains.get(fp, ("n/a", None))
        where = sorted(set(places[fp]))
        entry = CertEntry(cert, where, sorted(sources[fp]), cert.days_left(now), status, chain, issuer_fp)
        entries.append(entry)
        findings += _cert_findings(entry, now, critical_days)
    for s in served:
        findings += _served_findings(s, chains)
    for p in problems:
        findings.append(CertFinding(severity=Severity.UNKNOWN, title=p.kind, name=p.source, where=p.where,
                                    summary=p.message))
    timers = list(timers)
    for t in timers:
        findings += timer_findings(t, now, timer_max_age_days, timer_unit, service_unit)
    entries.sort(key=lambda e: (e.cert.not_after, e.cert.subject))
    findings.sort(key=lambda f: (-f.severity.rank, f.days_left if f.days_left is not None else 1e9,
                                 f.title, f.where))
    return CertReport(now, entries, findings, list(problems), timers)


def _cert_findings(e: CertEntry, now: datetime, critical_days: float) -> list[CertFinding]:
    c = e.cert
    what = ("CA " if c.is_ca else "") + (c.common_name or c.subject)
    where = "; ".join(e.places[:3]) + (f" (+{len(e.places) - 3} more)" if len(e.places) > 3 else "")
    prefix = "ca-" if c.is_ca else ""
    out = []
    days = round(e.days_left, 1)

    def add(severity: Severity, title: str, summary: str) -> None:
        out.append(CertFinding(severity=severity, title=title, name=what, where=where, summary=summary,
                               fingerprint=c.fingerprint, days_left=days))

    if e.status == "expired":
        add(Severity.CRITICAL, prefix + "expired", f"expired {-days:g} days ago ({c.not_after:%Y-%m-%d %H:%M} UTC)")
    elif e.status == "not-yet-valid":
        add(Severity.CRITICAL, prefix + "not-yet-valid",
            f"not valid before {c.not_before:%Y-%m-%d %H:%M} UTC (clock skew or a wrong date)")
    elif e.status in ("critical", "warning"):
        add(Severity(e.status), prefix + "expires-soon", f"expires in {days:g} days ({c.not_after:%Y-%m-%d %H:%M} UTC)")
    for weak in weak_crypto(c):
        if c.self_signed and weak.startswith("signed with"):
            continue  # a root's self-signature is not checked by clients (RFC 5280 6.1: trust anchor)
        add(Severity.WARNING, "weak-crypto", weak)
    if e.chain == "bad-signature":
        add(Severity.CRITICAL, "bad-signature", f"its signature does not verify against the CA named {c.issuer} "
            "found beside it (the CA was replaced, or the wrong CA is deployed)")
    return out


def _served_findings(s: Sighting, chains: dict[str, tuple[str, str | None]]) -> list[CertFinding]:
    c = s.cert
    out = []
    what = c.common_name or c.subject
    if s.expected_name and not name_matches(s.expected_name, c):
        names = ", ".join([*c.dns_names, *c.ip_addresses]) or "none"
        out.append(CertFinding(severity=Severity.CRITICAL, title="name-mismatch", name=what, where=s.where,
                               summary=f"serves a certificate without {s.expected_name} in its SANs (has: {names})",
                               fingerprint=c.fingerprint))
    status = chains.get(c.fingerprint, ("n/a", None))[0]
    if status == "self-signed" and not c.is_ca:
        out.append(CertFinding(severity=Severity.WARNING, title="self-signed", name=what, where=s.where,
                               summary="serves a self-signed certificate (an ingress controller's default "
                               "certificate?)", fingerprint=c.fingerprint))
    return out
