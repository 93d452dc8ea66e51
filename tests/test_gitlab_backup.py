"""GitLab backup: the flow against the sandbox (sshd + stand-in omnibus + API + moto S3)."""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import pwd
import stat
import time
from pathlib import Path

import pytest

from tests.conftest import run_flow_sync


def _root(sb, name="production") -> Path:
    return Path(sb.extra[f"gitlab_root_{name}"])


def _s3(sb):
    import boto3

    return boto3.client("s3", endpoint_url=sb.urls["s3"], region_name="us-east-1",
                        aws_access_key_id=os.environ["SANDBOX_S3_ACCESS_KEY_ID"],
                        aws_secret_access_key=os.environ["SANDBOX_S3_SECRET_ACCESS_KEY"])


def _objects(sb) -> dict[str, str]:
    """Every object in the backup bucket with its ETag."""
    s3 = _s3(sb)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket="gitlab-backups"):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def _files(sb, name="production") -> dict[str, str]:
    """Every backup file on a host, with its sha256."""
    root = _root(sb, name)
    out = {}
    for d in (root / "var/opt/gitlab/backups", root / "etc/gitlab/config_backup"):
        for p in d.iterdir():
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def _tree(sb, name="production") -> dict[str, str]:
    """Every file under a host's root (config, secrets, backups, state, command log) with its sha256."""
    root = _root(sb, name)
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _commands(sb, name="production") -> list[list[str]]:
    """Every omnibus command the host's stand-in ran, in order (its own log)."""
    log = _root(sb, name) / "var/opt/gitlab/state/commands.log"
    return [json.loads(line)["argv"] for line in log.read_text().splitlines()] if log.exists() else []


def _ran(sb, prefix: list[str], name="production") -> int:
    """How many times the host ran a command starting with `prefix`."""
    return sum(c[:len(prefix)] == prefix for c in _commands(sb, name))


def _task_runs(state) -> dict[str, list]:
    """The task runs of a flow run, by task name (`gitlab-backup-create`, ...), read from the Prefect API."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async def read():
        async with get_client() as client:
            return await client.read_task_runs(flow_run_filter=FlowRunFilter(
                id=FlowRunFilterId(any_=[state.state_details.flow_run_id])))

    out: dict[str, list] = {}
    for run in asyncio.run(read()):
        out.setdefault(run.name.rsplit("-", 1)[0], []).append(run)
    return out


def _attempts(state, task_name: str) -> list[int]:
    """How many times each run of task `task_name` in the flow run was attempted (Prefect's run_count)."""
    return [r.run_count for r in _task_runs(state).get(task_name, [])]


def _flow_logs(state, expect: str = "$ ") -> str:
    """Every log line of the flow run (and its tasks), once the API log handler has sent them."""
    deadline = time.monotonic() + 15
    while True:
        text = _read_logs(state)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _read_logs(state) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            run_id = state.state_details.flow_run_id
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run_id])))
            return "\n".join(log.message for log in logs)

    return asyncio.run(read())


