"""The project's one retry policy: transient faults only, exponential backoff with jitter.

Retried: connection errors, timeouts, HTTP 429 and 5xx (from httpx, requests, urllib3, the
kubernetes client, python-gitlab, botocore, asyncssh). Never retried: 4xx, validation errors,
failed checks: those fail the first time so the operator sees them at once.

Use as ``@task(**TRANSIENT_RETRIES)``.
"""

from __future__ import annotations

import socket
from typing import Any

from prefect.tasks import exponential_backoff


class TransientError(RuntimeError):
    """Raise this from project code for a fault worth retrying (a peer busy, a lost session)."""


def _status_of(exc: BaseException) -> int | None:
    for attr in ("status", "status_code", "response_code"):
        value = getattr(exc, attr, None)
        if isinstance(value, int):
            return value
    response = getattr(exc, "response", None)
    if response is not None:
        for attr in ("status_code", "status"):
            value = getattr(response, attr, None)
            if isinstance(value, int):
                return value
        if isinstance(response, dict):  # botocore ClientError
            code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if isinstance(code, int):
                return code
    return None


def is_transient(exc: BaseException | None) -> bool:
    """True for faults that may pass on their own: connection loss, timeouts, 429, 5xx."""
    if exc is None:
        return False
    if isinstance(exc, TransientError | TimeoutError | ConnectionError | socket.timeout):
        return True
    status = _status_of(exc)
    if status is not None:
        return status == 429 or 500 <= status <= 599 or status == 0  # 0: kubernetes client, no response
    name = type(exc).__name__
    module = type(exc).__module__
    transient_names = {
        "ConnectError", "ConnectTimeout", "ReadTimeout", "WriteTimeout", "PoolTimeout", "RemoteProtocolError",
        "ReadError", "NewConnectionError", "MaxRetryError", "ProtocolError", "ConnectionError",
        "EndpointConnectionError", "ConnectTimeoutError", "ReadTimeoutError", "ConnectionLost",
        "ChannelOpenError", "DisconnectError",
    }
    if name in transient_names:
        return True
    if module.startswith("gitlab") and name in {"GitlabConnectionError"}:
        return True
    cause = exc.__cause__ or exc.__context__
    return cause is not None and cause is not exc and is_transient(cause)


def retry_transient_only(_task: Any, _task_run: Any, state: Any) -> bool:
    """Prefect `retry_condition_fn` (called with the task, its run and the failed state): retry only
    when the failure was transient."""
    try:
        state.result(_sync=True)  # async tasks too: a coroutine here would never raise
    except BaseException as exc:  # noqa: BLE001 - we classify, then re-decide
        return is_transient(exc)
    return False


TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 3,
    "retry_delay_seconds": exponential_backoff(backoff_factor=1),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_transient_only,
}
