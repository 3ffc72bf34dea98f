"""Loss plots for the report: one figure per stage, one panel per loss term, one thin line per image and the mean
over images in black; a logarithmic y axis when a term spans more than a factor of 20 and stays positive.
Drawn by matplotlib's Agg canvas (no pyplot state, no display), returned as PNG bytes."""

from __future__ import annotations

import io
import math

import numpy as np

PANEL_ORDER = ("loss", "target_l_s", "reg_l_s", "l2", "perceptual", "locality", "target_l2", "target_perceptual",
               "target_identity", "noise_reg")  # fmt: skip


def _order(keys: list[str]) -> list[str]:
    return [k for k in PANEL_ORDER if k in keys] + sorted(k for k in keys if k not in PANEL_ORDER)


def loss_figure_png(stage: str, curves: dict[str, dict[str, list[float]]], dpi: int = 100) -> bytes:
    """PNG of one stage's loss curves ``{term: {image: values per step}}``."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib, optional and slow to import
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    terms = _order(list(curves))
    n = len(terms)
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    for i, term in enumerate(terms):
        ax = fig.add_subplot(rows, cols, i + 1)
        series = curves[term]
        for values in series.values():
            ax.plot(np.arange(len(values)), values, lw=0.8, alpha=0.35)
        longest = max(len(v) for v in series.values())
        mean = [np.mean([v[s] for v in series.values() if s < len(v)]) for s in range(longest)]
        ax.plot(np.arange(longest), mean, color="black", lw=1.8, label=f"mean of {len(series)}")
        flat = np.array([x for v in series.values() for x in v], dtype=np.float64)
        finite = flat[np.isfinite(flat)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 20:
            ax.set_yscale("log")
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"stage {stage}: losses per step", fontsize=11)
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
