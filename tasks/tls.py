"""Gathering certificates: control-plane and etcd hosts over SSH, live TLS handshakes, Kubernetes
secrets, kubeconfig files. Each gatherer returns what it found and what it could not read.

- `scan_host`: one SSH session per host; one fixed shell script (`_COLLECT`, paths passed as arguments,
  never interpolated) lists the PKI folders (`find -L`, a folder reached twice through a symlink such
  as kubespray's /etc/kubernetes/pki -> ssl is read once) and prints only the `CERTIFICATE` blocks of each
  file with `sed`: private keys (`*.key`, `*-key.pem`, the key half of `kubelet-client-current.pem`, a
  kubeconfig's `client-key-data`) never leave the host. Then `systemctl show` of the renewal timer and
  its service (`env TZ=UTC LC_ALL=C`, so timestamps parse).
- `fetch_served_chain`: a real TLS handshake with SNI set, verification off (the analysis verifies), the
  chain exactly as served; bounded by a timeout, so a hung peer costs at most that.
- `list_tls_secrets`: two paginated listings (`fieldSelector=type=kubernetes.io/tls`, then `type=Opaque`),
  never one call per secret; `tls.key` is dropped as each page arrives.
- `read_kubeconfig_file`: a kubeconfig on the worker: its CA and client certificates.

The `@task`s wrap these per source (all hosts in one task, all endpoints in one task: never one task
per node), each with its own timeout; a source that fails becomes `SourceProblem`s, never an exception
that stops the scan.
"""

from __future__ import annotations

import asyncio
import posixpath
import ssl
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.redact import Redactor
from tasks.ssh import connect, run_command
from tasks.tls_model import (
    ENDPOINT,
    HOST,
    KUBECONFIG,
    SECRET,
    SERVICE_PROPERTIES,
    TIMER_PROPERTIES,
    Sighting,
    SourceProblem,
    TimerState,
    decode_b64_pem,
    kubeconfig_cert_refs,
    kubeconfig_lines,
    parse_der,
    parse_pem,
    parse_systemctl_show,
    secret_tls_fields,
    sightings,
    timer_state,
)

# Lists the PKI folders and prints each certificate file's CERTIFICATE blocks, then the certificate lines
# of each kubeconfig. Arguments: DIRS... --files FILES... --kubeconfigs CONFS... Markers: "==D dir"
# (scanned), "==S dir" (same folder as one already scanned), "==X dir" (absent), "==F file" (its
# certificate blocks follow), "==E file message" (unreadable), "==K file" (its certificate lines follow),
# "==M file" (absent kubeconfig).
_COLLECT = r'''
mode=dirs; seen=" "
emit() {
  if out=$(sed -n '/-----BEGIN CERTIFICATE-----/,/-----END CERTIFICATE-----/p' "$1" 2>&1); then
    echo "==F $1"; [ -n "$out" ] && printf '%s\n' "$out"
  else
    echo "==E $1 $out"
  fi
}
for a in "$@"; do
  case "$a" in --files) mode=files; continue;; --kubeconfigs) mode=kc; continue;; esac
  case "$mode" in
    dirs)
      if [ ! -d "$a" ]; then echo "==X $a"; continue; fi
      rp=$(readlink -f "$a")
      case "$seen" in *" $rp "*) echo "==S $a"; continue;; esac
      seen="$seen$rp "
      echo "==D $a"
      find -L "$a" -maxdepth 3 \( -name '*.crt' -o -name '*.pem' \) ! -name '*.key' ! -name '*-key.pem' \
        ! -type d -print 2>/dev/null | LC_ALL=C sort | while IFS= read -r f; do emit "$f"; done;;
    files)
      if [ -e "$a" ] || [ -L "$a" ]; then emit "$a"; else echo "==M $a"; fi;;
    kc)
      if [ -e "$a" ]; then
        echo "==K $a"
        grep -E '^[[:space:]]*(certificate-authority-data|client-certificate-data|client-certificate):' "$a" 2>&1 || true
      else echo "==M $a"; fi;;
  esac
done
'''


