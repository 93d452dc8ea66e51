"""Renewing a kubeadm control plane's certificates, one node at a time: the plan (pure) and each step (SSH).

The steps of one node, as kubeadm documents a manual renewal (kubernetes.io *Certificate Management with
kubeadm*, "Manual certificate renewal") and kubespray's `k8s-certs-renew.sh.j2` scripts it:

1. back up the certificate folder, the kubeconfigs and the static pod manifests (`tar -C <root>`, kept on
   the host under `layout.backup_dir`, 0700);
2. `kubeadm certs renew all --cert-dir <kube_cert_dir>` (`--rootfs <root>` when the host's files live
   under a root other than /: kubeadm then chroots);
3. restart the static control-plane pods: move their manifests out of the manifests folder, wait the
   kubelet's `fileCheckFrequency` (20 s), move them back (one remote shell that ignores SIGHUP, so a lost
   session never leaves the manifests out);
4. wait for the API server's `/readyz` (TLS verified against the cluster CA), within a timeout, and check
   it now serves the renewed certificate;
5. read the PKI again: every kubeadm-managed certificate has a new fingerprint and a later expiry;
6. refresh the kubeconfigs the platform config names (`refresh_from`) with the node's renewed client
   certificate.

A failure stops the node: its backup is extracted over the PKI, the manifests are put back, the static
pods restarted again and the PKI read back to prove it is what it was (`restored`).
"""

from __future__ import annotations

import asyncio
import base64
import os
import posixpath
import ssl
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import yaml

from tasks.redact import Redactor
from tasks.ssh import RemoteCommandError, connect, run_command
from tasks.tls import HostScan, fetch_served_chain, host_path, scan_host
from tasks.tls_model import CertInfo, parse_der

# What `kubeadm certs renew all` renews (cmd/kubeadm/app/phases/certs/renewal, certlist.go; kubespray's
# k8s-certs-renew.sh.j2 lists the same): leaves under the cert dir, and the client certificates embedded
# in these kubeconfigs. Not renewed by it: the CAs, kubelet.conf (the kubelet rotates its own client
# certificate), and kubespray's host-deployed etcd certificates in /etc/ssl/etcd/ssl (its etcd role).
KUBEADM_LEAVES = ("apiserver.crt", "apiserver-kubelet-client.crt", "apiserver-etcd-client.crt",
                  "front-proxy-client.crt", "etcd/server.crt", "etcd/peer.crt", "etcd/healthcheck-client.crt")
KUBEADM_KUBECONFIGS = ("admin.conf", "super-admin.conf", "controller-manager.conf", "scheduler.conf")
COMPAT_CERT_DIR = "/etc/kubernetes/pki"  # kubespray's kube_cert_compat_dir, a symlink to kube_cert_dir

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
    """A renewal step failed; the message says which and why (redacted)."""


# --- what is managed, the plan (pure) ----------------------------------------------------------------


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
    return out


@dataclass
class NodePlan:
    label: str
    renew: dict[str, CertInfo]
    untouched: list[str]  # what stays as it is, and why


def plan_renewal(scans: list[HostScan], layout: Any, now: datetime) -> list[NodePlan]:
    plans = []
    for scan in scans:
        renew = managed_certs(scan, layout)
        managed_fps = {c.fingerprint for c in renew.values()}
        untouched = sorted({f"{s.where} ({'CA' if s.cert.is_ca else 'leaf'}, {s.cert.days_left(now):.0f} days)"
                            for s in scan.sightings if s.cert.fingerprint not in managed_fps})
        plans.append(NodePlan(scan.host, renew, untouched))
    return plans


def plan_markdown(platform: str, cluster: str, plans: list[NodePlan], kubeconfigs: list[Any], layout: Any,
                  timeouts: Any, now: datetime) -> str:
    lines = [f"# Renew control-plane certificates: {platform} / {cluster}", "",
             (f"One node at a time, in this order: {', '.join(p.label for p in plans)}. On each: back up "
             f"`{layout.cert_dir}`, the kubeconfigs and the manifests to `{layout.backup_dir}`; "
             f"`kubeadm certs renew all`; move the static pod manifests out for {timeouts.static_pod_wait_s:g}s "
             f"and back; wait for `/readyz` (at most {timeouts.readyz_s:g}s); check every certificate below has "
             "a new expiry; refresh the kubeconfigs listed. The first failure stops the run: that node's backup "
             "is put back, the nodes after it are not touched."), ""]
    for p in plans:
        lines += [f"## {p.label}: {len(p.renew)} certificates renewed", "",
                  "| certificate | expires now | days left |", "|---|---|---|"]
        lines += [f"| {name} | {c.not_after:%Y-%m-%d %H:%M} | {c.days_left(now):.1f} |"
                  for name, c in sorted(p.renew.items())]
        if p.untouched:
            lines += ["", f"Not renewed here ({len(p.untouched)}): CAs (another procedure), the kubelet's rotating "
                      "client certificate, kubespray's etcd certificates (its etcd role) and any other file: "
                      + "; ".join(p.untouched[:12]) + (" ..." if len(p.untouched) > 12 else "")]
        lines.append("")
    refresh = [f"`{k.path}` from `{k.refresh_from}`" for k in kubeconfigs if k.refresh_from]
    lines += ["Kubeconfigs refreshed after each node: " + (", ".join(refresh) or "none"), ""]
    return "\n".join(lines)


