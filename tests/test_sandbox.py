"""The sandbox platform through real clients: the official kubernetes client, kubectl, Prometheus."""

from __future__ import annotations

import ast
import csv
import gc
import json
import os
import stat
import subprocess
from pathlib import Path

import httpx
import pytest
from kubernetes import client as k8s
from kubernetes.client.exceptions import ApiException

from sandbox._common import SandboxError
from sandbox.cluster import exporter_pod_names
from sandbox.dcgm import DEFAULT_COUNTERS
from tasks.kubernetes import api_client_from_kubeconfig, list_raw
from tests.conftest import CONTRACTS


@pytest.fixture(scope="module")
def core(sandbox):
    with api_client_from_kubeconfig(str(sandbox.kubeconfig)) as api:
        yield k8s.CoreV1Api(api)


def test_dcgm_counters_match_the_contract():
    rows = []
    with open(CONTRACTS / "dcgm-exporter-default-counters.csv") as f:
        for row in csv.reader(f):
            if not row or row[0].strip().startswith("#"):
                continue
            name, mtype = row[0].strip(), row[1].strip()
            if mtype != "label":
                rows.append((name, mtype))
    assert DEFAULT_COUNTERS == rows


def test_nodes_are_seeded_with_gpu_shape(core, sandbox):
    nodes = core.list_node().items
    assert len(nodes) == 20
    gpu = [n for n in nodes if "nvidia.com/gpu.product" in (n.metadata.labels or {})]
    assert len(gpu) == sandbox.gpu_nodes == 16
    n = gpu[0]
    assert n.status.capacity["nvidia.com/gpu"] == "8"
    assert n.status.allocatable["nvidia.com/gpu"] == "8"
    assert {"key": "disable-node-scheduler", "effect": "NoSchedule"}.items() <= n.spec.taints[0].to_dict().items()
    assert n.status.node_info.kubelet_version.startswith("v1.")
    assert n.status.images and n.status.images[0].size_bytes > 0
    assert n.metadata.uid and n.metadata.resource_version and n.metadata.creation_timestamp
    ready = [c for c in n.status.conditions if c.type == "Ready"][0]
    assert ready.status == "True"


def test_label_selector_variants(core):
    assert len(core.list_node(label_selector="nvidia.com/gpu.product").items) == 16
    assert len(core.list_node(label_selector="!nvidia.com/gpu.product").items) == 4
    assert len(core.list_node(label_selector="node-role.kubernetes.io/control-plane").items) == 3
    assert len(core.list_node(label_selector="topology.kubernetes.io/zone in (zone-0,zone-1)").items) == 11
    assert len(core.list_node(label_selector="topology.kubernetes.io/zone notin (zone-0),nvidia.com/gpu.present=true")
               .items) == 10
    assert len(core.list_node(label_selector="kubernetes.io/hostname=gpu-node-0003").items) == 1
    with pytest.raises(ApiException) as info:
        core.list_node(label_selector="a in (b")
    assert info.value.status == 400


def test_field_selectors(core):
    pods = core.list_pod_for_all_namespaces(field_selector="spec.nodeName=gpu-node-0001").items
    assert {p.spec.node_name for p in pods} == {"gpu-node-0001"}
    assert any(p.metadata.name.startswith("nvidia-dcgm-exporter-") for p in pods)
    running = core.list_pod_for_all_namespaces(field_selector="status.phase!=Running").items
    assert running == []
    assert len(core.list_node(field_selector="metadata.name=cp-1").items) == 1


