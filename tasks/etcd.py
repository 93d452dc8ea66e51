"""Talking to etcd: `etcdctl` (v3 API) run on an etcd host over SSH, as kubespray's etcd role does.

kubespray (`roles/etcd/tasks/backup.yml`, `roles/etcd/templates/etcdctl.sh.j2`) runs `etcdctl` on the etcd
host with `ETCDCTL_API=3`, `--cacert ca.pem --cert admin-<host>.pem --key admin-<host>-key.pem` from
`etcd_cert_dir` (/etc/ssl/etcd/ssl). Every command here is an argv list (`tasks.ssh.run_command` quotes it),
with `--dial-timeout`/`--command-timeout` so a hung member never hangs a run, and its output redacted.
What the answers mean is in `tasks.etcd_rules`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from tasks.etcd_rules import (
    ClusterStatus,
    SnapshotCheck,
    check_snapshot,
    cluster_status,
)
from tasks.redact import Redactor
from tasks.ssh import RemoteCommandError, run_command

_HOST_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,62}\Z")
_PATH_RE = re.compile(r"^/[A-Za-z0-9_.@/\-]+\Z")
_ENDPOINT_RE = re.compile(r"^https://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}\Z")


@dataclass(frozen=True)
class EtcdClient:
    """How `etcdctl` runs on one etcd host: the host's inventory name (its `admin-<host>.pem`), the
    certificate folder as that host sees it, and the time limits."""

    host: str
    cert_dir: str = "/etc/ssl/etcd/ssl"
    etcdctl: str = "etcdctl"
    dial_timeout_s: int = 3
    command_timeout_s: int = 10

    def __post_init__(self) -> None:
        if not _HOST_RE.match(self.host) or not _PATH_RE.match(self.cert_dir):
            raise ValueError(f"bad etcd host {self.host!r} or cert dir {self.cert_dir!r}")

    def argv(self, endpoints: list[str], *args: str, timeout_s: int | None = None) -> list[str]:
        for ep in endpoints:
            if not _ENDPOINT_RE.match(ep):
                raise ValueError(f"etcd endpoint {ep!r} must look like https://host:port")
        c = self.cert_dir
        return ["env", "ETCDCTL_API=3", self.etcdctl, f"--endpoints={','.join(endpoints)}",
                f"--cacert={c}/ca.pem", f"--cert={c}/admin-{self.host}.pem", f"--key={c}/admin-{self.host}-key.pem",
                f"--dial-timeout={self.dial_timeout_s}s",
                f"--command-timeout={timeout_s or self.command_timeout_s}s", *args]


async def read_cluster_status(conn: Any, client: EtcdClient, cluster: str, endpoints: list[str],
                              redactor: Redactor) -> ClusterStatus:
    """Members, endpoint status and health, alarms of one cluster (4 etcdctl calls). An unreachable member
    makes etcdctl exit non-zero while still printing the others' JSON: that output is used, the error kept."""
    outs, errors = {}, []
    for what, args in (("members", ["member", "list"]), ("status", ["endpoint", "status"]),
                       ("health", ["endpoint", "health"]), ("alarms", ["alarm", "list"])):
        r = await run_command(conn, client.argv(endpoints, *args, "-w", "json"), check=False, redact=redactor,
                              log_output=False, timeout_s=client.command_timeout_s * 3 + 10)
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
                          revision_after: int) -> SnapshotCheck:
    size = await file_size(conn, path, redactor)
    text = await snapshot_status(conn, client, path, redactor)
    return check_snapshot(text, revision_before=revision_before, revision_after=revision_after, file_size=size)


async def file_size(conn: Any, path: str, redactor: Redactor) -> int:
    try:
        r = await run_command(conn, ["stat", "-c", "%s", path], redact=redactor, log_output=False, timeout_s=30)
    except RemoteCommandError:
        return 0
    return int(r.text.strip() or 0)


async def copy_snapshot_offsite(conn: Any, path: str, store: Any, store_key: str) -> dict:
    """Stream a snapshot from the host into the off-site `Store` over SFTP (never a whole file in memory),
    hashing it on the way (`tasks.storage.copy_stream_async`; the sink is aborted on any failure)."""
    from tasks.ssh import sftp_chunks
    from tasks.storage import copy_stream_async

    async with conn.start_sftp_client() as sftp:
        copied = await copy_stream_async(store_key, sftp_chunks(sftp, path), store.sink(store_key))
    return {"size": copied.size, "sha256": copied.sha256, "location": copied.location}
