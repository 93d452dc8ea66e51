"""Training on Argo, started by a push to GitLab.

- `argo_training_run(spec, ...)`: the subflow that owns one Argo Workflow: renders the spec with
  hera, submits it under a deterministic name (a retried submit adopts the workflow the first one
  started), follows it with backoff while a progress artifact moves, collects the failed steps'
  logs, and ends in the Prefect state Argo's phase means. Cancelling the Prefect run stops the
  workflow (and terminates it after a grace period); a timeout terminates it.
- `train_on_push(project, commit_sha, ref)`: what a GitLab CI job starts. Reads
  `.aiplatform/train.yaml` at the commit, validates it, reports pending/running/success/failed
  (linking this run) as a commit status, builds the image when asked and missing, runs the
  training subflow and leaves a summary note on the commit or merge request.
- `build_training_image(...)`: builds an image from a Dockerfile with rootless BuildKit in an Argo
  Workflow and pushes it to the platform registry, unless the registry already has it.
"""

from __future__ import annotations

import shlex
import time
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.states import Cancelled, Completed, Failed, State

from blocks.platform import Platform
from tasks.argo import (
    LABEL_PREFIX,
    CodeSource,
    GitCredentials,
    ImageBuild,
    ResourceSpec,
    SecretEnvVar,
    TrainingSpec,
    TrainingSpecError,
    argo_ui_link,
    get_pod_logs,
    get_workflow,
    label_value,
    load_training_spec,
    parse_status,
    read_workflow,
    render_workflow,
    secrets_in,
    shutdown_workflow,
    stop_or_terminate_workflow,
    submit_workflow,
    training_outcome,
    workflow_name,
)
from tasks.redact import Redactor
from tasks.reports import Progress, md_table, publish_markdown

MAX_FAILED_STEP_LOGS = 5
NOTE_LOG_LINES = 20


# --- helpers: the Prefect context ---------------------------------------------------------


