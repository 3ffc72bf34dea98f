"""The editor's sliders: the directions it offers, each with a range and a step by one rule.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.sliders"."""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.delta import weights_sha256
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from ..paths import cache_dir
from .directions import DirectionSet, load_directions, save_directions
from .ganspace import sample_mapping
from .render import DEFAULT_STRENGTHS, GANSPACE_SAMPLES, generator_directions

SLIDER_METHODS = ("sefa", "ganspace")  # the generator's own directions an editor can offer
RANGE_SAMPLES = 2_000

_DIRECTION_CACHE: dict[tuple[str, str, int], DirectionSet] = {}
_CACHE_LOCK = threading.Lock()


@dataclass
class Direction:
    """One slider: ``set``'s direction ``component``, applied on the set's default layers."""

    key: str  # what render() takes
    label: str  # what a person reads
    kind: str  # "file", "sefa" or "ganspace"
    set: DirectionSet
    component: int
    limit: float  # slider range: -limit .. +limit (see the design notes)
    step: float  # slider step; limit is a whole number of steps

    def describe(self) -> dict[str, Any]:
        return {"key": self.key, "label": self.label, "kind": self.kind, "component": self.component,
                "method": self.set.method, "source": self.set.source, "limit": self.limit, "step": self.step,
                "layers": list(self.set.layers) if self.set.layers is not None else "all"}  # fmt: skip


def _cached_directions(G: Generator, method: str, k: int) -> DirectionSet:
    """SeFa / GANSpace directions of G (top k), computed once: in memory, then in the cache folder."""
    sha = weights_sha256(G)
    key = (sha, method, k)
    with _CACHE_LOCK:
        if key in _DIRECTION_CACHE:
            return _DIRECTION_CACHE[key]
        tag = f"{method}-{GANSPACE_SAMPLES}" if method == "ganspace" else method
        f = cache_dir("directions") / f"{sha[:20]}-{tag}-{k}.safetensors"
        ds: DirectionSet | None = None
        if f.is_file():
            try:
                ds = load_directions(f)
            except CycleEncodingError:
                ds = None  # a damaged cache file: computed again below
        if ds is None:
            ds = generator_directions(G, method, k)
            try:
                save_directions(ds, f)
            except OSError:
                pass  # a read-only cache: keep it in memory only
        ds.source = method
        _DIRECTION_CACHE[key] = ds
        return ds


def slider_step(limit: float) -> float:
    """A round step (1, 2 or 5 times a power of ten) giving about 40 steps from 0 to ``limit``."""
    raw = max(limit, 1e-6) / 40
    e = 10.0 ** math.floor(math.log10(raw))
    return float(min((m * e for m in (1, 2, 5, 10)), key=lambda v: abs(math.log(v / raw))))


def slider_range(ds: DirectionSet, k: int, codes: torch.Tensor) -> tuple[float, float]:
    """(limit, step) of direction ``k`` by the design notes' rule; ``codes``: the mapping network's samples."""
    v = ds.vectors[k]
    if v.ndim == 2:  # W+: the mean vector over its layers
        v = v.mean(0)
    n = float(v.norm())
    unit = n * (float(ds.scales[k]) if ds.scales is not None else 1.0)
    spread = 0.0
    if n > 0 and unit > 0:
        p = codes.double() @ (v.double() / n)
        spread = float(p.max() - p.min()) / unit
    lim = max(spread, max(abs(a) for a in DEFAULT_STRENGTHS))
    step = slider_step(lim)
    return round(math.ceil(lim / step - 1e-9) * step, 10), step


def build_directions(
    G: Generator, specs: Sequence[str | Path | DirectionSet], components: int, methods: Sequence[str]
) -> list[Direction]:
    """The sliders of ``G``: every direction of the files or sets ``specs``, then the top ``components`` directions of
    each of ``methods`` (SeFa, GANSpace); a set that does not fit ``G`` fails in one line."""
    unknown = [m for m in methods if m not in SLIDER_METHODS]
    if unknown:
        raise CycleEncodingError(f"unknown direction method {unknown[0]!r} (known: {', '.join(SLIDER_METHODS)})")
    if components < 0:
        raise CycleEncodingError(f"components must be >= 0, got {components}")
    out: list[Direction] = []
    codes = sample_mapping(G, RANGE_SAMPLES, seed=0)

    def add(ds: DirectionSet, k: int, key: str, label: str, kind: str) -> None:
        ds.check_fits(G)  # layers the generator lacks fail here too
        base, n = key, 2
        while any(d.key == key for d in out):
            key, n = f"{base}~{n}", n + 1
        out.append(Direction(key, label, kind, ds, k, *slider_range(ds, k, codes)))

    for spec in specs:
        ds = spec if isinstance(spec, DirectionSet) else load_directions(spec)
        stem = Path(ds.source).stem if ds.source else ds.method
        for k in range(len(ds)):
            name = ds.names[k] if ds.names else str(k)
            key = stem if len(ds) == 1 else f"{stem}:{name}"
            add(ds, k, key, key, "file")
    k = min(int(components), G.w_dim)
    for method in methods if k > 0 else ():
        ds = _cached_directions(G, method, k)
        for i in range(len(ds)):
            label = f"SeFa {i}" if method == "sefa" else f"GANSpace {i} (std)"
            add(ds, i, f"{method}:{i}", label, method)
    return out