def test_pagination_is_complete_and_stable(core, sandbox):
    collector: set[bool] = set()

    def keep(obj):  # pages are parsed and folded with the cyclic collector paused (tasks/_gc.py)
        collector.add(gc.isenabled())
        return obj

    with api_client_from_kubeconfig(str(sandbox.kubeconfig)) as api:
        whole = list_raw(api, "pods", page_size=10_000)
        paged = list_raw(api, "pods", page_size=7, transform=keep)
    assert collector == {False} and gc.isenabled()
    assert whole.round_trips == 1
    assert paged.round_trips == -(-len(whole.items) // 7)
    names = [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in paged.items]
    assert names == [(p["metadata"]["namespace"], p["metadata"]["name"]) for p in whole.items]
    assert len(set(names)) == len(names)
    first = core.list_pod_for_all_namespaces(limit=5)
    assert first.metadata.remaining_item_count == len(whole.items) - 5
    with pytest.raises(ApiException) as info:
        core.list_pod_for_all_namespaces(limit=5, _continue="not-a-token")
    assert info.value.status == 410


def test_patch_bumps_resource_version_and_status_subresource(core, clean_sandbox):
    before = core.read_node("gpu-node-0002")
    core.patch_node("gpu-node-0002", {"spec": {"unschedulable": True}})
    after = core.read_node("gpu-node-0002")
    assert after.spec.unschedulable is True
    assert int(after.metadata.resource_version) > int(before.metadata.resource_version)
    assert after.spec.taints == before.spec.taints
    core.patch_node_status("gpu-node-0002", {"status": {"allocatable": {"nvidia.com/gpu": "7"}}})
    assert core.read_node("gpu-node-0002").status.allocatable["nvidia.com/gpu"] == "7"
    # the rest of the status is kept
    assert core.read_node("gpu-node-0002").status.capacity["nvidia.com/gpu"] == "8"


def test_eviction_honours_pod_disruption_budget(core, clean_sandbox):
    serving = core.list_namespaced_pod("inference", label_selector="app=llm-serving").items
    assert serving, "the seed has an inference pod behind a PDB"
    body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=serving[0].metadata.name, namespace="inference"))
    with pytest.raises(ApiException) as info:
        core.create_namespaced_pod_eviction(serving[0].metadata.name, "inference", body)
    assert info.value.status == 429
    assert "disruption budget" in json.loads(info.value.body)["message"]
    assert core.read_namespaced_pod(serving[0].metadata.name, "inference")  # still there
    victim = core.list_namespaced_pod("training").items[0]
    core.create_namespaced_pod_eviction(
        victim.metadata.name, "training",
        k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=victim.metadata.name, namespace="training")))
    with pytest.raises(ApiException) as info:
        core.read_namespaced_pod(victim.metadata.name, "training")
    assert info.value.status == 404


