"""The training flows' reports: the training run's summary artifact and the note left on the commit or
merge request (the Argo workflow, the Prefect run, the failed steps' last log lines)."""

from __future__ import annotations

from typing import Any

from prefect.states import State

from tasks.reports import md_table


def run_summary(result: dict[str, Any]) -> str:
    """The training run's summary artifact: its fields as a table, then each failed step's last log lines."""
    rows = [{"field": k, "value": result.get(k)} for k in (
        "workflow", "namespace", "phase", "message", "steps", "adopted", "repository", "commit", "argo_url")]
    lines = [f"# Training run: {result['workflow']}", "", f"**{result['state']}**: {result['outcome']}", "",
             md_table(rows)]
    for step in result.get("failed_steps", []):
        lines += [f"## Failed step `{step['name']}` ({step['message']})", "", "```", step["log_tail"], "```", ""]
    return "\n".join(lines)


def commit_note(sha: str, state: State | None, result: dict[str, Any] | None, message: str,
                prefect_url: str | None) -> str:
    """The note on the commit or merge request: the outcome, the Argo workflow, the Prefect run, the failed steps."""
    icon = {"Completed": "✅", "Failed": "❌", "Cancelled": "⏹️"}.get(state.type.value.title() if state else "", "❌")
    lines = [f"### {icon} Training `{sha[:12]}`: {message}", ""]
    if result:
        lines.append(f"- **Argo workflow:** [{result['namespace']}/{result['workflow']}]({result['argo_url']}) "
                     f"({result['phase']}, {result['steps']} steps)")
        if result.get("adopted"):
            lines.append("- This commit and spec were trained already: this is that workflow's result. Run the "
                         "pipeline with `AIPLATFORM_RETRAIN` set to train again.")
    if prefect_url:
        lines += [f"- **Prefect run:** {prefect_url}"]
    for step in (result or {}).get("failed_steps", []):
        lines += ["", f"<details><summary>Step <code>{step['name']}</code>: {step['message']}</summary>", "",
                  "```", step["log_tail"], "```", "</details>"]
    return "\n".join(lines)
