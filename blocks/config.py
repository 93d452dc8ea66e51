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


def _moved_to_operations(values: Any, *fields: str) -> Any:
    """The per-lifecycle approval and lock timeouts became `operations:` (issue 21): say so by name."""
    if isinstance(values, dict):
        for f in fields:
            if f in values:
                raise PydanticCustomError(
                    "moved", "{field} moved to operations.approval_timeout / operations.lock_timeout (one "
                    "convention for every platform-changing run; the flow's approval_timeout_s overrides it)",
                    {"field": f})
    return values


class OperationsConfig(_Model):
    """How every platform-changing run waits (tasks/operation.py): for its approval, then for its lock."""

    approval_timeout: Duration = Field("1h", description="how long a run waits for its approval (the flow's "
                                                         "approval_timeout_s parameter overrides it)")
    lock_timeout: Duration = Field("1h", description="how long an approved run waits for its lock")


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


_HOST_PATH_RE = r"^/[A-Za-z0-9_.@/\-]*$"


class ClusterHost(SSHTarget):
    """A control-plane or etcd host of a cluster, reached over SSH (certificate checks and renewal).

    Ports are kubespray's defaults (`roles/kubespray-defaults/defaults/main/main.yml`): `kube_apiserver_port`
    6443, etcd's client URL :2379 and, with `etcd_events_cluster_enabled`, the events cluster's :2383."""

    name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,252}$",
                             description="the node's name as in the kubespray inventory (default: host)")
    root: str = Field("/", pattern=_HOST_PATH_RE,
                      description="prefix of every host path: '/' on a real host (the sandbox's emulated hosts "
                                  "each live in their own folder)")
    apiserver_port: Port | None = Field(6443, description="kube-apiserver's port on this host; null: none here")
    etcd_port: Port | None = Field(2379, description="etcd's client port on this host; null: no etcd here")
    etcd_events_port: Port | None = Field(None, description="the events etcd cluster's client port (kubespray: "
                                                            "2383) when events are split out")

    @property
    def label(self) -> str:
        return self.name or self.host


# --- provisioning: the kubespray cluster definition (issue 14) -------------------------------------

# kubespray's own group names (inventory/sample/inventory.ini, docs/ansible/inventory.md): the control plane,
# etcd members, worker nodes, `k8s_cluster` (their parent) and calico route reflectors.
KUBESPRAY_GROUPS = ("kube_control_plane", "etcd", "kube_node", "k8s_cluster", "calico_rr")
_INVENTORY_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,252}$"
_TAINT_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_./\-]{0,252}=[A-Za-z0-9_.\-]{0,63}:(NoSchedule|PreferNoSchedule|NoExecute)$")


class KubesprayHost(_Model):
    """One inventory host with kubespray's host variables; `groups` are the groups it is written under."""

    name: str = Field(..., pattern=_INVENTORY_NAME, description="inventory_hostname, the node's name")
    ansible_host: Host
    ip: Host | None = Field(None, description="the address kubespray binds services to")
    access_ip: Host | None = Field(None, description="the address other nodes reach this one at")
    etcd_member_name: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,62}$")
    groups: list[str] = Field(default_factory=list)
    vars: dict[str, Any] = Field(default_factory=dict, description="any other host variable")


class KubesprayGroup(_Model):
    """A group beyond the hosts' memberships: its child groups, its taints (`node_taints`) and variables."""

    children: list[str] = Field(default_factory=list)
    taints: list[str] = Field(default_factory=list, description="node_taints, as key=value:Effect")
    vars: dict[str, Any] = Field(default_factory=dict)

    @field_validator("taints")
    @classmethod
    def _taints(cls, values: list[str]) -> list[str]:
        for v in values:
            if not _TAINT_RE.match(v):
                raise PydanticCustomError("taint", "expected a taint key=value:Effect (NoSchedule, PreferNoSchedule "
                                                   "or NoExecute), got {value}", {"value": repr(v)})
        return values


