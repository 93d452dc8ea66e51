"""Renewing a kubeadm control plane's certificates on one host, and putting a host's backup back: what
kubeadm renews (pure) and each action on the host, over the SSH connection the operation's session holds.

What one host goes through, as kubeadm documents a manual renewal (kubernetes.io *Certificate Management
with kubeadm*, "Manual certificate renewal") and kubespray's `k8s-certs-renew.sh.j2` scripts it (the order
itself is written once, as the steps of the plan in `tasks/tls_plans.py`):

- `backup_pki`: the certificate folder, the kubeconfigs and the static pod manifests in one tar (`tar -C
  <root>`), kept on the host under `layout.backup_dir` (folder 0700, archive 0600);
- `kubeadm_renew`: `kubeadm certs renew all --cert-dir <kube_cert_dir>` (`--rootfs <root>` when the host's
  files live under a root other than /: kubeadm then chroots);
- `restart_static_pods`: move the manifests out of the manifests folder, wait the kubelet's
  `fileCheckFrequency` (20 s), move them back (one remote shell that ignores SIGHUP, so a lost session
  never leaves the manifests out);
- `wait_ready`: the API server's `/readyz` (TLS verified against the cluster CA) answers `ok` and serves
  the certificate now on disk; `check_renewed`: every certificate planned has a new one expiring later;
- `refresh_kubeconfig`: a kubeconfig on the worker gets the host's renewed client certificate;
- `put_back`: a backup extracted over the host's files (the manifests moved back first), and
  `compare_backup`: `tar --compare` proves the files are the backup's, byte for byte.
"""

from __future__ import annotations

import asyncio
import base64
import os
import posixpath
import ssl
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from tasks.redact import Redactor
from tasks.ssh import connect, run_command
from tasks.tls import HostScan, fetch_served_chain, host_path
from tasks.tls_model import CertInfo, parse_der

# What `kubeadm certs renew all` renews (cmd/kubeadm/app/phases/certs/renewal, certlist.go; kubespray's
# k8s-certs-renew.sh.j2 lists the same): leaves under the cert dir, and the client certificates embedded
# in these kubeconfigs. Not renewed by it: the CAs, kubelet.conf (the kubelet rotates its own client
# certificate), and kubespray's host-deployed etcd certificates in /etc/ssl/etcd/ssl (its etcd role).
KUBEADM_LEAVES = ("apiserver.crt", "apiserver-kubelet-client.crt", "apiserver-etcd-client.crt",
                  "front-proxy-client.crt", "etcd/server.crt", "etcd/peer.crt", "etcd/healthcheck-client.crt")
KUBEADM_KUBECONFIGS = ("admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf")
COMPAT_CERT_DIR = "/etc/kubernetes/pki"  # kubespray's kube_cert_compat_dir, a symlink to kube_cert_dir
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"  # the backups' names: certificates-<host>-<stamp>.tar
STAMP_RE = r"^\d{8}T\d{6}Z$"

_RESTART_STATIC_PODS = r'''
trap '' HUP
manifests=$1; away=$2; wait=$3; shift 3
mkdir -p -m 0700 "$away"
for p; do if [ -e "$manifests/$p" ]; then mv "$manifests/$p" "$away/$p" && echo "moved out $p"; fi; done
sleep "$wait"
for p; do if [ -e "$away/$p" ]; then mv "$away/$p" "$manifests/$p" && echo "moved back $p"; fi; done
'''
_PUT_BACK_MANIFESTS = r'''
manifests=$1; away=$2
[ -d "$away" ] || exit 0
for f in "$away"/*; do [ -e "$f" ] && mv "$f" "$manifests/" && echo "put back ${f##*/}"; done; true
'''


class StepFailed(RuntimeError):
    """A renewal check failed; the message says which and why (redacted)."""


# --- what is managed (pure) ------------------------------------------------------------------------


def managed_certs(scan: HostScan, layout: Any) -> dict[str, CertInfo]:
    """The kubeadm-managed certificates a host scan found: name (`apiserver.crt`, `admin.conf`) -> cert."""
    dirs = {layout.cert_dir.rstrip("/"), COMPAT_CERT_DIR}
    kube_dir = layout.kubeconfig_dir.rstrip("/")
    out: dict[str, CertInfo] = {}
    for s in scan.sightings:
        path = s.where.split(":", 1)[1]
        for leaf in KUBEADM_LEAVES:
            if s.position == 0 and any(path == f"{d}/{leaf}" for d in dirs):
                out.setdefault(leaf, s.cert)
        for conf in KUBEADM_KUBECONFIGS:
            if path.startswith(f"{kube_dir}/{conf} ") and "client-certificate-data" in path:
                out.setdefault(conf, s.cert)
    return dict(sorted(out.items()))


