"""The one approval form: a run pauses, shows its plan in the Prefect UI and waits for an operator.

Every dangerous step (cordon, restore, prune, renewal, node removal, reset) asks with `Approval`: the plan
is the form's description, the operator sets `approve` and writes their name in `approver`, then resumes
the run. Who approved is recorded in the run's report. A plan that wipes something (a cluster reset) also
asks the operator to type what it names in `confirm` (`tasks.operation.Plan.confirm`): the same form, one
more field, so there is one pause mechanism. `tasks.operation.run_operation` is the only caller.
"""

from __future__ import annotations

from prefect.input import RunInput

_HOW = "\n\nSet **approve** and write your name in **approver**, then resume the run."


class Approval(RunInput):
    """What the approver fills in, in the Prefect UI, to let a planned change go ahead."""

    approve: bool = False
    approver: str = ""
    confirm: str = ""

    def who(self) -> str:
        """The approver's name as a report shows it."""
        return self.approver.strip() or "(unnamed)"

    def confirmed(self) -> str:
        """What the approver typed in `confirm` (a plan that wipes something asks for its name)."""
        return self.confirm.strip()


def approval_form(plan_markdown: str, confirm: str | None = None):
    """The pause input: `Approval` with the plan as its description and `approve` unset."""
    how = _HOW if not confirm else (f"\n\nType **{confirm}** in **confirm**, set **approve** and write your name "
                                    "in **approver**, then resume the run.")
    return Approval.with_initial_data(description=plan_markdown + how, approve=False)


async def aask_approval(plan_markdown: str, timeout_s: int, poll_interval_s: float = 2,
                        confirm: str | None = None) -> Approval:
    """Pause this flow run until an operator answers; a timeout raises Prefect's error."""
    from prefect.flow_runs import apause_flow_run

    return await apause_flow_run(wait_for_input=approval_form(plan_markdown, confirm), timeout=timeout_s,
                                 poll_interval=poll_interval_s)

