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
- a dry run (the default) publishes the plan and stops there;
- a real run pauses for approval showing that plan (`tasks.approval`), then compacts, defragments each member
  (`etcd.timeouts.defrag` each) and checks the cluster's health after each; the first failure stops the run;
- disarms `NOSPACE` only when every member's db is back under the critical share of the quota, and reads
  the alarms again to confirm.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from prefect import flow, get_run_logger

from blocks.config import parse_duration
from blocks.platform import Platform
from flows.etcd_backup import etcd_section
from tasks.approval import aask_approval
from tasks.etcd import (
    EtcdClient,
    compact,
    connect_etcd,
    defragment,
    disarm_alarms,
    read_cluster_status,
)
from tasks.etcd_rules import defrag_plan, space_is_back
from tasks.gitlab_rules import human_bytes
from tasks.notify import notify
from tasks.redact import Redactor
from tasks.reports import apublish_markdown, md_table


class DefragFailed(RuntimeError):
    pass


async def _plans(conn: Any, client: EtcdClient, selected: list[Any], redactor: Redactor) -> dict[str, dict]:
    """Each selected cluster's status now and its plan (`defrag_plan`: the order, and the refusals)."""
    plans: dict[str, dict] = {}
    for cl in selected:
        s = await read_cluster_status(conn, client, cl.name, list(cl.endpoints), redactor)
        steps, refusals = defrag_plan(s)
        plans[cl.name] = {"steps": steps, "refusals": refusals, "alarms": s.alarms, "revision": s.revision,
                          "quota": cl.quota_bytes, "endpoints": list(cl.endpoints), "status": s}
    return plans


def _plan_markdown(platform: str, plans: dict[str, dict], compact_first: bool) -> str:
    lines = [f"# etcd defragmentation plan: {platform}", ""]
    for name, p in plans.items():
        lines += [f"## {name}", ""]
        if p["refusals"]:
            lines += ["**Refused:** " + "; ".join(p["refusals"]), ""]
        lines += [f"- compact to revision {p['revision']} first: {'yes' if compact_first else 'no'}",
                  f"- alarms: {', '.join(a['alarm'] for a in p['alarms']) or 'none'}"
                  + (" (disarmed once every member is under the critical share of the quota)" if p["alarms"] else ""),
                  "", md_table([{"order": i + 1, "member": s.member, "role": "leader" if s.is_leader else "follower",
                                 "db size": human_bytes(s.db_size), "in use": human_bytes(s.db_size_in_use),
                                 "quota": human_bytes(p["quota"])} for i, s in enumerate(p["steps"])]), ""]
    return "\n".join(lines)


