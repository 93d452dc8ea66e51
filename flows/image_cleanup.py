"""Image cleanup: what is reclaimable on the nodes and in the registry, and a deliberate, approved prune.

`image-cleanup-audit` (daily): two Kubernetes listings and the kubelet summaries (one task), the
registry's catalog, tags and manifests (one task), then the pure analyses of `tasks/image_analysis.py`
and `tasks/registry_retention.py`. It leaves a summary (reclaimable bytes per node and in the
registry, nodes near image GC or eviction with the training pods an eviction would hit, a picture
of each node's image filesystem against the thresholds) and tables. A node without summary stats is
`unknown`; a registry that cannot be read is reported as unknown and fails the run.

`image-prune` (manual) is an operation (`tasks.operation`): the target is the cluster, named by its
`kube-system` namespace UID; the plan lists each node (by uid) with the image ids to remove and each registry
manifest digest with all its current tags (a tag added meanwhile changes the plan: deleting a digest takes
every tag with it). A dry run (the default) publishes the plan; an approved run audits again and refuses if
the plan changed, then runs one Job per node (`crictl rmi` for exactly the planned ids, re-checked on the
node), deletes the planned registry manifests by digest (one step per repository), then runs the
configured garbage-collect (the one step that cannot be undone) or says how to. The way back of the
registry deletes is `restore`: the recorded manifests re-PUT with their tags while their blobs remain;
node images need none (the kubelet pulls again on demand).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NONE
from prefect.states import Completed

from blocks.config import parse_duration
from blocks.platform import Platform
from tasks.image_analysis import (
    NodeAudit,
    NodePrunePlan,
    Thresholds,
    audit_nodes,
    plan_node_prune,
)
from tasks.kubernetes import cluster_identity
from tasks.node_images import NodeScan, run_prune_jobs, scan_node_images_task
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout, run_operation_sync
from tasks.redact import Redactor
from tasks.registry_api import (
    GC_ADVICE,
    RegistryClient,
    RegistryError,
    delete_manifests,
    run_gc_task,
    scan_registry_task,
)
from tasks.registry_retention import Manifest, RegistryScan, RetentionPlan, Rules, plan_retention
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
        raise RegistryError(f"registry unknown: {r.registry_error}")
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


def restore_entries(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """What the way back of a registry delete re-PUTs: each manifest's bytes, media type and tags (children of an
    index first: the registry checks an index's manifests exist)."""
    ordered = sorted(manifests, key=lambda m: m.is_index)
    return [{"repository": m.repository, "digest": m.digest, "media_type": m.media_type, "tags": sorted(m.tags),
             "manifest": base64.b64encode(m.raw).decode()} for m in ordered]


def _registry_steps(block: Any, deletes: list[Manifest]) -> list[Step]:
    """One step per repository: DELETE its planned manifests by digest (every tag of a digest goes with it)."""
    steps = []
    by_repo: dict[str, list[Manifest]] = {}
    for m in deletes:
        by_repo.setdefault(m.repository, []).append(m)
    for repo, ms in sorted(by_repo.items()):
        def run(ms: list[Manifest] = ms) -> str:
            with RegistryClient.of(block) as client:
                done = delete_manifests(client, [(m.repository, m.digest) for m in ms])
            bad = [f"{d.digest}: {d.outcome} {d.detail}" for d in done if d.outcome not in ("deleted", "gone")]
            if bad:
                raise RegistryError("; ".join(bad))
            return ", ".join(f"{d.digest[:19]} {d.outcome}" for d in done)

        def check(_: Any, ms: list[Manifest] = ms) -> None:
            with RegistryClient.of(block) as client:
                left = [m.digest for m in ms if client.manifest(m.repository, m.digest) is not None]
            if left:
                raise RegistryError(f"still answered after the delete: {left}")

        what = "; ".join(f"{m.digest} ({', '.join(m.tags) or 'untagged'})" for m in ms)
        steps.append(Step(f"delete {repo} manifests", f"registry {repo}: {len(ms)} manifests deleted by digest, with "
                          f"every tag they carry: {what}", "each digest answers 404 afterwards",
                          "image-prune restore=... re-PUTs the recorded manifests (and their tags) while their blobs "
                          "are not yet garbage-collected", lambda r=run: asyncio.to_thread(r), check))
    return steps


