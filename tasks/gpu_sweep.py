"""The one GPU sweep: fetch Kubernetes and Prometheus together, ask details for the GPUs that need them, classify.

`run_sweep` is the sweep: `gpu-monitoring-sweep`, `gpu-node-uncordon`, the tests and the benchmark all run it.
It takes three callables that start the fetches and return something with `.result()`: the flows pass Prefect
task submissions (`sweep_with_tasks`: retries, task runs in the UI), `sweep` plain threads. The fetches are
`tasks.kubernetes` and `tasks.prometheus`; what the answers mean is `tasks.gpu_classify`.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from tasks._gc import gc_paused
from tasks.gpu_classify import classify, needs_detail
from tasks.gpu_model import FleetSnapshot, SweepResult, SweepSettings, SweepThresholds
from tasks.kubernetes import fetch_gpu_fleet, list_gpu_fleet
from tasks.prometheus import (
    DCGMSnapshot,
    fetch_dcgm,
    fetch_dcgm_detail,
    query_args,
    query_dcgm_details,
    query_dcgm_metrics,
    with_detail_error,
)


def run_sweep(settings: SweepSettings, start_fleet: Callable[[], Any], start_metrics: Callable[[], Any],
              start_detail: Callable[[DCGMSnapshot, set[str]], Any]) -> tuple[SweepResult, FleetSnapshot]:
    """Fetch (Kubernetes and Prometheus together), ask details for the GPUs that need them, classify.

    Kubernetes errors raise (without the node list there is nothing to judge). A failed first
    Prometheus phase makes every GPU unknown; a failed detail query leaves the established findings
    standing, with a `details-missing` finding.
    """
    th = settings.thresholds
    timings: dict[str, float] = {}
    start = time.perf_counter()
    # Everything here is parsing and folding acyclic data: the cyclic collector only re-walks it
    # (4.1 -> 1.8 s of CPU at 10,000 nodes; tasks/_gc.py).
    with gc_paused():
        fleet_f, metrics_f = start_fleet(), start_metrics()
        fleet: FleetSnapshot = fleet_f.result()
        metrics = _result_or(metrics_f, lambda err: DCGMSnapshot.unavailable(th.window, err))
        timings["fetch_s"] = time.perf_counter() - start
        hosts = needs_detail(fleet, metrics, th)
        if hosts:
            t = time.perf_counter()
            first = metrics
            metrics = _result_or(start_detail(first, hosts), lambda err: with_detail_error(first, err))
            timings["detail_s"] = time.perf_counter() - t
        t = time.perf_counter()
        result = classify(fleet, metrics, th, cluster=settings.cluster, xid_baseline_kind=settings.xid_baseline)
        timings["classify_s"] = time.perf_counter() - t
    timings["total_s"] = time.perf_counter() - start
    result.timings = timings
    return result, fleet


def _result_or(future: Any, fallback: Callable[[str], DCGMSnapshot]) -> DCGMSnapshot:
    """The future's snapshot; when it failed (after a task's retries), `fallback(error)`: unknown, not healthy."""
    try:
        return future.result()
    except Exception as exc:  # noqa: BLE001 - reported as unknown, never as healthy
        return fallback(f"{type(exc).__name__}: {exc}")


def sweep(api: Any, prometheus_url: str, settings: SweepSettings | SweepThresholds, *, cluster: str | None = None,
          timeout_s: float | None = None, **overrides: Any) -> SweepResult:
    """`run_sweep` without Prefect, in threads (the tests and the benchmark time exactly this)."""
    if isinstance(settings, SweepThresholds):
        settings = SweepSettings(thresholds=settings)
    changes = {k: v for k, v in {"cluster": cluster, "timeout_s": timeout_s, **overrides}.items() if v is not None}
    if changes:
        settings = dataclasses.replace(settings, **changes)
    s = settings
    with ThreadPoolExecutor(max_workers=3, thread_name_prefix="sweep") as pool:
        result, _ = run_sweep(
            s,
            lambda: pool.submit(fetch_gpu_fleet, api, gpu_node_label=s.gpu_node_label,
                                exporter_selectors=s.exporter_selectors, resources=s.resources,
                                page_size=s.page_size, timeout_s=s.timeout_s),
            lambda: pool.submit(fetch_dcgm, prometheus_url, s.thresholds.window, timeout_s=s.timeout_s,
                                source=s.metrics_source, **query_args(s)),
            lambda snap, hosts: pool.submit(fetch_dcgm_detail, prometheus_url, snap, hosts,
                                            metric_selector=s.metric_selector, timeout_s=s.timeout_s),
        )
    return result


def sweep_with_tasks(prometheus: Any, api: Any, settings: SweepSettings) -> tuple[SweepResult, FleetSnapshot]:
    """`run_sweep` with each fetch a Prefect task (retries for transient faults); `prometheus` is the
    platform's Prometheus block, `api` the cluster's ApiClient."""
    return run_sweep(
        settings,
        lambda: list_gpu_fleet.submit(api, settings),
        lambda: query_dcgm_metrics.submit(prometheus, settings),
        lambda snap, hosts: query_dcgm_details.submit(prometheus, snap, hosts, settings.metric_selector),
    )
