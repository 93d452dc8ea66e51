"""Driving an approval from a test as an operator does in the UI: start the run, wait until it is Paused
for its `Approval` form, do what should happen meanwhile, then resume it with an answer."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from typing import Any

from tests.conftest import run_flow_sync


def paused_run_id(flow_name: str, timeout_s: float = 90, exclude: set | None = None):
    """The id of a Paused run of `flow_name` (waits for one, up to `timeout_s`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    async def find():
        async with get_client() as client:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow_name])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.PAUSED]))))
            return next((r.id for r in runs if r.id not in (exclude or set())), None)

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        run_id = asyncio.run(find())
        if run_id:
            return run_id
        time.sleep(0.3)
    raise AssertionError(f"no paused {flow_name} run within {timeout_s}s")


def run_and_answer(flow_fn, params: dict, answer: dict | None, *, meanwhile: Callable[[], Any] | None = None,
                   timeout_s: float = 240):
    """Run `flow_fn(**params)` in a thread; when it waits for approval, call `meanwhile()` (a change made
    while the approval waits), then resume it with `answer` (None: leave it paused until it times out).
    Returns the run's final State."""
    from prefect.flow_runs import resume_flow_run

    box: dict = {}
    t = threading.Thread(target=lambda: box.setdefault("state", run_flow_sync(flow_fn, **params)), daemon=True)
    t.start()
    run_id = paused_run_id(flow_fn.name)
    if meanwhile is not None:
        meanwhile()
    if answer is not None:
        resume_flow_run(run_id, run_input=answer)
    t.join(timeout_s)
    assert not t.is_alive(), f"{flow_fn.name} did not finish within {timeout_s}s"
    return box["state"]


APPROVE = {"approve": True, "approver": "alice"}