@dataclass
class HostScan:
    """What one host gave: certificates, problems, the renewal timer (control-plane hosts)."""

    host: str
    sightings: list[Sighting] = field(default_factory=list)
    problems: list[SourceProblem] = field(default_factory=list)
    timer: TimerState | None = None
    files: int = 0


@dataclass(frozen=True)
class EndpointTarget:
    name: str
    host: str
    port: int
    server_name: str | None = None
    kind: str = "other"

    @property
    def where(self) -> str:
        sni = f", SNI {self.server_name}" if self.server_name and self.server_name != self.host else ""
        return f"endpoint {self.name} ({self.host}:{self.port}{sni})"


@dataclass
class Gathered:
    """One source's result."""

    source: str
    sightings: list[Sighting] = field(default_factory=list)
    problems: list[SourceProblem] = field(default_factory=list)
    timers: list[TimerState] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)


# --- hosts -------------------------------------------------------------------------------------------


def host_path(root: str, path: str) -> str:
    """`path` on a host whose files live under `root` ('/' on a real host)."""
    return path if root in ("", "/") else posixpath.join(root, path.lstrip("/"))


def collect_argv(root: str, layout: Any) -> list[str]:
    return (["sh", "-c", _COLLECT, "collect"] + [host_path(root, d) for d in layout.pki_dirs]
            + ["--files", host_path(root, layout.kubelet_client_cert), "--kubeconfigs"]
            + [host_path(root, posixpath.join(layout.kubeconfig_dir, k)) for k in layout.kubeconfigs])


def parse_collect(label: str, root: str, lines: list[str]) -> HostScan:
    """The output of `_COLLECT` on host `label` -> sightings and problems (pure)."""
    scan = HostScan(label)
    strip = (lambda p: p[len(root.rstrip("/")):] or "/") if root not in ("", "/") else (lambda p: p)
    current: tuple[str, str] | None = None  # (kind, path)
    buf: list[str] = []

    def flush() -> None:
        if current is None:
            return
        kind, path = current
        where = f"{label}:{strip(path)}"
        if kind == "F":
            scan.files += 1
            text = "\n".join(buf)
            certs, errors = parse_pem(text)
            scan.sightings += sightings(certs, HOST, where, host=label)
            for e in errors:
                scan.problems.append(SourceProblem(HOST, where, "unparseable", e))
            if not certs and not errors:
                scan.problems.append(SourceProblem(HOST, where, "no-certificate", "no certificate in this file"))
        elif kind == "K":
            for n, (who, fld, value) in enumerate(kubeconfig_lines("\n".join(buf))):
                if fld.endswith("-data"):
                    _add_b64(scan.sightings, scan.problems, value, HOST, f"{where} ({who} {fld})", where, label)
                # a `client-certificate: <file>` (kubelet.conf) is the kubelet's rotating certificate, read as a file

    for line in lines:
        if line.startswith("==") and len(line) > 3 and line[3] == " ":
            flush()
            current, buf = None, []
            tag, rest = line[2], line[4:]
            if tag in ("F", "K"):
                current = (tag, rest)
            elif tag == "E":
                path, _, message = rest.partition(" ")
                message = message.replace("sed: ", "").replace(path, strip(path)).strip() or "cannot be read"
                scan.problems.append(SourceProblem(HOST, f"{label}:{strip(path)}", "unreadable", message))
        else:
            buf.append(line)
    flush()
    return scan


def _add_b64(out: list[Sighting], problems: list[SourceProblem], value: str, source: str, where: str, group: str,
             host: str | None = None) -> None:
    try:
        certs, errors = parse_pem(decode_b64_pem(value))
    except ValueError as exc:
        problems.append(SourceProblem(source, where, "unparseable", str(exc)))
        return
    out += sightings(certs, source, where, group, host=host)
    problems += [SourceProblem(source, where, "unparseable", e) for e in errors]