@flow(name="image-prune", log_prints=False)
def image_prune(platform: str = "main", cluster: str | None = None, dry_run: bool = True,
                nodes: bool = True, registry: bool = True, repositories: list[str] | None = None,
                only_nodes: list[str] | None = None, exclude: list[str] | None = None,
                restore: list[dict[str, Any]] | None = None, approval_timeout_s: int | None = None,
                poll_interval_s: float = 10, job_timeout_s: int = 900) -> Any:
    """Audit, plan and (approved) prune unused node images and registry manifests outside retention.

    An operation (`tasks.operation`) on the cluster named by its kube-system namespace UID: the plan lists each
    node (by uid) with the image ids to remove, and each registry manifest digest with ALL its current tags;
    the approved run audits again and refuses if that changed. Steps: the node Jobs, one registry step per
    repository, then the registry's garbage collection (the one step that cannot be undone). `restore`: the
    way back of the registry deletes (the manifests' recorded bytes and tags, as a failed run names them):
    re-PUT while their blobs remain."""
    plat = Platform(platform)
    cfg = plat.config
    img = cfg.thresholds.images
    redactor = Redactor.of(plat.secrets())
    cl = cfg.cluster(cluster)
    api = plat.kubernetes(cluster)
    common = dict(approval_timeout_s=approval_timeout(cfg, approval_timeout_s), lock_timeout_s=lock_timeout(cfg),
                  poll_interval_s=poll_interval_s, redactor=redactor, lock=f"image-prune-{platform}")
    if restore:
        return run_operation_sync(Operation("image-prune", platform, _restore_planner(plat, api, cl, restore),
                                            key=f"{cl.name}-restore", **common), dry_run=dry_run)
    block = plat.registry() if registry and cfg.registry else None
    gc_argv = list(cfg.registry.gc_command) if block is not None and cfg.registry.gc_command else None

    def planner(_: Any) -> Plan:
        identity = cluster_identity(api, cl.request_timeout_s)
        r = run_audit(plat, cluster, repositories, redactor)
        node_plan = plan_node_prune(r.nodes, [*img.exclude, *(exclude or [])], img.prune_max_share,
                                    only_nodes=only_nodes) if nodes else NodePrunePlan([])
        refusals = []
        if block is not None and r.registry is None:
            refusals.append(f"registry unknown, nothing would be pruned there: {r.registry_error}")
        deletes = r.registry.delete if block is not None and r.registry is not None else []
        uids = {n.name: n.uid for n in r.scan.nodes}
        steps: list[Step] = []
        if node_plan.nodes:
            run_id = uuid.uuid4().hex

            def prune_nodes() -> str:
                results = run_prune_jobs(api, node_plan, img.prune_namespace, img.prune_job_image, run_id,
                                         job_timeout_s, request_timeout_s=cl.request_timeout_s)
                counts: dict[str, int] = {}
                for per_node in results.values():
                    for outcome in per_node.values():
                        counts[outcome] = counts.get(outcome, 0) + 1
                failed = {n: {i: o for i, o in per.items() if o in ("error", "not-run")} for n, per in results.items()}
                failed = {n: f for n, f in failed.items() if f}
                if failed:
                    raise RuntimeError(f"images not removed: {failed}")
                return ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))

            steps.append(Step(
                f"remove unused images on {len(node_plan.nodes)} node(s)",
                f"{sum(len(n.images) for n in node_plan.nodes)} images ({_gb(node_plan.bytes)}) on "
                + ", ".join(n.node for n in node_plan.nodes) + ": one Job per node runs `crictl rmi` for exactly "
                "the planned ids, skipping any a container uses by then",
                "every Job reports removed, in-use or missing for each id",
                "nothing to restore: the kubelet pulls an image again when a pod needs it",
                lambda: asyncio.to_thread(prune_nodes)))
        steps += _registry_steps(block, deletes)
        gc_at = None
        if deletes and gc_argv:
            steps.append(Step("registry garbage collection", "the registry's storage: blobs no manifest references "
                              "are swept", "garbage-collect exits 0",
                              "not reversible: swept blobs are gone, the deleted manifests can no longer be restored "
                              "(push them again from their builds)",
                              lambda: asyncio.to_thread(lambda: f"{len(run_gc_task.fn(gc_argv)['blobs'])} blobs swept")))
            gc_at = len(steps)
        before = 1 if node_plan.nodes else 0  # the registry steps come after the node step, one per repository
        repos = sorted({m.repository for m in deletes})

        def way_back(applied: int) -> WayBack:
            node_note = "Node images need nothing: the kubelet pulls an image again when a pod needs it."
            if gc_at is not None and applied >= gc_at:
                return WayBack("Not reversible once garbage collection has run: push the deleted images again from "
                               f"their builds. {node_note}")
            done = set(repos[:max(0, applied - before)])
            undo = [m for m in deletes if m.repository in done]
            if not undo:
                return WayBack(node_note)
            return WayBack(f"Re-PUT the {len(undo)} deleted manifests from their recorded bytes, with their tags "
                           f"(possible while their blobs remain: before garbage collection). {node_note}",
                           "image-prune", {"restore": restore_entries(undo), "dry_run": False})

        facts = {"nodes": {n.node: {"uid": uids.get(n.node, ""), "images": sorted(i.id for i in n.images)}
                           for n in node_plan.nodes},
                 "registry": [{"repository": m.repository, "digest": m.digest, "tags": sorted(m.tags)}
                              for m in deletes],
                 "garbage_collect": gc_at is not None}
        details = plan_markdown(node_plan, r.registry if block is not None else None)
        if deletes and not gc_argv:
            details += "\n\n" + GC_ADVICE
        return Plan(Target("Kubernetes cluster", cl.name, identity), steps, title="Image prune", details=details,
                    facts=facts, refusals=refusals, way_back=way_back)

    async def aplanner(s: Any) -> Plan:
        return await asyncio.to_thread(planner, s)

    return run_operation_sync(Operation("image-prune", platform, aplanner, key=cl.name, **common), dry_run=dry_run)


