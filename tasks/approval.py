"""The one approval form: a run pauses, shows its plan in the Prefect UI and waits for an operator.

Every dangerous step (cordon, restore, prune, renewal, node removal) asks with `Approval`: the
plan is the form's description, the operator sets `approve` and writes their name in `approver`,
then resumes the run. Who approved is recorded in the step's report.
"""

from __future__ import annotations

from prefect.input import RunInput

_HOW = "\n\nSet **approve** and write your name in **approver**, then resume the run."


class Approval(RunInput):
    """What the approver fills in, in the Prefect UI, to let a planned change go ahead."""

    approve: bool = False
    approver: str = ""

    def who(self) -> str:
        """The approver's name as a report shows it."""
        return self.approver.strip() or "(unnamed)"


def approval_form(plan_markdown: str):
    """The pause input: `Approval` with the plan as its description and `approve` unset."""
    return Approval.with_initial_data(description=plan_markdown + _HOW, approve=False)


def ask_approval(plan_markdown: str, timeout_s: int, poll_interval_s: float = 2) -> Approval:
    """Pause this (sync) flow run until an operator answers; a timeout raises Prefect's error."""
    from prefect.flow_runs import pause_flow_run

    return pause_flow_run(wait_for_input=approval_form(plan_markdown), timeout=timeout_s,
                          poll_interval=poll_interval_s)


async def aask_approval(plan_markdown: str, timeout_s: int, poll_interval_s: float = 2) -> Approval:
    """Pause this (async) flow run until an operator answers; a timeout raises Prefect's error."""
    from prefect.flow_runs import apause_flow_run

    return await apause_flow_run(wait_for_input=approval_form(plan_markdown), timeout=timeout_s,
                                 poll_interval=poll_interval_s)
