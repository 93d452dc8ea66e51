"""Reports people read: Prefect artifacts (markdown summaries, tables, progress, pictures).

Every flow leaves a markdown summary and a table of findings; long work updates a progress
artifact; a picture (PNG rendered with matplotlib) is embedded in markdown as a data URI so
the Prefect UI shows it without any file server. Keys are lower-case with dashes, as Prefect
requires, so the latest report of a kind is one click away in the UI's Artifacts page.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any, Iterable, Sequence

from prefect.artifacts import (
    create_markdown_artifact,
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

MAX_TABLE_ROWS = 500


def artifact_key(*parts: str) -> str:
    """A valid artifact key: lower-case letters, digits and dashes."""
    key = "-".join(p for p in parts if p)
    key = re.sub(r"[^a-z0-9-]+", "-", key.lower()).strip("-")
    return re.sub(r"-{2,}", "-", key)[:100]


def _in_run_context() -> bool:
    from prefect.context import FlowRunContext, TaskRunContext

    return FlowRunContext.get() is not None or TaskRunContext.get() is not None


def run_logger(fallback: str) -> Any:
    """The run's logger (its lines reach the run's log in the UI); outside a run (tests, scripts) the
    standard logger `fallback`."""
    import logging

    from prefect import get_run_logger

    return get_run_logger() if _in_run_context() else logging.getLogger(fallback)


def md_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, limit: int = 50) -> str:
    """A markdown table of the first `limit` rows (with a line saying how many were left out)."""
    if not rows:
        return "_none_\n"
    cols = list(columns or rows[0].keys())
    esc = lambda v: str("" if v is None else v).replace("|", "\\|").replace("\n", " ")  # noqa: E731
    out = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    out += ["| " + " | ".join(esc(r.get(c)) for c in cols) + " |" for r in rows[:limit]]
    if len(rows) > limit:
        out.append(f"\n_{len(rows) - limit} more rows in the table artifact_")
    return "\n".join(out) + "\n"


def publish_markdown(key: str, markdown: str, description: str | None = None) -> str | None:
    """Create a markdown artifact when running inside a flow; always return the markdown's key."""
    if _in_run_context():
        create_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
    return artifact_key(key)


def _table(rows: Iterable[dict[str, Any]], description: str | None) -> tuple[list[dict], str | None, int]:
    """The rows a table artifact shows (at most MAX_TABLE_ROWS, None as ''), its description, the row count."""
    rows = list(rows)
    if len(rows) > MAX_TABLE_ROWS:
        description = f"{description or ''} (first {MAX_TABLE_ROWS} of {len(rows)} rows)".strip()
    table = [{k: ("" if v is None else v) for k, v in r.items()} for r in rows[:MAX_TABLE_ROWS]]
    return table or [{"result": "none"}], description, len(rows)


def publish_table(key: str, rows: Iterable[dict[str, Any]], description: str | None = None) -> int:
    """Create a table artifact (at most MAX_TABLE_ROWS rows, the rest counted in the description)."""
    table, description, count = _table(rows, description)
    if _in_run_context():
        create_table_artifact(key=artifact_key(key), table=table, description=description)
    return count


class Progress:
    """A progress artifact: `Progress('gitlab-backup', total=5).advance()`; a no-op outside a run."""

    def __init__(self, key: str, total: int, description: str | None = None):
        self.total = max(total, 1)
        self.done = 0
        self._id = None
        if _in_run_context():
            self._id = create_progress_artifact(progress=0.0, key=artifact_key(key), description=description)

    def advance(self, steps: int = 1) -> float:
        self.done = min(self.total, self.done + steps)
        return self.set(self.done)

    def set(self, done: int) -> float:
        self.done = done
        pct = round(100.0 * done / self.total, 1)
        if self._id is not None:
            update_progress_artifact(artifact_id=self._id, progress=pct)
        return pct


def png_data_uri(fig: Any) -> str:
    """Render a matplotlib figure to a PNG data URI for embedding in markdown."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=90, bbox_inches="tight")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


# --- async flows: the same reports from an async flow (Prefect dispatches to async APIs there) --------


async def apublish_markdown(key: str, markdown: str, description: str | None = None) -> str | None:
    """`publish_markdown` for async flows."""
    from prefect.artifacts import acreate_markdown_artifact

    if _in_run_context():
        await acreate_markdown_artifact(key=artifact_key(key), markdown=markdown, description=description)
    return artifact_key(key)


async def apublish_table(key: str, rows: Iterable[dict[str, Any]], description: str | None = None) -> int:
    """`publish_table` for async flows."""
    from prefect.artifacts import acreate_table_artifact

    table, description, count = _table(rows, description)
    if _in_run_context():
        await acreate_table_artifact(key=artifact_key(key), table=table, description=description)
    return count


class AsyncProgress:
    """`Progress` for async flows: `p = await AsyncProgress.start(key, total)`, then `await p.advance()`."""

    def __init__(self, key: str, total: int, description: str | None = None):
        self.key, self.total, self.description = key, max(total, 1), description
        self.done = 0
        self._id = None

    @classmethod
    async def start(cls, key: str, total: int, description: str | None = None) -> "AsyncProgress":
        from prefect.artifacts import acreate_progress_artifact

        p = cls(key, total, description)
        if _in_run_context():
            p._id = await acreate_progress_artifact(progress=0.0, key=artifact_key(key), description=description)
        return p

    async def advance(self, steps: int = 1) -> float:
        return await self.set(min(self.total, self.done + steps))

    async def set(self, done: int) -> float:
        from prefect.artifacts import aupdate_progress_artifact

        self.done = done
        pct = round(100.0 * done / self.total, 1)
        if self._id is not None:
            await aupdate_progress_artifact(artifact_id=self._id, progress=pct)
        return pct
