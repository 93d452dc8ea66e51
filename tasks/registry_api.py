"""The registry's contents and deletions, through the Docker Registry HTTP API v2.

Endpoints (distribution/distribution ``docs/spec/api.md``; the OCI distribution-spec ``spec.md``):

    GET    /v2/_catalog?n=N[&last=R]          repositories, paginated: ``Link: <...>; rel="next"``
    GET    /v2/<name>/tags/list?n=N[&last=T]  tags, paginated the same way
    GET    /v2/<name>/manifests/<ref>         a manifest, ``Docker-Content-Digest``; Accept decides
                                              whether an index / manifest list comes back as such
    GET    /v2/<name>/blobs/<digest>          the image config (its ``created`` time)
    HEAD   /v2/<name>/blobs/<digest>          whether a blob is still there (a restore needs every one)
    PUT    /v2/<name>/manifests/<ref>         the manifest's bytes (Content-Type: its media type): a tag,
                                              or by digest; its blobs (and an index's manifests) must exist
    DELETE /v2/<name>/manifests/<digest>      202 Accepted; 404 MANIFEST_UNKNOWN; 405 when deletes are off

A 429 (``TOOMANYREQUESTS`` in the spec's error codes) is waited out once per request as its Retry-After
says (capped), then raised so the task's `TRANSIENT_RETRIES` decides; 5xx and connection errors too.
A 4xx other than 404/429 fails at once. Every answer is read with a timeout.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Self
from urllib.parse import urlparse

import httpx
from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.registry import MANIFEST_TYPES, REPOSITORY_RE, _bearer_token
from tasks.registry_retention import Manifest, RegistryScan

REGISTRY_TIMEOUT_S = 15.0
CATALOG_PAGE = 1000
MAX_RETRY_AFTER_S = 5.0
INDEX_TYPES = {"application/vnd.oci.image.index.v1+json",
               "application/vnd.docker.distribution.manifest.list.v2+json"}
_LINK_NEXT = re.compile(r'<([^>]+)>\s*;\s*rel="?next"?')


class RegistryError(RuntimeError):
    """The registry refused or could not be read; the message says what to check."""


@dataclass
class DeleteResult:
    repository: str
    digest: str
    outcome: str            # deleted | gone | error
    detail: str = ""


@dataclass
class RegistryClient:
    """A small v2 client over one httpx.Client (thread-safe), counting its requests."""

    url: str
    username: str | None = None
    password: str | None = None
    timeout_s: float = REGISTRY_TIMEOUT_S
    requests: int = 0
    _client: httpx.Client = field(init=False, repr=False)
    _token: str | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    def __post_init__(self) -> None:
        self._client = httpx.Client(base_url=self.url.rstrip("/"), timeout=self.timeout_s, trust_env=False,
                                    limits=httpx.Limits(max_connections=32, max_keepalive_connections=32))

    @classmethod
    def of(cls, block: Any, timeout_s: float = REGISTRY_TIMEOUT_S) -> RegistryClient:
        """From the platform's `ContainerRegistry` block."""
        password = block.password.get_secret_value() if getattr(block, "password", None) else None
        return cls(block.url, block.username, password, timeout_s)

    @property
    def host(self) -> str:
        return urlparse(self.url).netloc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- one request ------------------------------------------------------------------------

    def request(self, method: str, path: str, **kw: Any) -> httpx.Response:
        headers = dict(kw.pop("headers", {}) or {})
        auth = (self.username, self.password) if self.username and self.password else None
        waited = False
        while True:
            if self._token:
                headers["Authorization"] = f"Bearer {self._token}"
            with self._lock:
                self.requests += 1
            r = self._client.request(method, path, headers=headers, auth=None if self._token else auth, **kw)
            challenge = r.headers.get("WWW-Authenticate", "")
            if r.status_code == 401 and challenge.lower().startswith("bearer") and not self._token:
                self._token = _bearer_token(self._client, challenge[len("bearer"):].strip(), auth)
                continue
            if r.status_code == 429 and not waited:
                waited = True
                try:
                    delay = float(r.headers.get("Retry-After", "1"))
                except ValueError:
                    delay = 1.0
                time.sleep(min(max(delay, 0.0), MAX_RETRY_AFTER_S))
                continue
            return r

    def _check(self, r: httpx.Response, what: str) -> httpx.Response:
        if r.status_code >= 400:
            # 429/5xx: transient for the task's retry policy; others fail at once
            raise httpx.HTTPStatusError(f"{what}: HTTP {r.status_code} from the registry: {r.text[:200]}",
                                        request=r.request, response=r)
        return r

    def _paged(self, path: str, key: str, page: int) -> list[str]:
        out: list[str] = []
        url: str | None = path
        params: dict[str, Any] | None = {"n": page}
        while url:
            r = self._check(self.request("GET", url, params=params), f"GET {path}")
            items = r.json().get(key) or []
            out += items
            m = _LINK_NEXT.search(r.headers.get("Link", ""))
            if m:
                url, params = m.group(1), None
            elif len(items) >= page and items:  # a registry without Link headers: continue from the last one
                url, params = path, {"n": page, "last": items[-1]}
            else:
                url = None
        return out

    # -- the API ----------------------------------------------------------------------------

    def catalog(self, page: int = CATALOG_PAGE) -> list[str]:
        return self._paged("/v2/_catalog", "repositories", page)

    def tags(self, repository: str, page: int = CATALOG_PAGE) -> list[str] | None:
        """The repository's tags; None when the repository is gone (404)."""
        try:
            return sorted(self._paged(f"/v2/{repository}/tags/list", "tags", page))
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code == 404:
                return None
            raise

    def manifest(self, repository: str, reference: str) -> tuple[str, str, bytes] | None:
        """(digest, media type, body) or None when it is not there."""
        r = self.request("GET", f"/v2/{repository}/manifests/{reference}", headers={"Accept": MANIFEST_TYPES})
        if r.status_code == 404:
            return None
        self._check(r, f"GET manifest {repository}:{reference}")
        digest = r.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(r.content).hexdigest()
        media = r.headers.get("Content-Type", "").split(";")[0] or json.loads(r.content).get("mediaType", "")
        return digest, media, r.content

    def blob_json(self, repository: str, digest: str) -> dict[str, Any] | None:
        r = self.request("GET", f"/v2/{repository}/blobs/{digest}", follow_redirects=True)
        if r.status_code == 404:
            return None
        self._check(r, f"GET blob {repository}@{digest}")
        try:
            return r.json()
        except ValueError:
            return None

    def blob_exists(self, repository: str, digest: str) -> bool:
        r = self.request("HEAD", f"/v2/{repository}/blobs/{digest}")
        if r.status_code == 404:
            return False
        self._check(r, f"HEAD blob {repository}@{digest}")
        return True

    def put_manifest(self, repository: str, reference: str, body: bytes, media_type: str) -> str:
        """PUT a manifest's bytes as `reference` (a tag or its digest); returns the digest the registry names."""
        r = self._check(self.request("PUT", f"/v2/{repository}/manifests/{reference}", content=body,
                                     headers={"Content-Type": media_type}), f"PUT manifest {repository}:{reference}")
        return r.headers.get("Docker-Content-Digest") or "sha256:" + hashlib.sha256(body).hexdigest()

    def delete_manifest(self, repository: str, digest: str) -> DeleteResult:
        r = self.request("DELETE", f"/v2/{repository}/manifests/{digest}")
        if r.status_code in (200, 202):
            return DeleteResult(repository, digest, "deleted")
        if r.status_code == 404:
            return DeleteResult(repository, digest, "gone", "no longer in the registry (deleted since the audit)")
        if r.status_code == 405:
            raise RegistryError("the registry does not allow deletes: set storage.delete.enabled: true in its "
                                "config (distribution docs/configuration.md)")
        self._check(r, f"DELETE {repository}@{digest}")
        return DeleteResult(repository, digest, "error", f"HTTP {r.status_code}")