class KubesprayPreflight(_Model):
    """What every host must have before kubespray runs (kubespray's `roles/kubernetes/preinstall`:
    minimal_master_memory_mb 1500, minimal_node_memory_mb 1024, supported_os_distributions)."""

    os: list[str] = Field(default_factory=lambda: ["Debian 11", "Debian 12", "Ubuntu 20", "Ubuntu 22", "Ubuntu 24"],
                          description="'<distribution> <major version>' accepted")
    min_cpus: int = Field(2, ge=1)
    min_memory_mb_control_plane: int = Field(1500, ge=1)
    min_memory_mb_node: int = Field(1024, ge=1)
    min_disk_free_gb: float = Field(20, ge=0, description="free space on / ")
    max_clock_skew_s: float = Field(5, gt=0, description="host clock vs the worker's")
    ports_control_plane: list[Port] = Field(default_factory=lambda: [6443, 2379, 2380, 10250, 10257, 10259])
    ports_node: list[Port] = Field(default_factory=lambda: [10250])


class KubesprayConfig(_Model):
    """The cluster as kubespray installs it: the checkout, its hosts and groups, the overrides."""

    @model_validator(mode="before")
    @classmethod
    def _timeouts_moved(cls, values: Any) -> Any:
        return _moved_to_operations(values, "approval_timeout", "lock_timeout")

    checkout: Path = Field(..., description="the kubespray checkout (cluster.yml, scale.yml, ...)")
    version: str = Field(..., pattern=r"^v\d+\.\d+\.\d+$", description="the checkout's release tag, e.g. v2.26.0")
    kube_version: str | None = Field(None, pattern=r"^v\d+\.\d+\.\d+$",
                                     description="expected kubelet version after a run (default: the overrides')")
    overrides: list[Path] = Field(default_factory=list, description="extra-vars files (-e @file), in order")
    ssh_user: str = Field("root", pattern=r"^[a-z_][a-z0-9_\-]{0,31}$")
    private_key_path: Path | None = None
    known_hosts: Path | None = Field(None, description="known_hosts for every host; None: no checking (sandbox only)")
    hosts: list[KubesprayHost] = Field(..., min_length=1)
    groups: dict[str, KubesprayGroup] = Field(default_factory=dict)
    upgrade_serial: str = Field("20%", pattern=r"^(\d+|\d{1,3}%)$", description="kubespray's `serial` for nodes")
    preflight: KubesprayPreflight = KubesprayPreflight()
    playbook_timeout: Duration = "6h"
    unreachable_retries: int = Field(1, ge=0, le=5, description="re-runs limited to the hosts that were unreachable")

    @model_validator(mode="after")
    def _groups_known(self) -> KubesprayConfig:
        names = [h.name for h in self.hosts]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise PydanticCustomError("unique", "host names must be unique, repeated: {dupes}", {"dupes": str(dupes)})
        known = set(KUBESPRAY_GROUPS) | set(self.groups)
        bad = sorted({g for h in self.hosts for g in h.groups if g not in known}
                     | {c for g in self.groups.values() for c in g.children if c not in known})
        if bad:
            raise PydanticCustomError("groups", "unknown groups {bad}: declare them under kubespray.groups",
                                      {"bad": str(bad)})
        for required in ("kube_control_plane", "etcd"):
            if not any(required in h.groups for h in self.hosts):
                raise PydanticCustomError("groups", "no host is in {group}: kubespray needs at least one",
                                          {"group": required})
        return self


