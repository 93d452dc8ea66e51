"""etcd backup: a verified snapshot of the main and the events cluster, off-site, with retention.

Sources: etcd v3.4 docs *Disaster recovery* (https://etcd.io/docs/v3.4/op-guide/recovery/), kubespray
`roles/etcd/handlers/backup.yml` (etcdctl snapshot save with ETCDCTL_CERT=admin-<host>.pem, ETCDCTL_KEY,
ETCDCTL_CACERT=ca.pem from etcd_cert_dir; `etcd_backup_retention_count` local copies).

The guide's kubespray keeps `etcd_backup_retention_count: 30` local backups, taken only when kubespray
runs, never verified and on etcd's own disks. This flow, every 6 hours, per cluster (`etcd.clusters[]`):

1. reads the cluster's members, health and alarms (`tasks.etcd.read_cluster_status`);
2. takes `etcdctl snapshot save` from a healthy follower, the leader only when no follower is healthy
   (etcd v3.4 docs *Disaster recovery*, "Snapshotting the keyspace": one endpoint per save). A member that
   fails, hangs past `etcd.timeouts.snapshot` or yields a snapshot that does not verify: the next one;
3. verifies it with `etcdctl snapshot status` (hash, revision, totalKey, totalSize: etcdctl's
   `snapshot status -w json`) against the live revision before and after the save, and records the live key
   count at the snapshot's revision and a sample of keys (SHA-256 of their values) for the restore drill;
4. meanwhile streams it off-site through the `Store` (`tasks.storage`, SHA-256 on the way, no partial object;
   `tasks.etcd.take_verified_snapshot` runs both at once and deletes the copy again when the check fails),
   then writes the manifest (`etcd-<cluster>/<id>/manifest.json`) last: its presence marks a verified copy;
5. applies retention with GitLab's rule (`tasks.gitlab_rules.plan_retention`: the newest verified snapshot is
   never deleted, nothing is deleted after a failed run).

The snapshot file on the etcd host is removed once copied (kubespray's own backups stay as they are). A
failure of any cluster fails the run, leaves a report and notifies the webhook. One run at a time
(deployment concurrency limit 1).
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.etcd import (
    EtcdClient,
    connect_etcd,
    host_path,
    make_dir,
    read_cluster_status,
    remove_path,
    take_verified_snapshot,
)
from tasks.etcd_rules import (
    plan_snapshot_retention,
    snapshot_candidates,
    snapshot_id,
    snapshot_manifest,
)
from tasks.gitlab_rules import human_bytes, human_duration
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table, md_table
from tasks.ssh import RemoteCommandError, SessionLost
from tasks.storage import delete_offsite_backups, list_offsite_manifests

PARTS = ("backup_store",)


class EtcdBackupFailed(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


def store_kind(cluster: str) -> str:
    """Off-site folder of one etcd cluster's snapshots: `etcd-<cluster>/<id>/{snapshot.db,manifest.json}`."""
    return f"etcd-{cluster}"


def etcd_section(plat: Platform) -> Any:
    if plat.config.etcd is None:
        raise LookupError(f"platform {plat.name!r} has no `etcd` section: add it to the platform config "
                          "(configs/platform.example.yaml) and run `python -m blocks.load <platform.yaml>`")
    return plat.config.etcd


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


async def _retention(store: Any, cluster: str, keep_days: int, keep_count: int) -> list[dict]:
    kind = store_kind(cluster)
    manifests = await list_offsite_manifests(store, kind)
    plan = plan_snapshot_retention(manifests, now=_now(), keep_days=keep_days, keep_count=keep_count,
                                   run_succeeded=True)
    doomed = [d.id for d in plan if d.action == "delete"]
    if doomed:
        await delete_offsite_backups(store, kind, doomed)
    return [{"cluster": cluster, "snapshot": d.id, "created": d.created_at.strftime("%Y-%m-%d %H:%M"),
             "action": d.action, "reason": d.reason} for d in plan]


