"""Prefect Block types for the platform's connections and credentials.

Kubernetes clusters reuse prefect-kubernetes' `KubernetesClusterConfig`; the failure notifier
reuses Prefect's `CustomWebhookNotificationBlock`. The rest have no Prefect integration to
reuse and are defined here, each with the one client factory the tasks need.
Secrets are `SecretStr`: they never reach a log, an artifact or an exception message.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from prefect.blocks.core import Block
from pydantic import Field, SecretStr


class _SSHBlock(Block):
    """What every host reached over SSH (key-only) has: address, user, key, host-key check, timeout.
    Not a block type of its own: GitLabHost and SSHHost extend it."""

    host: str
    port: int = 22
    username: str = "root"
    private_key: SecretStr | None = Field(None, description="OpenSSH/PEM private key text")
    private_key_path: str | None = Field(None, description="private key file on the worker")
    known_hosts: str | None = Field(None, description="known_hosts file; empty disables host key checks")
    connect_timeout_s: float = 10.0

    def connect_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for `asyncssh.connect` (keys loaded in memory, never written out)."""
        import asyncssh

        keys = []
        if self.private_key is not None:
            keys.append(asyncssh.import_private_key(self.private_key.get_secret_value()))
        if self.private_key_path:
            keys.append(asyncssh.read_private_key(self.private_key_path))
        return {
            "host": self.host,
            "port": self.port,
            "username": self.username,
            "client_keys": keys or None,
            "known_hosts": self.known_hosts or None,
            "connect_timeout": self.connect_timeout_s,
            "agent_path": None,
        }


class GitLabHost(_SSHBlock):
    """The omnibus GitLab host, reached over SSH (key-only)."""

    _block_type_name = "GitLab Omnibus Host"
    backup_path: str = "/var/opt/gitlab/backups"
    config_backup_path: str = "/etc/gitlab/config_backup"
    secrets_file: str = "/etc/gitlab/gitlab-secrets.json"
    backup_options: dict[str, str] = Field(default_factory=dict)


class SSHHost(_SSHBlock):
    """A cluster's control-plane or etcd host, reached over SSH (key-only): certificate checks and renewal.

    One document per host, named `<platform>-<cluster>-<host label>`; `role` is `control-plane` or `etcd`."""

    _block_type_name = "Cluster SSH Host"
    cluster: str
    role: Literal["control-plane", "etcd"] = "control-plane"
    label: str = Field(..., description="the node's name as in the kubespray inventory")
    root: str = Field("/", description="prefix of every host path ('/' on a real host)")
    apiserver_port: int | None = Field(6443, description="kube-apiserver's port (its /readyz after a renewal)")


class GitLabAPI(Block):
    """GitLab's REST API (`/api/v4`)."""

    _block_type_name = "GitLab API"
    url: str
    token: SecretStr
    timeout_s: float = 15.0

    def get_client(self):
        import gitlab

        return gitlab.Gitlab(self.url, private_token=self.token.get_secret_value(), timeout=self.timeout_s)


class PrometheusServer(Block):
    """A Prometheus HTTP API endpoint."""

    _block_type_name = "Prometheus Server"
    url: str
    timeout_s: float = 15.0


class ArgoServer(Block):
    """Argo Workflows' server API."""

    _block_type_name = "Argo Server"
    url: str
    namespace: str = "argo"
    token: SecretStr | None = None
    verify_tls: bool = True


class ContainerRegistry(Block):
    """An OCI distribution (Docker registry v2) endpoint."""

    _block_type_name = "Container Registry"
    url: str
    username: str | None = None
    password: SecretStr | None = None


class BackupStore(Block):
    """Where off-site copies go: a local directory or an S3-compatible bucket."""

    _block_type_name = "Backup Store"
    kind: Literal["local", "s3"]
    path: str | None = None
    endpoint_url: str | None = None
    bucket: str | None = None
    prefix: str = "gitlab/"
    region: str = "us-east-1"
    access_key_id: SecretStr | None = None
    secret_access_key: SecretStr | None = None

    def get_s3_client(self, timeout_s: float = 30.0):
        import boto3
        from botocore.config import Config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id.get_secret_value() if self.access_key_id else None,
            aws_secret_access_key=self.secret_access_key.get_secret_value() if self.secret_access_key else None,
            config=Config(
                connect_timeout=timeout_s, read_timeout=timeout_s, retries={"max_attempts": 3, "mode": "standard"}
            ),
        )

    def get_store(self, timeout_s: float = 60.0):
        """The generic off-site store over this block (`tasks.storage.Store`): sinks, listings, deletes."""
        from tasks.storage import Store

        return Store(self, timeout_s=timeout_s)

    def local_dir(self) -> Path:
        if self.kind != "local" or not self.path:
            raise ValueError("this backup store is not a local directory")
        return Path(self.path)


class PlatformSettings(Block):
    """The validated platform config (secret *references* only), for thresholds and names."""

    _block_type_name = "Platform Settings"
    config: dict[str, Any]

    def platform(self):
        from blocks.config import parse_platform_config

        return parse_platform_config(self.config, f"block platform-settings/{self._block_document_name}")


BLOCK_TYPES: list[type[Block]] = [
    GitLabHost,
    SSHHost,
    GitLabAPI,
    PrometheusServer,
    ArgoServer,
    ContainerRegistry,
    BackupStore,
    PlatformSettings,
]
