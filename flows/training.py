"""Training on Argo, started by a push to GitLab.

- `argo_training_run(spec, ...)`: the subflow that owns one Argo Workflow: renders the spec with
  hera, submits it under a deterministic name (a retried submit adopts the workflow the first one
  started), follows it with backoff while a progress artifact moves, collects the failed steps'
  logs, and ends in the Prefect state Argo's phase means. Cancelling the Prefect run stops the
  workflow (and terminates it after a grace period); a timeout terminates it.
- `train_on_push(project, commit_sha, ref, retrain="")`: what a GitLab CI job starts. Reads
  `.aiplatform/train.yaml` at the commit, validates it (and the extended resources against the
  platform's `argo.allowed_resources`), reports pending/running/success/failed (linking this run)
  as a commit status, pins the pushed repository to the pushed commit, builds the image when asked
  and missing, runs the training subflow and leaves a summary note on the commit or merge request.
  One workflow per (project, commit, spec); `retrain` trains again on purpose.
- A failed step's log survives `podGC`: the workflow archives logs (`argo.archive_logs`) and the
  flow reads the `main-logs` artifact, or keeps deleted-on-completion pods for
  `argo.keep_failed_pods_for`; when neither holds, the note says "logs unavailable" and why.
- `build_training_image(...)`: builds an image from a Dockerfile with rootless BuildKit in an Argo
  Workflow and pushes it to the platform registry, unless the registry already has it.
"""

from __future__ import annotations

import time
from typing import Any

from prefect import flow, get_run_logger
from prefect.states import Cancelled, Completed, Failed, State

from blocks.platform import Platform
from tasks.argo import (
    argo_ui_link,
    read_step_log,
    read_workflow,
    stop_workflow,
    submit_workflow,
)
from tasks.argo_render import (
    LogRetention,
    render_workflow,
    run_metadata,
    secrets_in,
    workflow_name,
)
from tasks.argo_status import Shutdown, logs_unavailable, parse_status, training_outcome
from tasks.redact import Redactor
from tasks.reports import Progress, publish_markdown
from tasks.training_report import commit_note, run_summary
from tasks.training_runs import cancel_requested, current_flow_run, flow_run_url, run_lineage, state_result
from tasks.training_spec import (
    TrainingSpec,
    TrainingSpecError,
    as_text,
    build_spec,
    is_pushed_repository,
    load_training_spec,
    pin_to_push,
    resource_problems,
)

MAX_FAILED_STEP_LOGS = 5
NOTE_LOG_LINES = 20


# --- the training subflow ----------------------------------------------------------------


def _stop_on_cancellation(_flow, flow_run, _state) -> None:
    """on_cancellation hook: stop the run's workflow (its name follows from the run's parameters),
    then terminate it if it has not ended within the grace period. Never raises.

    It runs outside the flow run, so it opens its own `Platform` and calls the tasks' plain functions."""
    import logging

    log = logging.getLogger("ai_platform_ops.training")
    redactor = Redactor()  # credentials of known shapes until the platform's secrets are known
    try:
        params = dict(flow_run.parameters or {})
        spec = TrainingSpec.model_validate(params["spec"])
        plat = Platform(params.get("platform", "main"))
        argo = plat.argo()
        redactor = Redactor.of(plat.secrets())
        ns = spec.namespace or argo.namespace
        name = workflow_name(spec, params.get("repository", ""), params.get("commit", ""),
                             str(params.get("attempt_key", "")))
        wf = stop_workflow.fn(argo, ns, name, "stop", "cancelled in Prefect", redactor=redactor)
        deadline = time.monotonic() + min(float(params.get("stop_grace_s", 60.0)), 60.0)
        while not parse_status(wf).terminal and time.monotonic() < deadline:
            time.sleep(min(2.0, float(params.get("poll_initial_s", 2.0))))
            wf = read_workflow.fn(argo, ns, name, redactor=redactor)
        if not parse_status(wf).terminal:
            stop_workflow.fn(argo, ns, name, "terminate", redactor=redactor)
        log.warning("cancelled: Argo workflow %s/%s stopped", ns, name)
    except Exception as exc:
        log.error("could not stop the Argo workflow of a cancelled run: %s", redactor.error(exc))


