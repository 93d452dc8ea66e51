"""The etcd lifecycle's flows against the session sandbox's REAL etcd 3.4 (3-member main cluster, events cluster,
kubespray TLS, etcdctl over SSH): backup with faults, restore drill, defragmentation clearing a real NOSPACE."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sandbox.webhook import received as _received
from tests.approvals import APPROVE, run_and_answer
from tests.conftest import need_binary, run_flow_sync


def _store(platform: str):
    from blocks.connections import BackupStore

    return BackupStore.load(platform).get_store()


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
    assert main["verified"] and main["revision"] >= 60 and main["key_count"] >= 60
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


def test_corrupt_snapshot_is_never_stored_as_verified_and_says_so_once(etcd_platform, sandbox):
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
    assert "Nothing was deleted" in state.message  # what the failed-run automation's notice carries
    # one notice: the automation's (tests/test_operator_path.py); the flow itself sends none
    assert _received(sandbox)[sent:] == []


def test_offsite_store_error_fails_loudly(etcd_platform, sandbox):
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
    assert "Nothing was deleted" in state.message
    assert _received(sandbox)[sent:] == [], "the failed-run automation is the one notice, not the flow"


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


def test_restore_drill_refuses_a_snapshot_changed_offsite_before_restoring_it(backup_state, etcd_platform, sandbox):
    """One flipped bit in the off-site copy (same size): the download's SHA-256 is not the manifest's, so the
    drill fails on it and nothing is restored on the scratch host."""
    import asyncio

    from flows.etcd_restore_drill import etcd_restore_drill
    from tasks.etcd_rules import newest_verified
    from tasks.storage import copy_stream, list_offsite_manifests

    store = _store(etcd_platform)
    m = newest_verified(asyncio.run(list_offsite_manifests(store, "etcd-main")))
    good = b"".join(store.chunks(m["store_key"]))
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF
    copy_stream("bad", [bytes(bad)], store.sink(m["store_key"]))
    try:
        state = run_flow_sync(etcd_restore_drill, platform=etcd_platform, clusters=["main"])
    finally:
        copy_stream("good", [good], store.sink(m["store_key"]))
    assert state.is_failed() and "corrupt" in state.message and m["sha256"][:16] in state.message
    scratch = Path(sandbox.extra["etcd"]["roots"]["etcd-scratch"])
    assert not list((scratch / "var/lib/etcd-drill").glob("*"))


def test_nospace_is_critical_and_the_approved_defrag_clears_it(etcd_platform, sandbox):
    """A real NOSPACE on the events cluster (16 MiB quota): the health findings say critical; the operator
    deletes what filled it; the defrag flow's dry run shows the plan, the approved run compacts, defragments
    and disarms the alarm, and writes work again."""
    from flows.etcd_defrag import etcd_defrag
    from sandbox.etcd import delete_prefix, put_keys
    from tasks.etcd_rules import health_findings
    from tests.test_etcd import _status

    info = sandbox.extra["etcd"]
    with pytest.raises(RuntimeError, match="space exceeded"):
        put_keys(info, "etcd1-events", 200, prefix="/registry/events/fill/", value_size=200_000)
    f = health_findings(_status(sandbox, "events"), info["quota_bytes"]["events"])
    assert any(x.title == "alarm NOSPACE" and x.severity == "critical" for x in f), f
    checks = _health(etcd_platform)
    assert checks["etcd-events"].status == "critical" and checks["etcd-main"].status == "ok"
    assert any("alarm NOSPACE" in e and "alarm disarm" in e for e in checks["etcd-events"].evidence)
    assert delete_prefix(info, "etcd1-events", "/registry/events/fill/") > 0

    dry = run_flow_sync(etcd_defrag, platform=etcd_platform, clusters=["events"])
    assert dry.is_completed(), dry.message
    plan = dry.result()
    assert plan["facts"]["events"]["order"] == ["etcd1-events"] and plan["facts"]["events"]["alarms"] == ["NOSPACE"]
    assert plan["refusals"] == [] and plan["steps"] == []
    assert [s["step"] for s in plan["plan"]] == ["compact events", "defrag etcd1-events", "alarm disarm events"]
    assert plan["identity"].startswith("events=") and "?" not in plan["identity"]

    state = run_and_answer(etcd_defrag, {"platform": etcd_platform, "clusters": ["events"], "dry_run": False,
                                         "poll_interval_s": 0.5, "approval_timeout_s": 120}, APPROVE)
    assert state.is_completed(), state.message
    out = state.result()
    assert out["approver"] == "alice"
    assert [(r["step"], r["status"]) for r in out["steps"]] == [
        ("compact events", "ok"), ("defrag etcd1-events", "ok"), ("alarm disarm events", "ok")]
    after = _status(sandbox, "events")  # the cluster itself, read again
    assert after.alarms == [] and after.members[0].db_size < info["quota_bytes"]["events"] * 0.8
    put_keys(info, "etcd1-events", 1, prefix="/registry/events/after/")  # writes work again
    assert _health(etcd_platform)["etcd-events"].status == "ok"


def test_defrag_replans_after_the_approval_and_refuses_a_member_down_meanwhile(etcd_platform, sandbox):
    """The plan shown for approval may be an hour old: the approved run reads the cluster again, and a member
    stopped while the approval waited refuses it before anything is compacted or defragmented."""
    from flows.etcd_defrag import etcd_defrag
    from sandbox.etcd import start_member, stop_member

    down = _follower_first(sandbox)
    try:  # planned with every member healthy (no refusal, it asks); a member stops while the approval waits
        state = run_and_answer(etcd_defrag, {"platform": etcd_platform, "clusters": ["main"], "dry_run": False,
                                             "poll_interval_s": 0.5, "approval_timeout_s": 120}, APPROVE,
                               meanwhile=lambda: stop_member(sandbox, down))
    finally:
        start_member(sandbox, down)
    assert state.is_failed(), state.message
    endpoint = f"https://127.0.0.1:{sandbox.extra['etcd']['members'][down]['client_port']}"
    assert "refused, nothing was changed" in state.message and "after the approval" in state.message
    assert f"{down} is not healthy" in state.message or f"{endpoint} is not healthy" in state.message
    assert "failed at step" not in state.message and "after defragmenting" not in state.message


def _health(platform: str, previous: dict | None = None) -> dict:
    """The platform health check's etcd checks (`tasks.etcd_health`), by name."""
    import asyncio

    from prefect.variables import Variable

    from blocks.platform import Platform
    from tasks.etcd_health import etcd_checks, state_variable
    from tasks.redact import Redactor

    plat = Platform(platform)
    if previous is not None:
        Variable.set(state_variable(platform), previous, overwrite=True)
    checks = asyncio.run(etcd_checks(platform, plat.config.etcd, plat.etcd_hosts(), Redactor.of(plat.secrets())))
    return {c.name: c for c in checks}


