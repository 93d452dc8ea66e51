"""The container registry, through the OCI distribution API: does an image exist?

    HEAD /v2/<name>/manifests/<reference>   200: yes, 404: no

Basic credentials from the `ContainerRegistry` block; a registry that answers with a Bearer
challenge (token auth) gets a token from the realm it names first.
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

import httpx
from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES

REGISTRY_TIMEOUT_S = 15.0
REPOSITORY_RE = re.compile(r"^[a-z0-9]+([._\-/][a-z0-9]+)*$")
TAG_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,127}$")
MANIFEST_TYPES = ", ".join([
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/vnd.docker.distribution.manifest.v2+json",
])


def registry_host(url: str) -> str:
    """The host[:port] that prefixes image names pushed to the registry at `url`."""
    return urlparse(url).netloc


def image_ref(registry_url: str, repository: str, tag: str) -> str:
    if not REPOSITORY_RE.match(repository):
        raise ValueError(f"invalid repository name {repository!r}: expected lower-case path components")
    if not TAG_RE.match(tag):
        raise ValueError(f"invalid tag {tag!r}: expected [A-Za-z0-9_.-], at most 128 characters")
    return f"{registry_host(registry_url)}/{repository}:{tag}"


def _bearer_token(client: httpx.Client, challenge: str, auth) -> str | None:
    params = dict(re.findall(r'(\w+)="([^"]*)"', challenge))
    realm = params.pop("realm", None)
    if not realm:
        return None
    r = client.get(realm, params=params, auth=auth)
    r.raise_for_status()
    body = r.json()
    return body.get("token") or body.get("access_token")


@task(name="check-image-manifest", cache_policy=NONE, **TRANSIENT_RETRIES)
def check_manifest(registry, repository: str, tag: str) -> bool:
    """True when the registry has a manifest for repository:tag (HEAD /v2/<name>/manifests/<tag>).
    Outside a flow: `check_manifest.fn(...)`."""
    image_ref(registry.url, repository, tag)  # validates both
    auth = (registry.username, registry.password.get_secret_value()) \
        if registry.username and registry.password else None
    url = f"{registry.url.rstrip('/')}/v2/{repository}/manifests/{tag}"
    with httpx.Client(timeout=REGISTRY_TIMEOUT_S, trust_env=False) as client:
        r = client.head(url, headers={"Accept": MANIFEST_TYPES}, auth=auth)
        challenge = r.headers.get("WWW-Authenticate", "")
        if r.status_code == 401 and challenge.lower().startswith("bearer"):
            token = _bearer_token(client, challenge[len("bearer"):].strip(), auth)
            r = client.head(url, headers={"Accept": MANIFEST_TYPES, "Authorization": f"Bearer {token}"})
    if r.status_code == 200:
        return True
    if r.status_code == 404:
        return False
    r.raise_for_status()  # 401/403: not retried; 429/5xx: retried by the policy
    raise httpx.HTTPStatusError(f"unexpected HTTP {r.status_code} from the registry", request=r.request,
                                response=r)