@flow(name="argo-training-run", on_cancellation=[_stop_on_cancellation], log_prints=False)
def argo_training_run(
    spec: TrainingSpec,
    platform: str = "main",
    repository: str = "",
    commit: str = "",
    attempt_key: str = "",
    timeout_s: float | None = None,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    stop_grace_s: float = 120.0,
):
    """Run `spec` as one Argo Workflow and follow it to the end; the run's state is the training's.

    One workflow per (repository, commit, spec, attempt_key): a second run for the same key adopts the
    workflow the first one started. What it reports (logs, the summary artifact, its result) is
    redacted with every secret of the platform's blocks."""
    logger = get_run_logger()
    plat = Platform(platform)
    argo = plat.argo()
    argo_cfg = plat.config.argo
    redactor = Redactor.of(plat.secrets())
    ns = spec.namespace or argo.namespace
    name = workflow_name(spec, repository, commit, attempt_key)
    problems = resource_problems(spec, argo_cfg.allowed_resources if argo_cfg else [])
    if problems:
        return Failed(message=f"refusing to submit {name}: " + "; ".join(problems))
    this_run = current_flow_run()
    labels, annotations = run_metadata(spec, repository, commit, attempt_key,
                                       str(this_run.id) if this_run is not None else None)
    logs = LogRetention(archive=bool(argo_cfg and argo_cfg.archive_logs),
                        keep_pods_for=argo_cfg.keep_failed_pods_for if argo_cfg else "10m")
    manifest = render_workflow(spec, name=name, namespace=ns, labels=labels, annotations=annotations, logs=logs)
    leaks = secrets_in(manifest, redactor.secrets)
    if leaks:
        return Failed(message=f"refusing to submit {name}: {', '.join(leaks)} would be visible in the workflow")

    _, adopted = submit_workflow(argo, ns, manifest, redactor=redactor)
    argo_url = argo_ui_link(argo, ns, name)
    logger.info("%s Argo workflow %s/%s (%s)", "adopted the existing" if adopted else "submitted", ns, name,
                argo_url)

    lineage = run_lineage(this_run) if this_run is not None else []
    progress = Progress(f"training-progress-{name}", total=100,
                        description=f"Argo workflow {ns}/{name}: share of steps done")
    shutdown = Shutdown(started=time.monotonic(), grace_s=stop_grace_s, timeout_s=timeout_s)
    delay, seen = poll_initial_s, None
    while True:
        st = parse_status(read_workflow(argo, ns, name, redactor=redactor))
        progress.set(st.percent)
        if (st.phase, st.steps_done, st.steps_total) != seen:
            seen = (st.phase, st.steps_done, st.steps_total)
            logger.info("%s: %s, %d/%d steps done", name, st.phase, st.steps_done, st.steps_total)
        asked = not shutdown.shutting_down and not st.terminal and bool(lineage) and cancel_requested(lineage)
        action = shutdown.next(time.monotonic(), st.terminal, asked)
        if action in ("done", "give_up"):
            if action == "give_up":
                logger.error("%s is still %s after terminate; leaving it to Argo", name, st.phase)
            break
        if action == "stop":
            logger.warning("cancellation requested: stopping %s (exit handlers run; terminate after %.0fs)",
                           name, stop_grace_s)
            stop_workflow(argo, ns, name, "stop", "cancelled in Prefect", redactor=redactor)
        elif action == "terminate":
            logger.warning("%s: terminating it (%s)", name, f"ran longer than {timeout_s:.0f}s"
                           if shutdown.timed_out_s is not None and not shutdown.cancelled
                           else f"did not stop within {stop_grace_s:.0f}s")
            stop_workflow(argo, ns, name, "terminate", redactor=redactor)
        time.sleep(poll_initial_s if shutdown.shutting_down else delay)
        delay = min(delay * 2, poll_max_s)

    outcome = training_outcome(st, cancelled=shutdown.cancelled, timed_out_s=shutdown.timed_out_s)
    failed_steps = []
    if outcome.state == "Failed":
        for step in st.failed_steps[:MAX_FAILED_STEP_LOGS]:
            try:
                text = read_step_log(argo, ns, name, step, redactor=redactor) \
                    or logs_unavailable(step, st.pod_gc, st.archive_logs)
            except Exception as exc:
                text = f"logs unavailable: {redactor.error(exc)}"
            logger.error("failed step %s (%s), pod %s, last lines:\n%s", step.name, step.message, step.pod, text)
            tail = "\n".join(text.splitlines()[-NOTE_LOG_LINES:])
            failed_steps.append({"name": step.name, "pod": step.pod, "message": step.message, "log_tail": tail})
    result = redactor.value({
        "workflow": name, "namespace": ns, "phase": st.phase, "message": st.message, "state": outcome.state,
        "outcome": outcome.message, "steps": f"{st.steps_done}/{st.steps_total}", "adopted": adopted,
        "repository": repository, "commit": commit, "argo_url": argo_url, "failed_steps": failed_steps,
    })
    publish_markdown(f"training-{name}", run_summary(result), description=f"Training run {ns}/{name}")
    if outcome.state == "Completed":
        logger.info(outcome.message)
        return result
    logger.error(outcome.message)
    if outcome.state == "Cancelled":
        return Cancelled(message=outcome.message, data=result)
    return Failed(message=outcome.message, data=result)


