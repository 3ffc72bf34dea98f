"""Shared pieces of the checkpoint readers: sniffing a file's container, loading torch files without
executing code, checking a state dict against a model with messages that name the key, atomic writes."""

from __future__ import annotations

import argparse
import importlib
import json
import re
import struct
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError, UnsafePickleError, first_line
from ..utils import atomic_write

# The pickle stream of a legacy (pre-1.6) torch.save file starts with this magic number.
_TORCH_LEGACY_MAGIC = (0x1950A86A20F9469CFC6C).to_bytes(10, "little")


def sniff(path: str | Path) -> str:
    """The container of a file: 'torch-zip', 'torch-legacy', 'pickle' or 'safetensors'; a one-line CheckpointError
    for a missing, empty, truncated or non-checkpoint file."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "no such file")
    if p.is_dir():
        raise CheckpointError(p, "is a folder, not a checkpoint file")
    size = p.stat().st_size
    if size == 0:
        raise CheckpointError(p, "empty file (0 bytes): not a checkpoint")
    with open(p, "rb") as f:
        head = f.read(16)
    if head.startswith(b"PK\x03\x04"):
        if not zipfile.is_zipfile(p):
            raise CheckpointError(
                p, "truncated: a torch zip archive whose end record is missing (incomplete download?)"
            )
        return "torch-zip"
    if head[8:9] == b"{":  # safetensors: an 8-byte header length, then the JSON header
        (n,) = struct.unpack("<Q", head[:8])
        if 8 + n > size:
            raise CheckpointError(p, f"truncated: safetensors header says {n} bytes but the file has {size - 8}")
        with open(p, "rb") as f:
            f.seek(8)
            raw = f.read(n)
        try:
            header = json.loads(raw)
            end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError):
            raise CheckpointError(p, "not a checkpoint: a safetensors-like file with a corrupt header") from None
        if 8 + n + end > size:
            raise CheckpointError(p, f"truncated: the safetensors data needs {8 + n + end} bytes, the file has {size}")
        return "safetensors"
    if head[:1] == b"\x80" and len(head) >= 2 and head[1] in range(2, 6):
        if head[2:3] == b"\x8a" and head[4:14] == _TORCH_LEGACY_MAGIC:
            return "torch-legacy"
        return "pickle"
    raise CheckpointError(
        p, "not a checkpoint: not a torch, pickle or safetensors file (first bytes " + head[:8].hex() + ")"
    )


def _numpy_safe_globals() -> list[Any]:
    out: list[Any] = [np.dtype, np.ndarray]
    for mod in ("numpy._core.multiarray", "numpy.core.multiarray"):
        try:
            m = importlib.import_module(mod)
            out += [m.scalar, m._reconstruct]
            break
        except (ImportError, AttributeError):
            continue
    return out + [type(np.dtype(t)) for t in ("float64", "float32", "int64", "int32", "bool")]


# Classes that pretrained files commonly hold besides tensors and that only carry data:
# rosinality training checkpoints store their argparse options; e4e/pSp may store numpy scalars.
SAFE_GLOBALS: list[Any] = [argparse.Namespace, *_numpy_safe_globals()]

# torch words its refusal in several ways ("Unsupported global: GLOBAL eval", "unsupported GLOBAL posix.system whose
# module posix is blocked", ...); only the name is taken from it, never its advice (to turn the guard off)
_UNSUPPORTED_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")


def raise_refusal(path: Path, e: Exception, where: str) -> None:
    """Raise torch's refusal to load a class with ``weights_only`` as one UnsafePickleError naming the class
    (``where``: what it is); nothing for any other error ``e``."""
    m = _UNSUPPORTED_GLOBAL.search(str(e))
    if m or "Weights only load failed" in str(e):
        what = f"{m.group(1)}, {where}" if m else where
        msg = f"refused: the file asks to run code ({what}); cycle-encoding will not load it (nothing from it was run)"
        raise UnsafePickleError(path, msg) from None


def torch_load(path: str | Path, mmap: bool = False) -> Any:
    """``torch.load`` with ``weights_only=True`` (no code from the file runs), with clear one-line errors; ``mmap``:
    tensors are read when used (a zip-format file's structure costs no more than its pickle)."""
    p = Path(path)
    kind = sniff(p)
    if kind not in ("torch-zip", "torch-legacy"):
        raise CheckpointError(p, f"expected a torch file (torch.save), found a {kind} file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(p, map_location="cpu", weights_only=True, mmap=mmap or None)
    except Exception as e:  # torch raises many types here; turn each into one line
        msg = str(e)
        if "central directory" in msg or "unexpected EOF" in msg or "Ran out of input" in msg:
            raise CheckpointError(p, "truncated: the archive ends early (incomplete download?)") from None
        raise_refusal(p, e, "not a tensor or a plain container")
        raise CheckpointError(p, f"cannot read torch file: {first_line(e)}") from None


def check_shapes(
    sd: Mapping[str, Any],
    expected: Mapping[str, tuple[int | None, ...]],
    source: str | Path,
    what: str,
    optional: tuple[str, ...] = (),
    shape_hint: str = "",
) -> None:
    """``sd`` holds exactly the ``expected`` keys (those ending in ``optional`` may be missing), each a tensor of that
    shape (None: any size); else one CheckpointError naming the first key that differs."""
    for k, shape in expected.items():
        if k not in sd:
            if k.endswith(optional):
                continue
            raise CheckpointError(
                source, f"{what}: missing key {k} (expected shape {list(shape)}); the layout does not fit"
            )
        got = sd[k]
        if not isinstance(got, torch.Tensor):
            raise CheckpointError(source, f"{what}: key {k} holds a {type(got).__name__}, not a tensor")
        if len(got.shape) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got.shape)):
            raise CheckpointError(
                source, f"{what}: key {k} has shape {list(got.shape)}, expected {list(shape)}{shape_hint}"
            )
    extra = [k for k in sd if k not in expected]
    if extra:
        raise CheckpointError(source, f"{what}: unexpected key {extra[0]} ({len(extra)} unexpected in all)")


