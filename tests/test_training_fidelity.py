"""Issue 11: training runs that hold up on a real Argo and a real GitLab, checked against the stand-ins.

- the stand-ins answer as Argo's server and GitLab's API do (stop of a finished workflow: 500/code 13;
  /log reads live pods only; podGC; archived logs; GitLab's commit status state machine and its 409);
- a failed step's last log lines reach the commit note whatever podGC did (archive, kept pods, or a
  clear "logs unavailable" with the reason);
- one workflow per (project, commit, spec), `retrain` for a deliberate second one;
- numeric refs; 409 lock conflicts retried; spec errors that name the key; resources the platform offers.
"""

from __future__ import annotations

import os
import secrets
import time

import httpx
import pytest

from tests.test_training_flows import (
    FAST,
    PLATFORM,
    _argo_get,
    _argo_log_lines,
    _failed_node,
    _push,
    _sha,
    _spec,
    _train,
    argo,  # noqa: F401 - fixture
    gitlab,  # noqa: F401 - fixture
)

pytestmark = [pytest.mark.sandbox, pytest.mark.prefect]


def _platform_variant(training_platform, name: str, **argo) -> str:
    """The sandbox platform under another name with other `argo` settings (blocks loaded)."""
    from blocks.config import parse_platform_config
    from blocks.load import load_blocks

    data = training_platform.model_dump(mode="json", exclude_none=True)
    data["name"] = name
    data["argo"] |= argo
    load_blocks(parse_platform_config(data, name))
    return name


# --- the Argo stand-in answers as the server does -------------------------------------------------------


def test_stop_of_a_finished_workflow_is_500_code_13_and_the_task_takes_it_as_ended(argo, gitlab):
    from blocks.platform import Platform
    from tasks.argo import stop_workflow
    from tasks.redact import Redactor

    project, sha = _push(gitlab, _spec("succeed"))
    assert _train(project, sha).is_completed()
    wf = argo.workflows(sha)[0]
    ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
    r = httpx.put(f"{argo.url}/api/v1/workflows/{ns}/{name}/stop", json={}, timeout=10,
                  headers={"Authorization": f"Bearer {os.environ['SANDBOX_ARGO_TOKEN']}"})
    assert r.status_code == 500
    assert r.json() == {"code": 13, "message": f'cannot shutdown a completed workflow: workflow: "{name}", '
                                               f'namespace: "{ns}"'}
    t0 = time.time()
    done = stop_workflow.fn(Platform(PLATFORM).argo(), ns, name, "stop", redactor=Redactor())
    assert done["status"]["phase"] == "Succeeded"
    assert [r["method"] for r in argo.state()["requests"] if r["at"] >= t0] == ["GET"]  # read, no shutdown


def test_pods_go_as_podgc_says_and_logs_with_them(argo, gitlab, training_platform):
    """OnPodSuccess keeps the failed pod (its log is live); OnPodCompletion deletes it (the live log is empty,
    the archived one is served from the artifact repository)."""
    keep = _platform_variant(training_platform, "sandbox-noarchive", archive_logs=False, keep_failed_pods_for="0s")
    project, sha = _push(gitlab, _spec("fail", pod_gc="OnPodSuccess"))
    assert _train(project, sha, platform=keep).is_failed()
    wf = argo.workflows(sha)[0]
    ns, name = wf["metadata"]["namespace"], wf["metadata"]["name"]
    live = argo.state()["pods"][f"{ns}/{name}"]
    assert len(live) == 1 and "run-rl-demo" in live[0]  # the failed pod stays; the exit handler's is gone
    assert "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in _argo_log_lines(argo, ns, name)
    assert "outputs" not in _failed_node(wf)  # archiveLogs off: nothing archived
    r = _argo_get(argo, f"/artifact-files/{ns}/workflows/{name}/{_failed_node(wf)['id']}/outputs/main-logs")
    assert r.status_code == 500 and "artifact not found" in r.text


def test_failed_step_log_reaches_the_note_from_a_pod_kept_by_delete_delay(argo, gitlab, training_platform):
    """No artifact repository: podGC OnPodCompletion with deleteDelayDuration keeps the pod for the flow."""
    kept = _platform_variant(training_platform, "sandbox-keep", archive_logs=False, keep_failed_pods_for="10m")
    project, sha = _push(gitlab, _spec("fail"))
    assert _train(project, sha, platform=kept).is_failed()
    wf = argo.workflows(sha)[0]
    assert wf["spec"]["podGC"] == {"strategy": "OnPodCompletion", "deleteDelayDuration": "10m"}
    assert "archiveLogs" not in wf["spec"]
    note = gitlab.comments(project, sha)[-1]["note"]
    assert "RuntimeError: CUDA out of memory" in note and "logs unavailable" not in note


