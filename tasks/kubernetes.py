"""Talking to the Kubernetes API (official `kubernetes` client), and what nodes and pods mean.

Listings are paginated (`limit`/`continue`), fetched raw (`_preload_content=False`) and parsed
with orjson into plain dicts, then trimmed to the typed summaries below: the typed client's
model deserialisation costs seconds for a few thousand nodes and is never used for listings.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import orjson
from kubernetes import client as k8s
from kubernetes import config as k8s_config
from prefect import task
from prefect.cache_policies import NONE

from blocks.config import ClusterConfig
from tasks._gc import gc_paused
from tasks._retry import TRANSIENT_RETRIES
from tasks.gpu_model import (
    DEFAULT_EXPORTER_SELECTORS,
    REPAIR_ANNOTATION,
    UNHEALTHY_TAINT_KEY,
    ExporterPod,
    FleetSnapshot,
    GPUNode,
    GPUPod,
    GPUResources,
)

# Extended resources that hold (part of) a GPU (`tasks.gpu_model.GPUResources`: configurable in
# `thresholds.gpu`): whole GPUs, time-sliced and HAMi shares, Alibaba's GPU share, MIG slices.
DEFAULT_GPU_RESOURCES = GPUResources()
GPU_RESOURCES = DEFAULT_GPU_RESOURCES.whole + DEFAULT_GPU_RESOURCES.shared
WHOLE_GPU = "nvidia.com/gpu"
DEFAULT_PAGE_SIZE = 500


# --- clients -------------------------------------------------------------------------------
#
# A flow gets its ApiClient from its `Platform` (`plat.kubernetes(cluster)`, one per run) and hands
# it, with the cluster's config, to the tasks below; the tasks never build or close one.


def api_client_from_kubeconfig(path: str, context: str | None = None) -> k8s.ApiClient:
    """An ApiClient straight from a kubeconfig file (benchmarks and sandbox tests, outside any flow)."""
    return k8s_config.new_client_from_config(str(path), context=context)


@dataclass
class Listing:
    items: list[Any]
    round_trips: int


def list_raw(
    api: k8s.ApiClient,
    kind: str,
    *,
    label_selector: str | None = None,
    field_selector: str | None = None,
    page_size: int = DEFAULT_PAGE_SIZE,
    timeout_s: float = 15.0,
    transform: Callable[[dict[str, Any]], Any] | None = None,
) -> Listing:
    """Every object of `kind` ('nodes', 'pods' or 'secrets', cluster-wide) as plain dicts, page by page.

    `transform`, when given, turns each object into what the caller keeps (None drops it) as each
    page arrives, so a big listing never holds more than one page of raw objects.
    """
    core = k8s.CoreV1Api(api)
    fetch = {"nodes": core.list_node, "pods": core.list_pod_for_all_namespaces,
             "secrets": core.list_secret_for_all_namespaces}[kind]
    items: list[dict[str, Any]] = []
    cont: str | None = None
    trips = 0
    with gc_paused():  # parsed JSON is acyclic; the collector would only re-walk it (tasks/_gc.py)
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
            page = body.get("items") or []
            if transform is None:
                items.extend(page)
            else:
                items.extend(kept for kept in map(transform, page) if kept is not None)
            del page
            cont = (body.get("metadata") or {}).get("continue")
            if not cont:
                return Listing(items, trips)


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
    taints: list[dict[str, str]]
    kubelet_version: str | None
    labels: dict[str, str]
    annotations: dict[str, str]


def node_ready(status: dict[str, Any]) -> bool | None:
    """The Ready condition: True, False, or None when it is absent or Unknown (never assumed healthy)."""
    ready: bool | None = None
    for cond in status.get("conditions") or []:
        if cond.get("type") == "Ready":
            ready = {"True": True, "False": False}.get(cond.get("status"))
    return ready


def node_info(obj: dict[str, Any], gpu_label: str = "nvidia.com/gpu.product") -> NodeInfo:
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    return NodeInfo(
        name=meta.get("name", ""),
        ready=node_ready(status),
        unschedulable=bool(spec.get("unschedulable")),
        gpu_product=labels.get(gpu_label),
        gpu_capacity=int(_quantity((status.get("capacity") or {}).get(WHOLE_GPU))),
        taints=list(spec.get("taints") or []),
        kubelet_version=(status.get("nodeInfo") or {}).get("kubeletVersion"),
        labels=labels,
        annotations=meta.get("annotations") or {},
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


def gpu_requests(pod: dict[str, Any], resources: GPUResources = DEFAULT_GPU_RESOURCES) -> dict[str, float]:
    """GPU resources the pod holds, as the scheduler counts them: per container the max of requests and
    limits; the pod's request is the larger of its containers' sum and any one init container's
    (Kubernetes docs, "Init containers: resource sharing within containers")."""

    def of(container: dict[str, Any]) -> dict[str, float]:
        res = container.get("resources") or {}
        merged: dict[str, float] = {}
        for section in ("requests", "limits"):
            for key, value in (res.get(section) or {}).items():
                if resources.holds(key):
                    merged[key] = max(merged.get(key, 0.0), _quantity(value))
        return merged

    spec = pod.get("spec") or {}
    totals: dict[str, float] = {}
    for container in spec.get("containers") or []:
        for key, value in of(container).items():
            totals[key] = totals.get(key, 0.0) + value
    for container in spec.get("initContainers") or []:
        for key, value in of(container).items():
            totals[key] = max(totals.get(key, 0.0), value)
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


@task(name="list-nodes", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_nodes(api: k8s.ApiClient, cluster: ClusterConfig, label_selector: str | None = None) -> list[NodeInfo]:
    """All nodes of the cluster (paginated), as `NodeInfo`."""
    listing = list_raw(api, "nodes", label_selector=label_selector, timeout_s=cluster.request_timeout_s)
    return [node_info(o, cluster.gpu_node_label) for o in listing.items]


@task(name="list-gpu-pods", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_gpu_pods(api: k8s.ApiClient, cluster: ClusterConfig) -> list[PodInfo]:
    """Pods on any node that hold GPU resources (whole GPUs or shares), not yet finished."""
    listing = list_raw(api, "pods", field_selector="status.phase!=Succeeded,status.phase!=Failed",
                       timeout_s=cluster.request_timeout_s)
    return [p for p in (pod_info(o) for o in listing.items) if p.holds_gpu]


# --- the GPU sweep's view of a cluster ---------------------------------------------------------
#
# Two listings whatever the fleet's size: GPU nodes (by the GPU label) and the pods that are not
# finished, trimmed page by page to what the sweep reads (exporter pods and pods holding GPUs).
# Pages of 10,000 objects: the API server treats `limit` as a chunk size with no upper bound, and
# informers (kube-state-metrics, Prometheus' Kubernetes discovery) already list every pod in one
# response; at 10,000 a 2,000-node fleet (2,000 nodes, ~8,400 pods) is one page of each, a
# 10,000-node fleet 1 + 5, and this process holds one raw page at a time.

SWEEP_PAGE_SIZE = 10_000
ARGO_WORKFLOW_LABEL = "workflows.argoproj.io/workflow"  # set by Argo's controller on every workflow pod


def _equality_selector(selector: str) -> list[tuple[str, str]]:
    terms = []
    for term in selector.split(","):
        key, sep, value = term.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"exporter selector: expected key=value[,key=value], got {selector!r}")
        terms.append((key.strip(), value.strip().lstrip("=")))
    return terms


def _selectors(selectors: str | tuple[str, ...] | list[str]) -> list[list[tuple[str, str]]]:
    return [_equality_selector(s) for s in ((selectors,) if isinstance(selectors, str) else selectors)]


def _container_started(status: dict[str, Any]) -> str | None:
    """When the pod's first container last started (a restart of dcgm-exporter resets its XID gauge)."""
    for cs in status.get("containerStatuses") or []:
        running = (cs.get("state") or {}).get("running") or {}
        if running.get("startedAt"):
            return running["startedAt"]
    return status.get("startTime")


