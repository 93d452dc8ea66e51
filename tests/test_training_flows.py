"""Training on Argo against the sandbox: the Argo stand-in, the GitLab API stand-in (its CI routes), the
sandbox's registry (Debian's docker-registry) and the session's Prefect server.

A push event (a `train_on_push` run) must leave the commit statuses pending -> running -> success
(or failed / canceled) on the stand-in GitLab and exactly one workflow on the stand-in Argo, even
when the first submit's response is lost. Polls are short here (0.2 s), the Argo stand-in advances
one step per 0.5 s.

Fault-and-retry tests read the Argo stand-in's request log to prove the fault fired and to count
the attempts. Secrets: the flows redact what they report with every secret of the platform's
blocks (`Platform.secrets()`), and the Argo / GitLab tasks redact what they return.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
import time
from typing import Any

import httpx
import pytest
import yaml

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]

FAST = {"poll_initial_s": 0.2, "poll_max_s": 0.5}
PLATFORM = "sandbox"  # the sandbox's platform.yaml (tests/conftest.py `training_platform`)


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

    def requests_since(self, t0: float, method: str, path: str) -> list[dict]:
        """The stand-in's log of API requests (faulted ones included) made at or after `t0`."""
        return [r for r in self.state()["requests"] if r["at"] >= t0 and r["method"] == method and r["path"] == path]

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
        httpx.post(f"{self.url}/control/projects", json={"path": path, "files": files, "commits": [sha]},
                   timeout=10).raise_for_status()

    def fault(self, kind: str, count: int) -> None:
        httpx.post(f"{self.url}/control/fault", json={"kind": kind, "count": count}, timeout=10).raise_for_status()

    def heal(self) -> None:
        httpx.post(f"{self.url}/control/heal", timeout=10).raise_for_status()

    def post_status(self, path: str, sha: str, **data) -> httpx.Response:
        from urllib.parse import quote

        return httpx.post(f"{self.url}/api/v4/projects/{quote(path, safe='')}/statuses/{sha}", json=data,
                          headers={"PRIVATE-TOKEN": os.environ["SANDBOX_GITLAB_TOKEN"]}, timeout=10)

    def state(self) -> dict:
        return httpx.get(f"{self.url}/control/state", timeout=10).json()

    def statuses(self, path: str, sha: str) -> list[dict]:
        return self.state()["statuses"].get(f"{path}@{sha}", [])

    def comments(self, path: str, sha: str) -> list[dict]:
        return self.state()["comments"].get(f"{path}@{sha}", [])


@pytest.fixture
def argo(training_platform):
    """The Argo stand-in the sandbox platform points at, healed before and after the test."""
    a = Argo(str(training_platform.argo.url).rstrip("/"))
    a.heal()
    yield a
    a.heal()


@pytest.fixture
def gitlab(training_platform):
    """The production GitLab's API stand-in (its CI routes), healed before and after the test."""
    g = GitLab(str(training_platform.gitlab.api_url).rstrip("/"))
    g.heal()
    yield g
    g.heal()


def _argo_get(argo, path: str) -> httpx.Response:
    return httpx.get(f"{argo.url}{path}", timeout=10,
                     headers={"Authorization": f"Bearer {os.environ['SANDBOX_ARGO_TOKEN']}"})


def _argo_log_lines(argo, ns: str, name: str) -> list[str]:
    """What Argo's /log endpoint streams now (live pods only)."""
    from tasks.argo_status import parse_log_stream

    return [line for _, line in parse_log_stream(_argo_get(argo, f"/api/v1/workflows/{ns}/{name}/log").text)]


def _failed_node(wf: dict) -> dict:
    return next(n for n in wf["status"]["nodes"].values() if n["type"] == "Pod" and n["phase"] == "Failed")


def _push(gitlab, spec, project="ml/rl-robot"):
    sha = _sha()
    gitlab.add_project(project, sha, spec)
    return project, sha


def _train(project, sha, platform=PLATFORM, **kw):
    from flows.training import train_on_push

    return train_on_push(project=project, commit_sha=sha, platform=platform, return_state=True,
                         **({"ref": "main"} | FAST | kw))


def _secret_values() -> list[str]:
    return [os.environ["SANDBOX_ARGO_TOKEN"], os.environ["SANDBOX_GITLAB_TOKEN"]]


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
    from prefect.logging.handlers import APILogHandler

    await APILogHandler.aflush()  # logs are sent in batches: send what is still queued
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


