"""GitLab's API for CI feedback: repository files, commit statuses, commit comments and MR notes.

Through python-gitlab, with the `GitLabAPI` block's token and timeout. (Backups talk to GitLab in
`tasks/gitlab.py`; this module is what a training run needs to read its spec and report back.)
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES

StatusState = Literal["pending", "running", "success", "failed", "canceled"]
DESCRIPTION_MAX = 255  # GitLab truncates longer commit status descriptions
NOTE_MAX = 60_000

PROJECT_RE = re.compile(r"^[A-Za-z0-9_.\-]+(/[A-Za-z0-9_.\-]+)+$|^\d+$")
SHA_RE = re.compile(r"^[0-9a-f]{7,64}$")
REF_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,254}$")


def status_description(text: str) -> str:
    """One line, at most 255 characters, as GitLab shows it in the pipeline widget."""
    line = " ".join(text.split())
    return line if len(line) <= DESCRIPTION_MAX else line[: DESCRIPTION_MAX - 1] + "…"


def _project(gitlab, project: str):
    return gitlab.get_client().projects.get(project, lazy=True)


@task(name="get-gitlab-project", cache_policy=NONE, **TRANSIENT_RETRIES)
def get_project(gitlab, project: str) -> dict[str, Any]:
    """The project's id, path, default branch and clone URL."""
    p = gitlab.get_client().projects.get(project)
    return {"id": p.id, "path_with_namespace": p.path_with_namespace, "http_url_to_repo": p.http_url_to_repo,
            "web_url": getattr(p, "web_url", None), "default_branch": getattr(p, "default_branch", None)}


@task(name="read-repository-file", cache_policy=NONE, **TRANSIENT_RETRIES)
def read_repository_file(gitlab, project: str, file_path: str, ref: str) -> str | None:
    """The file's text at `ref`, or None when the repository has no such file there."""
    import gitlab as gl

    try:
        raw = _project(gitlab, project).files.raw(file_path=file_path, ref=ref)
    except gl.exceptions.GitlabGetError as exc:
        if exc.response_code == 404:
            return None
        raise
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


@task(name="set-commit-status", cache_policy=NONE, **TRANSIENT_RETRIES)
def set_commit_status(gitlab, project: str, sha: str, state: StatusState, *, ref: str | None, name: str,
                      target_url: str | None, description: str) -> dict[str, Any] | None:
    """Post a commit status. A retry after a lost answer finds the state already set: that is success."""
    import gitlab as gl

    data = {"state": state, "name": name, "description": status_description(description)}
    if ref:
        data["ref"] = ref
    if target_url:
        data["target_url"] = target_url
    try:
        status = _project(gitlab, project).commits.get(sha, lazy=True).statuses.create(data)
    except gl.exceptions.GitlabCreateError as exc:
        if exc.response_code == 400 and "Cannot transition status" in str(exc.error_message):
            return None
        raise
    return status.attributes


@task(name="post-commit-note", cache_policy=NONE, **TRANSIENT_RETRIES)
def post_note(gitlab, project: str, sha: str, body: str, merge_request_iid: int | None = None) -> str:
    """A note on the merge request when there is one, else a comment on the commit. Returns where."""
    body = body if len(body) <= NOTE_MAX else body[:NOTE_MAX] + "\n\n…(truncated)"
    p = _project(gitlab, project)
    if merge_request_iid:
        p.mergerequests.get(merge_request_iid, lazy=True).notes.create({"body": body})
        return f"{project}!{merge_request_iid}"
    p.commits.get(sha, lazy=True).comments.create({"note": body})
    return f"{project}@{sha[:12]}"
