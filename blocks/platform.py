"""What a flow gets from the platform's block documents: config, clients, connections."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from blocks.config import PlatformConfig


@dataclass
class Platform:
    """The platform named `name`, as loaded by `python -m blocks.load`."""

    name: str

    @cached_property
    def config(self) -> PlatformConfig:
        from blocks.connections import PlatformSettings

        try:
            return PlatformSettings.load(self.name).platform()
        except ValueError as exc:
            raise LookupError(
                f"platform {self.name!r} has no settings block: run `python -m blocks.load <platform.yaml>` first"
            ) from exc

    def kubernetes_api_client(self, cluster: str | None = None):
        """An official `kubernetes` ApiClient built from the cluster's KubernetesClusterConfig block."""
        from tasks.kubernetes import api_client_for

        cfg = self.config.cluster(cluster)
        return api_client_for(cfg)

    def _load(self, block_type, suffix: str = ""):
        name = f"{self.name}{suffix}"
        try:
            return block_type.load(name)
        except ValueError as exc:
            raise LookupError(
                f"no {block_type.get_block_type_slug()} block named {name!r}: add that section to the "
                f"platform config and run `python -m blocks.load`"
            ) from exc

    def prometheus(self):
        from blocks.connections import PrometheusServer

        return self._load(PrometheusServer)

    def gitlab_host(self, scratch: bool = False):
        from blocks.connections import GitLabHost

        return self._load(GitLabHost, "-scratch" if scratch else "")

    def gitlab_api(self, scratch: bool = False):
        from blocks.connections import GitLabAPI

        return self._load(GitLabAPI, "-scratch" if scratch else "")

    def argo(self):
        from blocks.connections import ArgoServer

        return self._load(ArgoServer)

    def registry(self):
        from blocks.connections import ContainerRegistry

        return self._load(ContainerRegistry)

    def backup_store(self):
        from blocks.connections import BackupStore

        return self._load(BackupStore)

    def notifier(self):
        """The failure webhook, or None when the config names none."""
        from prefect.blocks.notifications import CustomWebhookNotificationBlock

        try:
            return CustomWebhookNotificationBlock.load(self.name)
        except ValueError:
            return None
