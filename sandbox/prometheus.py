"""The real Prometheus (Debian's `prometheus` package) scraping the simulated dcgm-exporters.

One scrape target per GPU node (file-based service discovery), each with its own metrics path on
the core process and the exporter pod's name as `instance`, so `up` is per node as with a real
DaemonSet. `honor_labels` keeps dcgm-exporter's `pod`/`namespace` attribution, as the
dcgm-exporter ServiceMonitor does. The project's alert rules under `configs/prometheus/` are loaded.
"""

from __future__ import annotations

from pathlib import Path

import httpx
import yaml

from sandbox._common import SandboxLike, free_port, http_ok, require_binary, wait_for

RULES_DIR = Path(__file__).resolve().parent.parent / "configs" / "prometheus"


def write_config(sb: SandboxLike, port: int) -> Path:
    import json as _json

    from sandbox.cluster import exporter_pod_names

    sim = sb.urls["sim"].removeprefix("http://")
    targets = [{
        "targets": [sim],
        "labels": {"__metrics_path__": f"/nodes/{node}/metrics", "instance": f"{pod}:9400"},
    } for node, pod in exporter_pod_names(sb.gpu_nodes).items()]
    sd = sb.path("prometheus", "dcgm-targets.json")
    sd.write_text(_json.dumps(targets))
    interval = f"{sb.scrape_interval_s}s"
    rules = sorted(str(p) for p in RULES_DIR.glob("*.rules.yml")) if RULES_DIR.exists() else []
    cfg = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval,
                   "scrape_timeout": f"{max(1, sb.scrape_interval_s - 1)}s"},
        "rule_files": rules,
        "scrape_configs": [{
            "job_name": "dcgm-exporter", "honor_labels": True,
            "file_sd_configs": [{"files": [str(sd)], "refresh_interval": "30s"}],
        }],
    }
    path = sb.path("prometheus", "prometheus.yml")
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    sb.extra["prometheus_port"] = port
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


def wait_for_first_scrape(sb: SandboxLike, timeout_s: float = 120.0) -> None:
    """Block until Prometheus has scraped every exporter once (tests and the demo need data)."""

    def scraped() -> bool:
        r = httpx.get(f"{sb.urls['prometheus']}/api/v1/query",
                      params={"query": 'count(up{job="dcgm-exporter"})'}, timeout=5)
        result = r.json()["data"]["result"]
        return bool(result) and int(float(result[0]["value"][1])) >= sb.gpu_nodes

    wait_for(scraped, "first Prometheus scrape of every dcgm-exporter", timeout_s)
