"""etcd-defrag as the operation contract drives it (the sandbox's real etcd 3.4, its `events` cluster)."""

from __future__ import annotations

from tests.operation_scenarios import Scenario

MEMBER = "etcd1-events"
_BASELINE: dict[str, int] = {}


def _info(sb) -> dict:
    return sb.extra["etcd"]


def _reset(sb) -> None:
    """No alarm raised, and a fresh revision the run has not compacted yet."""
    from sandbox.etcd import alarm, put_keys

    alarm(_info(sb), MEMBER, "DEACTIVATE")
    _BASELINE["revision"] = put_keys(_info(sb), MEMBER, 3, prefix="/registry/events/contract/")


def _compacted(sb) -> bool:
    """Applied: the history before the last revision written by `_reset` is compacted away (read from etcd
    itself; a compaction to revision R keeps R readable and drops what is older)."""
    from sandbox.etcd import compacted_past

    return compacted_past(_info(sb), MEMBER, _BASELINE["revision"] - 1)


def _change(sb) -> None:
    """A NOSPACE alarm raised while the approval waits: the plan's alarms and steps differ."""
    from sandbox.etcd import alarm

    alarm(_info(sb), MEMBER, "ACTIVATE")


def _way_back(sb, failed):
    """Defragmentation changes no data: its way back is running it again once the cluster is healthy."""
    from flows.etcd_defrag import etcd_defrag
    from tests.approvals import APPROVE, run_and_answer

    assert "Run deployment `etcd-defrag`" in failed.message or "etcd-defrag" in failed.message
    return run_and_answer(etcd_defrag, {"platform": "sandbox", "clusters": ["events"], "dry_run": False,
                                        "poll_interval_s": 0.5}, APPROVE)


SCENARIOS = [Scenario("etcd-defrag", lambda sb: {"clusters": ["events"]}, _compacted, _change, _way_back,
                      restored=_compacted, reset=_reset, fixtures=("etcd_platform",))]
