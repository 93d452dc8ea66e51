"""One way to reach the platform: a flow opens a `Platform` once and hands its clients to its tasks.

    plat = Platform("main")                            # sync flows
    plat = await Platform.aopen("main", "gitlab_host", "backup_store")   # async flows: preloads
    api = plat.kubernetes()                           # official `kubernetes` ApiClient
    host = plat.gitlab_host()                         # GitLabHost block (SSH connect kwargs)

Each block document is loaded at most once per `Platform` (one per flow run), the way
prefect-kubernetes' `KubernetesCredentials.get_client` hands out a client: flows load, tasks
receive what they need and never load a block by name. `secrets()` gives every secret value the
platform's blocks hold, for `tasks.redact`.

Blocks are loaded with `_sync=True` when a sync accessor is called, so an accessor never returns
a coroutine by surprise inside an async flow; `aopen`/`aprefetch` load them concurrently and
without blocking the event loop.
"""

from __future__ import annotations

import asyncio
from typing import Any

from blocks.config import PlatformConfig

# The parts a platform can have: (block type import path, document name part after the platform's name,
# as `blocks.load.block_name` joins them).
_PARTS: dict[str, tuple[str, str]] = {
    "settings": ("blocks.connections:PlatformSettings", ""),
    "gitlab_host": ("blocks.connections:GitLabHost", ""),
    "gitlab_host_scratch": ("blocks.connections:GitLabHost", "scratch"),
    "gitlab_api": ("blocks.connections:GitLabAPI", ""),
    "gitlab_api_scratch": ("blocks.connections:GitLabAPI", "scratch"),
    "prometheus": ("blocks.connections:PrometheusServer", ""),
    "argo": ("blocks.connections:ArgoServer", ""),
    "registry": ("blocks.connections:ContainerRegistry", ""),
    "backup_store": ("blocks.connections:BackupStore", ""),
    "notifier": ("prefect.blocks.notifications:CustomWebhookNotificationBlock", ""),
}
# Parts that are optional: a missing document is `None`, not an error.
_OPTIONAL = {"notifier"}
# Secret-bearing fields of the blocks above: `SecretStr` fields, and the notifier's URL (the config
# treats a webhook URL as a secret: it usually carries the token, as Slack's and Teams' do).
_SECRET_FIELDS = ("token", "password", "private_key", "access_key_id", "secret_access_key")
_PLAIN_SECRET_FIELDS = {"notifier": ("url",)}


def _block_type(path: str):
    import importlib

    module, name = path.split(":")
    return getattr(importlib.import_module(module), name)


