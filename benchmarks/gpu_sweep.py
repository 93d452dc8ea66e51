"""gpu-sweep: one sweep over an N-node x 8-GPU sandbox fleet vs a naive per-node baseline, same run.

- project:  `tasks.gpu_sweep.sweep` (the flows' own `run_sweep`): two paginated Kubernetes
  listings and, together with them, the sweep's metrics, filtered and aggregated in Prometheus
  (per-exporter counts and utilisation; full series only for GPUs that fail a filter), one follow-up
  query for the GPUs that need details, the pure join and classification. Prefect's start-up is not
  included. Measured twice in the same run: `rules` (the default, `metrics_source="auto"`: the
  sandbox's Prometheus has the sweep's recording rules loaded, so the sweep reads their recorded
  series) and `raw` (`metrics_source="raw"`: the four window queries evaluated by the sweep itself).
- baseline `afternoon`: what a competent engineer writes in an afternoon: the typed `kubernetes`
  client listing nodes and pods once, `prometheus-api-client` asking one query per metric for the
  whole fleet, joined and judged in Python. Timed whole, in the same run.
- baseline `per-node`: what a script asking per node does: list the nodes, then for each node read
  it, list its pods (`fieldSelector=spec.nodeName=...`) and ask Prometheus one query per metric for
  that node's exporter; timed on a sample of nodes and scaled to N (`extrapolated_from`).

    python -m benchmarks gpu-sweep --size 2000 [--repeat 5]
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks._harness import emit, peak_rss_mb, timed

BASELINE_SAMPLE = 20
TIMEOUT_S = 60.0  # per request; the flow uses the platform config's prometheus.timeout_s (15s)
BASELINE_QUERIES = [
    "max_over_time(DCGM_FI_DEV_GPU_UTIL{{Hostname=\"{h}\"}}[{w}])",
    "avg_over_time(DCGM_FI_DEV_GPU_UTIL{{Hostname=\"{h}\"}}[{w}])",
    "max_over_time(DCGM_FI_PROF_GR_ENGINE_ACTIVE{{Hostname=\"{h}\"}}[{w}])",
    "max_over_time(DCGM_FI_DEV_GPU_TEMP{{Hostname=\"{h}\"}}[{w}])",
    "max_over_time(DCGM_FI_DEV_MEMORY_TEMP{{Hostname=\"{h}\"}}[{w}])",
    "DCGM_FI_DEV_FB_USED{{Hostname=\"{h}\"}}",
    "DCGM_FI_DEV_FB_FREE{{Hostname=\"{h}\"}}",
    "max_over_time(DCGM_FI_DEV_XID_ERRORS{{Hostname=\"{h}\"}}[{w}])",
    "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS{{Hostname=\"{h}\"}}",
    "DCGM_FI_DEV_ROW_REMAP_FAILURE{{Hostname=\"{h}\"}}",
    "avg_over_time(DCGM_FI_DEV_POWER_USAGE{{Hostname=\"{h}\"}}[{w}])",
    "up{{instance=\"{h}:9400\"}}",
]


AFTERNOON_QUERIES = {
    "util": "avg_over_time(DCGM_FI_DEV_GPU_UTIL[{w}])",
    "util_max": "max_over_time(DCGM_FI_DEV_GPU_UTIL[{w}])",
    "temp": "max_over_time(DCGM_FI_DEV_GPU_TEMP[{w}])",
    "memory_temp": "max_over_time(DCGM_FI_DEV_MEMORY_TEMP[{w}])",
    "xid": "max_over_time(DCGM_FI_DEV_XID_ERRORS[{w}])",
    "rows": "DCGM_FI_DEV_UNCORRECTABLE_REMAPPED_ROWS",
    "row_fail": "DCGM_FI_DEV_ROW_REMAP_FAILURE",
    "up": "up",
}


def afternoon(api, prom: str, th) -> int:
    """The afternoon script: typed client listings, one fleet-wide query per metric, a join in Python."""
    from kubernetes import client as k8s
    from prometheus_api_client import PrometheusConnect

    core = k8s.CoreV1Api(api)
    nodes = core.list_node(label_selector="nvidia.com/gpu.product", _request_timeout=TIMEOUT_S).items
    pods = core.list_pod_for_all_namespaces(field_selector="status.phase=Running", _request_timeout=TIMEOUT_S).items
    host_node = {n.metadata.name: n.metadata.name for n in nodes}
    held: dict[str, list[str]] = {}
    for p in pods:
        if (p.metadata.labels or {}).get("app") == "nvidia-dcgm-exporter":
            host_node[p.metadata.name] = p.spec.node_name
        for c in p.spec.containers:
            limits = (c.resources.limits or {}) if c.resources else {}
            if any(k.startswith(("nvidia.com/", "aliyun.com/")) for k in limits):
                held.setdefault(p.spec.node_name, []).append(f"{p.metadata.namespace}/{p.metadata.name}")
    pc = PrometheusConnect(url=prom, disable_ssl=True)
    answers = {k: pc.custom_query(q.format(w=th.window), params={"timeout": f"{int(TIMEOUT_S)}s"})
               for k, q in AFTERNOON_QUERIES.items()}
    gpus: dict[tuple[str, str], dict[str, float]] = {}
    for name, series in answers.items():
        for s in series:
            m = s["metric"]
            node = host_node.get(m.get("Hostname", ""))
            if node is not None:
                gpus.setdefault((node, m.get("gpu", "")), {})[name] = float(s["value"][1])
    findings = 0
    for (node, _gpu), v in gpus.items():
        findings += v.get("xid", 0) in th.critical_xids or v.get("rows", 0) > 0 or v.get("row_fail", 0) > 0
        findings += v.get("temp", 0) > th.temp_c or v.get("memory_temp", 0) > th.memory_temp_c
        findings += v.get("util_max", 100) < th.idle_util_pct and bool(held.get(node))
    return findings


def run(size: int | None = None, repeat: int = 5) -> None:
    from kubernetes import client as k8s

    from tasks.gpu_sweep import sweep
    from sandbox.cluster import exporter_pod_names
    from sandbox.platform import Sandbox, _start_prometheus, start_core
    from sandbox.prometheus import wait_for_first_scrape, wait_for_sweep_rules
    from tasks.gpu_model import SweepSettings, SweepThresholds
    from tasks.kubernetes import api_client_from_kubeconfig, fetch_gpu_fleet, list_raw
    from tasks.prometheus import fetch_dcgm, query_args

    size = size or 2000
    with tempfile.TemporaryDirectory() as tmp:
        start = time.monotonic()
        sb = Sandbox(state_dir=Path(tmp), gpu_nodes=size, nodes=size + 4, profile="sweep")
        sb.up(components=[start_core, _start_prometheus])
        try:
            wait_for_first_scrape(sb, timeout_s=120 + size * 0.1)
            # the platform defaults (a 15m window) with the XID gauge read at the scrape interval: the
            # thresholds the sandbox renders its sweep recording rules for (`sandbox.prometheus`)
            th = SweepThresholds(xid_resolution=f"{sb.scrape_interval_s}s")
            api = api_client_from_kubeconfig(str(sb.kubeconfig))
            prom = sb.urls["prometheus"]
            # the rules' first evaluation over every GPU series (after the first scrape of them all)
            wait_for_sweep_rules(sb, SweepSettings(thresholds=th), timeout_s=3 * sb.scrape_interval_s + 120)
            setup_s = time.monotonic() - start
            per_source = {}
            for source in ("auto", "raw"):
                runs: list[float] = []  # every sweep's own total, warm-up included: the spread on a shared machine
                settings = SweepSettings(thresholds=th, cluster="sandbox", metrics_source=source)

                def project(settings=settings, runs=runs):
                    result = sweep(api, prom, settings, timeout_s=TIMEOUT_S)
                    runs.append(round(result.timings["total_s"], 2))
                    return result

                load_before = os.getloadavg()[0]
                seconds, result = timed(project, repeat=repeat)
                assert result.metrics_error is None, result.metrics_error
                assert result.gpus_reporting == size * 8, (result.gpus_reporting, size * 8)
                per_source[source] = {"seconds": seconds, "result": result, "runs": runs,
                                      "rss": peak_rss_mb(),  # the process' peak so far: `auto` runs first
                                      "load": [round(load_before, 2), round(os.getloadavg()[0], 2)]}
            # the two blocks ran at different instants (the live fleet's values move): compare what was found
            rules_findings, raw_findings = ({(f.kind.value, f.severity.value, f.node, f.gpu) for f in
                                             per_source[s]["result"].findings} for s in ("auto", "raw"))
            # the listing alone, and the recorded read alone (where the time goes)
            listing_s, _ = timed(lambda: fetch_gpu_fleet(api, page_size=SweepSettings().page_size,
                                                         timeout_s=TIMEOUT_S), repeat=3, warmup=0)
            recorded_s, _ = timed(lambda: fetch_dcgm(prom, th.window, timeout_s=TIMEOUT_S,
                                                     **query_args(SweepSettings(thresholds=th))), repeat=3, warmup=0)

            core = k8s.CoreV1Api(api)
            exporters = exporter_pod_names(size)
            client = httpx.Client(timeout=30)
            sample = min(BASELINE_SAMPLE, size)  # a fleet smaller than the sample is timed whole

            def baseline_sample() -> int:
                trips = 0
                listing = list_raw(api, "nodes", label_selector="nvidia.com/gpu.product", page_size=500)
                trips += listing.round_trips
                for obj in listing.items[:sample]:
                    name = obj["metadata"]["name"]
                    core.read_node(name, _preload_content=False)
                    core.list_pod_for_all_namespaces(field_selector=f"spec.nodeName={name}", _preload_content=False)
                    trips += 2
                    for q in BASELINE_QUERIES:
                        r = client.post(f"{prom}/api/v1/query", data={"query": q.format(h=exporters[name], w=th.window)})
                        r.raise_for_status()
                        json.loads(r.content)
                        trips += 1
                return trips

            t = time.perf_counter()
            baseline_sample()
            per_node = (time.perf_counter() - t) / sample
            baseline_seconds = per_node * size
            afternoon_seconds, afternoon_findings = timed(lambda: afternoon(api, prom, th),
                                                          repeat=max(1, repeat // 2), warmup=0)
            for source, m in per_source.items():
                result = m["result"]
                emit("gpu-sweep", size, seconds=m["seconds"], baseline_seconds=baseline_seconds,
                     peak_rss_mb=m["rss"], round_trips=result.round_trips, baseline="per-node",
                     baseline_round_trips=size * (2 + len(BASELINE_QUERIES)) + 1, extrapolated_from=sample,
                     gpus=size * 8, findings=len(result.findings), metrics_source=result.metrics_source,
                     metrics_source_note=result.metrics_source_note, load_1m=m["load"],
                     phases={k: round(v, 3) for k, v in result.timings.items()}, runs_s=m["runs"],
                     sandbox_setup_s=round(setup_s, 1), scrape_interval_s=sb.scrape_interval_s)
                emit("gpu-sweep", size, seconds=m["seconds"], baseline_seconds=afternoon_seconds,
                     baseline="afternoon", metrics_source=result.metrics_source, round_trips=result.round_trips,
                     baseline_round_trips=2 + len(AFTERNOON_QUERIES), gpus=size * 8,
                     baseline_findings=afternoon_findings)
            emit("gpu-sweep", size, same_findings=rules_findings == raw_findings, findings=len(rules_findings),
                 listing_alone_s=round(listing_s, 3), recorded_read_alone_s=round(recorded_s, 3),
                 load_1m_end=round(os.getloadavg()[0], 2))
        finally:
            sb.down()
