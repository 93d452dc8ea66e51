"""Image cleanup audit and prune (issue 13) against the sandbox: the real docker-registry (v2 API, deletes
enabled) with pushed blobs, manifests, an index and an untagged manifest; the emulated cluster's node images,
kubelet summary API and simulated kubelet that runs prune Jobs. Faults: registry down, a manifest gone between
listing and deletion, a node without summary stats, a huge catalog, 429."""

from __future__ import annotations

import math
from datetime import UTC, datetime

import httpx
import pytest

from tests.conftest import run_flow_sync

RULES = {"keep_newest": 2, "keep_days": 30, "keep_patterns": ("release-*",)}


def _client(sb):
    from tasks.registry_api import RegistryClient

    return RegistryClient(sb.config["registry"]["url"])


def _host(sb) -> str:
    return httpx.URL(sb.config["registry"]["url"]).netloc.decode()


def test_registry_audit_finds_exactly_what_the_fixture_implies(training_platform, sandbox):
    from sandbox.registry_seed import seed_audit_images
    from tasks.registry_api import scan_registry
    from tasks.registry_retention import Rules, plan_retention

    now = datetime.now(UTC)
    fx = seed_audit_images(sandbox.config["registry"]["url"], "audit-a", now)
    with _client(sandbox) as c:
        scan = scan_registry(c, ["audit-a/*"])
    assert scan.repositories == ["audit-a/multi", "audit-a/train"] and not scan.errors
    index = scan.manifests[("audit-a/multi", fx.digests["multi:old"])]
    assert set(index.children) == {fx.digests["multi:old/amd64"], fx.digests["multi:old/arm64"]}
    assert sorted(scan.manifests[("audit-a/train", fx.digests["train:v2"])].tags) == ["stable", "v2"]
    plan = plan_retention(scan, Rules(**RULES), now, in_use_refs=[fx.in_use_ref], registry_host=_host(sandbox))
    assert {m.digest for m in plan.delete} == fx.expect_delete
    assert plan.reclaimable == fx.expect_reclaimable  # the shared base layer counted once, and not freed
    why = {d.digest: d.reasons for d in plan.decisions}
    assert why[fx.digests["train:v1"]] == ["used by a workload"]
    assert why[fx.digests["train:release-1"]] == ["tag matches release-*"]


def test_huge_catalog_is_read_page_by_page(training_platform, sandbox):
    from sandbox.registry import push_image

    url = sandbox.config["registry"]["url"]
    for i in range(23):
        push_image(url, f"audit-cat/r{i:02d}", "v1")
    with _client(sandbox) as c:
        names = c.catalog(page=5)
        pages = c.requests
    assert {f"audit-cat/r{i:02d}" for i in range(23)} <= set(names)
    assert len(names) == len(set(names)) and names == sorted(names)
    assert pages == math.ceil(len(names) / 5) or pages == math.ceil(len(names) / 5) + 1  # Link rel="next"


class _Throttle(httpx.HTTPTransport):
    """The registry's own answers, but the first `n` requests get 429 (as a rate-limiting proxy in front)."""

    def __init__(self, n: int):
        super().__init__()
        self.n = n

    def handle_request(self, request):
        if self.n > 0:
            self.n -= 1
            return httpx.Response(429, headers={"Retry-After": "0"}, json={"errors": [{"code": "TOOMANYREQUESTS"}]})
        return super().handle_request(request)


def test_429_is_waited_out_once_then_left_to_the_retry_policy(training_platform, sandbox):
    from tasks._retry import is_transient

    with _client(sandbox) as c:
        c._client = httpx.Client(base_url=c.url, transport=_Throttle(1), trust_env=False)
        assert isinstance(c.catalog(), list) and c.requests >= 2
        c._client = httpx.Client(base_url=c.url, transport=_Throttle(10), trust_env=False)
        with pytest.raises(httpx.HTTPStatusError) as err:
            c.catalog()
    assert err.value.response.status_code == 429 and is_transient(err.value)


def test_registry_down_is_an_error_worth_retrying_never_an_empty_registry():
    from sandbox._common import free_port
    from tasks._retry import is_transient
    from tasks.registry_api import RegistryClient, scan_registry

    with RegistryClient(f"http://127.0.0.1:{free_port()}", timeout_s=2) as c, pytest.raises(httpx.ConnectError) as e:
        scan_registry(c)
    assert is_transient(e.value)


