"""`python -m sandbox up/down` as an operator runs it: ready quickly, kubectl works, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from sandbox._common import pid_alive
from sandbox.platform import Sandbox
from tests.conftest import need_binary


def test_up_status_down_leaves_no_process(tmp_path):
    need_binary("prometheus", "prometheus")
    state = tmp_path / "sb"
    env = dict(os.environ, HOME=str(tmp_path))
    start = time.monotonic()
    up = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(state), "up", "--nodes", "50"],
                        capture_output=True, text=True, timeout=120, env=env)
    elapsed = time.monotonic() - start
    assert up.returncode == 0, up.stderr
    assert elapsed < 60, f"sandbox up took {elapsed:.1f}s"
    sb = Sandbox.load(state)
    pids = [p["pid"] for p in sb.processes.values()]
    assert pids and all(pid_alive(p) for p in pids)
    try:
        kube_env = dict(env, KUBECONFIG=str(sb.kubeconfig))
        nodes = subprocess.run(["kubectl", "get", "nodes", "-o", "name"], env=kube_env, capture_output=True,
                               text=True, timeout=60, check=True).stdout.split()
        assert len(nodes) == 50
        gpu = subprocess.run(["kubectl", "get", "nodes", "-l", "nvidia.com/gpu.product", "-o", "name"],
                             env=kube_env, capture_output=True, text=True, timeout=60, check=True).stdout.split()
        assert len(gpu) == 46
        from blocks.config import load_platform_config

        assert load_platform_config(sb.platform_yaml).cluster().kubeconfig == sb.kubeconfig
        second = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(state), "up"],
                                capture_output=True, text=True, timeout=60, env=env)
        assert second.returncode == 1 and "already running" in second.stderr
        fault = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(state), "fault", "xid",
                                "--node", "gpu-node-0001", "--gpu", "2", "--value", "79"],
                               capture_output=True, text=True, timeout=60, env=env)
        assert fault.returncode == 0 and '"kind": "xid"' in fault.stdout
        bad = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(state), "fault", "xid",
                              "--node", "no-such-node"], capture_output=True, text=True, timeout=60, env=env)
        assert bad.returncode == 1 and "no-such-node" in bad.stderr
    finally:
        down = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(state), "down"],
                              capture_output=True, text=True, timeout=60, env=env)
    assert down.returncode == 0
    time.sleep(0.2)
    assert not any(pid_alive(p) for p in pids)
    leftovers = subprocess.run(["pgrep", "-f", str(state)], capture_output=True, text=True).stdout.split()
    assert leftovers == []


def test_down_without_sandbox_is_harmless(tmp_path):
    out = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(tmp_path), "down"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "no sandbox running" in out.stdout


@pytest.mark.parametrize("argv, message", [(["up", "--nodes", "1"], "--nodes: expected an integer >= 2")])
def test_bad_arguments(tmp_path, argv, message):
    out = subprocess.run([sys.executable, "-m", "sandbox", "--state-dir", str(tmp_path), *argv],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and message in out.stderr
