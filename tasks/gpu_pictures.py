"""The GPU fleet as a picture: nodes x GPUs, utilisation per cell, faulty, flagged and unknown GPUs marked.

Big fleets are binned (consecutive nodes per row), so the picture stays small at 10,000 nodes.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from tasks.gpu_model import GPUState, GPUStatus, SweepResult

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
