"""How long work shows its progress (``--progress``, docs/USAGE.md): ``bar``, a tqdm bar per task redrawn in place;
``lines``, no redraws: the commands print a line per finished unit, and a task given ``heartbeat`` seconds its status
at most that often (a log holds lines); ``none``; ``auto``: ``bar`` on a terminal, else ``lines``. ``Progress`` is
the one progress object the library's long loops take."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO

from tqdm import tqdm

PROGRESS_MODES = ("auto", "bar", "lines", "none")


def resolve_progress(mode: str | bool | None, stream: TextIO | None = None) -> str:
    """``bar``, ``lines`` or ``none`` for a mode (``True``/``False``/None: ``auto``/``none``/``auto``)."""
    if mode is True or mode is None:
        mode = "auto"
    elif mode is False:
        mode = "none"
    if mode not in PROGRESS_MODES:
        raise ValueError(f"progress must be one of {', '.join(PROGRESS_MODES)}, got {mode!r}")
    if mode == "auto":
        s = stream if stream is not None else sys.stderr
        try:
            return "bar" if s.isatty() else "lines"
        except (AttributeError, ValueError):
            return "lines"
    return str(mode)


class Progress:
    """One task's progress over ``total`` units: a bar (mode ``bar``) or nothing drawn (``lines``, ``none``: the
    caller prints its own result lines). ``say`` prints a line without breaking a bar that is drawn."""

    def __init__(
        self,
        total: int | None,
        desc: str,
        unit: str = "it",
        mode: str | bool | None = "auto",
        stream: TextIO | None = None,
        heartbeat: float | None = None,
        initial: int = 0,
        leave: bool = True,
    ) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.mode = resolve_progress(mode, self.stream)
        self.total, self.desc, self.unit = total, desc, unit
        self.done = self.initial = initial  # a resumed task starts part-way; the time left uses this session's rate
        self.t0 = time.perf_counter()
        self.bar: Any = None
        self.heartbeat = heartbeat if self.mode == "lines" else None
        self.last_line = self.t0  # when the last status line was printed
        if self.mode == "bar":
            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, file=self.stream,
                            dynamic_ncols=True, leave=leave)  # fmt: skip

    def update(self, n: int = 1, **postfix: Any) -> None:
        """``n`` more units done; ``postfix`` values follow the bar or the status line."""
        self.done += n
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(_shown(postfix), refresh=False)
            self.bar.update(n)
        elif self.heartbeat is not None and time.perf_counter() - self.last_line >= self.heartbeat:
            self.last_line = time.perf_counter()
            self.say(self.status() + "".join(f", {k} {v}" for k, v in _shown(postfix).items()))

    def status(self) -> str:
        """``desc: done/total unit, M:SS elapsed, about M:SS left``."""
        el = time.perf_counter() - self.t0
        text = (
            f"{self.desc}: {self.done}"
            + (f"/{self.total}" if self.total else "")
            + f" {self.unit}, {clock(el)} elapsed"
        )
        if self.total and self.initial < self.done < self.total:
            text += f", about {clock(el * (self.total - self.done) / (self.done - self.initial))} left"
        return text

    def postfix(self, **values: Any) -> None:
        """Values shown after the bar (a drawn bar only)."""
        if self.bar is not None:
            self.bar.set_postfix(_shown(values))

    def say(self, line: str) -> None:
        """A line of output on the progress stream (above the bar when one is drawn)."""
        if self.bar is not None:
            self.bar.write(line, file=self.stream)
        else:
            print(line, file=self.stream, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shown(values: dict[str, Any]) -> dict[str, Any]:
    """Values as a bar's postfix or a status line shows them: floats to 4 decimals."""
    return {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in values.items()}


def clock(seconds: float) -> str:
    """``M:SS``, or ``H:MM:SS`` from an hour on."""
    s = round(seconds)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
