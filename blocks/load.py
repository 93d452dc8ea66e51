"""Register the block types and create or update the block documents from a platform config.

    python -m blocks.load configs/platform.yaml              # save, and remove this platform's stale ones
    python -m blocks.load --keep-stale configs/platform.yaml # refuse (exit 3) while stale ones exist

Idempotent: running it twice leaves the same documents. Secret references in the file are
resolved here (environment variables or Prefect Secret blocks) and stored as `SecretStr`.

Every document is named by `block_name`: the platform's `name`, then the parts that make it one of
a kind (`<platform>-<cluster>` for a cluster's `KubernetesClusterConfig`, `<platform>-<cluster>-<host>`
for its hosts, `<platform>-scratch` for the drill GitLab), so two platforms on one Prefect server
never share a document. The config is the truth: a document of this platform that the config no
longer describes (a cluster removed or switched to in-cluster credentials, a scratch GitLab gone)
is removed after the new ones are saved, and named in the output. A document whose name another
platform on the server could own (platform `a` and platform `a-b`) is never removed, only reported.
"""

from __future__ import annotations

import argparse
import re
import sys
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, Callable

import yaml

from blocks.config import (
    ConfigError,
    PlatformConfig,
    SecretRef,
    SSHTarget,
    load_platform_config,
    parse_platform_config,
)

# The block types whose documents this loader writes, and the import path of each.
_KUBE_CONFIG = "prefect_kubernetes.credentials:KubernetesClusterConfig"
_WEBHOOK = "prefect.blocks.notifications:CustomWebhookNotificationBlock"
# The names the loader gives each type's documents: `<platform>-<...>` (a cluster's, a host's), or
# `<platform>` and `<platform>-scratch` (GitLab's); every other type: `<platform>` only.
_PREFIXED_SLUGS = {"kubernetes-cluster-config", "cluster-ssh-host"}
_SCRATCH_SLUGS = {"gitlab-omnibus-host", "gitlab-api"}


def block_name(platform: str, *parts: str) -> str:
    """The one name of a block document this project writes: `<platform>[-<part>...]`, lower-cased,
    anything but letters, digits and dashes made a dash (what Prefect accepts in a document name).

    `block_name("a", "gpu")` is cluster `gpu`'s `KubernetesClusterConfig` of platform `a`; the loader
    and `blocks.platform.Platform` both name documents through it."""
    raw = "-".join((platform, *(p for p in parts if p)))
    return re.sub(r"-{2,}", "-", re.sub(r"[^a-z0-9-]+", "-", raw.lower())).strip("-")


def kube_config_name(platform: str, cluster: str) -> str:
    """The `KubernetesClusterConfig` document of a cluster: `<platform>-<cluster>`."""
    return block_name(platform, cluster)


def cluster_host_name(platform: str, cluster: str, label: str) -> str:
    """The block document name of one control-plane or etcd host: `<platform>-<cluster>-<label>`."""
    return block_name(platform, cluster, label)


def etcd_host_name(platform: str, label: str) -> str:
    """The block document name of an etcd-lifecycle host (issue 16): `<platform>-etcd-<name>`."""
    return block_name(platform, "etcd", label)


def _type(path: str) -> Any:
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


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


@dataclass(frozen=True)
class _Doc:
    """One document a config describes: its type, its name, and how to build it (secrets resolved then)."""

    block_type: Any
    name: str
    make: Callable[[], Any]

    @property
    def slug(self) -> str:
        return f"{self.block_type.get_block_type_slug()}/{self.name}"


