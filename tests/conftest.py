"""Session-wide fixtures: one Prefect test server, one sandbox platform, for the whole run.

In CI (CI=true) a test that needs a binary (prometheus, sshd, docker-registry) fails when it is
missing; on a developer machine it is skipped with the install command.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
FIXTURES = SHARED / "fixtures" / "seed"
CONTRACTS = SHARED / "contracts"
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_binary(name: str, package: str) -> str:
    """Path of a binary the test needs: fail in CI, skip elsewhere, when it is not installed."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path:
        return path
    message = f"{name} is not installed (Debian package {package!r}; `make install` installs it)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def prefect_server():
    """The one Prefect test server (SQLite) of this session."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory):
    """The sandbox platform, started once per session (20 nodes: 16 GPU nodes x 8 GPUs)."""
    need_binary("prometheus", "prometheus")
    from sandbox.platform import Sandbox
    from sandbox.prometheus import wait_for_first_scrape

    sb = Sandbox(state_dir=tmp_path_factory.mktemp("sandbox"), nodes=20).up()
    try:
        wait_for_first_scrape(sb)
        yield sb
    finally:
        sb.down()


@pytest.fixture
def clean_sandbox(sandbox):
    """The sandbox, restored to its seeded state (faults healed, objects re-seeded) after the test."""
    yield sandbox
    sandbox.reset()


@pytest.fixture(scope="session")
def sandbox_platform(sandbox, prefect_server) -> str:
    """Block documents for the sandbox loaded into the session's Prefect server; returns the platform name."""
    from blocks.config import load_platform_config
    from blocks.load import load_blocks

    cfg = load_platform_config(sandbox.platform_yaml)
    load_blocks(cfg)
    return cfg.name
