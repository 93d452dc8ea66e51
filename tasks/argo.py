"""The Argo Server API: submit, read, stop and read a failed step's log. One name per operation.

Each operation is a Prefect task with a timeout on every request, retried only for transient
faults (`TRANSIENT_RETRIES`); outside a flow (the cancellation hook) call its plain function as
``submit_workflow.fn(...)``. They take the `ArgoServer` block and a `tasks.redact.Redactor` from
the flow: what they return (workflows, logs) and the errors they raise are redacted inside the
task, since Prefect may persist task results.

How the real server answers (argoproj/argo-workflows):

- errors are gRPC-gateway bodies ``{"code", "message"}`` (`server/workflow/workflow_server.go`
  wraps them with `sutils.ToStatusError`);
- stopping or terminating a finished workflow is ``code 13`` (Internal), HTTP 500, "cannot
  shutdown a completed workflow" (`workflow/util/util.go` `AlreadyShutdownError`): here that is
  the answer "already ended", not a fault to retry;
- ``/log`` (`PodLogs`) lists the workflow's pods and streams from those that still exist
  (`util/logs/workflow-logger.go`): a pod deleted by `podGC` yields an empty stream, not an error;
- with ``archiveLogs`` the node's output artifact ``main-logs`` holds the log, served by
  ``/artifact-files/{ns}/workflows/{name}/{nodeId}/outputs/main-logs``
  (`server/artifacts/artifact_server.go` `GetArtifactFile`).
"""

from __future__ import annotations

import re
from typing import Any, Literal

from prefect import task
from prefect.cache_policies import NONE

from tasks._retry import TRANSIENT_RETRIES
from tasks.argo_status import (
    LOGS_ARTIFACT,
    TERMINAL_PHASES,
    FailedStep,
    parse_log_stream,
)
from tasks.redact import Redactor

ARGO_TIMEOUT_S = 30.0
"""Timeout of every call to the Argo Server (connect and read)."""

LOG_TAIL_LINES = 200
"""How many lines of each failed step's log are collected."""

_OPTS = dict(TRANSIENT_RETRIES, cache_policy=NONE)


class ArgoAPIError(RuntimeError):
    """The Argo Server answered with an error. `status_code` drives the retry policy (5xx/429 only)."""

    def __init__(self, status_code: int | None, message: str):
        self.status_code = status_code
        super().__init__(message)


def _timeout_session():
    import requests

    class _Session(requests.Session):
        def request(self, method, url=None, **kwargs):  # every call gets a timeout
            kwargs.setdefault("timeout", ARGO_TIMEOUT_S)
            return super().request(method, url, **kwargs)

    session = _Session()
    session.trust_env = False  # no proxies from the environment: the Argo URL is the one configured
    return session


def workflows_service(argo):
    """hera's `WorkflowsService` for an `ArgoServer` block, with a timeout on every request."""
    from hera.workflows import WorkflowsService

    return WorkflowsService(
        host=argo.url.rstrip("/") + "/", namespace=argo.namespace, verify_ssl=argo.verify_tls,
        token=argo.token.get_secret_value() if argo.token else None, session=_timeout_session(),
    )


def _argo_call(redactor: Redactor, fn, *args, **kwargs):
    """Call the Argo Server; its error answers become `ArgoAPIError` with the message redacted."""
    from hera.exceptions import HeraException

    try:
        return fn(*args, **kwargs)
    except HeraException as exc:
        status = getattr(exc, "status_code", None)
        if status is None:
            m = re.search(r"status code (\d{3})", str(exc))
            status = int(m.group(1)) if m else None
        raise ArgoAPIError(status, redactor.text(f"Argo API: {exc}")) from None


def _as_dict(wf, redactor: Redactor) -> dict[str, Any]:
    """A hera Workflow model as the API's JSON, redacted (a task result may be persisted)."""
    return redactor.value(wf.model_dump(by_alias=True, exclude_none=True, mode="json"))


def argo_ui_link(argo, namespace: str, name: str) -> str:
    return f"{argo.url.rstrip('/')}/workflows/{namespace}/{name}"


