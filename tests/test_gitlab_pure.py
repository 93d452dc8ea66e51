"""Pure functions of the GitLab backup lifecycle: no Prefect, no network."""

from __future__ import annotations

import io
import secrets
import tarfile
from datetime import datetime, timedelta, timezone

import pytest

from tasks.gitlab_rules import (
    BackupRecord,
    ProjectState,
    backup_id_from_archive,
    backup_option_args,
    check_archive,
    compare_restore,
    parse_backup_id,
    parse_backup_information,
    parse_df,
    plan_retention,
    version_problem,
)
from tasks.storage import TarStreamVerifier, VerificationError

INFO = """---
:db_version: 20240508085441
:backup_created_at: 2024-05-29 17:00:00 UTC
:gitlab_version: 17.0.1-ee
:tar_version: tar (GNU tar) 1.34
:installation_type: omnibus-gitlab
:skipped: registry,pages
:repositories_server_side: false
"""


def test_backup_ids_follow_gitlab_naming():
    b = parse_backup_id("1717000000_2024_05_29_17.0.1-ee")
    assert (b.epoch, b.version, b.edition, b.archive) == (1717000000, "17.0.1", "ee",
                                                          "1717000000_2024_05_29_17.0.1-ee_gitlab_backup.tar")
    assert parse_backup_id("1717000000_2024_05_29_16.11.3").edition == "ce"
    for bad in ["../1717000000_2024_05_29_17.0.1-ee", "1717000000_2024_05_29_17.0.1-ee/..", "", "-rf", "a b",
                "1717000000_2024_05_29_17.0.1-ee;id", "1717000000_2024_05_29_17.0.1-ee\n", None, 5,
                "1717000000_2024_05_29_17.0.1-ee_gitlab_backup.tar", "$(reboot)", "1717000000_2024_05_29_17.0.1-xx",
                "a..b", "x" * 65]:
        with pytest.raises(ValueError, match="expected <epoch>"):
            parse_backup_id(bad)
    assert backup_id_from_archive("1717000000_2024_05_29_17.0.1-ee_gitlab_backup.tar").value.endswith("-ee")
    assert backup_id_from_archive("gitlab_config_1717000000_2024_05_29.tar") is None


def test_backup_options_are_validated_before_reaching_the_shell():
    assert backup_option_args({"STRATEGY": "copy", "SKIP": "registry,pages", "CRON": "1", "BACKUP": "pre-upgrade"}) == [
        "BACKUP=pre-upgrade", "CRON=1", "SKIP=registry,pages", "STRATEGY=copy"]
    for bad in ({"STRATEGY": "copy; rm -rf /"}, {"EVIL": "1"}, {"SKIP": "everything"}, {"BACKUP": "../x"},
                {"BACKUP": "1717000000_bad"}):
        with pytest.raises(ValueError):
            backup_option_args(bad)


def test_backup_information_and_archive_check():
    info = parse_backup_information(INFO)
    assert info["gitlab_version"] == "17.0.1-ee" and info["skipped"] == "registry,pages"
    members = [("backup_information.yml", 10), ("db/database.sql.gz", 5), ("repositories/x.bundle", 5)] + [
        (f"{c}.tar.gz", 1) for c in ("uploads", "builds", "artifacts", "lfs", "terraform_state", "packages",
                                     "ci_secure_files")]
    ok = check_archive(members, INFO, "17.0.1-ee")
    assert ok.ok and "registry" in ok.skipped and "db" in ok.components
    bad = check_archive(members[:-2], INFO, "17.0.2-ee")
    assert not bad.ok and any("17.0.2-ee" in p for p in bad.problems) and any("packages" in p for p in bad.problems)
    assert not check_archive(members, None, "17.0.1-ee").ok


def _tar(files: dict[str, bytes], fmt=tarfile.GNU_FORMAT) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
@pytest.mark.parametrize("chunk", [1, 511, 4096, 1 << 20])
def test_tar_stream_verifier_reads_any_chunking(fmt, chunk):
    long = "repositories/" + "a" * 150 + "/project.bundle" if fmt != tarfile.USTAR_FORMAT else "repositories/p.bundle"
    data = _tar({"backup_information.yml": INFO.encode(), long: b"x" * 3000, "db/database.sql.gz": b""}, fmt)
    v = TarStreamVerifier(capture={"backup_information.yml"})
    for i in range(0, len(data), chunk):
        v.feed(data[i:i + chunk])
    v.finish()
    assert [m[0] for m in v.members] == ["backup_information.yml", long, "db/database.sql.gz"]
    assert v.captured["backup_information.yml"] == INFO.encode()


