"""Pure analysis of the image cleanup audit (issue 13): no Prefect, no network."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from tasks.image_analysis import (
    ImageFs,
    NodeImage,
    NodeImages,
    PodImages,
    Thresholds,
    audit_nodes,
    matches_any,
    normalize_ref,
    plan_node_prune,
)
from tasks.registry_retention import (
    Manifest,
    RegistryScan,
    Rules,
    plan_retention,
    untagged_manifests,
)

D1, D2, D3 = ("sha256:" + c * 64 for c in "abc")


def test_normalize_ref_follows_distribution_rules():
    assert normalize_ref("nginx") == "docker.io/library/nginx:latest"
    assert normalize_ref("foo/bar:1") == "docker.io/foo/bar:1"
    assert normalize_ref("localhost/x") == "localhost/x:latest"
    assert normalize_ref("reg:5000/a/b@" + D1) == "reg:5000/a/b@" + D1
    assert matches_any(["nginx:1.25"], ["docker.io/library/nginx:*"]) == "docker.io/library/nginx:*"
    assert matches_any(["quay.io/x:1"], ["*calico*"]) is None


def _nodes():
    big = NodeImage((f"reg.io/train@{D1}", "reg.io/train:v2"), 20_000_000_000)
    old = NodeImage((f"reg.io/train@{D2}", "reg.io/train:v1"), 19_000_000_000)
    init = NodeImage((f"docker.io/library/busybox@{D3}", "docker.io/library/busybox:1.36"), 4_000_000)
    return [NodeImages("n1", [big, old, init], ImageFs(100_000_000_000, 12_000_000_000)),
            NodeImages("n2", [big, old], ImageFs(100_000_000_000, 70_000_000_000)),
            NodeImages("n3", [old], None, "no summary stats (503)")]


def test_unused_images_count_every_container_kind_and_image_ids():
    pods = [PodImages("a", "train", "n1", ("reg.io/train:v2",), (), training=True),
            # the init container's image, by a short name
            PodImages("a", "init", "n1", ("busybox:1.36",), ()),
            # n2's pod names a moved tag, but its container status pins the digest of v1
            PodImages("a", "dbg", "n2", ("reg.io/train:latest",), (f"reg.io/train@{D2}",))]
    audit = audit_nodes(_nodes(), pods, Thresholds())
    unused = {(u.node, u.name) for u in audit.unused}
    assert unused == {("n1", "reg.io/train:v1"), ("n2", "reg.io/train:v2"), ("n3", "reg.io/train:v1")}
    assert audit.reclaimable == 19e9 + 20e9 + 19e9
    disks = {d.node: d for d in audit.disks}
    assert disks["n1"].status == "eviction-soft" and disks["n1"].training_pods == ["a/train"]
    assert disks["n2"].status == "ok"
    assert disks["n3"].status == "unknown" and "503" in disks["n3"].note  # unknown is not healthy
    assert audit.latest == [{"pod": "a/dbg", "node": "n2", "image": "reg.io/train:latest"}]


def test_disk_status_thresholds_default_to_the_guide():
    th = Thresholds()
    assert (th.gc_high_pct, th.gc_low_pct, th.eviction_hard_pct, th.eviction_soft_pct) == (65, 45, 10, 15)
    cases = {5: "eviction-hard", 14: "eviction-soft", 30: "gc", 38: "near-gc", 50: "ok"}
    for avail, status in cases.items():
        a = audit_nodes([NodeImages("n", [], ImageFs(100, avail))], [], th)
        assert a.disks[0].status == status, (avail, a.disks[0].status)
    late_gc = Thresholds(gc_high_pct=95)  # GC set late: eviction comes first
    assert audit_nodes([NodeImages("n", [], ImageFs(100, 18))], [], late_gc).disks[0].status == "near-eviction"


def test_duplicates_and_allow_list():
    th = Thresholds(allowed_registries=("reg.io",), large_bytes=10_000_000_000, duplicate_min_nodes=2)
    audit = audit_nodes(_nodes(), [PodImages("a", "p", "n1", ("busybox:1.36",))], th)
    assert {d["image"] for d in audit.duplicates} == {"reg.io/train:v2", "reg.io/train:v1"}
    assert next(d for d in audit.duplicates if d["image"] == "reg.io/train:v1")["nodes"] == 3
    assert {d["registry"] for d in audit.disallowed} == {"docker.io"}


def test_prune_plan_never_holds_an_image_in_use_and_honours_exclusions_and_cap():
    pods = [PodImages("a", "train", "n1", ("reg.io/train:v2",))]
    audit = audit_nodes(_nodes(), pods)
    plan = plan_node_prune(audit, exclude=["*busybox*"], max_share=0.67)
    planned = {(n.node, i.name) for n in plan.nodes for i in n.images}
    assert ("n1", "reg.io/train:v2") not in planned
    assert all("busybox" not in name for _, name in planned)
    assert plan.excluded == [{"node": "n1", "image": "docker.io/library/busybox:1.36", "pattern": "*busybox*"}]
    assert len(plan.nodes) == 2 and plan.over_cap == ["n3"]  # 2 of 3 nodes, biggest first


def _m(repo, digest, tags, days, blobs, children=()):
    now = datetime(2026, 1, 1, tzinfo=UTC)
    return Manifest(repo, digest, "application/vnd.oci.image.manifest.v1+json", 100, dict(blobs),
                    list(children), now - timedelta(days=days) if days is not None else None, list(tags))


def test_retention_counts_shared_blobs_once_and_keeps_what_workloads_use():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    base = {"sha256:base": 1000}
    ms = [_m("r", "d1", ["v1"], 100, {**base, "sha256:t1": 10}),
          _m("r", "d2", ["v2"], 90, {**base, "sha256:t2": 20}),
          _m("r", "d3", ["v3"], 80, {**base, "sha256:t3": 30}),
          _m("r", "d4", ["v4", "stable"], 70, {**base, "sha256:t4": 40}),
          _m("other", "d9", ["x"], 1, {"sha256:t2": 20})]  # shares t2 across repositories
    scan = RegistryScan({(m.repository, m.digest): m for m in ms}, ["other", "r"])
    plan = plan_retention(scan, Rules(keep_newest=1, keep_days=30), now, in_use_refs=["reg/r:v1"],
                          registry_host="reg")
    assert {m.digest for m in plan.delete} == {"d2", "d3"}
    # base is kept by d1/d4, t2 by the other repository: only t3 and two manifests are freed
    assert plan.reclaimable == 30 + 100 + 100
    kept = {d.digest: d.reasons for d in plan.decisions if d.keep}
    assert "used by a workload" in kept["d1"] and any("newest" in r for r in kept["d4"])


def test_retention_deletes_an_index_with_its_children_and_untagged_excludes_index_children():
    now = datetime(2026, 1, 1, tzinfo=UTC)
    ms = [_m("r", "c1", [], 100, {"sha256:a": 5}), _m("r", "c2", [], 100, {"sha256:b": 6}),
          _m("r", "idx", ["old"], 100, {}, ["c1", "c2"]), _m("r", "new", ["new"], 1, {"sha256:b": 6})]
    ms[2].media_type = "application/vnd.oci.image.index.v1+json"
    scan = RegistryScan({(m.repository, m.digest): m for m in ms}, ["r"])
    plan = plan_retention(scan, Rules(keep_newest=1, keep_days=30, keep_patterns=("release-*",)), now)
    assert [m.digest for m in plan.delete] == ["idx", "c1", "c2"]
    assert plan.reclaimable == 5 + 300  # b is still used by `new`
    out = untagged_manifests(scan, ["c1", "orphan"])
    assert [(u["digest"], u["kind"].split(" ")[0]) for u in out] == [("c1", "index"), ("orphan", "untagged")]
