"""The nodes' images, image filesystems and prune Jobs, through the Kubernetes API.

- Two paginated listings, run together: nodes (``status.images``) and pods (every phase: a stopped
  container still pins its image), each object reduced to what the audit needs as its page arrives.
- The kubelet summary API per node, through the API server's node proxy
  ``GET /api/v1/nodes/<node>/proxy/stats/summary`` (k8s.io/kubelet/pkg/apis/stats/v1alpha1 ``Summary``:
  ``node.runtime.imageFs``), many nodes at a time in threads; a node without stats is `unknown`.
- Prune (a step of image-prune's operation): one ``batch/v1`` Job pinned to each node (``spec.nodeName``) runs `crictl` through the host's
  CRI socket for exactly the planned image ids, passed as argv (no shell interpolation of values). Just
  before each removal the Job checks ``crictl ps -a --image <id>`` and skips an image a container uses
  (as Eraser's remover skips running images). Each Job prints one JSON line per image; the flow reads
  the Job pod's log. Jobs are found by one label-selected list per poll, never one call per node.
"""

from __future__ import annotations

import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import orjson
from kubernetes import client as k8s
from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.image_analysis import (
    IMAGE_ID_RE,
    ImageFs,
    NodeImage,
    NodeImages,
    NodePrunePlan,
    PodImages,
)
from tasks.kubernetes import ARGO_WORKFLOW_LABEL, list_raw

PAGE_SIZE = 5000
SUMMARY_WORKERS = 10  # the kubernetes client pools 10 connections per host
PRUNE_LABEL = "app.kubernetes.io/name"
PRUNE_LABEL_VALUE = "image-prune"
RUN_LABEL = "ai-platform-ops/prune-run"
CRI_SOCKET = "/run/containerd/containerd.sock"
# The Job's script: argv after "--" are image ids; values reach crictl as arguments, never as shell text.
PRUNE_SCRIPT = r"""
for id in "$@"; do
  if [ -n "$(crictl ps -a -q --image "$id" 2>/dev/null)" ]; then
    printf '{"image":"%s","result":"in-use"}\n' "$id"
  elif ! crictl inspecti "$id" >/dev/null 2>&1; then
    printf '{"image":"%s","result":"missing"}\n' "$id"
  elif crictl rmi "$id" >/dev/null 2>&1; then
    printf '{"image":"%s","result":"removed"}\n' "$id"
  else
    printf '{"image":"%s","result":"error"}\n' "$id"
  fi
done
"""


# --- reading -----------------------------------------------------------------------------------


def _node(obj: dict[str, Any]) -> NodeImages:
    images = [NodeImage(tuple(i.get("names") or ()), int(i.get("sizeBytes") or 0))
              for i in (obj.get("status") or {}).get("images") or []]
    return NodeImages(obj["metadata"]["name"], images, uid=obj["metadata"].get("uid", ""))


def _is_training(obj: dict[str, Any]) -> bool:
    meta, spec = obj.get("metadata") or {}, obj.get("spec") or {}
    if ARGO_WORKFLOW_LABEL in (meta.get("labels") or {}):
        return True
    if any(o.get("kind") in ("Job", "Workflow") for o in meta.get("ownerReferences") or []):
        return True
    return any(k.startswith(("nvidia.com/", "aliyun.com/"))
               for c in spec.get("containers") or [] for k in ((c.get("resources") or {}).get("limits") or {}))


def pod_images(obj: dict[str, Any]) -> PodImages | None:
    """A pod's image references: containers, initContainers, ephemeralContainers and every status imageID."""
    spec, status, meta = obj.get("spec") or {}, obj.get("status") or {}, obj.get("metadata") or {}
    node = spec.get("nodeName")
    if not node:
        return None
    refs = tuple(c["image"] for key in ("containers", "initContainers", "ephemeralContainers")
                 for c in spec.get(key) or [] if c.get("image"))
    ids = tuple(s["imageID"] for key in ("containerStatuses", "initContainerStatuses", "ephemeralContainerStatuses")
                for s in status.get(key) or [] if s.get("imageID"))
    return PodImages(meta.get("namespace", ""), meta.get("name", ""), node, refs, ids, _is_training(obj),
                     status.get("phase", ""))


