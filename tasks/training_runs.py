"""The training flows' Prefect side: this flow run, its UI page, the runs above it, whether one of them is
being cancelled, and what the training subflow's final state carries.

`flows.training.argo_training_run` follows its Argo Workflow while watching its own lineage
(`run_lineage`, `cancel_requested`: a cancelled parent cancels the training too); `train_on_push` links its
commit status to `flow_run_url` and reads the subflow's result from its state (`state_result`).
"""

from __future__ import annotations

from typing import Any
from uuid import UUID

from prefect import get_run_logger
from prefect.states import State


def flow_run_url(flow_run_id: Any) -> str | None:
    """The Prefect UI page of a flow run (PREFECT_UI_URL, else derived from PREFECT_API_URL)."""
    from prefect.settings import PREFECT_API_URL, PREFECT_UI_URL

    ui = PREFECT_UI_URL.value() or (PREFECT_API_URL.value() or "").removesuffix("/api")
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


def current_flow_run():
    """The flow run this code runs in (None outside one)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    return ctx.flow_run if ctx else None


def run_lineage(flow_run) -> list[UUID]:
    """This flow run and every parent flow run above it (a cancelled parent cancels the training too)."""
    from prefect.client.orchestration import get_client

    ids = [flow_run.id]
    parent_task = flow_run.parent_task_run_id
    with get_client(sync_client=True) as client:
        while parent_task is not None and len(ids) < 10:
            parent_run = client.read_flow_run(client.read_task_run(parent_task).flow_run_id)
            ids.append(parent_run.id)
            parent_task = parent_run.parent_task_run_id
    return ids


def cancel_requested(ids: list[UUID]) -> bool:
    """Whether any of these flow runs is cancelling or cancelled."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    with get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return any(r.state is not None and (r.state.is_cancelling() or r.state.is_cancelled()) for r in runs)


def state_result(state: State) -> dict[str, Any] | None:
    """The dict a finished training subflow's state carries (its result or its `data`), None when unreadable."""
    try:
        data = state.result(raise_on_failure=False)
    except Exception as exc:  # noqa: BLE001 - a result that cannot be read (not persisted) is reported as absent
        get_run_logger().warning("the training run's result could not be read: %s", type(exc).__name__)
        return None
    return data if isinstance(data, dict) else None
