"""operation-steps: what the one operation module costs per step (tasks/operation.py).

An approved operation of N cheap steps (a cordon of N nodes is one step per node) applied in a real flow on
a real Prefect server (`prefect_test_harness`): its plan, its re-plan and identity check, the live step log
and progress artifacts, the report. Measured side by side in the same run, each a whole flow run:

- `project`: `run_operation` as the flows use it (the step log published at most once a second);
- `per-step log`: the same operation publishing its step table and progress after every step (the module's
  first version): one growing table artifact version per step;
- `plain loop`: the same N steps in a flow with no plan, no log and no report: the floor.

`ratio` is per-step-log / project; `overhead_per_step_ms` is (project - plain loop) / N.
The operation runs unattended (no approval pause), so the timing holds no human wait.
"""

from __future__ import annotations

import os
import statistics
import time

from benchmarks._harness import emit, peak_rss_mb

DEFAULT_SIZE = 200


def run(size: int | None = None, repeat: int = 5) -> None:
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_LEVEL", "WARNING")
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from tasks import operation
    from tasks.operation import Operation, Plan, Step, Target, run_operation

    n = size or DEFAULT_SIZE
    target = {"labels": {}}

    def planner(_session) -> Plan:
        steps = [Step(f"label node-{i:05d}", f"node-{i:05d}: label bench=1", "read back", "remove the label",
                      lambda i=i: target["labels"].__setitem__(i, 1)) for i in range(n)]
        return Plan(Target("bench target", "bench", "uid-1"), steps, facts={"nodes": n})

    @flow(name="bench-operation")
    async def with_operation() -> int:
        op = Operation("bench-operation", "bench", planner, unattended="benchmark", key="bench")
        record = await run_operation(op, dry_run=False)
        return len(record["steps"])

    @flow(name="bench-plain-loop")
    async def plain_loop() -> int:
        for step in planner(None).steps:
            step.run()
        return n

    def measure(fn, every_s: float | None = None) -> float:
        saved = operation.STEP_LOG_EVERY_S
        if every_s is not None:
            operation.STEP_LOG_EVERY_S = every_s
        try:
            samples = []
            for _ in range(repeat):
                target["labels"].clear()
                t0 = time.perf_counter()
                state = fn(return_state=True)
                if hasattr(state, "__await__"):
                    import asyncio

                    state = asyncio.run(state)
                samples.append(time.perf_counter() - t0)
                assert state.is_completed(), state.message
                assert len(target["labels"]) == n, "not every step ran"
            return statistics.median(samples)
        finally:
            operation.STEP_LOG_EVERY_S = saved

    with prefect_test_harness(server_startup_timeout=120):
        measure(plain_loop)  # warm-up: the server's first flow run
        project = measure(with_operation)
        per_step = measure(with_operation, every_s=0.0)
        floor = measure(plain_loop)
    emit("operation-steps", n, seconds=project, baseline="per-step log", baseline_seconds=per_step,
         overhead_per_step_ms=1000 * (project - floor) / n, plain_loop_seconds=floor, peak_rss_mb=peak_rss_mb())
    emit("operation-steps", n, seconds=project, baseline="plain loop (no plan, log or report)",
         baseline_seconds=floor, peak_rss_mb=peak_rss_mb())
