"""Training on Argo against the sandbox: the Argo stand-in, the GitLab CI API stand-in, a real registry
and the session's Prefect server.

A push event (a `train_on_push` run) must leave the commit statuses pending -> running -> success
(or failed / canceled) on the stand-in GitLab and exactly one workflow on the stand-in Argo, even
when the first submit's response is lost. Polls are short here (0.2 s), the Argo stand-in advances
one step per 0.5 s.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]

FAST = {"poll_initial_s": 0.2, "poll_max_s": 0.5}
LEAK = "glpat-SANDBOXLEAKEDTOKEN123"


def _sha() -> str:
    return secrets.token_hex(20)


def _spec(scenario: str = "succeed", **extra) -> dict:
    spec = {
        "name": "rl-demo", "image": "registry.example/ai-base:v1", "command": ["python", "train.py"],
        "resources": {"cpu": "2", "memory": "8Gi", "gpu": {"memory": 20000}},
        "parameters": {"EPOCHS": "10"}, "labels": {"sandbox/scenario": scenario},
        "code": {"credentials": {"secret": "gitlab-clone"}},
        "exit_handler": {"script": "echo done"},
    }
    spec.update(extra)
    return spec


class Argo:
    def __init__(self, url: str):
        self.url = url

    def state(self) -> dict:
        return httpx.get(f"{self.url}/control/state", timeout=10).json()

    def fault(self, kind: str, **kw) -> None:
        httpx.post(f"{self.url}/control/fault", json={"kind": kind, **kw}, timeout=10).raise_for_status()

    def heal(self) -> None:
        httpx.post(f"{self.url}/control/heal", timeout=10).raise_for_status()

    def workflows(self, commit: str) -> list[dict]:
        return [wf for wf in self.state()["workflows"].values()
                if (wf["metadata"].get("annotations") or {}).get("ai-platform-ops/commit") == commit]

    def wait_for_workflow(self, commit: str, timeout_s: float = 30) -> dict:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = self.workflows(commit)
            if found:
                return found[0]
            time.sleep(0.1)
        raise AssertionError(f"no workflow for {commit} within {timeout_s}s")


class GitLab:
    def __init__(self, url: str):
        self.url = url

    def add_project(self, path: str, sha: str, spec: dict | str | None) -> None:
        files = {} if spec is None else {sha: {".aiplatform/train.yaml": spec if isinstance(spec, str)
                                               else yaml.safe_dump(spec)}}
        httpx.post(f"{self.url}/control/projects", json={"path": path, "files": files}, timeout=10).raise_for_status()

    def state(self) -> dict:
        return httpx.get(f"{self.url}/control/state", timeout=10).json()

    def statuses(self, path: str, sha: str) -> list[dict]:
        return self.state()["statuses"].get(f"{path}@{sha}", [])

    def comments(self, path: str, sha: str) -> list[dict]:
        return self.state()["comments"].get(f"{path}@{sha}", [])


@pytest.fixture
def argo(training_platform, sandbox):
    a = Argo(sandbox.urls["argo"])
    a.heal()
    yield a
    a.heal()


@pytest.fixture
def gitlab(training_platform, sandbox):
    return GitLab(sandbox.urls["gitlab_ci_api"])


def _push(gitlab, spec, project="ml/rl-robot"):
    sha = _sha()
    gitlab.add_project(project, sha, spec)
    return project, sha


def _train(project, sha, **kw):
    from flows.training import train_on_push

    return train_on_push(project=project, commit_sha=sha, ref="main", platform="sandbox-ci",
                         return_state=True, **(FAST | kw))


def _secret_values() -> list[str]:
    return [os.environ["SANDBOX_ARGO_TOKEN"], os.environ["SANDBOX_GITLAB_CI_TOKEN"]]


async def _run_outputs(flow_run_id) -> str:
    """Every log line and artifact of a flow run and its subflows, as one text."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterFlowRunId,
        FlowRunFilter,
        FlowRunFilterParentFlowRunId,
        LogFilter,
        LogFilterFlowRunId,
    )

    async with get_client() as client:
        ids = [flow_run_id]
        children = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(parent_flow_run_id=FlowRunFilterParentFlowRunId(any_=[flow_run_id])))
        ids += [c.id for c in children]
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=ids)))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=ids)))
    return "\n".join([log.message for log in logs] + [json.dumps(a.data) for a in artifacts]
                     + [a.key or "" for a in artifacts])


def _outputs(state) -> str:
    import asyncio

    return asyncio.run(_run_outputs(state.state_details.flow_run_id))