def test_tar_stream_verifier_rejects_truncated_and_corrupt_archives():
    data = _tar({"a": b"x" * 5000, "b": b"y" * 100})
    for cut in (len(data) // 2, 700, 1024):
        v = TarStreamVerifier()
        v.feed(data[:cut])
        with pytest.raises(VerificationError):
            v.finish()
    broken = bytearray(data)
    broken[100] ^= 0xFF  # in the first header
    with pytest.raises(VerificationError, match="checksum"):
        TarStreamVerifier().feed(bytes(broken))
    with pytest.raises(VerificationError):
        v = TarStreamVerifier()
        v.feed(b"not a tar at all" * 100)
        v.finish()


NOW = datetime(2024, 6, 1, tzinfo=timezone.utc)


def _rec(days_ago: float, verified=True, i=None) -> BackupRecord:
    return BackupRecord(id=f"b{i if i is not None else days_ago}", created_at=NOW - timedelta(days=days_ago),
                        verified=verified)


def test_retention_keeps_by_age_and_count():
    records = [_rec(d) for d in range(10)]
    plan = {d.id: d for d in plan_retention(records, now=NOW, keep_days=5, keep_count=3, run_succeeded=True)}
    assert [i for i, d in plan.items() if d.action == "keep"] == ["b0", "b1", "b2"]
    assert "beyond the 3 newest" in plan["b3"].reason
    plan = {d.id: d for d in plan_retention(records, now=NOW, keep_days=2, keep_count=7, run_succeeded=True)}
    assert [i for i, d in plan.items() if d.action == "keep"] == ["b0", "b1", "b2"]
    assert "older than 2 days" in plan["b5"].reason


def test_retention_never_deletes_the_newest_verified_backup():
    records = [_rec(30), _rec(40), _rec(1, verified=False), _rec(50, verified=False)]
    plan = {d.id: d for d in plan_retention(records, now=NOW, keep_days=5, keep_count=1, run_succeeded=True)}
    assert plan["b30"].action == "keep" and plan["b30"].reason == "newest verified backup"
    assert plan["b40"].action == "delete"
    assert plan["b1"].action == "keep" and plan["b50"].action == "delete"


def test_retention_deletes_nothing_after_a_failed_run_or_without_a_verified_backup():
    records = [_rec(d) for d in range(0, 40, 5)]
    assert all(d.action == "keep" for d in plan_retention(records, now=NOW, keep_days=1, keep_count=1,
                                                           run_succeeded=False))
    unverified = [_rec(d, verified=False) for d in (10, 20)]
    assert all(d.action == "keep" for d in plan_retention(unverified, now=NOW, keep_days=1, keep_count=1,
                                                           run_succeeded=True))


def test_version_edition_and_free_space_checks():
    assert version_problem("17.0.1", "ee", "17.0.1-ee") is None
    assert "install 17.0.1-ee first" in version_problem("17.0.2", "ee", "17.0.1-ee")
    assert version_problem("17.0.1", "ce", "17.0.1-ee")
    assert version_problem("17.0.1", "ce", "17.0.1-ce") is None  # the documented "-ce" spelling
    assert version_problem("16.7.0-rc1", "ee", "16.7.0-rc1-ee") is None
    assert version_problem("16.7.0", "ee", "16.7.0-rc1-ee")
    assert parse_df("Filesystem 1-blocks Used Available Capacity Mounted on\n/dev/vda 100 40 60 40% /\n") == 60


def test_drill_comparison_tolerates_only_changes_made_after_the_backup():
    t = NOW - timedelta(hours=2)
    prod = [ProjectState(id=1, path="a", last_commit="1", last_activity_at=NOW - timedelta(days=3)),
            ProjectState(id=2, path="b", last_commit="2new", last_activity_at=NOW)]
    restored = [ProjectState(id=1, path="a", last_commit="1"), ProjectState(id=2, path="b", last_commit="2")]
    c = compare_restore(2, 2, prod, restored, t)
    assert c.ok and c.matching == 1 and c.changed_since_backup == ["b"]
    bad = compare_restore(2, 2, [prod[0].model_copy(update={"last_commit": "x"})], restored, t)
    assert not bad.ok and bad.mismatched == ["a"]


# --- redaction of remote output, the store without GitLab ------------------------------------------


class _Lines:
    def __init__(self, lines):
        self._lines = iter(lines)

    def __aiter__(self):
        return self

    async def __anext__(self):
        try:
            return next(self._lines) + "\n"
        except StopIteration:
            raise StopAsyncIteration from None


class _Conn:
    """An SSH connection stand-in: runs nothing, answers with the given output and exit status."""

    def __init__(self, stdout, stderr, status):
        self.out, self.err, self.status, self.commands = stdout, stderr, status, []

    async def create_process(self, command, **_):
        from types import SimpleNamespace

        self.commands.append(command)

        async def wait(check=False):  # noqa: ARG001 - asyncssh's signature
            return SimpleNamespace(exit_status=self.status, exit_signal=None)

        return SimpleNamespace(stdout=_Lines(self.out), stderr=_Lines(self.err), wait=wait)


SECRET = f"db-password-{secrets.token_hex(8)}"  # fresh each run
PAT = f"glpat-{secrets.token_hex(10)}"  # GitLab's PAT shape: redacted by pattern, not by value
OUT = [f"connecting with {SECRET}", "Dumping database ... done"]
ERR = [f"PRIVATE-TOKEN: {PAT} refused", f"rake aborted! password {SECRET}"]


@pytest.mark.parametrize("redact", [[SECRET], "redactor"])
def test_run_command_redacts_every_streamed_kept_and_error_line(redact, caplog):
    import asyncio
    import logging

    from tasks.redact import Redactor
    from tasks.ssh import RemoteCommandError, run_command

    redact = Redactor.of([SECRET]) if redact == "redactor" else redact
    logger = logging.getLogger("test-ssh-redaction")
    conn = _Conn(OUT, ERR, 1)
    with caplog.at_level(logging.INFO, logger=logger.name), pytest.raises(RemoteCommandError) as failed:
        asyncio.run(run_command(conn, ["echo", SECRET], logger=logger, redact=redact))
    assert conn.commands == [f"echo {SECRET}"]  # the host got the real command
    logged = caplog.text
    assert "$ echo ***" in logged and "connecting with ***" in logged and "Dumping database ... done" in logged
    assert "PRIVATE-TOKEN: ***" in logged
    error = failed.value
    assert error.tail == ["connecting with ***", "Dumping database ... done", "PRIVATE-TOKEN: *** refused",
                          "rake aborted! password ***"]
    for text in (logged, str(error), " ".join(error.argv)):
        assert SECRET not in text and PAT not in text

    ok = asyncio.run(run_command(_Conn(OUT, [], 0), ["true"], redact=redact))
    assert ok.stdout == ["connecting with ***", "Dumping database ... done"]


def test_the_generic_store_does_not_know_gitlab_and_tasks_load_no_blocks():
    import ast

    from tests.conftest import REPO

    def imports(path: str) -> set[str]:
        tree = ast.parse((REPO / path).read_text())
        return {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | {
            a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}

    assert not {m for m in imports("tasks/storage.py") if "gitlab" in m or m.startswith("blocks")}
    for path in ("tasks/gitlab_host.py", "tasks/gitlab_api.py", "tasks/gitlab_rules.py", "tasks/ssh.py",
                 "tasks/storage.py"):
        assert "blocks.platform" not in imports(path), path


def test_offsite_manifest_tasks_work_on_the_store_they_are_given(tmp_path):
    import asyncio

    from blocks.connections import BackupStore
    from tasks.storage import (
        Store,
        delete_offsite_backups,
        list_offsite_manifests,
        read_offsite_manifest,
        write_offsite_manifest,
    )

    store = Store(BackupStore(kind="local", path=str(tmp_path), prefix="gitlab/"))
    (tmp_path / "gitlab/data/b1").mkdir(parents=True)
    (tmp_path / "gitlab/data/b1/archive.tar").write_bytes(b"x" * 10)
    (tmp_path / "gitlab/secrets/data/b1").mkdir(parents=True)
    (tmp_path / "gitlab/secrets/data/b1/gitlab-secrets.json").write_bytes(b"{}")

    async def scenario():
        for backup_id in ("b1", "b2"):
            await write_offsite_manifest.fn(store, "data", backup_id, {"id": backup_id})
        listed = sorted(m["id"] for m in await list_offsite_manifests.fn(store, "data"))
        deleted = await delete_offsite_backups.fn(store, "data", ["b1"], apart=("secrets",))
        return listed, sorted(deleted), await read_offsite_manifest.fn(store, "data", "b1"), \
            await read_offsite_manifest.fn(store, "data", "b2")

    listed, deleted, gone, kept = asyncio.run(scenario())
    assert listed == ["b1", "b2"]
    assert deleted == ["data/b1/archive.tar", "data/b1/manifest.json", "secrets/data/b1/gitlab-secrets.json"]
    assert gone is None and kept == {"id": "b2"}
    assert sorted(p.name for p in (tmp_path / "gitlab/data").rglob("*") if p.is_file()) == ["manifest.json"]
