"""What the images on the nodes mean: unused images, reclaimable bytes, disk pressure ahead (pure).

Inputs are plain data the I/O tasks fetched (`tasks/node_images.py`):

- each node's ``status.images`` (``names``: repo digests ``repo@sha256:...`` and tags ``repo:tag``,
  ``sizeBytes``: what the kubelet reports from the CRI's ImageService);
- each pod's image references: ``spec.containers``, ``spec.initContainers`` and
  ``spec.ephemeralContainers[].image`` and ``status.*ContainerStatuses[].imageID`` (the digest the
  runtime resolved the reference to);
- each node's image filesystem from the kubelet summary API (``node.runtime.imageFs``:
  `capacityBytes`, `availableBytes`, `usedBytes`; k8s.io/kubelet/pkg/apis/stats/v1alpha1 types.go
  ``RuntimeStats.ImageFs``).

An image is *in use* when any pod on its node (whatever the pod's phase: a stopped container still
pins its image, `crictl rmi` refuses it) names it by tag or digest. Everything else is unused, and
its size is reclaimable. Node disk thresholds follow the kubelet: image GC starts when the usage
``100 - available*100/capacity`` reaches ``imageGCHighThresholdPercent`` (pkg/kubelet/images/
image_gc_manager.go ``GarbageCollect``), eviction when ``imagefs.available`` falls under the
evictionSoft/evictionHard percentages of capacity (pkg/kubelet/eviction/helpers.go).
"""

from __future__ import annotations

import fnmatch
import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

DOCKER_HUB = "docker.io"
DIGEST_RE = re.compile(r"sha256:[0-9a-f]{64}")
# What may reach `crictl rmi` on a node: an image reference or digest, nothing a shell would read.
IMAGE_ID_RE = re.compile(r"^[a-z0-9][a-z0-9._\-/:]*(@sha256:[0-9a-f]{64})?$|^sha256:[0-9a-f]{64}$")


# --- references ------------------------------------------------------------------------------


def normalize_ref(ref: str) -> str:
    """A reference as the runtime names it: ``nginx`` -> ``docker.io/library/nginx:latest``.

    The first path component is a registry host when it has a dot or a colon or is ``localhost``
    (distribution/reference normalize.go ``splitDockerDomain``); a reference without tag or digest
    means ``:latest``."""
    ref = ref.strip()
    name, digest = (ref.split("@", 1) + [""])[:2]
    first, _, rest = name.partition("/")
    if not rest or ("." not in first and ":" not in first and first != "localhost"):
        host, path = DOCKER_HUB, name
    else:
        host, path = first, rest
    if host == DOCKER_HUB and "/" not in path.split(":")[0]:
        path = "library/" + path
    last = path.rsplit("/", 1)[-1]
    if ":" not in last and not digest:
        path += ":latest"
    return f"{host}/{path}" + (f"@{digest}" if digest else "")


def registry_of(ref: str) -> str:
    return normalize_ref(ref).split("/", 1)[0]


def repository_of(ref: str) -> str:
    """``host/path`` without tag or digest."""
    name = normalize_ref(ref).split("@", 1)[0]
    head, _, last = name.rpartition("/")
    return f"{head}/{last.split(':', 1)[0]}"


def tag_of(ref: str) -> str | None:
    name = normalize_ref(ref).split("@", 1)[0]
    last = name.rsplit("/", 1)[-1]
    return last.split(":", 1)[1] if ":" in last else None


def digest_of(ref: str) -> str | None:
    m = DIGEST_RE.search(ref or "")
    return m.group(0) if m else None


def uses_latest(ref: str) -> bool:
    """Pulled by ``:latest``, said or implied (no tag, no digest)."""
    return "@" not in ref and tag_of(ref) == "latest"


def matches_any(names: Iterable[str], patterns: Iterable[str]) -> str | None:
    """The first pattern (shell wildcards, as Eraser's exclude list takes them) matching a name, as written
    or normalized (``docker.io/library/...``); None when none does."""
    pats = list(patterns)
    for name in names:
        for candidate in (name, normalize_ref(name)):
            for p in pats:
                if fnmatch.fnmatchcase(candidate, p):
                    return p
    return None