async def scan_host(block: Any, layout: Any, *, timeout_s: float, redactor: Redactor,
                    with_timer: bool = True) -> HostScan:
    """One host's PKI folders, kubelet certificate, kubeconfigs and renewal timer, over one SSH session."""
    async with asyncio.timeout(timeout_s):
        async with connect(block.connect_kwargs()) as conn:
            return await scan_over(conn, block.label, block.root, layout, timeout_s=timeout_s, redactor=redactor,
                                   with_timer=with_timer)


async def scan_over(conn: Any, label: str, root: str, layout: Any, *, timeout_s: float, redactor: Redactor,
                    with_timer: bool = True) -> HostScan:
    """`scan_host` over a connection already open (the renewal's session keeps one per host)."""
    async with asyncio.timeout(timeout_s):
        r = await run_command(conn, collect_argv(root, layout), timeout_s=timeout_s, check=False,
                              redact=redactor, keep=1_000_000, log_output=False)
        scan = parse_collect(label, root, r.stdout)
        if r.exit_status != 0:
            scan.problems.append(SourceProblem(HOST, label, "error", "the scan script exited with "
                                               f"{r.exit_status}: {' '.join(r.stderr[-3:])}"))
        if with_timer:
            scan.timer = await read_timer(conn, label, layout, timeout_s, redactor)
    return scan


async def read_timer(conn: Any, label: str, layout: Any, timeout_s: float, redactor: Redactor) -> TimerState:
    """`systemctl show` of kubespray's renewal timer and service (times in UTC)."""
    out = []
    for unit, props in ((layout.renew_timer, TIMER_PROPERTIES), (layout.renew_service, SERVICE_PROPERTIES)):
        argv = ["env", "TZ=UTC", "LC_ALL=C", "systemctl", "show", *[a for p in props for a in ("-p", p)], unit]
        r = await run_command(conn, argv, timeout_s=timeout_s, check=True, redact=redactor, log_output=False)
        out.append(parse_systemctl_show(r.text))
    return timer_state(label, out[0], out[1])


def _host_problem(label: str, exc: BaseException, redactor: Redactor, timeout_s: float) -> SourceProblem:
    if isinstance(exc, TimeoutError):
        return SourceProblem(HOST, label, "timeout", f"no answer within {timeout_s:g}s")
    if isinstance(exc, PermissionError):
        return SourceProblem(HOST, label, "unreachable", redactor.text(str(exc)))
    return SourceProblem(HOST, label, "unreachable", redactor.error(exc))


async def scan_hosts(blocks: list[Any], layout: Any, *, timeout_s: float, redactor: Redactor) -> Gathered:
    """Every host at once, each within `timeout_s`; a host that is down is a problem, the rest carry on."""
    async def one(b: Any) -> HostScan:
        try:
            return await scan_host(b, layout, timeout_s=timeout_s, redactor=redactor,
                                   with_timer=getattr(b, "role", "control-plane") == "control-plane")
        except Exception as exc:  # noqa: BLE001 - reported as unknown, never all-clear
            return HostScan(b.label, problems=[_host_problem(b.label, exc, redactor, timeout_s)])

    scans = await asyncio.gather(*(one(b) for b in blocks))
    out = Gathered(HOST, stats={"hosts": len(blocks), "files": sum(s.files for s in scans)})
    for s in scans:
        out.sightings += s.sightings
        out.problems += s.problems
        if s.timer is not None:
            out.timers.append(s.timer)
    return out


# --- live endpoints ----------------------------------------------------------------------------------


def _client_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # the analysis verifies chains and names; here we only want what is served
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # so a weak certificate is still seen, and reported
    return ctx


def served_chain(sslobj: Any) -> list[bytes]:
    """The chain the peer sent, leaf first, as DER. Python 3.13 has `get_unverified_chain()`; 3.10-3.12
    have it on the private `_sslobj`; without either, only the leaf."""
    public = getattr(sslobj, "get_unverified_chain", None)
    if public is not None:
        return [bytes(c) if isinstance(c, (bytes, bytearray)) else c.public_bytes(ssl._ssl.ENCODING_DER)
                for c in public() or []]
    inner = getattr(sslobj, "_sslobj", None)
    if inner is not None and hasattr(inner, "get_unverified_chain"):
        return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in inner.get_unverified_chain() or []]
    leaf = sslobj.getpeercert(binary_form=True)
    return [leaf] if leaf else []