def _restore_planner(plat: Platform, api: Any, cl: Any, restore: list[dict[str, Any]]) -> Callable[[Any], Any]:
    """The way back of registry deletes: re-PUT each recorded manifest (by digest when untagged, else by each
    tag), children of an index first. Refused when a manifest's bytes do not match its digest, a blob it needs
    is gone (garbage-collected), or one of its tags names another digest now."""
    block = plat.registry()

    def planner(_: Any) -> Plan:
        identity = cluster_identity(api, cl.request_timeout_s)
        entries = [{**e, "body": base64.b64decode(e["manifest"])} for e in restore]
        refusals: list[str] = []
        by_repo: dict[str, list[dict]] = {}
        with RegistryClient.of(block) as client:
            for e in entries:
                repo, digest = e["repository"], e["digest"]
                if "sha256:" + hashlib.sha256(e["body"]).hexdigest() != digest:
                    refusals.append(f"{repo}@{digest}: the recorded bytes are not that manifest")
                    continue
                doc = json.loads(e["body"])
                blobs = [d["digest"] for d in [doc.get("config") or {}, *(doc.get("layers") or [])] if d.get("digest")]
                gone = [b for b in blobs if not client.blob_exists(repo, b)]
                if gone:
                    refusals.append(f"{repo}@{digest}: blob(s) {', '.join(gone)} gone (garbage-collected): push the "
                                    "image again from its build")
                for tag in e["tags"]:
                    now = client.manifest(repo, tag)
                    if now is not None and now[0] != digest:
                        refusals.append(f"{repo}:{tag} names {now[0]} now: left as it is")
                by_repo.setdefault(repo, []).append(e)
        steps = []
        for repo, es in sorted(by_repo.items()):
            def run(es: list[dict] = es) -> str:
                with RegistryClient.of(block) as client:
                    for e in es:
                        for ref in e["tags"] or [e["digest"]]:
                            client.put_manifest(e["repository"], ref, e["body"], e["media_type"])
                return f"{len(es)} manifests"

            def check(_: Any, es: list[dict] = es) -> None:
                with RegistryClient.of(block) as client:
                    wrong = [f"{e['repository']}:{ref}" for e in es for ref in e["tags"] or [e["digest"]]
                             if (client.manifest(e["repository"], ref) or ("",))[0] != e["digest"]]
                if wrong:
                    raise RegistryError(f"not restored: {wrong}")

            steps.append(Step(f"restore {repo} manifests", f"registry {repo}: " + "; ".join(
                f"{e['digest']} ({', '.join(e['tags']) or 'untagged'})" for e in es) + " put back",
                "each tag (or digest) names the recorded digest afterwards",
                "image-prune deletes them again when they fall outside the retention rules",
                lambda r=run: asyncio.to_thread(r), check))
        return Plan(Target("Kubernetes cluster", cl.name, identity), steps, title="Image restore (registry)",
                    facts=[{"repository": e["repository"], "digest": e["digest"], "tags": sorted(e["tags"])}
                           for e in entries], refusals=refusals,
                    way_back=WayBack("Run image-prune again: the restored manifests are deleted again if they fall "
                                     "outside the retention rules.", "image-prune", {"dry_run": False}))

    async def aplanner(s: Any) -> Plan:
        return await asyncio.to_thread(planner, s)

    return aplanner
