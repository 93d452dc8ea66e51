"""Argo Workflows: the training spec, its rendering with hera, and the Argo Server API calls.

Three layers, as everywhere in this project:

- `TrainingSpec` (pydantic) is what an AI developer writes (``configs/training/*.yaml`` or
  ``.aiplatform/train.yaml`` in their repository). `load_training_spec` validates it and says
  which field is wrong. Credentials are *references* to Kubernetes secrets: never a value.
- `render_workflow(spec, ...)` turns the spec into an Argo ``Workflow`` with hera (pure);
  `workflow_name` makes the deterministic name that makes a retried submit idempotent;
  `parse_status` / `training_outcome` say what Argo's status means (pure).
- `@task` functions talk to the Argo Server through hera's `WorkflowsService`, each with a
  timeout, retried only for transient faults (`TRANSIENT_RETRIES`). They take the `ArgoServer`
  block and a `tasks.redact.Redactor` from the flow: what they return (workflows, logs) and the
  errors they raise are redacted, since Prefect may persist task results.

    python -m tasks.argo render configs/training/rl-prod.yaml   # print the Workflow as YAML
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from blocks.config import ConfigError, validate_document
from tasks.redact import MIN_SECRET_LEN, Redactor

ARGO_TIMEOUT_S = 30.0
"""Timeout of every call to the Argo Server (connect and read)."""

LOG_TAIL_LINES = 200
"""How many lines of each failed step's log are collected."""

LABEL_PREFIX = "ai-platform-ops"
TERMINAL_PHASES = {"Succeeded", "Failed", "Error"}


# --- the training spec ---------------------------------------------------------------------


class TrainingSpecError(ConfigError):
    """The training spec is invalid; the message lists each wrong field and what was expected."""

    document = "training spec"


_DNS_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,38}[a-z0-9])?$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")
_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,127}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SECRET_NAME_RE = re.compile(r"(?i)(token|passw(or)?d|secret|api[_-]?key|private[_-]?key|credential)")
_SECRET_VALUE_RE = re.compile(
    r"(glpat-[A-Za-z0-9_\-]{8,}|glrt-[A-Za-z0-9_\-]{8,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}"
    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|[a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@)"
)
_QUANTITY_RE = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[kMGTPE]i?|m|Ki)?$")


def _name(value: Any) -> str:
    if not isinstance(value, str) or not _DNS_RE.match(value):
        raise PydanticCustomError(
            "name", "expected a lower-case DNS label of at most 40 characters (a-z, 0-9, '-'), got {value}",
            {"value": repr(value)})
    return value


def _k8s_name(value: Any) -> str:
    if not isinstance(value, str) or not _K8S_NAME_RE.match(value):
        raise PydanticCustomError(
            "k8s_name", "expected a Kubernetes object name (lower-case a-z, 0-9, '-', '.'), got {value}",
            {"value": repr(value)})
    return value


def _quantity(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)) or not _QUANTITY_RE.match(str(value)):
        raise PydanticCustomError(
            "quantity", "expected a Kubernetes quantity such as 14, 500m, 100Gi, got {value}", {"value": repr(value)})
    return str(value)


def _scalar_str(value: Any) -> Any:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    if value is None:
        return ""
    return value


Name = Annotated[str, BeforeValidator(_name)]
K8sName = Annotated[str, BeforeValidator(_k8s_name)]
Quantity = Annotated[str, BeforeValidator(_quantity)]
ScalarStr = Annotated[str, BeforeValidator(_scalar_str)]


class _Spec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class GitCredentials(_Spec):
    """A Kubernetes secret (in the workflow's namespace) holding the Git username and password/token."""

    secret: K8sName
    username_key: str = "username"
    password_key: str = "password"


