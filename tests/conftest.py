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
FIXTURES = REPO / "tests" / "fixtures" / "seed"  # the platform guide's files, see tests/fixtures/README.md
CONTRACTS = REPO / "contracts"  # published contracts, see contracts/README.md
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need_binary(name: str, package: str) -> str:
    """Path of a binary the test needs: fail in CI, skip elsewhere, when it is not installed."""
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path:
        return path
    _unavailable(f"{name} is not installed (Debian package {package!r}; `make install` installs it)")


def need_root(why: str) -> None:
    """The test needs root (CI runs as root): fail in CI, skip elsewhere, when not root."""
    if os.geteuid() != 0:
        _unavailable(f"needs root: {why}")


def _unavailable(message: str) -> None:
    """What a test cannot have here: a failure in CI (nothing may be silently skipped there), a skip elsewhere."""
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


# --- GitLab backup and restore (issue 4) ----------------------------------------------------------


def run_flow_sync(flow_fn, **params):
    """Run an (async) flow to completion from a sync test; returns its final State."""
    import asyncio
    import inspect

    result = flow_fn(**params, return_state=True)
    return asyncio.run(result) if inspect.iscoroutine(result) else result


@pytest.fixture(scope="session")
def gitlab_sandbox(sandbox, sandbox_platform):
    """The sandbox's GitLab hosts, API stand-ins and S3 store, with block documents loaded."""
    need_binary("sshd", "openssh-server")
    if "gitlab" not in sandbox.config:
        pytest.fail("the sandbox has no GitLab host component (sandbox/platform.py COMPONENTS)")
    return sandbox


@pytest.fixture(scope="session")
def gitlab_backup_state(gitlab_sandbox, sandbox_platform):
    """One successful `gitlab_backup` run of the session's production GitLab (its final State)."""
    import logging

    from flows.gitlab_backup import gitlab_backup

    # INFO for this run: the tests read its streamed command output back from the server's logs
    loggers = [logging.getLogger(n) for n in ("prefect.flow_runs", "prefect.task_runs")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.INFO)
    try:
        state = run_flow_sync(gitlab_backup, platform=sandbox_platform)
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
    assert state.is_completed(), state.message
    return state


# --- training on Argo (issue 5) -------------------------------------------------------------------


@pytest.fixture(scope="session")
def training_platform(sandbox, sandbox_platform):
    """The sandbox platform as the training flows use it: the Argo stand-in, the production GitLab API
    stand-in (its CI routes: files, commit statuses, notes) and the sandbox's registry (Debian's
    docker-registry, `sandbox/registry.py`). Returns its validated config."""
    from blocks.config import load_platform_config

    need_binary("docker-registry", "docker-registry")
    if "argo" not in sandbox.config or "registry" not in sandbox.config:
        pytest.fail("the sandbox has no training component (sandbox/platform.py COMPONENTS)")
    return load_platform_config(sandbox.platform_yaml)


# --- certificates (issue 12) ----------------------------------------------------------------------


@pytest.fixture(scope="session")
def cert_sandbox(sandbox, sandbox_platform):
    """The sandbox's control-plane and etcd hosts (sshd, kubeadm/kubespray PKI), TLS listeners and TLS
    secrets, with block documents loaded (one `cluster-ssh-host` per host)."""
    need_binary("sshd", "openssh-server")
    need_binary("openssl", "openssl")
    if "certificates" not in sandbox.config or not sandbox.config["clusters"][0].get("control_plane"):
        pytest.fail("the sandbox has no control-plane component (sandbox/platform.py COMPONENTS)")
    return sandbox


@pytest.fixture
def fresh_control_plane(cert_sandbox):
    """The control-plane hosts as the sandbox laid them out (a renewal test changes them), TLS secrets seeded
    again (a `reset` of the sandbox removes them), API servers serving again."""
    from sandbox.control_plane import reset_control_plane, wait_serving

    reset_control_plane(cert_sandbox)
    wait_serving(cert_sandbox)
    return cert_sandbox


# --- etcd (issue 16) -----------------------------------------------------------------------------


@pytest.fixture(scope="session")
def etcd_platform(sandbox, sandbox_platform):
    need_binary("etcd", "etcd-server")
    need_binary("etcdctl", "etcd-client")
    need_binary("sshd", "openssh-server")
    if "etcd" not in sandbox.config:
        pytest.fail("the sandbox has no etcd component (sandbox/platform.py COMPONENTS)")
    from sandbox.etcd import put_keys

    put_keys(sandbox.extra["etcd"], "etcd1", 60, prefix="/registry/flows/")
    return sandbox_platform