async def fetch_served_chain(host: str, port: int, server_name: str | None, timeout_s: float,
                             ctx: ssl.SSLContext | None = None) -> list[bytes]:
    """A real TLS handshake with `server_name` as SNI; the served chain. Raises TimeoutError past `timeout_s`."""
    ctx = ctx or _client_context()
    sni = server_name or host
    try:
        import ipaddress

        ipaddress.ip_address(sni.strip("[]"))
        sni = None  # RFC 6066: no SNI for an IP address literal
    except ValueError:
        pass
    async with asyncio.timeout(timeout_s):
        _reader, writer = await asyncio.open_connection(host, port, ssl=ctx, server_hostname=sni or "",
                                                       ssl_handshake_timeout=timeout_s)
        try:
            return served_chain(writer.get_extra_info("ssl_object"))
        finally:
            writer.close()


async def probe_endpoints(targets: list[EndpointTarget], *, timeout_s: float, concurrency: int = 256) -> Gathered:
    """Every endpoint concurrently (at most `concurrency` handshakes at once), each within `timeout_s`."""
    gate = asyncio.Semaphore(concurrency)
    ctx = _client_context()
    out = Gathered(ENDPOINT, stats={"endpoints": len(targets)})

    async def one(t: EndpointTarget) -> None:
        async with gate:
            try:
                chain = await fetch_served_chain(t.host, t.port, t.server_name, timeout_s, ctx)
            except TimeoutError:
                out.problems.append(SourceProblem(ENDPOINT, t.where, "timeout",
                                                  f"no TLS handshake within {timeout_s:g}s (a hung peer?)"))
                return
            except (OSError, ssl.SSLError) as exc:
                out.problems.append(SourceProblem(ENDPOINT, t.where, "unreachable", f"{type(exc).__name__}: {exc}"))
                return
        certs, errors = parse_der(chain)
        out.sightings += sightings(certs, ENDPOINT, t.where, expected_name=t.server_name or t.host)
        out.problems += [SourceProblem(ENDPOINT, t.where, "unparseable", e) for e in errors]
        if not certs and not errors:
            out.problems.append(SourceProblem(ENDPOINT, t.where, "no-certificate", "the peer sent no certificate"))

    await asyncio.gather(*(one(t) for t in targets))
    return out


def endpoint_targets(cfg: Any, cluster: Any) -> list[EndpointTarget]:
    """The endpoints to probe: the config's own, and (with `derive_endpoints`) each host's API server and etcd
    ports, and the https URLs of GitLab, the registry and Argo (pure)."""
    c = cfg.certificates
    out = [EndpointTarget(e.name, e.host, e.port, e.server_name, e.kind) for e in c.endpoints]
    if c.derive_endpoints:
        for h in (*cluster.control_plane, *cluster.etcd):
            is_cp = any(h is x for x in cluster.control_plane)
            if is_cp and h.apiserver_port:
                out.append(EndpointTarget(f"kube-apiserver {h.label}", h.host, h.apiserver_port, None, "apiserver"))
            if h.etcd_port:
                out.append(EndpointTarget(f"etcd {h.label}", h.host, h.etcd_port, None, "etcd"))
            if h.etcd_events_port:
                out.append(EndpointTarget(f"etcd-events {h.label}", h.host, h.etcd_events_port, None, "etcd-events"))
        for kind, url in (("gitlab", cfg.gitlab.api_url if cfg.gitlab else None),
                          ("registry", cfg.registry.url if cfg.registry else None),
                          ("argo", cfg.argo.url if cfg.argo else None)):
            parts = urlsplit(url) if url else None
            if parts and parts.scheme == "https" and parts.hostname:
                out.append(EndpointTarget(kind, parts.hostname, parts.port or 443, parts.hostname, kind))
    seen, unique = set(), []
    for t in out:
        key = (t.host, t.port, t.server_name)
        if key not in seen:
            seen.add(key)
            unique.append(t)
    return unique


