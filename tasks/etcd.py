"""Talking to etcd: `etcdctl` (v3 API) run on an etcd host over SSH, as kubespray's etcd role does.

kubespray (`roles/etcd/handlers/backup.yml`, `roles/etcd/templates/etcdctl.sh.j2`) runs `etcdctl` on the etcd
host with `ETCDCTL_API=3`, `--cacert ca.pem --cert admin-<host>.pem --key admin-<host>-key.pem` from
`etcd_cert_dir` (/etc/ssl/etcd/ssl). Every command here is an argv list (`tasks.ssh.run_command` quotes it),
with `--dial-timeout`/`--command-timeout` so a hung member never hangs a run, and its output redacted.
What the answers mean is in `tasks.etcd_rules`.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from blocks.config import (
    ETCD_ENDPOINT_RE,
    ETCD_FILE_TEMPLATE_RE,
    ETCD_HOST_NAME_RE,
    parse_duration,
)
from tasks.etcd_rules import (
    ClusterStatus,
    SnapshotCheck,
    check_snapshot,
    cluster_status,
)
from tasks.redact import Redactor
from tasks.ssh import RemoteCommandError, run_command

# the config's patterns (`blocks.config`), applied with fullmatch: no trailing newline gets through
_HOST_RE = re.compile(ETCD_HOST_NAME_RE)
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@/\-]+\Z")
_ENDPOINT_RE = re.compile(ETCD_ENDPOINT_RE)
_LOOPBACK_RE = re.compile(r"^http://127\.0\.0\.1:[0-9]{1,5}\Z")
_FILE_RE = re.compile(ETCD_FILE_TEMPLATE_RE)


def host_path(root: str, path: str) -> str:
    """`path` on a host whose files live under `root` ('/' on a real host; a folder in the sandbox)."""
    return root.rstrip("/") + path if root != "/" else path


def etcd_section(config: Any, platform: str) -> Any:
    """The platform config's `etcd` section (`config.etcd`), or a LookupError saying how to add it."""
    if config.etcd is None:
        raise LookupError(f"platform {platform!r} has no `etcd` section: add it to the platform config "
                          "(configs/platform.example.yaml) and run `python -m blocks.load <platform.yaml>`")
    return config.etcd


@dataclass(frozen=True)
class EtcdClient:
    """How `etcdctl` runs on one etcd host: the host's inventory name (its `admin-<host>.pem`), the
    certificate folder as that host sees it, and the time limits."""

    host: str
    cert_dir: str = "/etc/ssl/etcd/ssl"
    etcdctl: str = "etcdctl"
    dial_timeout_s: int = 3
    command_timeout_s: int = 10
    ca_file: str = "ca.pem"
    cert_file: str = "admin-{host}.pem"  # kubespray make-ssl-etcd.sh: admin-<host>.pem, admin-<host>-key.pem
    key_file: str = "admin-{host}-key.pem"

    def __post_init__(self) -> None:
        if not _HOST_RE.fullmatch(self.host) or not _PATH_RE.match(self.cert_dir):
            raise ValueError(f"bad etcd host {self.host!r} or cert dir {self.cert_dir!r}")
        for f in (self.ca_file, self.cert_file, self.key_file):
            if not _FILE_RE.fullmatch(f):
                raise ValueError(f"bad certificate file name {f!r}")

    @classmethod
    def from_config(cls, etcd: Any, host: Any) -> EtcdClient:
        """The client of one `etcd.hosts[]` entry of the platform config (`blocks.config.EtcdConfig`)."""
        return cls(host=host.name, cert_dir=host_path(host.root, etcd.certs.dir), etcdctl=etcd.etcdctl,
                   dial_timeout_s=parse_duration(etcd.timeouts.dial),
                   command_timeout_s=parse_duration(etcd.timeouts.command), ca_file=etcd.certs.ca,
                   cert_file=etcd.certs.cert, key_file=etcd.certs.key)

    def plain(self, endpoint: str) -> list[str]:
        """etcdctl against a plain-HTTP loopback member (the restore drill's), without certificates."""
        if not _LOOPBACK_RE.match(endpoint):
            raise ValueError(f"drill endpoint {endpoint!r} must be http://127.0.0.1:port")
        return ["env", "ETCDCTL_API=3", self.etcdctl, f"--endpoints={endpoint}", f"--dial-timeout={self.dial_timeout_s}s",
                f"--command-timeout={self.command_timeout_s}s"]

    def argv(self, endpoints: list[str], *args: str, timeout_s: int | None = None) -> list[str]:
        for ep in endpoints:
            if not _ENDPOINT_RE.fullmatch(ep):
                raise ValueError(f"etcd endpoint {ep!r} must look like https://host:port")
        c, h = self.cert_dir, self.host
        return ["env", "ETCDCTL_API=3", self.etcdctl, f"--endpoints={','.join(endpoints)}",
                f"--cacert={c}/{self.ca_file.format(host=h)}", f"--cert={c}/{self.cert_file.format(host=h)}",
                f"--key={c}/{self.key_file.format(host=h)}",
                f"--dial-timeout={self.dial_timeout_s}s",
                f"--command-timeout={timeout_s or self.command_timeout_s}s", *args]


