"""What Argo's answers mean (pure): a workflow's status, its outcome for Prefect, when to stop or
terminate it, and where a failed step's log can still be read.

- `parse_status(wf)` -> `WorkflowStatus` (phase, progress, failed steps with their pod, node id
  and whether Argo archived their log as the ``main-logs`` artifact);
- `training_outcome(status, ...)` -> `Outcome` (the Prefect state Argo's phase means);
- `Shutdown`: the follow loop's state machine (cancel -> stop -> terminate after a grace period;
  timeout -> terminate; give up when even terminate does not end it);
- `parse_log_stream(body)`: Argo's log endpoint streams one JSON object per line;
- `logs_unavailable(step, pod_gc, archive_logs)`: why a failed step's log cannot be shown.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any, Literal

TERMINAL_PHASES = {"Succeeded", "Failed", "Error"}
LOGS_ARTIFACT = "main-logs"
"""The artifact Argo's executor saves a container's log as when archiveLogs is on
(workflow/executor/executor.go `saveContainerLogs`: ``containerName + "-logs"``)."""


@dataclass
class FailedStep:
    name: str
    message: str
    pod: str | None
    node_id: str = ""
    archived_log: bool = False


@dataclass
class WorkflowStatus:
    name: str
    namespace: str
    phase: str
    message: str = ""
    steps_done: int = 0
    steps_total: int = 0
    shutdown: str | None = None
    pod_gc: str | None = None
    archive_logs: bool = False
    failed_steps: list[FailedStep] = field(default_factory=list)

    @property
    def terminal(self) -> bool:
        return self.phase in TERMINAL_PHASES

    @property
    def percent(self) -> float:
        if self.phase == "Succeeded":
            return 100.0
        return round(100.0 * self.steps_done / self.steps_total, 1) if self.steps_total else 0.0


def pod_name(workflow: str, node: dict[str, Any]) -> str | None:
    """The pod of a Pod node, as Argo names it (POD_NAMES=v2: <workflow>-<template>-<hash of node id>)."""
    if node.get("type") != "Pod":
        return None
    node_id = node.get("id", "")
    template = node.get("templateName")
    if not template or not node_id.startswith(workflow + "-"):
        return node_id or None
    return f"{workflow}-{template}-{node_id.rsplit('-', 1)[-1]}"


def parse_status(wf: dict[str, Any]) -> WorkflowStatus:
    """A workflow's phase, message, progress and failed steps, from the Argo API's JSON."""
    meta = wf.get("metadata") or {}
    spec = wf.get("spec") or {}
    status = wf.get("status") or {}
    name = meta.get("name", "")
    nodes = status.get("nodes") or {}
    pods = [n for n in nodes.values() if n.get("type") == "Pod"]
    done, total = 0, 0
    progress = status.get("progress") or ""
    if re.match(r"^\d+/\d+$", progress):
        done, total = (int(x) for x in progress.split("/"))
    elif pods:
        total = len(pods)
        done = sum(1 for n in pods if n.get("phase") in TERMINAL_PHASES | {"Skipped", "Omitted"})
    failed = [
        FailedStep(name=n.get("displayName") or n.get("name", key), message=n.get("message", ""),
                   pod=pod_name(name, n), node_id=n.get("id", key),
                   archived_log=any(a.get("name") == LOGS_ARTIFACT
                                    for a in (n.get("outputs") or {}).get("artifacts") or []))
        for key, n in nodes.items() if n.get("type") == "Pod" and n.get("phase") in ("Failed", "Error")
    ]
    return WorkflowStatus(
        name=name, namespace=meta.get("namespace", ""), phase=status.get("phase") or "Pending",
        message=status.get("message") or "", steps_done=done, steps_total=total,
        shutdown=spec.get("shutdown"), pod_gc=(spec.get("podGC") or {}).get("strategy"),
        archive_logs=bool(spec.get("archiveLogs")), failed_steps=failed,
    )


@dataclass
class Outcome:
    """What a finished (or abandoned) workflow means for the Prefect run."""

    state: Literal["Completed", "Failed", "Cancelled"]
    message: str


def training_outcome(st: WorkflowStatus, *, cancelled: bool = False, timed_out_s: float | None = None) -> Outcome:
    """Map Argo's final phase to a Prefect state: Succeeded -> Completed; Failed/Error -> Failed with Argo's
    message; a workflow stopped or terminated in Argo (not by this run) -> Cancelled."""
    where = f"Argo workflow {st.namespace}/{st.name}"
    argo_msg = f" ({st.phase}: {st.message})" if st.message else f" ({st.phase})"
    if timed_out_s is not None:
        return Outcome("Failed", f"{where} timed out after {timed_out_s:.0f}s and was terminated{argo_msg}")
    if cancelled:
        return Outcome("Cancelled", f"cancelled in Prefect; {where} was stopped{argo_msg}")
    if st.phase == "Succeeded":
        return Outcome("Completed", f"{where} succeeded")
    if st.phase in ("Failed", "Error"):
        if st.shutdown or st.message.startswith("Stopped with strategy"):
            return Outcome("Cancelled", f"{where} was stopped in Argo{argo_msg}")
        return Outcome("Failed", f"{where} {st.phase.lower()}: {st.message or 'no message from Argo'}")
    return Outcome("Failed", f"{where} is still {st.phase}; gave up following it")


Action = Literal["wait", "stop", "terminate", "give_up", "done"]


@dataclass
class Shutdown:
    """The follow loop's shutdown state machine (pure; the flow feeds it the clock and what it saw).

    - a cancellation (the Prefect run or a parent cancelling) stops the workflow: its exit handler
      runs; if it has not ended `grace_s` later, it is terminated;
    - past `timeout_s` the workflow is terminated at once (a timeout is a failure, not a cancel);
    - `grace_s` after a terminate that did not end it, the flow gives up and leaves it to Argo.
    """

    started: float
    grace_s: float
    timeout_s: float | None = None
    cancelled: bool = False
    timed_out_s: float | None = None
    shutdown_at: float | None = None
    terminated: bool = False

    @property
    def shutting_down(self) -> bool:
        return self.shutdown_at is not None

    def next(self, now: float, terminal: bool, cancel_requested: bool) -> Action:
        """What to do after one poll; records the decision."""
        if terminal:
            return "done"
        if self.shutdown_at is None:
            if cancel_requested:
                self.cancelled, self.shutdown_at = True, now
                return "stop"
            if self.timeout_s is not None and now - self.started > self.timeout_s:
                self.timed_out_s, self.shutdown_at, self.terminated = now - self.started, now, True
                return "terminate"
            return "wait"
        if now - self.shutdown_at <= self.grace_s:
            return "wait"
        if not self.terminated:
            self.terminated, self.shutdown_at = True, now
            return "terminate"
        return "give_up"


def parse_log_stream(body: str) -> list[tuple[str, str]]:
    """Argo's log endpoint answers one JSON object per line: ``{"result": {"content", "podName"}}``."""
    out = []
    for line in body.splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            result = json.loads(line).get("result") or {}
        except (ValueError, AttributeError):
            continue
        out.append((result.get("podName", ""), result.get("content", "")))
    return out


def logs_unavailable(step: FailedStep, pod_gc: str | None, archive_logs: bool) -> str:
    """Why a failed step's log could not be read, and what would keep it next time."""
    gone = f"pod {step.pod} no longer exists"
    if pod_gc in ("OnPodCompletion", "OnWorkflowCompletion"):
        gone += f" (podGC {pod_gc} deleted it)"
    if archive_logs:
        return f"logs unavailable: {gone} and Argo archived no log for it (check the artifact repository)"
    return (f"logs unavailable: {gone} and the workflow does not archive logs: set argo.archive_logs "
            f"(with an artifact repository) or a longer argo.keep_failed_pods_for in the platform config")
