"""The images a run inverts: an image file, a folder's images or a list of files, and each one's output name."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from ..data.images import is_image_file, list_images
from ..errors import CycleEncodingError


def list_targets(images: str | Path | Sequence[str | Path], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """The image files to invert, sorted, and a folder name for each (its path under the folder without extension,
    ``/`` -> ``__``; with the extension too where two files would get one name)."""
    if isinstance(images, (str, Path)):
        p = Path(images)
        if p.is_dir():
            files = list_images(p, recursive=recursive)
            root = p
            if not files:
                raise CycleEncodingError(f"{p}: no image files found (png, jpg, ...)")
        elif p.is_file():
            if not is_image_file(p):
                raise CycleEncodingError(f"{p}: not an image file (by its extension)")
            files, root = [p], p.parent
        else:
            raise CycleEncodingError(f"{p}: no such file or folder")
        rel = [f.relative_to(root) for f in files]
    else:
        files = [Path(f) for f in images]
        rel = [Path(f.name) for f in files]
    stems = [str(r.with_suffix("")).replace(os.sep, "__") for r in rel]
    full = [str(r).replace(os.sep, "__") for r in rel]
    names = [s if stems.count(s) == 1 else f for s, f in zip(stems, full)]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CycleEncodingError(f"two images would share the output name {dup[0]!r}")
    return files, names