def test_push_trains_once_even_when_the_first_submit_response_is_lost(argo, gitlab, training_platform):
    project, sha = _push(gitlab, _spec("succeed"))
    t0 = time.time()
    argo.fault("lose-create-response")
    state = _train(project, sha)
    assert state.is_completed(), state.message

    # the fault fired: the first create was stored but its answer lost; the one retry got 409 and adopted
    assert argo.state()["faults"] == {}
    assert len(argo.requests_since(t0, "POST", f"/api/v1/workflows/{training_platform.argo.namespace}")) == 2
    submits = _task_runs(_flow_run_of(sha, "argo-training-run").id, "submit-argo-workflow")
    assert [(r.run_count, r.state.type.value) for r in submits] == [(2, "COMPLETED")]

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
        assert secret not in text
    outputs = _outputs(state)
    assert wf["metadata"]["name"] in outputs
    for secret in _secret_values():
        assert secret not in outputs

    note = gitlab.comments(project, sha)[-1]["note"]
    assert "training succeeded" in note and wf["metadata"]["name"] in note


def test_failed_training_reports_argo_message_and_logs_without_secrets(argo, gitlab):
    """podGC OnPodCompletion deletes the failed pod before the flow asks: its log comes from the archive."""
    project, sha = _push(gitlab, _spec("fail"))
    t0 = time.time()
    state = _train(project, sha, merge_request_iid="7")
    assert state.is_failed()
    assert "failed: child" in state.message  # Argo's message
    wf = argo.workflows(sha)[0]
    ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
    assert wf["spec"]["podGC"] == {"strategy": "OnPodCompletion"} and wf["spec"]["archiveLogs"] is True
    assert argo.state()["pods"][f"{ns}/{name}"] == []  # every pod is gone
    assert _argo_log_lines(argo, ns, name) == []  # so the live log endpoint has nothing
    assert [r["path"].split("/")[-1] for r in argo.state()["requests"]
            if r["at"] >= t0 and r["path"].startswith(f"/artifact-files/{ns}/workflows/{name}/")] == ["main-logs"]

    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "failed"]
    assert len(argo.workflows(sha)) == 1
    mr_notes = gitlab.state()["mr_notes"][f"{project}!7"]
    note = mr_notes[-1]["body"]
    from sandbox.argo import leaked_token

    leak = leaked_token(name)  # the token-shaped value the failing step printed
    assert "CUDA out of memory" in note and leak not in note and "***" in note

    outputs = _outputs(state)
    assert "CUDA out of memory" in outputs  # the failed step's log reached the flow log / artifact
    assert leak not in outputs
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