def flow_run_url(flow_run_id: Any) -> str | None:
    """The Prefect UI page of a flow run (PREFECT_UI_URL, else derived from PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def _current_flow_run():
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx else None


def _lineage(flow_run) -> list[UUID]:
    """This flow run and every parent flow run above it (a cancelled parent cancels the training too)."""
    from prefect.client.orchestration import get_client

    ids = [flow_run.id]
    parent_task = flow_run.parent_task_run_id
    with get_client(sync_client=True) as client:
        while parent_task is not None and len(ids) < 10:
            parent_run = client.read_flow_run(client.read_task_run(parent_task).flow_run_id)
            ids.append(parent_run.id)
            parent_task = parent_run.parent_task_run_id
    return ids


def _cancel_requested(ids: list[UUID]) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return any(r.state is not None and (r.state.is_cancelling() or r.state.is_cancelled()) for r in runs)


def _stop_on_cancellation(_flow, flow_run, _state) -> None:
    """on_cancellation hook: stop the run's workflow (its name follows from the run's parameters),
    then terminate it if it has not ended within the grace period. Never raises.

    It runs outside the flow run, so it opens its own `Platform`."""
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
                             str(params.get("attempt_key", "1")))
        wf = shutdown_workflow(argo, ns, name, "stop", "cancelled in Prefect", redactor=redactor)
        deadline = time.monotonic() + min(float(params.get("stop_grace_s", 60.0)), 60.0)
        while not parse_status(wf).terminal and time.monotonic() < deadline:
            time.sleep(min(2.0, float(params.get("poll_initial_s", 2.0))))
            wf = read_workflow(argo, ns, name, redactor=redactor)
        if not parse_status(wf).terminal:
            shutdown_workflow(argo, ns, name, "terminate", redactor=redactor)
        log.warning("cancelled: Argo workflow %s/%s stopped", ns, name)
    except Exception as exc:  # noqa: BLE001 - a hook must not mask the cancellation
        log.error("could not stop the Argo workflow of a cancelled run: %s", redactor.error(exc))


# --- the training subflow ----------------------------------------------------------------


def _summary_markdown(result: dict[str, Any]) -> str:
    rows = [{"field": k, "value": result.get(k)} for k in (
        "workflow", "namespace", "phase", "message", "steps", "adopted", "repository", "commit", "argo_url")]
    lines = [f"# Training run: {result['workflow']}", "", f"**{result['state']}**: {result['outcome']}", "",
             md_table(rows)]
    for step in result.get("failed_steps", []):
        lines += [f"## Failed step `{step['name']}` ({step['message']})", "", "```", step["log_tail"], "```", ""]
    return "\n".join(lines)


@flow(name="argo-training-run", on_cancellation=[_stop_on_cancellation], log_prints=False)
def argo_training_run(
    spec: TrainingSpec,
    platform: str = "main",
    repository: str = "",
    commit: str = "",
    attempt_key: str = "1",
    timeout_s: float | None = None,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    stop_grace_s: float = 120.0,
):
    """Run `spec` as one Argo Workflow and follow it to the end; the run's state is the training's.

    What it reports (logs, the summary artifact, its result) is redacted with every secret of the
    platform's blocks."""
    logger = get_run_logger()
    plat = Platform(platform)
    argo = plat.argo()
    redactor = Redactor.of(plat.secrets())
    ns = spec.namespace or argo.namespace
    name = workflow_name(spec, repository, commit, attempt_key)
    this_run = _current_flow_run()
    labels = {f"{LABEL_PREFIX}/training": spec.name}
    if repository:
        labels[f"{LABEL_PREFIX}/repository"] = label_value(repository)
    if commit:
        labels[f"{LABEL_PREFIX}/commit"] = label_value(commit)
    annotations = {f"{LABEL_PREFIX}/repository": repository, f"{LABEL_PREFIX}/commit": commit,
                   f"{LABEL_PREFIX}/attempt": str(attempt_key)}
    if this_run is not None:
        annotations[f"{LABEL_PREFIX}/prefect-flow-run"] = str(this_run.id)
    manifest = render_workflow(spec, name=name, namespace=ns, labels=labels,
                               annotations={k: v for k, v in annotations.items() if v})
    leaks = secrets_in(manifest, redactor.secrets)
    if leaks:
        return Failed(message=f"refusing to submit {name}: {', '.join(leaks)} would be visible in the workflow")

    _, adopted = submit_workflow(argo, ns, manifest, redactor=redactor)
    argo_url = argo_ui_link(argo, ns, name)
    logger.info("%s Argo workflow %s/%s (%s)", "adopted the existing" if adopted else "submitted", ns, name,
                argo_url)

    lineage = _lineage(this_run) if this_run is not None else []
    progress = Progress(f"training-progress-{name}", total=100,
                        description=f"Argo workflow {ns}/{name}: share of steps done")
    started = time.monotonic()
    delay = poll_initial_s
    cancelled, timed_out = False, None
    shutdown_at: float | None = None
    terminated = False
    seen = None
    while True:
        st = parse_status(get_workflow(argo, ns, name, redactor=redactor))
        progress.set(st.percent)
        if (st.phase, st.steps_done, st.steps_total) != seen:
            seen = (st.phase, st.steps_done, st.steps_total)
            logger.info("%s: %s, %d/%d steps done", name, st.phase, st.steps_done, st.steps_total)
        if st.terminal:
            break
        now = time.monotonic()
        if not cancelled and timed_out is None and lineage and _cancel_requested(lineage):
            cancelled, shutdown_at = True, now
            logger.warning("cancellation requested: stopping %s (exit handlers run; terminate after %.0fs)",
                           name, stop_grace_s)
            stop_or_terminate_workflow(argo, ns, name, "stop", "cancelled in Prefect", redactor=redactor)
        elif not cancelled and timed_out is None and timeout_s is not None and now - started > timeout_s:
            timed_out, shutdown_at, terminated = now - started, now, True
            logger.error("%s ran longer than %.0fs: terminating it", name, timeout_s)
            stop_or_terminate_workflow(argo, ns, name, "terminate", redactor=redactor)
        elif shutdown_at is not None and not terminated and now - shutdown_at > stop_grace_s:
            terminated, shutdown_at = True, now
            logger.warning("%s did not stop within %.0fs: terminating it", name, stop_grace_s)
            stop_or_terminate_workflow(argo, ns, name, "terminate", redactor=redactor)
        elif shutdown_at is not None and terminated and now - shutdown_at > stop_grace_s:
            logger.error("%s is still %s after terminate; leaving it to Argo", name, st.phase)
            break
        time.sleep(poll_initial_s if shutdown_at is not None else delay)
        delay = min(delay * 2, poll_max_s)

    outcome = training_outcome(st, cancelled=cancelled, timed_out_s=timed_out)
    failed_steps = []
    if outcome.state == "Failed":
        for step in st.failed_steps[:MAX_FAILED_STEP_LOGS]:
            if not step.pod:
                continue
            try:
                text = get_pod_logs(argo, ns, name, step.pod, redactor=redactor)
            except Exception as exc:  # noqa: BLE001 - logs are best effort; the failure is already known
                text = f"(logs unavailable: {redactor.error(exc)})"
            logger.error("failed step %s (%s), pod %s, last lines:\n%s", step.name, step.message, step.pod, text)
            tail = "\n".join(text.splitlines()[-NOTE_LOG_LINES:])
            failed_steps.append({"name": step.name, "pod": step.pod, "message": step.message, "log_tail": tail})
    result = redactor.value({
        "workflow": name, "namespace": ns, "phase": st.phase, "message": st.message, "state": outcome.state,
        "outcome": outcome.message, "steps": f"{st.steps_done}/{st.steps_total}", "adopted": adopted,
        "repository": repository, "commit": commit, "argo_url": argo_url, "failed_steps": failed_steps,
    })
    publish_markdown(f"training-{name}", _summary_markdown(result), description=f"Training run {ns}/{name}")
    if outcome.state == "Completed":
        logger.info(outcome.message)
        return result
    logger.error(outcome.message)
    if outcome.state == "Cancelled":
        return Cancelled(message=outcome.message, data=result)
    return Failed(message=outcome.message, data=result)


