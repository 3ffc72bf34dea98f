"""What a checkpoint file is and holds, for ``cycle-encoding info``.

Inspectors are tried in order; each returns a dict for files it recognises, or None. Modules that add
readers for other kinds of files (encoders, identity networks, ...) append to INSPECTORS.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import CheckpointError
from ..networks.dlib_resnet import inspect_face_embedder
from .common import count_parameters, sniff
from .native import read_native_header
from .perception import inspect_perception

Inspector = Callable[[Path, str], "dict[str, Any] | None"]


def _generator_buffer(key: str) -> bool:
    return key.startswith("noises.") or key.endswith(".kernel")


def inspect_generator(path: Path, container: str) -> dict[str, Any] | None:
    from .generator import read_generator_weights

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
        "parameters": count_parameters(w.state_dict, _generator_buffer),
        "w_avg": "stored in the file" if w.w_avg is not None else "not stored: computed from 10,000 mapped samples",
        "holds": w.holds,
        **({"provenance": w.provenance} if w.provenance else {}),
    }


def inspect_native(path: Path, container: str) -> dict[str, Any] | None:
    if container != "safetensors":
        return None
    h = read_native_header(path)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        n = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return {
        "format": "cycle-encoding",
        "network": h["kind"],
        "architecture": h.get("config", {}),
        "parameters": n,
        "provenance": h.get("provenance", {}),
        "holds": [h["kind"]],
    }


def _inspect_encoder(path: Path, container: str) -> dict[str, Any] | None:
    from .encoder import inspect_encoder_file

    return inspect_encoder_file(path, container)


def _inspect_delta(path: Path, container: str) -> dict[str, Any] | None:
    from ..inversion.delta import inspect_generator_delta

    return inspect_generator_delta(path, container)


def _inspect_editing(path: Path, container: str) -> dict[str, Any] | None:
    from ..editing.directions import inspect_editing_file

    return inspect_editing_file(path, container)


# Tried in order: the specific readers first, inspect_native last among own-format files (it takes any of them).
INSPECTORS: list[Inspector] = [
    _inspect_encoder,  # e4e-family .pt and own-format encoders
    _inspect_editing,  # direction files and attribute classifiers
    inspect_face_embedder,  # the converted dlib face embedder
    _inspect_delta,  # stored changes of tuned generators
    inspect_generator,  # rosinality / NVIDIA / e4e decoder / own-format generators
    inspect_native,  # any other own-format file
    inspect_perception,  # torchvision backbones, LPIPS heads, ArcFace, MoCo
]


def inspect_file(path: str | Path) -> dict[str, Any]:
    from ..assets import resolve_model

    p = resolve_model(path)
    container = sniff(p)
    base = {"file": str(p), "size_bytes": p.stat().st_size, "container": container}
    for inspector in INSPECTORS:
        found = inspector(p, container)
        if found is not None:
            return {**base, **found}
    raise CheckpointError(p, f"unknown layout: a {container} file that no reader of this project recognises")
