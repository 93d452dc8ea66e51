"""The training spec and its rendering with hera: pure, no Prefect, no network.

The seed workflow (fixtures/seed/argo-rl-prod.yml) is the reference: configs/training/rl-prod.yaml
must render to a schema-valid Workflow with the seed's resources, parameters (less the
credentials), exit handler, artifacts and pod spec patches.
"""

from __future__ import annotations

import json
import subprocess
import sys

import jsonschema
import pytest
import yaml

from tasks.argo import (
    TrainingSpecError,
    load_training_spec,
    load_training_spec_file,
    parse_log_stream,
    parse_status,
    pod_name,
    render_workflow,
    secrets_in,
    training_outcome,
    workflow_name,
    workflow_parameters,
)
from tests.conftest import CONTRACTS, FIXTURES, REPO

RL_PROD = REPO / "configs" / "training" / "rl-prod.yaml"
CREDENTIAL_PARAMS = {"GITHUB_NAME", "GITHUB_TOKEN", "GITLAB_NAME", "GITLAB_TOKEN"}


@pytest.fixture(scope="module")
def validator():
    schema = json.loads((CONTRACTS / "argo-workflows.schema.json").read_text())
    root = {"$ref": "#/definitions/io.argoproj.workflow.v1alpha1.Workflow", "definitions": schema["definitions"]}
    return jsonschema.validators.validator_for(schema)(root)


@pytest.fixture(scope="module")
def seed():
    return yaml.safe_load((FIXTURES / "argo-rl-prod.yml").read_text())


@pytest.fixture(scope="module")
def rendered():
    return render_workflow(load_training_spec_file(RL_PROD))


def _templates(wf):
    return {t["name"]: t for t in wf["spec"]["templates"]}


def _errors(validator, wf):
    return [f"{'.'.join(map(str, e.path))}: {e.message[:120]}" for e in validator.iter_errors(wf)]


def _quantities(resources):
    return {kind: {k: str(v) for k, v in values.items()} for kind, values in resources.items()}


def test_rl_prod_renders_a_schema_valid_workflow(validator, rendered):
    assert rendered["apiVersion"] == "argoproj.io/v1alpha1" and rendered["kind"] == "Workflow"
    assert _errors(validator, rendered) == []


def test_the_seed_itself_does_not_validate_which_is_why_it_is_rendered(validator, seed):
    # the seed writes GPU memory as a bare integer; a Kubernetes quantity is a string
    assert any("gpu-mem" in e for e in _errors(validator, seed))


def test_rl_prod_keeps_the_seed_resources_artifacts_and_pod_spec_patches(seed, rendered):
    seed_t, ours = _templates(seed), _templates(rendered)
    train_seed, train = seed_t["run-rl-prod"], ours["run-rl-prod"]
    assert _quantities(train["script"]["resources"]) == _quantities(train_seed["script"]["resources"])
    assert train["script"]["image"] == train_seed["script"]["image"]
    assert train["script"]["command"] == train_seed["script"]["command"] == ["bash"]
    assert train["outputs"] == train_seed["outputs"]
    assert yaml.safe_load(train["podSpecPatch"]) == yaml.safe_load(train_seed["podSpecPatch"])
    for key in ("entrypoint", "parallelism", "podGC", "imagePullSecrets", "onExit"):
        assert rendered["spec"][key] == seed["spec"][key], key
    assert rendered["metadata"] == {"name": "rl-prod", "namespace": "argo-job"}
    assert ours["main"]["steps"][0][0] == {"name": "run-rl-prod", "template": "run-rl-prod"}


def test_rl_prod_keeps_the_seed_exit_handler(seed, rendered):
    exit_name = seed["spec"]["onExit"]
    seed_h, ours = _templates(seed)[exit_name], _templates(rendered)[exit_name]
    assert rendered["spec"]["onExit"] == "handle-failure"
    assert ours["script"]["image"] == seed_h["script"]["image"]
    assert json.loads(ours["podSpecPatch"]) == json.loads(seed_h["podSpecPatch"])
    assert '"{{workflow.status}}" == "Failed"' in ours["script"]["source"]
    assert "exit 1" in ours["script"]["source"]


