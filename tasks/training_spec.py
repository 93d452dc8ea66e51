"""The training spec: what an AI developer writes, validated; pure, no Prefect, no network.

`TrainingSpec` (pydantic) is read from ``configs/training/*.yaml`` or ``.aiplatform/train.yaml`` in
the developer's repository. `load_training_spec` validates it and says which field is wrong and
what is wrong with its value, never echoing a value that looks like a secret. Credentials are
*references* to Kubernetes secrets, never values.

Three pure functions prepare a spec for one run:

- `pin_to_push(spec, project, clone_url, sha)`: the pushed repository is cloned at the pushed
  commit, whatever `ref` the spec names (other repositories keep their own URL and ref);
- `resource_problems(spec, allowed)`: the extended resources (GPUs, MIG profiles, HAMi cores, other
  vendors' devices) the platform config allows (`argo.allowed_resources`);
- `build_spec(image, ...)`: the spec of a rootless BuildKit build that pushes an image.

`as_text(value)` reads a flow parameter that should be a string (a number may have lost its text).

`tasks.argo_render` turns a spec into an Argo Workflow; `tasks.argo` talks to the Argo Server.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from blocks.config import ConfigError, validate_document


class TrainingSpecError(ConfigError):
    """The training spec is invalid; the message lists each wrong field and what was expected."""

    document = "training spec"


_DNS_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,38}[a-z0-9])?$")
_K8S_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9.\-]{0,251}[a-z0-9])?$")
_PARAM_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]{0,127}$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SECRET_NAME_RE = re.compile(r"(?i)(token|passw(or)?d|secret|api[_-]?key|private[_-]?key|credential)")
SECRET_VALUE_RE = re.compile(
    r"(glpat-[A-Za-z0-9_\-]{8,}|glrt-[A-Za-z0-9_\-]{8,}|gh[pousr]_[A-Za-z0-9]{16,}|github_pat_[A-Za-z0-9_]{16,}"
    r"|AKIA[0-9A-Z]{16}|-----BEGIN [A-Z ]*PRIVATE KEY-----|[a-z][a-z0-9+.\-]*://[^/\s:@]+:[^/\s@]+@)"
)
_QUANTITY_RE = re.compile(r"^[+]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[kMGTPE]i?|m|Ki)?$")
# An extended resource name: a domain prefix and a name (Kubernetes "Extended resources").
_RESOURCE_RE = re.compile(r"^([a-z0-9]([a-z0-9\-]*[a-z0-9])?\.)+[a-z]{2,}/[A-Za-z0-9]([A-Za-z0-9._\-]*[A-Za-z0-9])?$")
_GIT_URL_RE = re.compile(r"^(https?://|ssh://|git@)[^\s]+$")
_URL_PASSWORD_RE = re.compile(r"^[a-z][a-z0-9+.\-]*://[^/@\s]*:[^/@\s]*@")  # scheme://user:password@
_URL_USER_RE = re.compile(r"^(https?)://[^/@\s]+@")  # https://user@ (a token as the user name)


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
    """A repository cloned by Argo's git input artifact before the training container starts.

    Without `url` it is the pushed repository (`pin_to_push` fills in its URL and the pushed commit);
    a `url` whose path is the pushed project's path is the pushed repository too. Without
    `credentials` the repository is cloned anonymously (a public repository)."""

    name: str = Field("code", pattern=r"^[a-z][a-z0-9\-]{0,30}$",
                      description="the artifact's name; the container gets <NAME>_URL and <NAME>_REVISION")
    url: str | None = Field(None, description="Git URL (https://, http://, ssh:// or git@); omitted: the pushed "
                                              "repository")
    ref: str = Field("HEAD", description="commit SHA, branch or tag (the pushed repository: always the pushed commit)")
    path: str = Field("/workspace/src", pattern=r"^/", description="where the code is checked out in the container")
    credentials: GitCredentials | None = Field(None, description="Kubernetes secret with the clone credentials")
    depth: int | None = Field(None, ge=1)

    @field_validator("url")
    @classmethod
    def _no_inline_credentials(cls, url: str | None) -> str | None:
        if url is None:
            return url
        if _URL_PASSWORD_RE.match(url) or _URL_USER_RE.match(url):
            # checked first, and the URL is never echoed: it carries a credential
            raise PydanticCustomError(
                "git_url",
                "the URL carries credentials (user:password@ or a token as the user name): remove them and name a "
                "Kubernetes secret in code.credentials instead")
        if not _GIT_URL_RE.match(url):
            raise PydanticCustomError("git_url", "expected a Git URL (https://, http://, ssh:// or git@host:path), "
                                                 "got {value}", {"value": repr(url)})
        return url

    @field_validator("ref")
    @classmethod
    def _ref(cls, ref: str) -> str:
        if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._/\-]{0,199}$", ref) or ".." in ref:
            raise PydanticCustomError("git_ref", "expected a commit SHA, branch or tag name, got {value}",
                                      {"value": repr(ref)})
        return ref

    @property
    def env_prefix(self) -> str:
        return self.name.upper().replace("-", "_")


class GPURequest(_Spec):
    """Whole GPUs (`count`), or a share of GPU memory (`memory`, HAMi's or Alibaba cGPU's resource)."""

    count: int | None = Field(None, ge=1, le=64, description="whole GPUs (nvidia.com/gpu), or HAMi vGPUs")
    memory: int | None = Field(None, ge=1, description="GPU memory: MiB for HAMi, GiB for aliyun.com/gpu-mem")
    memory_resource: Literal["nvidia.com/gpumem", "aliyun.com/gpu-mem"] = "nvidia.com/gpumem"
    cores: int | None = Field(None, ge=1, le=100, description="HAMi: share of the GPU's cores in percent "
                                                              "(nvidia.com/gpucores)")

    @model_validator(mode="after")
    def _one_kind(self) -> GPURequest:
        if self.count is None and self.memory is None:
            raise PydanticCustomError("gpu", "expected 'count' (whole GPUs) or 'memory' (shared GPU memory)")
        if self.memory_resource == "aliyun.com/gpu-mem" and (self.count is not None or self.cores is not None):
            raise PydanticCustomError(
                "gpu", "aliyun.com/gpu-mem is requested alone: drop 'count'/'cores' or use nvidia.com/gpumem (HAMi)")
        return self

    def extended_resources(self) -> dict[str, str]:
        """The extended resources of the container (requests and limits are the same for GPUs)."""
        if self.memory_resource == "aliyun.com/gpu-mem" and self.memory is not None:
            return {"aliyun.com/gpu-mem": str(self.memory)}
        out = {"nvidia.com/gpu": str(self.count or 1)}
        if self.memory is not None:
            out["nvidia.com/gpumem"] = str(self.memory)
        if self.cores is not None:
            out["nvidia.com/gpucores"] = str(self.cores)
        return out


def _extended(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    out = {}
    for key, qty in value.items():
        if not isinstance(key, str) or not _RESOURCE_RE.match(key):
            raise PydanticCustomError(
                "resource_name", "{key} is not an extended resource name: expected <domain>/<name> such as "
                "nvidia.com/mig-1g.10gb, nvidia.com/gpucores or amd.com/gpu", {"key": repr(key)})
        if isinstance(qty, bool) or not (isinstance(qty, int) or (isinstance(qty, str) and qty.isdigit())) \
                or int(qty) < 1:
            raise PydanticCustomError(
                "resource_quantity", "{key}: expected a whole number >= 1 (extended resources are not "
                "overcommitted or split), got {value}", {"key": key, "value": repr(qty)})
        out[key] = str(int(qty))
    return out


class ResourceSpec(_Spec):
    cpu: Quantity
    memory: Quantity
    cpu_limit: Quantity | None = Field(None, description="defaults to the request")
    memory_limit: Quantity | None = Field(None, description="defaults to the request")
    gpu: GPURequest | None = None
    extended: Annotated[dict[str, str], BeforeValidator(_extended)] = Field(
        default_factory=dict, description="other extended resources: MIG profiles (nvidia.com/mig-1g.10gb), "
                                          "HAMi cores, other vendors' GPUs (amd.com/gpu); checked against the "
                                          "platform's argo.allowed_resources")
    shm_size: Quantity | None = Field(None, description="size of /dev/shm (an in-memory emptyDir), e.g. 16Gi")

    @model_validator(mode="after")
    def _no_twice(self) -> ResourceSpec:
        twice = sorted(set(self.gpu.extended_resources() if self.gpu else {}) & set(self.extended))
        if twice:
            raise PydanticCustomError("resource_twice", "{names} requested both in 'gpu' and in 'extended': "
                                                        "keep one", {"names": ", ".join(twice)})
        return self

    def extended_resources(self) -> dict[str, str]:
        return {**(self.gpu.extended_resources() if self.gpu else {}), **self.extended}

    def requirements(self) -> dict[str, dict[str, str]]:
        ext = self.extended_resources()
        return {
            "limits": {**ext, "cpu": self.cpu_limit or self.cpu, "memory": self.memory_limit or self.memory},
            "requests": {**ext, "cpu": self.cpu, "memory": self.memory},
        }


class VolumeSpec(_Spec):
    """A dataset (or any shared data) volume: an existing PersistentVolumeClaim or an NFS export."""

    name: Name
    mount_path: str = Field(..., pattern=r"^/[^\s]*$")
    claim: K8sName | None = Field(None, description="PersistentVolumeClaim name")
    nfs_server: str | None = Field(None, pattern=r"^[A-Za-z0-9.\-:\[\]]+$")
    nfs_path: str | None = Field(None, pattern=r"^/[^\s]*$")
    read_only: bool = True
    sub_path: str | None = Field(None, pattern=r"^[A-Za-z0-9._\-][A-Za-z0-9._/\-]*$")

    @model_validator(mode="after")
    def _one_source(self) -> VolumeSpec:
        if (self.claim is None) == (self.nfs_server is None):
            raise PydanticCustomError("volume", "expected exactly one source: 'claim' (a PersistentVolumeClaim) or "
                                                "'nfs_server' with 'nfs_path'")
        if self.nfs_server is not None and self.nfs_path is None:
            raise PydanticCustomError("volume", "'nfs_server' needs 'nfs_path'")
        if self.mount_path == "/dev/shm" or self.mount_path.startswith("/dev/shm/"):
            raise PydanticCustomError("volume", "/dev/shm is set with resources.shm_size")
        return self


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


def _code_list(value: Any) -> Any:
    if value is None:
        return []
    return [value] if isinstance(value, dict) else value


def _check_names(values: dict[str, str], field: str) -> dict[str, str]:
    """Parameter and env names: valid, and not named like a credential; values not shaped like one.

    Errors name the key and what is wrong with its value; the value itself is never echoed."""
    for key, value in values.items():
        if not _PARAM_NAME_RE.match(key) or (field == "env" and not _ENV_NAME_RE.match(key)):
            raise PydanticCustomError("param", "{key} is not a valid name: expected letters, digits and '_'"
                                               "{dash}, starting with a letter or '_'",
                                      {"key": repr(key), "dash": "" if field == "env" else " or '-'"})
        if SECRET_NAME_RE.search(key):
            raise PydanticCustomError(
                "secret_param",
                "{key} looks like a credential: workflow parameters and env are visible to anyone who can read "
                "the workflow; reference a Kubernetes secret in 'secret_env' or 'code.credentials' instead",
                {"key": repr(key)})
        if SECRET_VALUE_RE.search(value):
            raise PydanticCustomError(
                "secret_param",
                "the value of {key} looks like a token or a URL with credentials (value not shown): reference a "
                "Kubernetes secret in 'secret_env' or 'code.credentials' instead", {"key": repr(key)})
    return values


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
    code: Annotated[list[CodeSource], BeforeValidator(_code_list)] = Field(
        default_factory=list, description="one repository (a mapping) or several (a list)")
    resources: ResourceSpec
    volumes: list[VolumeSpec] = Field(default_factory=list, description="dataset volumes")
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
        for what, values in (("code names", [c.name for c in self.code]), ("code paths", [c.path for c in self.code]),
                             ("volume names", [v.name for v in self.volumes]),
                             ("mount paths", [v.mount_path for v in self.volumes] + [c.path for c in self.code])):
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise PydanticCustomError("unique", "{what} must be unique, repeated: {dupes}",
                                          {"what": what, "dupes": ", ".join(dupes)})
        if sum(1 for c in self.code if c.url is None) > 1:
            raise PydanticCustomError("code", "only one code entry may omit 'url' (the pushed repository)")
        return self

    @field_validator("parameters", "env")
    @classmethod
    def _no_secrets(cls, values: dict[str, str], info) -> dict[str, str]:
        return _check_names(values, info.field_name)

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


# --- preparing a spec for one run (pure) ---------------------------------------------------


def _url_path(url: str) -> str:
    """`group/name` of a Git URL in any of its forms (https, ssh://, git@host:path)."""
    if url.startswith("git@"):
        path = url.split(":", 1)[1] if ":" in url else ""
    else:
        path = re.sub(r"^[a-z][a-z0-9+.\-]*://[^/]+", "", url)
    return path.strip("/").removesuffix(".git")


def is_pushed_repository(code: CodeSource, project: str) -> bool:
    """Whether `code` is the pushed project: no URL, or a URL whose path is the project's path."""
    return code.url is None or _url_path(code.url) == project.strip("/")


def pin_to_push(spec: TrainingSpec, project: str, clone_url: str, sha: str) -> TrainingSpec:
    """The spec with the pushed repository cloned at the pushed commit (pure).

    A spec without `code` gets the pushed repository at /workspace/src. The pushed repository keeps
    its `url` when the spec gives one (an address the cluster can reach), else gets `clone_url`; its
    `ref` is always `sha`. Other repositories keep their URL and ref."""
    code = list(spec.code) or [CodeSource()]
    pinned = [c.model_copy(update={"url": c.url or clone_url, "ref": sha}) if is_pushed_repository(c, project)
              else c for c in code]
    return spec.model_copy(update={"code": pinned})


def resource_problems(spec: TrainingSpec, allowed: list[str]) -> list[str]:
    """The extended resources of `spec` that the platform does not offer (`allowed`: names or globs such
    as ``nvidia.com/mig-*``), each as a message that names the resource and the allowed ones (pure)."""
    problems = []
    for name in spec.resources.extended_resources():
        if not any(fnmatch.fnmatchcase(name, pattern) for pattern in allowed):
            problems.append(f"resources: {name} is not offered by this platform (argo.allowed_resources: "
                            f"{', '.join(allowed) or 'none'})")
    return problems


# --- the flows' parameters (pure) ---------------------------------------------------------------


def as_text(value: Any) -> tuple[str, bool]:
    """A flow parameter that should be a string, as one: (text, exact).

    `prefect deployment run --param ref=1.0` parses the value as JSON, so a branch or tag named
    `1.0` arrives as a float; an int keeps its text, a float may not have (`1.10` -> 1.1), so it is
    marked inexact. The CI template passes every parameter as a JSON string with `--params`."""
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    if isinstance(value, int):
        return str(value), True
    if isinstance(value, float):
        return repr(value), False
    return ("" if value is None else str(value)), True


# --- building an image (pure) --------------------------------------------------------------

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
        code=[CodeSource(url=context_url, ref=revision, path=src,
                         credentials=GitCredentials(secret=git_secret) if git_secret else None)],
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
        retry=RetryPolicy(limit=1, policy="OnError"),
    )
