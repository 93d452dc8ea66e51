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

The audit is `tasks.image_audit`, its report `tasks.image_report`, the prune and its restore as operations
`tasks.image_plans`; this module only composes them.
"""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.states import Completed

from blocks.platform import Platform
from tasks.image_audit import AuditResult, run_audit
from tasks.image_plans import prune_operation, restore_operation
from tasks.image_report import gb, publish_audit
from tasks.operation import run_operation_sync
from tasks.redact import Redactor
from tasks.registry_api import RegistryError


@flow(name="image-cleanup-audit", log_prints=False)
def image_cleanup_audit(platform: str = "main", cluster: str | None = None,
                        repositories: list[str] | None = None) -> Any:
    """Audit one cluster's node images and the registry. `repositories`: wildcards limiting the registry audit."""
    plat = Platform(platform)
    cfg = plat.config
    redactor = Redactor.of(plat.secrets())
    cl = cfg.cluster(cluster)
    r = run_audit(plat.kubernetes(cluster), cl, cfg, plat.registry() if cfg.registry else None, repositories,
                  redactor)
    publish_audit(platform, cl.name, r, redactor)
    data = r.summary()
    if r.registry_error and cfg.registry:
        raise RegistryError(f"registry unknown: {r.registry_error}")
    return Completed(message=f"{gb(r.nodes.reclaimable)} reclaimable on nodes", data=data)


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
    redactor = Redactor.of(plat.secrets())
    cl = cfg.cluster(cluster)
    api = plat.kubernetes(cluster)
    if restore:
        return run_operation_sync(restore_operation(platform, cfg, api, cl, plat.registry(), restore,
                                                    approval_timeout_s=approval_timeout_s,
                                                    poll_interval_s=poll_interval_s, redactor=redactor),
                                  dry_run=dry_run)

    def audit() -> AuditResult:  # the live platform, read again by the approved run's re-plan
        return run_audit(api, cl, cfg, plat.registry() if cfg.registry else None, repositories, redactor)

    op = prune_operation(platform, cfg, api, cl, plat.registry() if registry and cfg.registry else None, audit,
                         nodes=nodes, only_nodes=only_nodes, exclude=exclude, job_timeout_s=job_timeout_s,
                         approval_timeout_s=approval_timeout_s, poll_interval_s=poll_interval_s, redactor=redactor)
    return run_operation_sync(op, dry_run=dry_run)
