"""tasks.reports.run_logger: lines meant for the operator reach the run's log; outside a run, a plain logger."""

from __future__ import annotations

import logging

import pytest
from prefect import flow

from tasks.gitlab_host import _progress_failed
from tasks.reports import run_logger


def test_outside_a_run_it_is_the_named_standard_logger():
    logger = run_logger("ai_platform_ops.test")
    assert isinstance(logger, logging.Logger) and logger.name == "ai_platform_ops.test"


@flow
def _progress_fails() -> None:
    _progress_failed(TimeoutError("artifact API slow"))


@pytest.mark.usefixtures("prefect_server")
def test_a_failed_progress_update_is_said_in_the_run_log(caplog):
    caplog.set_level(logging.INFO)
    _progress_fails()
    said = [r for r in caplog.records if "progress artifact not updated: TimeoutError" in r.getMessage()]
    assert said and said[0].name == "prefect.flow_runs", [r.name for r in said]