@task(name="submit-argo-workflow", **_OPTS)
def submit_workflow(argo, namespace: str, manifest: dict[str, Any], *,
                    redactor: Redactor) -> tuple[dict[str, Any], bool]:
    """Create the workflow; on 409 AlreadyExists adopt the existing one. Returns (workflow, adopted)."""
    from hera.workflows.models import Workflow as ModelWorkflow
    from hera.workflows.models import WorkflowCreateRequest

    with workflows_service(argo) as svc:
        req = WorkflowCreateRequest(namespace=namespace, workflow=ModelWorkflow.model_validate(manifest))
        try:
            return _as_dict(_argo_call(redactor, svc.create_workflow, req, namespace=namespace), redactor), False
        except ArgoAPIError as exc:
            if exc.status_code != 409:
                raise
        existing = _argo_call(redactor, svc.get_workflow, manifest["metadata"]["name"], namespace=namespace)
        return _as_dict(existing, redactor), True


@task(name="read-argo-workflow", **_OPTS)
def read_workflow(argo, namespace: str, name: str, *, redactor: Redactor) -> dict[str, Any]:
    with workflows_service(argo) as svc:
        return _as_dict(_argo_call(redactor, svc.get_workflow, name, namespace=namespace), redactor)


@task(name="stop-argo-workflow", **_OPTS)
def stop_workflow(argo, namespace: str, name: str, strategy: Literal["stop", "terminate"],
                  message: str | None = None, *, redactor: Redactor) -> dict[str, Any]:
    """Stop (exit handlers run) or terminate (they do not) a workflow. A finished one is left as it is:
    Argo answers 500/code 13 "cannot shutdown a completed workflow" for it, which is no fault here."""
    from hera.workflows.models import WorkflowStopRequest, WorkflowTerminateRequest

    with workflows_service(argo) as svc:
        current = _argo_call(redactor, svc.get_workflow, name, namespace=namespace)
        if current.status and current.status.phase in TERMINAL_PHASES:
            return _as_dict(current, redactor)
        try:
            if strategy == "stop":
                wf = _argo_call(redactor, svc.stop_workflow, name,
                                WorkflowStopRequest(name=name, namespace=namespace, message=message),
                                namespace=namespace)
            else:
                wf = _argo_call(redactor, svc.terminate_workflow, name,
                                WorkflowTerminateRequest(name=name, namespace=namespace), namespace=namespace)
        except ArgoAPIError:  # it may have finished between the read and the shutdown
            wf = _argo_call(redactor, svc.get_workflow, name, namespace=namespace)
            if not (wf.status and wf.status.phase in TERMINAL_PHASES):
                raise
        return _as_dict(wf, redactor)


def _get(argo, path: str, params: dict[str, str] | None = None):
    svc = workflows_service(argo)
    try:
        return svc.session.get(f"{svc.host}{path}", params=params or {},
                               headers={"Authorization": svc.token} if svc.token else {}, verify=svc.verify_ssl)
    finally:
        svc.close()


def _tail(text: str) -> str:
    return "\n".join(text.splitlines()[-LOG_TAIL_LINES:])


@task(name="read-argo-step-log", **_OPTS)
def read_step_log(argo, namespace: str, name: str, step: FailedStep, *, redactor: Redactor) -> str:
    """The last `LOG_TAIL_LINES` lines of a failed step's main container, redacted here (never after the
    task returns): from the archived ``main-logs`` artifact when Argo archived one, else from the pod
    while it exists. "" when neither has it (the pod is gone and nothing was archived).

    hera's `workflow_logs` parses the log answer as one JSON object, but Argo streams one object per
    line; so this uses the service's session (same token, same timeout) and parses the stream."""
    if step.archived_log and step.node_id:
        resp = _get(argo, f"artifact-files/{namespace}/workflows/{name}/{step.node_id}/outputs/{LOGS_ARTIFACT}")
        if resp.ok and resp.text.strip():
            return redactor.text(_tail(resp.text))
        if resp.status_code == 429 or resp.status_code >= 500 and "not found" not in resp.text.lower():
            raise ArgoAPIError(resp.status_code, redactor.text(f"Argo API: archived log of {step.pod}: "
                                                               f"HTTP {resp.status_code}"))
    if not step.pod:
        return ""
    resp = _get(argo, f"api/v1/workflows/{namespace}/{name}/log",
                {"podName": step.pod, "logOptions.container": "main", "logOptions.tailLines": str(LOG_TAIL_LINES)})
    if not resp.ok:
        raise ArgoAPIError(resp.status_code, redactor.text(f"Argo API: logs of {step.pod}: HTTP {resp.status_code}"))
    return redactor.text("\n".join(content for _, content in parse_log_stream(resp.text)))
