"""Start, describe, fault and stop the sandbox platform. Everything listens on 127.0.0.1 only.

`Sandbox(state_dir).up(nodes=50)` starts each component in `COMPONENTS` in order, records
every process it starts (PID, argv) in ``state.json``, and writes ``kubeconfig`` and
``platform.yaml`` (a valid platform config pointing at the sandbox). `down()` stops exactly
those PIDs. Components are plain functions ``start(sb: Sandbox) -> None`` that call
`sb.spawn(...)` and fill in their section of `sb.config`; a later lifecycle adds its stand-ins
(sshd GitLab host, registry, S3, Argo, GitLab API) by appending its function to `COMPONENTS`.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import httpx
import yaml

from sandbox.cluster import gpu_node_count

DEFAULT_STATE_DIR = Path(__file__).resolve().parent / ".state"
PYTHON = sys.executable


class SandboxError(RuntimeError):
    pass


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check: Callable[[], bool], what: str, timeout_s: float = 30.0, proc: subprocess.Popen | None = None,
             log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text()[-2000:] if log and log.exists() else ""
            raise SandboxError(f"{what} exited with code {proc.returncode} while starting:\n{tail}")
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        time.sleep(0.1)
    tail = log.read_text()[-2000:] if log and log.exists() else ""
    raise SandboxError(f"{what} was not ready within {timeout_s:.0f}s\n{tail}")


def http_ok(url: str) -> Callable[[], bool]:
    return lambda: httpx.get(url, timeout=2.0).status_code < 500


def require_binary(name: str, package: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if not path:
        raise SandboxError(f"{name} not found: install the Debian package {package!r} (make install does)")
    return path


@dataclass
class Sandbox:
    state_dir: Path = DEFAULT_STATE_DIR
    nodes: int = 50
    gpu_nodes: int | None = None
    profile: str = "full"
    scrape_interval_s: int | None = None
    config: dict[str, Any] = field(default_factory=dict)
    urls: dict[str, str] = field(default_factory=dict)
    processes: dict[str, dict[str, Any]] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    # -- paths -------------------------------------------------------------------------------

    @property
    def state_file(self) -> Path:
        return self.state_dir / "state.json"

    @property
    def kubeconfig(self) -> Path:
        return self.state_dir / "kubeconfig"

    @property
    def platform_yaml(self) -> Path:
        return self.state_dir / "platform.yaml"

    def path(self, *parts: str) -> Path:
        p = self.state_dir.joinpath(*parts)
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    # -- processes ---------------------------------------------------------------------------

    def spawn(self, name: str, argv: list[str], *, env: dict[str, str] | None = None,
              cwd: Path | None = None) -> subprocess.Popen:
        """Start a component process (its own session, output to logs/NAME.log) and record its PID."""
        log = self.path("logs", f"{name}.log")
        full_env = dict(os.environ)
        full_env.update(env or {})
        with open(log, "ab") as out:
            proc = subprocess.Popen(
                argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=full_env,
                cwd=str(cwd) if cwd else None, start_new_session=True,
            )
        self.processes[name] = {"pid": proc.pid, "argv": argv, "log": str(log)}
        self._save()
        return proc

    def log_of(self, name: str) -> Path:
        return Path(self.processes[name]["log"])

    def stop_process(self, name: str, timeout_s: float = 5.0) -> None:
        info = self.processes.pop(name, None)
        if info:
            _kill(info["pid"], timeout_s)
        self._save()

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self, components: list[Callable[[Sandbox], None]] | None = None) -> Sandbox:
        """Start `components` (default: all of `COMPONENTS`), in order."""
        if self.state_file.exists():
            existing = Sandbox.load(self.state_dir)
            if existing.alive():
                raise SandboxError(f"a sandbox is already running from {self.state_dir}; run `python -m sandbox down`")
            existing.down()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.gpu_nodes is None:
            self.gpu_nodes = gpu_node_count(self.nodes)
        if self.scrape_interval_s is None:
            self.scrape_interval_s = 2 if self.gpu_nodes <= 200 else (15 if self.gpu_nodes <= 2500 else 60)
        self.config = {"name": "sandbox", "clusters": [], "thresholds": {}}
        try:
            for start in components if components is not None else COMPONENTS:
                start(self)
                self._save()
        except BaseException:
            self.down()
            raise
        self.platform_yaml.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self._save()
        return self

    def down(self) -> list[int]:
        stopped = []
        for name in reversed(list(self.processes)):
            pid = self.processes[name]["pid"]
            if _kill(pid):
                stopped.append(pid)
        self.processes = {}
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def alive(self) -> bool:
        return any(_pid_alive(p["pid"]) for p in self.processes.values())

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "nodes": self.nodes, "gpu_nodes": self.gpu_nodes, "profile": self.profile,
            "scrape_interval_s": self.scrape_interval_s, "urls": self.urls, "processes": self.processes,
            "extra": self.extra, "config": self.config,
        }
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_file)

    @classmethod
    def load(cls, state_dir: Path = DEFAULT_STATE_DIR) -> Sandbox:
        state_file = Path(state_dir) / "state.json"
        if not state_file.exists():
            raise SandboxError(f"no sandbox state in {state_dir}: run `python -m sandbox up` first")
        state = json.loads(state_file.read_text())
        return cls(state_dir=Path(state_dir), nodes=state["nodes"], gpu_nodes=state["gpu_nodes"],
                   profile=state["profile"], scrape_interval_s=state["scrape_interval_s"], urls=state["urls"],
                   processes=state["processes"], extra=state.get("extra", {}), config=state.get("config", {}))

    # -- faults ------------------------------------------------------------------------------

    def fault(self, kind: str, node: str | None = None, gpu: int | None = None, value: float | None = None) -> dict:
        """Inject a fault. Prometheus' own outage is a process stop; the rest go to the core's control API."""
        if kind == "prometheus-down":
            self.stop_process("prometheus")
            return {"kind": kind}
        r = httpx.post(f"{self.urls['control']}/control/fault",
                       json={"kind": kind, "node": node, "gpu": gpu, "value": value}, timeout=10)
        if r.status_code != 200:
            raise SandboxError(r.json().get("error", r.text))
        return r.json()["applied"]

    def heal(self) -> None:
        """Undo every fault; restart Prometheus if it was stopped (same data directory)."""
        httpx.post(f"{self.urls['control']}/control/heal", timeout=10).raise_for_status()
        if "prometheus" not in self.processes:
            from sandbox.prometheus import start_prometheus_process

            start_prometheus_process(self)

    def reset(self) -> None:
        """Heal, and restore every Kubernetes object to its seeded state."""
        self.heal()
        httpx.post(f"{self.urls['control']}/control/reset", timeout=30).raise_for_status()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie of ours is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _kill(pid: int, timeout_s: float = 5.0) -> bool:
    """SIGTERM the process group, then SIGKILL after `timeout_s`. True if something was running."""
    if not _pid_alive(pid):
        return False
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                return True
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
            if not _pid_alive(pid):
                return True
            time.sleep(0.05)
    return True


# -- the core components -------------------------------------------------------------------


def start_core(sb: Sandbox) -> None:
    """Kubernetes API emulator + dcgm-exporters + control API, then kubeconfig and cluster config."""
    kube_port, sim_port = free_port(), free_port()
    proc = sb.spawn("core", [PYTHON, "-m", "sandbox.server", "--gpu-nodes", str(sb.gpu_nodes),
                             "--kube-port", str(kube_port), "--sim-port", str(sim_port), "--profile", sb.profile])
    sb.urls.update(kube=f"http://127.0.0.1:{kube_port}", sim=f"http://127.0.0.1:{sim_port}",
                   control=f"http://127.0.0.1:{sim_port}")
    wait_for(http_ok(f"{sb.urls['kube']}/version"), "sandbox core (Kubernetes API)", 60, proc, sb.log_of("core"))
    wait_for(http_ok(f"{sb.urls['control']}/control/health"), "sandbox core (control API)", 30, proc,
             sb.log_of("core"))
    sb.kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sandbox",
        "clusters": [{"name": "sandbox", "cluster": {"server": sb.urls["kube"]}}],
        "users": [{"name": "sandbox-admin", "user": {"token": "sandbox-token"}}],
        "contexts": [{"name": "sandbox", "context": {"cluster": "sandbox", "user": "sandbox-admin"}}],
    }, sort_keys=False))
    sb.config["clusters"] = [{
        "name": "sandbox", "kubeconfig": str(sb.kubeconfig), "context": "sandbox",
        "gpu_node_label": "nvidia.com/gpu.product",
    }]


def _start_prometheus(sb: Sandbox) -> None:
    from sandbox.prometheus import start_prometheus

    start_prometheus(sb)


COMPONENTS: list[Callable[[Sandbox], None]] = [start_core, _start_prometheus]


def _start_gitlab(sb: Sandbox) -> None:
    """GitLab hosts (sshd + stand-in omnibus scripts) and their API stand-ins; moto S3; a webhook sink."""
    from sandbox.gitlab_host import start_gitlab
    from sandbox.s3 import start_s3
    from sandbox.webhook import start_webhook

    start_webhook(sb)
    start_s3(sb)
    start_gitlab(sb)


COMPONENTS.append(_start_gitlab)


def _start_training(sb: Sandbox) -> None:
    """The Argo Server stand-in (scripted workflow runs) and the GitLab CI API stand-in (files, statuses, notes)."""
    from sandbox.argo import start_argo
    from sandbox.gitlab_ci_api import start_gitlab_ci_api

    start_argo(sb)
    start_gitlab_ci_api(sb)


COMPONENTS.append(_start_training)
