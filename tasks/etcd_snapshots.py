"""The etcd backup's and the restore drill's work on one cluster (what `flows.etcd_backup` and
`flows.etcd_restore_drill` run for each of `etcd.clusters[]`).

- `snapshot_cluster`: a verified snapshot from the first member that gives one (healthy followers first),
  streamed off-site with its manifest (`etcd-<cluster>/<id>/manifest.json`, written last);
- `apply_snapshot_retention`: GitLab's retention rule over a cluster's off-site snapshots;
- `drill_cluster`: one off-site snapshot restored and served on loopback on the scratch host, compared with
  its manifest.

The etcdctl commands are `tasks.etcd`'s; what their answers mean is `tasks.etcd_rules`'.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.etcd import (
    EtcdClient,
    drill_urls,
    key_count,
    make_dir,
    read_cluster_status,
    remove_path,
    restore_snapshot,
    sample_keys,
    snapshot_status,
    start_drill_member,
    stop_drill_member,
    take_verified_snapshot,
)
from tasks.etcd_rules import (
    check_snapshot,
    compare_drill,
    plan_snapshot_retention,
    snapshot_candidates,
    snapshot_id,
    snapshot_manifest,
    store_kind,
)
from tasks.redact import Redactor
from tasks.ssh import RemoteCommandError, SessionLost, connect, upload_chunks
from tasks.storage import delete_offsite_backups, list_offsite_manifests


class EtcdBackupFailed(RuntimeError):
    pass


class DrillFailed(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


# --- the backup -----------------------------------------------------------------------------------


@task(name="etcd-snapshot", cache_policy=NONE)
async def snapshot_cluster(conn: Any, client: EtcdClient, cluster: Any, snap_dir: str, store: Any, redactor: Redactor,
                           *, snapshot_timeout_s: int, sample: int, started: datetime,
                           transfer_timeout_s: int | None = None) -> dict:
    """Snapshot one cluster from the first member that gives a verified snapshot, copy it off-site, write the
    manifest. Returns the manifest and every attempt. A store error is raised at once (not another member)."""
    logger = get_run_logger()
    status = await read_cluster_status(conn, client, cluster.name, list(cluster.endpoints), redactor)
    candidates = snapshot_candidates(status)
    attempts: list[dict] = []
    if not candidates:
        raise EtcdBackupFailed(f"{cluster.name}: no healthy member to snapshot ({'; '.join(status.errors)[:300]})")
    bid = snapshot_id(cluster.name, started)
    for m in candidates:
        who = m.name or m.endpoint
        path = f"{snap_dir}/{bid}-{who}.db"
        t0 = time.monotonic()
        try:
            key = f"{store_kind(cluster.name)}/{bid}/snapshot.db"
            taken = await take_verified_snapshot(conn, client, m.endpoint, path, store, key, redactor,
                                                 revision_before=m.revision, sample=sample,
                                                 timeout_s=snapshot_timeout_s,
                                                 transfer_timeout_s=transfer_timeout_s)
            check = taken["check"]
            if not check.ok:
                attempts.append({"member": who, "leader": m.is_leader, "result": "not verified: "
                                 + "; ".join(check.problems), "seconds": round(time.monotonic() - t0, 1)})
                logger.warning("%s: snapshot from %s does not verify: %s", cluster.name, who, check.problems)
                continue
            copied = taken["copied"]
            manifest = snapshot_manifest(backup_id=bid, cluster=cluster.name, member=who, endpoint=m.endpoint,
                                         check=check, copied=copied, store_key=key, started_at=started,
                                         finished_at=_now(), key_count=taken["key_count"], sample=taken["sample"])
            await asyncio.to_thread(store.write_json, f"{store_kind(cluster.name)}/{bid}/manifest.json", manifest)
            attempts.append({"member": who, "leader": m.is_leader, "result": "verified, off-site",
                             "seconds": round(time.monotonic() - t0, 1)})
            return {"manifest": manifest, "attempts": attempts, "location": copied["location"]}
        except (TimeoutError, RemoteCommandError, SessionLost) as exc:
            attempts.append({"member": who, "leader": m.is_leader, "result": "failed: " + redactor.error(exc)[:300],
                             "seconds": round(time.monotonic() - t0, 1)})
            logger.warning("%s: snapshot from %s failed, trying the next member: %s", cluster.name, who,
                           redactor.error(exc)[:300])
        finally:
            await remove_path(conn, path, redactor)
    raise EtcdBackupFailed(f"{cluster.name}: no member gave a verified snapshot: "
                           + "; ".join(f"{a['member']}: {a['result']}" for a in attempts))


async def apply_snapshot_retention(store: Any, cluster: str, keep_days: int, keep_count: int) -> list[dict]:
    """Delete the off-site snapshots GitLab's retention rule lets go (never the newest verified one); the
    decisions as rows."""
    kind = store_kind(cluster)
    manifests = await list_offsite_manifests(store, kind)
    plan = plan_snapshot_retention(manifests, now=_now(), keep_days=keep_days, keep_count=keep_count,
                                   run_succeeded=True)
    doomed = [d.id for d in plan if d.action == "delete"]
    if doomed:
        await delete_offsite_backups(store, kind, doomed)
    return [{"cluster": cluster, "snapshot": d.id, "created": d.created_at.strftime("%Y-%m-%d %H:%M"),
             "action": d.action, "reason": d.reason} for d in plan]


# --- the restore drill ----------------------------------------------------------------------------


async def _wait_serving(conn: Any, argv: list[str], redactor: Redactor, timeout_s: float) -> tuple[int, int]:
    """The restored member's (key count, revision), read as soon as it answers."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return await key_count(conn, argv, redactor)
        except (RemoteCommandError, TimeoutError):
            if time.monotonic() > deadline:
                raise DrillFailed(f"the restored member did not answer within {timeout_s:.0f}s") from None
            await asyncio.sleep(0.5)