class ClusterConfig(_Model):
    name: Name
    kubeconfig: Path | None = Field(None, description="kubeconfig path; omit for in-cluster credentials")
    context: str | None = None
    control_plane: list[ClusterHost] = Field(default_factory=list)
    etcd: list[ClusterHost] = Field(default_factory=list,
                                    description="etcd hosts that are not control-plane hosts (kubespray [etcd])")
    gpu_node_label: str = "nvidia.com/gpu.product"
    request_timeout_s: float = Field(15.0, gt=0, le=600)
    kubespray_inventory: Path | None = None
    kubespray_overrides: Path | None = None
    kubespray: KubesprayConfig | None = None


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
    # Host layout beyond the paths above (issue 9); the scratch section may override each.
    backup_user: str = Field("git:git", pattern=r"^[a-z_][a-z0-9_\-]{0,31}(:[a-z_][a-z0-9_\-]{0,31})?$",
                             description="owner of archives `gitlab-backup restore` reads (omnibus: git:git)")
    gitlab_rb: str = "/etc/gitlab/gitlab.rb"
    backup_log: str = Field("/var/log/gitlab/gitlab-rails/backup_json.log",
                            description="GitLab's backup log (JSON), read for what a CRON=1 backup reported")
    control_dir: str = Field("/run/ai-platform-ops", description="locks and process groups of supervised commands")
    timeouts: GitLabTimeouts = Field(default_factory=lambda: GitLabTimeouts())
    scratch: GitLabScratchConfig | None = Field(None, description="scratch GitLab for the restore drill")


class GitLabTimeouts(_Model):
    """Per-step limits of the backup lifecycle's remote commands; a command past its limit is stopped."""

    backup_create: Duration = "6h"
    backup_restore: Duration = "6h"
    transfer: Duration = "6h"
    reconfigure: Duration = "30m"
    restart: Duration = "10m"
    check: Duration = "30m"
    stop_grace: Duration = "30s"


class GitLabScratchConfig(_Model):
    api_url: HttpUrl
    token: SecretField
    ssh: SSHTarget
    backup_path: str | None = Field(None, description="defaults to the production host's backup_path")
    config_backup_path: str | None = Field(None, description="defaults to the production host's")
    secrets_file: str | None = Field(None, description="defaults to the production host's")
    gitlab_rb: str | None = Field(None, description="defaults to the production host's")
    backup_log: str | None = Field(None, description="defaults to the production host's")
    control_dir: str | None = Field(None, description="defaults to the production host's")
    external_url: HttpUrl | None = Field(None, description="scratch's own external_url, kept by the drill "
                                                             "(defaults to api_url)")
    object_store_bucket: str | None = Field(None, pattern=r"^[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]$",
                                            description="scratch bucket for the drill; none: object storage off")


class PrometheusConfig(_Model):
    url: HttpUrl
    timeout_s: float = Field(15.0, gt=0, le=300)


_GO_DURATION_RE = re.compile(r"^(\d+(h|m|s))+$")


def _go_duration(value: Any) -> str:
    if not isinstance(value, str) or not _GO_DURATION_RE.match(value):
        raise PydanticCustomError("go_duration", "expected a duration such as 90s, 5m or 1h30m, got {value}",
                                  {"value": repr(value)})
    return value


class ArgoConfig(_Model):
    url: HttpUrl
    namespace: Name = "argo"
    token: SecretField | None = None
    verify_tls: bool = True
    # How a failed step's log outlives its pod (podGC deletes pods; Argo's /log reads live pods only).
    archive_logs: bool = Field(False, description="render archiveLogs: true; needs an artifact repository "
                                                  "configured in Argo (workflow-controller-configmap)")
    keep_failed_pods_for: Annotated[str, BeforeValidator(_go_duration)] = Field(
        "10m", description="without archive_logs: podGC.deleteDelayDuration, so a pod deleted on completion "
                           "lives long enough for the flow to read its log")
    allowed_resources: list[str] = Field(
        default_factory=lambda: ["nvidia.com/gpu", "nvidia.com/gpumem", "nvidia.com/gpucores", "nvidia.com/mig-*",
                                 "aliyun.com/gpu-mem"],
        description="extended resources a training spec may request (names or globs such as nvidia.com/mig-*)")