def test_manifest_gone_between_listing_and_deletion(training_platform, sandbox):
    from sandbox.registry_seed import seed_audit_images
    from tasks.registry_api import delete_manifests, scan_registry
    from tasks.registry_retention import Rules, plan_retention

    now = datetime.now(UTC)
    fx = seed_audit_images(sandbox.config["registry"]["url"], "audit-g", now)
    with _client(sandbox) as c:
        plan = plan_retention(scan_registry(c, ["audit-g/*"]), Rules(**RULES), now, [fx.in_use_ref],
                              registry_host=_host(sandbox))
        gone = fx.digests["train:v3"]
        assert c.delete_manifest("audit-g/train", gone).outcome == "deleted"  # someone else deleted it
    with _client(sandbox) as c:
        results = delete_manifests(c, [(m.repository, m.digest) for m in plan.delete])
    assert {r.digest: r.outcome for r in results} == {gone: "gone", fx.digests["train:v2"]: "deleted"}


def _expected_unused(sandbox_obj) -> tuple[int, int]:
    """Unused images and bytes the seeded cluster implies: node images no pod on that node names."""
    from sandbox.cluster import seed_cluster
    from sandbox.kubelet import KubeletSimulator

    class _K:
        def __init__(self):
            self.hooks = []

    cluster = seed_cluster(sandbox_obj.gpu_nodes)
    KubeletSimulator(_K()).seed(cluster.nodes, cluster.pods)
    count = size = 0
    for node in cluster.nodes:
        used = {c["image"] for p in cluster.pods if p["spec"]["nodeName"] == node["metadata"]["name"]
                for c in p["spec"]["containers"]}
        for img in node["status"]["images"]:
            if not set(img["names"]) & used:
                count += 1
                size += img["sizeBytes"]
    return count, size


def test_audit_flow_reports_nodes_and_registry(clean_sandbox, sandbox_platform, training_platform):
    from flows.image_cleanup import image_cleanup_audit
    from sandbox.registry_seed import seed_audit_images

    fx = seed_audit_images(clean_sandbox.config["registry"]["url"], "audit-f", datetime.now(UTC))
    state = run_flow_sync(image_cleanup_audit, platform=sandbox_platform, repositories=["audit-f/*"])
    assert state.is_completed(), state.message
    data = state.result()
    count, size = _expected_unused(clean_sandbox)
    assert (data["unused_images"], data["node_reclaimable_bytes"]) == (count, size)
    # cp-1's kubelet is unreachable: unknown, not ok; one node past soft eviction, one near GC
    assert data["node_status"]["unknown"] == 1 and data["node_status"]["eviction-soft"] == 1
    assert data["node_status"]["near-gc"] == 1
    assert data["list_calls"] == 2 and data["summary_calls"] == 20
    # the platform keeps the newest 10 tags per repository: nothing of audit-f (7 tags) is outside that
    assert data["registry_error"] is None and data["registry_delete"] == 0
    assert fx.digests


