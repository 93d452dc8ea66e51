"""What etcd's answers mean: pure functions over `etcdctl ... -w json` output (etcd v3.4).

- `parse_member_list`, `parse_endpoint_status`, `parse_endpoint_health`, `parse_alarms`: etcdctl's JSON
  (`etcdctl/ctlv3/command/printer_json.go`; member and leader ids are uint64, printed as JSON numbers).
- `health_findings`: members and leader, endpoint health, alarms (etcd v3.4 docs *Maintenance*, "Space
  quota": a member over `--quota-backend-bytes` raises `NOSPACE` and the cluster accepts only reads and
  deletes until space is freed and the alarm disarmed; `CORRUPT` from the corruption check), database size
  against the quota, size in use against size (what defragmentation gives back: *Maintenance*,
  "Defragmentation"), leader changes and revision progress since the last run. Each is a
  `tasks.findings.Finding` (the one model): the cluster (`etcd-<name>`) its subject, the check its
  title, with a severity and advice.
- `snapshot_candidates`: healthy followers first, the leader last (a snapshot streams the whole db from
  the member: keep that load off the leader; etcd v3.4 *Disaster recovery*, "Snapshotting the keyspace").
- `check_snapshot`: `etcdctl snapshot status` (hash, revision, totalKey, totalSize) against the live
  revisions seen before and after the save.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from datetime import datetime

from blocks.config import EtcdHealthThresholds
from tasks.findings import Finding, Severity
ALARMS = ("NOSPACE", "CORRUPT")
DEFAULT_THRESHOLDS = EtcdHealthThresholds()  # the platform config's defaults (`etcd.thresholds`)


@dataclass
class MemberStatus:
    endpoint: str
    name: str = ""
    member_id: int = 0
    # the cluster's ID from the response header (etcdserverpb.ResponseHeader.cluster_id): what identifies an
    # etcd cluster across renamed hosts and endpoints
    cluster_id: int = 0
    reachable: bool = False
    healthy: bool = False
    is_leader: bool = False
    leader_id: int = 0
    revision: int = 0
    raft_term: int = 0
    db_size: int = 0
    db_size_in_use: int = 0
    version: str = ""
    error: str = ""


@dataclass
class ClusterStatus:
    cluster: str
    members: list[MemberStatus] = field(default_factory=list)
    alarms: list[dict] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def leader(self) -> MemberStatus | None:
        return next((m for m in self.members if m.is_leader and m.reachable), None)

    @property
    def revision(self) -> int:
        return max((m.revision for m in self.members if m.reachable), default=0)

    @property
    def cluster_id(self) -> str:
        """The cluster ID the reachable members answer with (hex, as etcdctl prints it), '?' when none answers;
        members that disagree (an endpoint of another cluster in the list) are all named."""
        ids = sorted({m.cluster_id for m in self.members if m.reachable and m.cluster_id})
        return ",".join(f"{i:x}" for i in ids) or "?"

    def as_dict(self) -> dict:
        return asdict(self)


def _json(text: str) -> object:
    text = text.strip()
    return json.loads(text) if text else None


def parse_member_list(text: str) -> dict[int, str]:
    """member id -> name (an unstarted member has an empty name)."""
    data = _json(text) or {}
    return {int(m["ID"]): m.get("name", "") for m in data.get("members", [])}


def parse_endpoint_status(text: str) -> dict[str, dict]:
    data = _json(text) or []
    return {e["Endpoint"]: e["Status"] for e in data}


def parse_endpoint_health(text: str) -> dict[str, dict]:
    data = _json(text) or []
    return {e["endpoint"]: e for e in data}


def parse_alarms(text: str) -> list[dict]:
    """`etcdctl alarm list -w json`: {"alarms": [{"memberID": N, "alarm": 1|2}]} (etcdserverpb AlarmType:
    1 NOSPACE, 2 CORRUPT); an empty list prints `{}` or a header only."""
    data = _json(text) or {}
    names = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT", "NOSPACE": "NOSPACE", "CORRUPT": "CORRUPT"}
    return [{"member_id": int(a.get("memberID", 0)), "alarm": names.get(a.get("alarm", 0), str(a.get("alarm")))}
            for a in data.get("alarms", []) or []]


def cluster_status(cluster: str, endpoints: list[str], members_text: str, status_text: str, health_text: str,
                   alarms_text: str, errors: list[str] = ()) -> ClusterStatus:
    names = parse_member_list(members_text) if members_text.strip() else {}
    status, health = parse_endpoint_status(status_text), parse_endpoint_health(health_text)
    out = ClusterStatus(cluster, errors=list(errors))
    for ep in endpoints:
        st, he = status.get(ep), health.get(ep, {})
        m = MemberStatus(endpoint=ep, healthy=bool(he.get("health")), error=str(he.get("error", "")))
        if st:
            hdr = st.get("header", {})
            m.reachable = True
            m.member_id = int(hdr.get("member_id", 0))
            m.cluster_id = int(hdr.get("cluster_id", 0))
            m.leader_id = int(st.get("leader", 0))
            m.is_leader = m.member_id != 0 and m.member_id == m.leader_id
            m.revision, m.raft_term = int(hdr.get("revision", 0)), int(hdr.get("raft_term", 0))
            m.db_size, m.db_size_in_use = int(st.get("dbSize", 0)), int(st.get("dbSizeInUse", 0))
            m.version = st.get("version", "")
            m.name = names.get(m.member_id, "")
        elif not m.error:
            m.error = "no status (unreachable)"
        out.members.append(m)
    out.alarms = parse_alarms(alarms_text) if alarms_text.strip() else []
    return out


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def health_findings(s: ClusterStatus, quota_bytes: int, t: EtcdHealthThresholds = DEFAULT_THRESHOLDS,
                    previous: dict | None = None) -> list[Finding]:
    """The findings of one cluster; `previous` is the last run's `{"leader_id", "raft_term", "revision"}`."""
    f: list[Finding] = []
    c = s.cluster

    def finding(check: str, severity: Severity | str, summary: str, advice: str = "") -> Finding:
        return Finding(severity=severity, subject=f"etcd-{c}", title=check, summary=summary, advice=advice)

    reachable = [m for m in s.members if m.reachable]
    if not reachable:
        return [finding("reachable", "unknown", f"no member answered ({'; '.join(s.errors)[:300]})",
                        "check the etcd hosts and the client certificates")]
    quorum = len(s.members) // 2 + 1
    healthy = [m for m in s.members if m.healthy]
    down = [m for m in s.members if not m.healthy]
    if len(healthy) < quorum:
        f.append(finding("quorum", "critical", f"{len(healthy)} of {len(s.members)} members healthy: quorum "
                         f"({quorum}) lost", "restore quorum (etcd *Disaster recovery*)"))
    elif down:
        f.append(finding("members", "warning", "unhealthy: " + ", ".join(m.name or m.endpoint for m in down)
                         + f"; quorum kept ({len(healthy)}/{len(s.members)})", "bring the member back"))
    else:
        f.append(finding("members", "ok", f"{len(s.members)} members healthy"))
    leaders = {m.leader_id for m in reachable}
    if s.leader is None or 0 in leaders or len(leaders) > 1:
        f.append(finding("leader", "critical", f"no agreed leader (seen: {sorted(leaders)})",
                         "check network between members"))
    else:
        f.append(finding("leader", "ok", f"leader {s.leader.name or s.leader.endpoint}"))
    for a in s.alarms:
        who = next((m.name or m.endpoint for m in s.members if m.member_id == a["member_id"]), a["member_id"])
        action = ("free space (compact, defragment every member), then `etcdctl alarm disarm` (etcd *Maintenance*, "
                  "Space quota)" if a["alarm"] == "NOSPACE" else "restore the member from a snapshot (etcd "
                  "*Disaster recovery*); do not disarm blindly")
        f.append(finding(f"alarm {a['alarm']}", "critical", f"alarm {a['alarm']} raised on {who}", action))
    biggest = max(reachable, key=lambda m: m.db_size)
    share = biggest.db_size / quota_bytes if quota_bytes else 0
    sev = (Severity.CRITICAL if share >= t.quota_critical else Severity.WARNING if share >= t.quota_warning
           else Severity.OK)
    f.append(finding("quota", sev, f"db {biggest.db_size} bytes on {biggest.name or biggest.endpoint} = "
                     f"{_pct(share)} of the {quota_bytes}-byte quota",
                     "compact and defragment (etcd-defrag), or raise quota-backend-bytes" if sev != "ok" else ""))
    for m in reachable:
        if m.db_size and m.db_size_in_use / m.db_size < t.fragmented_share and m.db_size >= t.fragmented_min_bytes:
            f.append(finding("fragmentation", "warning", f"{m.name or m.endpoint}: {_pct(m.db_size_in_use / m.db_size)}"
                             f" of {m.db_size} bytes in use", "defragment this member (etcd-defrag)"))
    if previous:
        if s.leader and previous.get("leader_id") and previous["leader_id"] != s.leader.member_id:
            f.append(finding("leader changes", "warning", f"leader changed since the last run (term "
                             f"{previous.get('raft_term')} -> {s.leader.raft_term})", "look for slow disks or network"))
        if previous.get("revision") is not None and s.revision < int(previous["revision"]):
            f.append(finding("revision", "critical", f"revision went back: {previous['revision']} -> {s.revision}",
                             "a member was restored or replaced: check the cluster"))
        else:
            f.append(finding("revision", "info", f"revision {s.revision} (+{s.revision - int(previous.get('revision') or 0)})"))
    return f


