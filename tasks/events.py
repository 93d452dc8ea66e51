"""Custom Prefect events the lifecycles emit for automations to act on.

`ai-platform-ops.finding.critical`: a run found something critical (a GPU with a critical XID, a
health check turned critical). The event is emitted from inside the flow run, so Prefect relates it
to the run, its flow and deployment (`prefect.events.utilities.emit_event` adds the run context's
related resources), and an automation's `{{ flow_run|ui_url }}` links the notice to the run
(`configs/prefect/automations.yaml`). The event's resource is the platform; its payload names the
findings (names and counts only: evidence may carry remote text, which stays in the run's report).
"""

from __future__ import annotations

from collections.abc import Sequence

CRITICAL_FINDING_EVENT = "ai-platform-ops.finding.critical"
_MAX_NAMED = 50  # a payload names at most this many findings; the count is always complete


def emit_critical_findings(platform: str, source: str, findings: Sequence[str]) -> bool:
    """Emit one `ai-platform-ops.finding.critical` event for this run's critical findings (none: no event).

    `source` is the lifecycle ("gpu-monitoring-sweep", "platform-health-check"); `findings` short names
    such as "node-7/gpu-3: xid-79" or "registry". Returns whether an event was emitted. A failure to emit
    never fails the run: the run's report and state carry the findings as well.
    """
    from prefect.events import emit_event
    from prefect.logging import get_run_logger

    if not findings:
        return False
    names = list(findings)
    try:
        emitted = emit_event(
            event=CRITICAL_FINDING_EVENT,
            resource={"prefect.resource.id": f"ai-platform-ops.platform.{platform}",
                      "prefect.resource.name": platform, "ai-platform-ops.source": source},
            payload={"source": source, "count": len(names), "findings": names[:_MAX_NAMED]},
        )
    except Exception as exc:  # noqa: BLE001 - a lost notice must not fail the run that found the problem
        get_run_logger().error("could not emit %s: %s", CRITICAL_FINDING_EVENT, type(exc).__name__)
        return False
    return emitted is not None