def not_renewed(scan: HostScan, renew: dict[str, CertInfo], now: datetime) -> list[str]:
    """Every other certificate on the host (CAs, the kubelet's, kubespray's etcd ones), with days left."""
    managed = {c.fingerprint for c in renew.values()}
    return sorted({f"{s.where} ({'CA' if s.cert.is_ca else 'leaf'}, {s.cert.days_left(now):.0f} days)"
                   for s in scan.sightings if s.cert.fingerprint not in managed})


def cert_facts(certs: dict[str, CertInfo]) -> dict[str, dict[str, str]]:
    """The exact certificates, as a plan's facts name them: serial, SHA-256 fingerprint, expiry."""
    return {name: {"serial": c.serial, "fingerprint": c.fingerprint, "not_after": c.not_after.isoformat()}
            for name, c in sorted(certs.items())}


def ca_of(scan: HostScan, label: str, layout: Any) -> CertInfo | None:
    """The cluster CA (`ca.crt`) a host holds: what its API server's /readyz is verified against."""
    wanted = {f"{label}:{layout.cert_dir.rstrip('/')}/ca.crt", f"{label}:{COMPAT_CERT_DIR}/ca.crt"}
    return next((s.cert for s in scan.sightings if s.where in wanted), None)


def backup_archive(root: str, layout: Any, label: str, stamp: str) -> str:
    """Where a host's backup of `stamp` lies on the host."""
    return posixpath.join(host_path(root, layout.backup_dir), f"certificates-{label}-{stamp}.tar")


def pem(cert: CertInfo) -> bytes:
    body = base64.encodebytes(cert.der).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


# --- on one host, over its open connection ---------------------------------------------------------


def _backed_up(layout: Any) -> list[str]:
    return [r.lstrip("/") for r in (layout.cert_dir, *[posixpath.join(layout.kubeconfig_dir, k)
                                                         for k in layout.kubeconfigs], layout.manifests_dir)]


async def backup_pki(conn: Any, root: str, layout: Any, archive: str, timeout_s: float, redactor: Redactor) -> str:
    """The certificate folder, kubeconfigs and manifests in `archive` (0600, in a 0700 folder); checked to
    hold the certificate folder."""
    await run_command(conn, ["mkdir", "-p", "-m", "0700", posixpath.dirname(archive)], timeout_s=timeout_s,
                      redact=redactor)
    await run_command(conn, ["tar", "--ignore-failed-read", "-C", root, "-cpf", archive, "--", *_backed_up(layout)],
                      timeout_s=timeout_s, redact=redactor, log_output=False)
    await run_command(conn, ["chmod", "0600", archive], timeout_s=timeout_s, redact=redactor)
    members = await archive_members(conn, archive, timeout_s, redactor)
    cert_dir = layout.cert_dir.strip("/")
    if not any(m.startswith(cert_dir + "/") for m in members):
        raise StepFailed(f"the backup {archive} does not hold {layout.cert_dir}")
    return f"{archive}: {len(members)} entries"


async def archive_members(conn: Any, archive: str, timeout_s: float, redactor: Redactor) -> list[str]:
    r = await run_command(conn, ["tar", "-tf", archive], timeout_s=timeout_s, redact=redactor, keep=100_000,
                          log_output=False)
    return [m.rstrip("/") for m in r.stdout]


async def archive_digest(conn: Any, archive: str, timeout_s: float, redactor: Redactor) -> str | None:
    """The SHA-256 of a backup on the host, or None when it is not there."""
    r = await run_command(conn, ["sha256sum", "--", archive], timeout_s=timeout_s, redact=redactor, check=False,
                          log_output=False)
    return r.stdout[0].split()[0] if r.exit_status == 0 and r.stdout else None


async def kubeadm_renew(conn: Any, root: str, layout: Any, timeout_s: float, redactor: Redactor,
                        logger: Any = None) -> str:
    argv = [layout.kubeadm, "certs", "renew", "all", "--cert-dir", layout.cert_dir]
    if root not in ("", "/"):
        argv += ["--rootfs", root]
    r = await run_command(conn, argv, timeout_s=timeout_s, redact=redactor, logger=logger)
    renewed = sum(1 for line in r.stdout if line.endswith(" renewed"))
    return f"{renewed} certificates renewed by kubeadm"


