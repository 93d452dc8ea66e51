"""etcd restore drill: the newest verified off-site snapshot restored and served on a scratch host, weekly.

Source: etcd v3.4 docs *Disaster recovery* (https://etcd.io/docs/v3.4/op-guide/recovery/).

For each cluster (`etcd.clusters[]`), on the scratch host (`etcd.scratch`), never on a production member:

1. the newest verified manifest off-site (`etcd-<cluster>/<id>/manifest.json`, written by etcd-backup);
2. the snapshot streamed from the store onto the scratch host (SFTP, SHA-256 on the way; a copy whose SHA-256
   is not the manifest's is refused before anything is restored), then `etcdctl snapshot status` (hash,
   revision, totalKey) against the manifest;
3. `etcdctl snapshot restore` into a fresh data dir as a new one-member cluster (etcd v3.4 docs *Disaster
   recovery*, "Restoring a cluster": `--name`, `--initial-cluster`, `--initial-cluster-token`,
   `--initial-advertise-peer-urls`), then one `etcd` on that data dir listening on 127.0.0.1 only;
4. the restored member's revision and key count against the manifest, and the manifest's sample of keys
   read back in one read of the same first keys at the manifest's revision (SHA-256 of each value);
5. the member stopped and the data dir removed, whatever happened.

RTO: from the start of the download to the restored member answering with the checks passed. RPO: the age
of the restored snapshot when the drill ran (what a restore now would lose at most). The per-cluster work is
`tasks.etcd_snapshots.drill_cluster`, the report `tasks.etcd_report.drill_summary`.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from prefect import flow, get_run_logger

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.etcd import etcd_section, host_path
from tasks.etcd_report import drill_summary
from tasks.etcd_rules import newest_verified, store_kind
from tasks.etcd_snapshots import DrillFailed, drill_cluster
from tasks.redact import Redactor
from tasks.reports import apublish_markdown
from tasks.storage import list_offsite_manifests


@flow(name="etcd-restore-drill", log_prints=False)
async def etcd_restore_drill(platform: str = "main", clusters: list[str] | None = None) -> dict:
    """Restore the newest verified off-site snapshot of each etcd cluster on the scratch host, serve it on
    loopback, check revision, key count and sampled keys against the manifest; report RTO and RPO."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, "backup_store")
    etcd = etcd_section(plat.config, plat.name)
    redactor = Redactor.of(await plat.asecrets())
    store = plat.backup_store()
    scratch = await asyncio.to_thread(plat.etcd_scratch_host)
    sc = etcd.scratch
    rows: list[dict] = []
    errors: list[str] = []
    run_dir = host_path(sc.root, f"{sc.work_dir}/{datetime.now(UTC):%Y%m%dT%H%M%S}")
    for cl in [c for c in etcd.clusters if clusters is None or c.name in clusters]:
        try:
            manifest = newest_verified(await list_offsite_manifests(store, store_kind(cl.name)))
            if manifest is None:
                raise DrillFailed(f"no verified off-site snapshot of {cl.name}: run etcd-backup first")
            row = await drill_cluster.with_options(timeout_seconds=parse_duration(etcd.timeouts.drill))(
                scratch, sc, etcd.etcdctl, store, manifest, redactor, run_dir=f"{run_dir}-{cl.name}")
            row["cluster"] = cl.name
            row["rpo_seconds"] = (datetime.now(UTC) - datetime.fromisoformat(manifest["finished_at"])).total_seconds()
            rows.append(row)
            if row["problems"]:
                errors.append(f"{cl.name}: " + "; ".join(row["problems"]))
        except Exception as exc:  # noqa: BLE001 - the next cluster is still drilled; reported below
            errors.append(f"{cl.name}: {redactor.error(exc)}")
            logger.error("etcd restore drill of %s failed: %s", cl.name, errors[-1])
    await apublish_markdown(f"etcd-restore-drill-{platform}", drill_summary(platform, rows, errors),
                            description="etcd restore drill: revision, keys, RTO, RPO")
    if errors:
        # the one failure notice is the failed-run automation's, carrying this message
        raise DrillFailed(" / ".join(errors))
    return {"clusters": {r["cluster"]: r for r in rows}}