def imagefs_of(summary: dict[str, Any]) -> ImageFs | None:
    """``node.runtime.imageFs`` of a kubelet Summary; None when the kubelet has none (no CRI stats)."""
    fs = ((summary.get("node") or {}).get("runtime") or {}).get("imageFs") or {}
    if not fs.get("capacityBytes") or fs.get("availableBytes") is None:
        return None
    return ImageFs(int(fs["capacityBytes"]), int(fs["availableBytes"]), fs.get("usedBytes"))


def read_summary(api: k8s.ApiClient, node: str, timeout_s: float) -> ImageFs:
    """GET /api/v1/nodes/<node>/proxy/stats/summary (the API server proxies to the kubelet's :10250)."""
    r = k8s.CoreV1Api(api).connect_get_node_proxy_with_path(node, "stats/summary", _preload_content=False,
                                                             _request_timeout=timeout_s)
    fs = imagefs_of(orjson.loads(r.data))
    if fs is None:
        raise LookupError("the kubelet summary has no node.runtime.imageFs")
    return fs


@dataclass
class NodeScan:
    nodes: list[NodeImages]
    pods: list[PodImages]
    list_calls: int
    summary_calls: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def fetch_pods(api: k8s.ApiClient, page_size: int = PAGE_SIZE, timeout_s: float = 15.0):
    return list_raw(api, "pods", page_size=page_size, timeout_s=timeout_s, transform=pod_images)