# --- one node ----------------------------------------------------------------------------------------


@dataclass
class NodeResult:
    label: str
    ok: bool = False
    restored: bool | None = None  # after a failure: the PKI is back as it was
    backup: str | None = None
    steps: list[dict[str, Any]] = field(default_factory=list)
    renewed: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {old, new} expiry
    error: str | None = None


class _Steps:
    def __init__(self, result: NodeResult, redactor: Redactor):
        self.result, self.redactor = result, redactor

    async def run(self, name: str, coro) -> Any:
        start = time.monotonic()
        try:
            value = await coro
        except Exception as exc:
            detail = self.redactor.error(exc)
            self.result.steps.append({"node": self.result.label, "step": name, "status": "failed",
                                      "seconds": round(time.monotonic() - start, 1), "detail": detail})
            raise StepFailed(f"{self.result.label}: {name} failed: {detail}") from exc
        detail = value if isinstance(value, str) else ""
        self.result.steps.append({"node": self.result.label, "step": name, "status": "done",
                                  "seconds": round(time.monotonic() - start, 1), "detail": detail})
        return value


async def _remote(block: Any, argv: list[str], timeout_s: float, redactor: Redactor, logger=None):
    async with connect(block.connect_kwargs()) as conn:
        return await run_command(conn, argv, timeout_s=timeout_s, redact=redactor, logger=logger)


async def backup_node(block: Any, layout: Any, stamp: str, timeout_s: float, redactor: Redactor) -> str:
    root = block.root
    rels = [layout.cert_dir, *[posixpath.join(layout.kubeconfig_dir, k) for k in layout.kubeconfigs],
            layout.manifests_dir]
    rels = [r.lstrip("/") for r in rels]
    backup_dir = host_path(root, layout.backup_dir)
    archive = posixpath.join(backup_dir, f"certificates-{block.label}-{stamp}.tar")
    async with connect(block.connect_kwargs()) as conn:
        await run_command(conn, ["mkdir", "-p", "-m", "0700", backup_dir], timeout_s=timeout_s, redact=redactor)
        await run_command(conn, ["tar", "--ignore-failed-read", "-C", root, "-cpf", archive, "--", *rels],
                          timeout_s=timeout_s, redact=redactor, log_output=False)
        await run_command(conn, ["chmod", "0600", archive], timeout_s=timeout_s, redact=redactor)
        listing = await run_command(conn, ["tar", "-tf", archive], timeout_s=timeout_s, redact=redactor,
                                    keep=100_000, log_output=False)
    members = [m.rstrip("/") for m in listing.stdout]
    cert_dir = layout.cert_dir.strip("/")
    if cert_dir not in members or not any(m.startswith(cert_dir + "/") for m in members):
        raise StepFailed(f"the backup {archive} does not hold {layout.cert_dir}")
    return archive


async def kubeadm_renew(block: Any, layout: Any, timeout_s: float, redactor: Redactor, logger=None) -> str:
    argv = [layout.kubeadm, "certs", "renew", "all", "--cert-dir", layout.cert_dir]
    if block.root not in ("", "/"):
        argv += ["--rootfs", block.root]
    r = await _remote(block, argv, timeout_s, redactor, logger)
    renewed = sum(1 for line in r.stdout if line.endswith(" renewed"))
    return f"{renewed} certificates renewed by kubeadm"


async def restart_static_pods(block: Any, layout: Any, wait_s: float, timeout_s: float, redactor: Redactor) -> str:
    manifests = host_path(block.root, layout.manifests_dir)
    away = manifests.rstrip("/") + "-ai-platform-ops-away"
    r = await _remote(block, ["sh", "-c", _RESTART_STATIC_PODS, "restart", manifests, away, f"{wait_s:g}",
                              *layout.static_pods], timeout_s + wait_s, redactor)
    return "; ".join(r.stdout)