@flow(name="etcd-defrag", log_prints=False)
async def etcd_defrag(platform: str = "main", clusters: list[str] | None = None, dry_run: bool = True,
                      compact_first: bool = True, approval_timeout_s: int | None = None,
                      poll_interval_s: float = 10) -> dict:
    """Defragment etcd one member at a time (followers first, the leader last), compacting first; clears a
    NOSPACE alarm once space is back. Dry run by default; a real run pauses for approval showing the plan."""
    logger = get_run_logger()
    plat = await Platform.aopen(platform, "notifier")
    etcd = etcd_section(plat)
    redactor = Redactor.of(await plat.asecrets())
    hosts = await asyncio.to_thread(plat.etcd_hosts)
    t = etcd.thresholds
    selected = [c for c in etcd.clusters if clusters is None or c.name in clusters]
    defrag_s = parse_duration(etcd.timeouts.defrag)
    rows: list[dict] = []
    result: dict = {"dry_run": dry_run, "approved": None, "approver": None, "steps": rows, "clusters": {}}
    async with connect_etcd(etcd, hosts) as (conn, client, _):  # closed again before the approval's wait
        plans = await _plans(conn, client, selected, redactor)
    plan_md = _plan_markdown(platform, plans, compact_first)
    result["plan"] = {n: {"order": [s.member for s in p["steps"]], "refusals": p["refusals"],
                          "alarms": [a["alarm"] for a in p["alarms"]]} for n, p in plans.items()}
    await apublish_markdown(f"etcd-defrag-plan-{platform}", plan_md, description="etcd defragmentation plan")
    if dry_run:
        return result
    refused = {n: p["refusals"] for n, p in plans.items() if p["refusals"]}
    if refused:
        raise DefragFailed(f"refused: {refused}")
    # no SSH connection is held while the approval waits (up to etcd.timeouts.approval)
    answer = await aask_approval(plan_md, approval_timeout_s or parse_duration(etcd.timeouts.approval),
                                 poll_interval_s)
    result["approved"], result["approver"] = answer.approve, answer.who()
    if not answer.approve:
        logger.info("etcd defragmentation declined by %s", answer.who())
        return result
    error = None
    try:
        async with connect_etcd(etcd, hosts) as (conn, client, _):
            # the approved plan may be an hour old: read the clusters again and plan from what they are now;
            # a member that went down meanwhile refuses the run as it would have before the approval
            plans = await _plans(conn, client, selected, redactor)
            refused = {n: p["refusals"] for n, p in plans.items() if p["refusals"]}
            if refused:
                raise DefragFailed(f"refused after the approval, the clusters changed meanwhile: {refused}")
            for name, p in plans.items():
                if compact_first and p["revision"]:
                    await compact(conn, client, p["endpoints"], p["revision"], redactor)
                    rows.append({"cluster": name, "step": f"compact to {p['revision']}", "status": "ok"})
                s = p["status"]
                for step in p["steps"]:
                    t0 = time.monotonic()
                    await defragment(conn, client, step.endpoint, redactor, defrag_s)
                    s = await read_cluster_status(conn, client, name, p["endpoints"], redactor)
                    m = next(x for x in s.members if x.endpoint == step.endpoint)
                    unhealthy = [x.name or x.endpoint for x in s.members if not x.healthy]
                    rows.append({"cluster": name, "step": f"defrag {step.member}", "status": "ok" if not unhealthy
                                 else "unhealthy after", "seconds": round(time.monotonic() - t0, 1),
                                 "db size": f"{human_bytes(step.db_size)} -> {human_bytes(m.db_size)}"})
                    if unhealthy:
                        raise DefragFailed(f"{name}: after defragmenting {step.member}, not healthy: {unhealthy}")
                # `s`: the status read after the last member's defragmentation
                if any(a["alarm"] == "NOSPACE" for a in s.alarms):
                    if not space_is_back(s, p["quota"], t):
                        raise DefragFailed(f"{name}: NOSPACE kept: a member is still above "
                                           f"{t.quota_critical:.0%} of the quota after defragmentation (delete or "
                                           "expire data, or raise quota-backend-bytes)")
                    await disarm_alarms(conn, client, p["endpoints"], redactor)
                    s = await read_cluster_status(conn, client, name, p["endpoints"], redactor)
                    rows.append({"cluster": name, "step": "alarm disarm", "status": "ok" if not s.alarms
                                 else f"still raised: {s.alarms}"})
                    if s.alarms:
                        raise DefragFailed(f"{name}: alarms still raised after disarm: {s.alarms}")
                result["clusters"][name] = {"alarms": s.alarms,
                                            "db_sizes": {m.name or m.endpoint: m.db_size for m in s.members}}
    except Exception as exc:  # noqa: BLE001 - reported, notified, then raised
        error = redactor.error(exc)
        rows.append({"step": "stopped", "status": error[:300]})
    summary = plan_md + "\n## Done\n\n" + f"Approved by {result['approver']}.\n\n" + md_table(rows)
    await apublish_markdown(f"etcd-defrag-{platform}", summary, description="etcd defragmentation: what was done")
    if error:
        await notify(plat.notifier(), f"etcd defragmentation STOPPED on {platform}", error)
        raise DefragFailed(error)
    return result
