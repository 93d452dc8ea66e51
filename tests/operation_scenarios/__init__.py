"""One module per lifecycle, each with `SCENARIOS: list[Scenario]`, driven by tests/test_operations.py."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class Scenario:
    """One platform-changing deployment as the contract tests drive it."""

    deployment: str
    params: Callable[[Any], dict]           # (sandbox) -> parameters of a run that changes something (no dry_run)
    applied: Callable[[Any], bool]          # (sandbox) -> whether the change is there, read from the sandbox
    change: Callable[[Any], None]           # (sandbox) -> alter the target so that the plan differs
    way_back: Callable[[Any, Any], Any]     # (sandbox, failed state) -> final State of the way back's run
    restored: Callable[[Any], bool]         # (sandbox) -> whether the way back left the target as before
    reset: Callable[[Any], None] = lambda sb: None  # (sandbox) -> the scenario's start again
    fail_at: int = 2                        # the step before which a fault is injected
    fixtures: tuple[str, ...] = ()          # session fixtures the scenario needs beyond `sandbox_platform`
    extra: dict = field(default_factory=dict)