# --- building the image -------------------------------------------------------------------

BUILDKIT_IMAGE = "moby/buildkit:rootless"


def build_spec(image: str, context_url: str, revision: str, dockerfile: str = "Dockerfile", context: str = ".",
               git_secret: str | None = None, push_secret: str = "registry-push-credentials",
               insecure_registry: bool = False, name: str = "build-image") -> TrainingSpec:
    """The training spec of a rootless BuildKit build of `dockerfile` at `revision`, pushed as `image` (pure)."""
    ImageBuild(repository="x", dockerfile=dockerfile, context=context)  # validates the paths
    if ".." in f"{dockerfile}/{context}".split("/"):
        raise ValueError("dockerfile and context must stay inside the repository (no '..')")
    src = "/workspace/src"
    dockerfile_dir, _, filename = f"{src}/{dockerfile.strip('/')}".rpartition("/")
    context_dir = src if context.strip("/") in ("", ".") else f"{src}/{context.strip('/')}"
    output = f"type=image,name={image},push=true" + (",registry.insecure=true" if insecure_registry else "")
    argv = ["buildctl-daemonless.sh", "build", "--frontend", "dockerfile.v0",
            "--local", f"context={context_dir}", "--local", f"dockerfile={dockerfile_dir}",
            "--opt", f"filename={filename}", "--output", output]
    script = "\n".join([
        "set -eu",
        'mkdir -p "$HOME/.docker"',
        'printf \'%s\' "$REGISTRY_AUTH" > "$HOME/.docker/config.json"',
        " ".join(shlex.quote(a) for a in argv),
    ])
    return TrainingSpec(
        name=name, image=BUILDKIT_IMAGE, shell=["sh"], script=script,
        code=CodeSource(url=context_url, ref=revision, path=src,
                        credentials=GitCredentials(secret=git_secret) if git_secret else None),
        env={"BUILDKITD_FLAGS": "--oci-worker-no-process-sandbox"},
        secret_env=[SecretEnvVar(name="REGISTRY_AUTH", secret=push_secret, key=".dockerconfigjson")],
        resources=ResourceSpec(cpu="2", memory="4Gi", cpu_limit="4", memory_limit="8Gi"),
        pod_spec_patch={
            "containers": [{
                "name": "main",
                "securityContext": {"seccompProfile": {"type": "Unconfined"},
                                    "appArmorProfile": {"type": "Unconfined"},
                                    "runAsUser": 1000, "runAsGroup": 1000},
                "volumeMounts": [{"name": "buildkitd", "mountPath": "/home/user/.local/share/buildkit"}],
            }],
            "volumes": [{"name": "buildkitd", "emptyDir": {}}],
        },
        active_deadline_seconds=3 * 3600, pod_gc="OnPodSuccess",
        retry={"limit": 1, "policy": "OnError"},
    )


