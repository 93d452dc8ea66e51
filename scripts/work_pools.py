"""The two work pools the deployments run on, created (or updated) idempotently.

    python -m scripts.work_pools create [--image REF] [--only platform-local|platform-k8s]
    python -m scripts.work_pools template > configs/prefect/k8s-base-job-template.json

`platform-local` is a process pool: a worker on the operator's machine runs each flow as a
subprocess in this checkout. `platform-k8s` is a Kubernetes pool: its worker starts each flow run as
a Job from the base job template in configs/prefect/k8s-base-job-template.json, which is
prefect-kubernetes' default template (`prefect work-pool get-default-base-job-template --type
kubernetes`) with this project's defaults: the flows' image (Dockerfile), the service account of
configs/k8s/rbac.yaml, resource requests and limits, a restricted security context and a TTL for
finished Jobs. `template` regenerates that file from the installed prefect-kubernetes, so an upgrade
that changes the default template shows up as a diff (tests/test_work_pools.py compares them).
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
K8S_TEMPLATE = REPO / "configs" / "prefect" / "k8s-base-job-template.json"
LOCAL_POOL = "platform-local"
K8S_POOL = "platform-k8s"
NAMESPACE = "ai-platform-ops"  # configs/k8s/rbac.yaml: the namespace, service account and Jobs
SERVICE_ACCOUNT = "ai-platform-ops-flows"
IMAGE = "registry.platform.example.internal/ai-platform-ops/flows:0.1.0"

# Each flow run is one Python process; the GPU sweep over 2,000 nodes and the heatmaps are the largest.
DEFAULTS: dict[str, Any] = {
    "image": IMAGE,
    "namespace": NAMESPACE,
    "service_account_name": SERVICE_ACCOUNT,
    "image_pull_policy": "IfNotPresent",
    "cpu_request": "250m",
    "memory_request": "512Mi",
    "cpu_limit": "2",
    "memory_limit": "2Gi",
    "finished_job_ttl": 86400,  # a day to read a failed run's pod, then Kubernetes removes the Job
    "backoff_limit": 0,  # Prefect, not the Job controller, decides about retries (prefect-kubernetes' doc)
}

# Pod Security Standards "restricted" (kubernetes.io/docs/concepts/security/pod-security-standards):
# the image runs as its non-root user (Dockerfile: USER 10001), no privilege escalation, no capabilities.
POD_SECURITY = {"runAsNonRoot": True, "runAsUser": 10001, "runAsGroup": 10001, "fsGroup": 10001,
                "seccompProfile": {"type": "RuntimeDefault"}}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "readOnlyRootFilesystem": False,
                      "capabilities": {"drop": ["ALL"]}}


def default_k8s_template() -> dict[str, Any]:
    """prefect-kubernetes' default base job template, as `prefect work-pool get-default-base-job-template`."""
    from prefect_kubernetes.worker import KubernetesWorker

    return KubernetesWorker.get_default_base_job_template()


def k8s_template(image: str | None = None) -> dict[str, Any]:
    """The default template with this project's defaults (and `image`, when given)."""
    template = copy.deepcopy(default_k8s_template())
    props = template["variables"]["properties"]
    for name, value in {**DEFAULTS, **({"image": image} if image else {})}.items():
        if name not in props:
            raise KeyError(f"prefect-kubernetes' template has no variable {name!r} any more: update DEFAULTS")
        props[name]["default"] = value
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["securityContext"] = POD_SECURITY
    (container,) = pod["containers"]
    container["securityContext"] = CONTAINER_SECURITY
    return template


def process_template() -> dict[str, Any]:
    from prefect.workers.process import ProcessWorker

    return ProcessWorker.get_default_base_job_template()


async def create_pools(only: list[str] | None = None, image: str | None = None) -> list[str]:
    """Create the pools (all, or `only`) on the server PREFECT_API_URL names, or bring existing ones to
    this project's template and description; their names.

    An existing pool keeps what operators set on it: paused or not, its concurrency limit, and the
    Kubernetes pool's image unless `image` is given. (`create_work_pool(overwrite=True)` would send
    the whole pool as an update: `is_paused=False` and `concurrency_limit=None` with it.)"""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
    from prefect.exceptions import ObjectNotFound

    pools = {
        LOCAL_POOL: ("process", process_template(),
                     "Flows as processes on the operator's machine, in this checkout."),
        K8S_POOL: ("kubernetes", k8s_template(image),
                   f"Flows as Kubernetes Jobs from the flows' image, with the {SERVICE_ACCOUNT} service account "
                   "(configs/k8s/rbac.yaml)."),
    }
    wanted = only or list(pools)
    async with get_client() as client:
        for name in wanted:
            kind, template, description = pools[name]
            try:
                existing = await client.read_work_pool(name)
            except ObjectNotFound:
                await client.create_work_pool(WorkPoolCreate(name=name, type=kind, base_job_template=template,
                                                             description=description))
                continue
            if existing.type != kind:
                raise SystemExit(f"work pool {name!r} exists with type {existing.type!r}, expected {kind!r}: "
                                 f"delete it (`prefect work-pool delete {name}`) and run this again")
            if not image:  # keep the image the operator gave earlier (`make work-pools IMAGE=...`)
                kept = ((existing.base_job_template.get("variables") or {}).get("properties") or {}).get("image")
                if kept and kept.get("default") and "image" in template["variables"]["properties"]:
                    template["variables"]["properties"]["image"]["default"] = kept["default"]
            await client.update_work_pool(name, WorkPoolUpdate(base_job_template=template, description=description))
    return wanted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.work_pools", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    create = sub.add_parser("create", help="create or update the work pools (idempotent)")
    create.add_argument("--only", action="append", choices=[LOCAL_POOL, K8S_POOL])
    create.add_argument("--image", help=f"the flows' image for {K8S_POOL} (default: the template's)")
    sub.add_parser("template", help="print the Kubernetes base job template derived from prefect-kubernetes'")
    args = parser.parse_args(argv)
    if args.command == "template":
        print(json.dumps(k8s_template(), indent=2))
        return 0
    for name in asyncio.run(create_pools(args.only, args.image)):
        print(f"work pool {name}: ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