def _documents(cfg: PlatformConfig) -> list[_Doc]:
    """Every document the config describes, named but not built (another platform's saved config
    gives its names without its secrets or kubeconfig files)."""
    from blocks.connections import (
        ArgoServer,
        BackupStore,
        ContainerRegistry,
        GitLabAPI,
        GitLabHost,
        PlatformSettings,
        PrometheusServer,
        SSHHost,
    )

    p = cfg.name
    docs = [_Doc(PlatformSettings, p, lambda: PlatformSettings(config=cfg.model_dump(mode="json", exclude_none=True)))]
    kube_config = _type(_KUBE_CONFIG)
    for cluster in cfg.clusters:
        if cluster.kubeconfig is not None:
            docs.append(_Doc(kube_config, kube_config_name(p, cluster.name),
                             partial(kube_config.from_file, cluster.kubeconfig, context_name=cluster.context)))
    if cfg.gitlab:
        g = cfg.gitlab
        host_extra = {"backup_path": g.backup_path, "config_backup_path": g.config_backup_path,
                      "secrets_file": g.secrets_file, "backup_options": dict(g.backup_options)}
        docs.append(_Doc(GitLabHost, p, lambda: GitLabHost(**_ssh_fields(g.ssh), **host_extra)))
        docs.append(_Doc(GitLabAPI, p, lambda: GitLabAPI(url=g.api_url, token=_secret(g.token))))
        if g.scratch:
            s = g.scratch
            scratch_extra = dict(host_extra)
            for key in ("backup_path", "config_backup_path", "secrets_file"):
                if getattr(s, key):
                    scratch_extra[key] = getattr(s, key)
            docs.append(_Doc(GitLabHost, block_name(p, "scratch"),
                             lambda: GitLabHost(**_ssh_fields(s.ssh), **scratch_extra)))
            docs.append(_Doc(GitLabAPI, block_name(p, "scratch"), lambda: GitLabAPI(url=s.api_url,
                                                                                    token=_secret(s.token))))
    for cluster in cfg.clusters:  # the certificate lifecycle's control-plane and etcd hosts
        for role, hosts in (("control-plane", cluster.control_plane), ("etcd", cluster.etcd)):
            for h in hosts:
                docs.append(_Doc(SSHHost, cluster_host_name(p, cluster.name, h.label), partial(
                    lambda h, c, r: SSHHost(**_ssh_fields(h), cluster=c, role=r, label=h.label, root=h.root,
                                            apiserver_port=h.apiserver_port), h, cluster.name, role)))
    if cfg.etcd is not None:  # the etcd lifecycle's hosts and the restore drill's scratch host (issue 16)
        for h in [*cfg.etcd.hosts, *([cfg.etcd.scratch] if cfg.etcd.scratch else [])]:
            docs.append(_Doc(SSHHost, etcd_host_name(p, h.name), partial(
                lambda h: SSHHost(**_ssh_fields(h), cluster=cfg.clusters[0].name, role="etcd", label=h.name,
                                  root=h.root, apiserver_port=None), h)))
    if cfg.prometheus:
        docs.append(_Doc(PrometheusServer, p, lambda: PrometheusServer(url=cfg.prometheus.url,
                                                                       timeout_s=cfg.prometheus.timeout_s)))
    if cfg.argo:
        a = cfg.argo
        docs.append(_Doc(ArgoServer, p, lambda: ArgoServer(url=a.url, namespace=a.namespace, token=_secret(a.token),
                                                           verify_tls=a.verify_tls)))
    if cfg.registry:
        r = cfg.registry
        docs.append(_Doc(ContainerRegistry, p, lambda: ContainerRegistry(url=r.url, username=r.username,
                                                                         password=_secret(r.password))))
    if cfg.backup_store:
        b = cfg.backup_store
        docs.append(_Doc(BackupStore, p, lambda: BackupStore(
            kind=b.kind, path=str(b.path) if b.path else None, endpoint_url=b.endpoint_url, bucket=b.bucket,
            prefix=b.prefix, region=b.region, access_key_id=_secret(b.access_key_id),
            secret_access_key=_secret(b.secret_access_key))))
    if cfg.notifications.webhook_url:
        webhook = _type(_WEBHOOK)
        docs.append(_Doc(webhook, p, lambda: webhook(
            name=f"{p}-notifier", url=cfg.notifications.webhook_url.resolve().get_secret_value(), method="POST",
            json_data={"subject": "{{subject}}", "body": "{{body}}", "platform": p})))
    seen: dict[str, int] = {}
    for d in docs:
        seen[d.slug] = seen.get(d.slug, 0) + 1
    if clashes := sorted(s for s, n in seen.items() if n > 1):
        raise BlockNameClash(f"platform {p!r} describes two documents named {clashes} (a cluster named 'etcd' "
                             "beside etcd hosts, two host labels that differ only in case or punctuation): "
                             "rename one in the config")
    return docs


def document_names(cfg: PlatformConfig) -> list[str]:
    """The `type/name` of every document the config describes, without building any."""
    return [d.slug for d in _documents(cfg)]


def build_blocks(cfg: PlatformConfig) -> list[tuple[str, object]]:
    """The block documents a config describes, as (name, block) pairs, without saving them."""
    return [(d.name, d.make()) for d in _documents(cfg)]


class BlockNameClash(ValueError):
    """Two documents, of this platform or of two platforms on one server, would have one name."""


class StaleBlocks(RuntimeError):
    """`keep_stale=True` and the server holds documents of this platform that the config no longer describes."""

    def __init__(self, platform: str, stale: list[str]):
        self.stale = stale
        super().__init__(f"platform {platform!r} has {len(stale)} block document(s) its config no longer "
                         f"describes: {', '.join(stale)}; run without --keep-stale to remove them")


@dataclass
class LoadReport:
    """What `load_blocks` did: `type/name` of each document saved and removed, and what it left and why."""

    saved: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    left: list[str] = field(default_factory=list)


def _project_types() -> list[Any]:
    from blocks.connections import BLOCK_TYPES

    return [*BLOCK_TYPES, _type(_KUBE_CONFIG), _type(_WEBHOOK)]


def _server_documents(client) -> dict[str, Any]:
    """Every named document of the project's block types on the server: `type/name` -> BlockDocument."""
    from prefect.exceptions import ObjectNotFound, PrefectHTTPStatusError

    out: dict[str, Any] = {}
    for block_type in _project_types():
        slug, offset = block_type.get_block_type_slug(), 0
        while True:
            try:
                page = client.read_block_documents_by_type(slug, offset=offset, limit=200, include_secrets=False)
            except (ObjectNotFound, PrefectHTTPStatusError) as exc:
                if getattr(getattr(exc, "response", None), "status_code", 404) != 404:
                    raise
                break  # the type was never registered on this server: no documents
            out.update({f"{slug}/{doc.name}": doc for doc in page if not doc.is_anonymous})
            if len(page) < 200:
                break
            offset += len(page)
    return out


