"""The real Prometheus (Debian's `prometheus` package) scraping the simulated dcgm-exporters.

One scrape target per GPU node (file-based service discovery), each with its own metrics path on
the core process, so `up` is per node as with a real DaemonSet. The project's alert rules
(`configs/prometheus/*.rules.yml`, as checked in) and the GPU sweep's recording rules, rendered for
the sandbox's thresholds (`write_sweep_rules`), are loaded, as an operator loads them.

Each scrape job is one of the setups real clusters have (`ScrapeJob`; `sb.extra["prometheus_jobs"]`
lists them, the default is the GPU operator's with `honor_labels: true`):

- `honor_labels`: true keeps dcgm-exporter's `pod`/`namespace` attribution; false (the standalone
  chart's ServiceMonitor default, `serviceMonitor.honorLabels: false` in deployment/values.yaml) makes
  Prometheus rename them `exported_pod`/`exported_namespace` and set `pod`/`namespace` to the
  target's, the exporter pod's own (Prometheus docs, `scrape_config.honor_labels`). With
  `target_pod_labels` the targets carry those labels, as Kubernetes service discovery gives them.
- `instance`: `pod` (the exporter pod's name and port) or `ip` (its pod IP and port, as
  `__address__` is for a pod endpoint under Kubernetes service discovery).
- `hostname` and `counters`: the exporter's variant (`sandbox.dcgm`), sent as URL parameters.
- `drop_hostname`: a `metric_relabel_configs` `labeldrop` of `Hostname`.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx
import yaml

from sandbox._common import SandboxLike, free_port, http_ok, require_binary, wait_for

RULES_DIR = Path(__file__).resolve().parent.parent / "configs" / "prometheus"
SWEEP_RULES_FILE = "gpu-sweep.rules.yml"


def write_sweep_rules(sb: SandboxLike) -> Path:
    """The sweep's recording rules (`tasks.gpu_rules.render_sweep`) for the sandbox's thresholds: the
    platform defaults, the XID gauge read at the scrape interval, and what `thresholds.gpu` of the
    sandbox's config sets."""
    from blocks.config import GPUThresholds
    from tasks.gpu_model import SweepSettings
    from tasks.gpu_rules import render_sweep

    gpu = GPUThresholds.model_validate({"xid_resolution": f"{sb.scrape_interval_s}s",
                                        **((sb.config.get("thresholds") or {}).get("gpu") or {})})
    path = sb.path("prometheus", SWEEP_RULES_FILE)
    path.write_text(render_sweep(SweepSettings.from_gpu(gpu)))
    return path


@dataclass(frozen=True)
class ScrapeJob:
    name: str = "dcgm-exporter"
    honor_labels: bool = True
    target_pod_labels: bool = False
    instance: str = "pod"  # pod | ip
    hostname: str = "pod"  # pod | node | short | none (sandbox.dcgm)
    counters: str = "default"  # default | extended
    drop_hostname: bool = False


def _targets(sb: SandboxLike, job: ScrapeJob) -> list[dict]:
    from sandbox.cluster import EXPORTER_CHARTS, exporter_pod_ip, exporter_pod_names

    chart = sb.extra.get("exporter_chart", "gpu-operator")
    pods = exporter_pod_names(sb.gpu_nodes, chart, sb.extra.get("node_domain", ""))
    sim = sb.urls["sim"].removeprefix("http://")
    out = []
    for index, (node, pod) in enumerate(pods.items()):
        address = f"{exporter_pod_ip(index) if job.instance == 'ip' else pod}:9400"
        labels = {"__metrics_path__": f"/nodes/{node}/metrics", "instance": address,
                  "__param_hostname": job.hostname, "__param_counters": job.counters}
        if job.target_pod_labels:
            labels.update(pod=pod, namespace=EXPORTER_CHARTS[chart]["namespace"], container="exporter")
        out.append({"targets": [sim], "labels": labels})
    return out