def overall(findings: list[Finding]) -> Severity:
    """The worst severity (the one order of `tasks.findings.Severity`); no findings at all is unknown."""
    return Severity.worst((x.severity for x in findings), default=Severity.UNKNOWN)


def snapshot_candidates(s: ClusterStatus) -> list[MemberStatus]:
    """Healthy members to snapshot from: followers first, then the leader."""
    return sorted([m for m in s.members if m.healthy and m.reachable], key=lambda m: (m.is_leader, m.endpoint))


@dataclass(frozen=True)
class SnapshotCheck:
    ok: bool
    hash: int
    revision: int
    total_keys: int
    total_size: int
    problems: tuple[str, ...] = ()


def check_snapshot(status_text: str, *, revision_before: int, revision_after: int, file_size: int) -> SnapshotCheck:
    """`etcdctl snapshot status -w json` -> a verdict. The snapshot's revision must lie between the live
    revisions read just before and just after the save; it must hold keys and a non-zero size."""
    try:
        d = json.loads(status_text)
        h, rev, keys, size = int(d["hash"]), int(d["revision"]), int(d["totalKey"]), int(d["totalSize"])
    except (ValueError, KeyError, TypeError):
        return SnapshotCheck(False, 0, 0, 0, 0, (f"snapshot status unreadable: {status_text.strip()[:200]!r}",))
    problems = []
    if not revision_before <= rev <= revision_after:
        problems.append(f"snapshot revision {rev} outside the live range {revision_before}..{revision_after}")
    if keys <= 0 or size <= 0:
        problems.append(f"empty snapshot ({keys} keys, {size} bytes)")
    if file_size < size:
        problems.append(f"file is {file_size} bytes, smaller than the db it claims ({size})")
    return SnapshotCheck(not problems, h, rev, keys, size, tuple(problems))


