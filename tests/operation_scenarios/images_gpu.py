"""image-prune, gpu-monitoring-sweep (its cordon) and gpu-node-uncordon as the operation contract drives them.

The GPU scenarios read the emulated Kubernetes API (`spec.unschedulable` and the unhealthy taint of each node);
the sweep's scenario puts a critical XID on two GPU nodes (the real Prometheus scraping the simulated
dcgm-exporters sees it); the uncordon's cordons two nodes as the sweep would. The image scenario reads the
sandbox's real registry (Debian's docker-registry) over HTTP: two repositories of twelve old tags each, of
which the platform's retention (keep the newest 10) deletes the two oldest of each.

Each `params` prepares what the run is about (faults, cordons) and `reset` takes the sandbox back to its
seeded state, so nothing of a scenario outlives its test.
"""

from __future__ import annotations

import base64
import json
import time
from datetime import UTC, datetime, timedelta

import httpx

from tests.operation_scenarios import Scenario

WINDOW = "20s"
XID_NODES = ("gpu-node-0003", "gpu-node-0004")
CORDONED = ("gpu-node-0010", "gpu-node-0011")
REPOS = ("contract-img/a", "contract-img/b")
TAGS = 12  # the platform keeps the newest 10 tags (thresholds.images.keep_tags)
EPOCH = datetime(2020, 1, 1, tzinfo=UTC)  # long before `unused_for` (14 days)


def _platform(sb) -> str:
    from blocks.config import load_platform_config

    return load_platform_config(sb.platform_yaml).name


def _api(sb):
    from tasks.kubernetes import api_client_from_kubeconfig

    return api_client_from_kubeconfig(str(sb.kubeconfig))


def _node(sb, name: str) -> dict:
    from tasks.kubernetes import read_node

    with _api(sb) as api:
        return read_node(api, name)


def _cordoned(sb, names) -> list[bool]:
    from tasks.kubernetes import is_cordoned_by_us

    return [is_cordoned_by_us(_node(sb, n)) for n in names]


def _recreate(sb, name: str) -> None:
    """The node deleted and created again under the same name (as a re-imaged machine joins): another uid."""
    from kubernetes import client as k8s

    obj = _node(sb, name)
    meta = {k: v for k, v in obj["metadata"].items() if k not in ("uid", "resourceVersion", "creationTimestamp")}
    with _api(sb) as api:
        core = k8s.CoreV1Api(api)
        core.delete_node(name)
        core.create_node({**obj, "metadata": meta})


def _run_way_back(flow_fn, sb, failed):
    """The way back as the failed run names it: its deployment and parameters (the StepFailed's WayBack)."""
    from tests.approvals import APPROVE, run_and_answer

    exc = failed.result(raise_on_failure=False)
    wb = exc.way_back
    assert wb is not None and wb.deployment == flow_fn.name, wb
    assert f"Way back: {wb.text}" in failed.message
    return run_and_answer(flow_fn, {"platform": _platform(sb), **wb.parameters, "poll_interval_s": 0.5}, APPROVE)


# --- the sweep's cordon ----------------------------------------------------------------------------------


def _sweep_params(sb) -> dict:
    """A critical XID (79) on two GPU nodes, seen by Prometheus, before the run: the cordon plans both."""
    from tasks.gpu_sweep import sweep
    from tasks.gpu_model import Kind, SweepThresholds

    for node in XID_NODES:
        sb.fault("xid", node=node, gpu=2, value=79)
    deadline = time.monotonic() + 90
    while True:
        with _api(sb) as api:
            result = sweep(api, sb.urls["prometheus"], SweepThresholds(window=WINDOW, xid_resolution="2s"),
                           cluster="sandbox")
        if {f.node for f in result.findings if f.kind is Kind.CRITICAL_XID} >= set(XID_NODES):
            break
        assert time.monotonic() < deadline, "Prometheus never showed the injected XIDs"
        time.sleep(2)
    return {"window": WINDOW, "max_share": 0.2}


def _sweep_way_back(sb, failed):
    from flows.gpu_monitoring_sweep import gpu_node_uncordon

    return _run_way_back(gpu_node_uncordon, sb, failed)


SWEEP = Scenario(
    "gpu-monitoring-sweep", _sweep_params,
    applied=lambda sb: all(_cordoned(sb, XID_NODES)),
    change=lambda sb: _recreate(sb, XID_NODES[1]),
    way_back=_sweep_way_back,
    restored=lambda sb: not any(_cordoned(sb, XID_NODES)),
    reset=lambda sb: sb.reset())


# --- the uncordon ----------------------------------------------------------------------------------------


