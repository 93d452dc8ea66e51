"""GitLab's API for CI feedback: repository files, commit statuses, commit comments and MR notes.

The tasks take a python-gitlab client (`GitLabAPI.get_client()`, with the block's token and
timeout; the flow builds it once per run) and a `tasks.redact.Redactor`: a status description or a
note is redacted before it is posted, and GitLab's error messages are redacted before they leave a
task. (Backups talk to GitLab in `tasks/gitlab_host.py` and `tasks/gitlab_api.py`; this module is what a training run needs to
read its spec and report back.)
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Literal

from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.redact import Redactor

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


@contextmanager
def _redacted_errors(redactor: Redactor):
    """GitLab's error answers, re-raised as the same exception type and code with the message redacted
    and without the response body (the retry policy reads `response_code`)."""
    import gitlab as gl

    try:
        yield
    except gl.exceptions.GitlabError as exc:
        raise type(exc)(redactor.text(str(exc.error_message)), exc.response_code) from None


@task(name="get-gitlab-clone-url", cache_policy=NONE, **TRANSIENT_RETRIES)
def project_clone_url(gitlab, project: str, *, redactor: Redactor) -> str:
    """The project's HTTP clone URL."""
    with _redacted_errors(redactor):
        return redactor.text(gitlab.projects.get(project).http_url_to_repo)


# The file is returned as written, not redacted: the training spec's validation must see a token
# pasted into it in order to reject it. So this one result is never persisted.
@task(name="read-repository-file", cache_policy=NONE, persist_result=False, **TRANSIENT_RETRIES)
def read_repository_file(gitlab, project: str, file_path: str, ref: str, *, redactor: Redactor) -> str | None:
    """The file's text at `ref`, or None when the repository has no such file there."""
    import gitlab as gl

    try:
        with _redacted_errors(redactor):
            raw = gitlab.projects.get(project, lazy=True).files.raw(file_path=file_path, ref=ref)
    except gl.exceptions.GitlabGetError as exc:
        if exc.response_code == 404:
            return None
        raise
    return raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else str(raw)


LOCK_RETRY_DELAYS_S = (0.25, 0.5, 1.0, 2.0, 4.0)
"""Waits (before jitter) between the attempts of a status post that GitLab answered 409: the commit
status service runs under an exclusive lease per (project, sha) and answers 409 "Another update to
this commit status is in progress" when another update holds it (lib/api/commit_statuses.rb)."""


def _lock_conflict(exc: Exception) -> bool:
    return getattr(exc, "response_code", None) == 409


@task(name="set-commit-status", cache_policy=NONE, **TRANSIENT_RETRIES)
def set_commit_status(gitlab, project: str, sha: str, state: StatusState, *, ref: str | None, name: str,
                      target_url: str | None, description: str, redactor: Redactor) -> int:
    """Post a commit status (its description redacted); returns the attempts it took.

    GitLab's rules (app/services/ci/create_commit_status_service.rb): a post moves the pending or
    running status of this name and ref, so re-posting `pending` or `running` is a 400 "Cannot
    transition status" (a retry after a lost answer finds the state already set: that is success),
    while a final state is always accepted. A 409 lock conflict is retried here with backoff and
    jitter (`LOCK_RETRY_DELAYS_S`); connection faults and 5xx by the task's transient retries."""
    import random
    import time

    import gitlab as gl

    data = {"state": state, "name": name, "description": status_description(redactor.text(description))}
    if ref:
        data["ref"] = ref
    if target_url:
        data["target_url"] = target_url
    statuses = gitlab.projects.get(project, lazy=True).commits.get(sha, lazy=True).statuses
    for attempt, delay in enumerate((*LOCK_RETRY_DELAYS_S, None), start=1):
        try:
            with _redacted_errors(redactor):
                statuses.create(data)
            return attempt
        except gl.exceptions.GitlabCreateError as exc:
            if exc.response_code == 400 and "Cannot transition status" in exc.error_message:
                return attempt
            if not _lock_conflict(exc) or delay is None:
                raise
            time.sleep(delay * (1 + random.uniform(0, 0.5)))
    raise AssertionError("unreachable")


@task(name="post-commit-note", cache_policy=NONE, **TRANSIENT_RETRIES)
def post_note(gitlab, project: str, sha: str, body: str, merge_request_iid: int | None = None, *,
              redactor: Redactor) -> str:
    """A note (redacted) on the merge request when there is one, else a comment on the commit. Returns where."""
    body = redactor.text(body)
    body = body if len(body) <= NOTE_MAX else body[:NOTE_MAX] + "\n\n…(truncated)"
    p = gitlab.projects.get(project, lazy=True)
    with _redacted_errors(redactor):
        if merge_request_iid:
            p.mergerequests.get(merge_request_iid, lazy=True).notes.create({"body": body})
            return f"{project}!{merge_request_iid}"
        p.commits.get(sha, lazy=True).comments.create({"note": body})
    return f"{project}@{sha[:12]}"