def store_kind(cluster: str) -> str:
    """Off-site folder of one etcd cluster's snapshots: `etcd-<cluster>/<id>/{snapshot.db,manifest.json}`."""
    return f"etcd-{cluster}"


def snapshot_id(cluster: str, when: datetime) -> str:
    """`<cluster>-<UTC stamp>`: sortable, one per cluster and run."""
    return f"{cluster}-{when:%Y%m%dT%H%M%SZ}"


def snapshot_manifest(*, backup_id: str, cluster: str, member: str, endpoint: str, check: SnapshotCheck,
                      copied: dict, store_key: str, started_at: datetime, finished_at: datetime,
                      key_count: int | None = None, sample: list[dict] | None = None) -> dict:
    """The manifest written next to an off-site snapshot, last: its presence marks the copy complete.
    `total_keys` is `snapshot status`'s totalKey (every bolt entry: all revisions and etcd's own buckets,
    `clientv3/snapshot/v3_snapshot.go` Status); `key_count` is the number of live keys at `revision`, what a
    restored member must count with `get --prefix ''` (`tasks.etcd.key_count`)."""
    return {"id": backup_id, "cluster": cluster, "member": member, "endpoint": endpoint, "revision": check.revision,
            "hash": check.hash, "total_keys": check.total_keys, "total_size": check.total_size,
            "key_count": key_count, "sample": sample or [],
            "size": copied["size"], "sha256": copied["sha256"], "store_key": store_key, "verified": check.ok,
            "offsite": True, "started_at": started_at.isoformat(), "finished_at": finished_at.isoformat()}


