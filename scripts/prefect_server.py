"""Starting a real `prefect server start`: the one wait for it to answer, used by the demo and the tests that
run the operator's path (tests/test_operator_path.py)."""

from __future__ import annotations

import subprocess
import time

import httpx


class ServerNotHealthy(RuntimeError):
    """The server exited, or did not answer `/health` in time."""


def wait_until_healthy(api_url: str, proc: subprocess.Popen, timeout_s: float = 180, *, where: str = "") -> None:
    """Poll `<api_url>/health` until it answers 200; fail as soon as the server process exits.

    where: what to read when it fails (its log), put in the error."""
    hint = f"; see {where}" if where else ""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServerNotHealthy(f"Prefect server exited with {proc.returncode}{hint}")
        try:
            if httpx.get(f"{api_url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass  # not listening yet: poll again
        time.sleep(0.5)
    raise ServerNotHealthy(f"Prefect server did not become healthy within {timeout_s:.0f} s{hint}")
