"""Start, describe, fault and stop the sandbox platform. Everything listens on 127.0.0.1 only.

`Sandbox(state_dir).up(nodes=50)` starts each component in `COMPONENTS` in order, records
every process it starts (PID, argv) in ``state.json``, and writes ``kubeconfig`` and
``platform.yaml`` (a valid platform config pointing at the sandbox). `down()` stops exactly
those PIDs. Components are plain functions ``start(sb: Sandbox) -> None`` that call
`sb.spawn(...)` and fill in their section of `sb.config`; a later lifecycle adds its stand-ins
(sshd GitLab host, registry, S3, Argo, GitLab API) by appending its function to `COMPONENTS`.

Components take their helpers (ports, waits, probes) from the leaf module `sandbox._common`, never
from here, and their secrets from `sb.secret(NAME)`: made once per `up`, kept in
``<state>/secrets/NAME`` (0600, folder 0700), referenced by path in ``state.json`` and as
``{env: NAME}`` in ``platform.yaml``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import yaml

# The helpers live in the leaf module `sandbox._common`; they are re-exported here for the importers
# outside the sandbox (tests/, benchmarks/) that know them by this module.
from sandbox._common import (  # noqa: F401 - re-exported
    PYTHON,
    SECRETS_DIR,
    SandboxError,
    free_port,
    holding_stop_signals,
    http_ok,
    pid_alive,
    process_record,
    require_binary,
    spawn,
    stand_in_secret,
    stop_process,
    wait_for,
)
from sandbox.cluster import gpu_node_count

DEFAULT_STATE_DIR = Path(__file__).resolve().parent / ".state"
KUBE_TOKEN = "SANDBOX_KUBE_TOKEN"


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
    secrets: dict[str, str] = field(default_factory=dict)  # name -> file under <state>/secrets (never the value)

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
        with holding_stop_signals():
            proc = spawn(argv, log, env={**os.environ, **(env or {})}, cwd=cwd)
            self.processes[name] = process_record(proc, argv, log)
            self._save()
        return proc

    def log_of(self, name: str) -> Path:
        return Path(self.processes[name]["log"])

    def stop_process(self, name: str, timeout_s: float = 5.0) -> None:
        info = self.processes.pop(name, None)
        if info:
            stop_process(info["pid"], info.get("start"), timeout_s)
        self._save()

    # -- stand-in secrets --------------------------------------------------------------------

    def secret(self, name: str, *, prefix: str = "", env: bool = True) -> str:
        """The stand-in secret `name` (made once per state dir, kept in ``secrets/<name>``, mode 0600).

        With `env`, it is also put in this process' environment under `name`, where the platform
        config's ``{env: name}`` reference finds it (blocks.load, the tests); the demo reads the files
        for its children (`sandbox._common.read_secrets`). state.json records the file, not the value.
        """
        value, path = stand_in_secret(self.state_dir, name, prefix)
        self.secrets[name] = str(path)
        if env:
            os.environ[name] = value
        return value

    def secret_file(self, name: str) -> Path:
        """The file holding secret `name` (made on first use), for stand-ins started with ``--token-file``."""
        self.secret(name, env=False)
        return Path(self.secrets[name])

    # -- lifecycle ---------------------------------------------------------------------------

    def up(self, components: list[Callable[[Sandbox], None]] | None = None) -> Sandbox:
        """Start `components` (default: all of `COMPONENTS`), in order."""
        if self.state_file.exists():
            existing = Sandbox.load(self.state_dir)
            if existing.alive():
                raise SandboxError(f"a sandbox is already running from {self.state_dir}; run `python -m sandbox down`")
            existing.down()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(self.state_dir / SECRETS_DIR, ignore_errors=True)  # fresh stand-in secrets for each up
        if self.gpu_nodes is None:
            self.gpu_nodes = gpu_node_count(self.nodes)
        if self.scrape_interval_s is None:
            self.scrape_interval_s = 2 if self.gpu_nodes <= 200 else (15 if self.gpu_nodes <= 2500 else 60)
        # a sandbox's runs wait minutes, not an hour, for an approval or a lock (tasks/operation.py)
        self.config = {"name": "sandbox", "clusters": [], "thresholds": {},
                       "operations": {"approval_timeout": "10m", "lock_timeout": "10m"}}
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
            info = self.processes[name]
            if stop_process(info["pid"], info.get("start")):
                stopped.append(info["pid"])
        self.processes = {}
        if self.state_file.exists():
            self.state_file.unlink()
        return stopped

    def alive(self) -> bool:
        return any(pid_alive(p["pid"], p.get("start")) for p in self.processes.values())

    def _save(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        state = {
            "nodes": self.nodes, "gpu_nodes": self.gpu_nodes, "profile": self.profile,
            "scrape_interval_s": self.scrape_interval_s, "urls": self.urls, "processes": self.processes,
            "extra": self.extra, "config": self.config, "secrets": self.secrets,
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
                   processes=state["processes"], extra=state.get("extra", {}), config=state.get("config", {}),
                   secrets=state.get("secrets", {}))

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


# -- the core components -------------------------------------------------------------------


def start_core(sb: Sandbox) -> None:
    """Kubernetes API emulator + dcgm-exporters + control API, then kubeconfig and cluster config."""
    kube_port, sim_port = free_port(), free_port()
    proc = sb.spawn("core", [PYTHON, "-m", "sandbox.server", "--gpu-nodes", str(sb.gpu_nodes),
                             "--kube-port", str(kube_port), "--sim-port", str(sim_port), "--profile", sb.profile,
                             # the dcgm-exporter install and node naming (sandbox/server.py; default: the GPU operator)
                             "--exporter-chart", sb.extra.get("exporter_chart", "gpu-operator"),
                             "--node-domain", sb.extra.get("node_domain", "")])
    sb.urls.update(kube=f"http://127.0.0.1:{kube_port}", sim=f"http://127.0.0.1:{sim_port}",
                   control=f"http://127.0.0.1:{sim_port}")
    wait_for(http_ok(f"{sb.urls['kube']}/version"), "sandbox core (Kubernetes API)", 60, proc, sb.log_of("core"))
    wait_for(http_ok(f"{sb.urls['control']}/control/health"), "sandbox core (control API)", 30, proc,
             sb.log_of("core"))
    sb.kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "sandbox",
        "clusters": [{"name": "sandbox", "cluster": {"server": sb.urls["kube"]}}],
        "users": [{"name": "sandbox-admin", "user": {"tokenFile": str(sb.secret_file(KUBE_TOKEN))}}],
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
    """The Argo Server stand-in (scripted workflow runs), the registry (Debian's docker-registry) and a
    training project on the GitLab API stand-in (its CI routes: files, statuses, notes)."""
    from sandbox.argo import start_argo
    from sandbox.gitlab_api import seed_training_project
    from sandbox.registry import start_registry

    start_argo(sb)
    start_registry(sb)
    seed_training_project(sb)


COMPONENTS.append(_start_training)


def _start_control_plane(sb: Sandbox) -> None:
    """Control-plane and etcd hosts (sshd) with a kubeadm/kubespray PKI of real X.509, TLS listeners serving
    it (API servers with /readyz, etcd, an ingress with SNI, a hung one) and TLS secrets in the API (issue 12)."""
    from sandbox.control_plane import start_control_plane

    start_control_plane(sb)


COMPONENTS.append(_start_control_plane)


def _start_provisioning(sb: Sandbox) -> None:
    """Issue 14: worker hosts for kubespray (real sshd) and the stand-in kubespray checkout in the config."""
    from sandbox.provisioning import start_provisioning

    start_provisioning(sb)


COMPONENTS.append(_start_provisioning)


def _start_etcd(sb: Sandbox) -> None:
    """Issue 16: the real etcd 3.4 (3-member main cluster, 1-member events cluster) with kubespray's TLS layout,
    sshd on the etcd host `etcd1` and a scratch host for restore drills."""
    from sandbox.etcd import start_etcd

    start_etcd(sb)


COMPONENTS.append(_start_etcd)
