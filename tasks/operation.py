"""The one way to change the platform: plan, show, approve, re-check, apply, and a way back that runs.

Every lifecycle that changes the platform (cordon, prune, renewal, restore, defrag, create/scale/remove/
upgrade/reset, node init, add-ons) declares itself as an `Operation` and runs through `run_operation`.
Safety is a property of this module, not something each flow must remember:

1. **An operation is data.** Its planner reads the live platform and returns a `Plan`: the `Target` (named
   by what cannot be renamed: the `kube-system` namespace UID, the etcd cluster ID, an SSH host key, a
   GitLab instance), an ordered list of `Step`s (what each changes, how its result is checked, how it is
   undone), the exact objects it covers (`facts`: hosts, digests, versions), the refusals, and the way back.
2. **Plan and show.** The plan is one markdown artifact with the digest of its content. A dry run (every
   platform-changing deployment's default) stops there and changes nothing.
3. **Approve** with the one form (`tasks.approval`), one timeout (the config's `operations.approval_timeout`,
   overridden by the flow's `approval_timeout_s`, and said in the plan). No lock and no connection is held
   while the run waits: the planner's session is closed before the pause.
4. **Re-check after approval.** The run takes its lock (a one-slot global concurrency limit), opens its
   session again and re-plans against the live platform. A different target identity, or a plan whose
   digest differs from the approved one, refuses the run with the difference shown; nothing is changed.
5. **Apply** step by step, each step's check run after it, with a live step log (table artifact) and a
   progress artifact. A failure or a cancellation computes the state from the same step list ("untouched",
   or "steps 1-4 applied, step 5 failed: ...") and names the way back, a deployment or a parameter of the
   same flow that runs.
6. **One report, one notice.** Every run ends with one report artifact. Failures are notified by the
   platform's failed-run automation (configs/prefect/automations.yaml), whose notice carries the run's state
   message, which is this module's computed state and way back; flows do not notify failures themselves.
   A cancelled run ends `Cancelled` with the computed state as its message.

Errors form one family (`OperationError`): `Refused` (nothing was changed: the message says why and what to
do) and `StepFailed` (failed at step N, the state, the way back).
"""

from __future__ import annotations

import asyncio
import difflib
import hashlib
import inspect
import json
import time
from collections.abc import Awaitable, Callable, Sequence
from contextvars import ContextVar
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from tasks.redact import Redactor
from tasks.reports import AsyncProgress, apublish_markdown, apublish_table, artifact_key, md_table, run_logger

DIFF_LINES = 60
_APPROVER: ContextVar[str | None] = ContextVar("operation_approver", default=None)


def approver() -> str | None:
    """Who approved the operation whose steps are running now (for the records a step writes on the target,
    such as a node annotation); None outside an apply."""
    return _APPROVER.get()


# --- the error family -----------------------------------------------------------------------------


class OperationError(RuntimeError):
    """An operation did not complete. `nothing_changed` says whether the platform is as it was before."""

    nothing_changed: bool = False

    def __init__(self, message: str, *, operation: str = ""):
        super().__init__(message)
        self.operation = operation


class Refused(OperationError):
    """Refused before any change (a precondition, the lock, a declined or changed plan): nothing was changed."""

    nothing_changed = True

    def __init__(self, operation: str, reasons: Sequence[str], *, what_next: str = "", diff: str = ""):
        self.reasons, self.diff = list(reasons), diff
        message = f"{operation} refused, nothing was changed: " + "; ".join(self.reasons)
        if what_next:
            message += f". Next: {what_next}"
        if diff:
            message += f"\nWhat changed since the approved plan:\n{diff}"
        super().__init__(message, operation=operation)


class TargetChanged(Refused):
    """After the approval the target is not the one approved (another identity), or the plan changed."""


class StepFailed(OperationError):
    """Step `index` (1-based) failed after steps 1..index-1 were applied; `state` and `way_back` say where
    things stand and how to go back."""

    def __init__(self, operation: str, index: int, step: str, error: str, state: str, way_back: WayBack | None):
        self.index, self.step, self.error, self.state, self.way_back = index, step, error, state, way_back
        message = f"{operation} failed at step {index} ({step}): {error}\nState: {state}"
        if way_back is not None:
            message += f"\nWay back: {way_back.text}"
        super().__init__(message, operation=operation)


