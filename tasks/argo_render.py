"""Rendering a training spec as an Argo Workflow with hera (pure), and the run's deterministic name.

    python -m tasks.argo_render configs/training/rl-prod.yaml   # print the Workflow as YAML

- `workflow_name(spec, repository, commit, attempt)`: same (repository, commit, spec, attempt) ->
  same name, which is what makes a retried submit (or a second pipeline for one push) adopt the
  workflow the first one started instead of training twice;
- `render_workflow(spec, ..., logs=LogRetention(...))`: the Workflow as a plain dict. How failed
  steps' logs survive `podGC` is part of the rendering: `archiveLogs` (Argo saves each container's
  log as the artifact ``main-logs`` in the artifact repository, docs/configure-archive-logs.md),
  or, where the platform has no artifact repository, `podGC.deleteDelayDuration` so a deleted-on-
  completion pod lives long enough for the flow to read its log;
- `secrets_in(manifest, secrets)`: which secret values (or credential-shaped parameters) a
  manifest would expose.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tasks.redact import MIN_SECRET_LEN
from tasks.training_spec import (
    SECRET_NAME_RE,
    SECRET_VALUE_RE,
    TrainingSpec,
    TrainingSpecError,
    load_training_spec_file,
)

LABEL_PREFIX = "ai-platform-ops"


@dataclass(frozen=True)
class LogRetention:
    """How the logs of finished steps outlive their pods (from the platform config's `argo` section).

    `archive`: the workflow sets `archiveLogs: true` (needs an artifact repository). `keep_pods_for`:
    without archiving, pods that `podGC` deletes on completion are kept this long (Argo's
    `podGC.deleteDelayDuration`, a Go duration such as ``5m``) so their logs can be read."""

    archive: bool = False
    keep_pods_for: str | None = "5m"


def spec_digest(spec: TrainingSpec) -> str:
    return hashlib.sha256(json.dumps(spec.model_dump(mode="json"), sort_keys=True).encode()).hexdigest()


def workflow_name(spec: TrainingSpec, repository: str = "", commit: str = "", attempt_key: str = "") -> str:
    """The deterministic workflow name of one run: same (repository, commit, spec, attempt) -> same name.

    Submitting twice under one name is what makes a retried submit safe: the second create
    answers 409 AlreadyExists and the run adopts the workflow the first one started.
    """
    key = json.dumps({"repository": repository, "commit": commit, "spec": spec_digest(spec),
                      "attempt": str(attempt_key)}, sort_keys=True)
    return f"{spec.name}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def label_value(value: str) -> str:
    """`value` made a valid label value (at most 63 of [A-Za-z0-9._-], alphanumeric at both ends)."""
    clean = re.sub(r"[^A-Za-z0-9._\-]+", "_", value)[:63]
    return clean.strip("._-")


def run_metadata(spec: TrainingSpec, repository: str, commit: str, attempt_key: str,
                 flow_run_id: str | None = None) -> tuple[dict[str, str], dict[str, str]]:
    """The labels (selectable) and annotations (exact) that tie a workflow to its push and Prefect run."""
    labels = {f"{LABEL_PREFIX}/training": spec.name}
    if repository:
        labels[f"{LABEL_PREFIX}/repository"] = label_value(repository)
    if commit:
        labels[f"{LABEL_PREFIX}/commit"] = label_value(commit)
    annotations = {f"{LABEL_PREFIX}/repository": repository, f"{LABEL_PREFIX}/commit": commit,
                   f"{LABEL_PREFIX}/attempt": str(attempt_key)}
    if flow_run_id:
        annotations[f"{LABEL_PREFIX}/prefect-flow-run"] = flow_run_id
    return labels, {k: v for k, v in annotations.items() if v}


def _patch_text(patch: str | dict[str, Any] | None) -> str | None:
    if patch is None or isinstance(patch, str):
        return patch
    return json.dumps(patch, sort_keys=False)


def _secret_selector(name: str, key: str):
    from hera.workflows.models import SecretKeySelector

    return SecretKeySelector(name=name, key=key)


def _volumes(spec: TrainingSpec) -> tuple[list, list]:
    """(pod volumes, container mounts): dataset volumes and /dev/shm."""
    from hera.workflows.models import (
        EmptyDirVolumeSource,
        NFSVolumeSource,
        PersistentVolumeClaimVolumeSource,
        Volume,
        VolumeMount,
    )

    volumes, mounts = [], []
    for v in spec.volumes:
        if v.claim:
            volumes.append(Volume(name=v.name, persistent_volume_claim=PersistentVolumeClaimVolumeSource(
                claim_name=v.claim, read_only=v.read_only or None)))
        else:
            volumes.append(Volume(name=v.name, nfs=NFSVolumeSource(server=v.nfs_server, path=v.nfs_path,
                                                                    read_only=v.read_only or None)))
        mounts.append(VolumeMount(name=v.name, mount_path=v.mount_path, read_only=v.read_only or None,
                                  sub_path=v.sub_path))
    if spec.resources.shm_size:
        # PyTorch's DataLoader workers share tensors through /dev/shm; a container gets 64Mi by default
        volumes.append(Volume(name="dshm", empty_dir=EmptyDirVolumeSource(medium="Memory",
                                                                          size_limit=spec.resources.shm_size)))
        mounts.append(VolumeMount(name="dshm", mount_path="/dev/shm"))
    return volumes, mounts


def render_workflow(spec: TrainingSpec, *, name: str | None = None, namespace: str | None = None,
                    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None,
                    logs: LogRetention | None = None) -> dict[str, Any]:
    """The Argo Workflow of `spec`, built with hera, as a plain dict (apiVersion, kind, metadata, spec)."""
    from hera.workflows import (
        Artifact,
        Container,
        Env,
        GitArtifact,
        Parameter,
        Script,
        SecretEnv,
        Steps,
        Workflow,
    )
    from hera.workflows.models import (
        Backoff,
        PodGC,
        ResourceRequirements,
        RetryStrategy,
    )
    from hera.workflows.models import Toleration as ModelToleration

    image = spec.image
    if not image:
        raise TrainingSpecError("<render>", ["image: no image given and none was built"])
    train_name = f"run-{spec.name}"
    exit_name = spec.exit_handler.name if spec.exit_handler else None
    tolerations = [ModelToleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                   toleration_seconds=t.toleration_seconds) for t in spec.tolerations] or None
    env = [Env(name=k, value=v) for k, v in spec.env.items()]
    inputs = []
    for c in spec.code:
        if not c.url:
            problem = f"code[{c.name}].url: no repository URL given (train_on_push fills in the pushed repository)"
            raise TrainingSpecError("<render>", [problem])
        inputs.append(GitArtifact(
            name=c.name, path=c.path, repo=c.url, revision=c.ref, depth=c.depth,
            username_secret=_secret_selector(c.credentials.secret, c.credentials.username_key)
            if c.credentials else None,
            password_secret=_secret_selector(c.credentials.secret, c.credentials.password_key)
            if c.credentials else None,
        ))
        # what the training checks out, for its own logs: the code is the git artifact's, never an echo
        env += [Env(name=f"{c.env_prefix}_URL", value=c.url), Env(name=f"{c.env_prefix}_REVISION", value=c.ref)]
    env += [SecretEnv(name=e.name, secret_name=e.secret, secret_key=e.key) for e in spec.secret_env]
    outputs = [Artifact(name=a.name, path=a.path, optional=a.optional or None) for a in spec.artifacts]
    retry = None
    if spec.retry and spec.retry.limit > 0:
        retry = RetryStrategy(limit=str(spec.retry.limit), retry_policy=spec.retry.policy,
                              backoff=Backoff(duration=spec.retry.backoff, factor=str(spec.retry.factor)))
    volumes, mounts = _volumes(spec)
    common = dict(
        name=train_name, image=image, resources=ResourceRequirements(**spec.resources.requirements()),
        env=env or None, inputs=inputs or None, outputs=outputs or None, working_dir=spec.working_dir,
        pod_spec_patch=_patch_text(spec.pod_spec_patch), retry_strategy=retry, volume_mounts=mounts or None,
    )
    pod_gc = None
    if spec.pod_gc:
        # Only strategies that delete a failed pod need the delay (OnPodSuccess keeps failed pods, and
        # OnWorkflowSuccess keeps them all when the workflow fails): workflow/controller/pod/cleanup.go.
        deletes_failed = spec.pod_gc in ("OnPodCompletion", "OnWorkflowCompletion")
        delay = logs.keep_pods_for if logs and not logs.archive and deletes_failed else None
        pod_gc = PodGC(strategy=spec.pod_gc, delete_delay_duration=delay)
    all_labels = {**spec.labels, **(labels or {})}
    with Workflow(
        api_version="argoproj.io/v1alpha1",
        kind="Workflow",
        name=name or spec.name,
        namespace=namespace or spec.namespace,
        labels=all_labels or None,
        annotations=annotations or None,
        entrypoint="main",
        on_exit=exit_name,
        arguments=[Parameter(name=k, value=v) for k, v in spec.parameters.items()] or None,
        parallelism=spec.parallelism,
        image_pull_secrets=list(spec.image_pull_secrets) or None,
        active_deadline_seconds=spec.active_deadline_seconds,
        pod_gc=pod_gc,
        archive_logs=True if logs and logs.archive else None,
        node_selector=dict(spec.node_selector) or None,
        tolerations=tolerations,
        service_account_name=spec.service_account,
        volumes=volumes or None,
    ) as wf:
        if spec.script is not None:
            train = Script(command=list(spec.shell), source=spec.script, **common)
        else:
            train = Container(command=list(spec.command or []), **common)
        if spec.exit_handler:
            h = spec.exit_handler
            Script(name=h.name, image=h.image or image, command=list(h.command), source=h.script,
                   pod_spec_patch=_patch_text(h.pod_spec_patch))
        with Steps(name="main"):
            train(name=train_name)
    # Argo's script templates carry `name: ""` for the container (as `argo get -o yaml` shows);
    # hera leaves it out, which is equivalent.
    return wf.to_dict()


def workflow_parameters(manifest: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p.get("value", "") for p in manifest.get("spec", {}).get("arguments", {}).get("parameters", [])}


def secrets_in(manifest: dict[str, Any], secrets: tuple[str, ...] | list[str]) -> list[str]:
    """Which of `secrets` (values) appear anywhere in the manifest, described without the value."""
    text = json.dumps(manifest)
    found = [f"secret #{i + 1}" for i, s in enumerate(secrets) if s and len(s) >= MIN_SECRET_LEN and s in text]
    for pname, value in workflow_parameters(manifest).items():
        if SECRET_NAME_RE.search(pname) or SECRET_VALUE_RE.search(value or ""):
            found.append(f"parameter {pname}")
    return found


# --- CLI -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.argo_render",
                                     description="Print the Argo Workflow of a training spec as YAML (hera).")
    parser.add_argument("spec", type=Path, help="training spec YAML (configs/training/*.yaml)")
    parser.add_argument("--repository", default="", help="repository path; with --commit, names the run")
    parser.add_argument("--commit", default="", help="commit SHA; with --repository, names the run")
    parser.add_argument("--attempt", default="", help="attempt key (a new key starts a new workflow)")
    parser.add_argument("--namespace", default=None)
    parser.add_argument("--archive-logs", action="store_true", help="render archiveLogs: true")
    args = parser.parse_args(argv)
    try:
        spec = load_training_spec_file(args.spec)
        name = workflow_name(spec, args.repository, args.commit, args.attempt) if args.commit else spec.name
        logs = LogRetention(archive=True) if args.archive_logs else None
        manifest = render_workflow(spec, name=name, namespace=args.namespace, logs=logs)
    except TrainingSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(manifest, sort_keys=False, width=120), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
