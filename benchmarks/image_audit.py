"""image-audit: the node-side image audit over N nodes x 150 images and 30 pods per node, vs a naive baseline.

    python -m benchmarks image-audit --size 2000            # 2,000 nodes, 300,000 node images, 60,000 pods
    python -m benchmarks image-audit --registry 500x20       # 500 repositories x 20 tags on a real registry

- project: `tasks.node_images.fetch_node_images` (two paginated listings, constant in N) and
  `tasks.image_analysis.audit_nodes` (one pass over pods, one over images); `seconds` is the analysis, the
  audit's own work; the listing from the in-process API emulator is reported beside it (`fetch_s`).
- baseline `naive`: per node, the node's pods (a filter of the whole pod list per node, as a per-node
  ``fieldSelector=spec.nodeName`` listing gives) and nested loops image x pod x container comparing
  normalized references; its list calls are one per node (counted, not made: the emulator walks every pod
  per selector, which would time the emulator).
- `--registry RxT`: pushes R repositories x T tags (each tag its own layer, one layer shared per repository)
  into a fresh Debian docker-registry and times `tasks.registry_api.scan_registry` (requests counted).
"""

from __future__ import annotations

import asyncio
import random
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks._harness import emit, peak_rss_mb, timed

IMAGES_PER_NODE = 150
PODS_PER_NODE = 30
POOL = 4000  # distinct images in the fleet


def synthetic(size: int, seed: int = 13) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    from sandbox.kubelet import image_entry

    rng = random.Random(seed)
    pool = [(f"registry.example.internal/team{i % 40}/app{i}:v{i % 7}", rng.randint(50_000_000, 30_000_000_000))
            for i in range(POOL)]
    entries = [image_entry(r, s) for r, s in pool]
    nodes, pods = [], []
    for n in range(size):
        name = f"node-{n:05d}"
        picks = rng.sample(range(POOL), IMAGES_PER_NODE)
        nodes.append({"apiVersion": "v1", "kind": "Node", "metadata": {"name": name},
                      "status": {"images": [entries[i] for i in picks]}})
        for p in range(PODS_PER_NODE):
            main, init = pool[picks[p * 2]][0], pool[picks[p * 2 + 1]][0]
            pods.append({"apiVersion": "v1", "kind": "Pod",
                         "metadata": {"name": f"p-{n}-{p}", "namespace": f"ns{p % 10}"},
                         "spec": {"nodeName": name, "containers": [{"name": "m", "image": main}],
                                  "initContainers": [{"name": "i", "image": init}]},
                         "status": {"phase": "Running", "containerStatuses": [
                             {"name": "m", "imageID": entries[picks[p * 2]]["names"][0]}]}})
    return nodes, pods


def naive(nodes, pods) -> tuple[int, int]:
    """Per node: its pods by filtering the pod list, then image x pod x container comparisons."""
    from tasks.image_analysis import normalize_ref

    unused = total = 0
    for node in nodes:
        name = node.name
        on_node = [p for p in pods if p.node == name]
        for img in node.images:
            used = False
            for p in on_node:
                for ref in p.refs:
                    if normalize_ref(ref) in {normalize_ref(n) for n in img.names if "@" not in n}:
                        used = True
                for iid in p.image_ids:
                    if iid in img.names:
                        used = True
            if not used:
                unused += 1
                total += img.size
    return unused, total


def _serve(kube) -> str:
    from kmock._internal.apps import Server

    ready, box = threading.Event(), {}

    def loop() -> None:
        async def main() -> None:
            async with kube, Server(kube, host="127.0.0.1", port=0) as server:
                box["url"] = str(server.url).rstrip("/")
                ready.set()
                while True:
                    await asyncio.sleep(3600)

        asyncio.run(main())

    threading.Thread(target=loop, daemon=True).start()
    ready.wait(60)
    return box["url"]