def test_rl_prod_keeps_the_seed_parameters_but_no_credentials(seed, rendered):
    seed_params = {p["name"]: str(p["value"]).strip() for p in seed["spec"]["arguments"]["parameters"]}
    ours = workflow_parameters(rendered)
    assert {k: v for k, v in seed_params.items() if k not in CREDENTIAL_PARAMS} == \
        {k: v for k, v in ours.items() if k in seed_params}
    assert not CREDENTIAL_PARAMS & set(ours)
    assert secrets_in(rendered, []) == []
    # the clone credentials are references to a Kubernetes secret, read by Argo's git artifact
    git = _templates(rendered)["run-rl-prod"]["inputs"]["artifacts"][0]["git"]
    assert git["usernameSecret"] == {"name": "rl-code-clone", "key": "username"}
    assert git["passwordSecret"] == {"name": "rl-code-clone", "key": "password"}
    assert "TOKEN" not in json.dumps(rendered)


def test_render_cli_prints_the_workflow(rendered):
    out = subprocess.run([sys.executable, "-m", "tasks.argo", "render", str(RL_PROD)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == rendered
    bad = subprocess.run([sys.executable, "-m", "tasks.argo", "render", str(FIXTURES / "argo-rl-prod.yml")],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "unknown field" in bad.stderr


MINIMAL = """
name: demo
image: registry.example/ai-base:v1
command: [python, train.py]
resources: {cpu: 2, memory: 8Gi, gpu: {count: 1}}
"""


@pytest.mark.parametrize("gpu, expected", [
    ({"count": 2}, {"nvidia.com/gpu": "2"}),
    ({"memory": 20000}, {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "20000"}),
    ({"count": 2, "memory": 10000}, {"nvidia.com/gpu": "2", "nvidia.com/gpumem": "10000"}),
    ({"memory": 44, "memory_resource": "aliyun.com/gpu-mem"}, {"aliyun.com/gpu-mem": "44"}),
])
def test_gpu_requests_whole_or_shared(validator, gpu, expected):
    data = yaml.safe_load(MINIMAL) | {"resources": {"cpu": "2", "memory": "8Gi", "gpu": gpu}}
    wf = render_workflow(load_training_spec(yaml.safe_dump(data)))
    res = _templates(wf)["run-demo"]["container"]["resources"]
    assert res["limits"] == {**expected, "cpu": "2", "memory": "8Gi"} and res["requests"] == res["limits"]
    assert _errors(validator, wf) == []


def test_full_spec_renders_every_field(validator):
    data = yaml.safe_load(MINIMAL) | {
        "node_selector": {"nvidia.com/gpu.product": "H100"},
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        "active_deadline_seconds": 72000, "pod_gc": "OnWorkflowSuccess",
        "secret_env": [{"name": "WANDB_API_KEY", "secret": "wandb", "key": "api-key"}],
        "env": {"EPOCHS": 10}, "parameters": {"LR": 0.001},
        "code": {"url": "https://gitlab.example/ml/rl.git", "ref": "0123abcd", "credentials": {"secret": "clone"}},
        "retry": {"limit": 3, "policy": "OnTransientError"},
        "exit_handler": {"script": "echo done"},
    }
    wf = render_workflow(load_training_spec(yaml.safe_dump(data)), name="demo-1", namespace="ml",
                         labels={"team": "rl"})
    assert _errors(validator, wf) == []
    spec, train = wf["spec"], _templates(wf)["run-demo"]
    assert spec["activeDeadlineSeconds"] == 72000 and spec["podGC"] == {"strategy": "OnWorkflowSuccess"}
    assert spec["nodeSelector"] == {"nvidia.com/gpu.product": "H100"} and spec["tolerations"][0]["operator"] == "Exists"
    assert spec["onExit"] == "exit-handler" and wf["metadata"]["labels"] == {"team": "rl"}
    assert train["retryStrategy"]["retryPolicy"] == "OnTransientError" and train["retryStrategy"]["limit"] == "3"
    env = {e["name"]: e for e in train["container"]["env"]}
    assert env["EPOCHS"]["value"] == "10"
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert workflow_parameters(wf) == {"LR": "0.001"}


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"GITLAB_TOKEN": "x"}}, "looks like a credential"),
    ({"parameters": {"CLONE": "glpat-abcdefghijklmnop"}}, "looks like a token"),
    ({"parameters": {"REPO": "https://user:pw@gitlab.example/x.git"}}, "looks like a token or a URL"),
    ({"env": {"DB_PASSWORD": "x"}}, "looks like a credential"),
    ({"code": {"url": "https://oauth2:tok@gitlab.example/x.git"}}, "carries credentials"),
    ({"script": "echo"}, "exactly one of 'command'"),
    ({"resources": {"cpu": "2", "memory": "8Gi", "gpu": {"count": 1, "memory": 4,
                                                        "memory_resource": "aliyun.com/gpu-mem"}}}, "requested alone"),
    ({"resources": {"cpu": "lots", "memory": "8Gi"}}, "resources.cpu: expected a Kubernetes quantity"),
    ({"name": "Bad_Name"}, "name: expected a lower-case DNS label"),
    ({"gpus": 2}, "gpus: unknown field"),
])
def test_invalid_specs_name_the_field(change, message):
    data = yaml.safe_load(MINIMAL) | change
    with pytest.raises(TrainingSpecError) as err:
        load_training_spec(yaml.safe_dump(data), "train.yaml")
    assert message in str(err.value)
    assert "glpat-abcdefghijklmnop" not in str(err.value) and "pw@" not in str(err.value)