def _task_runs(flow_run_id, task_name: str) -> list:
    """The runs of one task in one flow run, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted((r for r in runs if r.name.startswith(f"{task_name}-")), key=lambda r: r.expected_start_time)


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


def test_timeout_terminates_the_workflow(argo):
    from flows.training import argo_training_run
    from tasks.training_spec import parse_training_spec

    sha = _sha()
    spec = parse_training_spec(_spec("stuck", code={"url": "http://127.0.0.1/ml/x.git", "ref": "main"}))
    state = argo_training_run(spec, platform=PLATFORM, repository="ml/x", commit=sha, timeout_s=1.0,
                              return_state=True, **FAST)
    assert state.is_failed() and "timed out after" in state.message
    wf = argo.workflows(sha)[0]
    assert wf["spec"]["shutdown"] == "Terminate" and wf["status"]["phase"] == "Failed"


def test_argo_down_at_submit_fails_the_run_and_the_status(argo, gitlab, training_platform):
    from tasks._retry import TRANSIENT_RETRIES

    project, sha = _push(gitlab, _spec("succeed"))
    t0 = time.time()
    argo.fault("down")  # every request, until healed
    state = _train(project, sha)
    argo.heal()
    assert state.is_failed()
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "failed"]
    assert argo.workflows(sha) == []
    # the fault fired on every attempt: the submit and its retries, no more, and nothing after them
    ns = training_platform.argo.namespace
    assert len(argo.requests_since(t0, "POST", f"/api/v1/workflows/{ns}")) == 1 + TRANSIENT_RETRIES["retries"]
    assert [r for r in argo.state()["requests"] if r["at"] >= t0 and r["method"] != "POST"] == []
    submits = _task_runs(_flow_run_of(sha, "argo-training-run").id, "submit-argo-workflow")
    assert [(r.run_count, r.state.type.value) for r in submits] == [(1 + TRANSIENT_RETRIES["retries"], "FAILED")]


def test_argo_down_during_follow_is_retried(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    t0 = time.time()
    argo.fault("down", count=2, only="GET")  # the submit (POST) goes through, the next two reads fail
    state = _train(project, sha)
    assert state.is_completed(), state.message
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "success"]
    workflows = argo.workflows(sha)
    assert len(workflows) == 1
    # the fault fired twice, both on the first read: that poll took 3 attempts, any later one took 1
    assert argo.state()["faults"] == {}
    ns, name = workflows[0]["metadata"]["namespace"], workflows[0]["metadata"]["name"]
    polls = _task_runs(_flow_run_of(sha, "argo-training-run").id, "read-argo-workflow")
    assert [r.run_count for r in polls] == [3] + [1] * (len(polls) - 1)
    assert len(argo.requests_since(t0, "GET", f"/api/v1/workflows/{ns}/{name}")) == len(polls) + 2


def _push_image(registry_url: str, repository: str, tag: str) -> None:
    from sandbox.registry import push_image

    push_image(registry_url, repository, tag)


def test_build_training_image_builds_once_then_finds_it(argo, training_platform):
    """The BuildKit step pushes to the real registry (the Argo stand-in plays the step's push)."""
    from flows.training import build_training_image
    from tasks.registry import check_manifest

    registry_url = training_platform.registry.url
    revision = _sha()
    repository = f"ai-base-{revision[:6]}"
    state = build_training_image(context_url="http://127.0.0.1/platform/ai-platform-ops.git", revision=revision,
                                 repository=repository, platform=PLATFORM, return_state=True, **FAST)
    assert state.is_completed(), state.message
    host = registry_url.removeprefix("http://")
    assert state.result() == {"image": f"{host}/{repository}:{revision[:12]}", "built": True}
    wf = argo.workflows(revision)[0]
    main = wf["spec"]["templates"][0]
    assert main["script"]["image"] == "moby/buildkit:rootless"
    assert "buildctl-daemonless.sh" in main["script"]["source"]
    assert "registry.insecure=true" in main["script"]["source"]  # the sandbox registry is plain http

    again = build_training_image(context_url="http://127.0.0.1/platform/ai-platform-ops.git", revision=revision,
                                 repository=repository, platform=PLATFORM, return_state=True, **FAST)
    assert again.result()["built"] is False
    assert len(argo.workflows(revision)) == 1

    from blocks.platform import Platform

    registry = Platform(PLATFORM).registry()
    assert check_manifest.fn(registry, repository, revision[:12]) is True
    assert check_manifest.fn(registry, repository, "missing-tag") is False


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


# --- secrets in what Argo and GitLab answer ---------------------------------------------------------

# A line fragment the Argo stand-in's failing pod prints (sandbox/argo.py). Here it plays a secret that
# the platform holds (its registry password): the redaction must hide it by value, not by its shape.
LOGGED_SECRET = "legged_gym/scripts/train.py"


@pytest.fixture
def leaky_platform(training_platform, monkeypatch) -> str:
    """The sandbox platform under another name, whose registry password is printed by the stand-in's failing pod."""
    from blocks.config import parse_platform_config
    from blocks.load import load_blocks

    monkeypatch.setenv("SANDBOX_CI_LEAK_PASSWORD", LOGGED_SECRET)
    data = training_platform.model_dump(mode="json", exclude_none=True)
    data["name"] = "sandbox-leak"
    data["registry"] |= {"username": "ci", "password": {"env": "SANDBOX_CI_LEAK_PASSWORD"}}
    load_blocks(parse_platform_config(data, "leaky-platform"))
    return data["name"]


def test_a_platform_secret_in_a_pod_log_reaches_no_result_artifact_log_or_note(argo, gitlab, leaky_platform):
    project, sha = _push(gitlab, _spec("fail"))
    state = _train(project, sha, platform=leaky_platform, merge_request_iid="3")
    assert state.is_failed()

    # the secret is really in the failed pod's log, as Argo serves it (archived: the pod is gone)
    wf = argo.workflows(sha)[0]
    ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
    raw = _argo_get(argo, f"/artifact-files/{ns}/workflows/{name}/{_failed_node(wf)['id']}/outputs/main-logs").text
    assert LOGGED_SECRET in raw

    # ... and nowhere in what the runs report: results, logs, the summary artifact, the note
    result = state.result(raise_on_failure=False)
    assert result["failed_steps"] and "CUDA out of memory" in result["failed_steps"][0]["log_tail"]
    assert LOGGED_SECRET not in json.dumps(result)
    training = _flow_run_of(sha, "argo-training-run")
    assert LOGGED_SECRET not in (training.state.message or "")
    outputs = _outputs(state)
    assert "failed step run-rl-demo" in outputs  # the flow log that carries the failed step's log tail
    assert "CUDA out of memory" in outputs and 'File \\"***\\", line 42' in outputs
    assert LOGGED_SECRET not in outputs
    note = gitlab.state()["mr_notes"][f"{project}!3"][-1]["body"]
    assert 'File "***", line 42' in note and LOGGED_SECRET not in note
    assert all(LOGGED_SECRET not in (s["description"] or "") for s in gitlab.statuses(project, sha))


class _Canned:
    """An HTTP server on loopback that answers every request with `answer` and records each request."""

    def __init__(self):
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        canned = self
        self.answer: tuple[int, Any] = (200, {})
        self.received: list[dict] = []

        class Handler(BaseHTTPRequestHandler):
            def _any(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length).decode() if length else ""
                canned.received.append({"method": self.command, "path": self.path, "body": body})
                status, payload = canned.answer
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = do_PUT = _any  # noqa: N815

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()


@pytest.fixture
def canned():
    server = _Canned()
    yield server
    server.server.shutdown()
    server.server.server_close()


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_argo_tasks_return_and_raise_no_secret(canned):
    from blocks.connections import ArgoServer
    from tasks.argo import ArgoAPIError, read_step_log, read_workflow
    from tasks.argo_status import FailedStep
    from tasks.redact import Redactor

    secret = f"platform-secret-{secrets.token_hex(8)}"
    argo = ArgoServer(url=canned.url, namespace="ml", token=f"argo-{secrets.token_hex(8)}")
    redactor = Redactor.of([secret, argo.token.get_secret_value()])

    pat = f"glpat-{secrets.token_hex(10)}"  # GitLab's PAT shape, caught by the pattern without being a known secret
    lines = [f"using the password {secret}", f"AUTH_URL is http://oauth2:{pat}@gitlab/x.git",
             "RuntimeError: CUDA out of memory"]
    canned.answer = 200, "".join(json.dumps({"result": {"content": line, "podName": "wf-1-run-1"}}) + "\n"
                                 for line in lines).encode()
    text = read_step_log(argo, "ml", "wf-1", FailedStep("run", "", "wf-1-run-1"), redactor=redactor)
    assert text == "using the password ***\nAUTH_URL is http://***:***@gitlab/x.git\nRuntimeError: CUDA out of memory"

    canned.answer = 403, {"code": 7, "message": f"the service account with {secret} may not get workflows"}
    before = len(canned.received)
    state = read_workflow(argo, "ml", "wf-1", redactor=redactor, return_state=True)
    assert state.is_failed()
    with pytest.raises(ArgoAPIError, match=r"status code 403 .*the service account with \*\*\* may not") as err:
        state.result()
    assert err.value.status_code == 403 and secret not in str(err.value) and secret not in state.message
    assert len(canned.received) - before == 1  # a 403 is not transient: one attempt, no retry


@pytest.mark.usefixtures("prefect_server")
@pytest.mark.filterwarnings("ignore:Logger 'prefect.task_runs' attempted to send logs")
def test_gitlab_tasks_post_and_raise_no_secret(canned):
    import gitlab as gl

    from tasks.gitlab_ci import post_note, read_repository_file, set_commit_status
    from tasks.redact import Redactor

    secret = f"platform-secret-{secrets.token_hex(8)}"
    client = gl.Gitlab(canned.url, private_token=f"gitlab-{secrets.token_hex(8)}", timeout=5)
    redactor = Redactor.of([secret])

    canned.answer = 201, {"id": 1}
    pat = f"glpat-{secrets.token_hex(10)}"  # GitLab's PAT shape, caught by the pattern without being a known secret
    where = post_note(client, "ml/x", "0123abcd", f"log tail:\n{secret}\n{pat}", 7,
                      redactor=redactor)
    assert where == "ml/x!7"
    posted = json.loads(canned.received[-1]["body"])
    assert canned.received[-1]["path"] == "/api/v4/projects/ml%2Fx/merge_requests/7/notes"
    assert posted == {"body": "log tail:\n***\n***"}
    set_commit_status(client, "ml/x", "0123abcd", "failed", ref="main", name="aiplatform/train", target_url=None,
                      description=f"training failed: {secret}", redactor=redactor)
    assert json.loads(canned.received[-1]["body"])["description"] == "training failed: ***"

    canned.answer = 403, {"message": f"403 Forbidden - {secret} lacks read_repository"}
    before = len(canned.received)
    with pytest.raises(gl.exceptions.GitlabGetError, match=r"403: 403 Forbidden - \*\*\* lacks") as err:
        read_repository_file(client, "ml/x", ".aiplatform/train.yaml", "0123abcd", redactor=redactor)
    assert err.value.response_code == 403 and err.value.response_body is None and err.value.__cause__ is None
    assert secret not in str(err.value)
    assert len(canned.received) - before == 1  # a 403 is not transient: one attempt, no retry