def run(size: int | None = None, repeat: int = 5, extra: list[str] | None = None) -> None:
    if extra and "--registry" in extra:
        spec = extra[extra.index("--registry") + 1]
        return run_registry(*map(int, spec.split("x")))
    from kubernetes import client as k8s

    from sandbox.kube import SandboxKubernetes
    from tasks.image_analysis import audit_nodes
    from tasks.node_images import fetch_node_images

    size = size or 2000
    nodes, pods = synthetic(size)
    kube = SandboxKubernetes()
    for n in nodes:
        kube.put_object("v1/nodes", None, n["metadata"]["name"], n)
    for p in pods:
        kube.put_object("v1/pods", p["metadata"]["namespace"], p["metadata"]["name"], p)
    del nodes, pods
    cfg = k8s.Configuration()
    cfg.host = _serve(kube)
    api = k8s.ApiClient(cfg)
    t = time.perf_counter()
    scan = fetch_node_images(api, summaries=False)
    fetch_s = time.perf_counter() - t
    assert len(scan.nodes) == size and len(scan.pods) == size * PODS_PER_NODE
    seconds, audit = timed(lambda: audit_nodes(scan.nodes, scan.pods), repeat=repeat)
    rss = peak_rss_mb()
    base_s, (b_unused, b_bytes) = timed(lambda: naive(scan.nodes, scan.pods), repeat=1, warmup=0)
    assert (len(audit.unused), audit.reclaimable) == (b_unused, b_bytes), "project and baseline disagree"
    emit("image-audit", size, seconds=seconds, baseline_seconds=base_s, baseline="naive per-node",
         fetch_s=fetch_s, round_trips=scan.list_calls, baseline_round_trips=size + 1, peak_rss_mb=rss,
         node_images=sum(len(n.images) for n in scan.nodes), pods=len(scan.pods), unused=len(audit.unused),
         reclaimable_tb=round(audit.reclaimable / 1e12, 2))


def run_registry(repos: int, tags: int) -> None:
    import hashlib
    import json

    import httpx

    from sandbox.platform import Sandbox
    from sandbox.registry import start_registry
    from tasks.registry_api import RegistryClient, scan_registry

    with tempfile.TemporaryDirectory() as tmp:
        sb = Sandbox(state_dir=Path(tmp), nodes=1).up(components=[start_registry])
        try:
            url = sb.config["registry"]["url"]
            t = time.perf_counter()
            with httpx.Client(base_url=url, trust_env=False) as c:
                def blob(repo: str, data: bytes) -> tuple[str, int]:
                    d = "sha256:" + hashlib.sha256(data).hexdigest()
                    loc = c.post(f"/v2/{repo}/blobs/uploads/").headers["Location"]
                    c.put(f"{loc}{'&' if '?' in loc else '?'}digest={d}", content=data).raise_for_status()
                    return d, len(data)

                for r in range(repos):
                    repo = f"bench/r{r:04d}"
                    base = blob(repo, f"base-{r}".encode() * 100)
                    for i in range(tags):
                        cfg = blob(repo, json.dumps({"created": f"2026-01-{1 + i % 28:02d}T00:00:00Z",
                                                     "n": i}).encode())
                        top = blob(repo, f"top-{r}-{i}".encode())
                        body = json.dumps({"schemaVersion": 2,
                                           "mediaType": "application/vnd.oci.image.manifest.v1+json",
                                           "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                                                      "digest": cfg[0], "size": cfg[1]},
                                           "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                                                       "digest": d, "size": s} for d, s in (base, top)]})
                        c.put(f"/v2/{repo}/manifests/t{i}", content=body, headers={
                            "Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
            push_s = time.perf_counter() - t
            with RegistryClient(url) as client:
                t = time.perf_counter()
                scan = scan_registry(client, workers=8)
                seconds = time.perf_counter() - t
            assert len(scan.manifests) == repos * tags, len(scan.manifests)
            emit("image-audit-registry", repos * tags, seconds=seconds, round_trips=scan.requests,
                 repositories=repos, tags=tags, push_s=push_s, peak_rss_mb=peak_rss_mb())
        finally:
            sb.down()
