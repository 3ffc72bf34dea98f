"""Fashion-MNIST (Zalando, MIT licence) read from its idx files: 60,000 training and 10,000 test images.
Design notes: docs/INTERNALS.md, "cycle_encoding.data.fashion_mnist"."""

from __future__ import annotations

import gzip
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from ..errors import CycleEncodingError
from ..ops import convert_channels
from .datasets import DATASETS, ImageDataset, resize_square

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
ENV_VAR = "CYCLE_ENCODING_FASHION_MNIST"
CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
SPLITS = {"train": "train", "test": "t10k", "t10k": "t10k"}
COUNTS = {"train": 60_000, "t10k": 10_000}
IMAGE_MAGIC = 2051
LABEL_MAGIC = 2049
NATIVE_SIZE = 28
PADDED_SIZE = 32
PAD = (PADDED_SIZE - NATIVE_SIZE) // 2
# The value the padding takes in [-1, 1]: the background, pixel value 0.
PAD_VALUE = -1.0
_DTYPES = {0x08: np.dtype(">u1"), 0x09: np.dtype(">i1"), 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
           0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}  # fmt: skip
INSTALL_HINT = "apt-get install dataset-fashion-mnist"


def _open_bytes(path: Path) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (OSError, EOFError) as e:
        raise CycleEncodingError(f"{path}: cannot read ({e})") from None


def parse_idx(data: bytes, source: str = "idx data") -> np.ndarray:
    """The array stored in idx bytes (``0 0 TYPE NDIM``, NDIM big-endian uint32 sizes, values), native byte order."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise CycleEncodingError(f"{source}: not an idx file (the first two bytes must be zero)")
    code, ndim = data[2], data[3]
    if code not in _DTYPES:
        raise CycleEncodingError(f"{source}: unknown idx value type 0x{code:02x}")
    head = 4 + 4 * ndim
    if len(data) < head:
        raise CycleEncodingError(f"{source}: truncated idx header")
    shape = tuple(int(v) for v in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    dt = _DTYPES[code]
    expected = head + int(np.prod(shape, dtype=np.int64)) * dt.itemsize
    if len(data) != expected:
        raise CycleEncodingError(
            f"{source}: idx header says {list(shape)} values ({expected} bytes) but the file has {len(data)} bytes"
        )
    arr = np.frombuffer(data, dtype=dt, offset=head).reshape(shape)
    return arr.astype(dt.newbyteorder("="), copy=False)


def read_idx(path: str | Path, magic: int | None = None) -> np.ndarray:
    """Read an idx file (``.gz`` or plain); ``magic``: the expected big-endian magic number (2051, 2049, ...)."""
    p = Path(path)
    data = _open_bytes(p)
    if magic is not None and len(data) >= 4 and int.from_bytes(data[:4], "big") != magic:
        raise CycleEncodingError(
            f"{p}: magic number {int.from_bytes(data[:4], 'big')}, expected {magic} "
            f"({'images' if magic == IMAGE_MAGIC else 'labels'})"
        )
    return parse_idx(data, str(p))


def _find(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).is_file():
            return root / name
    hint = (
        f" (install it: {INSTALL_HINT})"
        if root == DEFAULT_ROOT
        else f" (or install the Debian package: {INSTALL_HINT})"
    )
    raise CycleEncodingError(f"{root}: Fashion-MNIST file {stem}.gz not found{hint}")


@lru_cache(maxsize=4)
def _load_arrays(
    images_path: str, labels_path: str, prefix: str, mtimes: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    images = read_idx(images_path, IMAGE_MAGIC)
    labels = read_idx(labels_path, LABEL_MAGIC)
    if images.shape[1:] != (NATIVE_SIZE, NATIVE_SIZE):  # the magic numbers fixed the type (uint8) and the ranks
        raise CycleEncodingError(f"{images_path}: expected images [N, 28, 28], got {list(images.shape)}")
    if images.shape[0] != labels.shape[0]:
        raise CycleEncodingError(
            f"{Path(images_path).parent}: {images.shape[0]} images but {labels.shape[0]} labels in split {prefix}"
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise CycleEncodingError(f"{labels_path}: label {int(labels.max())} out of range 0-9")
    images.setflags(write=False)
    labels.setflags(write=False)
    return images, labels


def load_split(split: str = "train", root: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 ``[N, 28, 28]``, labels uint8 ``[N]``) of ``split`` ("train" or "test") from ``root``; the
    Debian folder must hold the published counts (60,000 / 10,000)."""
    if split not in SPLITS:
        raise CycleEncodingError(f"Fashion-MNIST has splits 'train' and 'test', not {split!r}")
    prefix = SPLITS[split]
    # no root: $CYCLE_ENCODING_FASHION_MNIST if set, else the Debian package's folder
    base = Path(root if root is not None else os.environ.get(ENV_VAR) or DEFAULT_ROOT)
    if not base.is_dir():
        raise CycleEncodingError(f"{base}: no Fashion-MNIST folder (install it: {INSTALL_HINT})")
    ip = _find(base, f"{prefix}-images-idx3-ubyte")
    lp = _find(base, f"{prefix}-labels-idx1-ubyte")
    images, labels = _load_arrays(str(ip), str(lp), prefix, (ip.stat().st_mtime, lp.stat().st_mtime))
    if root is None and base == DEFAULT_ROOT and images.shape[0] != COUNTS[prefix]:
        raise CycleEncodingError(f"{ip}: {images.shape[0]} images, Fashion-MNIST {split} has {COUNTS[prefix]}")
    return images, labels


