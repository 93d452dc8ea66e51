"""The image audit: the nodes' images and the registry read together, then judged.

`run_audit` submits the node scan (`tasks.node_images`: two Kubernetes listings and the kubelet summaries)
and the registry scan (`tasks.registry_api`: catalog, tags, manifests) as tasks, asks the registry's
garbage-collect for its untagged manifests (a dry run), and hands the answers to the pure analyses of
`tasks.image_analysis` (nodes) and `tasks.registry_retention` (registry). `image-cleanup-audit` reports the
result; `image-prune` plans from it (`tasks.image_plans`).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from prefect import get_run_logger

from blocks.config import parse_duration
from tasks.image_analysis import NodeAudit, Thresholds, audit_nodes
from tasks.node_images import NodeScan, scan_node_images_task
from tasks.redact import Redactor
from tasks.registry_api import run_gc_task, scan_registry_task
from tasks.registry_retention import RegistryScan, RetentionPlan, Rules, plan_retention


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


def run_audit(api: Any, cluster: Any, config: Any, registry: Any, repositories: list[str] | None,
              redactor: Redactor) -> AuditResult:
    """Audit one cluster's node images and the registry.

    `api` is the cluster's ApiClient, `cluster` its config section, `config` the platform config (its
    `thresholds.images` and `registry` sections), `registry` the registry block (None when the config has no
    registry). A registry that cannot be read is `registry_error`: unknown, never all-clear.
    """
    img = config.thresholds.images
    th = Thresholds.from_config(img)
    nodes_f = scan_node_images_task.submit(api, timeout_s=cluster.request_timeout_s)
    reg_f = scan_registry_task.submit(registry, repositories) if config.registry else None
    scan: NodeScan = nodes_f.result()
    audit = audit_nodes(scan.nodes, scan.pods, th)
    plan = reg_scan = None
    error = None if config.registry else "no registry section in the platform config"
    if reg_f is not None:
        try:
            reg_scan = reg_f.result()
            gc_untagged: list[str] = []
            if config.registry.gc_command:
                try:
                    gc_untagged = run_gc_task([*config.registry.gc_command[:-1], "--delete-untagged",
                                               config.registry.gc_command[-1]], dry_run=True)["manifests"]
                except Exception as exc:  # noqa: BLE001 - untagged manifests are then unknown, said so
                    get_run_logger().warning("GC dry run failed: %s", redactor.error(exc))
            from urllib.parse import urlparse

            plan = plan_retention(reg_scan, Rules(img.keep_tags, parse_duration(img.unused_for) / 86400,
                                                  tuple(img.keep_tag_patterns)),
                                  datetime.now(UTC), audit.in_use_refs, audit.in_use_digests,
                                  urlparse(str(config.registry.url)).netloc, gc_untagged)
        except Exception as exc:  # noqa: BLE001 - unknown, never all-clear
            error = redactor.error(exc)
    return AuditResult(audit, plan, error, scan, reg_scan, th)
