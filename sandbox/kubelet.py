"""A simulated kubelet per node of the emulated cluster: node images, the summary API, prune Jobs.

- ``status.images``: as the kubelet reports them from the CRI ImageService (pkg/kubelet/nodestatus/
  setters.go ``Images``): ``names`` holds the repo digest ``repo@sha256:...`` then the tags, and
  ``sizeBytes``; each node also holds older images no pod uses (what a rolled-forward training image leaves).
- pods get ``status.containerStatuses[].imageID`` (the runtime's resolved digest, docker-pullable form).
- ``GET /api/v1/nodes/<node>/proxy/stats/summary``: the kubelet Summary (k8s.io/kubelet/pkg/apis/stats/
  v1alpha1 types.go) with ``node.runtime.imageFs``; a node in `no_stats` answers 503 as the API server's
  proxy does when it cannot reach the kubelet ("error trying to reach service").
- ``batch/v1`` Jobs labelled ``app.kubernetes.io/name=image-prune``: the Job controller makes a pod, the
  kubelet runs it; its `crictl` stand-in checks ``crictl ps -a --image`` against the pods on the node at
  that moment (a container of any state pins its image: containerd's image delete refuses images in use),
  removes the others from the node's ``status.images`` and prints the Job's JSON lines to the pod log;
  the Job gets ``succeeded: 1`` and a ``Complete`` condition (pkg/controller/job).
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
from typing import Any

import aiohttp.web

from sandbox.kube import _status

GB = 1_000_000_000
# Older images a GPU node still holds, no pod using them (rolled-forward training bases, one-off tools).
STALE_IMAGES = [
    ("registry.example.internal/limx-rl/base:v8", 17_600_000_000),
    ("registry.example.internal/limx-rl/base:latest", 18_400_000_000),
    ("docker.io/library/ubuntu:22.04", 77_000_000),
]


def _digest(*parts: object) -> str:
    return "sha256:" + hashlib.sha256("/".join(map(str, parts)).encode()).hexdigest()


def _repo(ref: str) -> str:
    name = ref.split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}" if head else last.split(":", 1)[0]


def image_entry(ref: str, size: int) -> dict[str, Any]:
    return {"names": [f"{_repo(ref)}@{_digest('image', ref)}", ref], "sizeBytes": size}


def _now() -> str:
    return datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class KubeletSimulator:
    def __init__(self, kube: Any):
        self.kube = kube
        self.no_stats: set[str] = set()
        self.capacity: dict[str, int] = {}
        self.other_bytes: dict[str, int] = {}
        self.logs: dict[tuple[str, str], str] = {}
        kube.hooks.append(self._hook)

    # -- seeding ------------------------------------------------------------------------------

    def seed(self, nodes: list[dict[str, Any]], pods: list[dict[str, Any]]) -> None:
        """Rewrite the seeded nodes' images with digests, add stale ones, give pods imageIDs; set each node's
        image filesystem: most comfortable, some near GC, one past the soft eviction threshold, the first
        control-plane node's kubelet unreachable."""
        gpu = [n for n in nodes if "nvidia.com/gpu" in n["status"]["capacity"]]
        for i, node in enumerate(nodes):
            name = node["metadata"]["name"]
            images = [image_entry(e["names"][0], e["sizeBytes"]) for e in node["status"].get("images", [])]
            if node in gpu:
                images += [image_entry(r, s) for r, s in STALE_IMAGES[: 1 + (i % 3)]]
            node["status"]["images"] = images
            used = sum(e["sizeBytes"] for e in images)
            cap = 200 * GB
            self.capacity[name] = cap
            # what else lives on the image filesystem (container layers, logs): the node's share of pressure
            j = gpu.index(node) if node in gpu else -1
            target = {0: 0.88, 1: 0.62}.get(j, 0.40) if j >= 0 else 0.10  # used fraction of capacity
            self.other_bytes[name] = max(0, int(target * cap) - used)
        if nodes:
            self.no_stats.add(nodes[0]["metadata"]["name"])
        for pod in pods:
            spec = pod["spec"]
            pod.setdefault("status", {})["containerStatuses"] = [
                {"name": c["name"], "image": c["image"], "ready": True, "restartCount": 0,
                 "imageID": f"{_repo(c['image'])}@{_digest('image', c['image'])}"}
                for c in spec.get("containers", [])]  # no `state`: the GPU sweep reads pod ages from startTime

    def summary(self, node: str) -> dict[str, Any] | None:
        obj = self.kube.get_object("v1/nodes", None, node)
        if obj is None:
            return None
        used = sum(i["sizeBytes"] for i in obj["status"].get("images", [])) + self.other_bytes.get(node, 0)
        cap = self.capacity.get(node, 200 * GB)
        fs = {"time": _now(), "capacityBytes": cap, "availableBytes": max(cap - used, 0), "usedBytes": used,
              "inodesFree": 10_000_000, "inodes": 12_000_000, "inodesUsed": 2_000_000}
        return {"node": {"nodeName": node, "startTime": _now(),
                         "fs": {**fs, "usedBytes": used // 2},
                         "runtime": {"imageFs": fs}},
                "pods": []}

    # -- the API hooks ------------------------------------------------------------------------

    async def _hook(self, request: Any, method: str) -> aiohttp.web.StreamResponse | None:
        plural = request.resource.plural
        sub = request.subresource or ""
        if plural == "nodes" and sub.startswith("proxy/") and method == "GET":
            if sub != "proxy/stats/summary":
                return _status(404, "NotFound", "the sandbox kubelet serves only /stats/summary")
            if request.name in self.no_stats:
                return _status(503, "ServiceUnavailable",
                               f"error trying to reach service: dial tcp {request.name}:10250: connect: "
                               "connection refused")
            body = self.summary(request.name)
            if body is None:
                return _status(404, "NotFound", f'nodes "{request.name}" not found')
            return aiohttp.web.json_response(body)
        if plural == "pods" and sub == "log" and method == "GET":
            key = (request.namespace, request.name)
            if key not in self.logs:
                return None
            return aiohttp.web.Response(text=self.logs[key], content_type="text/plain")
        if plural == "jobs" and method == "POST" and isinstance(request.data, dict):
            labels = (request.data.get("metadata") or {}).get("labels") or {}
            if labels.get("app.kubernetes.io/name") == "image-prune":
                ns, name = request.namespace, request.data["metadata"]["name"]
                asyncio.get_running_loop().call_later(0.05, self._run_job, ns, name)
        return None

    def _run_job(self, namespace: str, name: str) -> None:
        job = self.kube.get_object("batch/v1/jobs", namespace, name)
        if job is None:
            return
        tmpl = job["spec"]["template"]
        node = tmpl["spec"]["nodeName"]
        argv = tmpl["spec"]["containers"][0]["command"]
        ids = argv[4:]  # /bin/sh -c SCRIPT prune ID...
        lines = [json.dumps({"image": i, "result": self._crictl_rmi(node, i)}) for i in ids]
        pod_name = f"{name}-{hashlib.sha1(name.encode()).hexdigest()[:5]}"
        labels = {**(tmpl.get("metadata") or {}).get("labels", {}), "job-name": name}
        self.kube.put_object("v1/pods", namespace, pod_name, {
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name, "namespace": namespace,
                                                            "labels": labels},
            "spec": {**tmpl["spec"]}, "status": {"phase": "Succeeded"}})
        self.logs[(namespace, pod_name)] = "\n".join(lines) + "\n"
        self.kube.patch_object("batch/v1/jobs", namespace, name, {"status": {
            "succeeded": 1, "startTime": _now(), "completionTime": _now(),
            "conditions": [{"type": "Complete", "status": "True"}]}})

    def _crictl_rmi(self, node: str, image_id: str) -> str:
        obj = self.kube.get_object("v1/nodes", None, node)
        if obj is None:
            return "error"
        images = obj["status"].get("images", [])
        target = next((e for e in images if image_id in e["names"]), None)
        if target is None:
            return "missing"
        names = set(target["names"])
        for pod in self.kube.live_objects("pods"):
            spec = pod.get("spec") or {}
            if spec.get("nodeName") != node or (pod.get("metadata") or {}).get("labels", {}).get(
                    "app.kubernetes.io/name") == "image-prune":
                continue
            refs = {c.get("image") for k in ("containers", "initContainers", "ephemeralContainers")
                    for c in spec.get(k) or []}
            ids = {s.get("imageID") for s in (pod.get("status") or {}).get("containerStatuses") or []}
            if names & (refs | ids):
                return "in-use"
        self.kube.patch_object("v1/nodes", None, node, {"status": {"images": [e for e in images if e is not target]}})
        return "removed"
