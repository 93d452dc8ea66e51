"""A seeded GPU cluster: nodes, system pods and training pods as the Kubernetes API returns them.

Deterministic for a given (size, seed). Shapes follow the platform guide's fixtures: control plane
and monitor nodes tainted as in `kubespray-inventory.ini`, GPU nodes tainted
`disable-node-scheduler=:NoSchedule` with 8 GPUs each, dcgm-exporter and device-plugin
DaemonSet pods on GPU nodes, and training pods holding whole GPUs (`nvidia.com/gpu`), HAMi GPU
memory (`nvidia.com/gpumem`) or Alibaba GPU share memory (`aliyun.com/gpu-mem`, as in
`argo-rl-prod.yml`).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from typing import Any

GPUS_PER_NODE = 8
KUBELET_VERSION = "v1.29.5"
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"
GPU_MODEL_NAME = "NVIDIA H100 80GB HBM3"
DRIVER_VERSION = "535.129.03"
EXPORTER_NAMESPACE = "gpu-operator"
EXPORTER_APP = "nvidia-dcgm-exporter"
# The two ways dcgm-exporter is installed, by its pods' names and labels: the GPU operator's DaemonSet
# (namespace gpu-operator, `app=nvidia-dcgm-exporter`: gpu-operator assets/state-dcgm-exporter) and the
# standalone helm chart (`app.kubernetes.io/name=dcgm-exporter` and `/instance`, no `app` label:
# NVIDIA/dcgm-exporter deployment/templates/_helpers.tpl "dcgm-exporter.selectorLabels").
EXPORTER_CHARTS = {
    "gpu-operator": {"namespace": EXPORTER_NAMESPACE, "prefix": EXPORTER_APP,
                     "labels": {"app": EXPORTER_APP, "app.kubernetes.io/name": EXPORTER_APP}},
    "standalone": {"namespace": "dcgm-exporter", "prefix": "dcgm-exporter",
                   "labels": {"app.kubernetes.io/name": "dcgm-exporter", "app.kubernetes.io/instance": "dcgm-exporter"}},
}
GPU_TAINT = {"key": "disable-node-scheduler", "value": "", "effect": "NoSchedule"}
MONITOR_TAINT = {"key": "instance-type-is-monitor", "value": "", "effect": "NoSchedule"}
CONTROL_PLANE_TAINT = {"key": "node-role.kubernetes.io/control-plane", "effect": "NoSchedule"}
GPU_TOLERATION = {"key": "disable-node-scheduler", "operator": "Exists", "effect": "NoSchedule"}

_IMAGES = [
    ("registry.example.internal/limx-rl/base:v11", 18_400_000_000),
    ("registry.example.internal/limx-rl/base:v10", 18_100_000_000),
    ("registry.example.internal/limx-rl/base:v9", 17_900_000_000),
    ("nvcr.io/nvidia/k8s/dcgm-exporter:3.3.5-3.4.0-ubuntu22.04", 380_000_000),
    ("nvcr.io/nvidia/k8s-device-plugin:v0.15.0", 120_000_000),
    ("registry.k8s.io/kube-proxy:v1.29.5", 28_000_000),
    ("quay.io/calico/node:v3.27.3", 117_000_000),
    ("pytorch/pytorch:2.3.0-cuda12.1-cudnn8-runtime", 7_600_000_000),
    ("quay.io/argoproj/argoexec:v3.5.8", 95_000_000),
]


def _h(*parts: object) -> str:
    return hashlib.sha1("/".join(map(str, parts)).encode()).hexdigest()


def gpu_uuid(node: str, index: int) -> str:
    h = _h("gpu", node, index)
    return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:32]}"


@dataclass
class SeededCluster:
    nodes: list[dict[str, Any]]
    pods: list[dict[str, Any]]
    pdbs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def gpu_nodes(self) -> list[dict[str, Any]]:
        return [n for n in self.nodes if "nvidia.com/gpu" in n["status"]["capacity"]]


def _node(name: str, role: str, index: int, rng: random.Random) -> dict[str, Any]:
    labels = {
        "kubernetes.io/hostname": name,
        "kubernetes.io/os": "linux",
        "kubernetes.io/arch": "amd64",
    }
    capacity = {"cpu": "64", "memory": "515809928Ki", "pods": "110", "ephemeral-storage": "1967512240Ki"}
    taints: list[dict[str, str]] = []
    images = _IMAGES[5:7]
    if role == "control-plane":
        labels["node-role.kubernetes.io/control-plane"] = ""
        taints = [CONTROL_PLANE_TAINT]
        capacity.update(cpu="16", memory="65842060Ki")
    elif role == "monitor":
        labels["node-role.kubernetes.io/monitor"] = ""
        taints = [MONITOR_TAINT]
        capacity.update(cpu="32", memory="131842060Ki")
    else:
        labels.update({
            "node-role.kubernetes.io/gpu": "",
            "nvidia.com/gpu.present": "true",
            "nvidia.com/gpu.product": GPU_PRODUCT,
            "nvidia.com/gpu.count": str(GPUS_PER_NODE),
            "nvidia.com/gpu.memory": "81559",
            "nvidia.com/cuda.driver.major": "535",
            "topology.kubernetes.io/zone": f"zone-{index % 3}",
        })
        taints = [GPU_TAINT]
        capacity.update({"cpu": "192", "memory": "2113510448Ki", "nvidia.com/gpu": str(GPUS_PER_NODE)})
        images = [img for img in _IMAGES if rng.random() < 0.8 or "dcgm" in img[0]]
    allocatable = dict(capacity)
    allocatable["cpu"] = str(int(capacity["cpu"]) - 1)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {"name": name, "labels": labels, "annotations": {
            "node.alpha.kubernetes.io/ttl": "0",
            "volumes.kubernetes.io/controller-managed-attach-detach": "true",
        }},
        "spec": {"taints": taints, "podCIDR": f"10.233.{index % 256}.0/24"},
        "status": {
            "capacity": capacity,
            "allocatable": allocatable,
            "conditions": [
                {"type": "MemoryPressure", "status": "False", "reason": "KubeletHasSufficientMemory"},
                {"type": "DiskPressure", "status": "False", "reason": "KubeletHasNoDiskPressure"},
                {"type": "PIDPressure", "status": "False", "reason": "KubeletHasSufficientPID"},
                {"type": "Ready", "status": "True", "reason": "KubeletReady",
                 "message": "kubelet is posting ready status"},
            ],
            "addresses": [{"type": "Hostname", "address": name}],
            "daemonEndpoints": {"kubeletEndpoint": {"Port": 10250}},
            "nodeInfo": {
                "machineID": _h("machine", name)[:32], "systemUUID": _h("system", name)[:32],
                "bootID": _h("boot", name)[:32],
                "kubeletVersion": KUBELET_VERSION, "kubeProxyVersion": KUBELET_VERSION,
                "containerRuntimeVersion": "containerd://1.7.16", "osImage": "Ubuntu 22.04.4 LTS",
                "kernelVersion": "5.15.0-105-generic", "architecture": "amd64", "operatingSystem": "linux",
            },
            "images": [{"names": [img], "sizeBytes": size} for img, size in images],
        },
    }


def _pod(namespace: str, name: str, node: str, *, labels: dict[str, str], owner: tuple[str, str] | None,
         image: str, resources: dict[str, dict[str, str]] | None = None, tolerations: list | None = None,
         phase: str = "Running") -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": namespace, "labels": labels}
    if owner:
        api = {"DaemonSet": "apps/v1", "Workflow": "argoproj.io/v1alpha1", "Job": "batch/v1",
               "ReplicaSet": "apps/v1"}[owner[0]]
        meta["ownerReferences"] = [{"apiVersion": api, "kind": owner[0], "name": owner[1],
                                    "uid": _h("owner", *owner)[:32], "controller": True}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": meta,
        "spec": {
            "nodeName": node,
            "containers": [{"name": "main", "image": image, "resources": resources or {}}],
            "tolerations": tolerations or [],
            "restartPolicy": "Never" if owner and owner[0] in ("Workflow", "Job") else "Always",
        },
        "status": {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1"},
    }


def node_names(gpu_nodes: int, domain: str = "") -> tuple[list[str], list[str], list[str]]:
    """Node names; with `domain`, fully qualified (kubelet's `--hostname-override` or cloud providers
    name nodes by FQDN, while dcgm-exporter's Hostname may be the short host name)."""
    d = f".{domain}" if domain else ""
    cps = [f"cp-{i}{d}" for i in range(1, 4)] if gpu_nodes >= 16 else [f"cp-1{d}"]
    monitors = [f"monitor-1{d}"] if gpu_nodes >= 16 else []
    gpus = [f"gpu-node-{i:04d}{d}" for i in range(1, gpu_nodes + 1)]
    return cps, monitors, gpus


def exporter_pod_ip(index: int) -> str:
    """A pod IP per GPU node's exporter (10.64.0.0/10), unique, as the CNI assigns them."""
    n = index + 1
    return f"10.{64 + (n >> 16)}.{(n >> 8) & 255}.{n & 255}"


def gpu_node_count(total_nodes: int) -> int:
    """How many GPU nodes a cluster of `total_nodes` gets after its control plane and monitor."""
    if total_nodes >= 20:
        return total_nodes - 4
    return max(total_nodes - 1, 1)


def pod_suffixes(names: list[str]) -> dict[str, str]:
    """A 5-character suffix per node for its DaemonSet pods, unique as the DaemonSet controller makes them.

    The suffix is the node name's hash; on a clash (likely from about 1,000 nodes on) it is rehashed,
    so two nodes never share an exporter pod name or a Prometheus `instance`.
    """
    out: dict[str, str] = {}
    used: set[str] = set()
    for name in names:
        suffix, salt = _h(name)[:5], 0
        while suffix in used:
            salt += 1
            suffix = _h(name, salt)[:5]
        used.add(suffix)
        out[name] = suffix
    return out


def exporter_pod_names(gpu_nodes: int, chart: str = "gpu-operator", domain: str = "") -> dict[str, str]:
    """GPU node -> the name of its dcgm-exporter pod (which dcgm-exporter reports as `Hostname`)."""
    cps, monitors, gpus = node_names(gpu_nodes, domain)
    suffixes = pod_suffixes(cps + monitors + gpus)
    return {n: f"{EXPORTER_CHARTS[chart]['prefix']}-{suffixes[n]}" for n in gpus}


def seed_cluster(gpu_nodes: int, seed: int = 7, chart: str = "gpu-operator", domain: str = "") -> SeededCluster:
    """A cluster with `gpu_nodes` GPU nodes (8 GPUs each) plus its control plane and monitor node."""
    rng = random.Random(seed)
    cps, monitors, gpus = node_names(gpu_nodes, domain)
    nodes = [_node(n, "control-plane", i, rng) for i, n in enumerate(cps)]
    nodes += [_node(n, "monitor", i, rng) for i, n in enumerate(monitors)]
    nodes += [_node(n, "gpu", i, rng) for i, n in enumerate(gpus)]
    pods: list[dict[str, Any]] = []
    suffixes = pod_suffixes(cps + monitors + gpus)
    for node in nodes:
        name = node["metadata"]["name"]
        suffix = suffixes[name]
        pods.append(_pod("kube-system", f"kube-proxy-{suffix}", name, labels={"k8s-app": "kube-proxy"},
                         owner=("DaemonSet", "kube-proxy"), image=_IMAGES[5][0],
                         tolerations=[{"operator": "Exists"}]))
    for index, name in enumerate(gpus):
        suffix = suffixes[name]
        exp = EXPORTER_CHARTS[chart]
        exporter = _pod(exp["namespace"], f"{exp['prefix']}-{suffix}", name, labels=dict(exp["labels"]),
                        owner=("DaemonSet", exp["prefix"]), image=_IMAGES[3][0], tolerations=[{"operator": "Exists"}])
        exporter["status"]["podIP"] = exporter_pod_ip(index)
        pods.append(exporter)
        pods.append(_pod(EXPORTER_NAMESPACE, f"nvidia-device-plugin-daemonset-{suffix}", name,
                         labels={"app": "nvidia-device-plugin-daemonset"},
                         owner=("DaemonSet", "nvidia-device-plugin-daemonset"), image=_IMAGES[4][0],
                         tolerations=[{"operator": "Exists"}]))
        pods.extend(_training_pods(name, index, rng))
    pdbs = [{
        "apiVersion": "policy/v1", "kind": "PodDisruptionBudget",
        "metadata": {"name": "serving-pdb", "namespace": "inference"},
        "spec": {"minAvailable": 1, "selector": {"matchLabels": {"app": "llm-serving"}}},
        "status": {"disruptionsAllowed": 0, "currentHealthy": 1, "desiredHealthy": 1, "expectedPods": 1},
    }]
    return SeededCluster(nodes=nodes, pods=pods, pdbs=pdbs)


def _training_pods(node: str, index: int, rng: random.Random) -> list[dict[str, Any]]:
    """A node's GPU workload: whole-GPU training, HAMi shared GPU memory or the seed's gpu-mem share."""
    kind = index % 10
    tol = [GPU_TOLERATION]
    wf = f"rl-prod-{_h('wf', node)[:5]}"
    if kind in (0, 1, 2, 3):  # one 8-GPU job
        return [_pod("argo-job", f"{wf}-run-rl-prod-{_h(node, 'p')[:10]}", node,
                     labels={"workflows.argoproj.io/workflow": wf, "team": "rl"},
                     owner=("Workflow", wf), image=_IMAGES[0][0], tolerations=tol,
                     resources={"limits": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1000Gi"},
                                "requests": {"nvidia.com/gpu": "8", "cpu": "96", "memory": "1000Gi"}})]
    if kind in (4, 5):  # two 4-GPU jobs
        return [_pod("training", f"llm-sft-{_h(node, j)[:6]}-worker-0", node,
                     labels={"job-name": f"llm-sft-{_h(node, j)[:6]}", "team": "llm"},
                     owner=("Job", f"llm-sft-{_h(node, j)[:6]}"), image=_IMAGES[7][0], tolerations=tol,
                     resources={"limits": {"nvidia.com/gpu": "4"}, "requests": {"nvidia.com/gpu": "4"}})
                for j in range(2)]
    if kind == 6:  # HAMi shared GPU memory (vGPU)
        return [_pod("notebooks", f"jupyter-user{index}-{_h(node, j)[:5]}", node,
                     labels={"app": "jupyter", "team": "research"},
                     owner=("ReplicaSet", f"jupyter-user{index}-{_h(node)[:6]}"), image=_IMAGES[7][0],
                     tolerations=tol,
                     resources={"limits": {"nvidia.com/gpu": "1", "nvidia.com/gpumem": "20000"}})
                for j in range(2)]
    if kind == 7:  # the seed's Argo RL task: aliyun.com/gpu-mem share
        return [_pod("argo-job", f"{wf}-run-rl-prod-{_h(node, 's')[:10]}", node,
                     labels={"workflows.argoproj.io/workflow": wf, "team": "rl"},
                     owner=("Workflow", wf), image=_IMAGES[0][0], tolerations=tol,
                     resources={"limits": {"aliyun.com/gpu-mem": "44", "cpu": "14", "memory": "100Gi"},
                                "requests": {"aliyun.com/gpu-mem": "44", "cpu": "14", "memory": "100Gi"}})]
    if kind == 8:  # inference behind a PodDisruptionBudget
        return [_pod("inference", f"llm-serving-{_h(node)[:6]}-{_h(node, 'r')[:5]}", node,
                     labels={"app": "llm-serving"}, owner=("ReplicaSet", f"llm-serving-{_h(node)[:6]}"),
                     image=_IMAGES[7][0], tolerations=tol,
                     resources={"limits": {"nvidia.com/gpu": "2"}, "requests": {"nvidia.com/gpu": "2"}})]
    return []  # kind 9: a free node


def gpu_holders(cluster: SeededCluster) -> dict[tuple[str, int], dict[str, Any]]:
    """Which pod holds which GPU (node, index), as dcgm-exporter's pod attribution would show."""
    holders: dict[tuple[str, int], dict[str, Any]] = {}
    next_free: dict[str, int] = {}
    for pod in cluster.pods:
        node = pod["spec"]["nodeName"]
        limits = pod["spec"]["containers"][0]["resources"].get("limits", {})
        count = int(limits.get("nvidia.com/gpu", 0))
        if not count and "aliyun.com/gpu-mem" in limits:
            count = 1
        start = next_free.get(node, 0)
        for gpu in range(start, min(start + count, GPUS_PER_NODE)):
            holders[(node, gpu)] = pod
        next_free[node] = start + count
    return holders