def test_kubectl_uses_the_kubeconfig(sandbox, tmp_path):
    env = {"KUBECONFIG": str(sandbox.kubeconfig), "HOME": str(tmp_path), "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["kubectl", "get", "nodes", "-o", "name"], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout.split()
    assert len(out) == 20
    out = subprocess.run(["kubectl", "get", "nodes", "-l", "nvidia.com/gpu.product", "-o", "name"], env=env,
                         capture_output=True, text=True, timeout=60, check=True).stdout.split()
    assert len(out) == 16 and all(n.startswith("node/gpu-node-") for n in out)
    table = subprocess.run(["kubectl", "get", "nodes", "cp-1", "gpu-node-0001"], env=env, capture_output=True,
                           text=True, timeout=60, check=True).stdout.splitlines()
    assert table[0].split() == ["NAME", "STATUS", "ROLES", "AGE", "VERSION"]
    assert table[1].split()[:3] == ["cp-1", "Ready", "control-plane"]
    assert table[2].split()[:3] == ["gpu-node-0001", "Ready", "gpu"]


def _prom(sandbox, query: str) -> list[dict]:
    r = httpx.get(f"{sandbox.urls['prometheus']}/api/v1/query", params={"query": query}, timeout=10)
    r.raise_for_status()
    return r.json()["data"]["result"]


def test_prometheus_scrapes_exporters_with_dcgm_labels(sandbox):
    result = _prom(sandbox, 'DCGM_FI_DEV_GPU_TEMP{Hostname=~"nvidia-dcgm-exporter-.*"}')
    assert len(result) == 16 * 8
    labels = result[0]["metric"]
    for key in ("gpu", "UUID", "device", "modelName", "Hostname", "DCGM_FI_DRIVER_VERSION", "instance", "job"):
        assert key in labels
    held = [r for r in result if "pod" in r["metric"]]
    assert held and all("namespace" in r["metric"] and "container" in r["metric"] for r in held)
    assert len(_prom(sandbox, 'up{job="dcgm-exporter"} == 1')) == 16


def test_faults_reach_api_and_metrics(sandbox, core, clean_sandbox):
    import time

    sandbox.fault("node-not-ready", node="gpu-node-0004")
    ready = [c for c in core.read_node("gpu-node-0004").status.conditions if c.type == "Ready"][0]
    assert ready.status == "Unknown"
    sandbox.fault("xid", node="gpu-node-0005", gpu=3, value=79)
    sandbox.fault("gpu-missing", node="gpu-node-0006", gpu=7)
    sandbox.fault("exporter-down", node="gpu-node-0007")
    body = httpx.get(f"{sandbox.urls['sim']}/nodes/gpu-node-0005/metrics", timeout=5).text
    assert 'DCGM_FI_DEV_XID_ERRORS{gpu="3"' in body and "} 79" in body.split('DCGM_FI_DEV_XID_ERRORS{gpu="3"')[1][:400]
    body = httpx.get(f"{sandbox.urls['sim']}/nodes/gpu-node-0006/metrics", timeout=5).text
    assert 'gpu="7"' not in body and 'gpu="6"' in body
    assert core.read_node("gpu-node-0006").status.allocatable["nvidia.com/gpu"] == "7"
    assert httpx.get(f"{sandbox.urls['sim']}/nodes/gpu-node-0007/metrics", timeout=5).status_code == 503
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        down = _prom(sandbox, 'up{job="dcgm-exporter"} == 0')
        if down:
            break
        time.sleep(1)
    assert [d["metric"]["instance"] for d in down] == [f"{exporter_pod_names(16)['gpu-node-0007']}:9400"]
    with pytest.raises(SandboxError, match="unknown fault kind"):
        sandbox.fault("meteor-strike", node="gpu-node-0001")


def test_api_down_and_prometheus_down_then_heal(sandbox, core, clean_sandbox):
    sandbox.fault("api-down")
    with pytest.raises(ApiException) as info:
        core.list_node()
    assert info.value.status == 503
    sandbox.fault("prometheus-down")
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{sandbox.urls['prometheus']}/-/ready", timeout=2)
    sandbox.heal()
    assert len(core.list_node().items) == 20
    assert httpx.get(f"{sandbox.urls['prometheus']}/-/ready", timeout=5).status_code == 200


# --- the sandbox's own structure: helpers in one leaf module, stand-in secrets kept privately --------------

SANDBOX_DIR = Path(__file__).resolve().parent.parent / "sandbox"
COMPONENTS = ["argo", "gitlab_host", "gitlab_api", "registry", "dcgm", "prometheus", "s3", "webhook", "kube",
              "cluster", "server", "etcd"]


def _sandbox_imports(module: str) -> list[tuple[str, str]]:
    """(module, name) for every import of a sandbox module in sandbox/MODULE.py (name '' for `import x`)."""
    tree = ast.parse((SANDBOX_DIR / f"{module}.py").read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "sandbox":
            found += [(node.module, alias.name) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, "") for alias in node.names if alias.name.split(".")[0] == "sandbox"]
    return found


def test_components_take_helpers_from_the_leaf_module_only():
    assert _sandbox_imports("_common") == []  # the leaf imports nothing of the sandbox
    for module in COMPONENTS:
        imports = _sandbox_imports(module)
        assert [m for m, _ in imports if m == "sandbox.platform"] == [], f"{module} imports the orchestrator"
        private = [(m, n) for m, n in imports if n.startswith("_")]
        assert private == [], f"{module} imports another module's private names: {private}"
    assert ("sandbox._common", "wait_for") in _sandbox_imports("gitlab_host")


def test_stand_in_secrets_are_kept_only_in_private_files(sandbox):
    folder = sandbox.state_dir / "secrets"
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    files = {p.name: p for p in folder.iterdir()}
    assert {"SANDBOX_GITLAB_TOKEN", "SANDBOX_GITLAB_SCRATCH_TOKEN", "SANDBOX_ARGO_TOKEN",
            "SANDBOX_S3_ACCESS_KEY_ID", "SANDBOX_S3_SECRET_ACCESS_KEY", "SANDBOX_WEBHOOK_URL", "SANDBOX_KUBE_TOKEN",
            "gitlab_client_ed25519"} <= files.keys()
    assert {name: oct(stat.S_IMODE(p.stat().st_mode)) for name, p in files.items()} == {
        name: oct(0o600) for name in files}
    # state.json holds where each secret is, never the value; the {env: NAME} references resolve
    state = json.loads(sandbox.state_file.read_text())
    assert state["secrets"] == {name: str(path) for name, path in files.items()}
    for name in ("SANDBOX_GITLAB_TOKEN", "SANDBOX_ARGO_TOKEN", "SANDBOX_S3_SECRET_ACCESS_KEY", "SANDBOX_WEBHOOK_URL"):
        assert os.environ[name] == files[name].read_text()
    values = {name: p.read_bytes().strip() for name, p in files.items()}
    assert all(len(v) >= 24 for v in values.values())
    # No other file of the state dir holds a secret value. The emulated GitLab hosts' filesystems are left
    # out: their gitlab-secrets.json (and the backups of it) carry the host's own secrets by design.
    hosts = [sandbox.state_dir / "gitlab" / name / "root" for name in ("production", "scratch")]
    leaks = []
    for path in sandbox.state_dir.rglob("*"):
        if not path.is_file() or path.parent == folder or any(path.is_relative_to(h) for h in hosts):
            continue
        content = path.read_bytes()
        leaks += [f"{name} in {path.relative_to(sandbox.state_dir)}" for name, v in values.items() if v in content]
    assert leaks == []


def test_webhook_url_is_a_secret_the_receiver_checks(sandbox):
    log = Path(sandbox.extra["webhook_log"])
    before = log.read_text() if log.exists() else ""
    assert httpx.post(f"{sandbox.urls['webhook']}/hook", json={"x": 1}, timeout=5).status_code == 404
    url = os.environ["SANDBOX_WEBHOOK_URL"]
    assert url.startswith(f"{sandbox.urls['webhook']}/hook/")
    assert httpx.post(url, json={"subject": "s", "body": "b"}, timeout=5).status_code == 200
    received = log.read_text()[len(before):].splitlines()
    assert [json.loads(line)["path"] for line in received] == ["/hook"]


def test_created_objects_carry_the_url_namespace_and_a_mismatch_is_refused(clean_sandbox):
    """As the API server does: the URL's namespace is set on a created object; another one is a 400."""
    from kubernetes import client as k8s
    from kubernetes.client.rest import ApiException

    with api_client_from_kubeconfig(str(clean_sandbox.kubeconfig)) as api:
        core = k8s.CoreV1Api(api)
        core.create_namespaced_secret("ns-a", k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="s1"),
                                                           string_data={"k": "v"}))
        assert core.read_namespaced_secret("s1", "ns-a").metadata.namespace == "ns-a"
        listed = [s.metadata.namespace for s in core.list_secret_for_all_namespaces().items if s.metadata.name == "s1"]
        assert listed == ["ns-a"]
        with pytest.raises(ApiException) as err:
            core.create_namespaced_secret("ns-a", k8s.V1Secret(metadata=k8s.V1ObjectMeta(name="s2", namespace="ns-b")))
        assert err.value.status == 400

