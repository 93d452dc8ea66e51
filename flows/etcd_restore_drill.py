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
of the restored snapshot when the drill ran (what a restore now would lose at most).
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
from flows.etcd_backup import etcd_section, store_kind
from tasks.etcd import (
    EtcdClient,
    drill_urls,
    host_path,
    key_count,
    make_dir,
    remove_path,
    restore_snapshot,
    sample_keys,
    snapshot_status,
    start_drill_member,
    stop_drill_member,
)
from tasks.etcd_rules import check_snapshot, compare_drill, newest_verified
from tasks.gitlab_rules import human_bytes, human_duration
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, md_table
from tasks.ssh import RemoteCommandError, connect, upload_chunks
from tasks.storage import list_offsite_manifests


class DrillFailed(RuntimeError):
    pass


def _now() -> datetime:
    return datetime.now(UTC)


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


def _summary(platform: str, rows: list[dict], errors: list[str]) -> str:
    lines = [f"# etcd restore drill: {platform}", ""]
    passed = "**Passed:** every snapshot restored as its manifest says."
    lines += ["**FAILED.** " + " / ".join(errors), ""] if errors else [passed, ""]
    lines += ["Restored on the scratch host only; no production member was touched.", ""]
    if rows:
        lines += [md_table([{"cluster": r["cluster"], "snapshot": r["snapshot"], "revision": r["revision"],
                             "keys": r["key_count"], "sampled keys": r["sample_checked"], "size": human_bytes(r["size"]),
                             "RTO": human_duration(r["rto_seconds"]), "RPO": human_duration(r["rpo_seconds"]),
                             "result": "; ".join(r["problems"]) or "ok"} for r in rows])]
    return "\n".join(lines)


@flow(name="etcd-restore-drill", log_prints=False)
async def etcd_restore_drill(platform: str = "main", clusters: list[str] | None = None) -> dict:
    """Restore the newest verified off-site snapshot of each etcd cluster on the scratch host, serve it on
    loopback, check revision, key count and sampled keys against the manifest; report RTO and RPO."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, "backup_store")
    etcd = etcd_section(plat)
    redactor = Redactor.of(await plat.asecrets())
    store = plat.backup_store()
    scratch = await asyncio.to_thread(plat.etcd_scratch_host)
    sc = etcd.scratch
    rows: list[dict] = []
    errors: list[str] = []
    run_dir = host_path(sc.root, f"{sc.work_dir}/{_now():%Y%m%dT%H%M%S}")
    for cl in [c for c in etcd.clusters if clusters is None or c.name in clusters]:
        try:
            manifest = newest_verified(await list_offsite_manifests(store, store_kind(cl.name)))
            if manifest is None:
                raise DrillFailed(f"no verified off-site snapshot of {cl.name}: run etcd-backup first")
            row = await drill_cluster.with_options(timeout_seconds=parse_duration(etcd.timeouts.drill))(
                scratch, sc, etcd.etcdctl, store, manifest, redactor, run_dir=f"{run_dir}-{cl.name}")
            row["cluster"] = cl.name
            row["rpo_seconds"] = (_now() - datetime.fromisoformat(manifest["finished_at"])).total_seconds()
            rows.append(row)
            if row["problems"]:
                errors.append(f"{cl.name}: " + "; ".join(row["problems"]))
        except Exception as exc:  # noqa: BLE001 - the next cluster is still drilled; reported below
            errors.append(f"{cl.name}: {redactor.error(exc)}")
            logger.error("etcd restore drill of %s failed: %s", cl.name, errors[-1])
    await apublish_markdown(f"etcd-restore-drill-{platform}", _summary(platform, rows, errors),
                            description="etcd restore drill: revision, keys, RTO, RPO")
    if errors:
        # the one failure notice is the failed-run automation's, carrying this message
        raise DrillFailed(" / ".join(errors))
    return {"clusters": {r["cluster"]: r for r in rows}}