# --- building the image -------------------------------------------------------------------


@flow(name="build-training-image", log_prints=False)
def build_training_image(
    context_url: str,
    revision: str | int | float,  # noqa: PYI041 - an int must stay an int (its text is exact)
    repository: str = "ai-base",
    tag: str | int | float | None = None,  # noqa: PYI041 - an int must stay an int (its text is exact)
    dockerfile: str = "configs/images/Dockerfile",
    context: str = ".",
    platform: str = "main",
    git_secret: str | None = None,
    push_secret: str = "registry-push-credentials",
    force: bool = False,
    timeout_s: float = 3 * 3600,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
):
    """Build `dockerfile` of `context_url` at `revision` with BuildKit on Argo and push it as
    <registry>/<repository>:<tag> (tag defaults to the revision's first 12 characters), unless the
    registry has it already (`force` builds anyway)."""
    from tasks.registry import check_manifest, image_ref

    logger = get_run_logger()
    revision, exact = as_text(revision)
    tag_text, tag_exact = as_text(tag) if tag is not None else (None, True)
    if not exact or not tag_exact:
        return Failed(message="revision and tag must arrive as strings (a number lost its text on the way: pass "
                              "them with --params JSON, quoted)")
    registry = Platform(platform).registry()
    tag = tag_text or revision[:12]
    image = image_ref(registry.url, repository, tag)
    if not force and check_manifest(registry, repository, tag):
        logger.info("%s is already in the registry: nothing to build", image)
        return {"image": image, "built": False}
    spec = build_spec(image, context_url, revision, dockerfile, context, git_secret, push_secret,
                      insecure_registry=registry.url.startswith("http://"))
    state = argo_training_run(spec, platform=platform, repository=context_url, commit=revision,
                              attempt_key=image, timeout_s=timeout_s, poll_initial_s=poll_initial_s,
                              poll_max_s=poll_max_s, return_state=True)
    if not state.is_completed():
        return Failed(message=f"building {image} failed: {state.message}")
    if not check_manifest(registry, repository, tag):
        return Failed(message=f"the build of {image} succeeded but the registry does not have it: check the push "
                              f"credentials (secret {push_secret!r}) and the registry URL")
    publish_markdown(f"image-build-{repository}-{tag}", f"\n\n`{image}` from `{context_url}` at `{revision}` ({dockerfile})\n",
                     description=f"Built {image}")
    logger.info("built and pushed %s", image)
    return {"image": image, "built": True}


# --- train on push ------------------------------------------------------------------------