def test_without_archive_or_delay_the_note_says_why_the_log_is_gone(argo, gitlab, training_platform):
    gone = _platform_variant(training_platform, "sandbox-nolog", archive_logs=False, keep_failed_pods_for="0s")
    project, sha = _push(gitlab, _spec("fail"))
    state = _train(project, sha, platform=gone)
    assert state.is_failed()
    wf = argo.workflows(sha)[0]
    pod = [p for p in state.result(raise_on_failure=False)["failed_steps"]][0]["pod"]
    assert argo.state()["pods"][f"{wf['metadata']['namespace']}/{wf['metadata']['name']}"] == []
    note = gitlab.comments(project, sha)[-1]["note"]
    assert f"logs unavailable: pod {pod} no longer exists (podGC OnPodCompletion deleted it)" in note
    assert "set argo.archive_logs" in note


# --- one workflow per (project, commit, spec) -----------------------------------------------------------


def test_a_second_pipeline_for_the_same_commit_reports_the_first_workflow_and_retrain_trains_again(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    first = _train(project, sha, ref="feature")  # the branch pipeline
    again = _train(project, sha, ref="v1.0", merge_request_iid="4")  # a tag on the trained commit / an MR pipeline
    assert first.is_completed() and again.is_completed()
    workflows = argo.workflows(sha)
    assert len(workflows) == 1
    assert again.result()["adopted"] is True and again.result()["workflow"] == workflows[0]["metadata"]["name"]
    mr_note = gitlab.state()["mr_notes"][f"{project}!4"][-1]["body"]
    assert "trained already" in mr_note and "AIPLATFORM_RETRAIN" in mr_note

    retrained = _train(project, sha, retrain="2")
    assert retrained.is_completed() and retrained.result()["adopted"] is False
    names = {wf["metadata"]["name"] for wf in argo.workflows(sha)}
    assert len(names) == 2
    assert {wf["metadata"]["annotations"].get("ai-platform-ops/attempt") for wf in argo.workflows(sha)} == {None, "2"}


def test_the_pushed_commit_is_trained_with_several_repositories(argo, gitlab):
    spec = _spec("succeed", code=[
        {"url": "http://gitlab.internal/ml/rl-robot.git", "ref": "master", "credentials": {"secret": "clone"}},
        {"name": "assets", "url": "https://github.com/org/assets.git", "ref": "v3", "path": "/workspace/assets"}])
    project, sha = _push(gitlab, spec)
    assert _train(project, sha).is_completed()
    git = {a["name"]: a["git"] for a in argo.workflows(sha)[0]["spec"]["templates"][0]["inputs"]["artifacts"]}
    assert git["code"]["repo"] == "http://gitlab.internal/ml/rl-robot.git" and git["code"]["revision"] == sha
    assert git["assets"] == {"repo": "https://github.com/org/assets.git", "revision": "v3"}  # public: no secret


# --- types, errors, GitLab's answers --------------------------------------------------------------------


@pytest.mark.parametrize("ref, status_ref", [(1.0, "main"), ("1.10", "1.10"), (2, "2")])
def test_numeric_refs_reach_the_flow_and_the_statuses(argo, gitlab, ref, status_ref):
    project, sha = _push(gitlab, _spec("succeed"))
    state = _train(project, sha, ref=ref)
    assert state.is_completed(), state.message
    statuses = gitlab.statuses(project, sha)
    assert [s["status"] for s in statuses] == ["pending", "running", "success"]
    # a float lost its text: the statuses go without a ref (GitLab then takes the project's default branch)
    assert {s["ref"] for s in statuses} == {status_ref}


def test_numeric_parameters_through_a_deployment_run(argo, gitlab):
    """`prefect deployment run --param ref=1.0` hands the flow a float: Prefect validates it against the
    flow's signature, and the run must not fail before a status is posted."""
    from prefect import flow as flow_decorator
    from prefect.exceptions import ParameterTypeError
    from prefect.flows import Flow

    from flows.training import train_on_push

    params = {"project": "ml/rl-robot", "commit_sha": _sha(), "ref": 1.0, "retrain": 3, "merge_request_iid": 5}
    @flow_decorator
    def str_only(ref: str = ""):  # what train_on_push's signature was: the run failed before any status
        pass

    with pytest.raises(ParameterTypeError, match="ref"):
        Flow.validate_parameters(str_only, {"ref": 1.0})
    validated = Flow.validate_parameters(train_on_push, params)
    assert {k: validated[k] for k in params} == params  # numbers stay numbers (as_text copes), none is refused


def test_a_409_lock_conflict_is_retried_with_backoff(argo, gitlab):
    project, sha = _push(gitlab, _spec("succeed"))
    gitlab.fault("status-lock", 2)  # the first status post and its first retry meet the lease
    t0 = time.time()
    state = _train(project, sha)
    assert state.is_completed(), state.message
    assert gitlab.state()["faults"] == {}
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "success"]
    posts = [p for p in gitlab.state()["status_posts"] if p["sha"] == sha]
    assert [p["state"] for p in posts] == ["pending", "pending", "pending", "running", "success"]
    assert posts[2]["at"] - posts[0]["at"] >= 0.25 + 0.5  # backed off
    assert posts[0]["at"] >= t0