async def read_cluster_status(conn: Any, client: EtcdClient, cluster: str, endpoints: list[str],
                              redactor: Redactor) -> ClusterStatus:
    """Members, endpoint status and health, alarms of one cluster (4 etcdctl calls, concurrent). An unreachable member
    makes etcdctl exit non-zero while still printing the others' JSON: that output is used, the error kept."""
    outs, errors = {}, []
    calls = (("members", ["member", "list"]), ("status", ["endpoint", "status"]),
             ("health", ["endpoint", "health"]), ("alarms", ["alarm", "list"]))
    # the four run at once, each on its own channel of the one SSH connection: a hung member costs one
    # timeout, not four in a row
    results = await asyncio.gather(*(run_command(conn, client.argv(endpoints, *args, "-w", "json"), check=False,
                                                 redact=redactor, log_output=False,
                                                 timeout_s=client.command_timeout_s * 3 + 10) for _, args in calls))
    for (what, args), r in zip(calls, results):
        outs[what] = r.text if r.text.strip().startswith(("{", "[")) else ""
        if r.exit_status != 0:
            errors.append(f"{' '.join(args)}: " + "; ".join(x for x in r.stderr if "level" not in x)[-300:])
    return cluster_status(cluster, endpoints, outs["members"], outs["status"], outs["health"], outs["alarms"], errors)


async def save_snapshot(conn: Any, client: EtcdClient, endpoint: str, path: str, redactor: Redactor,
                        timeout_s: int = 300) -> None:
    """`etcdctl snapshot save` from ONE endpoint (etcd v3.4 *Disaster recovery*: "snapshot save" takes a
    single endpoint) to `path` on the host; etcdctl writes `<path>.part` and renames it when complete."""
    if not _PATH_RE.match(path):
        raise ValueError(f"snapshot path {path!r}")
    await run_command(conn, client.argv([endpoint], "snapshot", "save", path, timeout_s=timeout_s), redact=redactor,
                      log_output=False, timeout_s=timeout_s + 15)


async def snapshot_status(conn: Any, client: EtcdClient, path: str, redactor: Redactor) -> str:
    """`etcdctl snapshot status -w json` of a file on the host: the raw JSON, or '' when etcdctl refuses it
    (a corrupt file: "invalid database")."""
    r = await run_command(conn, ["env", "ETCDCTL_API=3", client.etcdctl, "snapshot", "status", path, "-w", "json"],
                          check=False, redact=redactor, log_output=False, timeout_s=120)
    return r.text if r.exit_status == 0 else ""


async def verify_snapshot(conn: Any, client: EtcdClient, path: str, redactor: Redactor, *, revision_before: int,
                          revision_after: int | None = None, endpoint: str | None = None) -> tuple[SnapshotCheck, int]:
    """`snapshot status` of the file at `path` against the live revisions (`check_snapshot`), and the file's
    size; the reads run at once. `revision_after` None: `endpoint`'s live revision, read now (after the save).
    Returns (check, file size)."""
    async def after() -> int:
        if revision_after is not None:
            return revision_after
        if endpoint is None:
            raise ValueError("verify_snapshot needs revision_after or the endpoint to read it from")
        return (await key_count(conn, client.argv([endpoint]), redactor))[1]

    rev_after, text, size = await asyncio.gather(after(), snapshot_status(conn, client, path, redactor),
                                                 file_size(conn, path, redactor))
    return check_snapshot(text, revision_before=revision_before, revision_after=rev_after, file_size=size), size


async def file_size(conn: Any, path: str, redactor: Redactor) -> int:
    try:
        r = await run_command(conn, ["stat", "-c", "%s", path], redact=redactor, log_output=False, timeout_s=30)
    except RemoteCommandError:
        return 0
    return int(r.text.strip() or 0)