def _gpu_node(obj: dict[str, Any]):
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    capacity = (status.get("capacity") or {}).get(WHOLE_GPU)
    if capacity is None:
        capacity = labels.get("nvidia.com/gpu.count")
    try:
        cap = int(_quantity(capacity))
    except ValueError:
        cap = 0
    try:
        alloc = int(_quantity((status.get("allocatable") or {}).get(WHOLE_GPU, cap)))
    except ValueError:
        alloc = 0
    return GPUNode(name=meta.get("name", ""), ready=node_ready(status), unschedulable=bool(spec.get("unschedulable")),
                   capacity=cap, allocatable=alloc, taints=list(spec.get("taints") or []),
                   annotations=meta.get("annotations") or {}, uid=meta.get("uid", ""))


def _sweep_pod(obj: dict[str, Any], exporter_terms: list[list[tuple[str, str]]],
               resources: GPUResources = DEFAULT_GPU_RESOURCES):
    meta = obj.get("metadata") or {}
    spec = obj.get("spec") or {}
    status = obj.get("status") or {}
    labels = meta.get("labels") or {}
    if any(all(labels.get(k) == v for k, v in terms) for terms in exporter_terms):
        return ExporterPod(namespace=meta.get("namespace", ""), name=meta.get("name", ""), node=spec.get("nodeName"),
                           ip=status.get("podIP"), phase=status.get("phase"), started=_container_started(status))
    requests = gpu_requests(obj, resources)
    if not any(v > 0 for v in requests.values()):
        return None
    owners = meta.get("ownerReferences") or []
    owner = f"{owners[0].get('kind')}/{owners[0].get('name')}" if owners else None
    whole = sum(v for k, v in requests.items() if k in resources.whole)
    return GPUPod(namespace=meta.get("namespace", ""), name=meta.get("name", ""), node=spec.get("nodeName"),
                  owner=owner, whole_gpus=int(whole),
                  shares={k: v for k, v in requests.items() if k not in resources.whole},
                  started=status.get("startTime") or meta.get("creationTimestamp"),
                  daemonset=bool(owners) and owners[0].get("kind") == "DaemonSet",
                  workflow=labels.get(ARGO_WORKFLOW_LABEL))