@flow(name="build-training-image", log_prints=False)
def build_training_image(
    context_url: str,
    revision: str,
    repository: str = "ai-base",
    tag: str | None = None,
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
    <registry>/<repository>:<tag> (tag defaults to the revision), unless the registry has it already."""
    from tasks.registry import check_manifest, image_ref

    logger = get_run_logger()
    registry = Platform(platform).registry()
    tag = tag or revision[:12]
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
    publish_markdown(f"image-build-{repository}-{tag}", f"# Image built\n\n`{image}` from `{context_url}` at "
                     f"`{revision}` ({dockerfile})\n", description=f"Built {image}")
    logger.info("built and pushed %s", image)
    return {"image": image, "built": True}


# --- train on push ------------------------------------------------------------------------


def _note(sha: str, state: State | None, result: dict[str, Any] | None, message: str,
          prefect_url: str | None) -> str:
    icon = {"Completed": "✅", "Failed": "❌", "Cancelled": "⏹️"}.get(state.type.value.title() if state else "", "❌")
    lines = [f"### {icon} Training `{sha[:12]}`: {message}", ""]
    if result:
        lines += [f"- **Argo workflow:** [{result['namespace']}/{result['workflow']}]({result['argo_url']}) "
                  f"({result['phase']}, {result['steps']} steps)"]
    if prefect_url:
        lines += [f"- **Prefect run:** {prefect_url}"]
    for step in (result or {}).get("failed_steps", []):
        lines += ["", f"<details><summary>Step <code>{step['name']}</code>: {step['message']}</summary>", "",
                  "```", step["log_tail"], "```", "</details>"]
    return "\n".join(lines)


def _state_result(state: State) -> dict[str, Any] | None:
    try:
        data = state.result(raise_on_failure=False)
    except Exception:  # noqa: BLE001 - a state without data
        return None
    return data if isinstance(data, dict) else None


@flow(name="train-on-push", log_prints=False)
def train_on_push(
    project: str,
    commit_sha: str,
    ref: str = "",
    platform: str = "main",
    spec_path: str = ".aiplatform/train.yaml",
    merge_request_iid: int | str | None = None,
    attempt: str = "1",
    status_name: str = "aiplatform/train",
    timeout_s: float | None = None,
    poll_initial_s: float = 5.0,
    poll_max_s: float = 60.0,
    stop_grace_s: float = 120.0,
):
    """Train the commit a GitLab CI job names, reporting back to GitLab as a commit status and a note."""
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
    if not PROJECT_RE.match(project) or not SHA_RE.match(commit_sha) or (ref and not REF_RE.match(ref)):
        return Failed(message="expected project 'group/name', a hex commit SHA and a branch or tag name as ref")
    mr_iid = int(merge_request_iid) if merge_request_iid and str(merge_request_iid).isdigit() else None
    plat = Platform(platform)
    gitlab = plat.gitlab_api().get_client()
    redactor = Redactor.of(plat.secrets())
    this_run = _current_flow_run()
    prefect_url = flow_run_url(this_run.id) if this_run else None

    def status(state: str, description: str) -> None:
        _status(gitlab, project, commit_sha, state, ref=ref or None, name=status_name, target_url=prefect_url,
                description=description, redactor=redactor)

    def finish(state: State, message: str, gitlab_state: str, result: dict[str, Any] | None = None) -> State:
        status(gitlab_state, message)
        where = post_note(gitlab, project, commit_sha, _note(commit_sha, state, result, message, prefect_url),
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

        clone_url = project_clone_url(gitlab, project, redactor=redactor)
        code = spec.code or CodeSource()
        if code.url in (None, clone_url):
            code = code.model_copy(update={"url": clone_url, "ref": commit_sha})
        spec = spec.model_copy(update={"code": code})
        if spec.build is not None:
            logger.info("building image %s if missing", spec.build.repository)
            build = build_training_image(
                context_url=clone_url, revision=commit_sha, repository=spec.build.repository,
                dockerfile=spec.build.dockerfile, context=spec.build.context, platform=platform,
                git_secret=code.credentials.secret if code.credentials else None,
                poll_initial_s=poll_initial_s, poll_max_s=poll_max_s, return_state=True)
            if not build.is_completed():
                return finish(Failed(message=build.message), f"image build failed: {build.message}", "failed")
            spec = spec.model_copy(update={"image": build.result()["image"]})

        status("running", "training on Argo")
        state = argo_training_run(spec, platform=platform, repository=project, commit=commit_sha,
                                  attempt_key=attempt, timeout_s=timeout_s, poll_initial_s=poll_initial_s,
                                  poll_max_s=poll_max_s, stop_grace_s=stop_grace_s, return_state=True)
    except BaseException as exc:
        try:
            status("failed", f"training flow error: {type(exc).__name__}")
        except Exception:  # noqa: BLE001 - report what we can; the original error matters
            pass
        raise
    result = _state_result(state)
    if state.is_completed():
        return finish(Completed(message=state.message or "training succeeded", data=result),
                      "training succeeded", "success", result)
    if state.is_cancelled():
        return finish(Cancelled(message=state.message, data=result), state.message or "cancelled", "canceled",
                      result)
    return finish(Failed(message=state.message, data=result), state.message or "training failed", "failed", result)