async def put_back_manifests(block: Any, layout: Any, timeout_s: float, redactor: Redactor) -> str:
    manifests = host_path(block.root, layout.manifests_dir)
    away = manifests.rstrip("/") + "-ai-platform-ops-away"
    r = await _remote(block, ["sh", "-c", _PUT_BACK_MANIFESTS, "put-back", manifests, away], timeout_s, redactor)
    return "; ".join(r.stdout) or "nothing to put back"


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
                        return (f"/readyz ok, serving the renewed certificate, after "
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


async def read_host_file(block: Any, path: str, timeout_s: float) -> bytes:
    """A whole file from the host over SFTP (kept in memory only)."""
    async with connect(block.connect_kwargs()) as conn:
        async with conn.start_sftp_client() as sftp:
            async with sftp.open(path, "rb") as f:
                return await asyncio.wait_for(f.read(), timeout_s)


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


async def renew_node(block: Any, layout: Any, timeouts: Any, kubeconfigs: list[Any], before: HostScan,
                     stamp: str, redactor: Redactor, logger=None) -> NodeResult:
    """Steps 1-6 on one node; on a failure, its backup is put back (`NodeResult.restored`)."""
    result = NodeResult(block.label)
    steps = _Steps(result, redactor)
    old = managed_certs(before, layout)
    ca = next((s.cert for s in before.sightings
               if s.where in (f"{block.label}:{layout.cert_dir.rstrip('/')}/ca.crt",
                              f"{block.label}:{COMPAT_CERT_DIR}/ca.crt")), None)
    try:
        result.backup = await steps.run("back up", backup_node(block, layout, stamp, timeouts.ssh_s, redactor))
        await steps.run("kubeadm certs renew all", kubeadm_renew(block, layout, timeouts.kubeadm_s, redactor, logger))
        await steps.run("restart static pods", restart_static_pods(block, layout, timeouts.static_pod_wait_s,
                                                                   timeouts.ssh_s, redactor))
        after_scan = await scan_host(block, layout, timeout_s=timeouts.ssh_s, redactor=redactor, with_timer=False)
        new = managed_certs(after_scan, layout)
        if block.apiserver_port:
            if ca is None:
                raise StepFailed(f"no ca.crt found in {layout.cert_dir} on {block.label}: cannot verify /readyz")
            served = new.get("apiserver.crt")
            await steps.run("wait for /readyz", wait_ready(block.host, block.apiserver_port, _pem(ca),
                                                            served.fingerprint if served else None, timeouts.readyz_s))
        result.renewed = await steps.run("verify new expiry dates", _async(check_renewed, old, new,
                                                                           datetime.now(UTC)))
        for k in kubeconfigs:
            if k.refresh_from:
                await steps.run(f"refresh {k.path}", _refresh(block, layout, k, timeouts.ssh_s))
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - any failure: put the backup back, then report
        result.error = redactor.error(exc) if not isinstance(exc, StepFailed) else str(exc)
        if result.backup:
            result.restored = await _restore(block, layout, timeouts, result, old, redactor, ca)
        else:
            result.restored = True  # nothing was changed before the backup
    return result


async def _async(fn, *args):
    return fn(*args)


def _pem(cert: CertInfo) -> bytes:
    body = base64.encodebytes(cert.der).decode().replace("\n", "")
    lines = [body[i:i + 64] for i in range(0, len(body), 64)]
    return ("-----BEGIN CERTIFICATE-----\n" + "\n".join(lines) + "\n-----END CERTIFICATE-----\n").encode()


async def _refresh(block: Any, layout: Any, k: Any, timeout_s: float) -> str:
    src = host_path(block.root, posixpath.join(layout.kubeconfig_dir, k.refresh_from))
    text = (await read_host_file(block, src, timeout_s)).decode()
    user = await asyncio.to_thread(refresh_kubeconfig, Path(k.path), text, k.user)
    if embedded_client_cert(Path(k.path).read_text(), user) != embedded_client_cert(text):
        raise StepFailed(f"{k.path} does not hold {k.refresh_from}'s client certificate after the refresh")
    return f"user {user} now uses {block.label}'s {k.refresh_from} client certificate"


async def _restore(block: Any, layout: Any, timeouts: Any, result: NodeResult, old: dict[str, CertInfo],
                   redactor: Redactor, ca: CertInfo | None) -> bool:
    """Put the node's backup back and prove it: the managed certificates are the ones before the run.
    Whether the API server answers /readyz again is reported as a step of its own."""
    steps = _Steps(result, redactor)
    try:
        await steps.run("restore: put back manifests", put_back_manifests(block, layout, timeouts.ssh_s, redactor))
        await steps.run("restore: extract backup", _remote(
            block, ["tar", "-C", block.root, "-xpf", result.backup], timeouts.ssh_s, redactor))
        await steps.run("restore: restart static pods", restart_static_pods(
            block, layout, timeouts.static_pod_wait_s, timeouts.ssh_s, redactor))
        if block.apiserver_port and ca is not None:
            try:
                await steps.run("restore: wait for /readyz", wait_ready(block.host, block.apiserver_port, _pem(ca),
                                                                         None, timeouts.readyz_s))
            except StepFailed:
                pass  # reported in the steps; the files are what `restored` is about
        scan = await scan_host(block, layout, timeout_s=timeouts.ssh_s, redactor=redactor, with_timer=False)
        now = managed_certs(scan, layout)
        differ = sorted(n for n in old if n not in now or now[n].fingerprint != old[n].fingerprint)
        if differ:
            raise StepFailed(f"after the restore these differ from before the run: {differ}")
        result.steps.append({"node": block.label, "step": "restore: verify", "status": "done", "seconds": 0,
                             "detail": f"{len(old)} certificates are the ones from before the run"})
        return True
    except StepFailed:
        return False
    except RemoteCommandError:
        return False