def write_config(sb: SandboxLike, port: int) -> Path:
    import json as _json

    jobs = [ScrapeJob(**j) for j in sb.extra.get("prometheus_jobs") or [asdict(ScrapeJob())]]
    scrape_configs = []
    for job in jobs:
        sd = sb.path("prometheus", f"{job.name}-targets.json")
        sd.write_text(_json.dumps(_targets(sb, job)))
        cfg_job: dict = {"job_name": job.name, "honor_labels": job.honor_labels,
                         "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "30s"}]}
        if job.drop_hostname:
            cfg_job["metric_relabel_configs"] = [{"action": "labeldrop", "regex": "Hostname"}]
        scrape_configs.append(cfg_job)
    interval = f"{sb.scrape_interval_s}s"
    # the alert rules as checked in; the sweep's recording rules rendered from the sandbox's own settings
    # (its XID resolution is its scrape interval), unless `sb.extra["sweep_rules"]` is False
    rules = sorted(str(p) for p in RULES_DIR.glob("*.rules.yml") if p.name != SWEEP_RULES_FILE) \
        if RULES_DIR.exists() else []
    if sb.extra.get("sweep_rules", True):
        rules.append(str(write_sweep_rules(sb)))
    cfg = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": f"{max(1, sb.scrape_interval_s - 1)}s"},
        "rule_files": rules,
        "scrape_configs": scrape_configs,
    }
    path = sb.path("prometheus", "prometheus.yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sb.extra["prometheus_port"] = port
    sb.extra["prometheus_job_names"] = [j.name for j in jobs]
    return path


def start_prometheus_process(sb: SandboxLike) -> None:
    binary = require_binary("prometheus", "prometheus")
    port = sb.extra["prometheus_port"]
    argv = [
        binary, f"--config.file={sb.path('prometheus', 'prometheus.yml')}",
        f"--storage.tsdb.path={sb.path('prometheus', 'data')}", f"--web.listen-address=127.0.0.1:{port}",
        "--storage.tsdb.retention.time=1d", "--web.enable-lifecycle", "--log.level=warn",
    ]
    proc = sb.spawn("prometheus", argv)
    wait_for(http_ok(f"http://127.0.0.1:{port}/-/ready"), "prometheus", 60, proc, sb.log_of("prometheus"))


def start_prometheus(sb: SandboxLike) -> None:
    port = free_port()
    write_config(sb, port)
    sb.urls["prometheus"] = f"http://127.0.0.1:{port}"
    start_prometheus_process(sb)
    sb.config["prometheus"] = {"url": sb.urls["prometheus"], "timeout_s": 10}
    # the XID gauge's distinct values are read at the scrape interval
    sb.config.setdefault("thresholds", {}).setdefault("gpu", {})["xid_resolution"] = f"{sb.scrape_interval_s}s"


def wait_for_sweep_rules(sb: SandboxLike, settings: Any, timeout_s: float) -> float:
    """Block until the sweep's recording rules for `settings` (a `tasks.gpu_model.SweepSettings`) have
    completed an evaluation that began after this call (so after the scrapes before it); its timestamp.

    Asks what a sweep asks first (`tasks.prometheus.recorded_state`: the rules API, then the marker's
    timestamp): two light requests a poll, not the raw queries a sweep would fall back to meanwhile."""
    from tasks.prometheus import query_args, recorded_state, sweep_queries, sweep_recording_rules

    rules = sweep_recording_rules(sweep_queries(settings.thresholds.window, **query_args(settings)))
    since, seen = time.time(), [0.0]
    with httpx.Client(timeout=10) as client:
        def evaluated() -> bool:
            seen[0] = recorded_state(client, sb.urls["prometheus"], rules, 10)[0] or 0.0
            return seen[0] > since

        wait_for(evaluated, "an evaluation of the sweep's recording rules", timeout_s)
    return seen[0]


def wait_for_first_scrape(sb: SandboxLike, timeout_s: float = 120.0) -> None:
    """Block until Prometheus has scraped every exporter once (tests and the demo need data)."""

    def scraped() -> bool:
        jobs = sb.extra.get("prometheus_job_names") or ["dcgm-exporter"]
        r = httpx.get(f"{sb.urls['prometheus']}/api/v1/query",
                      params={"query": "count by (job) (DCGM_FI_DEV_GPU_UTIL)"}, timeout=5)
        counts = {s["metric"].get("job"): int(float(s["value"][1])) for s in r.json()["data"]["result"]}
        return all(counts.get(j, 0) >= sb.gpu_nodes * 8 for j in jobs)

    wait_for(scraped, "first Prometheus scrape of every dcgm-exporter", timeout_s)
