"""Small helpers shared across the package: devices, seed ranges, images."""

from __future__ import annotations

import json
import math
import os
import tempfile
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from itertools import groupby
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from .errors import CycleEncodingError, first_line


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """'auto' -> cuda when available, else cpu; 'cuda' without a GPU is a clear error."""
    if isinstance(device, torch.device):
        return device
    device = device or "auto"
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CycleEncodingError(f"device {device!r} asked for, but PyTorch sees no CUDA GPU (use --device cpu)")
    try:
        return torch.device(device)
    except RuntimeError:
        raise CycleEncodingError(f"unknown device {device!r} (auto, cpu, cuda, cuda:N)") from None


def format_int_list(xs: Sequence[int], sep: str = ",") -> str:
    """[0, 1, 2, 3, 7, 9, 10] -> '0-3,7,9-10' (the form :func:`parse_int_list` reads); 'none' for no numbers."""
    runs = [[x for _, x in g] for _, g in groupby(enumerate(xs), lambda t: t[1] - t[0])]  # a run: same x - index
    return sep.join(f"{r[0]}" if len(r) == 1 else f"{r[0]}-{r[-1]}" for r in runs) or "none"


def parse_int_list(
    spec: str,
    low: int | None = None,
    high: int | None = None,
    max_count: int | None = None,
    what: str = "number list",
) -> list[int]:
    """'0-3,7,10-11' -> [0, 1, 2, 3, 7, 10, 11]. With ``low``/``high`` every number must lie in [low, high], and with
    ``max_count`` the list may hold at most that many (checked before a range is expanded)."""
    out: list[int] = []
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part[1:]:
                a, b = part.split("-", 1)  # a negative start ("-3-5") leaves a = "": a bad list, as it should be
                lo, hi = int(a), int(b)
                if hi < lo:
                    raise ValueError
            else:
                lo = hi = int(part)
        except ValueError:
            raise CycleEncodingError(f"bad {what} {spec!r}: use forms like 0-7 or 1,5,9") from None
        for v in (lo, hi):
            if (low is not None and v < low) or (high is not None and v > high):
                raise CycleEncodingError(f"bad {what} {spec!r}: {v} is outside {low}..{high}")
        if max_count is not None and len(out) + hi - lo + 1 > max_count:
            raise CycleEncodingError(f"bad {what} {spec!r}: more than {max_count:,} numbers")
        out.extend(range(lo, hi + 1))
    if not out:
        raise CycleEncodingError(f"empty {what} {spec!r}")
    return out


def text_table(head: Sequence[str], rows: Sequence[Sequence[str]], rule: bool = False) -> list[str]:
    """Lines of an aligned text table: the head (then a line of dashes with ``rule``), then one line per row, columns
    left-aligned, two spaces apart."""
    widths = [max(len(x) for x in col) for col in zip(head, *rows)]
    lines = ["  ".join(x.ljust(w) for x, w in zip(line, widths)).rstrip() for line in [head, *rows]]
    return lines[:1] + ["  ".join("-" * w for w in widths)] * rule + lines[1:]


def check_finite(value: float | None, option: str, limit: float | None = None, why: str = "") -> None:
    """A clear error for NaN or infinite option values (``float('nan')`` parses), and for values beyond
    ``-limit .. limit`` when a limit is given (``why``: the reason, appended to the message)."""
    if value is not None and not math.isfinite(value):
        raise CycleEncodingError(f"{option} must be a finite number, got {value}")
    if value is not None and limit is not None and abs(value) > limit:
        raise CycleEncodingError(f"{option} must be between {-limit:g} and {limit:g}, got {value:g}{why}")


def to_uint8(images: torch.Tensor) -> np.ndarray:
    """[B, C, H, W] in [-1, 1] -> uint8 [B, H, W, C] (C = 1 or 3)."""
    x = (images.detach().float().cpu().clamp(-1, 1) + 1) * 127.5
    return x.round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def to_pil(image: torch.Tensor) -> Image.Image:
    """One image ``[C, H, W]`` or ``[1, C, H, W]`` in [-1, 1] (clamped) -> PIL (L for 1 channel, RGB for 3)."""
    if not isinstance(image, torch.Tensor):
        raise CycleEncodingError(f"to_pil takes an image tensor, got {type(image).__name__}")
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise CycleEncodingError(
            f"to_pil takes one image [C, H, W] or [1, C, H, W] with C = 1 or 3, got {list(image.shape)}"
            + (" (index the batch: to_pil(images[i]))" if image.ndim == 4 else "")
        )
    a = to_uint8(image[None])[0]
    return Image.fromarray(a[:, :, 0], "L") if a.shape[2] == 1 else Image.fromarray(a, "RGB")


