"""etcd-defrag as an operation (`tasks.operation`): its target, steps and way back.

`defrag_operation` declares it: the target is each cluster's ID (not its endpoints); the planner reads each
cluster's status, refuses with a member down or no leader (`tasks.etcd_rules.defrag_plan`), with an alarm
other than NOSPACE (`etcdctl alarm disarm` clears every alarm) or with endpoints answering two cluster IDs;
its steps are the compaction, each member's defragmentation (followers first, the leader last, the cluster's
health checked after each) and, when NOSPACE is raised, the alarm disarm once space is back. The etcdctl
commands are `tasks.etcd`'s.
"""

from __future__ import annotations

from typing import Any

from blocks.config import parse_duration
from tasks.etcd import EtcdClient, compact, connect_etcd, defragment, disarm_alarms, read_cluster_status
from tasks.etcd_rules import defrag_plan, space_is_back
from tasks.gitlab_rules import human_bytes
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout
from tasks.redact import Redactor
from tasks.reports import md_table
from tasks.ssh import RemoteCommandError


def _cluster_steps(conn: Any, client: EtcdClient, cl: Any, status: Any, order: list, compact_first: bool,
                   defrag_s: int, t: Any, redactor: Redactor) -> list[Step]:
    """One cluster's steps: compact, each member's defragmentation (followers first), the alarm disarm."""
    endpoints = list(cl.endpoints)
    steps: list[Step] = []

    async def health_after(_: Any, member: str) -> str:
        s = await read_cluster_status(conn, client, cl.name, endpoints, redactor)
        unhealthy = [x.name or x.endpoint for x in s.members if not x.healthy]
        if unhealthy:
            raise RuntimeError(f"{cl.name}: after defragmenting {member}, not healthy: {unhealthy}")
        return "healthy"

    if compact_first and status.revision:
        async def do_compact() -> str:
            rev = (await read_cluster_status(conn, client, cl.name, endpoints, redactor)).revision
            try:
                await compact(conn, client, endpoints, rev, redactor)
            except RemoteCommandError as exc:
                # etcd answers ErrCompacted when `rev` is at or below the last compaction (mvcc/kvstore.go
                # "required revision has been compacted"): nothing was written since, the step's end state holds
                if "required revision has been compacted" not in str(exc):
                    raise
                return f"already compacted at revision {rev}"
            return f"compacted to revision {rev}"

        steps.append(Step(f"compact {cl.name}", f"etcd cluster {cl.name}: history before the current revision",
                          "etcdctl exits 0", "not reversible: old revisions are dropped, current keys are kept",
                          do_compact))
    for d in order:
        async def do_defrag(d: Any = d) -> str:
            await defragment(conn, client, d.endpoint, redactor, defrag_s)
            return f"was {human_bytes(d.db_size)}"

        steps.append(Step(f"defrag {d.member}", f"member {d.member} ({'leader' if d.is_leader else 'follower'}) of "
                          f"{cl.name}: its db file is rebuilt", "every member of the cluster healthy afterwards",
                          "nothing to undo: the member keeps its data",
                          do_defrag, lambda r, m=d.member: health_after(r, m)))
    if any(a["alarm"] == "NOSPACE" for a in status.alarms):
        async def do_disarm() -> str:
            s = await read_cluster_status(conn, client, cl.name, endpoints, redactor)
            if not space_is_back(s, cl.quota_bytes, t):
                raise RuntimeError(f"{cl.name}: NOSPACE kept: a member is still above {t.quota_critical:.0%} of the "
                                   "quota after defragmentation (delete or expire data, or raise quota-backend-bytes)")
            await disarm_alarms(conn, client, endpoints, redactor)
            after = await read_cluster_status(conn, client, cl.name, endpoints, redactor)
            if after.alarms:
                raise RuntimeError(f"{cl.name}: alarms still raised after disarm: {after.alarms}")
            return "no alarm left"

        steps.append(Step(f"alarm disarm {cl.name}", f"etcd cluster {cl.name}: the NOSPACE alarm",
                          "`alarm list` is empty afterwards", "the alarm comes back by itself if space runs out again",
                          do_disarm))
    return steps


def defrag_operation(platform: str, config: Any, etcd: Any, hosts: list[Any], selected: list[Any],
                     redactor: Redactor, *, compact_first: bool, approval_timeout_s: int | None,
                     poll_interval_s: float) -> Operation:
    """The etcd-defrag operation over the `selected` clusters of the platform config's `etcd` section, through
    one SSH session to the first etcd host of `hosts` that answers (`tasks.etcd.connect_etcd`)."""
    defrag_s = parse_duration(etcd.timeouts.defrag)

    def session():
        return connect_etcd(etcd, hosts)

    async def planner(sess: Any) -> Plan:
        conn, client, _ = sess
        steps, refusals, facts, rows, ids = [], [], {}, [], []
        for cl in selected:
            s = await read_cluster_status(conn, client, cl.name, list(cl.endpoints), redactor)
            order, refused = defrag_plan(s)
            other = sorted({a["alarm"] for a in s.alarms} - {"NOSPACE"})
            if other:  # `alarm disarm` clears every alarm (etcdctl's AlarmRequest with no member: all of them)
                refused.append(f"alarm {', '.join(other)} raised: not a space problem; `alarm disarm` would clear "
                               "it too (etcd *Maintenance*; for CORRUPT see *Data corruption*)")
            if "," in s.cluster_id:  # kubespray's endpoints of two clusters mixed up in the config
                refused.append(f"its endpoints answer with different cluster IDs ({s.cluster_id}): fix "
                               f"etcd.clusters[{cl.name}].endpoints")
            refusals += [f"{cl.name}: {r}" for r in refused]
            ids.append(f"{cl.name}={s.cluster_id}")
            facts[cl.name] = {"order": [d.member for d in order], "alarms": sorted(a["alarm"] for a in s.alarms),
                              "members": sorted(f"{m.member_id:x}" for m in s.members if m.member_id)}
            rows += [{"cluster": cl.name, "order": i + 1, "member": d.member,
                      "role": "leader" if d.is_leader else "follower", "db size": human_bytes(d.db_size),
                      "in use": human_bytes(d.db_size_in_use), "quota": human_bytes(cl.quota_bytes)}
                     for i, d in enumerate(order)]
            steps += _cluster_steps(conn, client, cl, s, order, compact_first, defrag_s, etcd.thresholds, redactor)
        again = {"clusters": [c.name for c in selected], "dry_run": False}
        return Plan(Target("etcd cluster", ", ".join(c.name for c in selected), "; ".join(ids)), steps,
                    title="etcd defragmentation", details=md_table(rows), facts=facts, refusals=refusals,
                    way_back=WayBack("Compaction and defragmentation keep every current key; nothing is undone. "
                                     "A member left unhealthy: bring it back (its etcd service), then defragment "
                                     "the rest again.", "etcd-defrag", again))

    return Operation("etcd-defrag", platform, planner, session, lock=f"etcd-{platform}",
                   approval_timeout_s=approval_timeout(config, approval_timeout_s),
                   lock_timeout_s=lock_timeout(config), poll_interval_s=poll_interval_s, redactor=redactor,
                   key="-".join(c.name for c in selected))