async def copy_snapshot_offsite(conn: Any, path: str, store: Any, store_key: str, *, saving: Any = None,
                                timeout_s: float | None = None) -> dict:
    """Stream a snapshot from the host into the off-site `Store` over SFTP (never a whole file in memory),
    hashing it on the way (`tasks.storage.copy_stream_async`; the sink is aborted on any failure). With
    `saving` (the `save_snapshot` future), the file is followed as etcdctl writes it (`_follow`). The copy as a
    whole is bounded by `timeout_s` (`etcd.timeouts.transfer`; None: no bound)."""
    from tasks.ssh import sftp_chunks
    from tasks.storage import copy_stream_async

    async with asyncio.timeout(timeout_s), conn.start_sftp_client() as sftp:
        chunks = _follow(sftp, path, saving) if saving is not None else sftp_chunks(sftp, path)
        copied = await copy_stream_async(store_key, chunks, store.sink(store_key))
    return {"size": copied.size, "sha256": copied.sha256, "location": copied.location}


# --- beyond the snapshot itself: keys at a revision, files, maintenance (issue 16 flows) ------------------

# etcdctl's "every key" is the empty key with --prefix (etcd v3.4 docs *Interacting with etcd*, "Read keys":
# `etcdctl get --prefix ''`); `quote_argv` refuses empty words, so a fixed `sh -c` adds it as the last word.
_WITH_EMPTY_KEY = ["sh", "-c", 'exec "$@" ""', "sh"]


def _json_out(r: Any) -> dict:
    import json

    try:
        return json.loads(r.text) if r.text.strip() else {}
    except ValueError:
        return {}


async def key_count(conn: Any, argv: list[str], redactor: Redactor, revision: int | None = None) -> tuple[int, int]:
    """(count of keys, header revision) at `revision` (None: now). etcdctl 3.4 has no `--count-only` (3.5
    added it); the range answer's `count` is the whole range's size whatever the `--limit`
    (etcdserverpb RangeResponse.count), so `get '' --prefix --limit=1` counts every key."""
    args = [*argv, "get", "--prefix", "--limit=1", "-w", "json"] + ([f"--rev={revision}"] if revision else [])
    r = await run_command(conn, [*_WITH_EMPTY_KEY, *args], redact=redactor, log_output=False, timeout_s=120, keep=5)
    d = _json_out(r)
    return int(d.get("count", 0)), int(d.get("header", {}).get("revision", 0))


async def sample_keys(conn: Any, argv: list[str], revision: int, limit: int) -> list[dict]:
    """The first `limit` keys at `revision` with the SHA-256 of their values (never the values: a
    Kubernetes Secret lives in etcd): what the restore drill reads back."""
    import base64
    import hashlib

    if limit <= 0:
        return []
    r = await run_command(conn, [*_WITH_EMPTY_KEY, *argv, "get", "--prefix", f"--limit={limit}", f"--rev={revision}",
                                 "-w", "json"], redact=Redactor.of([]), log_output=False, timeout_s=120, keep=5)
    kvs = _json_out(r).get("kvs", []) or []
    return [{"key": base64.b64decode(kv["key"]).decode("utf-8", "replace"),
             "sha256": hashlib.sha256(base64.b64decode(kv.get("value", ""))).hexdigest(),
             "mod_revision": int(kv.get("mod_revision", 0))} for kv in kvs]


async def make_dir(conn: Any, path: str, redactor: Redactor) -> None:
    if not _PATH_RE.match(path):
        raise ValueError(f"directory {path!r}")
    await run_command(conn, ["mkdir", "-p", "-m", "0700", path], redact=redactor, log_output=False, timeout_s=30)


async def remove_path(conn: Any, path: str, redactor: Redactor) -> None:
    """Remove a file or folder the flow made (`rm -rf` of a validated absolute path, never '/')."""
    if not _PATH_RE.match(path) or path.count("/") < 2 or ".." in path.split("/"):
        raise ValueError(f"refusing to remove {path!r}")
    await run_command(conn, ["rm", "-rf", "--", path, path + ".part"], redact=redactor, log_output=False,
                      timeout_s=120, check=False)


async def defragment(conn: Any, client: EtcdClient, endpoint: str, redactor: Redactor, timeout_s: int) -> None:
    """`etcdctl defrag` of ONE member (etcd v3.4 *Maintenance*, "Defragmentation": it blocks the member's
    reads and writes while it rebuilds the file, so one member at a time)."""
    await run_command(conn, client.argv([endpoint], "defrag", timeout_s=timeout_s), redact=redactor,
                      log_output=False, timeout_s=timeout_s + 15)


async def compact(conn: Any, client: EtcdClient, endpoints: list[str], revision: int, redactor: Redactor) -> None:
    """`etcdctl compact <rev>`: drop the history before `revision` (*Maintenance*, "History compaction"),
    so that defragmentation can give the space back."""
    await run_command(conn, client.argv(endpoints, "compact", str(int(revision))), redact=redactor,
                      log_output=False, timeout_s=client.command_timeout_s + 15)