def test_approved_prune_removes_exactly_the_plan_and_gc_frees_the_blobs(clean_sandbox, sandbox_platform,
                                                                        training_platform, monkeypatch):
    from flows import image_cleanup
    from sandbox.registry_seed import seed_audit_images
    from tasks import image_audit
    from tasks.kubernetes import api_client_from_kubeconfig
    from tests.approvals import APPROVE, run_and_answer

    sb = clean_sandbox
    url = sb.config["registry"]["url"]
    fx = seed_audit_images(url, "audit-p", datetime.now(UTC))
    # the retention rules of this test (the platform's: keep_tags 10, 14 days): K=2, 30 days, release-*
    real_rules = image_audit.Rules
    monkeypatch.setattr(image_audit, "Rules", lambda *a: real_rules(**RULES))
    # a pod runs audit-p/train:v1 on gpu-node-0003: it must stay in the registry
    api = api_client_from_kubeconfig(str(sb.kubeconfig), "sandbox")
    from kubernetes import client as k8s

    k8s.CoreV1Api(api).create_namespaced_pod("training", {
        "apiVersion": "v1", "kind": "Pod", "metadata": {"name": "uses-v1", "namespace": "training"},
        "spec": {"nodeName": "gpu-node-0003", "containers": [{"name": "m", "image": fx.in_use_ref}]},
        "status": {"phase": "Running"}})
    nodes = ["gpu-node-0001", "gpu-node-0002"]
    before = {n["metadata"]["name"]: n["status"]["images"] for n in
              _nodes(api) if n["metadata"]["name"] in nodes}
    state = run_and_answer(image_cleanup.image_prune, {
        "platform": sandbox_platform, "dry_run": False, "repositories": ["audit-p/*"], "only_nodes": nodes,
        "poll_interval_s": 0.5}, APPROVE)
    assert state.is_completed(), state.message
    record = state.result()
    assert record["approver"] == "alice"
    assert [r["step"] for r in record["steps"]] == ["remove unused images on 2 node(s)", "delete audit-p/train manifests",
                                                    "registry garbage collection"]
    assert all(r["status"] == "ok" for r in record["steps"]) and "error" not in record["steps"][0]["detail"]
    planned = record["facts"]["nodes"]
    assert set(planned) == set(nodes) and all(planned[n]["uid"] for n in nodes)
    after = {n["metadata"]["name"]: n["status"]["images"] for n in _nodes(api) if n["metadata"]["name"] in nodes}
    pods_on = {n: {c["image"] for p in _pods(api) if p["spec"].get("nodeName") == n for c in p["spec"]["containers"]}
               for n in nodes}
    for n in nodes:
        gone = [i for i in before[n] if i not in after[n]]
        assert sorted(next((x for x in i["names"] if "@sha256:" in x), i["names"][0]) for i in gone) \
            == planned[n]["images"]
        assert all(set(i["names"]) & pods_on[n] for i in after[n])  # what is left is what pods use
    # registry: exactly the planned manifests are gone (with every tag: v2 and stable), the rest answer;
    # GC freed the expected blobs
    assert {m["digest"] for m in record["facts"]["registry"]} == fx.expect_delete
    assert ["stable", "v2"] in [m["tags"] for m in record["facts"]["registry"]]
    with httpx.Client(base_url=url, trust_env=False) as c:
        for name, digest in fx.digests.items():
            repo = f"audit-p/{name.split(':')[0]}"
            code = c.head(f"/v2/{repo}/manifests/{digest}",
                          headers={"Accept": "application/vnd.oci.image.manifest.v1+json, "
                                             "application/vnd.oci.image.index.v1+json"}).status_code
            assert code == (404 if digest in fx.expect_delete else 200), name
        for blob in fx.expect_freed_blobs:
            assert c.head(f"/v2/audit-p/train/blobs/{blob}").status_code == 404


def _nodes(api):
    import orjson
    from kubernetes import client as k8s

    return orjson.loads(k8s.CoreV1Api(api).list_node(_preload_content=False).data)["items"]


def _pods(api):
    import orjson
    from kubernetes import client as k8s

    return orjson.loads(k8s.CoreV1Api(api).list_pod_for_all_namespaces(_preload_content=False).data)["items"]


def test_prune_dry_run_plans_and_changes_nothing(clean_sandbox, sandbox_platform, training_platform):
    from flows.image_cleanup import image_prune
    from tasks.kubernetes import api_client_from_kubeconfig

    api = api_client_from_kubeconfig(str(clean_sandbox.kubeconfig), "sandbox")
    before = {n["metadata"]["name"]: n["status"]["images"] for n in _nodes(api)}
    state = run_flow_sync(image_prune, platform=sandbox_platform, repositories=["audit-none/*"],
                          exclude=["*argoexec*"])
    assert state.is_completed(), state.message
    planned = state.result()["facts"]["nodes"]
    ids = {(n, i) for n, p in planned.items() for i in p["images"]}
    assert ids and not any("argoexec" in i for _, i in ids)
    in_use = {(p["spec"]["nodeName"], ref) for p in _pods(api)
              for ref in [c["image"] for c in p["spec"]["containers"]]
              + [s.get("imageID") for s in (p.get("status") or {}).get("containerStatuses") or []]}
    assert not ids & in_use  # an image a pod uses is never planned
    assert len(planned) <= 10  # prune_max_share 0.5 of 20 nodes
    assert {n["metadata"]["name"]: n["status"]["images"] for n in _nodes(api)} == before
    assert not [p for p in _pods(api) if p["metadata"]["name"].startswith("image-prune-")]
