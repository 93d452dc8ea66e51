"""etcd's checks in the platform health check: one `Check` per etcd cluster (`etcd-main`, `etcd-events`).

The health check's own `etcd` check is the API server's view (`/readyz` etcd); these read etcd itself, with
etcdctl over SSH on an etcd host (`tasks.etcd.read_cluster_status`): members and leader, endpoint health,
alarms (`NOSPACE`, `CORRUPT`: critical), db size against the quota (critical above
`etcd.thresholds.quota_critical`, action "compact and defragment"), size in use against size
(fragmentation), leader changes and revision progress since the last run (`tasks.etcd_rules.health_findings`).

Each check weighs 1 in the score (`tasks.health.WEIGHTS` default); a critical one caps the grade at D like any
other critical check.

The last run's leader, raft term and revision per cluster are kept in the Prefect Variable
``etcd_health_<platform>``: the health check already keeps its previous grade in a Variable; a Variable is one
read and one write per run, survives a failed run, and needs no search through old runs' artifacts (which a
run that failed before publishing would not have).
"""

from __future__ import annotations

import asyncio
from typing import Any

from tasks.etcd import connect_etcd, read_cluster_status
from tasks.etcd_rules import health_findings
from tasks.findings import Finding
from tasks.health import Check
from tasks.redact import Redactor


def state_variable(platform: str) -> str:
    return f"etcd_health_{platform}".replace("-", "_")


def check_of(cluster: str, findings: list[Finding]) -> Check:
    """One health `Check` from a cluster's findings (`Check.from_findings`): its worst severity (info counts
    as ok, none at all is unknown), the problems in the summary, every finding with its advice as evidence
    (`severity check: summary -> advice`; the cluster is the check's name)."""
    return Check.from_findings(f"etcd-{cluster}", findings, subjects=False)


async def etcd_checks(platform: str, etcd: Any, hosts: list[Any], redactor: Redactor) -> list[Check]:
    """Read every cluster of `etcd` (the platform config's section) and judge it against the last run."""
    from prefect.variables import Variable

    previous = await Variable.aget(state_variable(platform), default=None)
    previous = previous if isinstance(previous, dict) else {}
    checks, state = [], {}
    async with connect_etcd(etcd, hosts) as (conn, client, _):
        for cl in etcd.clusters:
            s = await read_cluster_status(conn, client, cl.name, list(cl.endpoints), redactor)
            last = previous.get(cl.name)
            last = {**last, "leader_id": int(last.get("leader_id") or 0)} if isinstance(last, dict) else None
            checks.append(check_of(cl.name, health_findings(s, cl.quota_bytes, etcd.thresholds, last)))
            if s.leader is not None:  # member ids are uint64: kept as text (a JSON store may hold int64 only)
                state[cl.name] = {"leader_id": str(s.leader.member_id), "raft_term": s.leader.raft_term,
                                  "revision": s.revision}
    await Variable.aset(state_variable(platform), {**previous, **state}, overwrite=True)
    return checks


def etcd_probe(platform: str, plat: Any, redactor: Redactor):
    """The health check's probe for etcd (None when the platform config has no `etcd` section)."""
    etcd = plat.config.etcd
    if etcd is None:
        return None, ""

    async def probe() -> list[Check]:
        hosts = await asyncio.to_thread(plat.etcd_hosts)
        return await etcd_checks(platform, etcd, hosts, redactor)
    return probe, ",".join(f"etcd-{c.name}" for c in etcd.clusters)