@task(name="etcd-restore-drill-cluster", cache_policy=NONE)
async def drill_cluster(scratch: Any, scratch_cfg: Any, etcdctl: str, store: Any, manifest: dict, redactor: Redactor,
                        *, run_dir: str) -> dict:
    """Restore one snapshot on the scratch host, serve it on loopback, compare it with its manifest."""
    client_url, peer_url = drill_urls(scratch_cfg.client_port, scratch_cfg.peer_port)
    snapshot, data_dir = f"{run_dir}/{manifest['id']}.db", f"{run_dir}/{manifest['id']}.etcd"
    drill = EtcdClient(host=scratch_cfg.name, etcdctl=etcdctl, dial_timeout_s=2, command_timeout_s=10)
    argv = drill.plain(client_url)
    t0 = time.monotonic()
    pid = None
    async with connect(scratch.connect_kwargs()) as conn:
        try:
            await make_dir(conn, run_dir, redactor)
            async with conn.start_sftp_client() as sftp:  # a copy unlike the manifest's: refused, never restored
                size, sha256 = await upload_chunks(sftp, snapshot, store.chunks(manifest["store_key"]),
                                                   expected_sha256=manifest["sha256"],
                                                   name=store.describe(manifest["store_key"]))
            downloaded = {"size": size, "sha256": sha256}
            status = check_snapshot(await snapshot_status(conn, drill, snapshot, redactor), revision_before=0,
                                    revision_after=manifest["revision"], file_size=downloaded["size"])
            await restore_snapshot(conn, etcdctl, snapshot, data_dir, peer_url, redactor)
            pid = await start_drill_member(conn, scratch_cfg.etcd, data_dir, client_url, peer_url,
                                           f"{run_dir}/etcd.log", redactor)
            count, revision = await _wait_serving(conn, argv, redactor, 60)
            # the manifest's sample is the first N keys at its revision: one read of the same range there shows
            # a key missing (absent from the answer) or changed (another SHA-256); a member short of that
            # revision (reported below) is read as it is
            wanted = manifest.get("sample", [])
            at = min(revision, manifest["revision"])
            read = {k["key"]: k["sha256"] for k in await sample_keys(conn, argv, at, len(wanted))}
            sample = {k["key"]: read.get(k["key"]) for k in wanted}
            problems = compare_drill(manifest, downloaded=downloaded, status=status, revision=revision,
                                     key_count=count, sample_read=sample)
            rto = time.monotonic() - t0
        finally:
            if pid is not None:
                await stop_drill_member(conn, pid, redactor)
            await remove_path(conn, run_dir, redactor)
    return {"snapshot": manifest["id"], "revision": revision, "key_count": count, "sample_checked": len(sample),
            "size": downloaded["size"], "problems": problems, "rto_seconds": round(rto, 1)}

