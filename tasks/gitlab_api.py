"""GitLab's API for the backup lifecycle: readiness, version and edition, projects and their last commits.

Tasks receive the `GitLabAPI` block (production's or scratch's: the flow's choice) and a
`Redactor`; they never load a block by name. What the answers mean lives in `tasks.gitlab_rules`.
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.gitlab_rules import ProjectState, parse_gitlab_version, sample_ids, version_string
from tasks.redact import Redactor

if TYPE_CHECKING:
    from blocks.connections import GitLabAPI


@task(name="gitlab-api-preflight", cache_policy=NONE, timeout_seconds=120, **TRANSIENT_RETRIES)
async def api_preflight(api: GitLabAPI, redactor: Redactor) -> dict:
    """Readiness (`/-/readiness`), then version and edition (`/api/v4/version`). A GitLab that is not ready
    gets no version: unknown is not healthy, and the caller refuses to go on."""
    import gitlab.exceptions
    import httpx

    out: dict = {"ready": False, "readiness_status": None, "version": None, "edition": None, "gitlab_version": None}
    async with httpx.AsyncClient(timeout=api.timeout_s) as client:
        r = await client.get(f"{api.url}/-/readiness")
        out["readiness_status"] = r.status_code
        out["ready"] = r.status_code == 200 and r.json().get("status") == "ok"
    if out["ready"]:
        try:
            info = await asyncio.to_thread(lambda: api.get_client().http_get("/version"))
        except gitlab.exceptions.GitlabAuthenticationError as exc:
            raise PermissionError(f"the GitLab API refused the token ({exc.response_code}): check the GitLab API "
                                  "block") from None
        version, pre, edition = parse_gitlab_version(info["version"])
        if info.get("enterprise"):
            edition = "ee"
        out.update(version=f"{version}{pre or ''}", edition=edition,
                   gitlab_version=version_string(f"{version}{pre or ''}", edition))
    return redactor.value(out)


@task(name="gitlab-api-health", cache_policy=NONE, timeout_seconds=600, **TRANSIENT_RETRIES)
async def api_health(api: GitLabAPI, redactor: Redactor, wait_s: float = 60) -> dict:
    """Readiness, version and project count through the API; waits up to `wait_s` for readiness."""
    return redactor.value(await asyncio.to_thread(_api_health, api, wait_s))


def _api_health(api: GitLabAPI, wait_s: float) -> dict:
    import httpx

    deadline = time.monotonic() + wait_s
    while True:
        try:
            r = httpx.get(f"{api.url}/-/readiness", timeout=api.timeout_s)
            status = r.status_code
            if status == 200:
                break
        except httpx.TransportError as exc:
            status = f"unreachable ({type(exc).__name__})"
        if time.monotonic() > deadline:
            return {"ready": False, "status": status}
        time.sleep(1)
    gl = api.get_client()
    info = gl.http_get("/version")
    projects = gl.projects.list(per_page=1, get_all=False, iterator=True)
    return {"ready": True, "status": status, "version": info["version"], "projects": projects.total}


@task(name="gitlab-project-states", cache_policy=NONE, timeout_seconds=300, **TRANSIENT_RETRIES)
async def project_states(api: GitLabAPI, redactor: Redactor, ids: list[int] | None = None, sample: int = 20) -> dict:
    """Project count, and last commit SHA of a sample of projects (all pages walked, ids sampled)."""
    return redactor.value(await asyncio.to_thread(_project_states, api, ids, sample))


def _project_states(api: GitLabAPI, ids: list[int] | None, sample: int) -> dict:
    gl = api.get_client()
    listing = list(gl.projects.list(iterator=True, per_page=100, order_by="id", sort="asc"))
    chosen = ids if ids is not None else sample_ids([p.id for p in listing], sample)
    by_id = {p.id: p for p in listing}
    states = []
    for pid in chosen:
        p = by_id.get(pid)
        if p is None:
            continue
        commits = p.commits.list(per_page=1, get_all=False)
        states.append(ProjectState(id=p.id, path=p.path_with_namespace,
                                   last_commit=commits[0].id if commits else None,
                                   last_activity_at=p.last_activity_at).model_dump(mode="json"))
    return {"count": len(listing), "sampled": states}