def make_grid(images: torch.Tensor, ncols: int | None = None, pad: int = 2, value: float = 1.0) -> torch.Tensor:
    """[B, C, H, W] -> one [C, H', W'] image tiling the batch row by row."""
    b, c, h, w = images.shape
    ncols = ncols or math.ceil(math.sqrt(b))
    nrows = math.ceil(b / ncols)
    grid = images.new_full((c, nrows * (h + pad) + pad, ncols * (w + pad) + pad), value)
    for i in range(b):
        r, q = divmod(i, ncols)
        y, x = pad + r * (h + pad), pad + q * (w + pad)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def atomic_write(path: str | Path, write: Callable[[Path], None]) -> Path:
    """Call ``write(tmp)`` for a temporary file beside ``path``, then rename it into place."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        try:
            write(Path(tmp))
        except (OSError, RuntimeError) as e:
            # a full disk: PIL's and numpy's OSError name no file, torch's RuntimeError
            if isinstance(e, OSError) and e.filename is None and e.errno is not None:
                raise OSError(e.errno, e.strerror, str(p)) from e
            if isinstance(e, RuntimeError) and "write" in str(e):
                raise OSError(f"{p}: cannot write: {first_line(e)}") from e
            raise
        # mkstemp creates the file 0600; give it the permissions a plain open() would
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, p)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return p


def read_json(path: Path) -> Any:
    """A JSON file; one clear error for a file that cannot be read or parsed."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CycleEncodingError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CycleEncodingError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def write_json(path: str | Path, doc: Any) -> Path:
    """``doc`` as indented JSON, atomically."""
    return atomic_write(path, lambda t: t.write_text(json.dumps(doc, indent=2) + "\n"))


def save_image(image: torch.Tensor, path: str | Path) -> Path:
    """Save [C, H, W] in [-1, 1] as PNG, atomically."""
    pil = to_pil(image)
    return atomic_write(path, lambda tmp: pil.save(tmp, format="PNG"))


# Images are refused above this many pixels before they are decoded: a small compressed file can declare a huge
# canvas (a 236 KB PNG of 9000 x 9000 pixels needs 4.7 GB as floats). The command-line option --max-pixels raises it.
DEFAULT_MAX_PIXELS = 50_000_000
_max_pixels = DEFAULT_MAX_PIXELS


def set_max_pixels(n: int) -> None:
    """The largest image (width x height) any reader of the package decodes (``--max-pixels``)."""
    global _max_pixels
    if n < 1:
        raise CycleEncodingError(f"--max-pixels must be 1 or more, got {n}")
    _max_pixels = int(n)


def max_pixels() -> int:
    return _max_pixels


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """``PIL.Image.open`` whose image is at most ``max_pixels()`` pixels, checked from the header before any pixel
    is decoded; every failure is one CycleEncodingError naming the file."""
    p = Path(path)
    limit = _max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies, below
            old = Image.MAX_IMAGE_PIXELS
            Image.MAX_IMAGE_PIXELS = max(limit, 1)
            try:
                im = Image.open(p)
            finally:
                Image.MAX_IMAGE_PIXELS = old
    except FileNotFoundError:
        raise CycleEncodingError(f"{p}: no such file") from None
    except Image.DecompressionBombError:
        raise CycleEncodingError(
            f"{p}: image larger than the limit of {limit:,} pixels (raise it with --max-pixels)"
        ) from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise CycleEncodingError(f"{p}: cannot read image: {first_line(e)}") from None
    with im:
        w, h = im.size
        if w * h > limit:
            raise CycleEncodingError(
                f"{p}: image of {w} x {h} = {w * h:,} pixels, over the limit of {limit:,} (raise it with --max-pixels)"
            )
        yield im
