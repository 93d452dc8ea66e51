"""The etcd lifecycle's core against the REAL etcd 3.4 (Debian `etcd-server`/`etcd-client`) on loopback with
kubespray's TLS layout: etcdctl over SSH on the etcd host, health findings, snapshot save and verification,
faults (a member down, a hung member, a corrupt snapshot, a real NOSPACE alarm)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tasks.etcd_rules import (
    ClusterStatus,
    MemberStatus,
    check_snapshot,
    health_findings,
    overall,
    parse_alarms,
    snapshot_candidates,
)
from tests.conftest import need_binary


@pytest.fixture(scope="module")
def etcd_sb(sandbox):
    """The session sandbox's etcd (one per test session), with 200 keys written through etcd's API."""
    need_binary("etcd", "etcd-server")
    need_binary("etcdctl", "etcd-client")
    need_binary("sshd", "openssh-server")
    if "etcd" not in sandbox.extra:
        pytest.fail("the sandbox has no etcd component (sandbox/platform.py COMPONENTS)")
    from sandbox.etcd import put_keys

    put_keys(sandbox.extra["etcd"], "etcd1", 200)
    return sandbox


def _endpoints(info: dict, cluster: str = "main") -> list[str]:
    return [f"https://127.0.0.1:{m['client_port']}" for m in info["members"].values() if m["cluster"] == cluster]


def _run(sb, coro_fn, host: str = "etcd1"):
    from tasks.etcd import EtcdClient
    from tasks.redact import Redactor
    from tasks.ssh import connect

    h = sb.extra["etcd"]["ssh"][host]
    kw = {"host": h["host"], "port": h["port"], "username": h["user"], "client_keys": [h["private_key_path"]],
          "known_hosts": h["known_hosts"]}
    client = EtcdClient(host="etcd1", cert_dir=f"{h['root']}/etc/ssl/etcd/ssl", dial_timeout_s=1, command_timeout_s=3)

    async def main():
        async with connect(kw) as conn:
            return await coro_fn(conn, client, Redactor.of([]))
    return asyncio.run(main())


def _status(sb, cluster="main") -> ClusterStatus:
    from tasks.etcd import read_cluster_status

    eps = _endpoints(sb.extra["etcd"], cluster)
    return _run(sb, lambda conn, c, r: read_cluster_status(conn, c, cluster, eps, r))


# --- pure ----------------------------------------------------------------------------------------


def _member(name, leader=False, healthy=True, size=100, in_use=100, rev=10, mid=None):
    mid = mid or abs(hash(name)) % 10**6 + 1
    return MemberStatus(endpoint=f"https://127.0.0.1:{mid % 60000 + 1}", name=name, member_id=mid, reachable=healthy,
                        healthy=healthy, is_leader=leader, leader_id=1 if not leader else mid, revision=rev,
                        db_size=size, db_size_in_use=in_use)


def test_quota_share_above_80_percent_is_critical_with_the_action():
    s = ClusterStatus("main", [_member("a", leader=True, size=85, mid=1), _member("b", size=60, mid=2)])
    f = {x.title: x for x in health_findings(s, quota_bytes=100)}
    assert f["quota"].severity == "critical" and "defragment" in f["quota"].advice
    s2 = ClusterStatus("main", [_member("a", leader=True, size=50, mid=1)])
    assert {x.title: x for x in health_findings(s2, quota_bytes=100)}["quota"].severity == "ok"


def test_nospace_alarm_numbers_and_names_parse_and_are_critical():
    assert parse_alarms('{"alarms":[{"memberID":7,"alarm":1},{"memberID":8,"alarm":"CORRUPT"}]}') == [
        {"member_id": 7, "alarm": "NOSPACE"}, {"member_id": 8, "alarm": "CORRUPT"}]
    assert parse_alarms("{}") == []
    s = ClusterStatus("main", [_member("a", leader=True, mid=1)], alarms=[{"member_id": 1, "alarm": "NOSPACE"}])
    f = [x for x in health_findings(s, 1000) if x.title == "alarm NOSPACE"]
    assert f and f[0].severity == "critical" and "alarm disarm" in f[0].advice
    assert overall(health_findings(s, 1000)) == "critical"


def test_leader_change_and_revision_going_back_are_reported():
    s = ClusterStatus("main", [_member("a", leader=True, mid=5, rev=40)])
    f = {x.title: x for x in health_findings(s, 10**9, previous={"leader_id": 4, "raft_term": 2, "revision": 50})}
    assert f["leader changes"].severity == "warning"
    assert f["revision"].severity == "critical"


def test_followers_first_then_leader_and_unhealthy_never():
    s = ClusterStatus("main", [_member("l", leader=True, mid=1), _member("f", mid=2), _member("d", healthy=False, mid=3)])
    assert [m.name for m in snapshot_candidates(s)] == ["f", "l"]


def test_snapshot_check_bounds():
    ok = check_snapshot('{"hash":1,"revision":51,"totalKey":56,"totalSize":49152}', revision_before=51,
                        revision_after=52, file_size=49152)
    assert ok.ok and ok.revision == 51
    late = check_snapshot('{"hash":1,"revision":40,"totalKey":56,"totalSize":49152}', revision_before=51,
                          revision_after=52, file_size=49152)
    assert not late.ok and "outside" in late.problems[0]
    assert not check_snapshot("", revision_before=1, revision_after=1, file_size=0).ok


# --- the real etcd ----------------------------------------------------------------------------------


def test_real_cluster_status_over_ssh_and_tls(etcd_sb):
    s = _status(etcd_sb)
    assert len(s.members) == 3 and all(m.healthy for m in s.members)
    assert s.leader is not None and {m.name for m in s.members} == {"etcd1", "etcd2", "etcd3"}
    assert s.revision >= 201 and all(m.version.startswith("3.4.") for m in s.members)
    f = health_findings(s, etcd_sb.extra["etcd"]["quota_bytes"]["main"])
    assert overall(f) == "ok", f
    ev = _status(etcd_sb, "events")
    assert len(ev.members) == 1 and ev.members[0].healthy and ev.members[0].is_leader


def test_real_snapshot_from_a_follower_verifies_against_the_live_revision(etcd_sb):
    from tasks.etcd import save_snapshot, verify_snapshot

    s = _status(etcd_sb)
    m = snapshot_candidates(s)[0]
    assert not m.is_leader
    path = f"{etcd_sb.extra['etcd']['roots']['etcd1']}/var/backups/main.db"

    async def go(conn, c, r):
        await save_snapshot(conn, c, m.endpoint, path, r)
        return await verify_snapshot(conn, c, path, r, revision_before=s.revision, revision_after=s.revision + 5)
    check, size = _run(etcd_sb, go)
    assert check.ok, check.problems
    assert size == Path(path).stat().st_size
    assert check.revision >= s.revision and check.total_keys > 200 and check.total_size > 0


def test_corrupt_snapshot_is_refused(etcd_sb):
    from tasks.etcd import save_snapshot, verify_snapshot

    s = _status(etcd_sb)
    root = etcd_sb.extra["etcd"]["roots"]["etcd1"]
    path = f"{root}/var/backups/bad.db"

    async def save(conn, c, r):
        await save_snapshot(conn, c, s.members[0].endpoint, path, r)
    _run(etcd_sb, save)
    p = Path(path)
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])  # a truncated copy

    check, _ = _run(etcd_sb, lambda conn, c, r: verify_snapshot(conn, c, path, r, revision_before=s.revision,
                                                                  revision_after=s.revision + 5))
    assert not check.ok and "unreadable" in check.problems[0]


def test_member_down_keeps_quorum_and_a_hung_member_does_not_hang(etcd_sb):
    from sandbox.etcd import pause_member, start_member, stop_member

    stop_member(etcd_sb, "etcd3")
    try:
        s = _status(etcd_sb)
        down = [m for m in s.members if not m.healthy]
        assert len(down) == 1 and s.leader is not None
        f = {x.title: x for x in health_findings(s, 10**9)}
        assert f["members"].severity == "warning" and "quorum kept" in f["members"].summary
        assert down[0] not in snapshot_candidates(s) and snapshot_candidates(s)
    finally:
        start_member(etcd_sb, "etcd3")
    pause_member(etcd_sb, "etcd2")
    try:
        import time

        t = time.monotonic()
        s = _status(etcd_sb)
        assert time.monotonic() - t < 60
        assert sum(not m.healthy for m in s.members) == 1
    finally:
        pause_member(etcd_sb, "etcd2", resume=True)


# A real NOSPACE (reported critical, cleared by etcd-defrag): tests/test_etcd_flows.py, on the session's etcd.


def test_snapshot_streams_offsite_with_checksum_manifest_and_retention(etcd_sb, tmp_path):
    """Save from a follower, verify, stream off-site (sha256 of the stored copy matches), manifest last;
    retention keeps the newest verified snapshot; a store that fails aborts the copy (no partial object)."""
    import hashlib
    from datetime import UTC, datetime, timedelta

    from blocks.connections import BackupStore
    from tasks.etcd import copy_snapshot_offsite, save_snapshot, verify_snapshot
    from tasks.etcd_rules import plan_snapshot_retention, snapshot_id, snapshot_manifest

    store = BackupStore(kind="local", path=str(tmp_path / "offsite"), prefix="etcd/").get_store()
    s = _status(etcd_sb)
    m = snapshot_candidates(s)[0]
    path = f"{etcd_sb.extra['etcd']['roots']['etcd1']}/var/backups/offsite.db"
    started = datetime.now(UTC)
    bid = snapshot_id("main", started)
    key = f"main/{bid}/snapshot.db"

    async def go(conn, c, r):
        await save_snapshot(conn, c, m.endpoint, path, r)
        check, _ = await verify_snapshot(conn, c, path, r, revision_before=s.revision, endpoint=m.endpoint)
        copied = await copy_snapshot_offsite(conn, path, store, key)
        return check, copied
    check, copied = _run(etcd_sb, go)
    assert check.ok
    stored = b"".join(store.chunks(key))
    assert hashlib.sha256(stored).hexdigest() == copied["sha256"] == hashlib.sha256(Path(path).read_bytes()).hexdigest()
    manifest = snapshot_manifest(backup_id=bid, cluster="main", member=m.name, endpoint=m.endpoint, check=check,
                                 copied=copied, store_key=key, started_at=started,
                                 finished_at=datetime.now(UTC))
    store.write_json(f"main/{bid}/manifest.json", manifest)
    assert store.read_json(f"main/{bid}/manifest.json")["revision"] == check.revision

    old = [dict(manifest, id=f"old-{i}", finished_at=(started - timedelta(days=10 + i)).isoformat()) for i in range(3)]
    plan = {d.id: d.action for d in plan_snapshot_retention([manifest, *old], now=datetime.now(UTC),
                                                            keep_days=7, keep_count=2, run_succeeded=True)}
    assert plan[bid] == "keep" and all(plan[f"old-{i}"] == "delete" for i in range(3))
    only_old = {d.id: d.action for d in plan_snapshot_retention(old, now=datetime.now(UTC), keep_days=7,
                                                                keep_count=2, run_succeeded=True)}
    assert only_old["old-0"] == "keep"  # the newest verified is never deleted, however old

    class FailingSink:
        location = "broken://"

        def write(self, chunk):
            raise OSError("store unreachable")

        def commit(self, size, sha256):
            raise AssertionError("never committed")

        def abort(self):
            FailingSink.aborted = True

    class FailingStore:
        def sink(self, rel):
            return FailingSink()

    with pytest.raises(OSError, match="store unreachable"):
        _run(etcd_sb, lambda conn, c, r: copy_snapshot_offsite(conn, path, FailingStore(), "x/snapshot.db"))
    assert FailingSink.aborted
