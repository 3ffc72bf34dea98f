"""Where files that are not part of the repository live (converted weights, fetched test photos)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str, create: bool = True) -> Path:
    """The project's cache folder: $CYCLE_ENCODING_CACHE, else $XDG_CACHE_HOME/cycle-encoding,
    else ~/.cache/cycle-encoding. Never inside the repository."""
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = os.environ.get("CYCLE_ENCODING_CACHE") or (Path(xdg) if xdg else Path.home() / ".cache") / "cycle-encoding"
    p = Path(base).joinpath(*parts)
    if create:
        p.mkdir(parents=True, exist_ok=True)
    return p
