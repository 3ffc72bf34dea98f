"""Images in: read a file, a PIL image or an array to a [-1, 1] tensor; list the image files of a folder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CycleEncodingError, first_line
from ..ops import convert_channels
from ..utils import open_image

# images are reduced while decoded to no less than this shorter side: twice the largest generator's resolution
# (a 7000 x 7000 PNG otherwise made one `invert` peak at 4.1 GB in float copies)
DECODE_MIN_SIDE = 2048
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
_GREY_MODES = ("1", "L", "LA")
_SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")
# v -> float32(v / 255) * 2 - 1, the same operations as the 16-bit path's, for the 256 values of 8-bit pixels
_LEVELS_8BIT = (torch.from_numpy((np.arange(256) / 255.0).astype(np.float32)) * 2 - 1).numpy()


def is_image_file(path: str | Path) -> bool:
    """Whether the name has one of IMAGE_EXTENSIONS (case-insensitive) and is not hidden."""
    p = Path(path)
    return p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith(".")


def list_images(folder: str | Path, recursive: bool = False) -> list[Path]:
    """The image files (by extension) in ``folder``, sorted by name; ``recursive`` descends into sub-folders."""
    d = Path(folder)
    if not d.is_dir():
        raise CycleEncodingError(f"{d}: not a folder" if d.exists() else f"{d}: no such folder")
    it = d.rglob("*") if recursive else d.iterdir()
    return sorted((p for p in it if p.is_file() and is_image_file(p)), key=lambda p: str(p.relative_to(d)))


def image_to_tensor(image: Image.Image | np.ndarray, channels: int | None = None) -> torch.Tensor:
    """An image in memory (PIL, or a uint8 / float array ``[H, W]`` / ``[H, W, C]``; floats in [0, 1]) to a float32
    tensor [C, H, W] in [-1, 1], by the rules of :func:`read_image` (grey -> 1 channel, else RGB; ``channels``
    converts)."""
    if isinstance(image, np.ndarray):
        a = np.asarray(image)
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[:, :, 0]
        if a.ndim not in (2, 3) or (a.ndim == 3 and a.shape[2] not in (3, 4)):
            raise CycleEncodingError(f"an image array is [H, W] or [H, W, 3|4], got shape {list(a.shape)}")
        if a.dtype != np.uint8:
            if not np.issubdtype(a.dtype, np.floating) and not np.issubdtype(a.dtype, np.integer):
                raise CycleEncodingError(f"an image array holds numbers, not {a.dtype}")
            if np.issubdtype(a.dtype, np.floating):
                if not np.isfinite(a).all():
                    raise CycleEncodingError("the image array holds NaN or infinite values")
                a = np.rint(np.clip(a, 0.0, 1.0) * 255.0)
            a = np.clip(a, 0, 255).astype(np.uint8)
        image = Image.fromarray(a[:, :, :3] if a.ndim == 3 else a)
    if not isinstance(image, Image.Image):
        raise CycleEncodingError(f"not an image: a {type(image).__name__}")
    img = ImageOps.exif_transpose(image)  # photos from cameras and phones: apply their orientation
    mode = img.mode
    if mode in _SIXTEEN_BIT_MODES:
        arr = (np.asarray(img, dtype=np.float64) / 65535.0)[None]
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)) * 2 - 1
    else:  # 8 bits: each value's float through a table, no float64 copy of the image
        arr = _LEVELS_8BIT[np.asarray(img.convert("L" if mode in _GREY_MODES else "RGB"))]
        x = torch.from_numpy(np.ascontiguousarray(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1)))
    return convert_channels(x, channels).contiguous()


def decode_reduced(im: Image.Image, min_side: int | None) -> Image.Image:
    """Decode ``im``, reduced by the largest integer factor that keeps its shorter side at least ``min_side`` (None:
    full size): JPEG by scaling its DCT while decoding (draft mode), the rest by box-averaging the decoded pixels
    (``Image.reduce``) before anything else is made from them. The memory a big image costs is then bounded by
    its decoded bytes, not by its float copies."""
    w, h = im.size
    if min_side is not None and min(w, h) // min_side >= 2 and im.format == "JPEG":
        k = min(w, h) // min_side
        im.draft(im.mode, (-(-w // k), -(-h // k)))  # the smallest DCT scale at least this size
    im.load()
    k = min(im.size) // min_side if min_side is not None else 1
    if k < 2:
        return im
    if im.mode not in ("L", "LA", "RGB", "RGBA", "I", "F"):  # the modes reduce() takes; grey stays grey
        grey = "L" if im.mode == "1" else "I"
        im = im.convert(grey if im.mode in ("1", *_SIXTEEN_BIT_MODES) else ("RGBA" if "A" in im.getbands() else "RGB"))
    return im.reduce(k)  # keeps the EXIF orientation that image_to_tensor applies


def read_image(path: str | Path, channels: int | None = None, min_side: int | None = DECODE_MIN_SIDE) -> torch.Tensor:
    """Read an image file to a float32 tensor [C, H, W] in [-1, 1].

    Grey images (modes 1, L, LA, 16-bit I) give C = 1, everything else C = 3 (RGB; alpha dropped, palettes expanded);
    16-bit grey is scaled by 1/65535; ``channels`` (1 or 3) converts. An image whose shorter side is at least twice
    ``min_side`` is reduced while decoding (:func:`decode_reduced`; DECODE_MIN_SIDE keeps 2 or more pixels per output
    pixel for every generator; None: full size). An unreadable file raises a one-line CycleEncodingError.
    """
    p = Path(path)
    try:
        with open_image(p) as opened:
            return image_to_tensor(decode_reduced(opened, min_side), channels)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise CycleEncodingError(f"{p}: cannot read image: {first_line(e)}") from None


def from_pil(image: Image.Image, channels: int | None = None) -> torch.Tensor:
    """A PIL image -> float32 ``[1, C, H, W]`` in [-1, 1] (a generator output's layout), as ``read_image`` reads."""
    if not isinstance(image, Image.Image):
        raise CycleEncodingError(f"from_pil takes a PIL image, got {type(image).__name__}")
    return image_to_tensor(image, channels)[None]


def image_tensor(image: object, channels: int | None = None) -> torch.Tensor:
    """Any image a user has -> float32 ``[C, H, W]`` in [-1, 1]: a path (``read_image``), a PIL image or a numpy
    array (``image_to_tensor``), or a float tensor in [-1, 1] ``[C, H, W]`` / ``[1, C, H, W]`` (as G's outputs)."""
    if isinstance(image, (str, Path)):
        return read_image(image, channels)
    if isinstance(image, (Image.Image, np.ndarray)):
        return image_to_tensor(image, channels)
    if isinstance(image, torch.Tensor):
        x = image.detach()
        if not x.is_floating_point():
            raise CycleEncodingError(
                f"an image tensor of dtype {x.dtype}: give floats in [-1, 1] ([C, H, W]), or a uint8 numpy array"
            )
        if x.ndim == 4 and x.shape[0] == 1:
            x = x[0]
        if x.ndim != 3 or x.shape[0] not in (1, 3):
            raise CycleEncodingError(
                f"an image tensor is [C, H, W] or [1, C, H, W] with C = 1 or 3, got {list(x.shape)}"
            )
        x = x.float()
        if not torch.isfinite(x).all():
            raise CycleEncodingError("the image tensor holds NaN or infinite values")
        return convert_channels(x, channels).contiguous()
    raise CycleEncodingError(
        f"cannot read an image from a {type(image).__name__}: give a path, a PIL image, a numpy array or a tensor"
    )