def fetch_gpu_fleet(api: k8s.ApiClient, *, gpu_node_label: str = "nvidia.com/gpu.product",
                    exporter_selectors: str | tuple[str, ...] = DEFAULT_EXPORTER_SELECTORS,
                    resources: GPUResources = DEFAULT_GPU_RESOURCES, page_size: int = SWEEP_PAGE_SIZE,
                    timeout_s: float = 15.0):
    """GPU nodes, pods holding GPUs and exporter pods of one cluster: two paginated listings, run together.

    An exporter pod is one matching any of `exporter_selectors` (the GPU operator's and the standalone
    chart's labels by default)."""
    terms = _selectors(exporter_selectors)
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="k8s-list") as pool:
        nodes_f = pool.submit(list_raw, api, "nodes", label_selector=gpu_node_label, page_size=page_size,
                              timeout_s=timeout_s, transform=_gpu_node)
        pods_f = pool.submit(list_raw, api, "pods", field_selector="status.phase!=Succeeded,status.phase!=Failed",
                             page_size=page_size, timeout_s=timeout_s, transform=lambda o: _sweep_pod(o, terms, resources))
        nodes, pods = nodes_f.result(), pods_f.result()
    exporters = [p for p in pods.items if isinstance(p, ExporterPod)]
    holders = [p for p in pods.items if not isinstance(p, ExporterPod)]
    return FleetSnapshot(nodes=nodes.items, pods=holders, exporters=exporters,
                         round_trips=nodes.round_trips + pods.round_trips)


@task(name="list-gpu-fleet", cache_policy=NONE, **TRANSIENT_RETRIES)
def list_gpu_fleet(api: k8s.ApiClient, settings: Any):
    """The cluster's GPU nodes, GPU-holding pods and dcgm-exporter pods (`FleetSnapshot`); `settings` is
    a `tasks.gpu_model.SweepSettings`."""
    return fetch_gpu_fleet(api, gpu_node_label=settings.gpu_node_label, exporter_selectors=settings.exporter_selectors,
                           resources=settings.resources, page_size=settings.page_size, timeout_s=settings.timeout_s)


# --- the cluster's identity ------------------------------------------------------------------------


def cluster_identity(api: k8s.ApiClient, timeout_s: float = 15.0) -> str:
    """The cluster's identity: the `kube-system` namespace's metadata.uid, read through the API.

    A cluster has no ID field of its own; the uid of a namespace every cluster has, and that lives as long as
    the cluster, is the accepted stand-in (Kubernetes API conventions, "Metadata": a uid is unique in time
    and space and never reused; kubeadm and Cluster API's clusterctl identify a cluster the same way). A
    cluster re-created under the same name or server address has another uid."""
    ns = _read_raw(k8s.CoreV1Api(api).read_namespace, "kube-system", timeout_s)
    uid = (ns.get("metadata") or {}).get("uid")
    if not uid:
        raise LookupError("the kube-system namespace has no metadata.uid: cannot tell which cluster this is")
    return uid


# --- cordon, taint, uncordon, drain ----------------------------------------------------------------
#
# Nodes are changed with JSON merge patches (the client's default for a dict body): maps merge,
# lists replace, so the taint list is always sent whole, built from the node as it is now. Each change
# names the node's uid: a node deleted and re-created under the same name is another node (API
# conventions: metadata.uid), so a change planned for the old one is refused, and the patch carries the
# uid too (the API server rejects a patch that would change it: the field is immutable).


def _read_raw(read: Callable[..., Any], name: str, timeout_s: float) -> dict[str, Any]:
    return orjson.loads(read(name, _preload_content=False, _request_timeout=timeout_s).data)


def read_node(api: k8s.ApiClient, name: str, uid: str | None = None, timeout_s: float = 15.0) -> dict[str, Any]:
    """The node as the API has it now; when `uid` is given, it must be that node (not one re-created)."""
    obj = _read_raw(k8s.CoreV1Api(api).read_node, name, timeout_s)
    now = (obj.get("metadata") or {}).get("uid")
    if uid and now != uid:
        raise RuntimeError(f"node {name} is another node now (uid {now}, planned {uid}): it was deleted and "
                           "re-created; nothing changed on it")
    return obj


