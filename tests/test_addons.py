"""install-addons: the Helm releases of configs/helm (pinned, valid YAML, no credentials, dependency order)
and the flow against a stand-in `helm` (sandbox/helm_standin.py) that records its argv and state: first
install in order, a missing token secret stops it, idempotent re-runs, a values diff, an atomic failure."""

from __future__ import annotations

import json
import secrets
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_flow_sync

REPO = Path(__file__).resolve().parent.parent
HELM_DIR = REPO / "configs" / "helm"
SEED = REPO / "tests" / "fixtures" / "seed"


def test_every_values_file_is_yaml_and_releases_are_pinned_in_order():
    from tasks.helm_releases import install_order, load_releases, load_values

    for f in sorted(HELM_DIR.rglob("*.yaml")):
        assert isinstance(yaml.safe_load(f.read_text()), dict), f
    releases = load_releases()
    by = {r.name: r for r in releases}
    assert by["argo-workflows"].version == "0.42.7" and by["gitlab-runner"].version == "0.70.3"
    assert {"nvidia-device-plugin", "kube-prometheus-stack", "dcgm-exporter", "ingress-nginx", "elasticsearch",
            "filebeat", "argo-workflows", "gitlab-runner"} <= set(by)
    assert load_values(by["kube-prometheus-stack"].values)["kubeStateMetrics"]["enabled"] is True
    order = [r.name for r in install_order(releases)]
    for r in releases:
        assert all(order.index(a) < order.index(r.name) for a in r.after), r.name
    assert order.index("nvidia-device-plugin") < order.index("dcgm-exporter")
    assert order.index("kube-prometheus-stack") < order.index("dcgm-exporter")
    # the guide's values, as they are; the runner's token moved to a secret
    assert load_values(by["argo-workflows"].values) == yaml.safe_load((SEED / "argo-values.yaml").read_text())
    guide = yaml.safe_load((SEED / "gitlab-runner-rl_values.yaml").read_text())
    ours = load_values(by["gitlab-runner"].values)
    assert "runnerToken" not in ours and guide.pop("runnerToken")
    assert ours["runners"].pop("secret") == "gitlab-runner-token" and ours == guide
    assert by["gitlab-runner"].secrets[0].data_keys == ["runner-token", "runner-registration-token"]


def test_release_file_problems_are_named(tmp_path):
    from tasks.helm_releases import load_releases

    leaked = secrets.token_urlsafe(12)  # a values file carrying credentials inline: refused, whatever they are
    (tmp_path / "v.yaml").write_text(f"runnerToken: glrt-{leaked}\nnested:\n  password: {leaked}\n")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"releases": [
        {"name": "a", "chart": "a", "repo": "https://x.invalid", "version": "1.0.0", "namespace": "n",
         "values": "v.yaml", "after": ["b"]},
        {"name": "b", "chart": "b", "repo": "https://x.invalid", "version": "1.0.0", "namespace": "n",
         "values": "v.yaml", "after": ["a", "zz"]}]}))
    with pytest.raises(ValueError) as err:
        load_releases(tmp_path / "r.yaml")
    text = str(err.value)
    assert "after unknown release zz" in text and "runnerToken" in text and "nested.password" in text
    (tmp_path / "v.yaml").write_text("x: 1\n")
    doc = yaml.safe_load((tmp_path / "r.yaml").read_text())
    doc["releases"][1]["after"] = ["a"]
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(doc))
    with pytest.raises(ValueError, match="cycle"):
        load_releases(tmp_path / "r.yaml")
    (tmp_path / "r.yaml").write_text(yaml.safe_dump({"releases": [
        {"name": "a", "chart": "a", "repo": "https://x.invalid", "version": "latest", "namespace": "n",
         "values": "v.yaml"}]}))
    with pytest.raises(ValueError, match="version"):
        load_releases(tmp_path / "r.yaml")


def test_judge_skips_only_unchanged_deployed_releases():
    from tasks.helm_releases import AddonRelease, judge

    rel = AddonRelease(name="x", chart="x", repo="https://x.invalid", version="1.2.3", namespace="n", values="v")
    listed = {"chart": "x-1.2.3", "status": "deployed"}
    assert judge(rel, None, None, {"a": 1}) == ("install", "not installed")
    assert judge(rel, listed, {"a": 1}, {"a": 1}) == ("skip", "unchanged")
    assert judge(rel, listed, {"a": 2}, {"a": 1}) == ("upgrade", "values differ")
    assert judge(rel, {**listed, "chart": "x-1.2.2"}, {"a": 1}, {"a": 1})[1] == "chart x-1.2.2 -> x-1.2.3"
    assert judge(rel, {**listed, "status": "failed"}, {"a": 1}, {"a": 1}) == ("upgrade", "status failed")
    assert judge(rel, {**listed, "status": "pending-upgrade"}, {}, {})[0] == "blocked"


@pytest.fixture
def helm(tmp_path):
    """A `helm` on disk that runs the stand-in with its state in tmp_path/helm-state."""
    state = tmp_path / "helm-state"
    exe = tmp_path / "bin" / "helm"
    exe.parent.mkdir()
    exe.write_text(f"#!/bin/sh\nHELM_STANDIN_STATE={state} exec {sys.executable} {REPO / 'sandbox/helm_standin.py'} \"$@\"\n")
    exe.chmod(0o755)

    def calls() -> list[list[str]]:
        path = state / "calls.jsonl"
        return [json.loads(ln) for ln in path.read_text().splitlines()] if path.exists() else []

    def releases() -> dict:
        return json.loads((state / "releases.json").read_text())["releases"]

    return exe, state, calls, releases