def _other_platforms(platform: str, docs: dict[str, Any]) -> dict[str, set[str] | None]:
    """The other platforms loaded on the server, each with the documents its saved config describes
    (None when that config no longer parses, e.g. saved by another version of the project)."""
    out: dict[str, set[str] | None] = {}
    for slug, doc in docs.items():
        kind, name = slug.split("/", 1)
        if kind != "platform-settings" or name == platform:
            continue
        try:
            out[name] = set(document_names(parse_platform_config(doc.data.get("config"), f"platform {name}")))
        except (ConfigError, BlockNameClash, TypeError, AttributeError):
            out[name] = None
    return out


def _owned(platform: str, slug: str) -> bool:
    """Whether `type/name` has the shape of a document the loader writes for `platform`."""
    kind, name = slug.split("/", 1)
    if kind in _PREFIXED_SLUGS:
        return name.startswith(platform + "-")
    return name == platform or (kind in _SCRATCH_SLUGS and name == block_name(platform, "scratch"))


def _plan(cfg: PlatformConfig, mine: list[str], server: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(stale documents of this platform to remove, documents left with why). Refuses a name clash."""
    others = _other_platforms(cfg.name, server)
    for other, names in sorted(others.items()):
        if names and (clash := sorted(set(mine) & names)):
            raise BlockNameClash(f"platform {cfg.name!r} and platform {other!r} on this Prefect server both describe "
                                 f"{clash}: rename a cluster, a host or one of the platforms")
    stale, left = [], []
    for slug in sorted(server):
        if slug in mine or not _owned(cfg.name, slug):
            continue
        owner = next((o for o in sorted(others, key=len, reverse=True)
                      if len(o) > len(cfg.name) and _owned(o, slug)), None)
        if owner is not None:  # `a-b-gpu` may be platform `a-b`'s: never remove another platform's
            left.append(f"{slug} (named like platform {owner!r}'s documents: not removed; delete it by hand "
                        f"if it was {cfg.name!r}'s)")
        else:
            stale.append(slug)
    # A cluster's block saved by an older loader under the bare cluster name: read by nothing now. Said,
    # not removed (it has no platform in its name), unless another platform's document has that name.
    legacy = [slug for slug in sorted({f"kubernetes-cluster-config/{c.name}" for c in cfg.clusters} & set(server))
              if not _owned(cfg.name, slug) and not any(_owned(o, slug) for o in others)]
    left += [f"{slug} (a bare cluster name, read by nothing since issue 21: delete it with `prefect block delete "
             f"{slug}` once no older checkout uses it)" for slug in legacy]
    return stale, left


def load_blocks(cfg: PlatformConfig, *, keep_stale: bool = False) -> LoadReport:
    """Register the block types, save every document the config describes (overwriting), then remove
    this platform's documents that it no longer describes. `keep_stale=True` refuses instead
    (raises `StaleBlocks` before anything is written). Every secret resolves before anything is written."""
    from prefect.client.orchestration import get_client

    from blocks.connections import BLOCK_TYPES

    docs = _documents(cfg)
    mine = [d.slug for d in docs]
    with get_client(sync_client=True) as client:
        server = _server_documents(client)
        stale, left = _plan(cfg, mine, server)
        if stale and keep_stale:
            raise StaleBlocks(cfg.name, stale)
        built = [(d, d.make()) for d in docs]
        for block_type in BLOCK_TYPES:
            block_type.register_type_and_schema()
        report = LoadReport(left=left)
        for d, block in built:
            block.save(d.name, overwrite=True)
            report.saved.append(d.slug)
        for slug in stale:
            client.delete_block_document(server[slug].id)
            report.removed.append(slug)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m blocks.load", description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="platform config YAML")
    parser.add_argument("--check", action="store_true", help="validate only; touch no Prefect server")
    parser.add_argument("--keep-stale", action="store_true",
                        help="refuse (exit 3, writing nothing) when the server holds documents of this platform "
                             "that the config no longer describes, instead of removing them")
    args = parser.parse_args(argv)
    try:
        cfg = load_platform_config(args.config)
        names = document_names(cfg)
    except (ConfigError, BlockNameClash) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.check:
        print(yaml.safe_dump({"valid": str(args.config), "platform": cfg.name, "documents": names},
                             sort_keys=False).strip())
        return 0
    try:
        report = load_blocks(cfg, keep_stale=args.keep_stale)
    except (LookupError, BlockNameClash) as exc:  # a secret reference that does not resolve; a name clash
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except StaleBlocks as exc:
        print(f"refused: {exc}", file=sys.stderr)
        for slug in exc.stale:
            print(f"stale {slug}", file=sys.stderr)
        return 3
    for slug in report.saved:
        print(f"saved {slug}")
    for slug in report.removed:
        print(f"removed {slug} (stale: the config no longer describes it)")
    for line in report.left:
        print(f"left {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