# --- Kubernetes secrets ------------------------------------------------------------------------------


def list_tls_secrets(api: Any, *, page_size: int = 500, namespaces: list[str] | None = None,
                     timeout_s: float = 30.0) -> Gathered:
    """`kubernetes.io/tls` secrets and Opaque ones holding `tls.crt`, in every namespace (or `namespaces`):
    two paginated listings whatever the number of secrets."""
    from tasks.kubernetes import list_raw

    out = Gathered(SECRET, stats={"round_trips": 0, "secrets": 0})
    wanted = set(namespaces or ())
    for secret_type in ("kubernetes.io/tls", "Opaque"):
        listing = list_raw(api, "secrets", field_selector=f"type={secret_type}", page_size=page_size,
                           timeout_s=timeout_s, transform=secret_tls_fields)
        out.stats["round_trips"] += listing.round_trips
        for s in listing.items:
            if wanted and s["namespace"] not in wanted:
                continue
            out.stats["secrets"] += 1
            name = f"secret {s['namespace']}/{s['name']}"
            for key in ("tls.crt", "ca.crt"):
                if key in s:
                    _add_b64(out.sightings, out.problems, s[key], SECRET, f"{name} ({key})", name)
    return out


# --- kubeconfig files on the worker ------------------------------------------------------------------


def read_kubeconfig_file(path: Path) -> Gathered:
    """The certificates of a kubeconfig on the worker (inline data and referenced files)."""
    out = Gathered(KUBECONFIG)
    where = f"kubeconfig {path}"
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        out.problems.append(SourceProblem(KUBECONFIG, where, "unreadable", exc.strerror or str(exc)))
        return out
    except yaml.YAMLError as exc:
        out.problems.append(SourceProblem(KUBECONFIG, where, "unparseable", f"not YAML: {exc}"))
        return out
    if not isinstance(doc, dict):
        out.problems.append(SourceProblem(KUBECONFIG, where, "unparseable", "not a kubeconfig"))
        return out
    for who, fld, value in kubeconfig_cert_refs(doc):
        label = f"{where} ({who} {fld})"
        if fld.endswith("-data"):
            _add_b64(out.sightings, out.problems, value, KUBECONFIG, label, where)
            continue
        try:
            data = (Path(path).parent / value).read_bytes()
        except OSError as exc:
            out.problems.append(SourceProblem(KUBECONFIG, label, "unreadable", exc.strerror or str(exc)))
            continue
        certs, errors = parse_pem(data)
        out.sightings += sightings(certs, KUBECONFIG, label, where)
        out.problems += [SourceProblem(KUBECONFIG, label, "unparseable", e) for e in errors]
    return out


# --- the tasks: one per source -----------------------------------------------------------------------


def _failed_source(source: str, where: str, exc: BaseException, redactor: Redactor) -> Gathered:
    kind = "timeout" if isinstance(exc, TimeoutError) else "unreachable"
    return Gathered(source, problems=[SourceProblem(source, where, kind, redactor.error(exc))])


@task(name="scan-control-plane-hosts", cache_policy=NONE)
async def scan_hosts_task(blocks: list[Any], layout: Any, ssh_timeout_s: float, source_timeout_s: float,
                          redactor: Redactor) -> Gathered:
    """Every control-plane and etcd host of the cluster, concurrently, each host within its own timeout."""
    try:
        async with asyncio.timeout(source_timeout_s):
            return await scan_hosts(blocks, layout, timeout_s=ssh_timeout_s, redactor=redactor)
    except TimeoutError as exc:
        return _failed_source(HOST, "control-plane hosts", exc, redactor)