# --- inputs ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeImage:
    names: tuple[str, ...]
    size: int

    @property
    def digests(self) -> set[str]:
        return {d for n in self.names if (d := digest_of(n))}

    @property
    def refs(self) -> set[str]:
        return {normalize_ref(n) for n in self.names if "@" not in n}

    @property
    def id(self) -> str:
        """What `crictl rmi` is given: the repo digest when known (one image, whatever its tags), else a tag."""
        return next((n for n in self.names if "@sha256:" in n), self.names[0] if self.names else "")

    @property
    def display(self) -> str:
        return next((n for n in self.names if "@" not in n), self.id)


@dataclass(frozen=True)
class ImageFs:
    capacity: int
    available: int
    used: int | None = None

    @property
    def usage_pct(self) -> float:
        """The kubelet's image GC usage: 100 - available*100/capacity."""
        return 100.0 - self.available * 100.0 / self.capacity if self.capacity else 0.0

    @property
    def available_pct(self) -> float:
        return self.available * 100.0 / self.capacity if self.capacity else 0.0


@dataclass
class NodeImages:
    name: str
    images: list[NodeImage]
    imagefs: ImageFs | None = None
    stats_error: str | None = None
    uid: str = ""  # the node's metadata.uid: a node re-created under the same name is another node


@dataclass(frozen=True)
class PodImages:
    namespace: str
    name: str
    node: str
    refs: tuple[str, ...]          # spec images (containers, init, ephemeral)
    image_ids: tuple[str, ...] = ()  # status imageIDs
    training: bool = False
    phase: str = ""

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"


@dataclass
class Thresholds:
    gc_high_pct: float = 65.0
    gc_low_pct: float = 45.0
    eviction_hard_pct: float = 10.0
    eviction_soft_pct: float = 15.0
    near_margin_pct: float = 5.0
    allowed_registries: tuple[str, ...] = ()
    large_bytes: int = 5_000_000_000
    duplicate_min_nodes: int = 10

    @classmethod
    def from_config(cls, images: Any) -> Thresholds:
        return cls(gc_high_pct=images.gc_high_pct, gc_low_pct=images.gc_low_pct,
                   eviction_hard_pct=images.eviction_hard_pct, eviction_soft_pct=images.eviction_soft_pct,
                   near_margin_pct=images.near_margin_pct, allowed_registries=tuple(images.allowed_registries),
                   large_bytes=int(images.large_image_gb * 1e9), duplicate_min_nodes=images.duplicate_min_nodes)


# --- results ---------------------------------------------------------------------------------


@dataclass
class UnusedImage:
    node: str
    id: str
    name: str
    size: int

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "image": self.name, "id": self.id, "size_gb": round(self.size / 1e9, 2)}


@dataclass
class NodeDisk:
    node: str
    status: str          # ok | near-gc | gc | near-eviction | eviction-soft | eviction-hard | unknown
    images: int
    image_bytes: int
    unused: int
    reclaimable: int
    usage_pct: float | None = None
    available_pct: float | None = None
    capacity: int | None = None
    training_pods: list[str] = field(default_factory=list)
    note: str = ""

    def row(self) -> dict[str, Any]:
        return {"node": self.node, "status": self.status, "images": self.images, "unused": self.unused,
                "reclaimable_gb": round(self.reclaimable / 1e9, 2),
                "imagefs_used_pct": None if self.usage_pct is None else round(self.usage_pct, 1),
                "imagefs_available_pct": None if self.available_pct is None else round(self.available_pct, 1),
                "training_pods_at_risk": ", ".join(self.training_pods[:5]), "note": self.note}


