"""`image-prune` as an operation (`tasks.operation`), and its way back for the registry.

`prune_operation`: the target is the cluster, named by its `kube-system` namespace UID; the plan lists each
node (by uid) with the image ids to remove and each registry manifest digest with all its current tags (a tag
added meanwhile changes the plan: deleting a digest takes every tag with it). Steps: one Job per node
(`tasks.node_images.run_prune_jobs`: `crictl rmi` for exactly the planned ids), one registry step per
repository (DELETE by digest), then the configured garbage-collect (the one step that cannot be undone).

`restore_operation`: the way back of the registry deletes, the recorded manifests re-PUT with their tags
while their blobs remain; node images need none (the kubelet pulls again on demand).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import Callable
from typing import Any

from tasks.image_analysis import NodePrunePlan, plan_node_prune
from tasks.image_audit import AuditResult
from tasks.image_report import gb, plan_markdown
from tasks.kubernetes import cluster_identity
from tasks.node_images import run_prune_jobs
from tasks.operation import Operation, Plan, Step, Target, WayBack, approval_timeout, lock_timeout
from tasks.redact import Redactor
from tasks.registry_api import GC_ADVICE, RegistryClient, RegistryError, delete_manifests, run_gc_task
from tasks.registry_retention import Manifest


def restore_entries(manifests: list[Manifest]) -> list[dict[str, Any]]:
    """What the way back of a registry delete re-PUTs: each manifest's bytes, media type and tags (children of an
    index first: the registry checks an index's manifests exist)."""
    ordered = sorted(manifests, key=lambda m: m.is_index)
    return [{"repository": m.repository, "digest": m.digest, "media_type": m.media_type, "tags": sorted(m.tags),
             "manifest": base64.b64encode(m.raw).decode()} for m in ordered]


def _common(platform: str, config: Any, approval_timeout_s: int | None, poll_interval_s: float,
            redactor: Redactor) -> dict[str, Any]:
    """What the prune and its restore share: one lock per platform, the config's timeouts."""
    return dict(approval_timeout_s=approval_timeout(config, approval_timeout_s), lock_timeout_s=lock_timeout(config),
                poll_interval_s=poll_interval_s, redactor=redactor, lock=f"image-prune-{platform}")


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


def prune_operation(platform: str, config: Any, api: Any, cluster: Any, registry: Any,
                    audit: Callable[[], AuditResult], *, nodes: bool, only_nodes: list[str] | None,
                    exclude: list[str] | None, job_timeout_s: int, approval_timeout_s: int | None,
                    poll_interval_s: float, redactor: Redactor) -> Operation:
    """The prune of what `audit()` finds unused (it audits the live platform each time it is called).

    `config` is the platform config (`thresholds.images`, the registry's `gc_command`, the timeouts), `api` the
    cluster's ApiClient, `cluster` its config section, `registry` the registry block, or None to leave the
    registry alone; `nodes=False` leaves the nodes alone."""
    img = config.thresholds.images
    block = registry
    gc_argv = list(config.registry.gc_command) if block is not None and config.registry.gc_command else None

    def planner(_: Any) -> Plan:
        identity = cluster_identity(api, cluster.request_timeout_s)
        r = audit()
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
                                         job_timeout_s, request_timeout_s=cluster.request_timeout_s)
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
                f"{sum(len(n.images) for n in node_plan.nodes)} images ({gb(node_plan.bytes)}) on "
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
        return Plan(Target("Kubernetes cluster", cluster.name, identity), steps, title="Image prune", details=details,
                    facts=facts, refusals=refusals, way_back=way_back)

    async def aplanner(s: Any) -> Plan:
        return await asyncio.to_thread(planner, s)

    return Operation("image-prune", platform, aplanner, key=cluster.name,
                     **_common(platform, config, approval_timeout_s, poll_interval_s, redactor))


def restore_operation(platform: str, config: Any, api: Any, cluster: Any, registry: Any,
                      restore: list[dict[str, Any]], *, approval_timeout_s: int | None, poll_interval_s: float,
                      redactor: Redactor) -> Operation:
    """The way back of registry deletes: re-PUT each recorded manifest (by digest when untagged, else by each
    tag), children of an index first. Refused when a manifest's bytes do not match its digest, a blob it needs
    is gone (garbage-collected), or one of its tags names another digest now. `registry` is the registry block."""
    block = registry

    def planner(_: Any) -> Plan:
        identity = cluster_identity(api, cluster.request_timeout_s)
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
        return Plan(Target("Kubernetes cluster", cluster.name, identity), steps, title="Image restore (registry)",
                    facts=[{"repository": e["repository"], "digest": e["digest"], "tags": sorted(e["tags"])}
                           for e in entries], refusals=refusals,
                    way_back=WayBack("Run image-prune again: the restored manifests are deleted again if they fall "
                                     "outside the retention rules.", "image-prune", {"dry_run": False}))

    async def aplanner(s: Any) -> Plan:
        return await asyncio.to_thread(planner, s)

    return Operation("image-prune", platform, aplanner, key=f"{cluster.name}-restore",
                     **_common(platform, config, approval_timeout_s, poll_interval_s, redactor))
