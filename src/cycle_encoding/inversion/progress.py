"""Progress of one image's inversion: a tqdm bar over each stage's optimization steps."""

from __future__ import annotations

import sys
from typing import Any


class StepBar:
    """A tqdm bar over a stage's steps (only when progress is shown)."""

    def __init__(self, enabled: bool, head: str) -> None:
        self.enabled = enabled
        self.head = head
        self.bar: Any = None
        self.stage: str | None = None

    def step(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if rec.get("stage") != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = rec.get("stage")
            self.bar = tqdm(desc=f"{self.head} {self.stage}", unit="step", leave=False, file=sys.stderr)
        self.bar.update(1)
        shown = {k: f"{rec[k]:.4f}" for k in ("loss", "perceptual", "target_l_s") if isinstance(rec.get(k), float)}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.stage = None
