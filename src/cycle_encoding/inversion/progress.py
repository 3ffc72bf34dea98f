"""Progress of one image's inversion over each stage's optimization steps: seconds per step and the time left."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping
from typing import Any

from tqdm import tqdm

from ..progress import clock, resolve_progress


class StepBar:
    """Progress over a stage's steps (only when progress is shown): seconds per step and the time left (at most:
    tuning may stop early). On a terminal a tqdm bar; otherwise (a log file) one plain line at the first step and then
    every ``every`` seconds, so long CPU runs show where they are."""

    def __init__(
        self, enabled: bool | str, head: str, totals: Mapping[str, int] | None = None, every: float = 30.0
    ) -> None:
        # a --progress mode (bar, lines, none; see ..progress), or True / False: auto / none
        mode = resolve_progress(enabled)
        self.enabled = mode != "none"
        self.head = head
        self.totals = dict(totals or {})
        self.every = every
        self.tty = mode == "bar"
        self.bar: Any = None
        self.stage: str | None = None
        self.count = 0
        self.t0 = 0.0
        self.last_line = 0.0
        self.mark()

    def mark(self) -> None:
        """Now is when the next stage's steps start (a step is reported when it has finished)."""
        self.started = time.perf_counter()

    def step(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if rec.get("stage") != self.stage:
            self.close()
            self.stage = rec.get("stage")
            self.count = 0
            self.t0 = self.started
            self.last_line = 0.0
            if self.tty:
                self.bar = tqdm(desc=f"{self.head} {self.stage}", total=self.totals.get(str(self.stage)),
                                unit="step", leave=False, file=sys.stderr)  # fmt: skip
        self.count += 1
        shown = {k: f"{rec[k]:.4f}" for k in ("loss", "perceptual", "target_l_s") if isinstance(rec.get(k), float)}
        if self.bar is not None:
            self.bar.update(1)
            if shown:
                self.bar.set_postfix(shown, refresh=False)
            return
        now = time.perf_counter()
        if self.count > 1 and now - self.last_line < self.every:
            return
        self.last_line = now
        print(f"{self.head} {self.stage}: {self.progress_text(now)}"
              + "".join(f", {k} {v}" for k, v in shown.items()), file=sys.stderr, flush=True)  # fmt: skip

    def progress_text(self, now: float | None = None) -> str:
        """``step k/K, S s/step, at most T left`` (K and T when the stage's step count is known)."""
        now = time.perf_counter() if now is None else now
        per = (now - self.t0) / max(1, self.count)
        total = self.totals.get(str(self.stage))
        text = f"step {self.count}" + (f"/{total}" if total else "") + f", {per:.2f} s/step"
        if total:
            text += f", at most {clock(per * max(0, total - self.count))} left"
        return text

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.stage = None