def test_health_reports_leader_changes_and_revision_progress_since_the_last_run(etcd_platform):
    from prefect.variables import Variable

    from tasks.etcd_health import state_variable

    first = _health(etcd_platform)
    assert first["etcd-main"].status == "ok", first["etcd-main"].evidence
    state = Variable.get(state_variable(etcd_platform))
    assert int(state["main"]["leader_id"]) > 0 and state["main"]["revision"] > 0
    again = _health(etcd_platform)
    assert any(e.startswith("info revision: revision") for e in again["etcd-main"].evidence)
    moved = {**state, "main": {**state["main"], "leader_id": "1", "revision": state["main"]["revision"] + 10**6}}
    c = _health(etcd_platform, previous=moved)["etcd-main"]
    assert c.status == "critical" and "leader changed" in c.summary and "revision went back" in c.summary


def test_defrag_orders_followers_first_leader_last():
    from tasks.etcd_rules import ClusterStatus, MemberStatus, defrag_plan

    ms = [MemberStatus(f"https://127.0.0.1:{p}", name=n, member_id=i, reachable=True, healthy=True,
                       is_leader=i == 1, leader_id=1) for p, n, i in ((3, "c", 1), (1, "a", 2), (2, "b", 3))]
    steps, refusals = defrag_plan(ClusterStatus("main", ms))
    assert [s.member for s in steps] == ["a", "b", "c"] and not refusals
    ms[1].healthy = False
    assert defrag_plan(ClusterStatus("main", ms))[1] == ["a is not healthy (no answer)"]


def test_a_cluster_is_named_by_the_id_its_members_answer_with():
    """etcd's response header carries the cluster ID (etcdserverpb.ResponseHeader): the operations' target."""
    from tasks.etcd_rules import cluster_status

    status = json.dumps([{"Endpoint": f"https://e{i}", "Status": {"header": {"cluster_id": cid, "member_id": i,
                                                                              "revision": 5}, "leader": 1}}
                         for i, cid in ((1, 0xABC), (2, 0xABC))])
    s = cluster_status("main", ["https://e1", "https://e2", "https://e3"], "", status, "", "")
    assert s.cluster_id == "abc"  # e3 did not answer: not counted
    mixed = status.replace(str(0xABC), str(0xDEF), 1)
    assert cluster_status("main", ["https://e1", "https://e2"], "", mixed, "", "").cluster_id == "abc,def"
    assert cluster_status("main", ["https://e1"], "", "", "", "").cluster_id == "?"


def test_deployments_schedules_and_limits():
    import yaml

    from tests.conftest import REPO

    deps = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    assert deps["etcd-backup"]["schedules"][0]["cron"] == "0 */6 * * *"
    assert deps["etcd-backup"]["concurrency_limit"] == 1
    assert deps["etcd-restore-drill"]["schedules"][0]["cron"] == "0 5 * * 0"
    assert deps["etcd-defrag"]["parameters"]["dry_run"] is True and "schedules" not in deps["etcd-defrag"]
    for name, entry in (("etcd-backup", "etcd_backup"), ("etcd-restore-drill", "etcd_restore_drill"),
                        ("etcd-defrag", "etcd_defrag")):
        path, fn = deps[name]["entrypoint"].split(":")
        assert fn == entry and (REPO / path).exists()


def test_etcd_snapshot_benchmark_runs_small(capsys):
    """`python -m benchmarks etcd-snapshot` end to end at 4 MB, one repeat (the real numbers: RESULTS.md)."""
    need_binary("etcd", "etcd-server")
    need_binary("sshd", "openssh-server")
    from benchmarks.etcd_snapshot import run

    run(size=4, repeat=1)
    record = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert record["bench"] == "etcd-snapshot" and record["keys"] == 8 and record["snapshot_mb"] >= 4
    assert record["seconds"] > 0 and record["baseline_seconds"] > 0 and record["peak_rss_mb"] < 150
