"""The training lifecycle's side of the GPU sweep: a note on the commit whose training runs on a faulty GPU.

`training_commits` (pure) says which `train-on-push` commits a sweep's critical findings touch;
`note_gpu_faults_on_commits` reads those workflows from Argo (`tasks.argo`) and posts one note per commit
(`tasks.gitlab_ci`). A note is a courtesy: it never fails the sweep.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NONE

from tasks.gpu_model import Severity, SweepResult


def training_commits(result: SweepResult, workflows: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    """(project, commit, workflow, findings) for each `train-on-push` workflow named by a critical finding.

    `workflows` maps "namespace/name" to the Workflow as Argo returns it; a workflow started by
    `train-on-push` carries the annotations `ai-platform-ops/repository` (the GitLab project) and
    `ai-platform-ops/commit` (its SHA), written by `flows.training.argo_training_run`.
    """
    from tasks.gitlab_ci import PROJECT_RE, SHA_RE

    out: dict[str, dict[str, Any]] = {}
    for f in result.findings:
        if f.severity is not Severity.CRITICAL or not f.workflow:
            continue
        for ref in f.workflow.split(", "):
            wf = workflows.get(ref) or {}
            notes = (wf.get("metadata") or {}).get("annotations") or {}
            project, sha = notes.get("ai-platform-ops/repository", ""), notes.get("ai-platform-ops/commit", "")
            if not (PROJECT_RE.match(project) and SHA_RE.match(sha)):
                continue
            item = out.setdefault(ref, {"project": project, "commit": sha, "workflow": ref, "findings": []})
            item["findings"].append(f"{f.kind.value} on {f.node}" + (f" gpu {f.gpu}" if f.gpu else "")
                                    + f": {f.summary}")
    return list(out.values())


@task(name="note-gpu-faults-on-training-commits", cache_policy=NONE)
def _note_training_commits_task(platform: str, result: SweepResult, argo: Callable[[], Any],
                                gitlab_api: Callable[[], Any], secrets: Callable[[], list[str]]) -> list[str]:
    from tasks.argo import read_workflow
    from tasks.gitlab_ci import post_note
    from tasks.redact import Redactor

    read = getattr(read_workflow, "fn", read_workflow)  # one task for the whole note: no task run per workflow
    redactor = Redactor.of(secrets())
    argo_block = argo()
    refs = sorted({r for f in result.findings if f.severity is Severity.CRITICAL and f.workflow
                   for r in f.workflow.split(", ")})
    workflows: dict[str, dict[str, Any]] = {}
    for ref in refs:
        ns, name = ref.split("/", 1)
        try:
            workflows[ref] = read(argo_block, ns, name, redactor=redactor)
        except Exception as exc:  # noqa: BLE001 - a workflow gone (deleted, archived) has no commit to note
            get_run_logger().warning("no commit note for workflow %s: %s", ref, redactor.error(exc))
    gitlab = gitlab_api().get_client()
    where = []
    for item in training_commits(result, workflows):
        body = (f"**GPU fault under this commit's training** (`{item['workflow']}`), found by the GPU sweep of "
                f"{platform}/{result.cluster}:\n\n" + "\n".join(f"- {x}" for x in item["findings"])
                + "\n\nThe node is planned for cordon; the training may fail or slow down.")
        where.append(post_note(gitlab, item["project"], item["commit"], body, redactor=redactor))
    return where


def note_gpu_faults_on_commits(platform: str, result: SweepResult, *, argo: Callable[[], Any],
                               gitlab_api: Callable[[], Any], secrets: Callable[[], list[str]]) -> list[str]:
    """Note each critical finding on the commit of the `train-on-push` training it hits; where the notes went.

    `argo`, `gitlab_api` and `secrets` give the Argo block, GitLab's API block and the platform's secret
    values (the flow's `plat.argo`, `plat.gitlab_api`, `plat.secrets`): they are called inside the note's
    task, so a block that cannot be loaded is a warning like any other failed note, never a failed sweep.
    """
    if not any(f.severity is Severity.CRITICAL and f.workflow for f in result.findings):
        return []
    state = _note_training_commits_task(platform, result, argo, gitlab_api, secrets, return_state=True)
    if not state.is_completed():  # a note is a courtesy: it never fails the sweep
        get_run_logger().warning("could not note GPU faults on training commits: %s", state.message)
        return []
    return state.result()
