"""The one way a flow sends a notice to the platform's webhook (`Platform.notifier()`, Prefect's
CustomWebhookNotificationBlock, or None when `notifications.webhook_url` is not configured)."""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger


async def notify(notifier: Any, subject: str, body: str, *, what: str = "failure notice") -> bool:
    """Send `subject`/`body` through `notifier`; never raises, so a broken webhook cannot hide the run's own
    result or failure. Returns whether it was sent; when not, the run's log says why (`what` names the notice)."""
    logger = get_run_logger()
    if notifier is None:
        logger.warning("no notifications.webhook_url configured: the %s was not sent anywhere", what)
        return False
    try:
        await notifier.notify(body=body, subject=subject)
    except Exception as exc:  # noqa: BLE001 - whatever the webhook does, the run's result stands
        logger.error("could not send the %s: %s", what, type(exc).__name__)
        return False
    return True
