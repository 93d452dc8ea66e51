"""The sandbox's container registry: the real one from Debian's `docker-registry` package.

`start_registry(sb)` runs ``docker-registry serve CONFIG`` (the CNCF distribution registry, v2 API)
on 127.0.0.1, storage under the sandbox state dir, deletes enabled, no auth (as a registry on a
private network is often run; the platform config's `registry` section takes `username`/`password`
for one that has auth), and fills ``sb.config["registry"]``.

`push_image(registry_url, repository, tag)` pushes a minimal OCI image the way a client does
(blob upload: ``POST /v2/<name>/blobs/uploads/`` then ``PUT <location>?digest=``; then
``PUT /v2/<name>/manifests/<tag>``; distribution's `docs/spec/api.md`). The Argo stand-in uses it
to play what a BuildKit step's push does, and tests use it to seed images.
"""

from __future__ import annotations

import hashlib
import json
import shutil

import httpx

from sandbox._common import (
    SandboxError,
    SandboxLike,
    free_port,
    http_ok,
    require_binary,
    wait_for,
)

_LAYER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\x03\x03\x00\x00\x00\x00\x00\x00\x00\x00\x00"  # an empty tar.gz


def push_image(registry_url: str, repository: str, tag: str, timeout_s: float = 10.0) -> str:
    """Push a one-layer OCI image as repository:tag to the registry at `registry_url` (loopback only).
    Returns the manifest digest."""
    host = httpx.URL(registry_url).host
    if host not in ("127.0.0.1", "localhost"):
        raise ValueError(f"the sandbox pushes only to a loopback registry, not {host!r}")
    with httpx.Client(base_url=registry_url, timeout=timeout_s, trust_env=False) as client:

        def blob(data: bytes) -> str:
            digest = "sha256:" + hashlib.sha256(data).hexdigest()
            r = client.post(f"/v2/{repository}/blobs/uploads/")
            r.raise_for_status()
            location = r.headers["Location"]
            sep = "&" if "?" in location else "?"
            client.put(f"{location}{sep}digest={digest}", content=data,
                       headers={"Content-Type": "application/octet-stream"}).raise_for_status()
            return digest

        config = json.dumps({"architecture": "amd64", "os": "linux", "config": {},
                             "rootfs": {"type": "layers", "diff_ids": []}}).encode()
        manifest = json.dumps({
            "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": blob(config),
                       "size": len(config)},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": blob(_LAYER),
                        "size": len(_LAYER)}]}).encode()
        client.put(f"/v2/{repository}/manifests/{tag}", content=manifest,
                   headers={"Content-Type": "application/vnd.oci.image.manifest.v1+json"}).raise_for_status()
    return "sha256:" + hashlib.sha256(manifest).hexdigest()


def start_registry(sb: SandboxLike) -> None:
    """Sandbox component: docker-registry on 127.0.0.1, and the platform config's `registry` section.

    Without the binary the sandbox has no registry (no `registry` section): the flows that need one
    say so, and the tests that need it fail in CI or are skipped (tests/conftest.py `need_binary`)."""
    try:
        binary = require_binary("docker-registry", "docker-registry")
    except SandboxError as exc:
        sb.extra["registry_missing"] = str(exc)
        return
    port = free_port()
    shutil.rmtree(sb.state_dir / "registry" / "data", ignore_errors=True)  # a fresh registry for each up
    conf = sb.path("registry", "config.yml")
    conf.write_text(
        "version: 0.1\nlog: {level: error}\nstorage:\n"
        f"  filesystem: {{rootdirectory: {sb.path('registry', 'data', 'x').parent}}}\n"
        "  delete: {enabled: true}\n"
        f"http: {{addr: '127.0.0.1:{port}'}}\n")
    proc = sb.spawn("registry", [binary, "serve", str(conf)])
    sb.urls["registry"] = f"http://127.0.0.1:{port}"
    wait_for(http_ok(f"{sb.urls['registry']}/v2/"), "docker-registry", 30, proc, sb.log_of("registry"))
    # garbage-collect runs as the same binary on the same storage (distribution docs/garbage-collection.md);
    # image-prune runs it after deleting manifests (issue 13)
    sb.config["registry"] = {"url": sb.urls["registry"], "gc_command": [binary, "garbage-collect", str(conf)]}
