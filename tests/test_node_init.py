"""Node initialisation: the node_init role passes ansible-lint, runs only in check mode here (the sandbox's
sshd hosts are this very machine: nothing may change), and check-node-drift reports per host what differs.
init-nodes, an operation, is driven by the contract (tests/operation_scenarios/provisioning.py) with the
sandbox's stand-in playbook (sandbox/node_init_standin), never the real role outside check mode."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import run_flow_sync

REPO = Path(__file__).resolve().parent.parent
ROLE = REPO / "configs" / "ansible" / "roles" / "node_init"
PLAYBOOK = REPO / "configs" / "ansible" / "node-init.yml"
# what the role would write: none of it may change during these tests
WATCHED = ["/etc/sysctl.d", "/etc/security/limits.d", "/etc/apt/apt.conf.d", "/etc/modules-load.d",
           "/etc/fstab", "/etc/systemd/timesyncd.conf.d", "/etc/apt/sources.list.d", "/usr/share/keyrings",
           "/var/coredump", "/etc/containerd"]


def _lint(*paths: Path, cwd: Path = REPO) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).parent / "ansible-lint"
    if not exe.exists():
        pytest.fail("ansible-lint is not installed: it is a test dependency (`make install` installs it)")
    env = {**os.environ, "ANSIBLE_LINT_SKIP_SCHEMA_UPDATE": "1", "ANSIBLE_LINT_NODEPS": "1",
           "PATH": str(exe.parent) + os.pathsep + os.environ.get("PATH", "")}
    return subprocess.run([str(exe), "--offline", "--profile", "production", *map(str, paths)], check=False, cwd=cwd,
                          env=env,
                          capture_output=True, text=True, timeout=300)


def _tasks() -> list[dict]:
    out = []
    for f in sorted((ROLE / "tasks").glob("*.yml")) + [ROLE / "handlers" / "main.yml"]:
        out += [dict(t, _file=f.name) for t in yaml.safe_load(f.read_text()) or []]
    return out


def test_role_passes_ansible_lint_and_lint_can_fail(tmp_path):
    result = _lint(PLAYBOOK, ROLE)
    assert result.returncode == 0, result.stdout + result.stderr
    # the same lint rejects the guide's habits: blanket ignore_errors, shell without changed_when
    bad = tmp_path / "roles" / "node_init"
    shutil.copytree(ROLE, bad)
    (bad / "tasks" / "bad.yml").write_text(
        "---\n- name: Add a key the old way\n  ansible.builtin.shell: curl -s https://example.invalid/k | apt-key add -\n"
        "  ignore_errors: true\n")
    with (bad / "tasks" / "main.yml").open("a") as fh:
        fh.write("- name: The guide's way\n  ansible.builtin.import_tasks: bad.yml\n")
    shutil.copy(PLAYBOOK, tmp_path / "node-init.yml")
    result = _lint(tmp_path / "node-init.yml", bad, cwd=tmp_path)
    assert result.returncode != 0 and "ignore-errors" in result.stdout + result.stderr


def test_role_is_clean_by_construction():
    text = "\n".join(p.read_text() for p in ROLE.rglob("*") if p.is_file())
    assert "ignore_errors" not in text and "apt-key" not in text and "curl" not in text
    for concern in ("apt", "swap", "time", "limits", "kernel", "nvidia", "packages"):
        assert (ROLE / "tasks" / f"{concern}.yml").is_file()
    defaults = yaml.safe_load((ROLE / "defaults" / "main.yml").read_text())
    assert defaults["node_init_nofile"] == 1048576 and "ip_vs" in defaults["node_init_kernel_modules"]
    assert defaults["node_init_gpu"] == "{{ node_init_gpu_group in group_names }}"
    tasks = _tasks()
    # the only tasks that run in check mode too are read-only queries that never report a change
    live = [t for t in tasks if t.get("check_mode") is False]
    assert {t["name"] for t in live} == {"Read the state of the packages the role manages",
                                         "Read whether the container runtime knows the nvidia runtime"}
    for t in live:
        argv = t["ansible.builtin.command"]["argv"]
        assert t["changed_when"] is False and (argv.startswith("{{ ['dpkg-query', '-W'") if isinstance(argv, str)
                                               else argv[:2] == ["grep", "-qs"])
    # the key comes from get_url with a pinned checksum into a keyring; the repo is deb822 with Signed-By
    get_url = next(t["ansible.builtin.get_url"] for t in tasks if "ansible.builtin.get_url" in t)
    assert get_url["checksum"] == "{{ node_init_nvidia_gpgkey_checksum }}"
    assert "Signed-By: {{ node_init_nvidia_keyring }}" in (ROLE / "templates" / "nvidia-container-toolkit.sources.j2").read_text()
    main = yaml.safe_load((ROLE / "tasks" / "main.yml").read_text())
    assert next(t for t in main if t["ansible.builtin.import_tasks"] == "nvidia.yml")["when"] == "node_init_gpu | bool"


def _snapshot() -> dict[str, str]:
    out = {}
    for top in WATCHED:
        p = Path(top)
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else []
        out[top + "/"] = "exists" if p.exists() else "absent"
        for f in files:
            try:
                out[str(f)] = hashlib.sha256(f.read_bytes()).hexdigest()
            except OSError:
                out[str(f)] = "unreadable"
    sel = subprocess.run(["dpkg", "--get-selections"], check=False, capture_output=True, text=True) if shutil.which("dpkg") else None
    out["dpkg-selections"] = hashlib.sha256((sel.stdout if sel else "").encode()).hexdigest()
    return out


@pytest.fixture(scope="module")
def node_platform(cert_sandbox, sandbox_platform):
    from blocks.config import load_platform_config

    cfg = load_platform_config(cert_sandbox.platform_yaml)
    assert cfg.clusters[0].kubespray is not None, "the sandbox has no provisioning component"
    return sandbox_platform, cfg.clusters[0].kubespray


@pytest.mark.sandbox
@pytest.mark.prefect
def test_check_node_drift_reports_per_host_and_changes_nothing(node_platform):
    from flows.node_init import check_node_drift

    platform, _ = node_platform
    before = _snapshot()
    state = run_flow_sync(check_node_drift, platform=platform, hosts=["cp-1", "gpu-node-0001"])
    after = _snapshot()
    assert before == after, {k: (before.get(k), after.get(k)) for k in set(before) | set(after)
                             if before.get(k) != after.get(k)}
    assert state.is_completed(), state.message
    result = state.result()
    assert result["unknown"] == [] and sorted(result["drifted"]) == ["cp-1", "gpu-node-0001"]
    by_host: dict[str, dict[str, str]] = {}
    for r in result["rows"]:
        by_host.setdefault(r["host"], {})[r["task"]] = r["diff"]
    # this machine has none of the role's files: each shows as drift with the file's new content
    for host in ("cp-1", "gpu-node-0001"):
        tasks = by_host[host]
        assert "nofile 1048576" in tasks["Raise the open files limit and allow core dumps"]
        assert "net.ipv6.conf.all.disable_ipv6 = 1" in tasks["Write the sysctls (IPv6, core dumps, network, IPVS keepalive)"]
        assert "ip_vs" in tasks["Load the IPVS and network modules at boot"]
        assert tasks["Turn periodic apt runs off"].startswith("10periodic: ") and "20auto-upgrades: " in tasks[
            "Turn periodic apt runs off"]
        assert "+net.core.somaxconn = 32768" in tasks["Write the sysctls (IPv6, core dumps, network, IPVS keepalive)"]
    # the NVIDIA runtime only on the GPU node (sandbox group gpu-node)
    assert any("NVIDIA" in t for t in by_host["gpu-node-0001"]) and not any("NVIDIA" in t for t in by_host["cp-1"])
    assert "Signed-By:" in by_host["gpu-node-0001"][
        "Add the NVIDIA container toolkit repository (deb822, signed-by its keyring)"]
    assert set(result["recap"]) == {"cp-1", "gpu-node-0001"}
    assert all(c["failed"] == 0 and c["unreachable"] == 0 for c in result["recap"].values())


def test_unreachable_or_failed_host_is_unknown_not_in_sync():
    from tasks.ansible_events import RunTally, TaskFailure
    from tasks.node_drift import drift_rows, drift_summary

    tally = RunTally(hosts={"a": {}, "b": {}}, failures=[TaskFailure("c", "Gathering Facts", "refused", True),
                                                         TaskFailure("b", "node_init : x", "boom")],
                     results={"a": {"node_init : t": {"changed": True}, "node_init : u": {"changed": False}}},
                     diffs={"a": [{"task": "node_init : t", "diff": [{"before": "x\n", "after": "y\n",
                                                                       "after_header": "/etc/f"}]}]})
    rows = drift_rows(tally, ["a", "b", "c", "d"])
    assert {"host": "a", "state": "drift", "task": "node_init : t", "diff": "/etc/f: -x | +y"} in rows
    assert drift_summary(rows) == {"drifted": ["a"], "in_sync": [], "unknown": ["b", "c", "d"]}