def test_backup_leaves_verified_archive_config_secrets_and_manifest_locally_and_offsite(gitlab_backup_state,
                                                                                        gitlab_sandbox):
    sb = gitlab_sandbox
    result = gitlab_backup_state.result()
    backup_id = result["backup_id"]
    root = _root(sb)
    archive = root / "var/opt/gitlab/backups" / f"{backup_id}_gitlab_backup.tar"
    manifest = json.loads((root / "var/opt/gitlab/backups" / f"{backup_id}_gitlab_backup.manifest.json").read_text())
    assert manifest["verified"] and manifest["offsite"] and manifest["gitlab_version"] == "17.0.1-ee"
    # the registry is disabled in gitlab.rb: GitLab left it out without listing it under :skipped:
    assert manifest["skipped"] == [] and manifest["disabled"] == ["registry"]
    assert "db" in manifest["components"] and "registry" not in manifest["components"]
    st = archive.stat()  # written by gitlab-backup as the git user, with backup_archive_permissions 0600
    assert (pwd.getpwuid(st.st_uid).pw_name, stat.S_IMODE(st.st_mode)) == ("git", 0o600)
    roles = {f["role"]: f for f in manifest["files"]}
    assert set(roles) == {"data", "config", "secrets"}
    assert roles["data"]["sha256"] == hashlib.sha256(archive.read_bytes()).hexdigest()
    for role in ("config", "secrets"):
        path = Path(roles[role]["host_path"])
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, role
        assert hashlib.sha256(path.read_bytes()).hexdigest() == roles[role]["sha256"]
    objects = _objects(sb)
    prefix = f"gitlab/data/{backup_id}/"
    assert {k[len(prefix):] for k in objects if k.startswith(prefix)} == {
        roles["data"]["name"], roles["config"]["name"], "manifest.json"}
    # the secrets copy lives apart from the data, server-side encrypted
    secrets_key = f"gitlab/secrets/data/{backup_id}/{roles['secrets']['name']}"
    assert {k for k in objects if "gitlab-secrets" in k and backup_id in k} == {secrets_key}
    assert _s3(sb).head_object(Bucket="gitlab-backups", Key=secrets_key)["ServerSideEncryption"] == "AES256"
    body = _s3(sb).get_object(Bucket="gitlab-backups", Key=prefix + roles["data"]["name"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == roles["data"]["sha256"]
    assert result["rpo_seconds"] < 120 and result["size"] > 256 * 1024
    assert result["location"] == "s3://gitlab-backups/gitlab/data/"
    # every step ran once: nothing was retried in a run without faults
    attempts = {name: [r.run_count for r in runs] for name, runs in _task_runs(gitlab_backup_state).items()}
    assert attempts["gitlab-backup-create"] == [1] and attempts["verify-and-copy-offsite"] == [1, 1, 1]


def test_backup_never_logs_secrets(gitlab_backup_state, gitlab_sandbox):
    logs = _flow_logs(gitlab_backup_state)
    assert "gitlab-backup create" in logs  # the command line was logged
    # CRON=1 silences GitLab's progress; what it reported was read from its backup log and logged
    assert "Dumping" not in logs and "disabled: registry" in logs
    secret = gitlab_sandbox.secret("gitlab_secret_production", env=False)
    for value in (secret, secret[::-1], os.environ["SANDBOX_GITLAB_TOKEN"], os.environ["SANDBOX_S3_SECRET_ACCESS_KEY"]):
        assert value not in logs


@pytest.mark.usefixtures("gitlab_backup_state")
def test_backup_holds_the_host_concurrency_limit(sandbox_platform, monkeypatch):
    """While the flow runs its steps, the host's slot is taken (1 of 1) and a second taker times out;
    afterwards it is free again."""
    from prefect.client.orchestration import get_client
    from prefect.concurrency.asyncio import concurrency

    import flows.gitlab_backup as backup_flow
    import tasks.gitlab_backup as backup_run

    name = f"gitlab-host-{sandbox_platform}"
    seen: dict = {}
    real_preflight = backup_run.preflight_checks

    async def active_slots() -> tuple[int, int]:
        async with get_client() as client:
            limit = await client.read_global_concurrency_limit_by_name(name)
            return limit.limit, limit.active_slots

    async def preflight_while_observed(*args, **kwargs):
        seen["during"] = await active_slots()
        started = time.monotonic()
        try:
            async with concurrency(name, occupy=1, timeout_seconds=2):
                seen["second_taker"] = "got the slot"
        except TimeoutError:
            seen["second_taker"] = "timed out"
        seen["waited_s"] = time.monotonic() - started
        return await real_preflight(*args, **kwargs)

    monkeypatch.setattr(backup_run, "preflight_checks", preflight_while_observed)
    state = run_flow_sync(backup_flow.gitlab_config_backup, platform=sandbox_platform)
    assert state.is_completed(), state.message
    assert seen["during"] == (1, 1)
    assert seen["second_taker"] == "timed out" and seen["waited_s"] >= 2
    assert asyncio.run(active_slots()) == (1, 0)


@pytest.mark.usefixtures("gitlab_backup_state")
def test_config_backup_keeps_config_and_secrets_offsite(gitlab_sandbox, sandbox_platform):
    from flows.gitlab_backup import gitlab_config_backup

    state = run_flow_sync(gitlab_config_backup, platform=sandbox_platform)
    assert state.is_completed(), state.message
    result = state.result()
    stamp = result["backup_id"]
    assert {f["role"] for f in result["files"]} == {"config", "secrets"}
    keys = {k for k in _objects(gitlab_sandbox) if k.startswith(f"gitlab/config/{stamp}/")}
    assert {k.rsplit("/", 1)[1] for k in keys} == {f"gitlab_config_{stamp}.tar", "manifest.json"}
    assert f"gitlab/secrets/config/{stamp}/gitlab-secrets_{stamp}.json" in _objects(gitlab_sandbox)
    local = _root(gitlab_sandbox) / "etc/gitlab/config_backup" / f"gitlab_config_{stamp}.manifest.json"
    assert json.loads(local.read_text())["verified"]
