"""What a checkpoint file is and holds, for ``cycle-encoding info``: inspectors tried in order, each returning a dict
for the files it recognises, else None. Modules above this layer that write files of their own (editing directions,
tuned generators' changes) add theirs with :func:`register_inspector` when the package is imported.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..assets import resolve_model
from ..errors import CheckpointError
from ..networks.dlib_resnet import NAME as DLIB_RESNET
from .classifier import CLASSIFIER_KIND
from .common import count_parameters, sniff
from .encoder import inspect_encoder_file
from .face_api import FACE_EMBEDDER_KIND
from .generator import is_generator_buffer, read_generator_weights
from .native import native_info, read_native_header, stored_parameters
from .perception import inspect_perception

Inspector = Callable[[Path, str], "dict[str, Any] | None"]


def inspect_generator(path: Path, container: str) -> dict[str, Any] | None:
    try:
        w = read_generator_weights(path)
    except CheckpointError as e:
        if "unknown layout" in str(e) or "not a generator" in str(e) or "holds no generator" in str(e):
            return None
        raise
    c = w.config
    arch = c.to_dict()
    arch.update(
        num_ws=c.num_ws,
        channels={str(k): v for k, v in c.channels().items()},
        channel_multiplier=c.channel_multiplier,
    )
    return {
        "format": w.format,
        "network": "StyleGAN2 generator",
        "architecture": arch,
        "parameters": count_parameters(w.state_dict, is_generator_buffer),
        "w_avg": "stored in the file" if w.w_avg is not None else "not stored: computed from 10,000 mapped samples",
        "holds": w.holds,
        **({"provenance": w.provenance} if w.provenance else {}),
    }


# own-format kinds that info names by their network, and whether it counts their parameters (others: the kind, counted)
NAMED_KINDS = {
    CLASSIFIER_KIND: ("attribute classifier", False),
    FACE_EMBEDDER_KIND: (f"{DLIB_RESNET}: dlib ResNet face embedder, 150x150 chips -> 128-d descriptors", True),
}


def inspect_native(path: Path, container: str) -> dict[str, Any] | None:
    if container != "safetensors":
        return None
    h = read_native_header(path)
    network, counted = NAMED_KINDS.get(h["kind"], (h["kind"], True))
    return native_info(h, network, **({"parameters": stored_parameters(path)} if counted else {}))


# Tried in order: the specific readers first, inspect_native last among own-format files (it takes any of them).
INSPECTORS: list[Inspector] = [
    inspect_encoder_file,  # e4e-family .pt and own-format encoders
    # here: the readers registered from above (direction files, stored changes of tuned generators)
    inspect_generator,  # rosinality / NVIDIA / e4e decoder / own-format generators
    inspect_native,  # any other own-format file (NAMED_KINDS: attribute classifiers, the dlib face embedder)
    inspect_perception,  # torchvision backbones, LPIPS heads, ArcFace, MoCo
]


def register_inspector(inspector: Inspector) -> Inspector:
    """Add (once) a reader of a specific kind of file, tried before the general ones (``inspect_generator`` on)."""
    if inspector not in INSPECTORS:
        INSPECTORS.insert(INSPECTORS.index(inspect_generator), inspector)
    return inspector


def inspect_file(path: str | Path) -> dict[str, Any]:
    p = resolve_model(path)
    container = sniff(p)
    base = {"file": str(p), "size_bytes": p.stat().st_size, "container": container}
    for inspector in INSPECTORS:
        found = inspector(p, container)
        if found is not None:
            return {**base, **found}
    raise CheckpointError(p, f"unknown layout: a {container} file that no reader of this project recognises")
