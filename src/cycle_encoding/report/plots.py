"""Loss plots for the report: one figure per stage, one panel per loss term, one thin line per image and the mean
over images in black; a logarithmic y axis when a term spans more than a factor of 20 and stays positive.
Drawn by matplotlib's Agg canvas (no pyplot state, no display), returned as PNG bytes."""

from __future__ import annotations

import io
import math
from collections.abc import Iterable
from typing import Any

import numpy as np

PANEL_ORDER = ("loss", "target_l_s", "reg_l_s", "l2", "perceptual", "locality", "target_l2", "target_perceptual",
               "target_identity", "noise_reg")  # fmt: skip


def _order(keys: list[str]) -> list[str]:
    return [k for k in PANEL_ORDER if k in keys] + sorted(k for k in keys if k not in PANEL_ORDER)


def panel_figure(n: int, panel_inches: tuple[float, float], dpi: int) -> tuple[Any, list[Any]]:
    """A matplotlib Figure on an Agg canvas with ``n`` panels of ``panel_inches``, at most 3 a row, and the panels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib, optional and slow to import
    from matplotlib.figure import Figure

    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(panel_inches[0] * cols, panel_inches[1] * rows), dpi=dpi, layout="constrained")
    FigureCanvasAgg(fig)
    return fig, [fig.add_subplot(rows, cols, i + 1) for i in range(n)]


def log_scale_if_wide(ax: Any, values: Iterable[float]) -> None:
    """A logarithmic y axis when the finite values stay positive and span more than a factor of 20."""
    finite = [v for v in values if math.isfinite(v)]
    if finite and min(finite) > 0 and max(finite) / min(finite) > 20:
        ax.set_yscale("log")


def figure_png(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def loss_figure_png(stage: str, curves: dict[str, dict[str, list[float]]], dpi: int = 100) -> bytes:
    """PNG of one stage's loss curves ``{term: {image: values per step}}``."""
    from matplotlib.ticker import MaxNLocator  # lazy: matplotlib, optional and slow to import

    terms = _order(list(curves))
    fig, axes = panel_figure(len(terms), (4.2, 3.0), dpi)
    for ax, term in zip(axes, terms):
        series = curves[term]
        for values in series.values():
            ax.plot(np.arange(len(values)), values, lw=0.8, alpha=0.35)
        longest = max(len(v) for v in series.values())
        mean = [np.mean([v[s] for v in series.values() if s < len(v)]) for s in range(longest)]
        ax.plot(np.arange(longest), mean, color="black", lw=1.8, label=f"mean of {len(series)}")
        log_scale_if_wide(ax, [x for v in series.values() for x in v])
        ax.set_title(term, fontsize=10)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper right")
    fig.suptitle(f"stage {stage}: losses per step", fontsize=11)
    return figure_png(fig)