def _upgrades(calls: list[list[str]]) -> list[list[str]]:
    return [c for c in calls if c[:2] == ["upgrade", "--install"]]


@pytest.mark.sandbox
@pytest.mark.prefect
def test_install_addons_in_order_idempotent_diff_and_atomic_failure(sandbox_platform, helm, tmp_path):
    from kubernetes import client as k8s
    from kubernetes.client.exceptions import ApiException

    from blocks.platform import Platform
    from flows.addons import install_addons
    from tasks.helm_releases import install_order, load_releases
    from tests.approvals import APPROVE, run_and_answer

    exe, state, calls, releases = helm
    core = k8s.CoreV1Api(Platform(sandbox_platform).kubernetes())
    try:
        core.delete_namespaced_secret("gitlab-runner-token", "gitlab-runner")
    except ApiException as exc:
        assert exc.status == 404
    order = [r.name for r in install_order(load_releases())]

    def real(**params):
        return run_and_answer(install_addons, {"platform": sandbox_platform, "helm_bin": str(exe), "dry_run": False,
                                               "poll_interval_s": 0.5, **params}, APPROVE)

    # 1. the runner's token secret is missing: the plan is refused before any approval, nothing is installed
    state1 = run_flow_sync(install_addons, platform=sandbox_platform, helm_bin=str(exe), dry_run=False)
    assert state1.is_failed() and "missing secret gitlab-runner/gitlab-runner-token" in state1.message
    assert "refused, nothing was changed" in state1.message and _upgrades(calls()) == []

    # 2. with the secret: every release, in dependency order, after approval
    core.create_namespaced_secret("gitlab-runner", k8s.V1Secret(
        metadata=k8s.V1ObjectMeta(name="gitlab-runner-token"),
        string_data={"runner-token": f"glrt-{secrets.token_urlsafe(16)}",
                     "runner-registration-token": f"glrt-{secrets.token_urlsafe(16)}"}))
    state2 = real()
    assert state2.is_completed(), state2.message
    ups = _upgrades(calls())
    assert [u[2] for u in ups] == order  # dependency order
    for u, rel in zip(ups, install_order(load_releases()), strict=True):
        assert u[3] == rel.chart and u[u.index("--version") + 1] == rel.version
        assert u[u.index("--repo") + 1] == rel.repo and u[u.index("-f") + 1] == str(rel.values)
        assert {"--atomic", "--wait", "--create-namespace"} <= set(u) and u[u.index("--timeout") + 1] == rel.timeout
    assert releases()["argo/argo-workflows"]["version"] == "0.42.7"
    assert "runnerToken" not in releases()["gitlab-runner/gitlab-runner"]["values"]
    assert releases()["gitlab-runner/gitlab-runner"]["values"]["runners"]["secret"] == "gitlab-runner-token"

    # 3. a re-run has nothing to do: no step, no approval asked, no helm upgrade
    before = len(calls())
    state3 = run_flow_sync(install_addons, platform=sandbox_platform, helm_bin=str(exe), dry_run=False)
    assert state3.is_completed() and state3.result()["plan"] == []
    assert _upgrades(calls()[before:]) == []

    # 4. changed values: the dry run (the default) shows the diff and changes nothing; a real run fails
    #    atomically (helm rolled that release back) and names the way back
    conf = tmp_path / "helm"
    shutil.copytree(HELM_DIR, conf)
    vals = conf / "values" / "ingress-nginx.yaml"
    vals.write_text(vals.read_text().replace("replicaCount: 2", "replicaCount: 3"))
    before = len(calls())
    dry = run_flow_sync(install_addons, platform=sandbox_platform, helm_bin=str(exe),
                        releases_file=str(conf / "releases.yaml"))
    assert dry.is_completed() and dry.result()["dry_run"] is True
    assert [s["step"] for s in dry.result()["plan"]] == ["helm upgrade --install ingress-nginx"]
    assert _upgrades(calls()[before:]) == []
    (state / "fail.json").write_text(json.dumps({"ingress-nginx": "context deadline exceeded"}))
    revision = releases()["ingress-nginx/ingress-nginx"]["revision"]
    failed = real(releases_file=str(conf / "releases.yaml"))
    assert failed.is_failed() and "rolled back due to atomic being set: context deadline exceeded" in failed.message
    assert f'rollback_to={{"ingress-nginx": {revision}}}' in failed.message
    ingress = releases()["ingress-nginx/ingress-nginx"]
    assert ingress["values"]["controller"]["replicaCount"] == 2 and ingress["revision"] == revision + 2
    assert ingress["status"] == "deployed"
    (state / "fail.json").unlink()
    # 5. only some releases: the diff applies
    fixed = real(releases_file=str(conf / "releases.yaml"), releases=["ingress-nginx"])
    assert fixed.is_completed() and [s["step"] for s in fixed.result()["steps"]] == ["helm upgrade --install ingress-nginx"]
    assert releases()["ingress-nginx/ingress-nginx"]["values"]["controller"]["replicaCount"] == 3


def test_deployments_of_node_init_and_addons():
    import importlib

    deployments = {d["name"]: d for d in yaml.safe_load((REPO / "prefect.yaml").read_text())["deployments"]}
    for name in ("install-addons", "init-nodes", "check-node-drift"):
        module, _, attr = deployments[name]["entrypoint"].partition(":")
        flow = getattr(importlib.import_module(module.removesuffix(".py").replace("/", ".")), attr)
        assert flow.name == name
    assert deployments["init-nodes"]["parameters"]["dry_run"] is True
