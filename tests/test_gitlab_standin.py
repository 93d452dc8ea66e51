"""The GitLab host stand-in behaves as omnibus does, not as our code would like: restores run as git and
refuse archives git does not own, and sshd does not deliver signals (so only a second session can stop a
remote command)."""

from __future__ import annotations

import asyncio
import os
import shutil
import time

from tests.conftest import need_root
from tests.test_gitlab_backup import _root


def _host(platform: str):
    from blocks.connections import GitLabHost

    return GitLabHost.load(platform, _sync=True)


async def _run(host, argv: list[str]):
    from tasks.ssh import connect, run_command

    async with connect(host.connect_kwargs()) as conn:
        return await run_command(conn, argv, timeout_s=60, check=False)


def test_restore_runs_as_git_and_refuses_an_archive_root_owns(gitlab_backup_state, gitlab_sandbox,
                                                              sandbox_platform):
    need_root("the stand-in switches to the git user only as root")
    sb = gitlab_sandbox
    backups = _root(sb) / "var/opt/gitlab/backups"
    source = backups / f"{gitlab_backup_state.result()['backup_id']}_gitlab_backup.tar"
    copy = backups / "rootcopy_gitlab_backup.tar"
    shutil.copyfile(source, copy)  # as root: what an SFTP upload as root leaves behind
    os.chmod(copy, 0o600)
    projects = (_root(sb) / "var/opt/gitlab/state/projects.json").read_bytes()
    try:
        r = asyncio.run(_run(_host(sandbox_platform), ["gitlab-backup", "restore", "BACKUP=rootcopy", "force=yes"]))
    finally:
        copy.unlink()
    assert r.exit_status == 1
    assert "rootcopy_gitlab_backup.tar is owned by uid 0, not by git" in "\n".join(r.stderr)
    assert (_root(sb) / "var/opt/gitlab/state/projects.json").read_bytes() == projects  # nothing restored


def test_sshd_does_not_deliver_signals(gitlab_sandbox, sandbox_platform):
    """A client-side terminate() leaves the remote command running (OpenSSH: "session signalling
    requires privilege separation"); this is why tasks.ssh.run_supervised stops commands from a second
    session."""
    marker = _root(gitlab_sandbox) / "faults" / "signal-probe"

    async def scenario():
        from tasks.ssh import connect

        async with connect(_host(sandbox_platform).connect_kwargs()) as conn:
            proc = await conn.create_process(f"sleep 3 && touch {marker}")
            await asyncio.sleep(0.5)
            proc.send_signal("TERM")
            await asyncio.sleep(0.2)
            proc.close()

    marker.unlink(missing_ok=True)
    asyncio.run(scenario())
    deadline = time.monotonic() + 10
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert marker.exists(), "the remote command was stopped by a signal request: sshd delivered it"
    marker.unlink()