def fetch_node_images(api: k8s.ApiClient, page_size: int = PAGE_SIZE, timeout_s: float = 15.0,
                      summaries: bool = True, workers: int = SUMMARY_WORKERS) -> NodeScan:
    """Nodes and pods (two listings, together), then every node's image filesystem (threads)."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=2, thread_name_prefix="k8s-list") as pool:
        nodes_f = pool.submit(list_raw, api, "nodes", page_size=page_size, timeout_s=timeout_s, transform=_node)
        pods_f = pool.submit(fetch_pods, api, page_size, timeout_s)
        nodes, pods = nodes_f.result(), pods_f.result()
    t1 = time.perf_counter()
    scan = NodeScan(nodes.items, pods.items, nodes.round_trips + pods.round_trips,
                    seconds={"list_s": t1 - t0})
    if summaries and scan.nodes:
        def one(n: NodeImages) -> None:
            try:
                n.imagefs = read_summary(api, n.name, timeout_s)
            except Exception as exc:  # noqa: BLE001 - a node without stats is unknown, never healthy
                status = getattr(exc, "status", None)
                n.stats_error = f"no summary stats ({status or type(exc).__name__})"
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kubelet-summary") as pool:
            list(pool.map(one, scan.nodes))
        scan.summary_calls = len(scan.nodes)
        scan.seconds["summary_s"] = time.perf_counter() - t1
    return scan


@task(name="scan-node-images", cache_policy=NONE, **TRANSIENT_RETRIES)
def scan_node_images_task(api: k8s.ApiClient, page_size: int = PAGE_SIZE, timeout_s: float = 15.0) -> NodeScan:
    """Every node's images and image filesystem, every pod's images: one task for the whole cluster."""
    return fetch_node_images(api, page_size, timeout_s)


# --- pruning -------------------------------------------------------------------------------------


def prune_job(node: str, image_ids: list[str], run_id: str, namespace: str, image: str) -> dict[str, Any]:
    """The Job that prunes `image_ids` on `node` (pinned by nodeName, tolerating every taint)."""
    for i in image_ids:
        if not IMAGE_ID_RE.match(i):
            raise ValueError(f"refusing to prune {i!r}: not a plain image reference or digest")
    name = f"image-prune-{run_id[:8]}-{uuid.uuid5(uuid.NAMESPACE_DNS, node).hex[:10]}"
    labels = {PRUNE_LABEL: PRUNE_LABEL_VALUE, RUN_LABEL: run_id}
    return {
        "apiVersion": "batch/v1", "kind": "Job",
        "metadata": {"name": name, "namespace": namespace, "labels": labels,
                     "annotations": {"ai-platform-ops/node": node}},
        "spec": {"backoffLimit": 0, "ttlSecondsAfterFinished": 86400, "activeDeadlineSeconds": 1800,
                 "template": {"metadata": {"labels": labels}, "spec": {
                     "nodeName": node, "restartPolicy": "Never", "tolerations": [{"operator": "Exists"}],
                     "containers": [{"name": "crictl", "image": image,
                                     "command": ["/bin/sh", "-c", PRUNE_SCRIPT, "prune", *image_ids],
                                     "env": [{"name": "CONTAINER_RUNTIME_ENDPOINT", "value": f"unix://{CRI_SOCKET}"}],
                                     "volumeMounts": [{"name": "cri", "mountPath": CRI_SOCKET}],
                                     "securityContext": {"privileged": True}}],
                     "volumes": [{"name": "cri", "hostPath": {"path": CRI_SOCKET, "type": "Socket"}}]}}},
    }


def parse_prune_log(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        if isinstance(rec, dict) and "image" in rec:
            out[str(rec["image"])] = str(rec.get("result", "error"))
    return out


def run_prune_jobs(api: k8s.ApiClient, plan: NodePrunePlan, namespace: str, image: str, run_id: str,
                   timeout_s: float = 900.0, poll_s: float = 0.5, request_timeout_s: float = 15.0
                   ) -> dict[str, dict[str, str]]:
    """Create one Job per node, wait for all (one list call per poll), read each Job pod's log.
    Returns node -> image id -> result (removed / in-use / missing / error / not-run)."""
    batch, core = k8s.BatchV1Api(api), k8s.CoreV1Api(api)
    jobs = {}
    for n in plan.nodes:
        body = prune_job(n.node, [i.id for i in n.images], run_id, namespace, image)
        batch.create_namespaced_job(namespace, body, _request_timeout=request_timeout_s)
        jobs[body["metadata"]["name"]] = n
    selector = f"{RUN_LABEL}={run_id}"
    deadline = time.monotonic() + timeout_s
    done: dict[str, str] = {}
    while len(done) < len(jobs) and time.monotonic() < deadline:
        listing = batch.list_namespaced_job(namespace, label_selector=selector, _request_timeout=request_timeout_s)
        for j in listing.items:
            st = j.status or k8s.V1JobStatus()
            if j.metadata.name in jobs and ((st.succeeded or 0) > 0 or (st.failed or 0) > 0):
                done[j.metadata.name] = "succeeded" if (st.succeeded or 0) > 0 else "failed"
        if len(done) < len(jobs):
            time.sleep(poll_s)
    pods = core.list_namespaced_pod(namespace, label_selector=selector, _request_timeout=request_timeout_s).items
    pod_of = {(p.metadata.labels or {}).get("job-name"): p.metadata.name for p in pods}
    out: dict[str, dict[str, str]] = {}

    def read(job: str) -> tuple[str, dict[str, str]]:
        n = jobs[job]
        results = {i.id: "not-run" for i in n.images}
        if job in done and pod_of.get(job):
            log = core.read_namespaced_pod_log(pod_of[job], namespace, _request_timeout=request_timeout_s)
            results.update({k: v for k, v in parse_prune_log(log).items() if k in results})
        return n.node, results

    with ThreadPoolExecutor(max_workers=16, thread_name_prefix="prune-logs") as pool:
        for node, results in pool.map(read, list(jobs)):
            out[node] = results
    return out
