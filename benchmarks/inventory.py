"""inventory: list an N-node sandbox cluster with the project's code vs naive baselines.

- project:  `tasks.kubernetes.list_raw` (paginated, raw JSON + orjson) + `node_info` summaries
- baseline: the typed `kubernetes` client deserialising every Node (`CoreV1Api.list_node()`)
- baseline `kubectl-per-node`: `kubectl get node NAME -o json` for each node, timed on a sample
  of nodes and scaled to N (running it for 2,000 nodes takes minutes); marked `extrapolated`.
"""

from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path

from benchmarks._harness import emit, peak_rss_mb, timed

KUBECTL_SAMPLE = 20


def run(size: int | None = None, repeat: int = 5) -> None:
    from kubernetes import client as k8s

    from sandbox.platform import Sandbox, start_core
    from tasks.kubernetes import api_client_from_kubeconfig, list_raw, node_info

    size = size or 2000
    with tempfile.TemporaryDirectory() as tmp:
        sb = Sandbox(state_dir=Path(tmp), gpu_nodes=size - 4 if size >= 20 else size - 1, nodes=size)
        sb.up(components=[start_core])
        try:
            api = api_client_from_kubeconfig(str(sb.kubeconfig))
            trips = {}

            def project():
                listing = list_raw(api, "nodes", page_size=500)
                trips["n"] = listing.round_trips
                return [node_info(o) for o in listing.items]

            def typed():
                return k8s.CoreV1Api(api).list_node().items

            seconds, nodes = timed(project, repeat=repeat)
            assert len(nodes) == size, (len(nodes), size)
            rss = peak_rss_mb()
            base_seconds, typed_nodes = timed(typed, repeat=max(1, repeat // 2))
            assert len(typed_nodes) == size
            emit("inventory", size, seconds=seconds, baseline_seconds=base_seconds, peak_rss_mb=rss,
                 round_trips=trips["n"], baseline="typed-client")

            env = dict(os.environ, KUBECONFIG=str(sb.kubeconfig), HOME=tmp)
            names = [n.name for n in nodes[:KUBECTL_SAMPLE]]
            start = time.perf_counter()
            for name in names:
                subprocess.run(["kubectl", "get", "node", name, "-o", "json"], env=env, check=True,
                               capture_output=True, timeout=60)
            per_node = (time.perf_counter() - start) / len(names)
            emit("inventory", size, seconds=seconds, baseline_seconds=per_node * size, round_trips=trips["n"],
                 baseline="kubectl-per-node", baseline_round_trips=size, extrapolated_from=len(names))
        finally:
            sb.down()
