"""Faults during GitLab backup and restore: in each, nothing that existed before is lost."""

from __future__ import annotations

import gzip
import hashlib
import json
import re
import tarfile
import shutil
import threading
import time
from pathlib import Path

import pytest
from prefect import flow

from sandbox.webhook import received
from tests.approvals import APPROVE, run_and_answer
from tests.conftest import run_flow_sync
from tests.test_gitlab_backup import _attempts, _files, _objects, _ran, _root, _s3, _task_runs

CREATE = ["gitlab-backup", "create"]


def _arm(sb, command: str, kind: str, times: int = 1) -> None:
    (_root(sb) / "faults" / f"{command}.json").write_text(json.dumps({"kind": kind, "times": times}))


def _disarm(sb) -> None:
    for f in (_root(sb) / "faults").glob("*.json"):
        f.unlink()


def _armed(sb, command: str) -> bool:
    """Whether a fault is still armed for `command` (the stand-in consumes one per run it fails)."""
    return (_root(sb) / "faults" / f"{command}.json").exists()


@pytest.fixture
def snapshot(gitlab_backup_state, gitlab_sandbox):  # noqa: ARG001 - a backup must exist before
    """Files on the host and objects off-site before the test; asserts afterwards that all survive unchanged."""
    sb = gitlab_sandbox
    files, objects = _files(sb), _objects(sb)
    yield sb
    _disarm(sb)
    after_files, after_objects = _files(sb), _objects(sb)
    assert files.items() <= after_files.items(), "a backup file on the host was lost or changed"
    assert objects.items() <= after_objects.items(), "an off-site object was lost or changed"


def _backup(platform):
    from flows.gitlab_backup import gitlab_backup

    return run_flow_sync(gitlab_backup, platform=platform)