def test_invalid_yaml_says_where():
    with pytest.raises(TrainingSpecError, match="not valid YAML at line 2"):
        load_training_spec("name: x\n  bad: [", "train.yaml")


def test_workflow_name_is_deterministic_per_repository_commit_spec_and_attempt():
    spec = load_training_spec(MINIMAL)
    other = load_training_spec(MINIMAL.replace("cpu: 2", "cpu: 4"))
    a = workflow_name(spec, "ml/rl", "0123abcd", "1")
    assert a == workflow_name(spec, "ml/rl", "0123abcd", "1")
    assert len({a, workflow_name(spec, "ml/rl", "0123abce", "1"), workflow_name(spec, "ml/rl", "0123abcd", "2"),
                workflow_name(other, "ml/rl", "0123abcd", "1"), workflow_name(spec, "ml/x", "0123abcd", "1")}) == 5
    assert a.startswith("demo-") and len(a) <= 63


def _wf(phase, message="", nodes=None, progress=None, shutdown=None):
    wf = {"metadata": {"name": "demo-1", "namespace": "ml"}, "spec": {},
          "status": {"phase": phase, "message": message, "nodes": nodes or {}}}
    if progress:
        wf["status"]["progress"] = progress
    if shutdown:
        wf["spec"]["shutdown"] = shutdown
    return wf


def test_status_progress_and_failed_steps():
    nodes = {
        "demo-1": {"id": "demo-1", "type": "Steps", "phase": "Failed"},
        "demo-1-111": {"id": "demo-1-111", "type": "Pod", "templateName": "run-demo", "displayName": "run-demo",
                       "phase": "Failed", "message": "Error (exit code 1)"},
        "demo-1-222": {"id": "demo-1-222", "type": "Pod", "templateName": "exit-handler", "phase": "Succeeded"},
    }
    st = parse_status(_wf("Failed", "child failed", nodes))
    assert (st.steps_done, st.steps_total, st.terminal) == (2, 2, True)
    assert [(f.name, f.pod, f.message) for f in st.failed_steps] == [
        ("run-demo", "demo-1-run-demo-111", "Error (exit code 1)")]
    assert parse_status(_wf("Running", progress="1/4")).percent == 25.0
    # a succeeded workflow is done even when Argo's progress counts skipped steps as not done
    assert parse_status(_wf("Succeeded", progress="1/2")).percent == 100.0
    assert pod_name("demo-1", {"type": "Steps", "id": "demo-1"}) is None


