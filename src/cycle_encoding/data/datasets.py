"""Training data: image folders and named datasets, each a sequence of images ``[C, S, S]`` in [-1, 1], drawn in
batches by :class:`EpochSampler` (deterministic, resumable, split between distributed ranks)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..errors import CycleEncodingError
from ..ops import resize
from .images import list_images, read_image

# Named datasets (e.g. "fashion-mnist") register a factory (split, size, channels) -> dataset when imported
# (data/__init__.py imports them all).
DatasetFactory = Callable[[str, int, int], "ImageDataset"]
DATASETS: dict[str, DatasetFactory] = {}


def resize_square(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre-crop to a square and resize to ``size`` (antialiased bilinear; exact when sizes agree)."""
    _, h, w = x.shape
    if h != w:
        s = min(h, w)
        top, left = (h - s) // 2, (w - s) // 2
        x = x[:, top : top + s, left : left + s]
    return resize(x[None], size)[0].clamp(-1, 1)


class ImageDataset:
    """Base: ``len``, ``load(i)`` (may raise CycleEncodingError for an unreadable item) and a ``name``."""

    name: str = "images"
    size: int
    channels: int

    def __len__(self) -> int:  # pragma: no cover - abstract
        raise NotImplementedError

    def load(self, index: int) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def describe(self) -> str:
        return f"{self.name} ({len(self)} images, {self.channels}x{self.size}x{self.size})"


class TensorDataset(ImageDataset):
    """Images already in memory ``[N, C, S, S]`` in [-1, 1] (tests, small datasets)."""

    def __init__(self, images: torch.Tensor, name: str = "tensor") -> None:
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise CycleEncodingError(f"images must be [N, C, S, S], got {list(images.shape)}")
        self.images = images.float()
        self.size = images.shape[-1]
        self.channels = images.shape[1]
        self.name = name

    def __len__(self) -> int:
        return self.images.shape[0]

    def load(self, index: int) -> torch.Tensor:
        return self.images[index]


class ImageFolderDataset(ImageDataset):
    """The image files of a folder (recursively), centre-cropped and resized to ``size``, ``channels`` 1 or 3;
    ``cache``: keep decoded images in memory (for small folders read many times)."""

    def __init__(self, root: str | Path, size: int, channels: int = 3, cache: bool = True) -> None:
        self.root = Path(root)
        self.files = list_images(self.root, recursive=True)
        if not self.files:
            raise CycleEncodingError(f"{self.root}: no image files found (png, jpg, ...)")
        self.size = size
        self.channels = channels
        self.name = str(self.root)
        self._cache: dict[int, torch.Tensor] | None = {} if cache else None

    def __len__(self) -> int:
        return len(self.files)

    def load(self, index: int) -> torch.Tensor:
        if self._cache is not None and index in self._cache:
            return self._cache[index]
        x = resize_square(read_image(self.files[index], channels=self.channels), self.size)
        if self._cache is not None:
            self._cache[index] = x
        return x


def open_dataset(spec: str | Path, size: int, channels: int, split: str = "train") -> ImageDataset:
    """A folder path, or a registered dataset name (optionally ``name:split``)."""
    s = str(spec)
    name, _, sp = s.partition(":")
    if name in DATASETS and not Path(s).exists():
        return DATASETS[name](sp or split, size, channels)
    p = Path(s)
    if not p.exists():
        known = ", ".join(sorted(DATASETS)) or "none registered"
        raise CycleEncodingError(f"{s}: no such folder, and not a known dataset name (known: {known})")
    return ImageFolderDataset(p, size, channels)


def split_holdout(n: int, count: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """(train indices, held-out indices): ``count`` items chosen by a seeded permutation, kept out of training."""
    if count <= 0:
        return list(range(n)), []
    if count >= n:
        raise CycleEncodingError(f"cannot hold out {count} of {n} images for validation: too few images")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    held = sorted(perm[:count])
    held_set = set(held)
    return [i for i in range(n) if i not in held_set], held


class SubsetDataset(ImageDataset):
    def __init__(self, base: ImageDataset, indices: Sequence[int], name: str | None = None) -> None:
        self.base = base
        self.indices = list(indices)
        self.size = base.size
        self.channels = base.channels
        self.name = name or f"{base.name} (subset)"

    def __len__(self) -> int:
        return len(self.indices)

    def load(self, index: int) -> torch.Tensor:
        return self.base.load(self.indices[index])


class EpochSampler:
    """Deterministic resumable batches: epoch e uses a permutation seeded by (seed, e); a batch is the next
    ``batch_size`` readable items (unreadable ones are counted and skipped; most of them unreadable stops the run);
    rank r of w takes items r, r + w, ... of each global batch. Flips are seeded by (seed, epoch, position)."""

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        seed: int = 0,
        flip: bool = False,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size % world_size:
            raise CycleEncodingError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        if len(dataset) == 0:
            raise CycleEncodingError(f"{dataset.name}: the dataset is empty")
        self.dataset = dataset
        self.batch_size = batch_size
        self.seed = seed
        self.flip = flip
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.position = 0
        self.tried = 0
        self.bad: dict[int, str] = {}
        self._perm: list[int] | None = None

    def _permutation(self) -> list[int]:
        if self._perm is None:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._perm = torch.randperm(len(self.dataset), generator=g).tolist()
        return self._perm

    def _next_index(self) -> int:
        perm = self._permutation()
        if self.position >= len(perm):
            self.epoch += 1
            self.position = 0
            self._perm = None
            perm = self._permutation()
        i = perm[self.position]
        self.position += 1
        return i

    def _load(self, i: int) -> torch.Tensor | None:
        if i in self.bad:
            return None
        self.tried += 1
        try:
            return self.dataset.load(i)
        except CycleEncodingError as e:
            self.bad[i] = str(e)
            print(f"warning: skipping unreadable image: {e}", file=sys.stderr)
            if self.tried >= 8 and 2 * len(self.bad) > self.tried:
                raise CycleEncodingError(
                    f"{self.dataset.name}: {len(self.bad)} of {self.tried} images tried are unreadable "
                    f"(last: {e}); stopping: check the data folder"
                ) from None
            if len(self.bad) >= len(self.dataset):
                raise CycleEncodingError(f"{self.dataset.name}: no readable image") from None
            return None

    def next_batch(self) -> torch.Tensor:
        """This rank's share of the next global batch, ``[batch_size / world_size, C, S, S]``."""
        items: list[torch.Tensor] = []
        while len(items) < self.batch_size:
            g_pos = (self.epoch, self.position)
            x = self._load(self._next_index())
            if x is None:
                continue
            if self.flip:
                g = torch.Generator().manual_seed(hash((self.seed, *g_pos)) & 0x7FFFFFFF)
                if torch.rand((), generator=g) < 0.5:
                    x = x.flip(-1)
            items.append(x)
        return torch.stack(items[self.rank :: self.world_size])

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "position": self.position, "tried": self.tried, "bad": dict(self.bad)}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self.position = int(state["position"])
        self.tried = int(state.get("tried", 0))
        self.bad = {int(k): str(v) for k, v in dict(state.get("bad", {})).items()}
        self._perm = None