class CodeSource(_Spec):
    """The code to train, cloned by Argo's git input artifact before the training container starts."""

    url: str | None = Field(None, description="Git URL (https://, http:// or ssh); omitted: the pushed repository")
    ref: str = Field("HEAD", description="commit SHA, branch or tag")
    path: str = Field("/workspace/src", description="where the code is checked out in the container")
    credentials: GitCredentials | None = Field(None, description="Kubernetes secret with the clone credentials")
    depth: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _no_inline_credentials(cls, url: str | None) -> str | None:
        if url is None:
            return url
        if not re.match(r"^(https?://|ssh://|git@)[^\s]+$", url):
            raise PydanticCustomError("git_url", "expected a Git URL (https://, http://, ssh:// or git@host:path)")
        if re.match(r"^[a-z]+://[^/@]+@", url) and not url.startswith("ssh://"):
            raise PydanticCustomError(
                "git_url",
                "the URL carries credentials: remove them and name a Kubernetes secret in code.credentials instead")
        return url

    @field_validator("ref")
    @classmethod
    def _ref(cls, ref: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,199}$", ref) or ".." in ref:
            raise PydanticCustomError("git_ref", "expected a commit SHA, branch or tag name, got {value}",
                                      {"value": repr(ref)})
        return ref


class GPURequest(_Spec):
    """Whole GPUs (`count`), or a share of GPU memory (`memory`, HAMi's or Alibaba cGPU's resource)."""

    count: int | None = Field(None, ge=1, le=64, description="whole GPUs (nvidia.com/gpu), or HAMi vGPUs")
    memory: int | None = Field(None, ge=1, description="GPU memory: MiB for HAMi, GiB for aliyun.com/gpu-mem")
    memory_resource: Literal["nvidia.com/gpumem", "aliyun.com/gpu-mem"] = "nvidia.com/gpumem"

    @model_validator(mode="after")
    def _one_kind(self) -> GPURequest:
        if self.count is None and self.memory is None:
            raise PydanticCustomError("gpu", "expected 'count' (whole GPUs) or 'memory' (shared GPU memory)")
        if self.memory_resource == "aliyun.com/gpu-mem" and self.memory is not None and self.count is not None:
            raise PydanticCustomError(
                "gpu", "aliyun.com/gpu-mem is requested alone: drop 'count' or use nvidia.com/gpumem (HAMi)")
        return self

    def extended_resources(self) -> dict[str, str]:
        """The extended resources of the container (requests and limits are the same for GPUs)."""
        if self.memory is None:
            return {"nvidia.com/gpu": str(self.count)}
        if self.memory_resource == "aliyun.com/gpu-mem":
            return {"aliyun.com/gpu-mem": str(self.memory)}
        return {"nvidia.com/gpu": str(self.count or 1), "nvidia.com/gpumem": str(self.memory)}


class ResourceSpec(_Spec):
    cpu: Quantity
    memory: Quantity
    cpu_limit: Quantity | None = Field(None, description="defaults to the request")
    memory_limit: Quantity | None = Field(None, description="defaults to the request")
    gpu: GPURequest | None = None

    def requirements(self) -> dict[str, dict[str, str]]:
        gpu = self.gpu.extended_resources() if self.gpu else {}
        return {
            "limits": {**gpu, "cpu": self.cpu_limit or self.cpu, "memory": self.memory_limit or self.memory},
            "requests": {**gpu, "cpu": self.cpu, "memory": self.memory},
        }