# --- the scan ----------------------------------------------------------------------------------


def _parse_created(value: Any) -> datetime | None:
    if not isinstance(value, str) or not value:
        return None
    text = re.sub(r"(\.\d{6})\d+", r"\1", value.replace("Z", "+00:00"))
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


def _read_manifest(client: RegistryClient, repo: str, ref: str, out: dict[tuple[str, str], Manifest],
                   configs: dict[str, datetime | None]) -> Manifest | None:
    got = client.manifest(repo, ref)
    if got is None:
        return None
    digest, media, body = got
    if (repo, digest) in out:
        return out[(repo, digest)]
    doc = json.loads(body)
    media = doc.get("mediaType") or media
    m = Manifest(repository=repo, digest=digest, media_type=media, size=len(body), raw=body)
    out[(repo, digest)] = m
    if media in INDEX_TYPES or "manifests" in doc:
        m.children = [c["digest"] for c in doc.get("manifests") or []]
        created = []
        for child in m.children:
            cm = _read_manifest(client, repo, child, out, configs)
            if cm is not None and cm.created:
                created.append(cm.created)
        m.created = max(created) if created else None
        return m
    cfg = doc.get("config") or {}
    for d in [cfg, *(doc.get("layers") or [])]:
        if d.get("digest"):
            m.blobs[d["digest"]] = int(d.get("size") or 0)
    if cfg.get("digest"):
        key = f"{repo}@{cfg['digest']}"
        if key not in configs:
            body_cfg = client.blob_json(repo, cfg["digest"])
            configs[key] = _parse_created((body_cfg or {}).get("created"))
        m.created = configs[key]
    return m