def _away(root: str, layout: Any) -> tuple[str, str]:
    manifests = host_path(root, layout.manifests_dir)
    return manifests, manifests.rstrip("/") + "-ai-platform-ops-away"


async def restart_static_pods(conn: Any, root: str, layout: Any, wait_s: float, timeout_s: float,
                              redactor: Redactor) -> str:
    manifests, away = _away(root, layout)
    r = await run_command(conn, ["sh", "-c", _RESTART_STATIC_PODS, "restart", manifests, away, f"{wait_s:g}",
                                 *layout.static_pods], timeout_s=timeout_s + wait_s, redact=redactor)
    moved_back = [line for line in r.stdout if line.startswith("moved back ")]
    if len(moved_back) != sum(1 for line in r.stdout if line.startswith("moved out ")):
        raise StepFailed(f"not every manifest is back in {layout.manifests_dir}: {'; '.join(r.stdout)}")
    return "; ".join(r.stdout)


async def put_back(conn: Any, root: str, layout: Any, archive: str, timeout_s: float, redactor: Redactor) -> str:
    """The manifests a restart left out moved back, then `archive` extracted over the host's files."""
    manifests, away = _away(root, layout)
    moved = await run_command(conn, ["sh", "-c", _PUT_BACK_MANIFESTS, "put-back", manifests, away],
                              timeout_s=timeout_s, redact=redactor)
    await run_command(conn, ["tar", "-C", root, "-xpf", archive], timeout_s=timeout_s, redact=redactor)
    return f"extracted {archive}" + (f"; {'; '.join(moved.stdout)}" if moved.stdout else "")


async def compare_backup(conn: Any, root: str, archive: str, timeout_s: float, redactor: Redactor) -> str:
    """`tar --compare`: every file of the backup is on the host as it was backed up (content, mode, owner,
    time). Raises StepFailed naming what differs."""
    r = await run_command(conn, ["tar", "-C", root, "--compare", "-f", archive], timeout_s=timeout_s,
                          redact=redactor, check=False, log_output=False)
    if r.exit_status != 0:
        raise StepFailed(f"the host's files differ from {archive}: {'; '.join((r.stdout + r.stderr)[-6:])}")
    return f"the files are the ones in {archive}"


async def read_host_file(conn: Any, path: str, timeout_s: float) -> bytes:
    """A whole file from the host over SFTP (kept in memory only)."""
    async with conn.start_sftp_client() as sftp:
        async with sftp.open(path, "rb") as f:
            return await asyncio.wait_for(f.read(), timeout_s)


