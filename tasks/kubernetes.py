"""Talking to the Kubernetes API (official `kubernetes` client), and what nodes and pods mean.

Listings are paginated (`limit`/`continue`), fetched raw (`_preload_content=False`) and parsed
with orjson into plain dicts, then trimmed to the typed summaries below: the typed client's
model deserialisation costs seconds for a few thousand nodes and is never used for listings.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import orjson
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prefect import task
from prefect.cache_policies import NONE

from blocks.config import ClusterConfig
from tasks._retry import TRANSIENT_RETRIES

# Extended resources that hold (part of) a GPU: whole GPUs, HAMi's shares, Alibaba's GPU share.
GPU_RESOURCES = (
    "nvidia.com/gpu",
    "nvidia.com/gpumem",
    "nvidia.com/gpumem-percentage",
    "nvidia.com/gpucores",
    "aliyun.com/gpu-mem",
    "aliyun.com/gpu-count",
)
WHOLE_GPU = "nvidia.com/gpu"
DEFAULT_PAGE_SIZE = 500


# --- clients -------------------------------------------------------------------------------


def api_client_for(cluster: ClusterConfig) -> k8s.ApiClient:
    """An ApiClient for the cluster: its KubernetesClusterConfig block, else its kubeconfig, else in-cluster."""
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    try:
        block = KubernetesClusterConfig.load(cluster.name)
        return k8s_config.new_client_from_config_dict(block.config, context=block.context_name)
    except ValueError:
        pass  # no block saved for this cluster: fall back to the file or in-cluster
    if cluster.kubeconfig is not None:
        return k8s_config.new_client_from_config(str(cluster.kubeconfig), context=cluster.context)
    configuration = k8s.Configuration()
    k8s_config.load_incluster_config(client_configuration=configuration)
    return k8s.ApiClient(configuration)


def api_client_from_kubeconfig(path: str, context: str | None = None) -> k8s.ApiClient:
    return k8s_config.new_client_from_config(str(path), context=context)


@dataclass
class Listing:
    items: list[dict[str, Any]]
    round_trips: int
    resource_version: str | None = None


def list_raw(
    api: k8s.ApiClient,
    kind: str,
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    timeout_s: float = 15.0,
) -> Listing:
    """Every object of `kind` ('nodes' or 'pods', cluster-wide) as plain dicts, page by page."""
    core = k8s.CoreV1Api(api)
    fetch = {"nodes": core.list_node, "pods": core.list_pod_for_all_namespaces}[kind]
    items: list[dict[str, Any]] = []
    cont: str | None = None
    trips = 0
    rv = None
    while True:
        kwargs: dict[str, Any] = {"limit": page_size, "_preload_content": False, "_request_timeout": timeout_s}
        if label_selector:
            kwargs["label_selector"] = label_selector
        if field_selector:
            kwargs["field_selector"] = field_selector
        if cont:
            kwargs["_continue"] = cont
        response = fetch(**kwargs)
        trips += 1
        body = orjson.loads(response.data)
        items.extend(body.get("items") or [])
        meta = body.get("metadata") or {}
        rv = meta.get("resourceVersion", rv)
        cont = meta.get("continue")
        if not cont:
            return Listing(items, trips, rv)


# --- what nodes and pods mean (pure) ---------------------------------------------------------


def _quantity(value: Any) -> float:
    """A Kubernetes quantity as a number ('8' -> 8, '100Gi' -> bytes, '200m' -> 0.2)."""
    if value is None:
        return 0.0
    s = str(value)
    suffixes = {
        "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50,
        "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "m": 1e-3,
    }
    for suffix in ("Ki", "Mi", "Gi", "Ti", "Pi", "k", "M", "G", "T", "m"):
        if s.endswith(suffix):
            return float(s[: -len(suffix)]) * suffixes[suffix]
    return float(s)


@dataclass
class NodeInfo:
    name: str
    ready: bool | None  # None: the Ready condition is absent or Unknown
    unschedulable: bool
    gpu_product: str | None
    gpu_capacity: int
    gpu_allocatable: int
    taints: list[dict[str, str]]
    kubelet_version: str | None
    labels: dict[str, str]
    annotations: dict[str, str]
    images: list[dict[str, Any]] = field(default_factory=list)
    created: str | None = None

    @property
    def is_gpu_node(self) -> bool:
        return self.gpu_capacity > 0 or self.gpu_product is not None


def node_info(obj: dict[str, Any], gpu_label: str = "nvidia.com/gpu.product") -> NodeInfo:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    ready: bool | None = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = {"True": True, "False": False}.get(cond.get("status"))
    return NodeInfo(
        name=meta.get("name", ""),
        ready=ready,
        unschedulable=bool(spec.get("unschedulable")),
        gpu_product=labels.get(gpu_label),
        gpu_capacity=int(_quantity((status.get("capacity") or {}).get(WHOLE_GPU))),
        gpu_allocatable=int(_quantity((status.get("allocatable") or {}).get(WHOLE_GPU))),
        taints=list(spec.get("taints") or []),
        kubelet_version=(status.get("nodeInfo") or {}).get("kubeletVersion"),
        labels=labels,
        annotations=meta.get("annotations") or {},
        images=list(status.get("images") or []),
        created=meta.get("creationTimestamp"),
    )


@dataclass
class PodInfo:
    namespace: str
    name: str
    node: str | None
    phase: str | None
    gpu_requests: dict[str, float]
    owner: str | None  # "Kind/name" of the first owner reference
    labels: dict[str, str]

    @property
    def whole_gpus(self) -> int:
        return int(self.gpu_requests.get(WHOLE_GPU, 0))

    @property
    def holds_gpu(self) -> bool:
        return any(v > 0 for v in self.gpu_requests.values())


def gpu_requests(pod: dict[str, Any]) -> dict[str, float]:
    """GPU resources the pod holds: the max of requests/limits per container, summed."""
    totals: dict[str, float] = {}
    for container in (pod.get("spec") or {}).get("containers") or []:
        res = container.get("resources") or {}
        merged: dict[str, float] = {}
        for section in ("requests", "limits"):
            for key, value in (res.get(section) or {}).items():
                if key in GPU_RESOURCES:
                    merged[key] = max(merged.get(key, 0.0), _quantity(value))
        for key, value in merged.items():
            totals[key] = totals.get(key, 0.0) + value
    return totals


def pod_info(obj: dict[str, Any]) -> PodInfo:
    meta = obj.get("metadata") or {}
    owners = meta.get("ownerReferences") or []
    owner = f"{owners[0].get('kind')}/{owners[0].get('name')}" if owners else None
    return PodInfo(
        namespace=meta.get("namespace", ""),
        name=meta.get("name", ""),
        node=(obj.get("spec") or {}).get("nodeName"),
        phase=(obj.get("status") or {}).get("phase"),
        gpu_requests=gpu_requests(obj),
        owner=owner,
        labels=meta.get("labels") or {},
    )


@dataclass
class NodeInventory:
    name: str
    ready: bool | None
    unschedulable: bool
    gpu_product: str | None
    gpus: int
    gpus_allocated: int
    gpu_pods: list[str]
    kubelet_version: str | None


@dataclass
class ClusterInventory:
    nodes: list[NodeInventory]
    gpu_nodes: int
    gpus_total: int
    gpus_allocated: int
    not_ready: list[str]
    cordoned: list[str]
    products: dict[str, int]
    kubelet_versions: dict[str, int]

    @property
    def allocation_pct(self) -> float:
        return 100.0 * self.gpus_allocated / self.gpus_total if self.gpus_total else 0.0


def summarize_inventory(nodes: Iterable[NodeInfo], pods: Iterable[PodInfo]) -> ClusterInventory:
    by_node: dict[str, list[PodInfo]] = {}
    for pod in pods:
        if pod.node and pod.holds_gpu and pod.phase not in ("Succeeded", "Failed"):
            by_node.setdefault(pod.node, []).append(pod)
    rows = []
    products: dict[str, int] = {}
    versions: dict[str, int] = {}
    for n in nodes:
        held = by_node.get(n.name, [])
        rows.append(
            NodeInventory(
                name=n.name,
                ready=n.ready,
                unschedulable=n.unschedulable,
                gpu_product=n.gpu_product,
                gpus=n.gpu_capacity,
                gpus_allocated=sum(p.whole_gpus for p in held),
                gpu_pods=[f"{p.namespace}/{p.name}" for p in held],
                kubelet_version=n.kubelet_version,
            )
        )
        if n.gpu_product:
            products[n.gpu_product] = products.get(n.gpu_product, 0) + n.gpu_capacity
        if n.kubelet_version:
            versions[n.kubelet_version] = versions.get(n.kubelet_version, 0) + 1
    gpu_rows = [r for r in rows if r.gpus > 0 or r.gpu_product]
    return ClusterInventory(
        nodes=rows,
        gpu_nodes=len(gpu_rows),
        gpus_total=sum(r.gpus for r in gpu_rows),
        gpus_allocated=sum(r.gpus_allocated for r in gpu_rows),
        not_ready=[r.name for r in rows if r.ready is not True],
        cordoned=[r.name for r in rows if r.unschedulable],
        products=products,
        kubelet_versions=versions,
    )


# --- tasks ---------------------------------------------------------------------------------


def _cluster(platform: str, cluster: str | None) -> ClusterConfig:
    from blocks.platform import Platform

    return Platform(platform).config.cluster(cluster)


@task(name="list-nodes", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_nodes(platform: str, cluster: str | None = None, label_selector: str | None = None) -> list[NodeInfo]:
    """All nodes of the cluster (paginated), as `NodeInfo`."""
    cfg = _cluster(platform, cluster)
    with api_client_for(cfg) as api:
        listing = list_raw(api, "nodes", label_selector=label_selector, timeout_s=cfg.request_timeout_s)
    return [node_info(o, cfg.gpu_node_label) for o in listing.items]


@task(name="list-gpu-pods", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_gpu_pods(platform: str, cluster: str | None = None) -> list[PodInfo]:
    """Pods on any node that hold GPU resources (whole GPUs or shares), not yet finished."""
    cfg = _cluster(platform, cluster)
    with api_client_for(cfg) as api:
        listing = list_raw(
            api, "pods", field_selector="status.phase!=Succeeded,status.phase!=Failed",
            timeout_s=cfg.request_timeout_s,
        )
    return [p for p in (pod_info(o) for o in listing.items) if p.holds_gpu]
