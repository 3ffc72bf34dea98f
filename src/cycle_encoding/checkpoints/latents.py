"""Latent codes in the files other StyleGAN tools read and write (NVIDIA's ``projected_w.npz``, e4e's ``latents.pt``):
the one writer and reader of them in the project. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.latents".
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..errors import CycleEncodingError, first_line
from .common import atomic_torch_save, atomic_write, torch_load

NPZ_KEY = "w"
DICT_KEYS = ("w", "ws", "latents", "codes", "latent", "projected_w")
LATENT_SUFFIXES = (".npz", ".npy", ".pt", ".pth")


def _as_array(ws: torch.Tensor | np.ndarray) -> np.ndarray:
    a = ws.detach().to("cpu").float().numpy() if isinstance(ws, torch.Tensor) else np.asarray(ws, dtype=np.float32)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise ValueError(f"codes must be [num_ws, w_dim] or [n, num_ws, w_dim], got shape {list(a.shape)}")
    return np.ascontiguousarray(a, dtype=np.float32)


def save_projected_w(
    path: str | Path, ws: torch.Tensor | np.ndarray, extra: dict[str, torch.Tensor | np.ndarray] | None = None
) -> Path:
    """Write codes as NVIDIA's projector does: ``.npz`` with ``w`` float32 ``[n, num_ws, w_dim]`` (``[num_ws, w_dim]``
    becomes ``[1, num_ws, w_dim]``). ``extra`` arrays (e.g. the unedited ``pivot`` beside edited codes) are stored
    under their own keys; NVIDIA's tools read only ``w``."""
    a = _as_array(ws)
    arrays = {NPZ_KEY: a}
    for k, v in (extra or {}).items():
        if k == NPZ_KEY:
            raise ValueError("'w' holds the codes; name the extra array otherwise")
        arrays[k] = v.detach().to("cpu").float().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def save_latents(
    folder: str | Path, ws: torch.Tensor | np.ndarray, names: Sequence[str], stem: str = "latents"
) -> list[Path]:
    """Write stacked codes ``[n, num_ws, w_dim]`` as e4e does (``STEM.pt``, a tensor), as ``STEM.npy`` and the image
    names in the same order (``STEM.txt``, one per line); returns the paths written."""
    a = _as_array(ws)
    if len(names) != a.shape[0]:
        raise ValueError(f"{len(names)} names for {a.shape[0]} codes")
    bad = [n for n in names if "\n" in n or "\r" in n]
    if bad:
        raise ValueError(f"an image name holds a line break: {bad[0]!r}")
    d = Path(folder)
    pt = atomic_torch_save(torch.from_numpy(a.copy()), d / f"{stem}.pt")
    buf = io.BytesIO()
    np.save(buf, a, allow_pickle=False)
    data = buf.getvalue()
    npy = atomic_write(d / f"{stem}.npy", lambda tmp: tmp.write_bytes(data))
    text = "".join(f"{n}\n" for n in names)
    txt = atomic_write(d / f"{stem}.txt", lambda tmp: tmp.write_text(text))
    return [Path(pt), Path(npy), Path(txt)]


def _from_object(obj: object, path: Path) -> np.ndarray:
    if isinstance(obj, dict):
        key = next((k for k in DICT_KEYS if k in obj), None)
        if key is None:
            keys = ", ".join(map(str, list(obj)[:8]))
            raise CycleEncodingError(f"{path}: a dict without codes (looked for {', '.join(DICT_KEYS)}; has {keys})")
        obj = obj[key]
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu").float().numpy()
    if isinstance(obj, np.ndarray):
        return obj.astype(np.float32)
    raise CycleEncodingError(f"{path}: holds a {type(obj).__name__}, not a tensor of codes")


