"""Errors whose message is one line meant for the user (the CLI prints it without a traceback)."""

from __future__ import annotations

from pathlib import Path


def first_line(e: BaseException) -> str:
    """An exception's message as one line (its first), or its type's name when it has none."""
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


class CycleEncodingError(Exception):
    """Base class: the message says what was wrong and, where it helps, what to do."""


class CheckpointError(CycleEncodingError):
    """A file that cannot be read as the checkpoint asked for."""

    def __init__(self, path: str | Path | None, message: str) -> None:
        self.path = None if path is None else Path(path)
        super().__init__(f"{self.path}: {message}" if self.path is not None else message)


class UnsafePickleError(CheckpointError):
    """A pickle that asks for a class or function outside the allowed set; nothing of it was run."""