def test_gitlab_status_state_machine(gitlab):
    project, sha = _push(gitlab, None)
    post = lambda state, **kw: gitlab.post_status(project, sha, state=state, name="ci/x", ref="main", **kw)  # noqa: E731
    assert post("pending").status_code == 201
    r = post("pending")
    assert r.status_code == 400 and r.json() == {"message": "Cannot transition status via :enqueue from :pending"}
    assert post("running").status_code == 201
    assert post("running").json() == {"message": "Cannot transition status via :run from :running"}
    assert post("success").status_code == 201
    assert post("success").status_code == 201  # a repeated final state is a new status: accepted
    assert post("failed").status_code == 201
    jobs = gitlab.state()["jobs"][f"{project}@{sha}"]  # GitLab moved one status, then made two new ones
    assert [s["status"] for s in jobs] == ["success", "success", "failed"]
    assert [s["status"] for s in gitlab.statuses(project, sha)] == ["pending", "running", "success", "success",
                                                                    "failed"]
    assert gitlab.post_status(project, "0" * 40, state="pending").json() == {"message": "404 Commit Not Found"}
    gitlab.fault("status-lock", 1)
    r = post("pending")
    assert r.status_code == 409 and r.json() == {"message": "Another update to this commit status is in progress"}


PW = secrets.token_hex(6)  # a password in a clone URL, fresh each run


@pytest.mark.parametrize("change, expected", [
    ({"parameters": {"GITLAB_TOKEN": "x"}}, "parameters: 'GITLAB_TOKEN' looks like a credential"),
    ({"code": {"url": f"ssh://git:{PW}@gitlab.example/ml/x.git"}}, "code[0].url: the URL carries credentials"),
    ({"resources": {"cpu": "2", "memory": "8Gi", "extended": {"nvidia.com/mig-7g.80gb": 1,
                                                              "amd.com/gpu": 1}}},
     "resources: amd.com/gpu is not offered by this platform"),
])
def test_spec_errors_reach_the_status_naming_the_key_without_the_secret(argo, gitlab, change, expected):
    project, sha = _push(gitlab, _spec(**change))
    state = _train(project, sha)
    assert state.is_failed()
    statuses = gitlab.statuses(project, sha)
    assert [s["status"] for s in statuses] == ["pending", "failed"]
    assert expected in statuses[-1]["description"], statuses[-1]["description"]
    assert PW not in statuses[-1]["description"] and "{key" not in statuses[-1]["description"]
    assert argo.workflows(sha) == []


def test_the_sandbox_training_project_trains(argo, gitlab, sandbox):
    """The project the demo pushes: its spec is valid and trains on the sandbox."""
    seeded = sandbox.extra["training_project"]
    state = _train(seeded["project"], seeded["commit_sha"], ref=seeded["ref"], retrain=_sha()[:8])
    assert state.is_completed(), state.message
    wf = [w for w in argo.workflows(seeded["commit_sha"]) if w["metadata"]["name"] == state.result()["workflow"]][0]
    spec = wf["spec"]
    assert {v["name"] for v in spec["volumes"]} == {"datasets", "dshm"}
    assert spec["templates"][0]["inputs"]["artifacts"][0]["git"]["revision"] == seeded["commit_sha"]
    assert FAST  # the polls are the tests' short ones
