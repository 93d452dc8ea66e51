"""Cluster inventory: every node and GPU of one cluster, who holds them, in one table.

Two API listings (nodes, GPU pods), a pure summary, and a report. Scheduled hourly; also the
first thing to run against a new platform config to prove the connection works. The listings and the
summary are `tasks.kubernetes`, the report `tasks.inventory_report`.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.platform import Platform
from tasks.inventory_report import publish_inventory
from tasks.kubernetes import list_gpu_pods, list_nodes, summarize_inventory


@flow(name="cluster-inventory", log_prints=False)
def cluster_inventory(platform: str = "main", cluster: str | None = None) -> dict:
    """List the cluster's nodes and GPUs and who holds them; leave a summary and a table."""
    logger = get_run_logger()
    plat = Platform(platform)
    cluster_cfg = plat.config.cluster(cluster)
    api = plat.kubernetes(cluster)
    nodes_future = list_nodes.submit(api, cluster_cfg)
    pods_future = list_gpu_pods.submit(api, cluster_cfg)
    inv = summarize_inventory(nodes_future.result(), pods_future.result())
    publish_inventory(platform, cluster_cfg.name, inv)
    logger.info("%d nodes, %d GPU nodes, %d/%d GPUs allocated, not ready: %s",
                len(inv.nodes), inv.gpu_nodes, inv.gpus_allocated, inv.gpus_total, inv.not_ready or "none")
    return {
        "nodes": len(inv.nodes), "gpu_nodes": inv.gpu_nodes, "gpus": inv.gpus_total,
        "gpus_allocated": inv.gpus_allocated, "not_ready": inv.not_ready, "cordoned": inv.cordoned,
    }