# --- what an operation declares -------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    """What an operation changes. `identity` is what cannot be renamed (a UID, a cluster ID, a host key
    fingerprint, an instance id); `name` is only what people call it."""

    kind: str
    name: str
    identity: str

    def markdown(self) -> str:
        return f"{self.kind} **{self.name}** (identity `{self.identity}`)"


@dataclass(frozen=True)
class WayBack:
    """How to go back: a sentence, and the deployment (with its parameters) that does it, when one does."""

    text: str
    deployment: str | None = None
    parameters: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        if not self.deployment:
            return self.text
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in self.parameters.items())
        return f"{self.text} Run deployment `{self.deployment}` with {params or 'its defaults'}."


@dataclass
class Step:
    """One ordered change: what it `changes` (on which target), how its result is `check`ed, how it is
    `undo`ne. `run` does it (sync or async; a string result becomes the step log's detail) and `verify`, when
    given, checks it afterwards (raises when the check fails)."""

    name: str
    changes: str
    check: str = ""
    undo: str = ""
    run: Callable[[], Any] | None = None
    verify: Callable[[Any], Any] | None = None

    def canonical(self) -> dict[str, str]:
        return {"step": self.name, "changes": self.changes, "check": self.check, "undo": self.undo}


@dataclass
class Plan:
    """What an operation will do, as read from the live platform now."""

    target: Target
    steps: list[Step]
    title: str = ""
    details: str = ""
    facts: Any = None
    refusals: list[str] = field(default_factory=list)
    way_back: WayBack | Callable[[int], WayBack | None] | None = None
    confirm: str | None = None

    def lines(self) -> list[str]:
        """The plan as canonical text lines: what the digest covers and what a refusal's diff compares."""
        body = {"target": {"kind": self.target.kind, "identity": self.target.identity},
                "steps": [s.canonical() for s in self.steps], "facts": self.facts, "refusals": self.refusals}
        return json.dumps(body, sort_keys=True, indent=1, default=str).splitlines()

    @property
    def digest(self) -> str:
        return hashlib.sha256("\n".join(self.lines()).encode()).hexdigest()

    def way_back_after(self, applied: int) -> WayBack | None:
        """The way back once `applied` steps are done (the failed one counted when it may have changed things)."""
        wb = self.way_back
        return wb(applied) if callable(wb) else wb


@dataclass
class Operation:
    """A platform-changing lifecycle, as data. `planner(session)` reads the live platform and returns the
    `Plan`; `session()` opens the connections the planner and the steps need (closed while an approval
    waits); `lock` names the one-slot concurrency limit held from the re-plan to the end of the apply."""

    name: str
    platform: str
    planner: Callable[[Any], Plan | Awaitable[Plan]]
    session: Callable[[], AbstractAsyncContextManager[Any]] | None = None
    lock: str | None = None
    approval_timeout_s: int = 3600
    lock_timeout_s: int = 3600
    poll_interval_s: float = 10
    redactor: Redactor | None = None
    key: str = ""
    # None: a real run pauses for approval (every platform-changing deployment). A reason: it applies WITHOUT
    # approval, the reason shown in the plan and recorded as the approver in the report; only for a scheduled
    # drill whose target is a scratch host (e.g. gitlab-restore-drill), never for the platform itself.
    unattended: str | None = None

    def artifact(self, kind: str) -> str:
        return artifact_key(self.name, kind, self.platform, self.key)


# --- rendering ------------------------------------------------------------------------------------


def plan_markdown(op: Operation, plan: Plan, *, dry_run: bool) -> str:
    lines = [f"# {plan.title or op.name}: plan for {op.platform}", "",
             f"- **Target:** {plan.target.markdown()}",
             f"- **Plan digest:** `{plan.digest[:16]}` (the approved run re-plans and refuses if this changes)",
             f"- **Approval:** none, unattended: {op.unattended}" if op.unattended else
             f"- **Approval:** waits up to {_human_s(op.approval_timeout_s)} (config `operations.approval_timeout`; "
             "the `approval_timeout_s` parameter overrides it); no lock is held while it waits",
             f"- **Lock:** `{op.lock}`, taken after the approval" if op.lock else "- **Lock:** none",
             "", "## Steps", "",
             md_table([{"#": i, **s.canonical()} for i, s in enumerate(plan.steps, 1)], limit=200)]
    if plan.details:
        lines += ["## What it covers", "", plan.details, ""]
    if plan.refusals:
        lines += ["## Refused", ""] + [f"- {r}" for r in plan.refusals] + [""]
    wb = plan.way_back_after(len(plan.steps))
    if wb is not None:
        lines += ["## Way back", "", wb.markdown(), ""]
    if plan.confirm:
        lines += [f"To approve, also type `{plan.confirm}` in **confirm**.", ""]
    if dry_run:
        lines.append("_Dry run: nothing was changed. Run again with `dry_run=false` to apply after approval._")
    return "\n".join(lines)


def plan_diff(approved: Plan, now: Plan) -> str:
    diff = list(difflib.unified_diff(approved.lines(), now.lines(), "approved plan", "plan now", lineterm="", n=1))
    if len(diff) > DIFF_LINES:
        diff = diff[:DIFF_LINES] + [f"... {len(diff) - DIFF_LINES} more lines"]
    return "\n".join(diff)


def state_after(plan: Plan, applied: int, failed: int | None, error: str | None) -> str:
    """The platform's state computed from the step list: steps 1..applied done, step `failed` stopped."""
    n = len(plan.steps)
    names = [s.name for s in plan.steps]
    if failed is None and applied == 0:
        return "untouched: no step was started, nothing was changed"
    parts = []
    if applied:
        parts.append(f"steps 1-{applied} applied ({', '.join(names[:applied])})" if applied > 1
                     else f"step 1 applied ({names[0]})")
    else:
        parts.append("no step completed")
    if failed is not None:
        step = plan.steps[failed - 1]
        parts.append(f"step {failed} ({step.name}) {error or 'failed'}"
                     + (f"; it may have partly changed {step.changes}" if step.changes else ""))
    rest = n - (failed or applied)
    if rest > 0:
        first = (failed or applied) + 1
        parts.append(f"step{'s' if rest > 1 else ''} {first}{f'-{n}' if rest > 1 else ''} not run")
    return "; ".join(parts)


# --- running --------------------------------------------------------------------------------------


async def _call(fn: Callable[..., Any], *args: Any) -> Any:
    result = fn(*args)
    if inspect.isawaitable(result):
        result = await result
    return result


@asynccontextmanager
async def _no_session():
    yield None


def _before_step(operation: str, index: int, step: Step) -> None:
    """Called before each step is applied: the place where tests inject a fault or a cancellation."""


async def _plan(op: Operation, session: Any) -> Plan:
    plan = await _call(op.planner, session)
    if not isinstance(plan, Plan):
        raise TypeError(f"{op.name}: the planner returned {type(plan).__name__}, not a Plan")
    return plan


STEP_LOG_EVERY_S = 1.0


class _StepLog:
    """The live step log (a table artifact) and the progress artifact of an apply. Each publication is a new
    artifact version on the server (one API call, the whole table): published at most every
    `STEP_LOG_EVERY_S` while steps complete, and always at the end, on a failure and on a cancel, so a
    200-node cordon costs a handful of writes, not 200 growing tables (benchmarks/operation_steps.py)."""

    def __init__(self, op: Operation, rows: list[dict], progress: AsyncProgress):
        self.op, self.rows, self.progress = op, rows, progress
        self.published_at = 0.0
        self.published_rows = -1

    @classmethod
    async def start(cls, op: Operation, rows: list[dict], total: int) -> _StepLog:
        return cls(op, rows, await AsyncProgress.start(op.artifact("progress"), total, f"{op.name}: applying"))

    async def step_done(self, applied: int) -> None:
        if time.monotonic() - self.published_at >= STEP_LOG_EVERY_S:
            await self.flush(applied)

    async def flush(self, applied: int | None = None) -> None:
        if len(self.rows) != self.published_rows:
            await apublish_table(self.op.artifact("steps"), self.rows, description=f"{self.op.name}: step log")
            self.published_rows = len(self.rows)
        if applied is not None and applied != self.progress.done:
            await self.progress.set(applied)
        self.published_at = time.monotonic()


async def run_operation(op: Operation, *, dry_run: bool = True) -> dict[str, Any] | Any:
    """Plan, show, (unless `dry_run`) approve, re-check and apply `op`. Returns the run's record (a dict); a
    cancelled apply returns Prefect's `Cancelled` state (return it from the flow). Raises `Refused` when
    nothing was changed and `StepFailed` when a step failed."""
    logger = run_logger("ai_platform_ops.operation")
    redactor = op.redactor or Redactor([])
    session = op.session or _no_session
    async with session() as s:
        plan = await _plan(op, s)
    shown = plan_markdown(op, plan, dry_run=dry_run)
    await apublish_markdown(op.artifact("plan"), shown, description=f"{op.name}: plan {plan.digest[:16]}")
    record: dict[str, Any] = {"operation": op.name, "dry_run": dry_run, "target": plan.target.name,
                              "identity": plan.target.identity, "digest": plan.digest,
                              "plan": [s.canonical() for s in plan.steps], "facts": plan.facts,
                              "refusals": plan.refusals, "approved": None, "approver": None, "steps": [],
                              "state": "untouched: nothing was changed", "results": {}}
    if plan.refusals:
        await _report(op, plan, record, "refused")
        raise Refused(op.name, plan.refusals, what_next="fix what the plan's 'Refused' section names, then run "
                                                         "again")
    if dry_run or not plan.steps:
        if not plan.steps:
            logger.info("%s: nothing to do", op.name)
        await _report(op, plan, record, "dry run" if dry_run else "nothing to do")
        return record

    if op.unattended:
        record["approved"], record["approver"] = True, f"nobody (unattended: {op.unattended})"
        logger.info("%s runs unattended (%s): no approval (plan %s)", op.name, op.unattended, plan.digest[:16])
        return await _locked_apply(op, plan, record, redactor)

    from tasks.approval import aask_approval

    answer = await aask_approval(shown, op.approval_timeout_s, op.poll_interval_s, confirm=plan.confirm)
    record["approved"], record["approver"] = answer.approve, answer.who()
    if not answer.approve or (plan.confirm and answer.confirmed() != plan.confirm):
        why = f"declined by {answer.who()}" if not answer.approve else \
            f"{answer.who()} typed {answer.confirmed()!r}, not {plan.confirm!r}"
        record["state"] = f"untouched: {why}"
        logger.warning("%s %s: nothing was changed", op.name, why)
        await _report(op, plan, record, why)
        if answer.approve:  # approved with the wrong confirmation: a refusal, not a decision
            raise Refused(op.name, [why], what_next=f"approve again typing exactly {plan.confirm!r}")
        return record
    logger.info("%s approved by %s (plan %s)", op.name, answer.who(), plan.digest[:16])
    return await _locked_apply(op, plan, record, redactor)


async def _locked_apply(op: Operation, approved: Plan, record: dict, redactor: Redactor) -> Any:
    if op.lock is None:
        return await _recheck_and_apply(op, approved, record, redactor)
    from prefect.concurrency.asyncio import concurrency

    from tasks.concurrency import exclusive_limit

    await exclusive_limit(op.lock)
    try:
        ctx = concurrency(op.lock, occupy=1, timeout_seconds=op.lock_timeout_s)
        await ctx.__aenter__()
    except TimeoutError:
        record["state"] = "untouched: the lock was not free"
        await _report(op, approved, record, "refused")
        raise Refused(op.name, [f"another run held the lock {op.lock!r} for more than "
                                f"{_human_s(op.lock_timeout_s)}"],
                      what_next="wait for that run to finish (see the lock's active slots under Concurrency), "
                                "then run again") from None
    try:
        return await _recheck_and_apply(op, approved, record, redactor)
    finally:
        await ctx.__aexit__(None, None, None)


async def _recheck_and_apply(op: Operation, approved: Plan, record: dict, redactor: Redactor) -> Any:
    session = op.session or _no_session
    async with session() as s:
        now = await _plan(op, s)
        reasons, diff = [], ""
        if now.target.identity != approved.target.identity:
            reasons.append(f"the {approved.target.kind} is not the one approved: identity "
                           f"{approved.target.identity} then, {now.target.identity} now")
        if now.refusals:
            reasons += [f"after the approval: {r}" for r in now.refusals]
        if now.digest != approved.digest:
            diff = plan_diff(approved, now)
            reasons.append(f"the plan changed after the approval (digest {approved.digest[:16]} approved, "
                           f"{now.digest[:16]} now)")
        if reasons:
            record["state"] = "untouched: refused after the approval"
            record["diff"] = diff
            await _report(op, now, record, "refused after the approval", diff=diff)
            raise TargetChanged(op.name, reasons, diff=diff,
                                what_next="read the difference, then start a new run and approve the new plan")
        return await _apply(op, now, record, redactor)


async def _apply(op: Operation, plan: Plan, record: dict, redactor: Redactor) -> Any:
    token = _APPROVER.set(record.get("approver"))
    try:
        return await _apply_steps(op, plan, record, redactor)
    finally:
        _APPROVER.reset(token)


async def _apply_steps(op: Operation, plan: Plan, record: dict, redactor: Redactor) -> Any:
    rows: list[dict] = record["steps"]
    log = await _StepLog.start(op, rows, len(plan.steps))
    applied = 0
    for index, step in enumerate(plan.steps, 1):
        started = time.monotonic()
        try:
            _before_step(op.name, index, step)
            result = await _call(step.run) if step.run else None
            if step.verify is not None:
                await _call(step.verify, result)
        except Exception as exc:  # noqa: BLE001 - the state is computed, reported, and the error raised
            error = redactor.error(exc)
            rows.append(_row(index, step, "FAILED", started, error))
            state = state_after(plan, applied, index, f"failed: {_short(error)}")
            wb = plan.way_back_after(index)
            record.update(state=state, way_back=None if wb is None else wb.markdown())
            await log.flush(applied)
            await _report(op, plan, record, f"failed at step {index}")
            raise StepFailed(op.name, index, step.name, _short(error), state, wb) from exc
        except BaseException as exc:
            if not _is_cancellation(exc):
                raise
            rows.append(_row(index, step, "CANCELLED", started, "the run was cancelled during this step"))
            return await _cancelled(op, plan, record, log, redactor, applied, index)
        applied = index
        detail = redactor.text(result) if isinstance(result, str) else ""
        record["results"][step.name] = result
        rows.append(_row(index, step, "ok", started, detail))
        try:
            await log.step_done(applied)
        except BaseException as exc:  # a cancel between two steps lands at this await
            if not _is_cancellation(exc):
                raise
            return await _cancelled(op, plan, record, log, redactor, applied, None)
    await log.flush(applied)
    record["state"] = state_after(plan, applied, None, None) + "; the operation is complete"
    await _report(op, plan, record, "applied")
    return record


async def _cancelled(op: Operation, plan: Plan, record: dict, log: _StepLog, redactor: Redactor, applied: int,
                     running: int | None) -> Any:
    """The end of a cancelled apply: the state computed from the steps, reported, as Prefect's `Cancelled`."""
    from prefect.states import Cancelled

    state = state_after(plan, applied, running, "was cancelled while it ran")
    wb = plan.way_back_after(running or applied)
    record.update(state=state, way_back=None if wb is None else wb.markdown())
    await asyncio.shield(_cancelled_report(op, plan, record, log))
    where = f"at step {running} ({plan.steps[running - 1].name})" if running else f"after step {applied}"
    message = f"{op.name} cancelled {where}. State: {state}"
    if wb is not None:
        message += f"\nWay back: {wb.text}"
    run_logger("ai_platform_ops.operation").warning("%s", message)
    return Cancelled(message=message, data=redactor.value(record))


async def _cancelled_report(op: Operation, plan: Plan, record: dict, log: _StepLog) -> None:
    await log.flush()
    await _report(op, plan, record, "cancelled")


def _short(error: str, limit: int = 600) -> str:
    """An error as a state message carries it: its first line and its last lines (a remote command's error
    names the command first and says why last), at most `limit` characters; the step log keeps it whole."""
    lines = [x.strip() for x in error.strip().splitlines() if x.strip()]
    if len(error) <= limit or len(lines) < 2:
        return error if len(error) <= limit else error[:limit] + "..."
    head, tail = lines[0][: limit // 2], " / ".join(lines[-2:])[-(limit // 2):]
    return f"{head} ... {tail}"


def _is_cancellation(exc: BaseException) -> bool:
    from prefect.exceptions import TerminationSignal

    return isinstance(exc, (asyncio.CancelledError, TerminationSignal, KeyboardInterrupt))


def _row(index: int, step: Step, status: str, started: float, detail: str) -> dict:
    return {"#": index, "step": step.name, "status": status, "seconds": round(time.monotonic() - started, 1),
            "detail": detail[:2000]}


async def _report(op: Operation, plan: Plan, record: dict, outcome: str, diff: str = "") -> None:
    """The one report of a run: outcome, approver, state, step log, way back."""
    lines = [f"# {plan.title or op.name}: {outcome} ({op.platform})", "",
             f"- **Target:** {plan.target.markdown()}",
             f"- **Plan digest:** `{plan.digest[:16]}`",
             f"- **Approved by:** {record['approver'] or '-'}",
             f"- **State:** {record['state']}"]
    if record.get("way_back"):
        lines.append(f"- **Way back:** {record['way_back']}")
    if plan.refusals:
        lines += ["", "## Refused", ""] + [f"- {r}" for r in plan.refusals]
    if diff:
        lines += ["", "## What changed since the approved plan", "", "```diff", diff, "```"]
    lines += ["", "## Steps", "", md_table(record["steps"], limit=200) if record["steps"] else
              "_no step was applied_"]
    await apublish_markdown(op.artifact("report"), "\n".join(lines), description=f"{op.name}: {outcome}")


def _human_s(seconds: float) -> str:
    seconds = int(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def approval_timeout(config: Any, override_s: int | None) -> int:
    """The one timeout convention: the flow's `approval_timeout_s` parameter, else the config's
    `operations.approval_timeout`."""
    from blocks.config import parse_duration

    return int(override_s) if override_s else int(parse_duration(config.operations.approval_timeout))


def lock_timeout(config: Any) -> int:
    from blocks.config import parse_duration

    return int(parse_duration(config.operations.lock_timeout))


def run_operation_sync(op: Operation, *, dry_run: bool = True) -> Any:
    """`run_operation` from a sync flow: the operation runs on an event loop of its own thread (with the run's
    context), and this thread waits for it.

    A cancellation reaches a sync flow here, in the waiting thread: the runner's SIGTERM becomes Prefect's
    `TerminationSignal` in the main thread (prefect/utilities/engine `capture_sigterm`), not in the loop
    that applies the steps. So it is handed on: the operation's task is cancelled, its step loop computes
    and reports the state and returns the `Cancelled` state, which is returned here. Without this the flow
    would end with Prefect's bare "Flow run was cancelled." while the steps went on in the other thread.
    A cancellation before the apply (planning, approval) is raised on as it came: nothing was changed."""
    import concurrent.futures
    import contextvars
    import threading

    done: concurrent.futures.Future = concurrent.futures.Future()
    loop = asyncio.new_event_loop()
    box: dict[str, asyncio.Task] = {}

    async def main() -> Any:
        box["task"] = asyncio.current_task()
        return await run_operation(op, dry_run=dry_run)

    def target() -> None:
        try:
            done.set_result(loop.run_until_complete(main()))
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread as it is
            done.set_exception(exc)
        finally:
            loop.close()

    ctx = contextvars.copy_context()
    threading.Thread(target=ctx.run, args=(target,), name=f"operation-{op.name}", daemon=True).start()
    try:
        while True:  # a short wait, so that an exception delivered to this thread is seen at once
            try:
                return done.result(timeout=0.2)
            except concurrent.futures.TimeoutError:
                continue
    except BaseException as exc:
        if not _is_cancellation(exc) or done.done() or "task" not in box:
            raise
        loop.call_soon_threadsafe(box["task"].cancel)
        try:
            return done.result()
        except asyncio.CancelledError:
            raise exc from None  # cancelled before the apply: nothing changed, Prefect's own handling
