"""Run folders and exact-resume helpers shared by the training loops."""

from __future__ import annotations

import json
import os
import platform
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


def machine_info(device: torch.device | None = None) -> dict[str, Any]:
    """Where a run ran: platform, processor, CPU count, Python and torch versions, torch threads; the device when
    given (and the GPU's name on CUDA)."""
    out: dict[str, Any] = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                           "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                           "torch_threads": torch.get_num_threads()}  # fmt: skip
    if device is not None:
        out["device"] = str(device)
        if device.type == "cuda":
            out["gpu"] = torch.cuda.get_device_name(device)
    return out


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


class RunLog:
    """A run's ``log.jsonl`` (one JSON record a line) and, when enabled, its TensorBoard scalars under ``tb/``.

    Records carry ``kind`` ("start", "train", "val", "end", ...) and ``step``; numeric fields of the kinds in
    ``scalar_kinds`` go to TensorBoard as ``<kind>/<field>``. Only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool, tensorboard: bool, scalar_kinds: tuple[str, ...] = ("train",)):
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled
        if enabled and self.path.is_file() and self.path.stat().st_size:  # a run killed mid-write left half a
            with open(self.path, "r+b") as f:  # record: drop it before appending (read all only in that case)
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.seek(0)
                    f.truncate(f.read().rfind(b"\n") + 1)
        self.scalar_kinds = scalar_kinds
        self.writer = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # lazy: 0.5 s to import, only when asked for

            self.writer = SummaryWriter(str(Path(run_dir) / "tb"))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        kind = record.get("kind")
        if self.writer is not None and kind in self.scalar_kinds:
            for k, v in record.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("step", "time"):
                    self.writer.add_scalar(f"{kind}/{k}", v, record["step"])

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        if self.writer is not None:
            self.writer.add_image(tag, image, step)

    def flush(self) -> None:
        if self.writer is not None:
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