async def disarm_alarms(conn: Any, client: EtcdClient, endpoints: list[str], redactor: Redactor) -> None:
    """`etcdctl alarm disarm` (*Maintenance*, "Space quota": after freeing space, disarm to resume writes)."""
    await run_command(conn, client.argv(endpoints, "alarm", "disarm"), redact=redactor, log_output=False,
                      timeout_s=client.command_timeout_s + 15)


# --- the restore drill on the scratch host ------------------------------------------------------------

DRILL_MEMBER = "drill"
# Starts a detached process: a new session (`setsid`: sshd's hang-up at the session's end never reaches it),
# output to a log, prints its pid (setsid execs in place here: a background job is no group leader).
_START_DETACHED = 'log=$1; shift; setsid "$@" >"$log" 2>&1 </dev/null & echo $!'


def drill_urls(client_port: int, peer_port: int) -> tuple[str, str]:
    return f"http://127.0.0.1:{client_port}", f"http://127.0.0.1:{peer_port}"


async def restore_snapshot(conn: Any, etcdctl: str, snapshot: str, data_dir: str, peer_url: str,
                           redactor: Redactor) -> None:
    """`etcdctl snapshot restore` into a fresh data dir as a new one-member cluster (etcd v3.4 *Disaster
    recovery*, "Restoring a cluster": --name, --initial-cluster, --initial-cluster-token,
    --initial-advertise-peer-urls; the restore checks the snapshot's hash)."""
    for p in (snapshot, data_dir):
        if not _PATH_RE.match(p):
            raise ValueError(f"path {p!r}")
    await run_command(conn, ["env", "ETCDCTL_API=3", etcdctl, "snapshot", "restore", snapshot, "--data-dir", data_dir,
                             "--name", DRILL_MEMBER, "--initial-cluster", f"{DRILL_MEMBER}={peer_url}",
                             "--initial-cluster-token", "etcd-restore-drill", "--initial-advertise-peer-urls", peer_url],
                      redact=redactor, log_output=False, timeout_s=600)


async def start_drill_member(conn: Any, etcd: str, data_dir: str, client_url: str, peer_url: str, log: str,
                             redactor: Redactor) -> int:
    """Start one etcd on the restored data dir, on loopback only; returns its pid on the scratch host."""
    r = await run_command(conn, ["sh", "-c", _START_DETACHED, "sh", log, etcd, "--name", DRILL_MEMBER, "--data-dir",
                                 data_dir, "--listen-client-urls", client_url, "--advertise-client-urls", client_url,
                                 "--listen-peer-urls", peer_url, "--initial-advertise-peer-urls", peer_url,
                                 "--initial-cluster", f"{DRILL_MEMBER}={peer_url}", "--log-level", "warn"],
                          redact=redactor, log_output=False, timeout_s=30)
    return int(r.text.strip().splitlines()[-1])


async def stop_drill_member(conn: Any, pid: int, redactor: Redactor) -> None:
    """TERM, then KILL after 10 s: the drill member never outlives the drill."""
    script = ('kill -TERM "$1" 2>/dev/null || exit 0; i=0; while kill -0 "$1" 2>/dev/null; do i=$((i+1)); '
              '[ "$i" -gt 20 ] && kill -KILL "$1"; sleep 0.5; done')
    await run_command(conn, ["sh", "-c", script, "sh", str(int(pid))], redact=redactor, log_output=False,
                      timeout_s=30, check=False)


@asynccontextmanager
async def connect_first(hosts: list[Any]) -> AsyncIterator[tuple[Any, Any]]:
    """(connection, host block) of the first etcd host that answers over SSH, in the config's order; one
    host down is not a failed run while another can run etcdctl."""
    from tasks._retry import TransientError
    from tasks.ssh import connect

    errors = []
    for host in hosts:
        try:
            cm = connect(bulk_kwargs(host.connect_kwargs()))
            conn = await cm.__aenter__()
        except (TransientError, PermissionError) as exc:
            errors.append(f"{host.label}: {exc}")
            continue
        try:
            yield conn, host
        finally:
            await cm.__aexit__(None, None, None)
        return
    raise TransientError("no etcd host reachable over SSH: " + "; ".join(errors))


@asynccontextmanager
async def connect_etcd(etcd: Any, hosts: list[Any]) -> AsyncIterator[tuple[Any, EtcdClient, Any]]:
    """(connection, client, `etcd.hosts[]` entry) of the first etcd host that answers (`connect_first`):
    the `EtcdClient` is built from that host's entry in the platform config's `etcd` section."""
    async with connect_first(hosts) as (conn, host):
        entry = next(h for h in etcd.hosts if h.name == host.label)
        yield conn, EtcdClient.from_config(etcd, entry), entry