def newest_verified(manifests: list[dict]) -> dict | None:
    """The newest verified off-site snapshot's manifest (what the restore drill restores)."""
    ok = [m for m in manifests if m.get("verified") and m.get("offsite")]
    return max(ok, key=lambda m: m["finished_at"], default=None)


def compare_drill(manifest: dict, *, downloaded: dict, status: SnapshotCheck | None, revision: int, key_count: int,
                  sample_read: dict[str, str | None]) -> list[str]:
    """What the restore drill found wrong (empty: the snapshot restores as recorded)."""
    problems = []
    if downloaded.get("sha256") != manifest["sha256"] or downloaded.get("size") != manifest["size"]:
        problems.append(f"downloaded copy differs from the manifest (sha256 {str(downloaded.get('sha256'))[:12]}... "
                        f"vs {manifest['sha256'][:12]}...)")
    if status is not None and (status.hash, status.revision, status.total_keys) != (
            manifest["hash"], manifest["revision"], manifest["total_keys"]):
        problems.append(f"snapshot status {status.hash}/{status.revision}/{status.total_keys} differs from the "
                        f"manifest {manifest['hash']}/{manifest['revision']}/{manifest['total_keys']}")
    if revision != manifest["revision"]:
        problems.append(f"restored revision {revision} != manifest {manifest['revision']}")
    if manifest.get("key_count") is not None and key_count != manifest["key_count"]:
        problems.append(f"restored key count {key_count} != manifest {manifest['key_count']}")
    for s in manifest.get("sample", []):
        got = sample_read.get(s["key"])
        if got != s["sha256"]:
            problems.append(f"key {s['key']!r} " + ("is missing" if got is None else "has another value"))
    return problems


@dataclass(frozen=True)
class DefragStep:
    member: str
    endpoint: str
    is_leader: bool
    db_size: int
    db_size_in_use: int


def defrag_plan(s: ClusterStatus) -> tuple[list[DefragStep], list[str]]:
    """(steps, refusals): followers first, the leader last (defragmenting the leader stalls the cluster's
    writes longest: etcd v3.4 *Maintenance*, "Defragmentation",). A member that is
    not healthy is a refusal: defragmenting with a member down can cost the quorum."""
    refusals = [f"{m.name or m.endpoint} is not healthy ({m.error or 'no answer'})" for m in s.members if not m.healthy]
    if s.leader is None:
        refusals.append("no leader")
    steps = [DefragStep(m.name or m.endpoint, m.endpoint, m.is_leader, m.db_size, m.db_size_in_use)
             for m in sorted(s.members, key=lambda m: (m.is_leader, m.endpoint)) if m.reachable]
    return steps, refusals


def space_is_back(s: ClusterStatus, quota_bytes: int, t: EtcdHealthThresholds = DEFAULT_THRESHOLDS) -> bool:
    """Every member's db below the critical share of the quota: a NOSPACE alarm may be disarmed."""
    return bool(s.members) and all(m.reachable and m.db_size < quota_bytes * t.quota_critical for m in s.members)


def plan_snapshot_retention(manifests: list[dict], *, now: datetime, keep_days: int, keep_count: int,
                            run_succeeded: bool) -> list:
    """GitLab's retention rule (`tasks.gitlab_rules.plan_retention`), reused: the newest verified snapshot
    is never deleted, nothing is deleted after a failed run."""
    from tasks.gitlab_rules import BackupRecord, plan_retention

    records = [BackupRecord(m["id"], datetime.fromisoformat(m["finished_at"]), bool(m.get("verified") and m.get("offsite")),
                            int(m.get("size", 0))) for m in manifests]
    return plan_retention(records, now=now, keep_days=keep_days, keep_count=keep_count, run_succeeded=run_succeeded)
