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
(deployment concurrency limit 1). The per-cluster work is `tasks.etcd_snapshots` (`snapshot_cluster`,
`apply_snapshot_retention`), the report `tasks.etcd_report.backup_summary`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.etcd import connect_etcd, etcd_section, host_path, make_dir
from tasks.etcd_report import backup_summary
from tasks.etcd_snapshots import EtcdBackupFailed, apply_snapshot_retention, snapshot_cluster
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, apublish_table

PARTS = ("backup_store",)


@flow(name="etcd-backup", log_prints=False)
async def etcd_backup(platform: str = "main", clusters: list[str] | None = None) -> dict:
    """Snapshot each etcd cluster (main, events) from a healthy follower, verify it, copy it off-site with a
    manifest, apply retention. `clusters` limits the run to some of `etcd.clusters[]` (default: all)."""
    logger = get_run_logger()
    started = datetime.now(UTC)
    t0 = time.monotonic()
    plat = await Platform.aopen(platform, *PARTS)
    etcd = etcd_section(plat.config, plat.name)
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
                rows += await apply_snapshot_retention(store, cl.name, etcd.retention.keep_days, etcd.retention.keep_count)
    except Exception as exc:  # noqa: BLE001 - reported, notified, then raised
        errors.append(redactor.error(exc))
        logger.error("etcd backup failed: %s", errors[-1])
    seconds = time.monotonic() - t0
    await apublish_markdown(f"etcd-backup-{platform}", backup_summary(platform, done, errors, rows, seconds),
                            description="etcd snapshots: member, revision, keys, size, off-site location")
    if rows:
        await apublish_table(f"etcd-backup-retention-{platform}", rows, description="Retention decisions")
    if errors:
        # the one failure notice is the failed-run automation's (configs/prefect/automations.yaml): it carries
        # this message; the flow does not send a second one
        raise EtcdBackupFailed(" / ".join(errors) + "\nNothing was deleted.")
    return {"snapshots": {c: r["manifest"] for c, r in done.items()},
            "attempts": {c: r["attempts"] for c, r in done.items()}, "retention": rows, "seconds": round(seconds, 1)}
