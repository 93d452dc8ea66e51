"""Images for the image cleanup audit, pushed into the sandbox's real registry through the v2 API.

A client pushes as distribution's ``docs/spec/api.md`` says: each blob with
``POST /v2/<name>/blobs/uploads/`` then ``PUT <Location>&digest=<digest>`` (monolithic upload), then the
manifest with ``PUT /v2/<name>/manifests/<tag or digest>``; an index (OCI image index / Docker manifest
list) names its child manifests by digest, which must be in the repository first. A manifest put by
digest has no tag: it is an untagged manifest, as a rebuilt tag leaves behind.

`seed_audit_images(url, prefix, now)` lays out the fixture the tests check the audit against and returns
what it implies (digests, blob sizes, what retention must keep and delete, what GC must free).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlparse

import httpx

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


class Pusher:
    def __init__(self, url: str, timeout_s: float = 10.0):
        if httpx.URL(url).host not in ("127.0.0.1", "localhost"):
            raise ValueError("the sandbox pushes only to a loopback registry")
        self.client = httpx.Client(base_url=url, timeout=timeout_s, trust_env=False)

    def close(self) -> None:
        self.client.close()

    def blob(self, repo: str, data: bytes) -> str:
        digest = _digest(data)
        if self.client.head(f"/v2/{repo}/blobs/{digest}").status_code == 200:
            return digest
        r = self.client.post(f"/v2/{repo}/blobs/uploads/")
        r.raise_for_status()
        loc = r.headers["Location"]
        self.client.put(f"{loc}{'&' if '?' in loc else '?'}digest={digest}", content=data,
                        headers={"Content-Type": "application/octet-stream"}).raise_for_status()
        return digest

    def image(self, repo: str, ref: str | None, layers: list[bytes], created: datetime, arch: str = "amd64"
              ) -> tuple[str, dict[str, int], int]:
        """Push an image manifest (by tag, or untagged when `ref` is None). Returns (digest, blobs, manifest size)."""
        config = json.dumps({"architecture": arch, "os": "linux", "created": created.strftime("%Y-%m-%dT%H:%M:%SZ"),
                             "config": {}, "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        blobs = {self.blob(repo, config): len(config)}
        descs = []
        for layer in layers:
            d = self.blob(repo, layer)
            blobs[d] = len(layer)
            descs.append({"mediaType": OCI_LAYER, "digest": d, "size": len(layer)})
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                           "config": {"mediaType": OCI_CONFIG, "digest": _digest(config), "size": len(config)},
                           "layers": descs}).encode()
        digest = _digest(body)
        self.client.put(f"/v2/{repo}/manifests/{ref or digest}", content=body,
                        headers={"Content-Type": OCI_MANIFEST}).raise_for_status()
        return digest, blobs, len(body)

    def index(self, repo: str, tag: str, children: list[tuple[str, int, str]]) -> tuple[str, int]:
        body = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [
            {"mediaType": OCI_MANIFEST, "digest": d, "size": s, "platform": {"architecture": a, "os": "linux"}}
            for d, s, a in children]}).encode()
        self.client.put(f"/v2/{repo}/manifests/{tag}", content=body,
                        headers={"Content-Type": OCI_INDEX}).raise_for_status()
        return _digest(body), len(body)


@dataclass
class AuditFixture:
    prefix: str
    digests: dict[str, str] = field(default_factory=dict)      # "repo:tag" or a name -> digest
    blob_sizes: dict[str, int] = field(default_factory=dict)
    manifest_sizes: dict[str, int] = field(default_factory=dict)  # digest -> bytes
    expect_delete: set[str] = field(default_factory=set)         # digests retention deletes
    expect_freed_blobs: set[str] = field(default_factory=set)    # blobs GC frees afterwards
    untagged: set[str] = field(default_factory=set)
    in_use_ref: str = ""

    @property
    def expect_reclaimable(self) -> int:
        return (sum(self.blob_sizes[b] for b in self.expect_freed_blobs)
                + sum(self.manifest_sizes[d] for d in self.expect_delete))


def seed_audit_images(url: str, prefix: str, now: datetime) -> AuditFixture:
    """Two repositories under `prefix`:

    ``<prefix>/train``: tags v1..v5 pushed 100..60 days ago, sharing one big base layer, each with its own
    top layer; v1 is used by a workload; ``stable`` is a second tag of v2's manifest; ``release-1`` matches
    a keep pattern. With keep_newest=2, keep_days=30, keep pattern ``release-*``: v5, v4 are the newest
    two; v1 used; v2/stable and release-1 ... see the returned expectations.
    ``<prefix>/multi``: an index ``old`` (amd64 + arm64 children, 90 days old) and a recent ``new``
    tag (5 days old) sharing the arm64 child's layer; plus one untagged manifest.
    """
    f = AuditFixture(prefix)
    p = Pusher(url)
    try:
        day = timedelta(days=1)
        base = f"{prefix}-base-layer".encode() * 2000          # shared by every train tag
        train = f"{prefix}/train"
        tops = {}
        for i in range(1, 6):
            tops[i] = f"{prefix}-top-{i}".encode() * (100 * i)
            d, blobs, size = p.image(train, f"v{i}", [base, tops[i]], now - (110 - 10 * i) * day)
            f.digests[f"train:v{i}"] = d
            f.blob_sizes.update(blobs)
            f.manifest_sizes[d] = size
        # a second tag of v2's manifest, and a release tag (own layer), both old
        p.client.put(f"/v2/{train}/manifests/stable", content=_manifest_bytes(p, train, f.digests["train:v2"]),
                     headers={"Content-Type": OCI_MANIFEST}).raise_for_status()
        d, blobs, size = p.image(train, "release-1", [base, f"{prefix}-rel".encode() * 50], now - 200 * day)
        f.digests["train:release-1"] = d
        f.blob_sizes.update(blobs)
        f.manifest_sizes[d] = size
        f.in_use_ref = f"{urlparse(url).netloc}/{train}:v1"
        multi = f"{prefix}/multi"
        arm_layer = f"{prefix}-arm".encode() * 300
        a, ab, asz = p.image(multi, None, [f"{prefix}-amd".encode() * 300], now - 91 * day, "amd64")
        r, rb, rsz = p.image(multi, None, [arm_layer], now - 91 * day, "arm64")
        idx, isz = p.index(multi, "old", [(a, asz, "amd64"), (r, rsz, "arm64")])
        n, nb, nsz = p.image(multi, "new", [arm_layer, f"{prefix}-new".encode() * 10], now - 5 * day)
        u, ub, usz = p.image(multi, None, [f"{prefix}-orphan".encode() * 40], now - 50 * day)
        for blobs in (ab, rb, nb, ub):
            f.blob_sizes.update(blobs)
        f.manifest_sizes.update({a: asz, r: rsz, idx: isz, n: nsz, u: usz})
        f.digests.update({"multi:old": idx, "multi:old/amd64": a, "multi:old/arm64": r, "multi:new": n,
                          "multi:untagged": u})
        f.untagged = {u}
        # keep_newest=2, keep_days=30, keep pattern release-*, v1 in use:
        #   train: keep v5, v4 (newest), v1 (used), release-1 (pattern); delete v3 and v2 (with its tag stable)
        #   multi: keep new (newest, recent) and old (newest 2 of 2) -> nothing deleted in multi
        f.expect_delete = {f.digests["train:v3"], f.digests["train:v2"]}
        # GC frees the two top layers and the two configs; the shared base layer stays (kept tags use it)
        f.expect_freed_blobs = {_digest(tops[3]), _digest(tops[2])} | _config_blobs(
            p, train, [f.digests["train:v3"], f.digests["train:v2"]])
    finally:
        p.close()
    return f


def _manifest_bytes(p: Pusher, repo: str, digest: str) -> bytes:
    r = p.client.get(f"/v2/{repo}/manifests/{digest}", headers={"Accept": OCI_MANIFEST})
    r.raise_for_status()
    return r.content


def _config_blobs(p: Pusher, repo: str, digests: list[str]) -> set[str]:
    return {json.loads(_manifest_bytes(p, repo, d))["config"]["digest"] for d in digests}
