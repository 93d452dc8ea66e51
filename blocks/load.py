"""Register the block types and create or update the block documents from a platform config.

    python -m blocks.load configs/platform.yaml

Idempotent: running it twice leaves the same documents. Secret references in the file are
resolved here (environment variables or Prefect Secret blocks) and stored as `SecretStr`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from blocks.config import (
    ConfigError,
    PlatformConfig,
    SecretRef,
    SSHTarget,
    load_platform_config,
)


def _secret(ref: SecretRef | None):
    return None if ref is None else ref.resolve()


def _ssh_fields(target: SSHTarget) -> dict:
    return {
        "host": target.host,
        "port": target.port,
        "username": target.user,
        "private_key": _secret(target.private_key),
        "private_key_path": str(target.private_key_path) if target.private_key_path else None,
        "known_hosts": str(target.known_hosts) if target.known_hosts else None,
        "connect_timeout_s": target.connect_timeout_s,
    }


def cluster_host_name(platform: str, cluster: str, label: str) -> str:
    """The block document name of one control-plane or etcd host: `<platform>-<cluster>-<label>`."""
    import re

    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", f"{platform}-{cluster}-{label}".lower())).strip("-")


def cluster_host_blocks(cfg: PlatformConfig) -> list[tuple[str, object]]:
    """An `SSHHost` document per control-plane and etcd host of every cluster (certificate lifecycle)."""
    from blocks.connections import SSHHost

    out: list[tuple[str, object]] = []
    for cluster in cfg.clusters:
        for role, hosts in (("control-plane", cluster.control_plane), ("etcd", cluster.etcd)):
            for h in hosts:
                out.append((cluster_host_name(cfg.name, cluster.name, h.label),
                            SSHHost(**_ssh_fields(h), cluster=cluster.name, role=role, label=h.label, root=h.root,
                                    apiserver_port=h.apiserver_port)))
    return out


def etcd_host_name(platform: str, label: str) -> str:
    """The block document name of an etcd-lifecycle host (issue 16): `<platform>-etcd-<name>`."""
    return cluster_host_name(platform, "etcd", label)


def etcd_host_blocks(cfg: PlatformConfig) -> list[tuple[str, object]]:
    """An `SSHHost` document per `etcd.hosts[]` entry and one for `etcd.scratch` (the restore drill)."""
    from blocks.connections import SSHHost

    if cfg.etcd is None:
        return []
    hosts = [*cfg.etcd.hosts, *([cfg.etcd.scratch] if cfg.etcd.scratch else [])]
    return [(etcd_host_name(cfg.name, h.name), SSHHost(**_ssh_fields(h), cluster=cfg.clusters[0].name, role="etcd",
                                                       label=h.name, root=h.root, apiserver_port=None))
            for h in hosts]


def build_blocks(cfg: PlatformConfig) -> list[tuple[str, object]]:
    """The block documents a config describes, as (name, block) pairs, without saving them."""
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    from blocks.connections import (
        ArgoServer,
        BackupStore,
        ContainerRegistry,
        GitLabAPI,
        GitLabHost,
        PlatformSettings,
        PrometheusServer,
    )

    out: list[tuple[str, object]] = [
        (cfg.name, PlatformSettings(config=cfg.model_dump(mode="json", exclude_none=True)))
    ]
    for cluster in cfg.clusters:
        if cluster.kubeconfig is not None:
            out.append(
                (cluster.name, KubernetesClusterConfig.from_file(cluster.kubeconfig, context_name=cluster.context))
            )
    if cfg.gitlab:
        g = cfg.gitlab
        host_extra = {
            "backup_path": g.backup_path,
            "config_backup_path": g.config_backup_path,
            "secrets_file": g.secrets_file,
            "backup_options": dict(g.backup_options),
        }
        out.append((cfg.name, GitLabHost(**_ssh_fields(g.ssh), **host_extra)))
        out.append((cfg.name, GitLabAPI(url=g.api_url, token=_secret(g.token))))
        if g.scratch:
            scratch_extra = dict(host_extra)
            for key in ("backup_path", "config_backup_path", "secrets_file"):
                if getattr(g.scratch, key):
                    scratch_extra[key] = getattr(g.scratch, key)
            out.append((f"{cfg.name}-scratch", GitLabHost(**_ssh_fields(g.scratch.ssh), **scratch_extra)))
            out.append((f"{cfg.name}-scratch", GitLabAPI(url=g.scratch.api_url, token=_secret(g.scratch.token))))
    out += cluster_host_blocks(cfg)
    out += etcd_host_blocks(cfg)
    if cfg.prometheus:
        out.append((cfg.name, PrometheusServer(url=cfg.prometheus.url, timeout_s=cfg.prometheus.timeout_s)))
    if cfg.argo:
        a = cfg.argo
        out.append(
            (cfg.name, ArgoServer(url=a.url, namespace=a.namespace, token=_secret(a.token), verify_tls=a.verify_tls))
        )
    if cfg.registry:
        r = cfg.registry
        out.append((cfg.name, ContainerRegistry(url=r.url, username=r.username, password=_secret(r.password))))
    if cfg.backup_store:
        s = cfg.backup_store
        out.append(
            (
                cfg.name,
                BackupStore(
                    kind=s.kind,
                    path=str(s.path) if s.path else None,
                    endpoint_url=s.endpoint_url,
                    bucket=s.bucket,
                    prefix=s.prefix,
                    region=s.region,
                    access_key_id=_secret(s.access_key_id),
                    secret_access_key=_secret(s.secret_access_key),
                ),
            )
        )
    if cfg.notifications.webhook_url:
        url = cfg.notifications.webhook_url.resolve().get_secret_value()
        out.append(
            (
                cfg.name,
                CustomWebhookNotificationBlock(
                    name=f"{cfg.name}-notifier",
                    url=url,
                    method="POST",
                    json_data={"subject": "{{subject}}", "body": "{{body}}", "platform": cfg.name},
                ),
            )
        )
    return out


def load_blocks(cfg: PlatformConfig) -> list[str]:
    """Register block types and save every document (overwriting). Returns 'type/name' slugs."""
    from blocks.connections import BLOCK_TYPES

    for block_type in BLOCK_TYPES:
        block_type.register_type_and_schema()
    saved = []
    for name, block in build_blocks(cfg):
        block.save(name, overwrite=True)
        saved.append(f"{block.get_block_type_slug()}/{name}")
    return saved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocks.load", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="platform config YAML")
    parser.add_argument("--check", action="store_true", help="validate only; touch no Prefect server")
    args = parser.parse_args(argv)
    try:
        cfg = load_platform_config(args.config)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump({"valid": str(args.config), "platform": cfg.name}, sort_keys=False).strip())
        return 0
    try:
        saved = load_blocks(cfg)
    except LookupError as exc:  # a secret reference that does not resolve
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for slug in saved:
        print(f"saved {slug}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
