"""The sandbox's core process: emulated Kubernetes API, simulated dcgm-exporters, control API.

    python -m sandbox.server --gpu-nodes 48 --kube-port P --sim-port Q [--profile full|sweep]
        [--exporter-chart gpu-operator|standalone] [--node-domain example.internal]

One asyncio process serves, on 127.0.0.1 only:
- port P: the Kubernetes API (`sandbox.kube.SandboxKubernetes`), seeded with the cluster;
- port Q: ``/nodes/<node>/metrics[?hostname=pod|node|short|none&counters=default|extended]``
  (dcgm-exporter per GPU node, in the variant the scrape asks for: `sandbox.dcgm`) and the control API:
  ``GET /control/health``, ``GET /control/state``, ``POST /control/fault``, ``POST /control/heal``,
  ``POST /control/reset``.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import signal
from typing import Any

import aiohttp.web
from kmock._internal.apps import Server

from sandbox.cluster import EXPORTER_CHARTS, seed_cluster
from sandbox.dcgm import DCGMSimulator
from sandbox.kube import SandboxKubernetes
from sandbox.kubelet import KubeletSimulator

GPU_FAULTS = {"xid", "gpu-missing", "hot-gpu", "idle-gpu", "remapped-rows", "row-remap-pending", "row-remap-failure",
              "exporter-down", "exporter-restart"}
CLUSTER_FAULTS = {"node-not-ready", "api-down"}


class SandboxCore:
    def __init__(self, gpu_nodes: int, profile: str, seed: int = 7, chart: str = "gpu-operator", domain: str = ""):
        self.gpu_nodes = gpu_nodes
        self.profile = profile
        self.seed = seed
        self.chart = chart
        self.domain = domain
        self.kube = SandboxKubernetes()
        self.kubelet = KubeletSimulator(self.kube)  # node images, summary API, prune Jobs (issue 13)
        self.faults: list[dict[str, Any]] = []
        self._reseed()

    def _reseed(self) -> None:
        self.cluster = seed_cluster(self.gpu_nodes, seed=self.seed, chart=self.chart, domain=self.domain)
        self.kubelet.seed(self.cluster.nodes, self.cluster.pods)
        for (res, ns, name) in list(self.kube.objects.keys()):
            del self.kube.objects[res, ns, name]
        for node in self.cluster.nodes:
            self.kube.put_object("v1/nodes", None, node["metadata"]["name"], copy.deepcopy(node))
        for pod in self.cluster.pods:
            meta = pod["metadata"]
            self.kube.put_object("v1/pods", meta["namespace"], meta["name"], copy.deepcopy(pod))
        for pdb in self.cluster.pdbs:
            meta = pdb["metadata"]
            self.kube.put_object("policy/v1/poddisruptionbudgets", meta["namespace"], meta["name"],
                                 copy.deepcopy(pdb))
        for ns in sorted({p["metadata"]["namespace"] for p in self.cluster.pods} | {"default"}):
            self.kube.put_object("v1/namespaces", None, ns, {"apiVersion": "v1", "kind": "Namespace",
                                                             "metadata": {"name": ns}, "status": {"phase": "Active"}})
        self.dcgm = self._simulator()
        self.kube.fail_with = None
        self.faults = []

    def _simulator(self) -> DCGMSimulator:
        return DCGMSimulator(self.cluster, profile=self.profile, exporter_labels=EXPORTER_CHARTS[self.chart]["labels"])

    # -- faults ------------------------------------------------------------------------------

    def fault(self, spec: dict[str, Any]) -> dict[str, Any]:
        kind = spec.get("kind")
        node = spec.get("node")
        if kind == "api-down":
            self.kube.fail_with = int(spec.get("value") or 503)
        elif kind == "node-not-ready":
            self._set_ready(node, "Unknown", "NodeStatusUnknown", "Kubelet stopped posting node status.")
        elif kind in GPU_FAULTS:
            self.dcgm.apply(kind, node, spec.get("gpu"), spec.get("value"))
            if kind == "exporter-restart":  # the exporter pod's container started again now
                self._restart_exporter(node)
            if kind == "gpu-missing":
                present = sum(1 for g in self.dcgm.exporters[node].gpus if not g.missing)
                self.kube.patch_object("v1/nodes", None, node, {"status": {"allocatable": {"nvidia.com/gpu": str(present)}}})
        else:
            raise ValueError(f"unknown fault kind {kind!r}; expected one of {sorted(GPU_FAULTS | CLUSTER_FAULTS)}")
        self.faults.append(spec)
        return spec

    def _restart_exporter(self, node: str) -> None:
        import datetime

        now = datetime.datetime.now(tz=datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        for pod in self.cluster.pods:
            if pod["spec"]["nodeName"] == node and pod["metadata"]["name"] == self.dcgm.exporters[node].pod_name:
                meta = pod["metadata"]
                status = {"containerStatuses": [{"name": "main", "restartCount": 1, "ready": True,
                                                 "state": {"running": {"startedAt": now}}}]}
                self.kube.patch_object("v1/pods", meta["namespace"], meta["name"], {"status": status})

    def _set_ready(self, node: str | None, status: str, reason: str, message: str) -> None:
        obj = self.kube.get_object("v1/nodes", None, node) if node else None
        if obj is None:
            raise KeyError(f"no node {node!r}")
        conditions = copy.deepcopy(obj["status"]["conditions"])
        for cond in conditions:
            if cond["type"] == "Ready":
                cond.update(status=status, reason=reason, message=message)
        self.kube.patch_object("v1/nodes", None, node, {"status": {"conditions": conditions}})

    def heal(self) -> int:
        """Undo every injected fault (cluster changes made through the API stay)."""
        healed = len(self.faults)
        for spec in self.faults:
            if spec.get("kind") == "node-not-ready":
                self._set_ready(spec["node"], "True", "KubeletReady", "kubelet is posting ready status")
            if spec.get("kind") == "gpu-missing":
                self.kube.patch_object("v1/nodes", None, spec["node"],
                                       {"status": {"allocatable": {"nvidia.com/gpu": "8"}}})
        self.kube.fail_with = None
        self.dcgm = self._simulator()
        self.faults = []
        return healed

    # -- HTTP --------------------------------------------------------------------------------

    def app(self) -> aiohttp.web.Application:
        app = aiohttp.web.Application(client_max_size=1 << 20)
        app.router.add_get("/nodes/{node}/metrics", self._metrics)
        app.router.add_get("/control/health", self._health)
        app.router.add_get("/control/state", self._state)
        app.router.add_post("/control/fault", self._fault)
        app.router.add_post("/control/heal", self._heal)
        app.router.add_post("/control/reset", self._reset)
        return app

    async def _metrics(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            body = self.dcgm.render(request.match_info["node"], request.query.get("hostname", "pod"),
                                    request.query.get("counters", "default"))
        except ValueError as exc:
            return aiohttp.web.Response(status=400, text=f"{exc}\n")
        if body is None:
            return aiohttp.web.Response(status=503, text="dcgm-exporter: DCGM is not responding\n")
        return aiohttp.web.Response(body=body, content_type="text/plain", charset="utf-8")

    async def _health(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"ok": True, "gpu_nodes": self.gpu_nodes})

    async def _state(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({
            "gpu_nodes": self.gpu_nodes, "profile": self.profile, "faults": self.faults,
            "api_requests_served": self.kube.requests_served,
        })

    async def _fault(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        try:
            spec = await request.json()
            return aiohttp.web.json_response({"applied": self.fault(spec)})
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            return aiohttp.web.json_response({"error": str(exc)}, status=400)

    async def _heal(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        return aiohttp.web.json_response({"healed": self.heal()})

    async def _reset(self, request: aiohttp.web.Request) -> aiohttp.web.Response:
        self._reseed()
        return aiohttp.web.json_response({"reset": True})


async def serve(gpu_nodes: int, kube_port: int, sim_port: int, profile: str, chart: str = "gpu-operator",
                domain: str = "") -> None:
    core = SandboxCore(gpu_nodes, profile, chart=chart, domain=domain)
    runner = aiohttp.web.AppRunner(core.app(), access_log=None)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, "127.0.0.1", sim_port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with core.kube, Server(core.kube, host="127.0.0.1", port=kube_port):
        print(f"sandbox core ready: kube=127.0.0.1:{kube_port} sim=127.0.0.1:{sim_port}", flush=True)
        await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m sandbox.server")
    parser.add_argument("--gpu-nodes", type=int, required=True)
    parser.add_argument("--kube-port", type=int, required=True)
    parser.add_argument("--sim-port", type=int, required=True)
    parser.add_argument("--profile", choices=["full", "sweep"], default="full")
    parser.add_argument("--exporter-chart", choices=sorted(EXPORTER_CHARTS), default="gpu-operator")
    parser.add_argument("--node-domain", default="")
    args = parser.parse_args()
    asyncio.run(serve(args.gpu_nodes, args.kube_port, args.sim_port, args.profile, args.exporter_chart,
                      args.node_domain))


if __name__ == "__main__":
    main()
