"""The etcd lifecycle's flows against the session sandbox's REAL etcd 3.4 (3-member main cluster, events cluster,
kubespray TLS, etcdctl over SSH): backup with faults, restore drill, defragmentation clearing a real NOSPACE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import need_binary, run_flow_sync


@pytest.fixture(scope="module")
def etcd_platform(sandbox, sandbox_platform):
    need_binary("etcd", "etcd-server")
    need_binary("etcdctl", "etcd-client")
    need_binary("sshd", "openssh-server")
    if "etcd" not in sandbox.config:
        pytest.fail("the sandbox has no etcd component (sandbox/platform.py COMPONENTS)")
    from sandbox.etcd import put_keys

    put_keys(sandbox.extra["etcd"], "etcd1", 150, prefix="/registry/flows/")
    return sandbox_platform


def _store(platform: str):
    from blocks.connections import BackupStore

    return BackupStore.load(platform).get_store()


def _received(sb) -> list[dict]:
    p = sb.path("webhook", "received.jsonl")
    return [json.loads(x) for x in p.read_text().splitlines()] if p.exists() else []


def _follower_first(sb) -> str:
    """The member the backup would pick first: a healthy follower (the lowest endpoint of the followers)."""
    from tests.test_etcd import _status

    s = _status(sb)
    return next(m.name for m in sorted(s.members, key=lambda m: (m.is_leader, m.endpoint)))


@pytest.fixture(scope="module")
def backup_state(etcd_platform, sandbox):
    from flows.etcd_backup import etcd_backup

    state = run_flow_sync(etcd_backup, platform=etcd_platform)
    assert state.is_completed(), state.message
    return state


def test_backup_snapshots_both_clusters_from_followers_verified_offsite(backup_state, etcd_platform, sandbox):
    import hashlib

    out = backup_state.result()
    store = _store(etcd_platform)
    main, events = out["snapshots"]["main"], out["snapshots"]["events"]
    assert main["verified"] and main["revision"] >= 150 and main["key_count"] >= 150
    assert main["member"] in ("etcd1", "etcd2", "etcd3") and len(main["sample"]) == 10
    assert out["attempts"]["main"][0]["leader"] is False  # a follower, not the leader
    assert events["member"] == "etcd1-events"  # the events cluster's only member: its leader
    stored = b"".join(store.chunks(main["store_key"]))
    assert hashlib.sha256(stored).hexdigest() == main["sha256"] and len(stored) == main["size"]
    assert store.read_json(f"etcd-main/{main['id']}/manifest.json")["revision"] == main["revision"]
    snap_dir = Path(sandbox.extra["etcd"]["roots"]["etcd1"]) / "var/backups/etcd-snapshots"
    assert not list(snap_dir.glob("*.db*"))  # copied off-site, removed from the etcd host


def test_member_down_and_hung_member_still_give_a_verified_snapshot(etcd_platform, sandbox):
    from flows.etcd_backup import etcd_backup
    from sandbox.etcd import pause_member, start_member, stop_member

    first = _follower_first(sandbox)
    stop_member(sandbox, first)
    try:
        state = run_flow_sync(etcd_backup, platform=etcd_platform, clusters=["main"])
    finally:
        start_member(sandbox, first)
    assert state.is_completed(), state.message
    assert state.result()["snapshots"]["main"]["member"] != first

    hung = _follower_first(sandbox)
    pause_member(sandbox, hung)
    try:
        state = run_flow_sync(etcd_backup, platform=etcd_platform, clusters=["main"])
    finally:
        pause_member(sandbox, hung, resume=True)
    assert state.is_completed(), state.message
    assert state.result()["snapshots"]["main"]["member"] != hung


def test_corrupt_snapshot_is_never_stored_as_verified_and_notifies(etcd_platform, sandbox):
    from flows.etcd_backup import etcd_backup

    fault = Path(sandbox.extra["etcd"]["roots"]["etcd1"]) / "faults" / "corrupt-snapshot"
    before = {k for k in _store(etcd_platform).list("etcd-events/")}
    sent = len(_received(sandbox))
    fault.write_text("")
    try:
        state = run_flow_sync(etcd_backup, platform=etcd_platform, clusters=["events"])
    finally:
        fault.unlink()
    assert state.is_failed() and "no member gave a verified snapshot" in state.message
    assert "unreadable" in state.message or "smaller" in state.message
    assert {k for k in _store(etcd_platform).list("etcd-events/")} == before  # nothing uploaded
    notes = _received(sandbox)[sent:]
    assert notes and "etcd backup FAILED" in json.dumps(notes[-1])


def test_offsite_store_error_fails_loudly_and_notifies(etcd_platform, sandbox):
    from blocks.connections import BackupStore
    from flows.etcd_backup import etcd_backup

    good = BackupStore.load(etcd_platform)
    good.model_copy(update={"bucket": "no-such-bucket"}).save(etcd_platform, overwrite=True)
    sent = len(_received(sandbox))
    try:
        state = run_flow_sync(etcd_backup, platform=etcd_platform, clusters=["events"])
    finally:
        good.save(etcd_platform, overwrite=True)
    assert state.is_failed() and "NoSuchBucket" in state.message
    assert _received(sandbox)[sent:], "no failure notice was sent"


def test_restore_drill_restores_the_backup_with_its_revision_and_keys(backup_state, etcd_platform, sandbox):
    from flows.etcd_restore_drill import etcd_restore_drill

    state = run_flow_sync(etcd_restore_drill, platform=etcd_platform)
    assert state.is_completed(), state.message
    out = state.result()["clusters"]
    store = _store(etcd_platform)
    for cluster in ("main", "events"):
        r = out[cluster]
        m = store.read_json(f"etcd-{cluster}/{r['snapshot']}/manifest.json")
        assert (r["revision"], r["key_count"]) == (m["revision"], m["key_count"]) and not r["problems"]
        assert r["sample_checked"] == len(m["sample"]) > 0 and r["rto_seconds"] > 0
    # the drill member is gone and left nothing on the scratch host; production members untouched
    scratch = Path(sandbox.extra["etcd"]["roots"]["etcd-scratch"])
    assert not list((scratch / "var/lib/etcd-drill").glob("*"))