def test_push_trains_once_even_when_the_first_submit_response_is_lost(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    argo.fault("lose-create-response")
    state = _train(project, sha)
    assert state.is_completed(), state.message

    statuses = gitlab.statuses(project, sha)
    assert [s["status"] for s in statuses] == ["pending", "running", "success"]
    assert all(s["name"] == "aiplatform/train" and s["ref"] == "main" for s in statuses)
    assert str(state.state_details.flow_run_id) in statuses[-1]["target_url"]

    workflows = argo.workflows(sha)
    assert len(workflows) == 1, "a retried submit must adopt the workflow, not start a second one"
    wf = workflows[0]
    assert argo.state()["create_attempts"][wf["metadata"]["name"]] == 2
    assert wf["status"]["phase"] == "Succeeded"
    assert wf["metadata"]["labels"]["ai-platform-ops/commit"] == sha
    git = wf["spec"]["templates"][0]["inputs"]["artifacts"][0]["git"]
    assert git["revision"] == sha and git["repo"].endswith("/ml/rl-robot.git")
    assert git["passwordSecret"] == {"name": "gitlab-clone", "key": "password"}

    # no secret in the workflow (parameters or anywhere), nor in logs and artifacts
    text = json.dumps(wf)
    params = {p["name"]: p.get("value") for p in wf["spec"]["arguments"]["parameters"]}
    assert params == {"EPOCHS": "10"}
    for secret in _secret_values():
        assert secret not in text and secret not in json.dumps(params)
    outputs = _outputs(state)
    assert wf["metadata"]["name"] in outputs
    for secret in _secret_values():
        assert secret not in outputs

    note = gitlab.comments(project, sha)[-1]["note"]
    assert "training succeeded" in note and wf["metadata"]["name"] in note


def test_failed_training_reports_argo_message_and_logs_without_secrets(argo, gitlab):
    project, sha = _push(gitlab, _spec("fail"))
    gitlab.add_project(project, sha, _spec("fail"))
    state = _train(project, sha, merge_request_iid="7")
    assert state.is_failed()
    assert "failed: child" in state.message  # Argo's message

    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "failed"]
    assert len(argo.workflows(sha)) == 1
    mr_notes = gitlab.state()["mr_notes"][f"{project}!7"]
    note = mr_notes[-1]["body"]
    assert "CUDA out of memory" in note and LEAK not in note and "***" in note

    outputs = _outputs(state)
    assert "CUDA out of memory" in outputs  # the failed step's log reached the flow log / artifact
    assert LEAK not in outputs
    for secret in _secret_values():
        assert secret not in outputs


def test_invalid_spec_becomes_a_failed_status_with_the_message(argo, gitlab):
    project, sha = _push(gitlab, _spec(parameters={"GITLAB_TOKEN": "x"}))
    state = _train(project, sha)
    assert state.is_failed()
    statuses = gitlab.statuses(project, sha)
    assert [s["status"] for s in statuses] == ["pending", "failed"]
    assert "parameters" in statuses[-1]["description"] and "looks like a credential" in statuses[-1]["description"]
    assert argo.workflows(sha) == []

    project, sha = _push(gitlab, None)
    state = _train(project, sha)
    assert state.is_failed() and "no training spec" in state.message
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "failed"]


def _flow_run_of(sha: str, flow_name: str, timeout_s: float = 30):
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while time.monotonic() < deadline:
            for run in client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name]))):
                params = run.parameters
                if params.get("commit_sha") == sha or params.get("commit") == sha:
                    return run
            time.sleep(0.1)
    raise AssertionError(f"no {flow_name} run for {sha}")


def _in_thread(fn, **kw):
    out: list = []
    thread = threading.Thread(target=lambda: out.append(fn(**kw)), daemon=True)
    thread.start()
    return thread, out


def test_cancel_in_prefect_stops_then_terminates_the_workflow(argo, gitlab):
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelling

    project, sha = _push(gitlab, _spec("stuck", labels={"sandbox/scenario": "stuck", "sandbox/stop": "slow"}))
    thread, out = _in_thread(_train, project=project, sha=sha, stop_grace_s=1.0)
    argo.wait_for_workflow(sha)
    run = _flow_run_of(sha, "train-on-push")
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(run.id, Cancelling(message="operator cancelled"), force=True)
    thread.join(60)
    assert out, "train_on_push did not return after cancellation"
    state = out[0]
    assert state.is_cancelled(), state.message
    wf = argo.workflows(sha)[0]
    # the stop hung (sandbox/stop: slow), so the run terminated it after the grace period
    name = wf["metadata"]["name"]
    shutdowns = [r["path"].rsplit("/", 1)[-1] for r in argo.state()["requests"]
                 if r["method"] == "PUT" and f"/{name}/" in r["path"]]
    assert shutdowns == ["stop", "terminate"]
    assert wf["spec"]["shutdown"] == "Terminate"
    assert wf["status"]["phase"] == "Failed" and "Terminate" in wf["status"]["message"]
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "canceled"]
    training = _flow_run_of(sha, "argo-training-run")
    assert training.state.is_cancelled() and "cancelled in Prefect" in training.state.message