def _uncordon_params(sb) -> dict:
    """Two healthy GPU nodes cordoned as the sweep leaves them (unschedulable, the taint, the annotation)."""
    from tasks.gpu_model import FINDING_ANNOTATION
    from tasks.gpu_plans import UNHEALTHY_TAINT_KEY
    from tasks.kubernetes import cordon_and_taint

    with _api(sb) as api:
        for node in CORDONED:
            cordon_and_taint(api, node, "xid-79", json.dumps({"by": "contract scenario"}),
                             taint_key=UNHEALTHY_TAINT_KEY, annotation_key=FINDING_ANNOTATION)
    return {"nodes": list(CORDONED), "window": WINDOW}


def _uncordon_way_back(sb, failed):
    from flows.gpu_monitoring_sweep import gpu_node_uncordon

    return _run_way_back(gpu_node_uncordon, sb, failed)


UNCORDON = Scenario(
    "gpu-node-uncordon", _uncordon_params,
    applied=lambda sb: not any(_cordoned(sb, CORDONED)),
    change=lambda sb: _recreate(sb, CORDONED[1]),
    way_back=_uncordon_way_back,
    restored=lambda sb: all(_cordoned(sb, CORDONED)),
    reset=lambda sb: sb.reset())


# --- image-prune ------------------------------------------------------------------------------------------

_SEEDED: dict[str, dict[str, str]] = {}  # repository -> tag -> digest


def _registry(sb) -> str:
    return sb.config["registry"]["url"]


def _reset_images(sb) -> None:
    """Each repository holds exactly tags t00..t11 (t00 the oldest), nothing else: delete what is there, push."""
    from sandbox.registry_seed import Pusher

    if "registry" not in sb.config:
        return
    p = Pusher(_registry(sb))
    try:
        for repo in REPOS:
            tags = p.client.get(f"/v2/{repo}/tags/list")
            for tag in (tags.json().get("tags") or []) if tags.status_code == 200 else []:
                got = p.client.head(f"/v2/{repo}/manifests/{tag}",
                                    headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
                if got.status_code == 200:
                    p.client.delete(f"/v2/{repo}/manifests/{got.headers['Docker-Content-Digest']}")
            _SEEDED[repo] = {}
            for i in range(TAGS):
                digest, _, _ = p.image(repo, f"t{i:02d}", [f"{repo}-layer-{i}".encode() * 64],
                                       EPOCH + timedelta(days=i))
                _SEEDED[repo][f"t{i:02d}"] = digest
    finally:
        p.close()


def _pruned(sb) -> dict[tuple[str, str], str]:
    """(repository, tag) -> digest of the two oldest tags of each repository: what retention deletes."""
    return {(repo, t): _SEEDED[repo][t] for repo in REPOS for t in ("t00", "t01")}


def _manifest_status(sb, repo: str, ref: str) -> tuple[int, str]:
    with httpx.Client(base_url=_registry(sb), trust_env=False, timeout=10) as c:
        r = c.head(f"/v2/{repo}/manifests/{ref}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        return r.status_code, r.headers.get("Docker-Content-Digest", "")


def _images_gone(sb) -> bool:
    return all(_manifest_status(sb, repo, digest)[0] == 404 for (repo, _), digest in _pruned(sb).items())


def _images_back(sb) -> bool:
    """Every pruned manifest answers again by digest, and each of its tags names it again."""
    return all(_manifest_status(sb, repo, digest) == (200, digest) and _manifest_status(sb, repo, tag) == (200, digest)
               for (repo, tag), digest in _pruned(sb).items())


def _new_tag(sb) -> None:
    """Someone tags a planned digest while the approval waits: deleting the digest would take that tag too."""
    repo, tag = REPOS[0], "t00"
    with httpx.Client(base_url=_registry(sb), trust_env=False, timeout=10) as c:
        body = c.get(f"/v2/{repo}/manifests/{tag}", headers={"Accept": "application/vnd.oci.image.manifest.v1+json"})
        body.raise_for_status()
        c.put(f"/v2/{repo}/manifests/pinned", content=body.content,
              headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()


def _images_way_back(sb, failed):
    from flows.image_cleanup import image_prune

    back = _run_way_back(image_prune, sb, failed)
    restore = failed.result(raise_on_failure=False).way_back.parameters["restore"]
    assert all(base64.b64decode(m["manifest"]) for m in restore)
    return back


IMAGES = Scenario(
    "image-prune", lambda sb: {"nodes": False, "repositories": [f"{r}*" for r in REPOS]},
    applied=_images_gone, change=_new_tag, way_back=_images_way_back, restored=_images_back,
    reset=_reset_images, fixtures=("training_platform",))

SCENARIOS = [IMAGES, SWEEP, UNCORDON]
