"""Image cleanup: what is reclaimable on the nodes and in the registry, and a deliberate, approved prune.

`image-cleanup-audit` (daily): two Kubernetes listings and the kubelet summaries (one task), the
registry's catalog, tags and manifests (one task), then the pure analyses of `tasks/image_analysis.py`
and `tasks/registry_retention.py`. It leaves a summary (reclaimable bytes per node and in the
registry, nodes near image GC or eviction with the training pods an eviction would hit, a picture
of each node's image filesystem against the thresholds) and tables. A node without summary stats is
`unknown`; a registry that cannot be read is reported as unknown and fails the run.

`image-prune` (manual): runs the same audit, plans, and is a dry run by default. With
`dry_run=False` it pauses for approval showing the exact list, re-checks the pods just before
removing, runs one Job per node (`crictl rmi` for exactly the planned ids, re-checked again on the
node), deletes the planned registry manifests by digest, then runs the configured garbage-collect
or says how to. Every removal is recorded in an artifact with what, where, its size and who approved.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed, Failed

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.approval import ask_approval
from tasks.image_analysis import (
    NodeAudit,
    NodePrunePlan,
    Thresholds,
    audit_nodes,
    plan_node_prune,
    still_unused,
)
from tasks.node_images import (
    NodeScan,
    list_pod_images_task,
    prune_nodes_task,
    scan_node_images_task,
)
from tasks.redact import Redactor
from tasks.registry_api import (
    GC_ADVICE,
    delete_manifests_task,
    run_gc_task,
    scan_registry_task,
)
from tasks.registry_retention import RegistryScan, RetentionPlan, Rules, plan_retention
from tasks.reports import md_table, png_data_uri, publish_markdown, publish_table


@dataclass
class AuditResult:
    nodes: NodeAudit
    registry: RetentionPlan | None
    registry_error: str | None
    scan: NodeScan
    registry_scan: RegistryScan | None
    thresholds: Thresholds

    def summary(self) -> dict[str, Any]:
        return {"node_reclaimable_bytes": self.nodes.reclaimable, "unused_images": len(self.nodes.unused),
                "node_status": self.nodes.counts(),
                "registry_reclaimable_bytes": self.registry.reclaimable if self.registry else None,
                "registry_delete": len(self.registry.delete) if self.registry else None,
                "registry_error": self.registry_error,
                "list_calls": self.scan.list_calls, "summary_calls": self.scan.summary_calls,
                "registry_requests": self.registry_scan.requests if self.registry_scan else None}


def _gb(n: int | None) -> str:
    return "unknown" if n is None else f"{n / 1e9:,.1f} GB"


def run_audit(plat: Platform, cluster: str | None, repositories: list[str] | None, redactor: Redactor) -> AuditResult:
    cfg = plat.config
    img = cfg.thresholds.images
    th = Thresholds.from_config(img)
    api = plat.kubernetes(cluster)
    cl = cfg.cluster(cluster)
    nodes_f = scan_node_images_task.submit(api, timeout_s=cl.request_timeout_s)
    reg_f = scan_registry_task.submit(plat.registry(), repositories) if cfg.registry else None
    scan: NodeScan = nodes_f.result()
    audit = audit_nodes(scan.nodes, scan.pods, th)
    plan = reg_scan = None
    error = None if cfg.registry else "no registry section in the platform config"
    if reg_f is not None:
        try:
            reg_scan = reg_f.result()
            gc_untagged: list[str] = []
            if cfg.registry.gc_command:
                try:
                    gc_untagged = run_gc_task([*cfg.registry.gc_command[:-1], "--delete-untagged",
                                               cfg.registry.gc_command[-1]], dry_run=True)["manifests"]
                except Exception as exc:  # noqa: BLE001 - untagged manifests are then unknown, said so
                    get_run_logger().warning("GC dry run failed: %s", redactor.error(exc))
            from urllib.parse import urlparse

            plan = plan_retention(reg_scan, Rules(img.keep_tags, parse_duration(img.unused_for) / 86400,
                                                  tuple(img.keep_tag_patterns)),
                                  datetime.now(UTC), audit.in_use_refs, audit.in_use_digests,
                                  urlparse(str(cfg.registry.url)).netloc, gc_untagged)
        except Exception as exc:  # noqa: BLE001 - unknown, never all-clear
            error = redactor.error(exc)
    return AuditResult(audit, plan, error, scan, reg_scan, th)


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
    lines = [f"# {title}", "", f"- **Reclaimable on nodes:** {_gb(a.reclaimable)} in {len(a.unused)} unused images",
             "- **Registry:** " + (f"{_gb(r.registry.reclaimable)} reclaimable of {_gb(r.registry.total_bytes)} "
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


@flow(name="image-cleanup-audit", log_prints=False)
def image_cleanup_audit(platform: str = "main", cluster: str | None = None,
                        repositories: list[str] | None = None) -> Any:
    """Audit one cluster's node images and the registry. `repositories`: wildcards limiting the registry audit."""
    plat = Platform(platform)
    redactor = Redactor.of(plat.secrets())
    name = plat.config.cluster(cluster).name
    r = run_audit(plat, cluster, repositories, redactor)
    publish_audit(platform, name, r, redactor)
    data = r.summary()
    if r.registry_error and plat.config.registry:
        return Failed(message=f"registry unknown: {r.registry_error}", data=data)
    return Completed(message=f"{_gb(r.nodes.reclaimable)} reclaimable on nodes", data=data)