@pytest.mark.parametrize("wf, kwargs, state, text", [
    (_wf("Succeeded"), {}, "Completed", "succeeded"),
    (_wf("Failed", "child 'x' failed"), {}, "Failed", "failed: child 'x' failed"),
    (_wf("Error", "pod deleted"), {}, "Failed", "error: pod deleted"),
    (_wf("Failed", "Stopped with strategy 'Stop'", shutdown="Stop"), {}, "Cancelled", "stopped in Argo"),
    (_wf("Failed", "Stopped with strategy 'Stop'"), {"cancelled": True}, "Cancelled", "cancelled in Prefect"),
    (_wf("Failed", "Stopped with strategy 'Terminate'"), {"timed_out_s": 30.0}, "Failed", "timed out after 30s"),
    (_wf("Running"), {"cancelled": True}, "Cancelled", "cancelled in Prefect"),
])
def test_outcome_maps_argo_phases_to_prefect_states(wf, kwargs, state, text):
    outcome = training_outcome(parse_status(wf), **kwargs)
    assert outcome.state == state and text in outcome.message


def test_log_stream_is_one_json_object_per_line():
    body = '{"result":{"content":"a","podName":"p1"}}\n\n{"result":{"content":"b","podName":"p1"}}\nnot json\n'
    assert parse_log_stream(body) == [("p1", "a"), ("p1", "b")]


def test_secrets_in_finds_values_anywhere():
    wf = render_workflow(load_training_spec(MINIMAL.replace("python, train.py", "python, train.py, s3cr3t-value")))
    assert secrets_in(wf, ["s3cr3t-value"]) == ["secret #1"]
    assert secrets_in(wf, ["other-value"]) == []
    assert secrets_in(wf, ["s3c"]) == []  # too short to be a secret (tasks.redact.MIN_SECRET_LEN)


def test_image_build_spec_is_rootless_buildkit_without_secrets(validator):
    from flows.training import build_spec

    spec = build_spec("127.0.0.1:5000/ai-base:abc123", "http://gitlab.example/platform/ops.git", "abc123",
                      "configs/images/Dockerfile", git_secret="clone", insecure_registry=True)
    wf = render_workflow(spec, name="build-image-1", namespace="argo")
    assert _errors(validator, wf) == []
    main = _templates(wf)["run-build-image"]
    script = main["script"]
    assert script["image"] == "moby/buildkit:rootless"
    assert "buildctl-daemonless.sh build --frontend dockerfile.v0" in script["source"]
    assert "--local context=/workspace/src --local dockerfile=/workspace/src/configs/images" in script["source"]
    assert "--opt filename=Dockerfile" in script["source"]
    assert "name=127.0.0.1:5000/ai-base:abc123,push=true,registry.insecure=true" in script["source"]
    env = {e["name"]: e for e in script["env"]}
    assert env["BUILDKITD_FLAGS"]["value"] == "--oci-worker-no-process-sandbox"
    assert env["REGISTRY_AUTH"]["valueFrom"]["secretKeyRef"] == {"name": "registry-push-credentials",
                                                                "key": ".dockerconfigjson"}
    patch = json.loads(main["podSpecPatch"])
    assert patch["containers"][0]["securityContext"]["runAsUser"] == 1000
    assert patch["containers"][0]["securityContext"]["seccompProfile"] == {"type": "Unconfined"}
    assert "arguments" not in wf["spec"]
    with pytest.raises(ValueError, match=r"must stay inside the repository \(no '\.\.'\)"):
        build_spec("r/x:1", "http://g/x.git", "abc", "../Dockerfile")


def test_dockerfile_and_ci_template_exist():
    dockerfile = (REPO / "configs" / "images" / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM " in dockerfile
    ci = yaml.safe_load((REPO / "configs" / "gitlab-ci" / "train.gitlab-ci.yml").read_text())
    script = "\n".join(ci["aiplatform-train"]["script"])
    assert "prefect deployment run 'train-on-push/train-on-push'" in script
    for var in ("$CI_PROJECT_PATH", "$CI_COMMIT_SHA", "CI_COMMIT_REF_NAME"):
        assert var in script
    assert "TOKEN" not in script


def test_deployments_of_the_training_flows():
    import importlib

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for name, flow_name in (("train-on-push", "train-on-push"), ("build-training-image", "build-training-image")):
        module, _, attr = deployments[name]["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        assert flow.name == flow_name
