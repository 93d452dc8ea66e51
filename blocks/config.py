"""The typed platform config: one YAML file that describes a whole platform.

`load_platform_config(path)` reads and validates it. A bad file raises `ConfigError`
whose message names every wrong field by its path and says what was expected, e.g.::

    gitlab.ssh.port: expected an integer 1-65535, got 'abc'

Secrets are never written in the file. A secret field holds a *reference*: either
``{env: NAME}`` (an environment variable) or ``{block: NAME}`` (a Prefect ``Secret`` block).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError


class ConfigError(ValueError):
    """The platform config is invalid; the message lists each wrong field and what was expected."""

    document = "platform config"

    def __init__(self, source: str, problems: list[str]):
        self.source = source
        self.problems = problems
        super().__init__(f"invalid {self.document} {source}:\n  " + "\n  ".join(problems))


# --- field types with operator-readable errors -------------------------------------------


def _port(value: Any) -> int:
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, str) and value.strip().isdigit())
    ):
        raise PydanticCustomError("port", "expected an integer 1-65535, got {value}", {"value": repr(value)})
    port = int(value)
    if not 1 <= port <= 65535:
        raise PydanticCustomError("port", "expected an integer 1-65535, got {value}", {"value": repr(value)})
    return port


Port = Annotated[int, BeforeValidator(_port)]

_URL_RE = re.compile(r"^(https?)://[^\s/?#]+(/[^\s]*)?$")


def _http_url(value: Any) -> str:
    if not isinstance(value, str) or not _URL_RE.match(value):
        raise PydanticCustomError(
            "url", "expected an http(s) URL such as https://host:port, got {value}", {"value": repr(value)}
        )
    return value.rstrip("/")


HttpUrl = Annotated[str, BeforeValidator(_http_url)]

_HOST_RE = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.\-]{0,251}[A-Za-z0-9])?$|^\[?[0-9a-fA-F:]+\]?$")


def _host(value: Any) -> str:
    if not isinstance(value, str) or not _HOST_RE.match(value):
        raise PydanticCustomError(
            "host", "expected a host name or IP address, got {value}", {"value": repr(value)}
        )
    return value


Host = Annotated[str, BeforeValidator(_host)]

_NAME_RE = re.compile(r"^[a-z0-9]([a-z0-9\-]{0,61}[a-z0-9])?$")


def _dns_name(value: Any) -> str:
    if not isinstance(value, str) or not _NAME_RE.match(value):
        raise PydanticCustomError(
            "name",
            "expected a lower-case DNS label (a-z, 0-9, '-', at most 63 characters), got {value}",
            {"value": repr(value)},
        )
    return value


Name = Annotated[str, BeforeValidator(_dns_name)]

_DURATION_RE = re.compile(r"^(\d+)(s|m|h|d)$")
_DURATION_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_duration(value: Any) -> int:
    """Seconds in a duration written as Prometheus and the config write it (`30s`, `15m`, `6h`, `7d`).

    The one duration parser of the project; raises ValueError naming the bad value.
    """
    m = _DURATION_RE.match(value) if isinstance(value, str) else None
    if m is None:
        raise ValueError(f"expected a duration such as 30s, 15m, 6h or 7d, got {value!r}")
    return int(m.group(1)) * _DURATION_SECONDS[m.group(2)]


def _duration(value: Any) -> str:
    try:
        parse_duration(value)
    except ValueError:
        raise PydanticCustomError(
            "duration", "expected a duration such as 30s, 15m, 6h or 7d, got {value}", {"value": repr(value)}
        ) from None
    return value


Duration = Annotated[str, BeforeValidator(_duration)]

_ENV_RE = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SecretRef(_Model):
    """Where a secret lives: an environment variable or a Prefect Secret block. Never the value."""

    env: str | None = Field(None, description="name of an environment variable holding the secret")
    block: str | None = Field(None, description="name of a Prefect Secret block holding the secret")

    @model_validator(mode="after")
    def _one_source(self) -> SecretRef:
        if (self.env is None) == (self.block is None):
            raise PydanticCustomError(
                "secret_ref", "expected exactly one of 'env: NAME' or 'block: NAME' (never the secret itself)"
            )
        if self.env is not None and not _ENV_RE.match(self.env):
            raise PydanticCustomError(
                "secret_ref", "expected an environment variable name like GITLAB_TOKEN, got {value}",
                {"value": repr(self.env)},
            )
        return self

    def describe(self) -> str:
        return f"env:{self.env}" if self.env else f"block:{self.block}"

    def resolve(self) -> SecretStr:
        """Fetch the secret. Raises a `LookupError` naming the reference (never the value)."""
        if self.env is not None:
            value = os.environ.get(self.env)
            if value is None:
                raise LookupError(f"secret {self.describe()} is not set: export {self.env}=... first")
            return SecretStr(value)
        from prefect.blocks.system import Secret

        try:
            return SecretStr(str(Secret.load(self.block, _sync=True).get()))
        except ValueError as exc:
            raise LookupError(
                f"secret {self.describe()} not found: create the Prefect Secret block {self.block!r}"
            ) from exc


def _reject_plain_secret(value: Any) -> Any:
    if isinstance(value, str):
        raise PydanticCustomError(
            "secret_ref",
            "expected a reference ({env} or {block}), not the secret itself",
            {"env": "{env: NAME}", "block": "{block: NAME}"},
        )
    return value


SecretField = Annotated[SecretRef, BeforeValidator(_reject_plain_secret)]


# --- sections ------------------------------------------------------------------------------


class SSHTarget(_Model):
    host: Host
    port: Port = 22
    user: str = Field("root", pattern=r"^[a-z_][a-z0-9_\-]{0,31}$")
    private_key: SecretField | None = Field(None, description="the SSH private key (PEM/OpenSSH text)")
    private_key_path: Path | None = Field(None, description="path to a private key file readable by the worker")
    known_hosts: Path | None = Field(
        None, description="known_hosts file; None disables host key checking (sandbox only)"
    )
    connect_timeout_s: float = Field(10.0, gt=0, le=300)


class ClusterConfig(_Model):
    name: Name
    kubeconfig: Path | None = Field(None, description="kubeconfig path; omit for in-cluster credentials")
    context: str | None = None
    control_plane: list[SSHTarget] = Field(default_factory=list)
    gpu_node_label: str = "nvidia.com/gpu.product"
    request_timeout_s: float = Field(15.0, gt=0, le=600)
    kubespray_inventory: Path | None = None
    kubespray_overrides: Path | None = None


class GitLabConfig(_Model):
    api_url: HttpUrl
    token: SecretField
    ssh: SSHTarget
    backup_path: str = "/var/opt/gitlab/backups"
    config_backup_path: str = "/etc/gitlab/config_backup"
    secrets_file: str = "/etc/gitlab/gitlab-secrets.json"
    backup_options: dict[str, str] = Field(
        default_factory=lambda: {"STRATEGY": "copy", "GZIP_RSYNCABLE": "yes", "CRON": "1"}
    )
    scratch: GitLabScratchConfig | None = Field(None, description="scratch GitLab for the restore drill")


class GitLabScratchConfig(_Model):
    api_url: HttpUrl
    token: SecretField
    ssh: SSHTarget
    backup_path: str | None = Field(None, description="defaults to the production host's backup_path")
    config_backup_path: str | None = Field(None, description="defaults to the production host's")
    secrets_file: str | None = Field(None, description="defaults to the production host's")


class PrometheusConfig(_Model):
    url: HttpUrl
    timeout_s: float = Field(15.0, gt=0, le=300)


class ArgoConfig(_Model):
    url: HttpUrl
    namespace: Name = "argo"
    token: SecretField | None = None
    verify_tls: bool = True


class RegistryConfig(_Model):
    url: HttpUrl
    username: str | None = None
    password: SecretField | None = None


class BackupStoreConfig(_Model):
    kind: Literal["local", "s3"]
    path: Path | None = Field(None, description="directory for kind=local")
    endpoint_url: HttpUrl | None = Field(None, description="S3-compatible endpoint for kind=s3")
    bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$")
    prefix: str = "gitlab/"
    region: str = "us-east-1"
    access_key_id: SecretField | None = None
    secret_access_key: SecretField | None = None

    @model_validator(mode="after")
    def _kind_fields(self) -> BackupStoreConfig:
        if self.kind == "local" and self.path is None:
            raise PydanticCustomError("store", "kind 'local' needs 'path': the directory to copy backups to")
        if self.kind == "s3" and (self.bucket is None):
            raise PydanticCustomError("store", "kind 's3' needs 'bucket' (and usually 'endpoint_url')")
        return self


class NotificationsConfig(_Model):
    webhook_url: SecretField | None = Field(None, description="webhook that receives failure notices")


# The XIDs that cordon a node, defined once: NVIDIA's XID catalogue marks these as needing a GPU
# reset or a node reboot (48 DBE ECC, 63/64 row remapping, 74 NVLink, 79 fell off the bus, 92 high
# SBE rate, 94/95 contained/uncontained ECC). The Prometheus rule and the Grafana panel are tested
# against this tuple; `thresholds.gpu.critical_xids` overrides it per platform.
CRITICAL_XIDS: tuple[int, ...] = (48, 63, 64, 74, 79, 92, 94, 95)


class GPUThresholds(_Model):
    window: Duration = "15m"
    temp_c: float = Field(85, gt=0, le=150)
    memory_temp_c: float = Field(95, gt=0, le=150)
    idle_util_pct: float = Field(5, ge=0, le=100)
    stale_after: Duration = "2m"
    critical_xids: list[int] = Field(default_factory=lambda: list(CRITICAL_XIDS))
    cordon_max_share: float = Field(0.10, gt=0, le=1)


class CertificateThresholds(_Model):
    warn_days: int = Field(30, ge=1, le=3650)
    critical_days: int = Field(7, ge=0, le=3650)


class ImageThresholds(_Model):
    unused_for: Duration = "14d"
    keep_tags: int = Field(10, ge=1, le=10000)
    prune_max_share: float = Field(0.5, gt=0, le=1)


class BackupThresholds(_Model):
    keep_days: int = Field(5, ge=1, le=3650)
    keep_count: int = Field(7, ge=1, le=1000)
    config_keep_days: int = Field(30, ge=1, le=3650)
    config_keep_count: int = Field(10, ge=1, le=1000)
    free_space_factor: float = Field(1.5, ge=1, le=20)


class Thresholds(_Model):
    gpu: GPUThresholds = GPUThresholds()
    certificates: CertificateThresholds = CertificateThresholds()
    images: ImageThresholds = ImageThresholds()
    backup: BackupThresholds = BackupThresholds()


class PlatformConfig(_Model):
    name: Name = Field(..., description="names the block documents this config creates")
    clusters: list[ClusterConfig] = Field(..., min_length=1)
    gitlab: GitLabConfig | None = None
    prometheus: PrometheusConfig | None = None
    argo: ArgoConfig | None = None
    registry: RegistryConfig | None = None
    backup_store: BackupStoreConfig | None = None
    notifications: NotificationsConfig = NotificationsConfig()
    thresholds: Thresholds = Thresholds()

    @field_validator("clusters")
    @classmethod
    def _unique_cluster_names(cls, clusters: list[ClusterConfig]) -> list[ClusterConfig]:
        names = [c.name for c in clusters]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PydanticCustomError("unique", "cluster names must be unique, repeated: {dupes}",
                                      {"dupes": str(dupes)})
        return clusters

    def cluster(self, name: str | None = None) -> ClusterConfig:
        if name is None:
            return self.clusters[0]
        for c in self.clusters:
            if c.name == name:
                return c
        raise KeyError(f"no cluster named {name!r} in platform {self.name!r}; have {[c.name for c in self.clusters]}")


GitLabConfig.model_rebuild()


# --- loading -------------------------------------------------------------------------------

_GENERIC = {
    "missing": "required field is missing",
    "extra_forbidden": "unknown field (check the spelling against configs/platform.example.yaml)",
    "int_parsing": "expected an integer",
    "int_type": "expected an integer",
    "float_parsing": "expected a number",
    "float_type": "expected a number",
    "bool_parsing": "expected true or false",
    "bool_type": "expected true or false",
    "string_type": "expected a string",
    "list_type": "expected a list",
    "dict_type": "expected a mapping",
    "model_type": "expected a mapping",
    "model_attributes_type": "expected a mapping",
    "path_type": "expected a file path",
}


def _loc(loc: tuple[Any, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif "[" in str(part):
            continue  # a validator wrapper's name (e.g. "function-after[...]"), not a field
        else:
            out += ("." if out else "") + str(part)
    return out or "(top level)"


def _describe(err: dict[str, Any]) -> str:
    etype = err["type"]
    ctx = err.get("ctx") or {}
    if etype in _GENERIC:
        msg = _GENERIC[etype]
    elif etype == "literal_error":
        msg = f"expected one of {ctx.get('expected')}"
    elif etype in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        sym = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<", "less_than_equal": "<="}[etype]
        bound = next(iter(ctx.values()))
        msg = f"expected a value {sym} {bound:g}" if isinstance(bound, (int, float)) else f"expected a value {sym} {bound}"
    elif etype == "too_short":
        msg = f"expected at least {ctx.get('min_length')} item(s)"
    elif etype == "string_pattern_mismatch":
        msg = f"expected text matching {ctx.get('pattern')}"
    else:
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        return msg  # custom errors already carry the value
    if etype not in ("missing", "extra_forbidden") and "input" in err and not isinstance(err["input"], (dict, list)):
        msg += f", got {err['input']!r}"
    return msg


def format_validation_error(exc: ValidationError) -> list[str]:
    return [f"{_loc(tuple(e['loc']))}: {_describe(e)}" for e in exc.errors()]


def validate_document(model: type[BaseModel], data: Any, source: str, error: type[ConfigError] = ConfigError):
    """Validate parsed YAML against `model`; raise `error` listing every wrong field, never a traceback."""
    if not isinstance(data, dict):
        raise error(source, [f"(top level): expected a mapping, got {type(data).__name__}"])
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise error(source, format_validation_error(exc)) from None


def parse_platform_config(data: Any, source: str = "<config>") -> PlatformConfig:
    return validate_document(PlatformConfig, data, source)


def load_platform_config(path: str | Path) -> PlatformConfig:
    """Read and validate a platform config file. Raises `ConfigError`, never a traceback-worthy error."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as exc:
        raise ConfigError(str(p), [f"(file): cannot read it: {exc.strerror}"]) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(str(p), [f"(file): not valid YAML at {where}: {getattr(exc, 'problem', exc)}"]) from None
    return parse_platform_config(data, str(p))
