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


@pytest.mark.usefixtures("prefect_server")
def test_task_retries_transient_but_not_client_errors():
    from prefect import flow, task

    retries = TRANSIENT_RETRIES["retries"]
    attempts = {"flaky": 0, "down": 0, "forbidden": 0}
    faults: dict[str, list[BaseException]] = {"flaky": [], "down": [], "forbidden": []}  # every fault raised

    def fail(name: str, exc: BaseException):
        faults[name].append(exc)
        raise exc

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def flaky():
        attempts["flaky"] += 1
        if len(faults["flaky"]) < 2:
            fail("flaky", httpx.ConnectError("peer down"))
        return "ok"

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def down():
        attempts["down"] += 1
        fail("down", httpx.ConnectError("peer gone for good"))

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def forbidden():
        attempts["forbidden"] += 1
        fail("forbidden", ApiException(status=403, reason="Forbidden"))

    @flow
    def all_three():
        return flaky(), down(return_state=True), forbidden(return_state=True)

    ok, down_state, forbidden_state = all_three()
    assert attempts == {"flaky": 3, "down": 1 + retries, "forbidden": 1}
    # a transient fault passes on the third attempt: two faults fired, three attempts
    assert ok == "ok" and [type(e) for e in faults["flaky"]] == [httpx.ConnectError] * 2
    # a fault that never passes: the first attempt and every retry, then the task fails with it
    assert len(faults["down"]) == 1 + retries
    with pytest.raises(httpx.ConnectError, match="gone for good"):
        down_state.result()
    # a client error: one attempt, never retried
    assert len(faults["forbidden"]) == 1
    with pytest.raises(ApiException) as info:
        forbidden_state.result()
    assert info.value.status == 403