class RegistryConfig(_Model):
    url: HttpUrl
    username: str | None = None
    password: SecretField | None = None
    gc_command: list[str] | None = Field(
        None, description="argv of the registry's garbage-collect (run by image-prune when set; else reported)")


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
    # Where the sweep and the rendered alert rules find dcgm-exporter (see tasks/gpu_model.py).
    exporter_jobs: list[str] = Field(
        default_factory=lambda: ["nvidia-dcgm-exporter", "dcgm-exporter"], min_length=1,
        description="Prometheus scrape jobs of dcgm-exporter (exact names)")
    exporter_selectors: list[str] = Field(
        default_factory=lambda: ["app=nvidia-dcgm-exporter", "app.kubernetes.io/name=dcgm-exporter"], min_length=1,
        description="label selectors (key=value[,key=value]) of dcgm-exporter pods; any one matches")
    metric_selector: str = Field("", description='extra matchers for the DCGM series, e.g. cluster="gpu-prod"')
    whole_gpu_resources: list[str] = Field(default_factory=lambda: ["nvidia.com/gpu"])
    shared_gpu_resources: list[str] = Field(default_factory=lambda: [
        "nvidia.com/gpu.shared", "nvidia.com/gpumem", "nvidia.com/gpumem-percentage", "nvidia.com/gpucores",
        "aliyun.com/gpu-mem", "aliyun.com/gpu-count"])
    gpu_resource_prefixes: list[str] = Field(default_factory=lambda: ["nvidia.com/mig-"])
    xid_resolution: Duration = "1m"
    unknown_share: float = Field(0.5, gt=0, le=1)

    @field_validator("exporter_jobs", "exporter_selectors")
    @classmethod
    def _no_quotes(cls, values: list[str]) -> list[str]:
        for v in values:
            if not v or any(c in v for c in '"\\\n{}'):
                raise PydanticCustomError("plain", "expected plain names without quotes or braces, got {value}",
                                          {"value": repr(v)})
        return values


class CertificateThresholds(_Model):
    warn_days: int = Field(30, ge=1, le=3650)
    critical_days: int = Field(7, ge=0, le=3650)


class CertificateEndpoint(_Model):
    """A live TLS endpoint whose served chain is checked (a real handshake with SNI set)."""

    name: str = Field(..., pattern=r"^[^\n]{1,80}$")
    host: Host
    port: Port = 443
    server_name: str | None = Field(None, pattern=r"^[A-Za-z0-9*][A-Za-z0-9.\-]{0,252}$",
                                    description="SNI and the name checked against the SANs (default: host)")
    kind: Literal["apiserver", "etcd", "etcd-events", "gitlab", "registry", "argo", "ingress", "other"] = "other"


class CertificateKubeconfig(_Model):
    """A kubeconfig handed to people or CI, checked daily and refreshed by the renewal flow."""

    path: Path
    refresh_from: str | None = Field(None, pattern=r"^[a-z][a-z0-9\-]*\.conf$",
                                     description="host kubeconfig (in layout.kubeconfig_dir) whose client "
                                                 "certificate replaces this one's after a renewal, e.g. admin.conf")
    user: str | None = Field(None, description="the user entry to refresh (default: the current context's)")