async def wait_ready(host: str, port: int, ca_pem: bytes, expect_fingerprint: str | None, timeout_s: float,
                     interval_s: float = 1.0) -> str:
    """Poll https://host:port/readyz (verified against the cluster CA) until it answers 200 `ok` and, when
    `expect_fingerprint` is given, the served certificate is that one. TimeoutError past `timeout_s`."""
    ctx = ssl.create_default_context(cadata=ca_pem.decode())
    deadline = time.monotonic() + timeout_s
    last = "no answer yet"
    async with httpx.AsyncClient(verify=ctx, timeout=min(5.0, timeout_s)) as client:
        while time.monotonic() < deadline:
            try:
                r = await client.get(f"https://{host}:{port}/readyz")
                if r.status_code == 200 and r.text.strip() == "ok":
                    if expect_fingerprint is None:
                        return f"/readyz ok after {timeout_s - (deadline - time.monotonic()):.1f}s"
                    chain = await fetch_served_chain(host, port, None, 5.0)
                    served = parse_der(chain[:1])[0]
                    if served and served[0].fingerprint == expect_fingerprint:
                        return (f"/readyz ok, serving the certificate on disk, after "
                                f"{timeout_s - (deadline - time.monotonic()):.1f}s")
                    last = "ready, but still serving the old certificate"
                else:
                    last = f"/readyz answered {r.status_code}: {r.text.strip()[:120]}"
            except (httpx.HTTPError, OSError, ssl.SSLError, TimeoutError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            await asyncio.sleep(interval_s)
    raise TimeoutError(f"the API server on {host}:{port} was not ready within {timeout_s:g}s ({last})")


def check_renewed(before: dict[str, CertInfo], after: dict[str, CertInfo], now: datetime) -> dict[str, dict[str, str]]:
    """Every certificate of `before` was replaced by one that is valid now and expires later (or replaces one
    that was not valid now: expired, or not valid yet). Raises StepFailed naming the rest."""
    def valid(c: CertInfo) -> bool:
        return c.not_before <= now < c.not_after

    missing = sorted(set(before) - set(after))
    same = sorted(n for n in before if n in after and after[n].fingerprint == before[n].fingerprint)
    bad = sorted(n for n in before if n in after and n not in same and (
        not valid(after[n]) or (valid(before[n]) and after[n].not_after <= before[n].not_after)))
    if missing or same or bad:
        raise StepFailed("not renewed: " + "; ".join(
            x for x in (f"missing {missing}" if missing else "", f"unchanged {same}" if same else "",
                        f"not valid now or no later expiry {bad}" if bad else "") if x))
    return {n: {"old": f"{before[n].not_after:%Y-%m-%d %H:%M}", "new": f"{after[n].not_after:%Y-%m-%d %H:%M}"}
            for n in sorted(before)}


# --- kubeconfigs on the worker ---------------------------------------------------------------------


def refresh_kubeconfig(path: Path, source_text: str, user: str | None = None) -> str:
    """Put the first user's client certificate and key of `source_text` (a host kubeconfig such as
    admin.conf) into the kubeconfig at `path`, for `user` or its current context's user; the cluster entries
    (the server the people or CI reach) stay. Written beside, then renamed; mode 0600. Returns the user."""
    source = yaml.safe_load(source_text)
    creds = source["users"][0]["user"]
    if not creds.get("client-certificate-data") or not creds.get("client-key-data"):
        raise StepFailed("the host kubeconfig has no embedded client certificate and key")
    doc = yaml.safe_load(path.read_text())
    if user is None:
        ctx = next((c for c in doc.get("contexts") or [] if c.get("name") == doc.get("current-context")), None)
        user = (ctx or {}).get("context", {}).get("user")
    entry = next((u for u in doc.get("users") or [] if u.get("name") == user), None)
    if entry is None:
        raise StepFailed(f"{path} has no user {user!r} to refresh")
    entry["user"]["client-certificate-data"] = creds["client-certificate-data"]
    entry["user"]["client-key-data"] = creds["client-key-data"]
    for stale in ("client-certificate", "client-key"):
        entry["user"].pop(stale, None)
    tmp = path.with_name(path.name + ".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(yaml.safe_dump(doc, sort_keys=False))
    os.replace(tmp, path)
    return user


def embedded_client_cert(text: str, user: str | None = None) -> bytes:
    doc = yaml.safe_load(text)
    users = doc.get("users") or []
    entry = next((u for u in users if user is None or u.get("name") == user), users[0] if users else None)
    return base64.b64decode(entry["user"]["client-certificate-data"])


async def refresh_from_host(conn: Any, root: str, label: str, layout: Any, k: Any, timeout_s: float) -> str:
    """The worker's kubeconfig `k.path` gets the client certificate of the host's `k.refresh_from`."""
    src = host_path(root, posixpath.join(layout.kubeconfig_dir, k.refresh_from))
    text = (await read_host_file(conn, src, timeout_s)).decode()
    user = await asyncio.to_thread(refresh_kubeconfig, Path(k.path), text, k.user)
    if embedded_client_cert(Path(k.path).read_text(), user) != embedded_client_cert(text):
        raise StepFailed(f"{k.path} does not hold {k.refresh_from}'s client certificate after the refresh")
    return f"{k.path}: user {user} now uses {label}'s {k.refresh_from} client certificate"


# --- the operation's session -----------------------------------------------------------------------


@asynccontextmanager
async def open_hosts(blocks: list[Any]) -> AsyncIterator[dict[str, Any]]:
    """One SSH connection per host, opened together and closed together: label -> the connection, or the
    exception that kept it from opening (the planner refuses on it; unknown is not healthy)."""
    async with AsyncExitStack() as stack:
        async def one(b: Any) -> Any:
            try:
                return await stack.enter_async_context(connect(b.connect_kwargs()))
            except Exception as exc:  # noqa: BLE001 - returned, refused by the planner
                return exc

        conns = await asyncio.gather(*(one(b) for b in blocks))
        yield {b.label: c for b, c in zip(blocks, conns)}
