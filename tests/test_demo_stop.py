"""The demo stops everything it started: on SIGTERM and SIGHUP it stops its Prefect server and the sandbox
(whole process groups) and exits; after a SIGKILL, `--stop` (what `make clean` runs) stops what its
records name, and a new demo does so first, and refuses a port another program holds."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sandbox._common import free_port, pid_alive, port_in_use
from tests.conftest import REPO, need_binary


@pytest.fixture
def demo_home(tmp_path):
    need_binary("prometheus", "prometheus")
    need_binary("sshd", "openssh-server")
    home = tmp_path / "demo"
    yield home
    # whatever a failed test left behind
    subprocess.run([sys.executable, "-m", "scripts.demo", "--stop", "--home", str(home)], cwd=REPO,
                   capture_output=True, timeout=120, check=False)


class RunningDemo:
    def __init__(self, home: Path, port: int):
        self.home, self.port = home, port
        self.out = home.parent / f"demo-{time.monotonic_ns()}.out"
        with open(self.out, "wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "scripts.demo", "--home", str(home), "--port", str(port), "--nodes", "4"],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)

    def output(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_until(self, ready, what: str, timeout_s: float = 120) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, f"the demo exited ({self.proc.returncode}):\n{self.output()}"
            if ready():
                return
            time.sleep(0.2)
        pytest.fail(f"the demo did not get to {what} within {timeout_s:.0f}s:\n{self.output()}")

    def records(self) -> dict[str, tuple[int, int]]:
        """name -> (pid, start time) of every process the demo recorded: its pid files and the sandbox's."""
        found = {}
        for f in (self.home / "pids").glob("*.pid"):
            record = json.loads(f.read_text())
            found[f.stem] = (record["pid"], record["start"])
        state = self.home / "sandbox" / "state.json"
        if state.exists():
            for name, record in json.loads(state.read_text())["processes"].items():
                found[f"sandbox/{name}"] = (record["pid"], record["start"])
        return found

    def ports(self) -> set[int]:
        state = json.loads((self.home / "sandbox" / "state.json").read_text())
        return {self.port} | {int(url.split(":")[2].split("/")[0]) for url in state["urls"].values()}

    def server_and_sandbox_recorded(self, *components: str) -> bool:
        names = self.records()
        return "prefect-server" in names and all(f"sandbox/{c}" in names for c in components)

    def kill_if_running(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def _processes_of(home: Path) -> list[str]:
    """Processes still running whose command line or environment names the demo's directory."""
    needle = str(home).encode()
    left = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
            environ = Path(f"/proc/{entry}/environ").read_bytes()
        except OSError:
            continue
        if (needle in cmdline or needle in environ) and pid_alive(int(entry)):
            command = cmdline.replace(b"\0", b" ").decode(errors="replace")[:120]
            left.append(f"{entry}: {command}")
    return left


def _assert_all_stopped(demo: RunningDemo, records: dict[str, tuple[int, int]], ports: set[int]) -> None:
    still = {name: pid for name, (pid, start) in records.items() if pid_alive(pid, start)}
    assert still == {}, f"still running after the demo stopped: {still}"
    assert _processes_of(demo.home) == []
    assert [p for p in ports if port_in_use(p)] == []
    assert list((demo.home / "pids").glob("*.pid")) == []
    assert not (demo.home / "sandbox" / "state.json").exists()


def test_sigterm_stops_server_sandbox_and_commands(demo_home):
    demo = RunningDemo(demo_home, free_port())
    try:
        demo.wait_until(lambda: "loading blocks" in demo.output(), "loading blocks (server and sandbox up)")
        records, ports = demo.records(), demo.ports()
        assert {"prefect-server", "sandbox/core", "sandbox/prometheus", "sandbox/sshd-production", "sandbox/argo"} \
            <= records.keys()
        assert all(pid_alive(pid, start) for pid, start in records.values())
        demo.proc.send_signal(signal.SIGTERM)
        assert demo.proc.wait(90) == 128 + signal.SIGTERM, demo.output()
    finally:
        demo.kill_if_running()
    assert "SIGTERM received" in demo.output()
    _assert_all_stopped(demo, records, ports)


def test_sighup_while_the_sandbox_starts(demo_home):
    demo = RunningDemo(demo_home, free_port())
    try:
        demo.wait_until(lambda: demo.server_and_sandbox_recorded("core"), "the sandbox's first process")
        demo.proc.send_signal(signal.SIGHUP)
        assert demo.proc.wait(90) == 128 + signal.SIGHUP, demo.output()
        records = demo.records()  # what is left recorded (nothing, when all went well)
    finally:
        demo.kill_if_running()
    assert records == {}
    assert "SIGHUP received" in demo.output()
    _assert_all_stopped(demo, records, {demo.port})


def test_after_sigkill_the_next_demo_stops_the_leftovers_and_make_clean_too(demo_home):
    port = free_port()
    first = RunningDemo(demo_home, port)
    try:
        first.wait_until(lambda: first.server_and_sandbox_recorded("core", "prometheus"), "the sandbox's Prometheus")
        records = first.records()
    finally:
        first.kill_if_running()  # SIGKILL: no chance to stop anything
    assert all(pid_alive(pid, start) for pid, start in records.values())
    assert port_in_use(port)

    second = RunningDemo(demo_home, port)  # same directory and port: it stops its leftovers first
    try:
        second.wait_until(lambda: "starting Prefect server" in second.output(), "starting its own server")
        assert "stopped what an earlier demo left running" in second.output()
        assert {name: pid for name, (pid, start) in records.items() if pid_alive(pid, start)} == {}
        second.wait_until(lambda: "prefect-server" in second.records(), "recording its server")
        second_records = second.records()
    finally:
        second.kill_if_running()

    stop = subprocess.run([sys.executable, "-m", "scripts.demo", "--stop", "--home", str(demo_home)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, check=False)
    assert stop.returncode == 0, stop.stderr
    assert "prefect-server" in stop.stdout
    _assert_all_stopped(second, second_records, {port})


def test_a_port_held_by_another_program_is_refused_with_the_command(tmp_path):
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        out = subprocess.run([sys.executable, "-m", "scripts.demo", "--home", str(tmp_path / "demo"), "--port",
                              str(port)], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 1
    assert f"port {port} is taken" in out.stderr and f"DEMO_PREFECT_PORT={port + 1} make demo" in out.stderr
    assert not (tmp_path / "demo" / "prefect").exists() and list((tmp_path / "demo").glob("*.log")) == []