def _check_count(shape: Sequence[int], path: Path, max_count: int | None) -> None:
    """Codes in an array of ``shape`` (read from its header, before its data): none, or more than ``max_count``,
    is a one-line error."""
    n = int(shape[0]) if len(shape) in (2, 3) else 1
    if n == 0:
        raise CycleEncodingError(f"{path}: holds no codes (an array of shape {list(shape)})")
    if max_count is not None and n > max_count:
        raise CycleEncodingError(
            f"{path}: {n:,} codes, more than the {max_count:,} allowed at once (one image each; raise the limit: "
            "--max-codes N, or max_count)"
        )


def _read_npz(p: Path, max_count: int | None) -> np.ndarray:
    with np.load(p, allow_pickle=False) as z:
        if NPZ_KEY not in z.files:
            raise CycleEncodingError(
                f"{p}: no array 'w' (NVIDIA's projector layout); the file has {', '.join(z.files) or 'none'}"
            )
        with z.zip.open(f"{NPZ_KEY}.npy") as f:  # the shape from the header: a few KB can expand to GB
            version = np.lib.format.read_magic(f)
            read_header = (
                np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            )
            _check_count(read_header(f)[0], p, max_count)
        return np.asarray(z[NPZ_KEY], dtype=np.float32)


def load_latents(
    path: str | Path, num_ws: int | None = None, w_dim: int | None = None, max_count: int | None = None
) -> torch.Tensor:
    """Codes ``[n, num_ws, w_dim]`` (float32) from any layout this module reads, checked against a generator's
    ``num_ws`` / ``w_dim`` when given (W codes ``[n, w_dim]`` repeated over the layers) and ``max_count``."""
    p = Path(path)
    if not p.is_file():
        raise CycleEncodingError(f"{p}: no such file" if not p.exists() else f"{p}: not a file")
    suffix = p.suffix.lower()
    try:
        if suffix == ".npz":
            a = _read_npz(p, max_count)
        elif suffix == ".npy":
            a = np.load(p, allow_pickle=False, mmap_mode="r")
            _check_count(a.shape, p, max_count)
            a = np.array(a, dtype=np.float32)  # read from the mapped file
        elif suffix in (".pt", ".pth"):
            a = _from_object(torch_load(p), p)  # a .pt is not compressed: its size bounds the memory
        else:
            raise CycleEncodingError(f"{p}: codes are read from {', '.join(LATENT_SUFFIXES)} files")
    except (OSError, ValueError, EOFError, KeyError) as e:
        raise CycleEncodingError(f"{p}: cannot read codes ({first_line(e)})") from None
    _check_count(a.shape, p, max_count)
    if a.ndim == 2 and num_ws is not None:
        a = np.repeat(a[:, None, :], num_ws, axis=1)
    if a.ndim != 3:
        raise CycleEncodingError(f"{p}: codes have shape {list(a.shape)}; expected [n, num_ws, w_dim]")
    if (num_ws is not None and a.shape[1] != num_ws) or (w_dim is not None and a.shape[2] != w_dim):
        raise CycleEncodingError(
            f"{p}: codes of shape {list(a.shape)} do not fit a generator taking [n, {num_ws}, {w_dim}]"
        )
    if not np.isfinite(a).all():
        raise CycleEncodingError(f"{p}: the codes hold NaN or infinite values")
    return torch.from_numpy(np.ascontiguousarray(a))


def latent_names(path: str | Path, count: int) -> list[str] | None:
    """The image names of codes ``path`` (``STEM.txt`` beside it, one per line, as ``save_latents`` writes it) when
    it names exactly ``count`` images, each a plain file name (no folder, not hidden), all different; else None."""
    txt = Path(path).with_suffix(".txt")
    try:
        names = txt.read_text(encoding="utf-8").splitlines() if txt.is_file() else None
    except (OSError, UnicodeDecodeError):
        return None
    if not names or len(names) != count or len(set(names)) != count:
        return None
    if any(not n or n.startswith(".") or "/" in n or "\\" in n or "\0" in n or len(n) > 200 for n in names):
        return None
    return names
