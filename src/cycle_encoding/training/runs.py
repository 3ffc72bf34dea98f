"""Run folders and exact-resume helpers shared by the training loops."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import numpy as np
import torch


def next_run_dir(out: str | Path, label: str) -> Path:
    """``out/NNNNN-label`` with NNNNN one past the largest number already there (not created)."""
    root = Path(out)
    root.mkdir(parents=True, exist_ok=True)
    ids = [int(p.name[:5]) for p in root.iterdir() if p.is_dir() and p.name[:5].isdigit()]
    return root / f"{(max(ids) + 1) if ids else 0:05d}-{label}"


def rng_state(gen: torch.Generator | None = None) -> dict[str, Any]:
    """All random states a training step may touch: torch (CPU and CUDA), numpy, python, and ``gen``."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002 (the global state libraries use)
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        # plain types and tensors only, so that checkpoints load with weights_only=True
        "numpy": [str(name), torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)],
        "python": random.getstate(),
    }
    if gen is not None:
        st["gen"] = gen.get_state()
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict[str, Any], gen: torch.Generator | None = None) -> None:
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))  # noqa: NPY002
    random.setstate(st["python"])
    if gen is not None and "gen" in st:
        gen.set_state(st["gen"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