class Toleration(_Spec):
    key: str | None = None
    operator: Literal["Exists", "Equal"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


class OutputArtifact(_Spec):
    name: str = Field(..., pattern=r"^[a-zA-Z0-9][a-zA-Z0-9_\-]{0,62}$")
    path: str = Field(..., pattern=r"^/")
    optional: bool = False


class SecretEnvVar(_Spec):
    """An environment variable filled from a Kubernetes secret (the value never passes through Prefect)."""

    name: str = Field(..., pattern=_ENV_NAME_RE.pattern)
    secret: K8sName
    key: str


class ExitHandler(_Spec):
    """The workflow's `onExit` template: runs after the training, whatever its outcome."""

    name: Name = "exit-handler"
    image: str | None = Field(None, description="defaults to the training image")
    command: list[str] = Field(default_factory=lambda: ["bash"])
    script: str
    pod_spec_patch: str | dict[str, Any] | None = None


class RetryPolicy(_Spec):
    """Argo retries of the training step, for infrastructure errors only (never a training failure)."""

    limit: int = Field(2, ge=0, le=10)
    policy: Literal["OnError", "OnTransientError"] = "OnError"
    backoff: str = Field("30s", pattern=r"^\d+(s|m|h)$")
    factor: int = Field(2, ge=1, le=10)


class ImageBuild(_Spec):
    """Build the training image from the pushed repository when it is not in the registry yet."""

    repository: str = Field(..., pattern=r"^[a-z0-9]+([._\-/][a-z0-9]+)*$", description="registry repository")
    dockerfile: str = Field("Dockerfile", pattern=r"^[A-Za-z0-9._/\-]+$")
    context: str = Field(".", pattern=r"^[A-Za-z0-9._/\-]+$")


PodGCStrategy = Literal["OnPodCompletion", "OnPodSuccess", "OnWorkflowCompletion", "OnWorkflowSuccess"]


class TrainingSpec(_Spec):
    """One training run on Argo: what the AI developer writes, nothing secret in it."""

    name: Name = Field(..., description="base of the workflow name (a hash of the run is appended)")
    namespace: K8sName | None = Field(None, description="defaults to the platform's Argo namespace")
    image: str | None = Field(None, description="training image; may be omitted when 'build' is given")
    image_pull_secrets: list[K8sName] = Field(default_factory=list)
    command: list[str] | None = Field(None, description="the container's command (argv), or give 'script'")
    script: str | None = Field(None, description="a script run by 'shell' (Argo script template)")
    shell: list[str] = Field(default_factory=lambda: ["bash"])
    working_dir: str | None = None
    code: CodeSource | None = None
    resources: ResourceSpec
    parameters: dict[str, ScalarStr] = Field(default_factory=dict)
    env: dict[str, ScalarStr] = Field(default_factory=dict)
    secret_env: list[SecretEnvVar] = Field(default_factory=list)
    node_selector: dict[str, str] = Field(default_factory=dict)
    tolerations: list[Toleration] = Field(default_factory=list)
    artifacts: list[OutputArtifact] = Field(default_factory=list)
    active_deadline_seconds: int | None = Field(None, ge=1)
    pod_gc: PodGCStrategy | None = "OnPodCompletion"
    parallelism: int | None = Field(None, ge=1)
    exit_handler: ExitHandler | None = None
    retry: RetryPolicy | None = RetryPolicy()
    pod_spec_patch: str | dict[str, Any] | None = None
    service_account: K8sName | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    build: ImageBuild | None = None

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if (self.command is None) == (self.script is None):
            raise PydanticCustomError("spec", "expected exactly one of 'command' (argv list) or 'script'")
        if self.image is None and self.build is None:
            raise PydanticCustomError("spec", "expected 'image' (or 'build' to build it from the repository)")
        return self

    @field_validator("parameters", "env")
    @classmethod
    def _no_secrets(cls, values: dict[str, str], info) -> dict[str, str]:
        for key, value in values.items():
            if not _PARAM_NAME_RE.match(key) or (info.field_name == "env" and not _ENV_NAME_RE.match(key)):
                raise PydanticCustomError("param", "{key!r} is not a valid name", {"key": key})
            if _SECRET_NAME_RE.search(key):
                raise PydanticCustomError(
                    "secret_param",
                    "{key!r} looks like a credential: workflow parameters are visible to anyone who can read the "
                    "workflow; reference a Kubernetes secret in 'secret_env' or 'code.credentials' instead",
                    {"key": key})
            if _SECRET_VALUE_RE.search(value):
                raise PydanticCustomError(
                    "secret_param",
                    "the value of {key!r} looks like a token or a URL with credentials: reference a Kubernetes "
                    "secret in 'secret_env' or 'code.credentials' instead", {"key": key})
        return values

    @field_validator("labels")
    @classmethod
    def _labels(cls, labels: dict[str, str]) -> dict[str, str]:
        for key, value in labels.items():
            if not re.match(r"^([a-z0-9.\-]{1,253}/)?[A-Za-z0-9]([A-Za-z0-9._\-]{0,61}[A-Za-z0-9])?$", key) or \
                    not re.match(r"^([A-Za-z0-9]([A-Za-z0-9._\-]{0,61}[A-Za-z0-9])?)?$", value):
                raise PydanticCustomError("label", "{key}={value} is not a valid Kubernetes label",
                                          {"key": key, "value": value})
        return labels


def parse_training_spec(data: Any, source: str = "<spec>") -> TrainingSpec:
    """Validate a training spec (already parsed YAML). Raises `TrainingSpecError` naming each wrong field."""
    return validate_document(TrainingSpec, data, source, TrainingSpecError)


def load_training_spec(text: str, source: str = "<spec>") -> TrainingSpec:
    """Parse and validate a training spec from YAML text."""
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise TrainingSpecError(source, [f"(file): not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) \
            from None
    return parse_training_spec(data, source)


def load_training_spec_file(path: str | Path) -> TrainingSpec:
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise TrainingSpecError(str(p), [f"(file): cannot read it: {exc.strerror}"]) from None
    return load_training_spec(text, str(p))


# --- rendering (pure) ----------------------------------------------------------------------


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


def _patch_text(patch: str | dict[str, Any] | None) -> str | None:
    if patch is None or isinstance(patch, str):
        return patch
    return json.dumps(patch, sort_keys=False)


def _secret_selector(name: str, key: str):
    from hera.workflows.models import SecretKeySelector

    return SecretKeySelector(name=name, key=key)


def render_workflow(spec: TrainingSpec, *, name: str | None = None, namespace: str | None = None,
                    labels: dict[str, str] | None = None, annotations: dict[str, str] | None = None
                    ) -> dict[str, Any]:
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
    from hera.workflows.models import Backoff, PodGC, ResourceRequirements, RetryStrategy
    from hera.workflows.models import Toleration as ModelToleration

    image = spec.image
    if not image:
        raise TrainingSpecError("<render>", ["image: no image given and none was built"])
    train_name = f"run-{spec.name}"
    exit_name = spec.exit_handler.name if spec.exit_handler else None
    tolerations = [ModelToleration(key=t.key, operator=t.operator, value=t.value, effect=t.effect,
                                   toleration_seconds=t.toleration_seconds) for t in spec.tolerations] or None
    env = [Env(name=k, value=v) for k, v in spec.env.items()]
    env += [SecretEnv(name=e.name, secret_name=e.secret, secret_key=e.key) for e in spec.secret_env]
    inputs = []
    if spec.code:
        c = spec.code
        if not c.url:
            raise TrainingSpecError("<render>", ["code.url: no repository URL given (train_on_push fills it in)"])
        inputs.append(GitArtifact(
            name="code", path=c.path, repo=c.url, revision=c.ref, depth=c.depth,
            username_secret=_secret_selector(c.credentials.secret, c.credentials.username_key)
            if c.credentials else None,
            password_secret=_secret_selector(c.credentials.secret, c.credentials.password_key)
            if c.credentials else None,
        ))
    outputs = [Artifact(name=a.name, path=a.path, optional=a.optional or None) for a in spec.artifacts]
    retry = None
    if spec.retry and spec.retry.limit > 0:
        retry = RetryStrategy(limit=str(spec.retry.limit), retry_policy=spec.retry.policy,
                              backoff=Backoff(duration=spec.retry.backoff, factor=str(spec.retry.factor)))
    common = dict(
        name=train_name, image=image, resources=ResourceRequirements(**spec.resources.requirements()),
        env=env or None, inputs=inputs or None, outputs=outputs or None, working_dir=spec.working_dir,
        pod_spec_patch=_patch_text(spec.pod_spec_patch), retry_strategy=retry,
    )
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
        pod_gc=PodGC(strategy=spec.pod_gc) if spec.pod_gc else None,
        node_selector=dict(spec.node_selector) or None,
        tolerations=tolerations,
        service_account_name=spec.service_account,
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
    manifest = wf.to_dict()
    # Argo's script templates carry `name: ""` for the container (as `argo get -o yaml` shows);
    # hera leaves it out, which is equivalent.
    return manifest


def workflow_parameters(manifest: dict[str, Any]) -> dict[str, str]:
    return {p["name"]: p.get("value", "") for p in manifest.get("spec", {}).get("arguments", {}).get("parameters", [])}


def secrets_in(manifest: dict[str, Any], secrets: tuple[str, ...] | list[str]) -> list[str]:
    """Which of `secrets` (values) appear anywhere in the manifest, described without the value."""
    text = json.dumps(manifest)
    found = [f"secret #{i + 1}" for i, s in enumerate(secrets) if s and len(s) >= MIN_SECRET_LEN and s in text]
    for pname, value in workflow_parameters(manifest).items():
        if _SECRET_NAME_RE.search(pname) or _SECRET_VALUE_RE.search(value or ""):
            found.append(f"parameter {pname}")
    return found


# --- what Argo's status means (pure) -------------------------------------------------------


@dataclass
class FailedStep:
    name: str
    message: str
    pod: str | None


@dataclass
class WorkflowStatus:
    name: str
    namespace: str
    phase: str
    message: str = ""
    steps_done: int = 0
    steps_total: int = 0
    shutdown: str | None = None
    failed_steps: list[FailedStep] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def percent(self) -> float:
        if self.phase == "Succeeded":
            return 100.0
        return round(100.0 * self.steps_done / self.steps_total, 1) if self.steps_total else 0.0


def pod_name(workflow: str, node: dict[str, Any]) -> str | None:
    """The pod of a Pod node, as Argo names it (POD_NAMES=v2: <workflow>-<template>-<hash of node id>)."""
    if node.get("type") != "Pod":
        return None
    node_id = node.get("id", "")
    template = node.get("templateName")
    if not template or not node_id.startswith(workflow + "-"):
        return node_id or None
    return f"{workflow}-{template}-{node_id.rsplit('-', 1)[-1]}"


def parse_status(wf: dict[str, Any]) -> WorkflowStatus:
    """A workflow's phase, message, progress and failed steps, from the Argo API's JSON."""
    meta = wf.get("metadata") or {}
    status = wf.get("status") or {}
    name = meta.get("name", "")
    nodes = status.get("nodes") or {}
    pods = [n for n in nodes.values() if n.get("type") == "Pod"]
    done, total = 0, 0
    progress = status.get("progress") or ""
    if re.match(r"^\d+/\d+$", progress):
        done, total = (int(x) for x in progress.split("/"))
    elif pods:
        total = len(pods)
        done = sum(1 for n in pods if n.get("phase") in TERMINAL_PHASES | {"Skipped", "Omitted"})
    failed = [
        FailedStep(name=n.get("displayName") or n.get("name", key), message=n.get("message", ""),
                   pod=pod_name(name, n))
        for key, n in nodes.items() if n.get("type") == "Pod" and n.get("phase") in ("Failed", "Error")
    ]
    return WorkflowStatus(
        name=name, namespace=meta.get("namespace", ""), phase=status.get("phase") or "Pending",
        message=status.get("message") or "", steps_done=done, steps_total=total,
        shutdown=(wf.get("spec") or {}).get("shutdown"), failed_steps=failed,
    )


@dataclass
class Outcome:
    """What a finished (or abandoned) workflow means for the Prefect run."""

    state: Literal["Completed", "Failed", "Cancelled"]
    message: str


def training_outcome(st: WorkflowStatus, *, cancelled: bool = False, timed_out_s: float | None = None) -> Outcome:
    """Map Argo's final phase to a Prefect state: Succeeded -> Completed; Failed/Error -> Failed with Argo's
    message; a workflow stopped or terminated in Argo (not by this run) -> Cancelled."""
    where = f"Argo workflow {st.namespace}/{st.name}"
    argo_msg = f" ({st.phase}: {st.message})" if st.message else f" ({st.phase})"
    if timed_out_s is not None:
        return Outcome("Failed", f"{where} timed out after {timed_out_s:.0f}s and was terminated{argo_msg}")
    if cancelled:
        return Outcome("Cancelled", f"cancelled in Prefect; {where} was stopped{argo_msg}")
    if st.phase == "Succeeded":
        return Outcome("Completed", f"{where} succeeded")
    if st.phase in ("Failed", "Error"):
        if st.shutdown or st.message.startswith("Stopped with strategy"):
            return Outcome("Cancelled", f"{where} was stopped in Argo{argo_msg}")
        return Outcome("Failed", f"{where} {st.phase.lower()}: {st.message or 'no message from Argo'}")
    return Outcome("Failed", f"{where} is still {st.phase}; gave up following it")



def parse_log_stream(body: str) -> list[tuple[str, str]]:
    """Argo's log endpoint answers one JSON object per line: ``{"result": {"content", "podName"}}``."""
    out = []
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            result = json.loads(line).get("result") or {}
        except (ValueError, AttributeError):
            continue
        out.append((result.get("podName", ""), result.get("content", "")))
    return out


# --- the Argo Server API (tasks) -----------------------------------------------------------


class ArgoAPIError(RuntimeError):
    """The Argo Server answered with an error. `status_code` drives the retry policy (5xx/429 only)."""

    def __init__(self, status_code: int | None, message: str):
        self.status_code = status_code
        super().__init__(message)


def _timeout_session():
    import requests

    class _Session(requests.Session):
        def request(self, method, url=None, **kwargs):  # every call gets a timeout
            kwargs.setdefault("timeout", ARGO_TIMEOUT_S)
            return super().request(method, url, **kwargs)

    session = _Session()
    session.trust_env = False  # no proxies from the environment: the Argo URL is the one configured
    return session


def workflows_service(argo):
    """hera's `WorkflowsService` for an `ArgoServer` block, with a timeout on every request."""
    from hera.workflows import WorkflowsService

    return WorkflowsService(
        host=argo.url.rstrip("/") + "/", namespace=argo.namespace, verify_ssl=argo.verify_tls,
        token=argo.token.get_secret_value() if argo.token else None, session=_timeout_session(),
    )


def _argo_call(redactor: Redactor, fn, *args, **kwargs):
    """Call the Argo Server; its error answers become `ArgoAPIError` with the message redacted."""
    from hera.exceptions import HeraException

    try:
        return fn(*args, **kwargs)
    except HeraException as exc:
        status = getattr(exc, "status_code", None)
        if status is None:
            m = re.search(r"status code (\d{3})", str(exc))
            status = int(m.group(1)) if m else None
        raise ArgoAPIError(status, redactor.text(f"Argo API: {exc}")) from None


def _as_dict(wf, redactor: Redactor) -> dict[str, Any]:
    """A hera Workflow model as the API's JSON, redacted (a task result may be persisted)."""
    return redactor.value(wf.model_dump(by_alias=True, exclude_none=True, mode="json"))


def argo_ui_link(argo, namespace: str, name: str) -> str:
    return f"{argo.url.rstrip('/')}/workflows/{namespace}/{name}"


def create_or_adopt_workflow(argo, namespace: str, manifest: dict[str, Any], *,
                             redactor: Redactor) -> tuple[dict[str, Any], bool]:
    """Create the workflow; on 409 AlreadyExists adopt the existing one. Returns (workflow, adopted)."""
    from hera.workflows.models import Workflow as ModelWorkflow
    from hera.workflows.models import WorkflowCreateRequest

    with workflows_service(argo) as svc:
        req = WorkflowCreateRequest(namespace=namespace, workflow=ModelWorkflow.model_validate(manifest))
        try:
            return _as_dict(_argo_call(redactor, svc.create_workflow, req, namespace=namespace), redactor), False
        except ArgoAPIError as exc:
            if exc.status_code != 409:
                raise
        existing = _argo_call(redactor, svc.get_workflow, manifest["metadata"]["name"], namespace=namespace)
        return _as_dict(existing, redactor), True


def read_workflow(argo, namespace: str, name: str, *, redactor: Redactor) -> dict[str, Any]:
    with workflows_service(argo) as svc:
        return _as_dict(_argo_call(redactor, svc.get_workflow, name, namespace=namespace), redactor)


def shutdown_workflow(argo, namespace: str, name: str, strategy: Literal["stop", "terminate"],
                      message: str | None = None, *, redactor: Redactor) -> dict[str, Any]:
    """Stop (exit handlers run) or terminate (they do not) a workflow. A finished one is left as it is."""
    from hera.workflows.models import WorkflowStopRequest, WorkflowTerminateRequest

    with workflows_service(argo) as svc:
        current = _argo_call(redactor, svc.get_workflow, name, namespace=namespace)
        if current.status and current.status.phase in TERMINAL_PHASES:
            return _as_dict(current, redactor)
        try:
            if strategy == "stop":
                wf = _argo_call(redactor, svc.stop_workflow, name,
                                WorkflowStopRequest(name=name, namespace=namespace, message=message),
                                namespace=namespace)
            else:
                wf = _argo_call(redactor, svc.terminate_workflow, name,
                                WorkflowTerminateRequest(name=name, namespace=namespace), namespace=namespace)
        except ArgoAPIError as exc:  # it finished between the read and the shutdown
            if exc.status_code not in (400, 409):
                raise
            wf = _argo_call(redactor, svc.get_workflow, name, namespace=namespace)
            if not (wf.status and wf.status.phase in TERMINAL_PHASES):
                raise
        return _as_dict(wf, redactor)


def read_pod_logs(argo, namespace: str, name: str, pod: str, *, redactor: Redactor) -> str:
    """The last `LOG_TAIL_LINES` lines of one pod's main container, redacted, through the Argo Server.

    hera's `workflow_logs` parses the answer as one JSON object, but Argo streams one object per
    line; so this uses the service's session (same token, same timeout) and parses the stream.
    """
    svc = workflows_service(argo)
    try:
        resp = svc.session.get(
            f"{svc.host}api/v1/workflows/{namespace}/{name}/log",
            params={"podName": pod, "logOptions.container": "main", "logOptions.tailLines": str(LOG_TAIL_LINES)},
            headers={"Authorization": svc.token} if svc.token else {}, verify=svc.verify_ssl,
        )
    finally:
        svc.close()
    if not resp.ok:
        raise ArgoAPIError(resp.status_code, redactor.text(f"Argo API: logs of {pod}: HTTP {resp.status_code}"))
    return redactor.text("\n".join(content for _, content in parse_log_stream(resp.text)))


def _tasks():
    """The @task wrappers of the API calls above (the plain functions stay callable, e.g. from hooks)."""
    from prefect import task
    from prefect.cache_policies import NONE

    from tasks._retry import TRANSIENT_RETRIES

    opts = dict(TRANSIENT_RETRIES, cache_policy=NONE)
    return (
        task(name="submit-argo-workflow", **opts)(create_or_adopt_workflow),
        task(name="get-argo-workflow", **opts)(read_workflow),
        task(name="shutdown-argo-workflow", **opts)(shutdown_workflow),
        task(name="get-argo-pod-logs", **opts)(read_pod_logs),
    )


submit_workflow, get_workflow, stop_or_terminate_workflow, get_pod_logs = _tasks()


# --- CLI -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.argo", description="Render a training spec with hera.")
    sub = parser.add_subparsers(dest="command", required=True)
    render = sub.add_parser("render", help="print the Argo Workflow of a training spec as YAML")
    render.add_argument("spec", type=Path, help="training spec YAML (configs/training/*.yaml)")
    render.add_argument("--repository", default="", help="repository path; with --commit, names the run")
    render.add_argument("--commit", default="", help="commit SHA; with --repository, names the run")
    render.add_argument("--attempt", default="", help="attempt key (a new key starts a new workflow)")
    render.add_argument("--namespace", default=None)
    args = parser.parse_args(argv)
    try:
        spec = load_training_spec_file(args.spec)
        name = workflow_name(spec, args.repository, args.commit, args.attempt) if args.commit else spec.name
        manifest = render_workflow(spec, name=name, namespace=args.namespace)
    except TrainingSpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(yaml.safe_dump(manifest, sort_keys=False, width=120), end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
