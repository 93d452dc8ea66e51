"""Cluster inventory: every node and GPU of one cluster, who holds them, in one table.

Two API listings (nodes, GPU pods), a pure summary, and a report. Scheduled hourly; also the
first thing to run against a new platform config to prove the connection works.
"""

from __future__ import annotations

from prefect import flow, get_run_logger

from blocks.platform import Platform
from tasks.kubernetes import ClusterInventory, list_gpu_pods, list_nodes, summarize_inventory
from tasks.reports import md_table, publish_markdown, publish_table


def inventory_markdown(platform: str, cluster: str, inv: ClusterInventory) -> str:
    lines = [
        f"# Cluster inventory: {platform}/{cluster}",
        "",
        f"- **Nodes:** {len(inv.nodes)} ({inv.gpu_nodes} with GPUs)",
        f"- **GPUs:** {inv.gpus_total} total, {inv.gpus_allocated} allocated as whole GPUs "
        f"({inv.allocation_pct:.1f}%)",
        "- **GPU products:** " + (", ".join(f"{k} x{v}" for k, v in sorted(inv.products.items())) or "none"),
        "- **Kubelet versions:** " + (", ".join(f"{k} ({v} nodes)" for k, v in sorted(inv.kubelet_versions.items()))
                                       or "unknown"),
        f"- **Not ready:** {', '.join(inv.not_ready) or 'none'}",
        f"- **Cordoned:** {', '.join(inv.cordoned) or 'none'}",
        "",
        "## Nodes",
        "",
        md_table([_row(n) for n in inv.nodes], limit=30),
    ]
    return "\n".join(lines)


def _row(n) -> dict:
    return {
        "node": n.name,
        "ready": {True: "yes", False: "NO", None: "unknown"}[n.ready],
        "cordoned": "yes" if n.unschedulable else "",
        "gpu product": n.gpu_product or "",
        "gpus": n.gpus,
        "allocated": n.gpus_allocated,
        "gpu pods": ", ".join(n.gpu_pods),
        "kubelet": n.kubelet_version or "",
    }


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
    cluster_name = cluster_cfg.name
    publish_markdown(f"inventory-{platform}-{cluster_name}", inventory_markdown(platform, cluster_name, inv),
                     description="Nodes, GPUs and their holders")
    publish_table(f"inventory-nodes-{platform}-{cluster_name}", [_row(n) for n in inv.nodes],
                  description="Every node of the cluster")
    logger.info("%d nodes, %d GPU nodes, %d/%d GPUs allocated, not ready: %s",
                len(inv.nodes), inv.gpu_nodes, inv.gpus_allocated, inv.gpus_total, inv.not_ready or "none")
    return {
        "nodes": len(inv.nodes), "gpu_nodes": inv.gpu_nodes, "gpus": inv.gpus_total,
        "gpus_allocated": inv.gpus_allocated, "not_ready": inv.not_ready, "cordoned": inv.cordoned,
    }