def _summary(platform: str, done: dict[str, dict], errors: list[str], rows: list[dict], seconds: float) -> str:
    lines = [f"# etcd backup: {platform}", ""]
    if errors:
        lines += ["**FAILED.** " + " / ".join(errors), "",
                  "Nothing was deleted for a failed cluster; earlier snapshots are untouched.", ""]
    lines += [f"- **Duration:** {human_duration(seconds)}", ""]
    if done:
        lines += ["## Snapshots", "", md_table([
            {"cluster": c, "snapshot": r["manifest"]["id"], "member": r["manifest"]["member"],
             "revision": r["manifest"]["revision"], "keys": r["manifest"]["key_count"],
             "size": human_bytes(r["manifest"]["size"]), "sha256": r["manifest"]["sha256"][:16] + "...",
             "off-site": r["location"]} for c, r in done.items()]), ""]
    attempts = [{"cluster": c, **a} for c, r in done.items() for a in r["attempts"]]
    if attempts:
        lines += ["## Attempts", "", md_table(attempts), ""]
    if rows:
        lines += ["## Retention", "", md_table(rows, limit=60)]
    return "\n".join(lines)


@flow(name="etcd-backup", log_prints=False)
async def etcd_backup(platform: str = "main", clusters: list[str] | None = None) -> dict:
    """Snapshot each etcd cluster (main, events) from a healthy follower, verify it, copy it off-site with a
    manifest, apply retention. `clusters` limits the run to some of `etcd.clusters[]` (default: all)."""
    logger = get_run_logger()
    started = _now()
    t0 = time.monotonic()
    plat = await Platform.aopen(platform, *PARTS)
    etcd = etcd_section(plat)
    redactor = Redactor.of(await plat.asecrets())
    store = plat.backup_store()
    hosts = await asyncio.to_thread(plat.etcd_hosts)
    selected = [c for c in etcd.clusters if clusters is None or c.name in clusters]
    if not selected:
        raise ValueError(f"no etcd cluster named {clusters}; have {[c.name for c in etcd.clusters]}")
    done: dict[str, dict] = {}
    errors: list[str] = []
    rows: list[dict] = []
    try:
        async with connect_etcd(etcd, hosts) as (conn, client, hc):
            snap_dir = host_path(hc.root, etcd.snapshot_dir)
            await make_dir(conn, snap_dir, redactor)
            for cl in selected:
                try:
                    done[cl.name] = await snapshot_cluster(
                        conn, client, cl, snap_dir, store, redactor, started=started, sample=etcd.sample_keys,
                        snapshot_timeout_s=parse_duration(etcd.timeouts.snapshot),
                        transfer_timeout_s=parse_duration(etcd.timeouts.transfer))
                except Exception as exc:  # noqa: BLE001 - the other cluster still gets its snapshot; reported below
                    errors.append(f"{cl.name}: {redactor.error(exc)}")
                    logger.error("etcd %s snapshot failed: %s", cl.name, errors[-1])
        if not errors:
            for cl in selected:
                rows += await _retention(store, cl.name, etcd.retention.keep_days, etcd.retention.keep_count)
    except Exception as exc:  # noqa: BLE001 - reported, notified, then raised
        errors.append(redactor.error(exc))
        logger.error("etcd backup failed: %s", errors[-1])
    seconds = time.monotonic() - t0
    await apublish_markdown(f"etcd-backup-{platform}", _summary(platform, done, errors, rows, seconds),
                            description="etcd snapshots: member, revision, keys, size, off-site location")
    if rows:
        await apublish_table(f"etcd-backup-retention-{platform}", rows, description="Retention decisions")
    if errors:
        # the one failure notice is the failed-run automation's (configs/prefect/automations.yaml): it carries
        # this message; the flow does not send a second one
        raise EtcdBackupFailed(" / ".join(errors) + "\nNothing was deleted.")
    return {"snapshots": {c: r["manifest"] for c, r in done.items()},
            "attempts": {c: r["attempts"] for c, r in done.items()}, "retention": rows, "seconds": round(seconds, 1)}