@flow(name="train-on-push", log_prints=False)
def train_on_push(
    project: str | int,
    commit_sha: str | int | float,  # noqa: PYI041 - an int must stay an int (its text is exact)
    ref: str | int | float = "",  # noqa: PYI041 - an int must stay an int (its text is exact)
    platform: str = "main",
    spec_path: str = ".aiplatform/train.yaml",
    merge_request_iid: int | str | None = None,
    retrain: str | int | float = "",  # noqa: PYI041 - an int must stay an int (its text is exact)
    status_name: str = "aiplatform/train",
    timeout_s: float | None = None,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    stop_grace_s: float = 120.0,
):
    """Train the commit a GitLab CI job names, reporting back to GitLab as a commit status and a note.

    One workflow per (project, commit, spec): a second pipeline for the same push (a branch and a
    merge-request pipeline, a tag on a trained commit, a retried job) reports the first one's
    workflow. `retrain` (any text, e.g. a counter) trains the same commit and spec again."""
    from tasks.gitlab_ci import (
        PROJECT_RE,
        REF_RE,
        SHA_RE,
        post_note,
        project_clone_url,
        read_repository_file,
    )
    from tasks.gitlab_ci import set_commit_status as _status

    logger = get_run_logger()
    project, _ = as_text(project)
    commit_sha, sha_exact = as_text(commit_sha)
    ref, ref_exact = as_text(ref)
    retrain, _ = as_text(retrain)
    if not sha_exact:
        return Failed(message="commit_sha arrived as a number and lost its text: pass the parameters as JSON "
                              "strings (`prefect deployment run ... --params`), as the CI template does")
    if not ref_exact:
        logger.warning("ref arrived as a number (%s): its text may differ from the branch or tag name, so the "
                       "commit statuses go without a ref; pass parameters as JSON strings with --params", ref)
    if not PROJECT_RE.match(project) or not SHA_RE.match(commit_sha) or (ref and not REF_RE.match(ref)):
        return Failed(message="expected project 'group/name', a hex commit SHA and a branch or tag name as ref")
    mr_iid = int(merge_request_iid) if merge_request_iid and str(merge_request_iid).isdigit() else None
    plat = Platform(platform)
    gitlab = plat.gitlab_api().get_client()
    redactor = Redactor.of(plat.secrets())
    this_run = current_flow_run()
    prefect_url = flow_run_url(this_run.id) if this_run else None

    def status(state: str, description: str) -> None:
        _status(gitlab, project, commit_sha, state, ref=(ref or None) if ref_exact else None, name=status_name,
                target_url=prefect_url, description=description, redactor=redactor)

    def finish(state: State, message: str, gitlab_state: str, result: dict[str, Any] | None = None) -> State:
        status(gitlab_state, message)
        where = post_note(gitlab, project, commit_sha, commit_note(commit_sha, state, result, message, prefect_url),
                          mr_iid, redactor=redactor)
        logger.info("reported %s to %s", gitlab_state, where)
        return state

    status("pending", "training requested")
    try:
        text = read_repository_file(gitlab, project, spec_path, commit_sha, redactor=redactor)
        if text is None:
            msg = f"no training spec: {spec_path} is not in {project} at {commit_sha[:12]}"
            return finish(Failed(message=msg), msg, "failed")
        try:
            spec = load_training_spec(text, f"{spec_path}@{commit_sha[:12]}")
        except TrainingSpecError as exc:
            msg = "invalid training spec: " + "; ".join(exc.problems)
            logger.error(redactor.text(str(exc)))
            return finish(Failed(message=msg), msg, "failed")
        argo_cfg = plat.config.argo
        problems = resource_problems(spec, argo_cfg.allowed_resources if argo_cfg else [])
        if problems:
            msg = "invalid training spec: " + "; ".join(problems)
            return finish(Failed(message=msg), msg, "failed")

        spec = pin_to_push(spec, project, project_clone_url(gitlab, project, redactor=redactor), commit_sha)
        pushed = next(c for c in spec.code if is_pushed_repository(c, project) or c.ref == commit_sha)
        if spec.build is not None:
            logger.info("building image %s if missing", spec.build.repository)
            build = build_training_image(
                context_url=pushed.url, revision=commit_sha, repository=spec.build.repository,
                dockerfile=spec.build.dockerfile, context=spec.build.context, platform=platform,
                git_secret=pushed.credentials.secret if pushed.credentials else None,
                poll_initial_s=poll_initial_s, poll_max_s=poll_max_s, return_state=True)
            if not build.is_completed():
                return finish(Failed(message=build.message), f"image build failed: {build.message}", "failed")
            spec = spec.model_copy(update={"image": build.result()["image"]})

        status("running", "training on Argo")
        state = argo_training_run(spec, platform=platform, repository=project, commit=commit_sha,
                                  attempt_key=retrain, timeout_s=timeout_s, poll_initial_s=poll_initial_s,
                                  poll_max_s=poll_max_s, stop_grace_s=stop_grace_s, return_state=True)
    except BaseException as exc:
        try:
            status("failed", f"training flow error: {type(exc).__name__}")
        except Exception as status_exc:  # noqa: BLE001 - the original error is what must propagate
            get_run_logger().error("could not post the failed commit status either: %s",
                                   type(status_exc).__name__)
        raise
    result = state_result(state)
    if state.is_completed():
        return finish(Completed(message=state.message or "training succeeded", data=result),
                      "training succeeded", "success", result)
    if state.is_cancelled():
        return finish(Cancelled(message=state.message, data=result), state.message or "cancelled", "canceled",
                      result)
    return finish(Failed(message=state.message, data=result), state.message or "training failed", "failed", result)