def to_unit_range(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float32 in [-1, 1]: ``v / 127.5 - 1``."""
    t = images if isinstance(images, torch.Tensor) else torch.from_numpy(np.asarray(images, dtype=np.float32).copy())
    return t.to(torch.float32) / 127.5 - 1.0


def pad_to_32(x: torch.Tensor) -> torch.Tensor:
    """``[..., 28, 28]`` in [-1, 1] -> ``[..., 32, 32]`` with 2 pixels of background (-1.0) on each side."""
    out = x.new_full((*x.shape[:-2], PADDED_SIZE, PADDED_SIZE), PAD_VALUE)
    out[..., PAD : PAD + NATIVE_SIZE, PAD : PAD + NATIVE_SIZE] = x
    return out


class FashionMNIST(ImageDataset):
    """One split of Fashion-MNIST as ``[channels, size, size]`` images in [-1, 1]; ``labels`` (int64 ``[N]``),
    ``classes`` (the 10 names, index = label) and ``label_name(i)``."""

    classes = CLASSES

    def __init__(
        self, split: str = "train", size: int = PADDED_SIZE, channels: int = 1, root: str | Path | None = None
    ) -> None:
        if channels not in (1, 3):
            raise CycleEncodingError(f"channels must be 1 or 3, got {channels}")
        if size < 1:
            raise CycleEncodingError(f"image size must be positive, got {size}")
        self.images, raw_labels = load_split(split, root)
        self.labels = torch.from_numpy(raw_labels.astype(np.int64))
        self.split = "test" if SPLITS[split] == "t10k" else "train"
        self.size = size
        self.channels = channels
        self.name = f"fashion-mnist:{self.split}"

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def load(self, index: int) -> torch.Tensor:
        x = to_unit_range(self.images[index])[None]  # [1, 28, 28]
        if self.size != NATIVE_SIZE:
            x = pad_to_32(x)
            if self.size != PADDED_SIZE:
                x = resize_square(x, self.size)
        return convert_channels(x, self.channels).contiguous()

    def label_name(self, index: int) -> str:
        return CLASSES[int(self.labels[index])]

    def class_counts(self) -> list[int]:
        """Number of images of each class, index = label."""
        return torch.bincount(self.labels, minlength=len(CLASSES)).tolist()


def open_fashion_mnist(split: str, size: int, channels: int) -> FashionMNIST:
    """The ``DATASETS`` factory: ``split`` is "train", "test", or "SPLIT@FOLDER" for idx files in FOLDER."""
    sp, _, folder = split.partition("@")
    return FashionMNIST(sp or "train", size, channels, root=folder or None)


DATASETS["fashion-mnist"] = open_fashion_mnist