def _scan_repository(client: RegistryClient, repo: str) -> tuple[dict[tuple[str, str], Manifest], str | None]:
    out: dict[tuple[str, str], Manifest] = {}
    tags = client.tags(repo)
    if tags is None:
        return out, None
    configs: dict[str, datetime | None] = {}
    for tag in tags:
        m = _read_manifest(client, repo, tag, out, configs)
        if m is not None:
            m.tags.append(tag)
    return out, None


def scan_registry(client: RegistryClient, repositories: list[str] | None = None, workers: int = 8,
                  page: int = CATALOG_PAGE) -> RegistryScan:
    """Catalog (paginated), then every repository's tags and manifests, `workers` repositories at a time.

    `repositories`: shell wildcards choosing the repositories to audit (default: all). A repository that
    fails is an error in the scan (its manifests unknown, so nothing of it is planned for deletion)."""
    import fnmatch

    start = client.requests
    names = client.catalog(page)
    if repositories:
        names = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in repositories)]
    names = [n for n in names if REPOSITORY_RE.match(n)]
    manifests: dict[tuple[str, str], Manifest] = {}
    errors: list[str] = []
    ok: list[str] = []
    with ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="registry") as pool:
        for name, fut in [(n, pool.submit(_scan_repository, client, n)) for n in names]:
            try:
                got, _ = fut.result()
            except (httpx.HTTPError, ValueError) as exc:
                status = getattr(getattr(exc, "response", None), "status_code", None)
                if status == 429 or (status or 0) >= 500 or status is None:
                    raise  # transient or down: the whole scan is retried or fails; never a partial all-clear
                errors.append(f"{name}: {type(exc).__name__}: {exc}")
                continue
            manifests.update(got)
            ok.append(name)
    return RegistryScan(manifests=manifests, repositories=ok, errors=errors, requests=client.requests - start)


@task(name="scan-registry", cache_policy=NONE, **TRANSIENT_RETRIES)
def scan_registry_task(registry: Any, repositories: list[str] | None = None, timeout_s: float = REGISTRY_TIMEOUT_S
                       ) -> RegistryScan:
    """Every repository, tag and manifest of the registry (one task, however big the catalog)."""
    with RegistryClient.of(registry, timeout_s) as client:
        return scan_registry(client, repositories)


def delete_manifests(client: RegistryClient, targets: list[tuple[str, str]]) -> list[DeleteResult]:
    """DELETE each (repository, digest), in order; one already gone is `gone`, not an error."""
    return [client.delete_manifest(repo, digest) for repo, digest in targets]


# --- garbage collection ------------------------------------------------------------------------

_GC_BLOB = re.compile(r"blob eligible for deletion: (sha256:[0-9a-f]{64})")
_GC_MANIFEST = re.compile(r"manifest eligible for deletion: (sha256:[0-9a-f]{64})")


def parse_gc_output(text: str) -> dict[str, list[str]]:
    """The blobs and manifests `registry garbage-collect` lists (registry/storage/garbagecollect.go prints
    ``blob eligible for deletion: <digest>`` per swept blob, ``manifest eligible for deletion`` with -m)."""
    return {"blobs": sorted(set(_GC_BLOB.findall(text))), "manifests": sorted(set(_GC_MANIFEST.findall(text)))}


GC_ADVICE = ("Run the registry's garbage collector with the registry read-only (distribution docs/garbage-collection.md:"
             " set maintenance.readonly.enabled: true, restart, then `registry garbage-collect <config.yml>`, then "
             "switch read-only off), or configure `registry.gc_command` to let image-prune run it.")


@task(name="registry-garbage-collect", cache_policy=NONE)
def run_gc_task(argv: list[str], dry_run: bool = False, timeout_s: float = 600.0) -> dict[str, Any]:
    """Run the configured garbage-collect command (argv, no shell) and say which blobs it swept."""
    cmd = list(argv) + (["--dry-run"] if dry_run else [])
    if dry_run and len(argv) > 1:  # flags go before the config path
        cmd = [*argv[:-1], "--dry-run", argv[-1]]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    text = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RegistryError(f"garbage-collect exited {proc.returncode}: {text[-500:]}")
    return {"returncode": proc.returncode, **parse_gc_output(text)}
