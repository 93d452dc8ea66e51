"""The GPU sweep's report: the fleet as a picture (nodes x GPUs, utilisation per cell, faulty, flagged and
unknown GPUs marked), the run's markdown summary, and publishing both with the findings table.

Big fleets are binned (consecutive nodes per row), so the picture stays small at 10,000 nodes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from prefect import task
from prefect.cache_policies import NONE

from tasks.gpu_model import GPUState, GPUStatus, SweepResult
from tasks.reports import md_table, png_data_uri, publish_markdown, publish_table

if TYPE_CHECKING:
    from tasks.gpu_plans import CordonPlan

MAX_HEATMAP_ROWS = 64
_BAD = (GPUStatus.FAULTY, GPUStatus.MISSING)


@dataclass
class Heatmap:
    util: list[list[float]]  # rows x GPU columns, NaN where nothing is known
    bad: list[list[int]]  # faulty or missing GPUs per cell
    flagged: list[list[int]]  # idle-but-held or hot GPUs per cell
    unknown: list[list[int]]
    row_labels: list[str]
    columns: int
    nodes_per_row: int


def heatmap(result: SweepResult, max_rows: int = MAX_HEATMAP_ROWS) -> Heatmap:
    """Nodes x GPUs: utilisation per cell; big fleets are binned (consecutive nodes per row, mean util)."""
    by_node: dict[str, list[GPUState]] = defaultdict(list)
    for s in result.gpus:
        by_node[s.node].append(s)
    names = sorted(by_node)
    columns = max((len(v) for v in by_node.values()), default=0)
    per_row = max(1, math.ceil(len(names) / max_rows))
    util, bad, flagged, unknown, labels = [], [], [], [], []
    for start in range(0, len(names), per_row):
        group = names[start:start + per_row]
        sums = [0.0] * columns
        counts = [0] * columns
        b, fl, u = [0] * columns, [0] * columns, [0] * columns
        for name in group:
            for i, s in enumerate(by_node[name]):
                if s.util_avg is not None and s.status not in (GPUStatus.UNKNOWN, GPUStatus.MISSING):
                    sums[i] += s.util_avg
                    counts[i] += 1
                b[i] += s.status in _BAD
                fl[i] += s.status in (GPUStatus.IDLE, GPUStatus.WARNING)
                u[i] += s.status is GPUStatus.UNKNOWN
        util.append([sums[i] / counts[i] if counts[i] else math.nan for i in range(columns)])
        bad.append(b)
        flagged.append(fl)
        unknown.append(u)
        labels.append(group[0] if len(group) == 1 else f"{group[0]}..{group[-1]}")
    return Heatmap(util, bad, flagged, unknown, labels, columns, per_row)


def render_heatmap_png(hm: Heatmap, title: str) -> Any:
    """A matplotlib figure of the heatmap (red x: faulty/missing, o: idle-held or hot, grey: unknown)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    rows = max(1, len(hm.row_labels))
    data = np.array(hm.util, dtype=float) if hm.util else np.full((1, 1), np.nan)
    fig, ax = plt.subplots(figsize=(2.2 + 0.45 * max(hm.columns, 1), 1.2 + 0.2 * rows))
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad="#bbbbbb")
    image = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=0, vmax=100,
                      interpolation="nearest")
    for r in range(len(hm.bad)):
        for c in range(hm.columns):
            if hm.bad[r][c]:
                ax.text(c, r, "x", ha="center", va="center", color="red", fontsize=9, fontweight="bold")
            elif hm.flagged[r][c]:
                ax.text(c, r, "o", ha="center", va="center", color="orange", fontsize=8, fontweight="bold")
    ax.set_xticks(range(hm.columns))
    ax.set_xlabel("GPU")
    step = max(1, rows // 40)
    ax.set_yticks(range(0, rows, step))
    ax.set_yticklabels(hm.row_labels[::step], fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(image, ax=ax, label="utilisation % (window average)", fraction=0.04)
    return fig


# --- the sweep's report ----------------------------------------------------------------------


def summary_markdown(platform: str, result: SweepResult, plan: CordonPlan | None, dry_run: bool,
                     heatmap_uri: str | None) -> str:
    counts = result.counts
    util = f"{result.fleet_util_pct:.1f}%" if result.fleet_util_pct is not None else "unknown"
    alloc = f"{100.0 * result.gpus_held / result.gpus_expected:.1f}%" if result.gpus_expected else "n/a"
    statuses = ", ".join(f"{k} {v}" for k, v in sorted(result.gpu_status_counts.items())) or "none"
    lines = [
        f"# GPU monitoring sweep: {platform}/{result.cluster}",
        "",
        f"**Status: {result.status.upper()}** at "
        f"{datetime.fromtimestamp(result.at, tz=UTC):%Y-%m-%d %H:%M:%S} UTC, window {result.window}",
        "",
        f"- **Findings:** {counts['critical']} critical, {counts['warning']} warning, {counts['info']} info",
        f"- **Fleet:** {result.gpu_nodes} GPU nodes, {result.gpus_expected} GPUs, {result.gpus_reporting} reporting",
        f"- **Utilisation (window average over reporting GPUs):** {util}; **held by pods:** {result.gpus_held} "
        f"GPUs ({alloc})",
        f"- **GPU status:** {statuses}",
        f"- **Cost:** {result.round_trips} API round trips, {result.timings.get('total_s', 0):.2f}s",
        f"- **Metrics from:** {result.metrics_source}" + (f" ({result.metrics_source_note})"
                                                           if result.metrics_source_note else ""),
    ]
    if result.metrics_error:
        lines += ["", f"> **Prometheus gave no usable answer; every GPU is unknown.** {result.metrics_error}"]
    for w in result.warnings[:5]:
        lines.append(f"- _warning:_ {w}")
    lines += ["", "## Findings", "",
              md_table([f.row() for f in result.findings],
                       columns=["severity", "finding", "node", "gpu", "pod", "owner", "summary", "evidence"], limit=30)]
    if plan is not None and (plan.actions or plan.over_cap or plan.already):
        lines += ["", "## Cordon", "", plan.markdown(dry_run)]
    if heatmap_uri:
        lines += ["", "## Fleet heatmap", "",
                  "Utilisation per GPU over the window; red x: faulty or missing, orange o: idle-but-held or hot, "
                  "grey: unknown.", "", f"![GPU fleet heatmap]({heatmap_uri})"]
    return "\n".join(lines) + "\n"


@task(name="publish-gpu-sweep-report", cache_policy=NONE)
def publish_sweep_report(platform: str, result: SweepResult, plan: CordonPlan | None, dry_run: bool) -> str:
    """The summary (with the heatmap) and the findings table, as artifacts."""
    import matplotlib.pyplot as plt

    uri = None
    if result.gpus:
        fig = render_heatmap_png(heatmap(result), f"{platform}/{result.cluster}: GPU utilisation, window "
                                                  f"{result.window}")
        try:
            uri = png_data_uri(fig)
        finally:
            plt.close(fig)
    key = f"gpu-sweep-{platform}-{result.cluster}"
    publish_markdown(key, summary_markdown(platform, result, plan, dry_run, uri),
                     description=f"GPU sweep: {result.status}")
    publish_table(f"gpu-findings-{platform}-{result.cluster}", [f.row() for f in result.findings],
                  description="GPU findings: severity, evidence, recommended action")
    return key
