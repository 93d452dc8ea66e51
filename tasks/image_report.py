"""The image audit's and the prune's report: the summary, the picture of each node's image filesystem against
the thresholds, the prune plan's details, and publishing them as artifacts."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NONE

from tasks.image_analysis import NodeAudit, NodePrunePlan, Thresholds
from tasks.image_audit import AuditResult
from tasks.redact import Redactor
from tasks.registry_retention import RetentionPlan
from tasks.reports import md_table, png_data_uri, publish_markdown, publish_table


def gb(n: int | None) -> str:
    """Bytes as gigabytes for people ("unknown" when not known)."""
    return "unknown" if n is None else f"{n / 1e9:,.1f} GB"


def disk_figure(audit: NodeAudit, th: Thresholds):
    """Each node's image filesystem use against GC high/low and the eviction thresholds (as used %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    disks = sorted(audit.disks, key=lambda d: -(d.usage_pct or -1))[:60]
    fig, ax = plt.subplots(figsize=(10, max(2.5, 0.22 * len(disks) + 1)))
    names = [d.node for d in disks]
    used = [d.usage_pct or 0 for d in disks]
    recl = [100.0 * d.reclaimable / d.capacity if d.capacity else 0 for d in disks]
    colors = ["#bbbbbb" if d.usage_pct is None else "#d62728" if d.status.startswith("eviction")
              else "#ff7f0e" if d.status in ("gc", "near-gc", "near-eviction") else "#1f77b4" for d in disks]
    ax.barh(names, used, color=colors)
    ax.barh(names, [-r for r in recl], left=used, color="none", edgecolor="black", hatch="//",
            label="reclaimable (unused images)")
    for x, label, style in ((th.gc_low_pct, "GC low", ":"), (th.gc_high_pct, "GC high", "--"),
                            (100 - th.eviction_soft_pct, "soft eviction", "-."),
                            (100 - th.eviction_hard_pct, "hard eviction", "-")):
        ax.axvline(x, color="black", linestyle=style, linewidth=1, label=f"{label} ({x:g}% used)")
    ax.set_xlim(0, 100)
    ax.set_xlabel("image filesystem used % (grey: no stats)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=7)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig


def summary_markdown(title: str, r: AuditResult, picture: str | None) -> str:
    a = r.nodes
    lines = [f"# {title}", "", f"- **Reclaimable on nodes:** {gb(a.reclaimable)} in {len(a.unused)} unused images",
             "- **Registry:** " + (f"{gb(r.registry.reclaimable)} reclaimable of {gb(r.registry.total_bytes)} "
                                    f"({len(r.registry.delete)} manifests outside the retention rules, "
                                    f"{len(r.registry.untagged)} untagged)"
                                    if r.registry else f"**unknown**: {r.registry_error}"),
             "- **Node image filesystems:** " + ", ".join(f"{k} {v}" for k, v in sorted(a.counts().items())),
             f"- **Cost:** {r.scan.list_calls} list calls, {r.scan.summary_calls} summary calls"
             + (f", {r.registry_scan.requests} registry requests" if r.registry_scan else "")]
    at_risk = [d.row() for d in a.at_risk]
    lines += ["", "## Nodes near image GC or eviction", "", md_table(at_risk, limit=30)]
    lines += ["", "## Reclaimable per node", "",
              md_table(sorted((d.row() for d in a.disks), key=lambda x: -x["reclaimable_gb"]),
                       columns=["node", "status", "unused", "reclaimable_gb", "imagefs_used_pct"], limit=20)]
    lines += ["", "## Large images duplicated across nodes", "", md_table(a.duplicates, limit=15),
              "", "## Pulled by `:latest`", "", md_table(a.latest, limit=15),
              "", "## Registries not on the allow-list", "", md_table(a.disallowed, limit=15)]
    if picture:
        lines += ["", "## Image filesystems against the thresholds", "", f"![node disks]({picture})"]
    return "\n".join(lines) + "\n"


@task(name="publish-image-audit", cache_policy=NONE)
def publish_audit(platform: str, cluster: str, r: AuditResult, redactor: Redactor) -> str:
    import matplotlib.pyplot as plt

    fig = disk_figure(r.nodes, r.thresholds)
    try:
        picture = png_data_uri(fig)
    finally:
        plt.close(fig)
    key = f"image-audit-{platform}-{cluster}"
    publish_markdown(key, redactor.text(summary_markdown(f"Image cleanup audit: {platform}/{cluster}", r, picture)),
                     description="reclaimable bytes on nodes and in the registry")
    publish_table(f"image-unused-{platform}-{cluster}", [u.row() for u in r.nodes.unused],
                  description="unused images per node")
    publish_table(f"image-disks-{platform}-{cluster}", [d.row() for d in r.nodes.disks],
                  description="node image filesystems against GC and eviction thresholds")
    if r.registry:
        publish_table(f"image-registry-{platform}", redactor.value(r.registry.rows()),
                      description="registry retention decisions")
    return key


def plan_markdown(nodes: NodePrunePlan, registry: RetentionPlan | None) -> str:
    """The prune plan's details: each node's images, each registry manifest with its tags."""
    count = sum(len(n.images) for n in nodes.nodes)
    lines = [f"**Nodes:** {len(nodes.nodes)} nodes, {count} images, {gb(nodes.bytes)}", "",
             md_table(nodes.rows(), limit=200)]
    if nodes.over_cap:
        lines.append(f"_Left for a later run (blast radius cap): {len(nodes.over_cap)} nodes_")
    if nodes.excluded:
        lines.append(f"_Excluded by the exclusion list: {len(nodes.excluded)} images_")
    if registry is not None:
        lines += ["", f"**Registry:** {len(registry.delete)} manifests, {gb(registry.reclaimable)} after GC", "",
                  md_table([{"repository": m.repository, "digest": m.digest, "tags": ", ".join(m.tags)}
                            for m in registry.delete], limit=200)]
    return "\n".join(lines)