@task(name="probe-tls-endpoints", cache_policy=NONE)
async def probe_endpoints_task(targets: list[EndpointTarget], endpoint_timeout_s: float,
                               source_timeout_s: float) -> Gathered:
    """Every live TLS endpoint, concurrently, each handshake within its own timeout."""
    try:
        async with asyncio.timeout(source_timeout_s):
            return await probe_endpoints(targets, timeout_s=endpoint_timeout_s)
    except TimeoutError as exc:
        return _failed_source(ENDPOINT, "TLS endpoints", exc, Redactor())


@task(name="list-tls-secrets", cache_policy=NONE)
async def tls_secrets_task(api: Any, page_size: int, namespaces: list[str], timeout_s: float,
                           redactor: Redactor) -> Gathered:
    """TLS secrets of every namespace in pages (the listing runs in a thread: the client is synchronous)."""
    try:
        async with asyncio.timeout(timeout_s):
            return await asyncio.to_thread(list_tls_secrets, api, page_size=page_size, namespaces=namespaces,
                                           timeout_s=timeout_s)
    except Exception as exc:  # noqa: BLE001 - the API down is `unknown`, never all-clear
        get_run_logger().warning("TLS secrets not listed: %s", redactor.error(exc))
        return _failed_source(SECRET, "Kubernetes secrets", exc, redactor)


@task(name="read-kubeconfigs", cache_policy=NONE)
async def kubeconfigs_task(paths: list[str]) -> Gathered:
    """The kubeconfigs the platform config names (files on the worker)."""
    out = Gathered(KUBECONFIG, stats={"kubeconfigs": len(paths)})
    for p in paths:
        g = await asyncio.to_thread(read_kubeconfig_file, Path(p))
        out.sightings += g.sightings
        out.problems += g.problems
    return out


# --- every source at once --------------------------------------------------------------------------------


def _source_error(source: str, exc: BaseException, redactor: Redactor) -> Gathered:
    return Gathered(source, problems=[SourceProblem(source, f"{source} source", "error", redactor.error(exc))])


async def gather_certificates(cfg: Any, cl: Any, hosts_of: Callable[[str], list[Any]],
                              kubernetes_of: Callable[[str], Any], redactor: Redactor,
                              page_size: int | None = None) -> tuple[list[Gathered], dict[str, Any]]:
    """Every source of cluster `cl` (the config's section), concurrently; each source's failure is a
    `SourceProblem`, never an exception. `hosts_of(name)` and `kubernetes_of(name)` are the flow's loaders of
    the cluster's SSH host blocks and its API client (blocking: each runs in a thread inside its own source,
    so a block that cannot be loaded is that source's problem)."""
    c, t = cfg.certificates, cfg.certificates.timeouts

    async def hosts() -> Gathered:
        blocks = await asyncio.to_thread(hosts_of, cl.name)
        return await scan_hosts_task(blocks, c.layout, t.ssh_s, t.source_s, redactor)

    async def secrets() -> Gathered:
        api = await asyncio.to_thread(kubernetes_of, cl.name)
        return await tls_secrets_task(api, page_size or c.page_size, list(c.secret_namespaces), t.source_s, redactor)

    targets = endpoint_targets(cfg, cl)
    kubeconfigs = [str(k.path) for k in c.kubeconfigs]
    names = ("host", "endpoint", "secret", "kubeconfig")
    results = await asyncio.gather(hosts(), probe_endpoints_task(targets, t.endpoint_s, t.source_s), secrets(),
                                   kubeconfigs_task(kubeconfigs), return_exceptions=True)
    gathered = [r if isinstance(r, Gathered) else _source_error(n, r, redactor) for n, r in zip(names, results)]
    stats = {"hosts": len(cl.control_plane) + len(cl.etcd), "endpoints": len(targets),
             "TLS secrets": next((g.stats.get("secrets", 0) for g in gathered if g.source == "secret"), 0),
             "secret listing round trips": next((g.stats.get("round_trips", 0) for g in gathered
                                                 if g.source == "secret"), 0),
             "kubeconfigs": len(kubeconfigs)}
    return gathered, stats
