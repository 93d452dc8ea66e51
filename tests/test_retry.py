"""The one retry policy: transient faults are retried with backoff, 4xx and failed checks are not."""

from __future__ import annotations

import httpx
import pytest
from kubernetes.client.exceptions import ApiException

from tasks._retry import TRANSIENT_RETRIES, TransientError, is_transient


def _http_error(status: int) -> httpx.HTTPStatusError:
    request = httpx.Request("GET", "http://127.0.0.1/x")
    return httpx.HTTPStatusError("x", request=request, response=httpx.Response(status, request=request))


@pytest.mark.parametrize("exc, expected", [
    (_http_error(503), True),
    (_http_error(429), True),
    (_http_error(500), True),
    (_http_error(404), False),
    (_http_error(400), False),
    (_http_error(409), False),
    (ApiException(status=503), True),
    (ApiException(status=403), False),
    (ApiException(status=0), True),
    (httpx.ConnectError("refused"), True),
    (httpx.ReadTimeout("slow"), True),
    (TimeoutError(), True),
    (ConnectionResetError(), True),
    (TransientError("ssh session lost"), True),
    (ValueError("bad parameter"), False),
    (AssertionError("check failed"), False),
    (None, False),
])
def test_is_transient(exc, expected):
    assert is_transient(exc) is expected


def test_wrapped_cause_is_followed():
    try:
        try:
            raise httpx.ConnectError("refused")
        except httpx.ConnectError as inner:
            raise RuntimeError("prometheus query failed") from inner
    except RuntimeError as outer:
        assert is_transient(outer)


def test_policy_shape():
    assert TRANSIENT_RETRIES["retries"] >= 2
    delays = TRANSIENT_RETRIES["retry_delay_seconds"](3)
    assert delays == sorted(delays) and delays[0] < delays[-1]  # exponential
    assert 0 < TRANSIENT_RETRIES["retry_jitter_factor"] <= 1


def test_task_retries_transient_but_not_client_errors(prefect_server):
    from prefect import flow, task

    calls = {"transient": 0, "client": 0}

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def flaky():
        calls["transient"] += 1
        if calls["transient"] < 3:
            raise httpx.ConnectError("peer down")
        return "ok"

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def forbidden():
        calls["client"] += 1
        raise ApiException(status=403, reason="Forbidden")

    @flow
    def both():
        a = flaky()
        b = forbidden(return_state=True)
        return a, b.is_failed()

    assert both() == ("ok", True)
    assert calls == {"transient": 3, "client": 1}