# --- prune ---------------------------------------------------------------------------------------


def plan_markdown(nodes: NodePrunePlan, registry: RetentionPlan | None) -> str:
    count = sum(len(n.images) for n in nodes.nodes)
    lines = [f"**Nodes:** {len(nodes.nodes)} nodes, {count} images, {_gb(nodes.bytes)}", "",
             md_table(nodes.rows(), limit=200)]
    if nodes.over_cap:
        lines.append(f"_Left for a later run (blast radius cap): {len(nodes.over_cap)} nodes_")
    if nodes.excluded:
        lines.append(f"_Excluded by the exclusion list: {len(nodes.excluded)} images_")
    if registry is not None:
        lines += ["", f"**Registry:** {len(registry.delete)} manifests, {_gb(registry.reclaimable)} after GC", "",
                  md_table([{"repository": m.repository, "digest": m.digest, "tags": ", ".join(m.tags)}
                            for m in registry.delete], limit=200)]
    return "\n".join(lines)


@flow(name="image-prune", log_prints=False)
def image_prune(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                nodes: bool = True, registry: bool = True, repositories: list[str] | None = None,
                only_nodes: list[str] | None = None, exclude: list[str] | None = None,
                approval_timeout_s: int = 3600, job_timeout_s: int = 900) -> Any:
    """Audit, plan and (approved) prune unused node images and registry manifests outside retention."""
    logger = get_run_logger()
    plat = Platform(platform)
    cfg = plat.config
    img = cfg.thresholds.images
    redactor = Redactor.of(plat.secrets())
    name = cfg.cluster(cluster).name
    r = run_audit(plat, cluster, repositories, redactor)
    node_plan = plan_node_prune(r.nodes, [*img.exclude, *(exclude or [])], img.prune_max_share,
                                only_nodes=only_nodes) if nodes else NodePrunePlan([])
    reg_plan = r.registry if registry else None
    if registry and cfg.registry and r.registry is None:
        return Failed(message=f"registry unknown, nothing pruned: {r.registry_error}")
    text = redactor.text(plan_markdown(node_plan, reg_plan))
    key = f"image-prune-{platform}-{name}"
    if dry_run:
        publish_markdown(key, f"# Image prune plan (dry run)\n\n{text}\n", description="dry run")
        return Completed(message="dry run", data={"nodes": node_plan.rows(), "registry": [
            (m.repository, m.digest) for m in (reg_plan.delete if reg_plan else [])]})
    answer = ask_approval(f"# Image prune: {platform}/{name}\n\n{text}", approval_timeout_s)
    if not answer.approve:
        publish_markdown(key, f"# Image prune declined by {answer.who()}\n\n{text}\n")
        return Completed(message=f"declined by {answer.who()}")
    who = answer.who()
    api = plat.kubernetes(cluster)
    records: list[dict[str, Any]] = []
    now = datetime.now(UTC).isoformat()
    if node_plan.nodes:
        fresh, dropped = still_unused(node_plan, list_pod_images_task(api))
        for d in dropped:
            records.append({**d, "where": d["node"], "what": d["image"], "result": "skipped (in use)",
                            "bytes": 0, "approved_by": who, "at": now})
        results = prune_nodes_task(api, fresh, img.prune_namespace, img.prune_job_image,
                                   uuid.uuid4().hex, job_timeout_s) if fresh.nodes else {}
        for n in fresh.nodes:
            for i in n.images:
                res = results.get(n.node, {}).get(i.id, "not-run")
                records.append({"where": n.node, "what": i.name, "id": i.id, "result": res,
                                "bytes": i.size if res == "removed" else 0, "approved_by": who, "at": now})
    gc: dict[str, Any] | None = None
    if reg_plan is not None and reg_plan.delete:
        deleted = delete_manifests_task(plat.registry(), [(m.repository, m.digest) for m in reg_plan.delete])
        sizes = {(m.repository, m.digest): sum(m.blobs.values()) + m.size for m in reg_plan.delete}
        for d in deleted:
            records.append({"where": f"registry/{d.repository}", "what": d.digest, "result": d.outcome,
                            "bytes": sizes[(d.repository, d.digest)], "approved_by": who, "at": now,
                            "note": d.detail})
        if cfg.registry.gc_command:
            gc = run_gc_task(list(cfg.registry.gc_command))
    removed = sum(1 for x in records if x["result"] in ("removed", "deleted"))
    md = [f"# Image prune: {platform}/{name}", "", f"Approved by **{who}**; {removed} removals.", "",
          md_table(records, columns=["where", "what", "result", "bytes", "approved_by"], limit=200)]
    md += ["", "## Registry garbage collection", "",
           f"Ran `{' '.join(cfg.registry.gc_command)}`: {len(gc['blobs'])} blobs swept." if gc
           else GC_ADVICE if reg_plan is not None and reg_plan.delete else "_nothing deleted in the registry_"]
    publish_markdown(key, redactor.text("\n".join(md)) + "\n", description=f"image prune approved by {who}")
    publish_table(f"image-prune-record-{platform}-{name}", redactor.value(records),
                  description="every removal: what, where, size, who approved")
    logger.info("image prune approved by %s: %s removals", who, removed)
    return Completed(message=f"{removed} removals approved by {who}",
                     data={"records": records, "gc": gc})