def cordon_and_taint(api: k8s.ApiClient, node: str, reason: str, annotation: str, *, taint_key: str,
                     annotation_key: str, uid: str | None = None, timeout_s: float = 15.0) -> str:
    """Cordon `node`, add the taint `taint_key=reason:NoSchedule` and the annotation. Idempotent."""
    obj = read_node(api, node, uid, timeout_s)
    spec = obj.get("spec") or {}
    taints = [t for t in spec.get("taints") or []]
    ours = [t for t in taints if t.get("key") == taint_key]
    was_cordoned = bool(spec.get("unschedulable"))
    if was_cordoned and ours:
        return "already cordoned and tainted"
    if not ours:
        taints.append({"key": taint_key, "value": reason, "effect": "NoSchedule"})
    patch = {"spec": {"unschedulable": True, "taints": taints},
             "metadata": {"uid": obj["metadata"]["uid"], "annotations": {annotation_key: annotation}}}
    k8s.CoreV1Api(api).patch_node(node, patch, _request_timeout=timeout_s)
    return f"cordoned{' (was already unschedulable)' if was_cordoned else ''}, tainted {taint_key}={reason}"


def uncordon_and_untaint(api: k8s.ApiClient, node: str, *, taint_key: str, annotation_key: str,
                         uid: str | None = None, timeout_s: float = 15.0, repair_note: str | None = None,
                         repair_key: str = REPAIR_ANNOTATION) -> str:
    """Remove our taint and annotation and uncordon `node` (idempotent); record the repair (`repair_note`,
    its time and the XIDs dcgm-exporter still shows) under `repair_key`."""
    obj = read_node(api, node, uid, timeout_s)
    spec = obj.get("spec") or {}
    annotations = (obj.get("metadata") or {}).get("annotations") or {}
    taints = [t for t in spec.get("taints") or [] if t.get("key") != taint_key]
    if not spec.get("unschedulable") and len(taints) == len(spec.get("taints") or []) \
            and annotation_key not in annotations:
        return "already schedulable and untainted"
    patch = {"spec": {"unschedulable": None, "taints": taints or None},
             "metadata": {"uid": obj["metadata"]["uid"],
                          "annotations": {annotation_key: None, **({repair_key: repair_note} if repair_note else {})}}}
    k8s.CoreV1Api(api).patch_node(node, patch, _request_timeout=timeout_s)
    return f"uncordoned, removed {taint_key}"


def is_cordoned_by_us(obj: dict[str, Any], taint_key: str = UNHEALTHY_TAINT_KEY) -> bool:
    """Read back: the node is unschedulable and carries our taint."""
    spec = obj.get("spec") or {}
    return bool(spec.get("unschedulable")) and any(t.get("key") == taint_key for t in spec.get("taints") or [])


def evict_pods_on(api: k8s.ApiClient, node: str, timeout_s: float = 15.0) -> list[dict[str, Any]]:
    """Evict every pod on `node` except DaemonSet pods, through the eviction API.

    A PodDisruptionBudget that forbids the eviction makes the API server answer 429: that pod is
    reported as `blocked` and left running (never forced, never deleted).
    """
    from kubernetes.client.exceptions import ApiException

    core = k8s.CoreV1Api(api)
    listing = list_raw(api, "pods", field_selector=f"spec.nodeName={node},status.phase!=Succeeded,status.phase!=Failed",
                       timeout_s=timeout_s)
    out = []
    for pod in listing.items:
        meta = pod.get("metadata") or {}
        owners = meta.get("ownerReferences") or []
        ref = f"{meta.get('namespace')}/{meta.get('name')}"
        if owners and owners[0].get("kind") == "DaemonSet":
            continue
        body = k8s.V1Eviction(metadata=k8s.V1ObjectMeta(name=meta.get("name"), namespace=meta.get("namespace")))
        try:
            core.create_namespaced_pod_eviction(meta.get("name"), meta.get("namespace"), body,
                                                _request_timeout=timeout_s)
            out.append({"node": node, "pod": ref, "result": "evicted"})
        except ApiException as exc:
            if exc.status == 429:
                out.append({"node": node, "pod": ref, "result": "blocked",
                            "detail": "a PodDisruptionBudget forbids it: left running"})
            elif exc.status == 404:
                out.append({"node": node, "pod": ref, "result": "gone"})
            else:
                out.append({"node": node, "pod": ref, "result": "error", "detail": f"HTTP {exc.status}: {exc.reason}"})
    return out


def drain_nodes(api: k8s.ApiClient, nodes: list[str], timeout_s: float = 15.0) -> list[dict]:
    """Evict the non-DaemonSet pods of each node, respecting PodDisruptionBudgets (429: reported, not forced)."""
    return [r for n in nodes for r in evict_pods_on(api, n, timeout_s)]
