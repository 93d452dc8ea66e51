"""`blocks.platform.Platform`: each block loaded once per run, every secret known, clear errors."""

from __future__ import annotations

import asyncio

import pytest

pytestmark = pytest.mark.prefect

SECRETS = {"PT_GITLAB_TOKEN": "gl-token-0123456789", "PT_ARGO_TOKEN": "argo-token-abcdef",
           "PT_REGISTRY_PASSWORD": "registry-pw-xyz123", "PT_S3_KEY": "s3-key-id-7777",
           "PT_S3_SECRET": "s3-secret-8888", "PT_WEBHOOK": "http://127.0.0.1:9/hook/webhook-token-999"}


@pytest.fixture(scope="module")
def platform_name(prefect_server):
    from blocks.config import parse_platform_config
    from blocks.load import load_blocks

    mp = pytest.MonkeyPatch()
    for key, value in SECRETS.items():
        mp.setenv(key, value)
    cfg = parse_platform_config({
        "name": "platform-test", "clusters": [{"name": "platform-test"}],
        "gitlab": {"api_url": "http://127.0.0.1:9", "token": {"env": "PT_GITLAB_TOKEN"},
                   "ssh": {"host": "127.0.0.1"}},
        "argo": {"url": "http://127.0.0.1:9", "token": {"env": "PT_ARGO_TOKEN"}},
        "registry": {"url": "http://127.0.0.1:9", "username": "ops", "password": {"env": "PT_REGISTRY_PASSWORD"}},
        "backup_store": {"kind": "s3", "endpoint_url": "http://127.0.0.1:9", "bucket": "platform-test",
                         "access_key_id": {"env": "PT_S3_KEY"}, "secret_access_key": {"env": "PT_S3_SECRET"}},
        "notifications": {"webhook_url": {"env": "PT_WEBHOOK"}},
    }, "platform-test")
    load_blocks(cfg)
    mp.undo()
    return cfg.name


def _count_loads(monkeypatch) -> list[str]:
    """Record every block document load (sync and async) made through Prefect's Block API."""
    from prefect.blocks.core import Block

    calls: list[str] = []
    aload, load = Block.aload.__func__, Block.load

    async def counting_aload(cls, name, *args, **kwargs):
        calls.append(f"{cls.get_block_type_slug()}/{name}")
        return await aload(cls, name, *args, **kwargs)

    monkeypatch.setattr(Block, "aload", classmethod(counting_aload))
    original = load.__wrapped__ if hasattr(load, "__wrapped__") else None
    assert original is not None, "Block.load is expected to be an async_dispatch wrapper"

    def sync_load(cls, name, *args, _sync=None, **kwargs):
        calls.append(f"{cls.get_block_type_slug()}/{name}")
        return original(cls, name, *args, **kwargs)

    monkeypatch.setattr(Block, "load", classmethod(sync_load))
    return calls


def test_each_block_is_loaded_once_per_platform(platform_name, monkeypatch):
    from blocks.platform import Platform

    calls = _count_loads(monkeypatch)
    plat = Platform(platform_name)
    for _ in range(3):
        plat.config, plat.gitlab_api(), plat.gitlab_host(), plat.argo(), plat.registry(), plat.notifier()
    store = plat.backup_store()
    assert plat.backup_store() is store, "the store (and its client) is built once per platform"
    assert sorted(calls) == sorted([
        "platform-settings/platform-test", "gitlab-api/platform-test", "gitlab-omnibus-host/platform-test",
        "argo-server/platform-test", "container-registry/platform-test",
        "custom-webhook/platform-test", "backup-store/platform-test"])
    plat.secrets()
    assert len(calls) == 7, f"secrets() reloaded blocks: {calls[7:]}"


def test_aopen_preloads_concurrently_and_accessors_reuse_them(platform_name, monkeypatch):
    from blocks.platform import Platform

    calls = _count_loads(monkeypatch)
    plat = asyncio.run(Platform.aopen(platform_name, "gitlab_host", "backup_store", "notifier"))
    assert sorted(calls) == ["backup-store/platform-test", "custom-webhook/platform-test",
                             "gitlab-omnibus-host/platform-test", "platform-settings/platform-test"]
    plat.gitlab_host(), plat.backup_store(), plat.notifier(), plat.config
    assert len(calls) == 4


def test_secrets_cover_every_secret_bearing_block(platform_name):
    from blocks.platform import Platform
    from tasks.redact import Redactor

    found = set(Platform(platform_name).secrets())
    assert set(SECRETS.values()) <= found
    assert set(asyncio.run(Platform(platform_name).asecrets())) == found
    text = " ".join(SECRETS.values())
    assert all(v not in Redactor.of(found).text(text) for v in SECRETS.values())


def test_missing_platform_and_missing_part_say_what_to_do(platform_name):
    from blocks.platform import Platform

    with pytest.raises(LookupError, match=r"platform 'no-such-platform' has no settings block: run "
                                          r"`python -m blocks.load"):
        _ = Platform("no-such-platform").config
    with pytest.raises(LookupError, match=r"no prometheus-server block named 'platform-test': add that section"):
        Platform(platform_name).prometheus()
    with pytest.raises(ValueError, match=r"unknown platform parts \['gitlab'\]"):
        asyncio.run(Platform(platform_name).aprefetch("gitlab"))

