"""Progress of one image's inversion over each stage's optimization steps: one ``Progress`` a stage."""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from typing import Any

from ..progress import Progress, clock


class _Steps(Progress):
    """One stage's steps: its status line says the seconds a step and the time left at most."""

    def status(self) -> str:
        """``desc: step k/K, S s/step, at most T left`` (K and T when the stage's step count is known)."""
        per = (time.perf_counter() - self.t0) / max(1, self.done)
        text = f"{self.desc}: step {self.done}" + (f"/{self.total}" if self.total else "") + f", {per:.2f} s/step"
        if self.total:
            text += f", at most {clock(per * max(0, self.total - self.done))} left"
        return text


class StepBar:
    """Progress over each stage's steps (only when progress is shown), with the losses: on a terminal a bar; otherwise
    (a log file) a line at the first step and then every ``every`` seconds, so long CPU runs show where they are. The
    time left is at most that: tuning may stop early."""

    def __init__(
        self, enabled: bool | str, head: str, totals: Mapping[str, int] | None = None, every: float = 30.0
    ) -> None:
        self.mode = enabled  # a --progress mode (auto, bar, lines, none), or True / False: auto / none
        self.head, self.totals, self.every = head, dict(totals or {}), every
        self.stage: str | None = None
        self.progress: _Steps | None = None
        self.mark()

    def mark(self) -> None:
        """Now is when the next stage's steps start (a step is reported when it has finished)."""
        self.started = time.perf_counter()

    def step(self, rec: dict[str, Any]) -> None:
        if self.progress is None or rec.get("stage") != self.stage:
            self.close()
            self.stage = rec.get("stage")
            self.progress = _Steps(self.totals.get(str(self.stage)), f"{self.head} {self.stage}", "step", self.mode,
                                   heartbeat=self.every, leave=False)  # fmt: skip
            self.progress.t0 = self.started
            self.progress.last_line = -math.inf  # a line at the first step
        losses = {k: rec[k] for k in ("loss", "perceptual", "target_l_s") if isinstance(rec.get(k), float)}
        self.progress.update(1, **losses)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        self.progress = None
        self.stage = None
