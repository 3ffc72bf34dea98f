"""The plateau rule: when a measured curve has stopped improving (the trainers' early stops, ``cycle-encoding curves``).
Design notes: docs/INTERNALS.md, "cycle_encoding.training.plateau"."""

from __future__ import annotations

import math
from collections.abc import Sequence


def check_rule(patience: int, min_improvement: float, prefix: str = "") -> None:
    """One clear line for a bad patience or margin (``prefix``: the options' prefix, e.g. ``val_``)."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 0:
        raise ValueError(f"{prefix}patience must be an integer >= 0, got {patience!r}")
    if not (isinstance(min_improvement, (int, float)) and math.isfinite(min_improvement) and min_improvement >= 0):
        raise ValueError(f"{prefix}min_improvement must be a finite number >= 0, got {min_improvement!r}")


def _improves(value: float, best: float | None, margin: float, higher_is_better: bool) -> bool:
    if not math.isfinite(value):
        return False
    if best is None:
        return True
    if higher_is_better:
        return value >= best + margin * abs(best)
    return value <= best - margin * abs(best)


def plateau_flags(
    values: Sequence[float], patience: int, min_improvement: float, higher_is_better: bool = False
) -> list[bool]:
    """The rule at every evaluation: ``flags[i]`` is True when it holds over ``values[:i + 1]``."""
    check_rule(patience, min_improvement)
    vals = [float(v) for v in values]
    flags = [False] * len(vals)
    if patience == 0:
        return flags
    best: float | None = None  # best of vals[: i - patience + 1]
    for i in range(patience, len(vals)):
        v = vals[i - patience]
        if math.isfinite(v) and (best is None or (v > best if higher_is_better else v < best)):
            best = v
        window = vals[i - patience + 1 : i + 1]
        flags[i] = not any(_improves(w, best, min_improvement, higher_is_better) for w in window)
    return flags


def plateau_holds(
    values: Sequence[float], patience: int, min_improvement: float, higher_is_better: bool = False
) -> bool:
    """True when the rule holds at the last value (the generator trainer stops there)."""
    flags = plateau_flags(values, patience, min_improvement, higher_is_better)
    return bool(flags) and flags[-1]


def plateau(
    values: Sequence[float], patience: int, min_improvement: float, higher_is_better: bool = False
) -> int | None:
    """The first index at which the rule holds (where a run checking it after every evaluation would stop), or None
    when it never does."""
    flags = plateau_flags(values, patience, min_improvement, higher_is_better)
    return next((i for i, f in enumerate(flags) if f), None)