def check_state_dict(model: nn.Module, sd: Mapping[str, torch.Tensor], source: str | Path, what: str) -> None:
    """Compare ``sd`` with ``model``'s keys and shapes (``check_shapes``)."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    hint = f" for the inferred architecture: the shapes fit no {what} configuration this reader knows"
    check_shapes(sd, expected, source, what, shape_hint=hint)


def check_declared_architecture(
    build: Callable[[], nn.Module],
    sd: Mapping[str, torch.Tensor],
    source: str | Path,
    what: str,
    counts: Mapping[str, int] | None = None,
    derived: Callable[[str], bool] = lambda key: False,
) -> None:
    """A declared architecture checked against the tensors before anything is allocated: ``counts`` (each part holds a
    tensor) at most the number of tensors, then the network built on ``meta`` vs ``sd`` less the ``derived`` buffers."""
    n = len(sd)
    for name, value in (counts or {}).items():
        if value > n:
            raise CheckpointError(
                source, f"{what}: the declared {name} ({value}) cannot fit the {n} tensors the file holds"
            )
    try:
        with torch.device("meta"):
            model = build()
    except (ValueError, TypeError, RuntimeError) as e:
        raise CheckpointError(source, f"{what}: the declared architecture cannot be built: {first_line(e)}") from None
    check_state_dict(model, {**{k: v for k, v in model.state_dict().items() if derived(k)}, **sd}, source, what)


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    return atomic_write(path, lambda tmp: torch.save(obj, tmp))


def count_parameters(sd: dict[str, Any], skip: Callable[[str], bool] = lambda k: False) -> int:
    return int(sum(v.numel() for k, v in sd.items() if hasattr(v, "numel") and not skip(k)))
