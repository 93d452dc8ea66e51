"""tasks.notify: a notice reaches the notifier; a missing or broken webhook is logged and never fails the run."""

from __future__ import annotations

import pytest
from prefect import flow

from tasks.notify import notify


class _Webhook:
    def __init__(self, fail: bool = False):
        self.fail, self.sent = fail, []

    async def notify(self, body: str, subject: str | None = None) -> None:
        if self.fail:
            raise ConnectionError("webhook down")
        self.sent.append((subject, body))


@flow
async def _send(notifier, what: str = "failure notice") -> bool:
    return await notify(notifier, "backup FAILED", "disk full", what=what)


@pytest.mark.usefixtures("prefect_server")
async def test_sent_missing_and_broken_webhooks(caplog):
    ok = _Webhook()
    assert await _send(ok) is True and ok.sent == [("backup FAILED", "disk full")]
    assert await _send(None, what="health change notice") is False
    assert "the health change notice was not sent anywhere" in caplog.text
    broken = _Webhook(fail=True)
    assert await _send(broken) is False and broken.sent == []
    assert "could not send the failure notice: ConnectionError" in caplog.text
