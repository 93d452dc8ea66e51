"""GitLab restore and drill against the sandbox, beyond the operation contract (tests/test_operations.py runs
gitlab-restore's dry run, approved apply, refusal after a change, failure with its way back, and cancel):
backup ids, the refusal of another GitLab version, a timed-out and a declined approval, the documented order
of the commands with the archive fetched from off-site, the complete safety backup, and the unattended drill."""

from __future__ import annotations

import hashlib
import json
import pwd
import shutil
import stat

import pytest

from tests.approvals import APPROVE, run_and_answer
from tests.conftest import run_flow_sync
from tests.operation_scenarios.gitlab import backup_projects
from tests.test_gitlab_backup import _attempts, _commands, _files, _root, _tree


def _projects(sb, name="production") -> list[dict]:
    return json.loads((_root(sb, name) / "var/opt/gitlab/state/projects.json").read_text())


@pytest.mark.parametrize("bad", ["../../etc/passwd", "1717000000_2024_05_29_17.0.1-ee; rm -rf /",
                                 "1717000000_2024_05_29_17.0.1-ee/../x", "", "-rf", "a b"])
@pytest.mark.usefixtures("gitlab_sandbox")
def test_restore_rejects_anything_but_a_gitlab_backup_id(bad, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    state = run_flow_sync(gitlab_restore, platform=sandbox_platform, backup_id=bad, dry_run=False)
    assert state.is_failed() and "is not a GitLab backup id" in state.message


def test_restore_refuses_a_different_installed_version(gitlab_backup_state, gitlab_sandbox, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    manifest = _root(gitlab_sandbox) / "opt/gitlab/version-manifest.txt"
    original = manifest.read_text()
    before = _tree(gitlab_sandbox)
    manifest.write_text("gitlab-ee 17.0.2\n")
    try:
        state = run_flow_sync(gitlab_restore, platform=sandbox_platform,
                              backup_id=gitlab_backup_state.result()["backup_id"], dry_run=False)
    finally:
        manifest.write_text(original)
    assert state.is_failed() and "only restores onto the same version" in state.message
    assert _tree(gitlab_sandbox) == before


def test_restore_without_approval_changes_nothing(gitlab_backup_state, gitlab_sandbox, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    before = _tree(gitlab_sandbox)
    state = run_flow_sync(gitlab_restore, platform=sandbox_platform,
                          backup_id=gitlab_backup_state.result()["backup_id"], dry_run=False, approval_timeout_s=2,
                          poll_interval_s=1)
    assert state.is_failed() and "never resumed" in state.message
    assert _tree(gitlab_sandbox) == before  # no command ran, no file changed


def test_declined_restore_records_who_declined_and_changes_nothing(gitlab_backup_state, gitlab_sandbox,
                                                                    sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    before = _tree(gitlab_sandbox)
    state = run_and_answer(gitlab_restore, {"platform": sandbox_platform, "dry_run": False, "poll_interval_s": 0.5,
                                            "backup_id": gitlab_backup_state.result()["backup_id"]},
                           {"approve": False, "approver": " bob "})
    assert state.is_completed(), state.message
    result = state.result()
    assert (result["approved"], result["approver"]) == (False, "bob") and result["steps"] == []
    assert result["state"].startswith("untouched: declined by bob")
    assert _tree(gitlab_sandbox) == before


def test_restore_fetches_from_offsite_keeps_the_documented_order_and_a_complete_safety_backup(
        gitlab_backup_state, gitlab_sandbox, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore

    sb = gitlab_sandbox
    backup_id = gitlab_backup_state.result()["backup_id"]
    state_file = _root(sb) / "var/opt/gitlab/state/projects.json"
    backed_up = backup_projects(sb, backup_id)
    before = _files(sb)
    ran_before = len(_commands(sb))  # the host's command log is the session's: read only this run's part
    # the archive is gone from the host: the restore fetches the off-site copy (written as root over SFTP)
    archive = _root(sb) / "var/opt/gitlab/backups" / f"{backup_id}_gitlab_backup.tar"
    aside = archive.with_name(archive.name + ".aside")
    shutil.move(archive, aside)
    state_file.write_text(json.dumps([dict(p, last_commit="f" * 40) for p in backed_up]))  # work after the backup
    try:
        state = run_and_answer(gitlab_restore, {"platform": sandbox_platform, "backup_id": backup_id,
                                                "dry_run": False, "poll_interval_s": 0.5}, APPROVE)
    finally:
        aside.unlink(missing_ok=True)
    assert state.is_completed(), state.message
    result = state.result()
    assert result["approver"] == "alice" and result["safety_backup"]
    assert _projects(sb) == backed_up
    steps = [r["step"] for r in result["steps"]]
    assert steps[:2] == ["fetch data from off-site", "safety backup"], steps  # fetched only after the approval
    st = archive.stat()  # fetched from off-site, handed to git (the restore ran as git and could read it)
    assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("git", 0o600)
    assert "owned by git:git" in result["steps"][0]["detail"]
    cmds = _commands(sb)[ran_before:]
    restore = ["gitlab-backup", "restore", f"BACKUP={backup_id}", "force=yes"]
    i_restore = cmds.index(restore)
    # the documented order: config + reconfigure, stop puma and sidekiq, status, restore; then reconfigure,
    # restart, gitlab:check and gitlab:doctor:secrets
    last = {tuple(c): n for n, c in enumerate(cmds[:i_restore])}
    assert last[("gitlab-ctl", "reconfigure")] < last[("gitlab-ctl", "stop", "puma")] < last[
        ("gitlab-ctl", "stop", "sidekiq")] < last[("gitlab-ctl", "status")] < i_restore
    after_data = [tuple(c) for c in cmds[i_restore + 1:]]
    assert after_data[:4] == [("gitlab-ctl", "reconfigure"), ("gitlab-ctl", "restart"),
                              ("gitlab-rake", "gitlab:check", "SANITIZE=true"), ("gitlab-rake", "gitlab:doctor:secrets")]
    assert before.items() <= _files(sb).items()  # no backup file lost or changed; the safety backup was added
    assert _attempts(state, "gitlab-backup-create") == [1]  # the safety backup
    # the safety backup is complete, as gitlab-backup writes one: restoring its id is the way back
    manifest = json.loads((_root(sb) / "var/opt/gitlab/backups" /
                           f"{result['safety_backup']}_gitlab_backup.manifest.json").read_text())
    assert manifest["safety"] and manifest["verified"]
    assert sorted(f["role"] for f in manifest["files"]) == ["config", "data", "secrets"]
    for f in manifest["files"]:
        assert hashlib.sha256(open(f["host_path"], "rb").read()).hexdigest() == f["sha256"]
    assert result["health"]["ready"] and result["health"]["projects"] == len(backed_up)


@pytest.mark.usefixtures("gitlab_backup_state")
def test_drill_restores_newest_backup_on_scratch_and_reports_rto_rpo(gitlab_sandbox, sandbox_platform):
    from flows.gitlab_restore import gitlab_restore_drill

    sb = gitlab_sandbox
    # production as the newest backup left it (other tests leave work done after it)
    newest = backup_projects(sb)
    (_root(sb) / "var/opt/gitlab/state/projects.json").write_text(json.dumps(newest))
    prod_before = _tree(sb)
    state = run_flow_sync(gitlab_restore_drill, platform=sandbox_platform)  # no approval asked: none answered
    assert state.is_completed(), state.message
    result = state.result()
    assert result["approver"].startswith("nobody (unattended: the weekly restore drill")
    assert "safety backup" not in [r["step"] for r in result["steps"]]  # scratch: the same steps but that one
    assert result["ok"] and result["rto_seconds"] > 0 and result["rpo_seconds"] >= 0
    assert result["comparison"]["matching"] == result["comparison"]["sampled"] > 0
    assert _projects(sb, "scratch") == _projects(sb)
    scratch_cmds = _commands(sb, "scratch")
    assert ["gitlab-rake", "gitlab:check", "SANITIZE=true"] in scratch_cmds
    assert ["gitlab-rake", "gitlab:doctor:secrets"] in scratch_cmds
    assert _tree(sb) == prod_before  # production untouched: every file's content, its command log included
    root = _root(sb, "scratch")
    secrets = root / "etc/gitlab/gitlab-secrets.json"
    # production's secrets came with it (needed to decrypt), 0600
    assert sb.secret("gitlab_secret_production", env=False) in secrets.read_text()
    assert stat.S_IMODE(secrets.stat().st_mode) == 0o600
    # the archive was fetched from off-site and handed to git, whose restore could read it
    archive = root / "var/opt/gitlab/backups" / f"{result['backup_id']}_gitlab_backup.tar"
    assert pwd.getpwuid(archive.stat().st_uid).pw_name == "git"
    # scratch kept its own identity: its URL, none of production's outward settings
    rb = (root / "etc/gitlab/gitlab.rb").read_text()
    assert "external_url 'https://gitlab-drill.sandbox.internal'" in rb
    assert "gitlab.sandbox.internal'" not in rb.replace("gitlab-drill.sandbox.internal", "")
    for production_only in ("smtp.sandbox.internal", "incoming+", "prod-gitlab-artifacts", "prod-gitlab-uploads",
                            "gitlab@sandbox.internal"):
        assert production_only not in rb
    from tasks.gitlab_rules import gitlab_rb_setting

    assert gitlab_rb_setting(rb, "gitlab_rails", "smtp_enable") == "false"
    assert gitlab_rb_setting(rb, "gitlab_rails", "incoming_email_enabled") == "false"
    assert gitlab_rb_setting(rb, "sidekiq", "enable") == "false"  # no mirrors, no scheduled jobs
    services = json.loads((root / "var/opt/gitlab/state/services.json").read_text())
    assert services["sidekiq"] == "down" and services["puma"] == "run"
