"""A real `prefect server start` and its runs, as the demo and the tests of the operator's path
(tests/test_operator_path.py) use them: the one wait for the server to answer, the one wait for a run's
state, the one read of a run's artifacts."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx

from sandbox._common import wait_for


class RunStateTimeout(AssertionError):
    """A run did not reach one of the states waited for in time (an AssertionError, so a test that waits
    fails with its message); `run` is the run as last read."""

    def __init__(self, run: Any, names: set[str], timeout_s: float):
        super().__init__(f"run {run.id} is {run.state.name if run.state else None}, not {sorted(names)}, "
                         f"after {timeout_s:.0f} s")
        self.run = run


def wait_until_healthy(api_url: str, proc: subprocess.Popen, timeout_s: float = 180, *, log: Path | None = None) -> None:
    """Wait until `<api_url>/health` answers 200; `SandboxError` (with `log`'s tail) as soon as the server
    process exits, or when time runs out."""
    wait_for(lambda: httpx.get(f"{api_url}/health", timeout=2).status_code == 200, "Prefect server", timeout_s,
             proc, log)


def wait_for_state(run_id: Any, names: set[str], timeout_s: float) -> Any:
    """The flow run once its state's name (`Paused`, `Completed`, ...) is one of `names`, read from the server
    PREFECT_API_URL names; `RunStateTimeout` after `timeout_s`."""
    from prefect import get_client

    deadline = time.monotonic() + timeout_s
    with get_client(sync_client=True) as client:
        while True:
            run = client.read_flow_run(run_id)
            if run.state and run.state.name in names:
                return run
            if time.monotonic() > deadline:
                raise RunStateTimeout(run, names, timeout_s)
            time.sleep(0.5)


def run_artifacts(run_id: Any) -> list[Any]:
    """The artifacts the flow run `run_id` made."""
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    with get_client(sync_client=True) as client:
        return client.read_artifacts(artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id])))
