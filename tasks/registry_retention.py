"""Which registry manifests to keep, which to delete, and what that frees (pure).

Rules in the style of Harbor's tag retention (goharbor docs "Create Tag Retention Rules";
src/pkg/retention/policy/rule/{latestps,dayspl,always}): per repository a tag is retained when ANY rule
says so, and everything else is a candidate:

- ``retain the most recently pushed # artifacts`` (`keep_newest`, K per repository);
- ``retain the artifacts pushed within the last # days`` (`keep_days`);
- ``retain tags matching`` patterns (`keep_patterns`, shell wildcards; Harbor uses doublestar);
- and always kept: anything a workload in the cluster references, by tag or digest.

As in Harbor, retention acts on artifacts (digests): a digest is deleted only when none of its tags is
retained, and deleting it removes all of its tags (distribution's manifest DELETE untags every tag of the
digest: registry/handlers/manifests.go ``DeleteManifest``). An index (manifest list) is deleted with its
child manifests unless a kept manifest refers to them too; otherwise the children's revision links would
keep their blobs alive through garbage collection.

Reclaimable bytes count a blob once: the registry's garbage collector (registry/storage/garbagecollect.go
``MarkAndSweep``) marks every blob any remaining manifest of any repository references and sweeps the
rest, so a layer shared with a kept manifest frees nothing.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any


@dataclass
class Manifest:
    repository: str
    digest: str
    media_type: str
    size: int                                   # the manifest's own bytes
    blobs: dict[str, int] = field(default_factory=dict)   # config + layers: digest -> size
    children: list[str] = field(default_factory=list)     # an index's manifests (same repository)
    created: datetime | None = None
    tags: list[str] = field(default_factory=list)
    raw: bytes = field(default=b"", repr=False, compare=False)  # the manifest as the registry served it

    @property
    def is_index(self) -> bool:
        return bool(self.children) or "index" in self.media_type or "list" in self.media_type


@dataclass
class RegistryScan:
    """Everything one audit read: manifests by (repository, digest); tags point at them."""

    manifests: dict[tuple[str, str], Manifest]
    repositories: list[str]
    errors: list[str] = field(default_factory=list)
    requests: int = 0

    def tagged(self, repository: str) -> list[Manifest]:
        return [m for (r, _), m in self.manifests.items() if r == repository and m.tags]


@dataclass
class Rules:
    keep_newest: int = 10
    keep_days: float = 14
    keep_patterns: tuple[str, ...] = ()


@dataclass
class Decision:
    repository: str
    digest: str
    tags: list[str]
    created: datetime | None
    keep: bool
    reasons: list[str]
    bytes_unique: int = 0   # what deleting it frees (0 when kept)

    def row(self) -> dict[str, Any]:
        return {"repository": self.repository, "tags": ", ".join(self.tags) or "(untagged)",
                "digest": self.digest[:19], "created": self.created.isoformat() if self.created else "",
                "decision": "keep" if self.keep else "delete", "why": "; ".join(self.reasons),
                "frees_bytes": self.bytes_unique}


@dataclass
class RetentionPlan:
    decisions: list[Decision]
    delete: list[Manifest]          # parents first, then children
    reclaimable: int
    total_bytes: int
    untagged: list[dict[str, Any]] = field(default_factory=list)

    @property
    def kept(self) -> list[Decision]:
        return [d for d in self.decisions if d.keep]

    def rows(self) -> list[dict[str, Any]]:
        return [d.row() for d in self.decisions]


def _blobs_of(m: Manifest, scan: RegistryScan, seen: set | None = None) -> dict[str, int]:
    out = dict(m.blobs)
    seen = seen if seen is not None else set()
    for child in m.children:
        c = scan.manifests.get((m.repository, child))
        if c is not None and child not in seen:
            seen.add(child)
            out.update(_blobs_of(c, scan, seen))
    return out


def plan_retention(scan: RegistryScan, rules: Rules, now: datetime, in_use_refs: Iterable[str] = (),
                   in_use_digests: Iterable[str] = (), registry_host: str = "",
                   gc_untagged: Iterable[str] = ()) -> RetentionPlan:
    """Apply the rules to every tagged manifest; `in_use_refs` are normalized references (``host/repo:tag``) the
    cluster's pods use, `in_use_digests` the digests they run."""
    used_refs = set(in_use_refs)
    used_digests = set(in_use_digests)
    cutoff = now - timedelta(days=rules.keep_days)
    decisions: list[Decision] = []
    keep_digests: set[tuple[str, str]] = set()
    for repo in scan.repositories:
        tagged = scan.tagged(repo)
        newest = sorted(tagged, key=lambda m: (m.created or datetime.min.replace(tzinfo=now.tzinfo), m.digest),
                        reverse=True)[:rules.keep_newest]
        newest_set = {m.digest for m in newest}
        for m in sorted(tagged, key=lambda m: m.tags[0]):
            reasons = []
            if m.digest in newest_set:
                reasons.append(f"among the newest {rules.keep_newest}")
            if m.created is not None and m.created >= cutoff:
                reasons.append(f"pushed within {rules.keep_days:g} days")
            pats = [p for p in rules.keep_patterns for t in m.tags if fnmatch.fnmatchcase(t, p)]
            if pats:
                reasons.append(f"tag matches {pats[0]}")
            refs = {f"{registry_host}/{repo}:{t}" for t in m.tags}
            children = set(m.children)
            if refs & used_refs or m.digest in used_digests or children & used_digests:
                reasons.append("used by a workload")
            keep = bool(reasons)
            if keep:
                keep_digests.add((repo, m.digest))
            decisions.append(Decision(repo, m.digest, list(m.tags), m.created, keep,
                                      reasons or ["no retention rule matches"]))
    # referenced children of kept indexes are kept; a manifest a workload runs by digest is kept
    for (repo, digest), m in scan.manifests.items():
        if digest in used_digests:
            keep_digests.add((repo, digest))
    for key in list(keep_digests):
        m = scan.manifests.get(key)
        if m is not None:
            stack = list(m.children)
            while stack:
                c = stack.pop()
                if (key[0], c) not in keep_digests:
                    keep_digests.add((key[0], c))
                    cm = scan.manifests.get((key[0], c))
                    stack += cm.children if cm else []
    delete: list[Manifest] = []
    for d in decisions:
        if d.keep:
            continue
        m = scan.manifests[(d.repository, d.digest)]
        delete.append(m)
        for c in m.children:
            if (d.repository, c) not in keep_digests and (d.repository, c) in scan.manifests:
                delete.append(scan.manifests[(d.repository, c)])
    deleted_keys = {(m.repository, m.digest) for m in delete}
    remaining_blobs: set[str] = set()
    all_blobs: dict[str, int] = {}
    for key, m in scan.manifests.items():
        all_blobs.update(m.blobs)
        if key not in deleted_keys:
            remaining_blobs.update(m.blobs)
    freed: dict[str, int] = {}
    for m in delete:
        for b, size in m.blobs.items():
            if b not in remaining_blobs:
                freed[b] = size
    # attribute freed blobs to the decision that deletes them (each blob once)
    counted: set[str] = set()
    for d in decisions:
        if d.keep:
            continue
        m = scan.manifests[(d.repository, d.digest)]
        for b, size in _blobs_of(m, scan).items():
            if b in freed and b not in counted:
                counted.add(b)
                d.bytes_unique += size
    reclaimable = sum(freed.values()) + sum(m.size for m in delete)
    total = sum(all_blobs.values()) + sum(m.size for m in scan.manifests.values())
    return RetentionPlan(decisions=decisions, delete=delete, reclaimable=reclaimable, total_bytes=total,
                         untagged=untagged_manifests(scan, gc_untagged))


def untagged_manifests(scan: RegistryScan, gc_untagged: Iterable[str]) -> list[dict[str, Any]]:
    """Untagged manifests: the v2 API lists tags only, so they are what a dry run of `garbage-collect
    --delete-untagged` names (`gc_untagged`), minus the children of the indexes the scan saw: GC's
    ``-m`` wrongly counts an index's untagged children as unreferenced (distribution/distribution#3004,
    #3178), so those are reported as `index child`, never planned for deletion."""
    children = {c for m in scan.manifests.values() for c in m.children}
    out = []
    for digest in sorted(set(gc_untagged)):
        where = [m for (r, d), m in scan.manifests.items() if d == digest]
        out.append({"digest": digest, "repository": where[0].repository if where else "",
                    "kind": "index child (kept; GC -m would break its index)" if digest in children
                    else "untagged", "bytes": sum(where[0].blobs.values()) if where else None})
    return out
