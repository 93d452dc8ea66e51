"""The cluster inventory's report: a summary of nodes, GPUs and their holders, and a row per node.

Plain functions over `tasks.kubernetes.ClusterInventory` (what `summarize_inventory` made of the two
listings); `publish_inventory` leaves both as artifacts.
"""

from __future__ import annotations

from typing import Any

from tasks.kubernetes import ClusterInventory
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
        md_table([node_row(n) for n in inv.nodes], limit=30),
    ]
    return "\n".join(lines)


def node_row(n: Any) -> dict:
    """One node of the inventory as a table row."""
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


def publish_inventory(platform: str, cluster: str, inv: ClusterInventory) -> None:
    """The summary and the table of every node, as artifacts."""
    publish_markdown(f"inventory-{platform}-{cluster}", inventory_markdown(platform, cluster, inv),
                     description="Nodes, GPUs and their holders")
    publish_table(f"inventory-nodes-{platform}-{cluster}", [node_row(n) for n in inv.nodes],
                  description="Every node of the cluster")