class Platform:
    """The platform named `name`, as `python -m blocks.load` saved it; one instance per flow run."""

    def __init__(self, name: str):
        self.name = name
        self._blocks: dict[str, Any] = {}
        self._kube: dict[str, Any] = {}
        self._store: Any = None

    def __repr__(self) -> str:
        return f"Platform({self.name!r}, loaded={sorted(self._blocks)})"

    # -- loading --------------------------------------------------------------------------------

    def _doc_name(self, part: str) -> str:
        from blocks.load import block_name

        return block_name(self.name, _PARTS[part][1])

    def _missing(self, part: str) -> Exception:
        block_type = _block_type(_PARTS[part][0])
        if part == "settings":
            return LookupError(f"platform {self.name!r} has no settings block: run "
                               "`python -m blocks.load <platform.yaml>` first")
        return LookupError(f"no {block_type.get_block_type_slug()} block named {self._doc_name(part)!r}: add that "
                           "section to the platform config and run `python -m blocks.load <platform.yaml>`")

    def _part(self, part: str) -> Any:
        if part not in self._blocks:
            try:
                self._blocks[part] = _block_type(_PARTS[part][0]).load(self._doc_name(part), _sync=True)
            except ValueError as exc:
                if part not in _OPTIONAL:
                    raise self._missing(part) from exc
                self._blocks[part] = None
        return self._blocks[part]

    async def _apart(self, part: str) -> Any:
        if part not in self._blocks:
            try:
                block = await _block_type(_PARTS[part][0]).aload(self._doc_name(part))
            except ValueError as exc:
                if part not in _OPTIONAL:
                    raise self._missing(part) from exc
                block = None
            self._blocks.setdefault(part, block)
        return self._blocks[part]

    async def aprefetch(self, *parts: str) -> Platform:
        """Load the settings and the named parts concurrently (async flows call this once)."""
        unknown = [p for p in parts if p not in _PARTS]
        if unknown:
            raise ValueError(f"unknown platform parts {unknown}; known: {sorted(_PARTS)}")
        await asyncio.gather(*(self._apart(p) for p in ("settings", *parts)))
        return self

    @classmethod
    async def aopen(cls, name: str, *parts: str) -> Platform:
        """A Platform with its settings and the named parts already loaded."""
        return await cls(name).aprefetch(*parts)

    # -- what flows hand to tasks ---------------------------------------------------------------

    @property
    def config(self) -> PlatformConfig:
        """The validated platform config (thresholds, names, secret references only)."""
        return self._part("settings").platform()

    def kubernetes(self, cluster: str | None = None):
        """An official `kubernetes` ApiClient for the cluster, built once per run.

        The config decides: a cluster without a `kubeconfig` uses the in-cluster service account
        and no block is ever read for it; a cluster with one uses the `KubernetesClusterConfig`
        block `<platform>-<cluster>` that `python -m blocks.load` made from that kubeconfig, or,
        when that block is not saved, the kubeconfig file itself. No other document is read, so
        another platform's cluster of the same name or a stale block never answers.
        """
        cfg = self.config.cluster(cluster)
        if cfg.name not in self._kube:
            self._kube[cfg.name] = _kubernetes_client(self.name, cfg)
        return self._kube[cfg.name]

    def gitlab_host(self, scratch: bool = False):
        """The omnibus GitLab host block (`connect_kwargs()` for SSH); `scratch` is the drill host."""
        return self._part("gitlab_host_scratch" if scratch else "gitlab_host")

    def gitlab_api(self, scratch: bool = False):
        """GitLab's API block (`get_client()` gives a python-gitlab client)."""
        return self._part("gitlab_api_scratch" if scratch else "gitlab_api")

    def prometheus(self):
        return self._part("prometheus")

    def cluster_hosts(self, cluster: str | None = None) -> list:
        """The cluster's control-plane hosts, then its etcd hosts: `SSHHost` blocks (`connect_kwargs()`),
        in the config's order, each loaded once per run."""
        return [self._cluster_host(cfg.name, h) for cfg in [self.config.cluster(cluster)]
                for h in (*cfg.control_plane, *cfg.etcd)]

    def _cluster_host(self, cluster: str, host) -> Any:
        from blocks.load import cluster_host_name

        return self._ssh_host(cluster_host_name(self.name, cluster, host.label))

    def _ssh_host(self, doc: str) -> Any:
        """The `SSHHost` block named `doc` (a cluster's or an etcd host's), loaded once."""
        from blocks.connections import SSHHost

        key = f"ssh-host:{doc}"
        if key not in self._blocks:
            try:
                self._blocks[key] = SSHHost.load(doc, _sync=True)
            except ValueError as exc:
                raise LookupError(f"no cluster-ssh-host block named {doc!r}: run `python -m blocks.load "
                                  "<platform.yaml>`") from exc
        return self._blocks[key]

    def etcd_hosts(self) -> list:
        """The etcd lifecycle's hosts (`etcd.hosts[]`, issue 16): `SSHHost` blocks, in the config's order."""
        etcd = self.config.etcd
        if etcd is None:
            raise LookupError(f"platform {self.name!r} has no `etcd` section in its config")
        return [self._etcd_host(h.name) for h in etcd.hosts]

    def etcd_scratch_host(self):
        """The restore drill's scratch host (`etcd.scratch`): an `SSHHost` block."""
        etcd = self.config.etcd
        if etcd is None or etcd.scratch is None:
            raise LookupError(f"platform {self.name!r} has no `etcd.scratch` host for the restore drill")
        return self._etcd_host(etcd.scratch.name)

    def _etcd_host(self, label: str) -> Any:
        from blocks.load import etcd_host_name

        return self._ssh_host(etcd_host_name(self.name, label))

    def argo(self):
        return self._part("argo")

    def registry(self):
        return self._part("registry")

    def backup_store(self):
        """The off-site store (`tasks.storage.Store`) over the platform's BackupStore block, built once."""
        if self._store is None:
            self._store = self._part("backup_store").get_store()
        return self._store

    def notifier(self):
        """The failure webhook (Prefect's CustomWebhookNotificationBlock), or None when none is configured."""
        return self._part("notifier")

    def secrets(self) -> list[str]:
        """Every secret value held by this platform's blocks: what `tasks.redact` must never let through.

        Loads the secret-bearing blocks the config describes (once); a block that is not saved
        has no secrets to hide.
        """
        out: list[str] = []
        for part in _secret_parts(self.config):
            try:
                out += secret_values(self._part(part), _PLAIN_SECRET_FIELDS.get(part, ()))
            except LookupError:
                self._blocks.setdefault(part, None)
        for cluster in self.config.clusters:  # the control-plane and etcd hosts' SSH keys
            for host in (*cluster.control_plane, *cluster.etcd):
                try:
                    out += secret_values(self._cluster_host(cluster.name, host))
                except LookupError:
                    pass
        etcd = self.config.etcd  # the etcd lifecycle's hosts' SSH keys (issue 16)
        for h in [*(etcd.hosts if etcd else []), *([etcd.scratch] if etcd and etcd.scratch else [])]:
            try:
                out += secret_values(self._etcd_host(h.name))
            except LookupError:
                pass
        return out

    async def asecrets(self) -> list[str]:
        """`secrets()` for async flows: the same list, loaded off the event loop."""
        return await asyncio.to_thread(self.secrets)