@dataclass
class NodeAudit:
    unused: list[UnusedImage]
    disks: list[NodeDisk]
    duplicates: list[dict[str, Any]]
    latest: list[dict[str, Any]]
    disallowed: list[dict[str, Any]]
    in_use_refs: set[str] = field(default_factory=set)      # normalized refs used anywhere in the cluster
    in_use_digests: set[str] = field(default_factory=set)   # digests used anywhere in the cluster

    @property
    def reclaimable(self) -> int:
        return sum(u.size for u in self.unused)

    def reclaimable_by_node(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for u in self.unused:
            out[u.node] += u.size
        return dict(out)

    @property
    def at_risk(self) -> list[NodeDisk]:
        return [d for d in self.disks if d.status not in ("ok",)]

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = defaultdict(int)
        for d in self.disks:
            out[d.status] += 1
        return dict(out)

    def to_dict(self) -> dict[str, Any]:
        return {"reclaimable_bytes": self.reclaimable, "unused": [asdict(u) for u in self.unused],
                "disks": [asdict(d) for d in self.disks], "duplicates": self.duplicates, "latest": self.latest,
                "disallowed": self.disallowed}


# --- the analysis ----------------------------------------------------------------------------


_EMPTY: frozenset[str] = frozenset()


def _disk_status(fs: ImageFs | None, th: Thresholds) -> str:
    if fs is None or not fs.capacity:
        return "unknown"
    avail, usage, m = fs.available_pct, fs.usage_pct, th.near_margin_pct
    if avail < th.eviction_hard_pct:
        return "eviction-hard"
    if avail < th.eviction_soft_pct:
        return "eviction-soft"
    if usage >= th.gc_high_pct:
        return "gc"
    if avail < th.eviction_soft_pct + m:
        return "near-eviction"
    if usage >= th.gc_high_pct - m:
        return "near-gc"
    return "ok"


def audit_nodes(nodes: list[NodeImages], pods: list[PodImages], th: Thresholds | None = None) -> NodeAudit:
    """Unused images per node, reclaimable bytes, disk status against GC and eviction, duplicates, `:latest`,
    registries off the allow-list. One pass over the pods, one over the nodes' images: O(pods + images)."""
    th = th or Thresholds()
    refs_by_node: dict[str, set[str]] = defaultdict(set)
    digests_by_node: dict[str, set[str]] = defaultdict(set)
    training_by_node: dict[str, list[str]] = defaultdict(list)
    all_refs: set[str] = set()
    all_digests: set[str] = set()
    latest: list[dict[str, Any]] = []
    seen_raw: dict[str, tuple[str, bool]] = {}
    for pod in pods:
        refs, digests = refs_by_node[pod.node], digests_by_node[pod.node]
        for ref in pod.refs:
            known = seen_raw.get(ref)
            if known is None:
                known = seen_raw[ref] = (normalize_ref(ref), uses_latest(ref))
            norm, latest_tag = known
            if "@" in norm:
                digests.add(norm.split("@", 1)[1])
            else:
                refs.add(norm)
            if latest_tag:
                latest.append({"pod": pod.key, "node": pod.node, "image": ref})
        for image_id in pod.image_ids:
            d = digest_of(image_id)
            if d:
                digests.add(d)
        if pod.training:
            training_by_node[pod.node].append(pod.key)
    for s in refs_by_node.values():
        all_refs |= s
    for s in digests_by_node.values():
        all_digests |= s

    unused: list[UnusedImage] = []
    disks: list[NodeDisk] = []
    spread: dict[str, list[Any]] = {}
    disallowed: dict[str, set[str]] = defaultdict(set)
    facts: dict[tuple[str, ...], tuple] = {}
    for node in nodes:
        refs, digests = refs_by_node.get(node.name, _EMPTY), digests_by_node.get(node.name, _EMPTY)
        node_unused = []
        total = 0
        for img in node.images:
            total += img.size
            names = img.names
            known = facts.get(names)
            if known is None:  # the same image sits on many nodes: normalize its names once per audit
                img_digests = tuple(img.digests)
                display = img.display
                allowed = not th.allowed_registries or not names or any(
                    fnmatch.fnmatchcase(registry_of(names[0]), p) for p in th.allowed_registries)
                known = facts[names] = (img_digests, tuple(img.refs), img.id, display,
                                        min(img_digests) if img_digests else display, allowed)
            img_digests, img_refs, img_id, display, key, allowed = known
            in_use = not digests.isdisjoint(img_digests) or not refs.isdisjoint(img_refs)
            if not in_use:
                node_unused.append(UnusedImage(node.name, img_id, display, img.size))
            entry = spread.get(key)
            if entry is None:
                spread[key] = [display, img.size, 1]
            else:
                entry[2] += 1
            if not allowed:
                disallowed[display].add(node.name)
        unused += node_unused
        fs = node.imagefs
        status = _disk_status(fs, th)
        note = node.stats_error or ""
        disks.append(NodeDisk(
            node=node.name, status=status, images=len(node.images), image_bytes=total, unused=len(node_unused),
            reclaimable=sum(u.size for u in node_unused),
            usage_pct=fs.usage_pct if fs and fs.capacity else None,
            available_pct=fs.available_pct if fs and fs.capacity else None,
            capacity=fs.capacity if fs else None,
            training_pods=sorted(training_by_node.get(node.name, [])) if status != "ok" else [], note=note))
    duplicates = sorted(({"image": name, "size_gb": round(size / 1e9, 2), "nodes": n,
                          "total_gb": round(size * n / 1e9, 1)}
                         for name, size, n in spread.values()
                         if size >= th.large_bytes and n >= th.duplicate_min_nodes),
                        key=lambda r: -r["total_gb"])
    if th.allowed_registries:
        for pod in pods:
            for ref in pod.refs:
                reg = registry_of(ref)
                if not any(fnmatch.fnmatchcase(reg, p) for p in th.allowed_registries):
                    disallowed[ref].add(pod.node)
    return NodeAudit(unused=unused, disks=disks, duplicates=duplicates, latest=latest,
                     disallowed=[{"image": k, "registry": registry_of(k), "nodes": len(v)}
                                 for k, v in sorted(disallowed.items())],
                     in_use_refs=all_refs, in_use_digests=all_digests)


# --- the node prune plan ----------------------------------------------------------------------


@dataclass
class NodePrune:
    node: str
    images: list[UnusedImage]

    @property
    def bytes(self) -> int:
        return sum(i.size for i in self.images)


@dataclass
class NodePrunePlan:
    nodes: list[NodePrune]
    excluded: list[dict[str, Any]] = field(default_factory=list)
    over_cap: list[str] = field(default_factory=list)

    @property
    def bytes(self) -> int:
        return sum(n.bytes for n in self.nodes)

    def rows(self) -> list[dict[str, Any]]:
        return [i.row() for n in self.nodes for i in n.images]


def plan_node_prune(audit: NodeAudit, exclude: Iterable[str] = (), max_share: float = 1.0,
                    total_nodes: int | None = None, only_nodes: Iterable[str] | None = None) -> NodePrunePlan:
    """The unused images to remove, per node: minus the exclusion list (wildcards), at most `max_share` of the
    nodes (those with the most reclaimable bytes first), only ids `crictl rmi` may safely be given."""
    exclude = list(exclude)
    only = set(only_nodes) if only_nodes is not None else None
    by_node: dict[str, list[UnusedImage]] = defaultdict(list)
    excluded = []
    for u in audit.unused:
        if only is not None and u.node not in only:
            continue
        hit = matches_any([u.name, u.id], exclude)
        if hit is not None:
            excluded.append({"node": u.node, "image": u.name, "pattern": hit})
            continue
        if not IMAGE_ID_RE.match(u.id):
            excluded.append({"node": u.node, "image": u.name, "pattern": "(not a plain image reference)"})
            continue
        by_node[u.node].append(u)
    ranked = sorted(by_node.items(), key=lambda kv: (-sum(i.size for i in kv[1]), kv[0]))
    total = total_nodes if total_nodes is not None else len(audit.disks)
    cap = max(1, int(total * max_share)) if ranked else 0
    return NodePrunePlan(nodes=[NodePrune(n, imgs) for n, imgs in ranked[:cap]], excluded=excluded,
                         over_cap=[n for n, _ in ranked[cap:]])
