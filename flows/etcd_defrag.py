"""etcd defragmentation (manual): compact, defragment one member at a time, disarm NOSPACE once space is back.

Source: etcd v3.4 docs *Maintenance* (https://etcd.io/docs/v3.4/op-guide/maintenance/).

etcd v3.4 docs *Maintenance*: "History compaction" drops old revisions (space inside the file becomes free
pages), "Defragmentation" gives those pages back to the filesystem, member by member (a member being
defragmented answers neither reads nor writes), and "Space quota": a member over `--quota-backend-bytes`
raises `NOSPACE`, after which the cluster only serves reads and deletes until space is freed and the alarm
is disarmed (`etcdctl alarm disarm`).

The flow, per cluster (`etcd.clusters[]`, or the `clusters` parameter):

- plans: every member healthy and a leader (else it refuses: with a member down, blocking another could
  cost the quorum), the order (followers first, the leader last), each member's size and size in use, the
  alarms, and whether it compacts first (`compact`, default on: to the current revision);
- runs through the one operation module (`tasks.operation`), declared by `tasks.etcd_plans.defrag_operation`:
  the target is each cluster's ID (not its endpoints), the plan's steps are the compaction, each member's
  defragmentation and the alarm disarm;
- a dry run (the default) publishes the plan and stops there;
- a real run pauses for approval showing that plan, then re-reads the clusters and refuses if the plan
  changed (a member down, a new alarm, another cluster behind the endpoints); it compacts, defragments each
  member (`etcd.timeouts.defrag` each) and checks the cluster's health after each; the first failure stops
  the run with the state computed from the steps;
- disarms `NOSPACE` only when every member's db is back under the critical share of the quota, and reads
  the alarms again to confirm (`etcdctl alarm disarm` clears every alarm: a cluster with any other alarm,
  CORRUPT for one, is refused instead).
"""

from __future__ import annotations

import asyncio
from typing import Any

from prefect import flow

from blocks.platform import Platform
from tasks.etcd import etcd_section
from tasks.etcd_plans import defrag_operation
from tasks.operation import run_operation
from tasks.redact import Redactor


@flow(name="etcd-defrag", log_prints=False)
async def etcd_defrag(platform: str = "main", clusters: list[str] | None = None, dry_run: bool = True,
                      compact_first: bool = True, approval_timeout_s: int | None = None,
                      poll_interval_s: float = 10) -> Any:
    """Defragment etcd one member at a time (followers first, the leader last), compacting first; clears a
    NOSPACE alarm once space is back. Dry run by default; a real run pauses for approval showing the plan."""
    plat = await Platform.aopen(platform, "notifier")
    etcd = etcd_section(plat.config, plat.name)
    redactor = Redactor.of(await plat.asecrets())
    hosts = await asyncio.to_thread(plat.etcd_hosts)
    selected = [c for c in etcd.clusters if clusters is None or c.name in clusters]
    unknown = sorted(set(clusters or ()) - {c.name for c in etcd.clusters})
    if unknown:
        raise ValueError(f"clusters: no etcd cluster named {unknown} in platform {platform!r}; have "
                         f"{[c.name for c in etcd.clusters]}")
    op = defrag_operation(platform, plat.config, etcd, hosts, selected, redactor, compact_first=compact_first,
                          approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s)
    return await run_operation(op, dry_run=dry_run)