def _secret_parts(cfg: PlatformConfig) -> list[str]:
    """The parts of a platform whose blocks hold secrets, as its config describes them."""
    scratch = cfg.gitlab is not None and cfg.gitlab.scratch is not None
    present = {"gitlab_api": cfg.gitlab is not None, "gitlab_host": cfg.gitlab is not None,
               "gitlab_api_scratch": scratch, "gitlab_host_scratch": scratch, "argo": cfg.argo is not None,
               "registry": cfg.registry is not None, "backup_store": cfg.backup_store is not None,
               "notifier": cfg.notifications.webhook_url is not None}
    return [part for part, there in present.items() if there]


def secret_values(block: Any, plain_fields: tuple[str, ...] = ()) -> list[str]:
    """The values of a block's `SecretStr` fields and of `plain_fields` (for redaction only)."""
    if block is None:
        return []
    out = []
    for attr in _SECRET_FIELDS:
        value = getattr(block, attr, None)
        if value is not None and hasattr(value, "get_secret_value"):
            out.append(value.get_secret_value())
    out += [getattr(block, attr) for attr in plain_fields if isinstance(getattr(block, attr, None), str)]
    return [v for v in out if v]


def _kubernetes_client(platform: str, cluster):
    """An ApiClient as the config says: in-cluster credentials, or the cluster's kubeconfig (as the
    loader saved it in `KubernetesClusterConfig/<platform>-<cluster>`, else the file)."""
    from kubernetes import client as k8s
    from kubernetes import config as k8s_config
    from prefect_kubernetes.credentials import KubernetesClusterConfig

    from blocks.load import kube_config_name

    if cluster.kubeconfig is None:  # in-cluster by the config: a block left by an older config never wins
        configuration = k8s.Configuration()
        k8s_config.load_incluster_config(client_configuration=configuration)
        return k8s.ApiClient(configuration)
    doc = kube_config_name(platform, cluster.name)
    try:
        block = KubernetesClusterConfig.load(doc, _sync=True)
    except ValueError:  # not saved (the loader not run since the kubeconfig was set): read the file itself
        if not cluster.kubeconfig.is_file():
            raise LookupError(f"cluster {cluster.name!r} of platform {platform!r}: no kubernetes-cluster-config "
                              f"block named {doc!r} and no kubeconfig file {str(cluster.kubeconfig)!r} on this "
                              "machine: run `python -m blocks.load <platform.yaml>`") from None
        return k8s_config.new_client_from_config(str(cluster.kubeconfig), context=cluster.context)
    return k8s_config.new_client_from_config_dict(block.config, context=block.context_name)
