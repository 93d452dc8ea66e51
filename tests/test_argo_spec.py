"""The training spec and its rendering with hera: pure, no Prefect, no network.

The seed workflow (fixtures/seed/argo-rl-prod.yml) is the reference: configs/training/rl-prod.yaml
must render to a schema-valid Workflow with the seed's resources, parameters (less the
credentials), exit handler, artifacts and pod spec patches.
"""

from __future__ import annotations

import json
import secrets
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import yaml

from tasks.argo_render import LogRetention, render_workflow, secrets_in, workflow_name, workflow_parameters
from tasks.argo_status import (
    Shutdown,
    logs_unavailable,
    parse_log_stream,
    parse_status,
    pod_name,
    training_outcome,
)
from tasks.training_spec import (
    TrainingSpecError,
    build_spec,
    load_training_spec,
    load_training_spec_file,
    parse_training_spec,
    pin_to_push,
    resource_problems,
)
from tests.conftest import CONTRACTS, FIXTURES, REPO

# credentials a spec must never carry, made fresh each run: the refusals and redactions below key on
# their shape and place, never on a known value
PW = secrets.token_hex(6)
PAT = f"glpat-{secrets.token_hex(10)}"

RL_PROD = REPO / "configs" / "training" / "rl-prod.yaml"
CREDENTIAL_PARAMS = {"GITHUB_NAME", "GITHUB_TOKEN", "GITLAB_NAME", "GITLAB_TOKEN"}
# echoed by the seed, never used to clone: the code is the git artifact's, named by the container's env
ECHO_PARAMS = {"CODE_URL", "VERSION_NAME"}


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
    assert {k: v for k, v in seed_params.items() if k not in CREDENTIAL_PARAMS | ECHO_PARAMS} == \
        {k: v for k, v in ours.items() if k in seed_params}
    assert not (CREDENTIAL_PARAMS | ECHO_PARAMS) & set(ours)
    env = {e["name"]: e.get("value") for e in _templates(rendered)["run-rl-prod"]["script"]["env"]}
    assert env == {"CODE_URL": seed_params["CODE_URL"], "CODE_REVISION": "HEAD"}
    assert secrets_in(rendered, []) == []
    # the clone credentials are references to a Kubernetes secret, read by Argo's git artifact
    git = _templates(rendered)["run-rl-prod"]["inputs"]["artifacts"][0]["git"]
    assert git["usernameSecret"] == {"name": "rl-code-clone", "key": "username"}
    assert git["passwordSecret"] == {"name": "rl-code-clone", "key": "password"}
    assert "TOKEN" not in json.dumps(rendered)


def test_render_cli_prints_the_workflow(rendered):
    out = subprocess.run([sys.executable, "-m", "tasks.argo_render", str(RL_PROD)], cwd=REPO,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert yaml.safe_load(out.stdout) == rendered
    bad = subprocess.run([sys.executable, "-m", "tasks.argo_render", str(FIXTURES / "argo-rl-prod.yml")],
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
    assert env["EPOCHS"]["value"] == "10" and env["CODE_REVISION"]["value"] == "0123abcd"
    assert env["WANDB_API_KEY"]["valueFrom"] == {"secretKeyRef": {"name": "wandb", "key": "api-key"}}
    assert workflow_parameters(wf) == {"LR": "0.001"}


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"GITLAB_TOKEN": "x"}}, "looks like a credential"),
    ({"parameters": {"CLONE": PAT}}, "looks like a token"),
    ({"parameters": {"REPO": f"https://user:{PW}@gitlab.example/x.git"}}, "looks like a token or a URL"),
    ({"env": {"DB_PASSWORD": "x"}}, "looks like a credential"),
    ({"code": {"url": f"https://oauth2:{PW}@gitlab.example/x.git"}}, "carries credentials"),
    ({"code": {"url": f"ssh://git:{PW}@gitlab.example/x.git"}}, "carries credentials"),
    ({"code": {"url": f"https://{PAT}@gitlab.example/x.git"}}, "carries credentials"),
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
    for secret in (PAT, PW):
        assert secret not in str(err.value)
    assert "{key" not in str(err.value)


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


CI_TEMPLATE = REPO / "configs" / "gitlab-ci" / "train.gitlab-ci.yml"


def test_dockerfile_exists():
    dockerfile = (REPO / "configs" / "images" / "Dockerfile").read_text()
    assert dockerfile.startswith("#") and "FROM " in dockerfile


