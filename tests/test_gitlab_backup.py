"""GitLab backup: the flow against the sandbox (sshd + stand-in omnibus + API + moto S3)."""

from __future__ import annotations

import hashlib
import json
import os
import stat
from pathlib import Path


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


def _flow_logs(state, expect: str = "$ ") -> str:
    """Every log line of the flow run (and its tasks), once the API log handler has sent them."""
    import time

    deadline = time.monotonic() + 15
    while True:
        text = _read_logs(state)
        if expect in text or time.monotonic() > deadline:
            return text
        time.sleep(0.5)


def _read_logs(state) -> str:
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    async def read():
        async with get_client() as client:
            logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[state.state_details.flow_run_id])))
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
    assert "registry" in manifest["skipped"] and "db" in manifest["components"]
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
        roles["data"]["name"], roles["config"]["name"], roles["secrets"]["name"], "manifest.json"}
    body = _s3(sb).get_object(Bucket="gitlab-backups", Key=prefix + roles["data"]["name"])["Body"].read()
    assert hashlib.sha256(body).hexdigest() == roles["data"]["sha256"]
    assert result["rpo_seconds"] < 120 and result["size"] > 256 * 1024


def test_backup_never_logs_secrets(gitlab_backup_state, gitlab_sandbox):
    logs = _flow_logs(gitlab_backup_state)
    assert "gitlab-backup create" in logs and "Dumping" in logs  # the output was streamed
    secret = gitlab_sandbox.extra["gitlab_secret_production"]
    for value in (secret, secret[::-1], os.environ["SANDBOX_GITLAB_TOKEN"], os.environ["SANDBOX_S3_SECRET_ACCESS_KEY"]):
        assert value not in logs


def test_backup_holds_the_host_concurrency_limit(gitlab_backup_state, sandbox_platform):
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_global_concurrency_limit_by_name(f"gitlab-host-{sandbox_platform}")

    limit = asyncio.run(read())
    assert limit.limit == 1 and limit.active_slots == 0


def test_config_backup_keeps_config_and_secrets_offsite(gitlab_backup_state, gitlab_sandbox, sandbox_platform):
    from flows.gitlab_backup import gitlab_config_backup

    state = run_flow_sync(gitlab_config_backup, platform=sandbox_platform)
    assert state.is_completed(), state.message
    result = state.result()
    stamp = result["backup_id"]
    assert {f["role"] for f in result["files"]} == {"config", "secrets"}
    keys = {k for k in _objects(gitlab_sandbox) if k.startswith(f"gitlab/config/{stamp}/")}
    assert {k.rsplit("/", 1)[1] for k in keys} == {f"gitlab_config_{stamp}.tar", f"gitlab-secrets_{stamp}.json",
                                                   "manifest.json"}
    local = _root(gitlab_sandbox) / "etc/gitlab/config_backup" / f"gitlab_config_{stamp}.manifest.json"
    assert json.loads(local.read_text())["verified"]