def test_a_workflow_stopped_in_argo_ends_the_run_cancelled(argo, gitlab, sandbox):
    project, sha = _push(gitlab, _spec("stuck"))
    thread, out = _in_thread(_train, project=project, sha=sha)
    wf = argo.wait_for_workflow(sha)
    name, ns = wf["metadata"]["name"], wf["metadata"]["namespace"]
    r = httpx.put(f"{sandbox.urls['argo']}/api/v1/workflows/{ns}/{name}/stop", json={},
                  headers={"Authorization": f"Bearer {os.environ['SANDBOX_ARGO_TOKEN']}"}, timeout=10)
    r.raise_for_status()
    thread.join(60)
    state = out[0]
    assert state.is_cancelled() and "stopped in Argo" in state.message
    assert argo.workflows(sha)[0]["status"]["message"] == "Stopped with strategy 'Stop'"
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "canceled"]


def test_timeout_terminates_the_workflow(argo, training_platform):
    from flows.training import argo_training_run
    from tasks.argo import parse_training_spec

    sha = _sha()
    spec = parse_training_spec(_spec("stuck", code={"url": "http://127.0.0.1/ml/x.git", "ref": "main"}))
    state = argo_training_run(spec, platform="sandbox-ci", repository="ml/x", commit=sha, timeout_s=1.0,
                              return_state=True, **FAST)
    assert state.is_failed() and "timed out after" in state.message
    wf = argo.workflows(sha)[0]
    assert wf["spec"]["shutdown"] == "Terminate" and wf["status"]["phase"] == "Failed"


def test_argo_down_at_submit_fails_the_run_and_the_status(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    argo.fault("down")  # every request, until healed
    state = _train(project, sha)
    argo.heal()
    assert state.is_failed()
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "failed"]
    assert argo.workflows(sha) == []


def test_argo_down_during_follow_is_retried(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    argo.fault("down", count=2, only="GET")  # the submit (POST) goes through, the next two reads fail
    state = _train(project, sha)
    assert state.is_completed(), state.message
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "success"]
    assert len(argo.workflows(sha)) == 1


def _push_image(registry_url: str, repository: str, tag: str) -> None:
    """What BuildKit's push does, in miniature: a layer, a config, a manifest."""
    import hashlib

    def blob(data: bytes) -> str:
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        r = httpx.post(f"{registry_url}/v2/{repository}/blobs/uploads/", timeout=10)
        location = r.headers["Location"]
        location = location if location.startswith("http") else registry_url + location
        sep = "&" if "?" in location else "?"
        httpx.put(f"{location}{sep}digest={digest}", content=data, timeout=10,
                  headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        return digest

    layer = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00"
    config = json.dumps({"architecture": "amd64", "os": "linux", "rootfs": {"type": "layers", "diff_ids": []},
                         "config": {}}).encode()
    manifest = {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
                "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config),
                           "size": len(config)},
                "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(layer),
                            "size": len(layer)}]}
    httpx.put(f"{registry_url}/v2/{repository}/manifests/{tag}", content=json.dumps(manifest), timeout=10,
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()


def test_build_training_image_builds_once_then_finds_it(argo, training_platform):
    from flows.training import build_training_image
    from tasks.registry import manifest_exists

    registry_url = training_platform.registry.url
    revision = _sha()
    repository = f"ai-base-{revision[:6]}"

    def buildkit_push():  # BuildKit in the workflow would push; the stand-in runs no containers
        wf = argo.wait_for_workflow(revision)
        _push_image(registry_url, repository, revision[:12])
        return wf

    thread, pushed = _in_thread(buildkit_push)
    state = build_training_image(context_url="http://127.0.0.1/platform/ai-platform-ops.git", revision=revision,
                                 repository=repository, platform="sandbox-ci", return_state=True, **FAST)
    thread.join(30)
    assert state.is_completed(), state.message
    host = registry_url.removeprefix("http://")
    assert state.result() == {"image": f"{host}/{repository}:{revision[:12]}", "built": True}
    wf = pushed[0]
    main = wf["spec"]["templates"][0]
    assert main["script"]["image"] == "moby/buildkit:rootless"
    assert "buildctl-daemonless.sh" in main["script"]["source"]

    again = build_training_image(context_url="http://127.0.0.1/platform/ai-platform-ops.git", revision=revision,
                                 repository=repository, platform="sandbox-ci", return_state=True, **FAST)
    assert again.result()["built"] is False
    assert len(argo.workflows(revision)) == 1

    from blocks.platform import Platform

    registry = Platform("sandbox-ci").registry()
    assert manifest_exists(registry, repository, revision[:12]) is True
    assert manifest_exists(registry, repository, "missing-tag") is False


def test_push_with_an_existing_image_trains_with_it(argo, gitlab, training_platform):
    registry_url = training_platform.registry.url
    spec = _spec("succeed", build={"repository": "ml/rl-robot"})
    del spec["image"]
    project, sha = _push(gitlab, spec)
    _push_image(registry_url, "ml/rl-robot", sha[:12])
    state = _train(project, sha)
    assert state.is_completed(), state.message
    wf = argo.workflows(sha)
    assert len(wf) == 1  # no build workflow: the image was there
    image = wf[0]["spec"]["templates"][0]["container"]["image"]
    assert image == f"{registry_url.removeprefix('http://')}/ml/rl-robot:{sha[:12]}"