def _run_ci_job(tmp_path, env: dict[str, str]) -> tuple[list[str], dict]:
    """Run the template's job script in bash with a `prefect` that records its argv and stdin; returns
    (argv, the parameters as Prefect's `deployment run` parses them: --params JSON, then --param)."""
    fake = tmp_path / "bin" / "prefect"
    fake.parent.mkdir(parents=True)
    fake.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {tmp_path}/argv\ncat > {tmp_path}/stdin\n')
    fake.chmod(0o755)
    script = "\n".join(yaml.safe_load(CI_TEMPLATE.read_text())["aiplatform-train"]["script"])
    run_env = {"PATH": f"{fake.parent}:{Path(sys.executable).parent}:/usr/bin:/bin", **env}
    out = subprocess.run(["bash", "-c", script], env=run_env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    argv = (tmp_path / "argv").read_text().splitlines()
    stdin = (tmp_path / "stdin").read_text()
    assert argv[argv.index("--params") + 1] == "-"
    return argv, json.loads(stdin)


def test_ci_job_passes_every_parameter_as_a_string(tmp_path):
    from prefect.cli._utilities import load_json_key_values

    argv, params = _run_ci_job(tmp_path, {"CI_PROJECT_PATH": "ml/rl", "CI_COMMIT_SHA": "1234567",
                                          "CI_COMMIT_REF_NAME": "1.10", "CI_MERGE_REQUEST_IID": "7"})
    assert argv[:3] == ["deployment", "run", "train-on-push/train-on-push"]
    assert params == {"project": "ml/rl", "commit_sha": "1234567", "ref": "1.10", "merge_request_iid": "7",
                      "retrain": ""}
    # what the template no longer does: Prefect parses `--param ref=1.10` as JSON, a float that lost its text
    assert load_json_key_values(["ref=1.10"], "parameter") == {"ref": 1.1}
    _, again = _run_ci_job(tmp_path / "x", {"CI_PROJECT_PATH": "ml/rl", "CI_COMMIT_SHA": "ab" * 20,
                                            "CI_COMMIT_REF_NAME": "main", "AIPLATFORM_RETRAIN": "2"})
    assert again["retrain"] == "2" and again["merge_request_iid"] == ""
    assert "TOKEN" not in CI_TEMPLATE.read_text().split("stages:")[1]


def _rule_matches(expr: str, env: dict[str, str]) -> bool:
    """GitLab's rules:if for the forms the template uses: $VAR, $VAR == "x", joined by && and ||."""
    def term(t: str) -> bool:
        t = t.strip()
        if "==" in t:
            var, value = (x.strip() for x in t.split("=="))
            return env.get(var.lstrip("$"), "") == value.strip('"')
        return bool(env.get(t.lstrip("$")))
    return any(all(term(t) for t in alt.split("&&")) for alt in expr.split("||"))


def _pipeline_runs(rules: list[dict], env: dict[str, str]) -> bool:
    for rule in rules:
        if _rule_matches(rule["if"], env):
            return rule.get("when", "always") != "never"
    return False


@pytest.mark.parametrize("env, runs", [
    # a push to a branch with an open merge request: GitLab creates both pipelines; only the MR one runs
    ({"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_BRANCH": "feat", "CI_OPEN_MERGE_REQUESTS": "ml/rl!7"}, False),
    ({"CI_PIPELINE_SOURCE": "merge_request_event", "CI_MERGE_REQUEST_IID": "7"}, True),
    ({"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_BRANCH": "main"}, True),  # no merge request
    ({"CI_PIPELINE_SOURCE": "push", "CI_COMMIT_TAG": "v1.0"}, True),
    ({"CI_PIPELINE_SOURCE": "web", "CI_COMMIT_BRANCH": "main"}, True),  # a deliberate re-run
    ({"CI_PIPELINE_SOURCE": "schedule", "CI_COMMIT_BRANCH": "main"}, False),
])
def test_workflow_rules_run_one_pipeline_per_push(env, runs):
    rules = yaml.safe_load(CI_TEMPLATE.read_text())["workflow"]["rules"]
    assert _pipeline_runs(rules, env) is runs


def test_deployments_of_the_training_flows():
    import importlib

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for name, flow_name in (("train-on-push", "train-on-push"), ("build-training-image", "build-training-image")):
        module, _, attr = deployments[name]["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        assert flow.name == flow_name


# --- issue 11: the pushed commit, typed resources, log retention, clear errors, the shutdown machine ------


def test_the_pushed_repository_is_cloned_at_the_pushed_commit_whatever_ref_the_spec_names():
    sha = "ab" * 20
    spec = load_training_spec(MINIMAL + """
code:
  - {url: "git@gitlab.example:ml/rl.git", ref: master, credentials: {secret: clone}}
  - {name: assets, url: "https://github.com/org/public-assets.git", ref: v2, path: /workspace/assets}
""")
    pinned = pin_to_push(spec, "ml/rl", "https://gitlab.example/ml/rl.git", sha)
    ours, public = pinned.code
    assert (ours.url, ours.ref) == ("git@gitlab.example:ml/rl.git", sha)  # the spec's URL, the pushed commit
    assert (public.url, public.ref, public.credentials) == ("https://github.com/org/public-assets.git", "v2", None)
    wf = render_workflow(pinned)
    arts = {a["name"]: a["git"] for a in _templates(wf)["run-demo"]["inputs"]["artifacts"]}
    assert arts["code"]["revision"] == sha and "passwordSecret" in arts["code"]
    assert arts["assets"] == {"repo": "https://github.com/org/public-assets.git", "revision": "v2"}  # anonymous
    env = {e["name"]: e.get("value") for e in _templates(wf)["run-demo"]["container"]["env"]}
    assert env["CODE_REVISION"] == sha and env["ASSETS_REVISION"] == "v2"
    # no code at all: the pushed repository at /workspace/src
    bare = pin_to_push(load_training_spec(MINIMAL), "ml/rl", "https://gitlab.example/ml/rl.git", sha)
    assert [(c.url, c.ref, c.path) for c in bare.code] == [("https://gitlab.example/ml/rl.git", sha, "/workspace/src")]


def test_typed_resources_and_volumes_render_schema_valid(validator):
    spec = load_training_spec(MINIMAL.replace("resources: {cpu: 2, memory: 8Gi, gpu: {count: 1}}", """
resources:
  cpu: 8
  memory: 64Gi
  gpu: {count: 1, memory: 20000, cores: 50}
  extended: {nvidia.com/mig-1g.10gb: 2, amd.com/gpu: 1}
  shm_size: 16Gi
volumes:
  - {name: datasets, claim: rl-datasets, mount_path: /data}
  - {name: scratch, nfs_server: 10.0.0.5, nfs_path: /export/scratch, mount_path: /scratch, read_only: false}
"""))
    wf = render_workflow(spec)
    assert _errors(validator, wf) == []
    c = _templates(wf)["run-demo"]["container"]
    assert c["resources"]["limits"] == {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "20000", "nvidia.com/gpucores": "50",
                                        "nvidia.com/mig-1g.10gb": "2", "amd.com/gpu": "1", "cpu": "8", "memory": "64Gi"}
    assert c["volumeMounts"] == [{"name": "datasets", "mountPath": "/data", "readOnly": True},
                                 {"name": "scratch", "mountPath": "/scratch"},
                                 {"name": "dshm", "mountPath": "/dev/shm"}]
    assert wf["spec"]["volumes"] == [
        {"name": "datasets", "persistentVolumeClaim": {"claimName": "rl-datasets", "readOnly": True}},
        {"name": "scratch", "nfs": {"server": "10.0.0.5", "path": "/export/scratch"}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "16Gi"}}]
    allowed = ["nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpucores", "nvidia.com/mig-*"]
    assert resource_problems(spec, allowed) == [
        "resources: amd.com/gpu is not offered by this platform (argo.allowed_resources: nvidia.com/gpu, "
        "nvidia.com/gpumem, nvidia.com/gpucores, nvidia.com/mig-*)"]
    assert resource_problems(spec, [*allowed, "amd.com/gpu"]) == []


@pytest.mark.parametrize("change, message", [
    ({"parameters": {"GITLAB_TOKEN": "x"}}, "parameters: 'GITLAB_TOKEN' looks like a credential"),
    ({"env": {"HF_API_KEY": "x"}}, "env: 'HF_API_KEY' looks like a credential"),
    ({"parameters": {"CLONE": f"https://u:{PW}@g.example/x.git"}},
     "parameters: the value of 'CLONE' looks like a token or a URL with credentials (value not shown)"),
    ({"env": {"bad-name": "1"}}, "env: 'bad-name' is not a valid name"),
    ({"resources": {"cpu": 1, "memory": "1Gi", "extended": {"mig-1g": 1}}},
     "resources.extended: 'mig-1g' is not an extended resource name"),
    ({"resources": {"cpu": 1, "memory": "1Gi", "extended": {"nvidia.com/mig-1g.10gb": 0.5}}},
     "resources.extended: nvidia.com/mig-1g.10gb: expected a whole number >= 1"),
    ({"resources": {"cpu": 1, "memory": "1Gi", "gpu": {"count": 1}, "extended": {"nvidia.com/gpu": 2}}},
     "nvidia.com/gpu requested both in 'gpu' and in 'extended'"),
    ({"volumes": [{"name": "d", "mount_path": "/data"}]}, "expected exactly one source"),
    ({"code": [{"url": "https://g.example/a.git"}, {"url": "https://g.example/b.git"}]},
     "code names must be unique, repeated: code"),
])
def test_errors_name_the_key_and_what_is_wrong_without_the_value(change, message):
    data = yaml.safe_load(MINIMAL) | change
    with pytest.raises(TrainingSpecError) as err:
        load_training_spec(yaml.safe_dump(data), "train.yaml")
    assert message in str(err.value), str(err.value)
    assert PW not in str(err.value) and "{key" not in str(err.value)


@pytest.mark.parametrize("pod_gc, logs, expected", [
    ("OnPodCompletion", LogRetention(archive=True), ({"strategy": "OnPodCompletion"}, True)),
    ("OnPodCompletion", LogRetention(archive=False, keep_pods_for="10m"),
     ({"strategy": "OnPodCompletion", "deleteDelayDuration": "10m"}, None)),
    ("OnWorkflowCompletion", LogRetention(keep_pods_for="5m"),
     ({"strategy": "OnWorkflowCompletion", "deleteDelayDuration": "5m"}, None)),
    ("OnPodSuccess", LogRetention(keep_pods_for="10m"), ({"strategy": "OnPodSuccess"}, None)),  # keeps failed pods
])
def test_failed_step_logs_outlive_their_pods_by_archive_or_delay(validator, pod_gc, logs, expected):
    spec = load_training_spec(MINIMAL + f"pod_gc: {pod_gc}\n")
    wf = render_workflow(spec, logs=logs)
    assert (wf["spec"]["podGC"], wf["spec"].get("archiveLogs")) == expected
    assert _errors(validator, wf) == []


def test_failed_steps_carry_their_node_and_archived_log():
    nodes = {"d-1-9": {"id": "d-1-9", "type": "Pod", "templateName": "run-demo", "phase": "Failed",
                       "outputs": {"artifacts": [{"name": "main-logs", "s3": {"key": "k"}}]}},
             "d-1-8": {"id": "d-1-8", "type": "Pod", "templateName": "run-demo", "phase": "Error"}}
    wf = _wf("Failed", "child failed", nodes)
    wf["spec"] = {"podGC": {"strategy": "OnPodCompletion"}, "archiveLogs": True}
    wf["metadata"]["name"] = "d-1"
    st = parse_status(wf)
    assert (st.pod_gc, st.archive_logs) == ("OnPodCompletion", True)
    assert sorted((f.node_id, f.archived_log) for f in st.failed_steps) == [("d-1-8", False), ("d-1-9", True)]
    step = st.failed_steps[1]
    assert logs_unavailable(step, "OnPodCompletion", False) == (
        "logs unavailable: pod d-1-run-demo-8 no longer exists (podGC OnPodCompletion deleted it) and the workflow "
        "does not archive logs: set argo.archive_logs (with an artifact repository) or a longer "
        "argo.keep_failed_pods_for in the platform config")


def test_shutdown_state_machine():
    m = Shutdown(started=0.0, grace_s=10.0, timeout_s=100.0)
    assert m.next(5.0, terminal=False, cancel_requested=False) == "wait"
    assert m.next(6.0, terminal=False, cancel_requested=True) == "stop"
    assert (m.cancelled, m.shutdown_at) == (True, 6.0)
    assert m.next(15.0, terminal=False, cancel_requested=True) == "wait"  # within the grace period
    assert m.next(17.0, terminal=False, cancel_requested=False) == "terminate"
    assert m.next(20.0, terminal=False, cancel_requested=False) == "wait"
    assert m.next(28.0, terminal=False, cancel_requested=False) == "give_up"
    t = Shutdown(started=0.0, grace_s=10.0, timeout_s=30.0)
    assert t.next(31.0, terminal=False, cancel_requested=False) == "terminate"
    assert (t.timed_out_s, t.cancelled, t.terminated) == (31.0, False, True)
    assert t.next(35.0, terminal=True, cancel_requested=False) == "done"
    # a cancellation after the timeout changes nothing: the run is a timeout
    assert Shutdown(started=0.0, grace_s=1.0).next(1e6, terminal=False, cancel_requested=False) == "wait"


@pytest.mark.parametrize("value, expected", [
    ("1.0", ("1.0", True)), (1.0, ("1.0", False)), (1.1, ("1.1", False)), (10, ("10", True)), ("", ("", True)),
])
def test_string_parameters_as_text(value, expected):
    from tasks.training_spec import as_text

    assert as_text(value) == expected


def test_build_spec_is_a_training_spec():
    spec = build_spec("127.0.0.1:5000/x:1", "http://g/x.git", "abc", git_secret=None)
    assert parse_training_spec(spec.model_dump(mode="json")) == spec
    assert spec.code[0].credentials is None  # a public repository: no clone secret