def _host_processes(sb, command: str = "gitlab-backup") -> list[int]:
    """PIDs of the production host's stand-in processes running `command` (read from /proc)."""
    root = f"GITLAB_SANDBOX_ROOT={_root(sb)}".encode()
    out = []
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            argv = (p / "cmdline").read_bytes().split(b"\0")
            env = (p / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if root in env and command.encode() in argv and any(a.endswith(b"omnibus.py") for a in argv):
            out.append(int(p.name))
    return out


def _wait_gone(sb, timeout_s: float = 15) -> list[int]:
    deadline = time.monotonic() + timeout_s
    while (left := _host_processes(sb)) and time.monotonic() < deadline:
        time.sleep(0.3)
    return left


@flow(name="gitlab-create-once")
async def _create_once(platform: str, timeout_s: float) -> dict:
    """`gitlab-backup create` alone (no concurrency limit, no verification): the supervisor under test."""
    from blocks.platform import Platform
    from tasks.gitlab_backup import host_layout
    from tasks.gitlab_host import create_data_backup
    from tasks.redact import Redactor

    plat = await Platform.aopen(platform, "gitlab_host")
    return await create_data_backup(plat.gitlab_host(), host_layout(plat.config), Redactor.of([]),
                                    timeout_s=timeout_s)


def test_ssh_session_lost_mid_backup_stops_it_and_starts_no_second(snapshot, sandbox_platform):
    ran = _ran(snapshot, CREATE)
    (_root(snapshot) / "faults" / "gitlab-backup-create.json").write_text(
        json.dumps({"kind": "ssh-drop", "times": 1, "seconds": 60}))
    state = _backup(sandbox_platform)
    assert state.is_failed() and "SSH session was lost" in state.message
    assert "was stopped and the lock is free" in state.message
    assert not _armed(snapshot, "gitlab-backup-create")  # the stand-in took the fault: it dropped the session
    assert _ran(snapshot, CREATE) - ran == 1  # it had started: never run a second time
    assert _attempts(state, "gitlab-backup-create") == [1]
    assert _wait_gone(snapshot) == []  # the orphaned gitlab-backup was stopped on the host


def test_timed_out_backup_is_stopped_on_the_host_and_not_retried(snapshot, sandbox_platform):
    ran = _ran(snapshot, CREATE)
    (_root(snapshot) / "faults" / "gitlab-backup-create.json").write_text(
        json.dumps({"kind": "hang", "times": 1, "seconds": 120}))
    started = time.monotonic()
    state = run_flow_sync(_create_once, platform=sandbox_platform, timeout_s=4)
    assert state.is_failed() and "did not finish within 4s" in state.message
    assert "was stopped and the lock is free" in state.message
    assert time.monotonic() - started < 60  # not the fault's 120 s: the command was stopped, not waited for
    assert _host_processes(snapshot) == []  # no gitlab-backup left on the host
    assert _ran(snapshot, CREATE) - ran == 1 and _attempts(state, "gitlab-backup-create") == [1]
    pgid_file = Path(snapshot.config["gitlab"]["control_dir"]) / "gitlab-backup-create.pgid"
    assert pgid_file.read_text().strip().isdigit()  # the group it recorded, and stopped


def test_a_running_backup_blocks_a_second_one_on_the_host(snapshot, sandbox_platform):
    ran = _ran(snapshot, CREATE)
    (_root(snapshot) / "faults" / "gitlab-backup-create.json").write_text(
        json.dumps({"kind": "hang", "times": 1, "seconds": 8}))
    box: dict = {}
    first = threading.Thread(target=lambda: box.setdefault(
        "state", run_flow_sync(_create_once, platform=sandbox_platform, timeout_s=120)), daemon=True)
    first.start()
    deadline = time.monotonic() + 30
    while not _host_processes(snapshot) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _host_processes(snapshot), "the first backup never started"
    second = run_flow_sync(_create_once, platform=sandbox_platform, timeout_s=60)
    assert second.is_failed() and "was not started" in second.message and "held by an earlier run" in second.message
    first.join(120)
    assert box["state"].is_completed(), box["state"].message  # the first one finished undisturbed
    assert _ran(snapshot, CREATE) - ran == 1  # the second never reached gitlab-backup


def test_disk_full_fails_says_what_state_and_deletes_nothing(snapshot, sandbox_platform):
    notices, ran = len(received(snapshot)), _ran(snapshot, CREATE)
    _arm(snapshot, "gitlab-backup-create", "disk-full", times=2)
    state = _backup(sandbox_platform)
    assert state.is_failed() and "No space left on device" in state.message
    assert _ran(snapshot, CREATE) - ran == 1 and _attempts(state, "gitlab-backup-create") == [1]  # not retried
    assert _armed(snapshot, "gitlab-backup-create")  # the second armed failure was never reached
    assert "Nothing was deleted. RPO is now" in state.message  # the failed-run automation's notice body
    assert received(snapshot)[notices:] == [], "one notice: the automation's, not the flow's"
    assert not list((_root(snapshot) / "var/opt/gitlab/backups").glob("*.partial"))
    assert "delete-host-backups" not in _task_runs(state)  # retention never ran


def test_corrupt_archive_is_never_copied_offsite(snapshot, sandbox_platform):
    _arm(snapshot, "gitlab-backup-create", "corrupt")
    before = _objects(snapshot)
    state = _backup(sandbox_platform)
    assert state.is_failed() and "truncated" in state.message
    assert not _armed(snapshot, "gitlab-backup-create")  # the stand-in wrote the short archive
    assert _attempts(state, "gitlab-backup-create") == [1]
    assert _attempts(state, "verify-and-copy-offsite") == [1]  # a failed check is not retried
    assert _objects(snapshot) == before  # no partial or unverified upload left behind


def test_truncated_upload_is_detected_and_removed(snapshot, sandbox_platform, monkeypatch):
    from tasks import storage

    truncated: list[int] = []

    class TruncatingSink(storage.S3Sink):
        def _send_part(self, number, data, _md5):
            if number > 1:  # the network lost the end of the last part; S3 stored what arrived
                data = data[:-100]
                truncated.append(number)
            return super()._send_part(number, data, hashlib.md5(data).digest())

    def sink(self, rel):
        if self.kind == "s3":
            return TruncatingSink(self._client, self.block.bucket, self._key(rel), part_size=5 * 1024 * 1024)
        return original(self, rel)

    original = storage.Store.sink
    monkeypatch.setattr(storage.Store, "sink", sink)
    size_file = _root(snapshot) / "var/opt/gitlab/state/data_bytes"
    size_file.write_text(str(6 * 1024 * 1024))  # two parts: S3's minimum part size is 5 MiB
    before = _objects(snapshot)
    try:
        state = _backup(sandbox_platform)
    finally:
        size_file.write_text(str(256 * 1024))
    assert state.is_failed() and "upload was damaged" in state.message
    assert truncated == [2]  # the fault fired once: the archive's second (last) part
    assert _attempts(state, "verify-and-copy-offsite") == [1]  # a damaged copy is not retried
    assert _objects(snapshot) == before


@pytest.mark.usefixtures("snapshot")
def test_s3_error_fails_without_deleting_anything(sandbox_platform, monkeypatch):
    from blocks.connections import BackupStore
    from tasks import storage

    answers: list[tuple[str, str | None]] = []  # (S3 operation, error code) of every call the store made
    real_init = storage.Store.__init__

    def recording_init(self, block, timeout_s=60.0):
        real_init(self, block, timeout_s)
        if self._client is not None:
            self._client.meta.events.register("after-call.s3", lambda model, parsed, **_: answers.append(
                (model.name, parsed.get("Error", {}).get("Code"))))

    monkeypatch.setattr(storage.Store, "__init__", recording_init)
    good = BackupStore.load(sandbox_platform)
    bad = good.model_copy(update={"bucket": "no-such-bucket"})
    bad.save(sandbox_platform, overwrite=True)
    try:
        state = _backup(sandbox_platform)
    finally:
        good.save(sandbox_platform, overwrite=True)
    assert state.is_failed() and "NoSuchBucket" in state.message
    # the fault fired where the archive was uploaded, once (a 404 is not retried), and nothing was deleted
    assert answers == [("PutObject", "NoSuchBucket"), ("ListObjectsV2", "NoSuchBucket")]
    assert _attempts(state, "verify-and-copy-offsite") == [1]


def test_missing_secrets_file_fails_preflight(snapshot, sandbox_platform):
    secrets = _root(snapshot) / "etc/gitlab/gitlab-secrets.json"
    aside = secrets.with_name("gitlab-secrets.json.aside")
    ran = _ran(snapshot, CREATE)
    secrets.rename(aside)
    try:
        state = _backup(sandbox_platform)
    finally:
        aside.rename(secrets)
    assert state.is_failed() and "gitlab-secrets.json is missing" in state.message
    assert _attempts(state, "gitlab-host-preflight") == [1]  # a failed check is not retried
    assert _ran(snapshot, CREATE) == ran  # and no backup was started


def test_restore_refuses_an_offsite_copy_with_a_bad_checksum(snapshot, gitlab_backup_state, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    sb = snapshot
    backup_id = gitlab_backup_state.result()["backup_id"]
    name = f"{backup_id}_gitlab_backup.tar"
    local = _root(sb) / "var/opt/gitlab/backups" / name
    aside = local.with_name(name + ".aside")
    key = f"gitlab/data/{backup_id}/{name}"
    s3 = _s3(sb)
    good = s3.get_object(Bucket="gitlab-backups", Key=key)["Body"].read()
    bad = bytearray(good)
    bad[len(bad) // 2] ^= 0xFF  # same size, one flipped bit: only the checksum can tell
    shutil.move(local, aside)
    s3.put_object(Bucket="gitlab-backups", Key=key, Body=bytes(bad))
    try:
        state = run_and_answer(gitlab_restore, {"platform": sandbox_platform, "backup_id": backup_id,
                                                "dry_run": False, "poll_interval_s": 0.5}, APPROVE)
        assert state.is_failed() and "corrupt" in state.message
        assert "failed at step 1 (fetch data from off-site)" in state.message  # before the safety backup
        assert "GitLab was not changed yet" in state.message
        assert _attempts(state, "fetch-to-host") == [1]  # a checksum mismatch is not retried
        assert not local.exists() and not local.with_name(name + ".part").exists()
    finally:
        s3.put_object(Bucket="gitlab-backups", Key=key, Body=good)
        shutil.move(aside, local)


def test_a_restore_that_fails_part_way_names_the_state_and_the_complete_safety_backup(snapshot, gitlab_backup_state,
                                                                                      sandbox_platform):
    """psql fails part-way through `gitlab-backup restore` (the stand-in has emptied the projects table): the
    failure says the data may be partly overwritten and names the safety backup to restore, which is
    complete (data, config, secrets) and matches the host as it was (the contract test runs that way back)."""
    from flows.gitlab_restore import gitlab_restore

    sb = snapshot
    state_dir = _root(sb) / "var/opt/gitlab/state"
    before = json.loads((state_dir / "projects.json").read_text())
    _arm(sb, "gitlab-backup-restore", "fail")
    try:
        state = run_and_answer(gitlab_restore, {"platform": sandbox_platform, "dry_run": False,
                                                "backup_id": gitlab_backup_state.result()["backup_id"],
                                                "poll_interval_s": 0.5}, APPROVE)
        assert state.is_failed(), state.message
        assert "failed at step 6 (gitlab-backup restore" in state.message and "psql exited with 3" in state.message
        assert "steps 1-5 applied" in state.message and "partly overwritten" in state.message
        assert "steps 7-11 not run" in state.message
        safety = re.search(r"gitlab-restore with backup_id=([A-Za-z0-9_.\-]+), dry_run=false", state.message)[1]
        manifest = json.loads((_root(sb) / "var/opt/gitlab/backups" /
                               f"{safety}_gitlab_backup.manifest.json").read_text())
        assert sorted(f["role"] for f in manifest["files"]) == ["config", "data", "secrets"]
        with tarfile.open(next(f["host_path"] for f in manifest["files"] if f["role"] == "data")) as tar:
            dump = json.loads(gzip.decompress(tar.extractfile("db/database.sql.gz").read()))
        assert dump["projects"] == before  # the safety backup holds the data as it was before the restore
        assert json.loads((state_dir / "projects.json").read_text()) == []  # the stand-in's partial restore
    finally:
        (state_dir / "projects.json").write_text(json.dumps(before))
        services = json.loads((state_dir / "services.json").read_text())
        (state_dir / "services.json").write_text(json.dumps({k: "run" for k in services}))