class CertificateLayout(_Model):
    """Where kubespray and kubeadm keep certificates on a host (kubespray defaults: `kube_config_dir`
    /etc/kubernetes, `kube_cert_dir` /etc/kubernetes/ssl, `kube_cert_compat_dir` /etc/kubernetes/pki,
    `etcd_cert_dir` /etc/ssl/etcd/ssl, `bin_dir` /usr/local/bin). Every path is under the host's `root`."""

    pki_dirs: list[str] = Field(default_factory=lambda: ["/etc/kubernetes/ssl", "/etc/kubernetes/pki",
                                                         "/etc/ssl/etcd/ssl"])
    cert_dir: str = Field("/etc/kubernetes/ssl", pattern=_HOST_PATH_RE, description="kubeadm's --cert-dir")
    kubeconfig_dir: str = Field("/etc/kubernetes", pattern=_HOST_PATH_RE)
    kubeconfigs: list[str] = Field(default_factory=lambda: ["admin.conf", "super-admin.conf",
                                                            "controller-manager.conf", "scheduler.conf",
                                                            "kubelet.conf"])
    kubelet_client_cert: str = Field("/var/lib/kubelet/pki/kubelet-client-current.pem", pattern=_HOST_PATH_RE)
    manifests_dir: str = Field("/etc/kubernetes/manifests", pattern=_HOST_PATH_RE)
    static_pods: list[str] = Field(default_factory=lambda: ["kube-apiserver.yaml", "kube-controller-manager.yaml",
                                                            "kube-scheduler.yaml", "etcd.yaml"])
    kubeadm: str = Field("/usr/local/bin/kubeadm", pattern=_HOST_PATH_RE)
    backup_dir: str = Field("/var/backups/ai-platform-ops/certificates", pattern=_HOST_PATH_RE)
    renew_timer: str = Field("k8s-certs-renew.timer", pattern=r"^[A-Za-z0-9@_.\-]+\.timer$")
    renew_service: str = Field("k8s-certs-renew.service", pattern=r"^[A-Za-z0-9@_.\-]+\.service$")

    @field_validator("pki_dirs")
    @classmethod
    def _absolute(cls, values: list[str]) -> list[str]:
        for v in values:
            if not re.match(_HOST_PATH_RE, v) or ".." in v.split("/"):
                raise PydanticCustomError("path", "expected an absolute path of [A-Za-z0-9_.@/-], got {value}",
                                          {"value": repr(v)})
        return values

    @field_validator("kubeconfigs", "static_pods")
    @classmethod
    def _file_names(cls, values: list[str]) -> list[str]:
        for v in values:
            if not re.match(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", v):
                raise PydanticCustomError("file_name", "expected a plain file name, got {value}", {"value": repr(v)})
        return values


class CertificateTimeouts(_Model):
    source_s: float = Field(120, gt=0, le=3600, description="each source as a whole (hosts, endpoints, secrets)")
    ssh_s: float = Field(60, gt=0, le=3600, description="one host's scan")
    endpoint_s: float = Field(10, gt=0, le=300, description="one TLS handshake")
    kubeadm_s: float = Field(300, gt=0, le=3600)
    static_pod_wait_s: float = Field(20, ge=0, le=600, description="manifests stay out this long (the kubelet's "
                                                                   "fileCheckFrequency is 20s)")
    readyz_s: float = Field(300, gt=0, le=3600, description="the API server's /readyz after a restart")

    @model_validator(mode="before")
    @classmethod
    def _approval_moved(cls, values: Any) -> Any:
        return _moved_to_operations(values, "approval")


class CertificatesConfig(_Model):
    """The certificate lifecycle (issue 12): what is checked beyond the hosts of `clusters[]`."""

    endpoints: list[CertificateEndpoint] = Field(default_factory=list)
    derive_endpoints: bool = Field(True, description="also check each host's API server and etcd ports and the "
                                                     "https URLs of gitlab, registry and argo")
    kubeconfigs: list[CertificateKubeconfig] = Field(default_factory=list)
    secret_namespaces: list[Name] = Field(default_factory=list, description="empty: every namespace")
    page_size: int = Field(500, ge=1, le=5000)
    timer_max_age_days: int = Field(35, ge=1, le=400, description="k8s-certs-renew.timer runs monthly")
    layout: CertificateLayout = CertificateLayout()
    timeouts: CertificateTimeouts = CertificateTimeouts()


# --- etcd lifecycle (issue 16) ---------------------------------------------------------------------

# also what `tasks.etcd` checks before building an etcdctl command line (one definition each)
ETCD_ENDPOINT_RE = r"^https://[A-Za-z0-9.\-\[\]:]+:[0-9]{1,5}$"
ETCD_FILE_TEMPLATE_RE = r"^[A-Za-z0-9_.\-]*(\{host\})?[A-Za-z0-9_.\-]*$"
ETCD_HOST_NAME_RE = r"^[A-Za-z0-9][A-Za-z0-9.\-]{0,62}$"


class EtcdHost(SSHTarget):
    """An etcd host `etcdctl` runs on, over SSH (kubespray's etcd role runs etcdctl on the member hosts)."""

    name: str = Field(..., pattern=ETCD_HOST_NAME_RE,
                      description="the host's inventory name: its client certificate is admin-<name>.pem")
    root: str = Field("/", pattern=_HOST_PATH_RE, description="prefix of every host path ('/' on a real host)")


class EtcdScratch(EtcdHost):
    """The restore drill's scratch host: a snapshot is restored and served there on loopback, never on a member."""

    etcd: str = Field("/usr/local/bin/etcd", pattern=_HOST_PATH_RE + "|^etcd$", description="etcd binary")
    work_dir: str = Field("/var/lib/etcd-restore-drill", pattern=_HOST_PATH_RE,
                          description="fresh data dirs and downloaded snapshots live here, removed after the drill")
    client_port: Port = Field(23790, description="the drill member's client port (127.0.0.1 only)")
    peer_port: Port = Field(23800, description="the drill member's peer port (127.0.0.1 only)")


class EtcdClusterEndpoints(_Model):
    """One etcd cluster: `main` (Kubernetes' objects) or `events` (kubespray `etcd_events_cluster_setup`)."""

    name: Name
    endpoints: list[Annotated[str, Field(pattern=ETCD_ENDPOINT_RE)]] = Field(
        ..., min_length=1, description="client URLs (kubespray: https://<ip>:2379, events :2383)")
    quota_bytes: int = Field(8 * 1024 ** 3, ge=1, description="--quota-backend-bytes (the guide: 8 GiB)")


class EtcdCerts(_Model):
    """kubespray's etcd client certificates (`etcd_cert_dir`, `roles/etcd/files/make-ssl-etcd.sh`)."""

    dir: str = Field("/etc/ssl/etcd/ssl", pattern=_HOST_PATH_RE)
    ca: str = Field("ca.pem", pattern=ETCD_FILE_TEMPLATE_RE)
    cert: str = Field("admin-{host}.pem", pattern=ETCD_FILE_TEMPLATE_RE, description="{host}: the host's name")
    key: str = Field("admin-{host}-key.pem", pattern=ETCD_FILE_TEMPLATE_RE)


class EtcdHealthThresholds(_Model):
    """What `tasks.etcd_rules` judges a cluster by (its defaults too). kubespray's guide sets an 8 GiB quota;
    etcd's docs advise defragmenting when much of the file is free pages. 80% of the quota is critical (the
    issue), 60% a warning."""

    quota_warning: float = Field(0.6, gt=0, le=1, description="db size / quota for a warning")
    quota_critical: float = Field(0.8, gt=0, le=1, description="db size / quota for critical (compact, defragment)")
    fragmented_share: float = Field(0.5, gt=0, le=1, description="in use / size below this: defragment")
    fragmented_min_bytes: int = Field(64 * 1024 * 1024, ge=0, description="never report fragmentation below this")

    @model_validator(mode="after")
    def _ordered(self) -> EtcdHealthThresholds:
        if self.quota_warning > self.quota_critical:
            raise PydanticCustomError("order", "quota_warning must not exceed quota_critical")
        return self


class EtcdTimeouts(_Model):
    dial: Duration = Field("3s", description="etcdctl --dial-timeout")
    # etcdctl 3.4's own default --command-timeout is 5s (`etcdctl --help`: "--command-timeout=5s"); the
    # platform health check gives each check 20 s, and the status reads allow 3x this plus 10 s.
    command: Duration = Field("5s", description="etcdctl --command-timeout of status, health, alarms")
    snapshot: Duration = Field("15m", description="one `snapshot save` (a hung member: the next one is tried)")
    transfer: Duration = Field("1h", description="off-site copy of one snapshot")
    defrag: Duration = Field("10m", description="one member's defragmentation")
    drill: Duration = Field("30m", description="the restore drill as a whole")

    @model_validator(mode="before")
    @classmethod
    def _approval_moved(cls, values: Any) -> Any:
        return _moved_to_operations(values, "approval")


class EtcdRetention(_Model):
    keep_days: int = Field(7, ge=1, le=3650)
    keep_count: int = Field(28, ge=1, le=10000, description="every 6 hours: 28 = a week")


class EtcdConfig(_Model):
    """The etcd lifecycle (issue 16): snapshots off-site, health, defragmentation, restore drill."""

    hosts: list[EtcdHost] = Field(..., min_length=1, description="etcd hosts etcdctl runs on, tried in order")
    clusters: list[EtcdClusterEndpoints] = Field(..., min_length=1)
    certs: EtcdCerts = EtcdCerts()
    etcdctl: str = Field("/usr/local/bin/etcdctl", pattern=_HOST_PATH_RE + "|^etcdctl$",
                         description="kubespray's bin_dir/etcdctl")
    snapshot_dir: str = Field("/var/backups/etcd-snapshots", pattern=_HOST_PATH_RE,
                              description="where a snapshot is written on the host before the off-site copy")
    sample_keys: int = Field(10, ge=0, le=1000, description="keys recorded in the manifest and read back by the drill")
    thresholds: EtcdHealthThresholds = EtcdHealthThresholds()
    timeouts: EtcdTimeouts = EtcdTimeouts()
    retention: EtcdRetention = EtcdRetention()
    scratch: EtcdScratch | None = Field(None, description="the restore drill's host")

    @field_validator("clusters")
    @classmethod
    def _unique(cls, clusters: list[EtcdClusterEndpoints]) -> list[EtcdClusterEndpoints]:
        names = [c.name for c in clusters]
        if len(set(names)) != len(names):
            raise PydanticCustomError("unique", "etcd cluster names must be unique, got {names}", {"names": str(names)})
        return clusters


class ImageThresholds(_Model):
    unused_for: Duration = "14d"
    keep_tags: int = Field(10, ge=1, le=10000)
    prune_max_share: float = Field(0.5, gt=0, le=1)
    # Image cleanup audit (issue 13). Node-side defaults are the guide's kubespray-override.yml:
    # imageGCHighThresholdPercent 65 / Low 45, evictionHard imagefs.available 10%, evictionSoft 15%.
    gc_high_pct: float = Field(65, gt=0, le=100, description="kubelet imageGCHighThresholdPercent")
    gc_low_pct: float = Field(45, ge=0, le=100, description="kubelet imageGCLowThresholdPercent")
    eviction_hard_pct: float = Field(10, ge=0, le=100, description="kubelet evictionHard imagefs.available (%)")
    eviction_soft_pct: float = Field(15, ge=0, le=100, description="kubelet evictionSoft imagefs.available (%)")
    near_margin_pct: float = Field(5, ge=0, le=50, description="how close (percentage points) counts as near")
    keep_tag_patterns: list[str] = Field(default_factory=list, description="tags always kept (globs, e.g. v*)")
    allowed_registries: list[str] = Field(default_factory=list,
                                          description="registry hosts images may come from (globs); empty: any")
    exclude: list[str] = Field(default_factory=list,
                               description="images never pruned (globs, like Eraser's exclude list)")
    large_image_gb: float = Field(5, gt=0, description="a duplicated image is reported from this size")
    duplicate_min_nodes: int = Field(10, ge=2, description="...when it sits on at least this many nodes")
    prune_job_image: str = Field("registry.k8s.io/cri-tools/crictl:v1.29.0",
                                 description="an image with sh and crictl, run by the node prune Jobs")
    prune_namespace: str = "kube-system"


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
    certificates: CertificatesConfig = CertificatesConfig()
    etcd: EtcdConfig | None = None
    thresholds: Thresholds = Thresholds()
    operations: OperationsConfig = OperationsConfig()

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
        msg = msg.removeprefix("Value error, ")
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