async def _follow(sftp: Any, path: str, saving: Any, poll_s: float = 0.05, chunk: int = 4 * 1024 * 1024):
    """The bytes of the snapshot `etcdctl snapshot save` is writing, as it writes them. etcdctl 3.4
    (`clientv3/snapshot/v3_snapshot.go` Save) creates `<path>.part`, appends the stream to it, fsyncs and renames
    it to `<path>`: one file written once, front to back. It is read through the handle opened on `.part` (the
    rename keeps the inode) until `saving` is done and the end is reached; a failed save raises here."""
    import asyncssh

    f = None
    while f is None:
        try:
            f = await sftp.open(path + ".part", "rb")
        except asyncssh.SFTPNoSuchFile:
            if saving.done():
                saving.result()  # raises when the save failed
                f = await sftp.open(path, "rb")  # done before we looked: the renamed file
            else:
                await asyncio.sleep(poll_s)
    try:
        while True:
            data = await f.read(chunk)
            if data:
                yield data
            elif saving.done():
                saving.result()
                data = await f.read(chunk)  # whatever was written after the last read, then the end
                if not data:
                    return
                yield data
            else:
                await asyncio.sleep(poll_s)
    finally:
        await f.close()


async def take_verified_snapshot(conn: Any, client: EtcdClient, endpoint: str, path: str, store: Any, store_key: str,
                                 redactor: Redactor, *, revision_before: int, sample: int,
                                 timeout_s: int, transfer_timeout_s: float | None = None) -> dict:
    """`snapshot save` from `endpoint`, streamed off-site while etcdctl writes it (`_follow`, SHA-256 on the
    way, `tasks.storage.copy_stream_async`), then, while the copy finishes, the verification: the live revision
    after the save, `snapshot status` against it, the live key count and the sampled keys at the snapshot's
    revision. The copy must be as long as the finished file. A snapshot that fails a check is deleted from the
    store again (no manifest is ever written for it); a store error is raised as it is.

    Returns {"check", "key_count", "sample", "copied"} ("copied" None when the check failed)."""
    saving = asyncio.ensure_future(save_snapshot(conn, client, endpoint, path, redactor, timeout_s=timeout_s))

    async def verify() -> tuple[SnapshotCheck, int, list[dict], int]:
        await saving
        check, size = await verify_snapshot(conn, client, path, redactor, revision_before=revision_before,
                                            endpoint=endpoint)
        if not check.ok:
            return check, 0, [], size
        (count, _), keys = await asyncio.gather(
            key_count(conn, client.argv([endpoint]), redactor, revision=check.revision),
            sample_keys(conn, client.argv([endpoint]), check.revision, sample))
        return check, count, keys, size

    copying = asyncio.ensure_future(copy_snapshot_offsite(conn, path, store, store_key, saving=saving,
                                                          timeout_s=transfer_timeout_s))
    verified, copied, saved = await asyncio.gather(verify(), copying, saving, return_exceptions=True)
    if isinstance(saved, BaseException):  # the save failed: nothing was committed (the copy raised too)
        raise saved
    if isinstance(copied, BaseException):
        raise copied
    if isinstance(verified, BaseException):
        await asyncio.to_thread(store.delete, [store_key])
        raise verified
    check, count, keys, size = verified
    if check.ok and size != copied["size"]:
        check = SnapshotCheck(False, check.hash, check.revision, check.total_keys, check.total_size,
                              (f"the off-site copy has {copied['size']} bytes, the snapshot file {size}",))
    if not check.ok:
        await asyncio.to_thread(store.delete, [store_key])
        copied = None
    return {"check": check, "key_count": count, "sample": keys, "copied": copied}


# OpenSSH offers chacha20-poly1305 first; with AES-NI, AES-GCM moves a snapshot about twice as fast through
# asyncssh (200 MB over loopback: 0.45 s vs 0.91 s, measured for benchmarks/etcd_snapshot.py). Every
# algorithm stays allowed, only the preference changes.
BULK_CIPHERS = ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "chacha20-poly1305@openssh.com",
                "aes128-ctr", "aes192-ctr", "aes256-ctr"]


def bulk_kwargs(connect_kwargs: dict) -> dict:
    """A host block's `connect_kwargs()` preferring the fast bulk ciphers (snapshots are hundreds of MB)."""
    return {**connect_kwargs, "encryption_algs": BULK_CIPHERS}
