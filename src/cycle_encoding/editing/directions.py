"""Editing directions: one type for InterFaceGAN, GANSpace and SeFa, the published file layouts, and edits of codes.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.directions"."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from ..assets import MODELS_DIR
from ..checkpoints.common import atomic_torch_save, sniff, torch_load
from ..checkpoints.inspect import register_inspector
from ..checkpoints.native import default_provenance, native_header_of_kind, read_native, save_native
from ..errors import CheckpointError, CycleEncodingError
from ..networks.stylegan2 import Generator
from ..utils import atomic_write, check_finite, parse_int_list

DIRECTIONS_KIND = "directions"
METHODS = ("interfacegan", "ganspace", "sefa", "custom")
GanspaceMode = Literal["add", "set"]
_NPY_MAGIC = b"\x93NUMPY"


@dataclass
class DirectionSet:
    """K editing directions and what is needed to apply them (see the design notes).

    ``vectors``: ``[K, w_dim]`` or ``[K, N, w_dim]``; ``scales``: ``[K]`` strength units (GANSpace's std) or None (1);
    ``mean``: ``[w_dim]`` (GANSpace's mean code, for ``mode="set"``); ``values``: ``[K]`` what ranks the directions
    (explained variance, eigenvalues), largest first; ``layers``: the layers the set is meant for (SeFa: those it was
    computed from), None for all; ``names``: one per direction or None.
    """

    method: str
    vectors: torch.Tensor
    scales: torch.Tensor | None = None
    mean: torch.Tensor | None = None
    values: torch.Tensor | None = None
    layers: tuple[int, ...] | None = None
    names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    source: str | None = None

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        v = torch.as_tensor(self.vectors).detach().float().cpu()
        if v.ndim not in (2, 3) or v.shape[0] < 1:
            raise ValueError(f"vectors must be [K, w_dim] or [K, N, w_dim], got {list(v.shape)}")
        self.vectors = v
        k = v.shape[0]
        for name in ("scales", "values"):
            t = getattr(self, name)
            if t is not None:
                t = torch.as_tensor(t).detach().float().cpu().reshape(-1)
                if t.numel() != k:
                    raise ValueError(f"{name} has {t.numel()} entries for {k} directions")
                setattr(self, name, t)
        if self.mean is not None:
            m = torch.as_tensor(self.mean).detach().float().cpu().reshape(-1)
            if m.numel() != self.w_dim:
                raise ValueError(f"mean has {m.numel()} entries, the directions have width {self.w_dim}")
            self.mean = m
        if self.layers is not None:
            self.layers = tuple(int(i) for i in self.layers)
        if self.names is not None and len(self.names) != k:
            raise ValueError(f"{len(self.names)} names for {k} directions")

    # -- shape ----------------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.vectors.shape[0])

    @property
    def w_dim(self) -> int:
        return int(self.vectors.shape[-1])

    @property
    def per_layer(self) -> bool:
        """True for W+ directions ``[N, w_dim]``."""
        return self.vectors.ndim == 3

    @property
    def num_ws(self) -> int | None:
        return int(self.vectors.shape[1]) if self.per_layer else None

    def index(self, component: int | str) -> int:
        """The index of a direction given by number or by name."""
        if isinstance(component, str) and not component.lstrip("-").isdigit():
            if not self.names or component not in self.names:
                known = ", ".join(self.names or []) or "none"
                if self.method == "ganspace":
                    known += "; named GANSpace edits: " + ", ".join(ganspace_named_edits())
                raise CycleEncodingError(f"no direction named {component!r} in {self.label()} (names: {known})")
            return self.names.index(component)
        k = int(component)
        if not 0 <= k < len(self):
            raise CycleEncodingError(
                f"{self.label()} has {len(self)} direction(s), numbered from 0 to {len(self) - 1}; component {k} does "
                "not exist"
            )
        return k

    def label(self) -> str:
        return f"{self.method} directions" + (f" from {self.source}" if self.source else "")

    def check_codes(self, ws: torch.Tensor) -> None:
        if ws.ndim != 3:
            raise CycleEncodingError(f"codes to edit must be [B, N, w_dim], got {list(ws.shape)}")
        if ws.shape[2] != self.w_dim:
            raise CycleEncodingError(
                f"the {self.label()} have width {self.w_dim}; the codes have width {ws.shape[2]}: they belong to "
                "another generator"
            )
        if self.per_layer and ws.shape[1] != self.num_ws:
            raise CycleEncodingError(
                f"the {self.label()} are W+ directions for {self.num_ws} layers; the codes have {ws.shape[1]}"
            )

    def resolve_layers(self, layers: Sequence[int] | None, num_ws: int) -> list[int]:
        """The layers an edit touches: those given, else the set's own, else all; checked against ``num_ws``."""
        chosen = list(layers) if layers is not None else (list(self.layers) if self.layers is not None else None)
        if chosen is None:
            return list(range(num_ws))
        bad = [i for i in chosen if not 0 <= i < num_ws]
        if bad:
            raise CycleEncodingError(f"layer {bad[0]} does not exist: the generator has layers 0-{num_ws - 1}")
        return sorted(set(chosen))

    def check_fits(
        self, G: Generator, layers: Sequence[int] | None = None, whose: str = "the generator's"
    ) -> list[int]:
        """The layers of ``G``'s codes an edit touches (``resolve_layers``), after one clear error when the set does
        not fit them: another width, or W+ directions for another number of layers."""
        if self.w_dim != G.w_dim:
            raise CycleEncodingError(f"the {self.label()} have width {self.w_dim}; {whose} codes have width {G.w_dim}")
        if self.per_layer and self.num_ws != G.num_ws:
            raise CycleEncodingError(f"the {self.label()} are for {self.num_ws} layers; the generator has {G.num_ws}")
        return self.resolve_layers(layers, G.num_ws)

    # -- edits ----------------------------------------------------------------------------------------------------
    def delta(
        self,
        component: int | str,
        strength: float,
        ws: torch.Tensor,
        layers: Sequence[int] | None = None,
        mode: GanspaceMode = "add",
    ) -> torch.Tensor:
        """The change an edit makes to codes ``ws [B, N, w_dim]``: a tensor of ws's shape, zero outside ``layers``."""
        self.check_codes(ws)
        strength = check_strength(strength)
        k = self.index(component)
        n = ws.shape[1]
        idx = self.resolve_layers(layers, n)
        v = self.vectors[k].to(device=ws.device, dtype=ws.dtype)
        full = v if v.ndim == 2 else v[None].expand(n, -1)  # [N, w_dim]
        scale = float(self.scales[k]) if self.scales is not None else 1.0
        mask = torch.zeros(n, 1, dtype=ws.dtype, device=ws.device)
        mask[idx] = 1
        if mode == "add":
            return (float(strength) * scale * full * mask)[None].expand(ws.shape[0], -1, -1)
        if mode != "set":
            raise ValueError(f"mode must be 'add' or 'set', got {mode!r}")
        if self.mean is None or self.scales is None or self.per_layer:
            raise CycleEncodingError(
                "mode 'set' needs a GANSpace set (a mean, per-component std, [K, w_dim] components)"
            )
        mean = self.mean.to(device=ws.device, dtype=ws.dtype)
        coord = ((ws[:, 0] - mean) * v).sum(dim=1) / scale  # [B], in std units, from layer 0 (e4e)
        amount = (float(strength) - coord) * scale  # [B]
        return amount[:, None, None] * (full * mask)[None]

    def apply(
        self,
        ws: torch.Tensor,
        component: int | str,
        strength: float,
        layers: Sequence[int] | None = None,
        mode: GanspaceMode = "add",
    ) -> torch.Tensor:
        """Edited codes ``ws + delta``; for an added edit of strength 0, a copy of ``ws`` (bit-exact)."""
        if mode == "add" and check_strength(strength) == 0.0:
            self.check_codes(ws)
            self.index(component)
            return ws.clone()
        return ws + self.delta(component, strength, ws, layers, mode)

    def describe(self) -> dict[str, Any]:
        """A JSON-able summary (method, count, shape, layers, names, leading values)."""
        out: dict[str, Any] = {
            "method": self.method,
            "directions": len(self),
            "shape": list(self.vectors.shape[1:]),
            "space": "W+ (one vector per layer)" if self.per_layer else "W (one vector for the chosen layers)",
            "layers": list(self.layers) if self.layers is not None else "all",
        }
        if self.names:
            out["names"] = self.names[:20] + (["..."] if len(self.names) > 20 else [])
        if self.values is not None:
            out["values"] = [round(float(x), 6) for x in self.values[:10]]
        if self.scales is not None:
            out["std"] = [round(float(x), 6) for x in self.scales[:10]]
        if self.meta:
            out["meta"] = self.meta
        return out


def interfacegan_direction(vector: torch.Tensor, name: str | None = None, **meta: Any) -> DirectionSet:
    """A one-direction set from an InterFaceGAN normal: ``[w_dim]``, ``[1, w_dim]`` or ``[1, N, w_dim]``."""
    v = torch.as_tensor(vector).detach().float()
    if v.ndim == 1:
        v = v[None]
    if v.ndim == 3 and v.shape[0] != 1:
        raise ValueError(f"a W+ direction is [1, N, w_dim], got {list(v.shape)}")
    return DirectionSet("interfacegan", v, names=[name] if name else None, meta=dict(meta))


@dataclass(frozen=True)
class NamedEdit:
    """One of e4e's named GANSpace edits: set component ``component``'s coordinate (from layer 0's code) to
    ``strength`` standard deviations on layers ``start..end-1`` (``end`` exclusive, as e4e slices ``ws[start:end]``)."""

    name: str
    component: int
    start: int
    end: int
    strength: float
    pti_strength: float | None = None

    @property
    def layers(self) -> list[int]:
        return list(range(self.start, self.end))

    def as_tuple(self) -> tuple[int, int, int, float]:
        """e4e's tuple (component, first layer, end layer, strength)."""
        return (self.component, self.start, self.end, self.strength)


GANSPACE_EDITS_TABLE = "ganspace_ffhq_edits.csv"


@lru_cache(maxsize=1)
def ganspace_named_edits() -> dict[str, NamedEdit]:
    """The shipped table of named GANSpace edits for FFHQ (``assets/ganspace_ffhq_edits.csv``), by name."""
    path = MODELS_DIR.parent / GANSPACE_EDITS_TABLE
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip() and not line.startswith("#")]
    out: dict[str, NamedEdit] = {}
    for r in csv.DictReader(rows):
        pti = (r.get("pti_strength") or "").strip()
        out[r["name"]] = NamedEdit(
            r["name"], int(r["component"]), int(r["first_layer"]), int(r["end_layer"]), float(r["strength"]),
            float(pti) if pti else None,
        )  # fmt: skip
    return out


def named_edit_for(ds: DirectionSet, component: int | str) -> NamedEdit | None:
    """The named GANSpace edit ``component`` names, for a GANSpace set that has no direction of that name; None when
    ``component`` is a number or one of the set's own names. A GANSpace set too small for the edit is an error."""
    if not isinstance(component, str) or component.lstrip("-").isdigit():
        return None
    if ds.names and component in ds.names:
        return None
    table = ganspace_named_edits()
    if component not in table:
        return None
    edit = table[component]
    if ds.method != "ganspace" or ds.mean is None:
        raise CycleEncodingError(
            f"{component!r} is a named GANSpace edit: it needs a GANSpace PCA file (e4e's ffhq_pca.pt), not the "
            f"{ds.label()}"
        )
    if edit.component >= len(ds):
        raise CycleEncodingError(
            f"the named edit {component!r} uses component {edit.component}; the {ds.label()} have {len(ds)} "
            "(it is made for e4e's FFHQ ffhq_pca.pt, 80 components)"
        )
    return edit


def parse_layers(spec: str | Sequence[int] | None) -> list[int] | None:
    """``"a-b"`` (inclusive), ``"0,2,4"``, ``"all"`` or None -> a list of layer indices (None = the default)."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "all", "default")):
        return None
    out = parse_int_list(spec) if isinstance(spec, str) else [int(i) for i in spec]
    if any(i < 0 for i in out):
        raise CycleEncodingError(f"layers are numbered from 0, got {spec!r}")
    return out


# The largest edit strength taken: 5x the largest published one (e4e's GANSpace edits set +-20 standard deviations;
# InterFaceGAN and SeFa strengths are distances in W, where the Fashion-MNIST generator's samples lie 15 from their
# average and 20 apart). Farther out images only saturate, and 1e30 overflows the generator's float32 modulations.
MAX_STRENGTH = 100.0


def check_strength(strength: float, what: str = "strength") -> float:
    """``strength`` as a float when finite and within +-MAX_STRENGTH; else one clear CycleEncodingError."""
    try:
        s = float(strength)
    except (TypeError, ValueError):
        raise CycleEncodingError(f"{what} must be a number, got {strength!r}") from None
    check_finite(s, what, MAX_STRENGTH, " (the published edits stay within +-20)")
    return s


def parse_strengths(spec: str | Sequence[float]) -> list[float]:
    """``"-3,-1.5,0,1.5,3"`` -> floats (in the order given), each checked by :func:`check_strength`."""
    try:
        out = [float(s) for s in (spec.split(",") if isinstance(spec, str) else spec) if str(s).strip()]
    except ValueError:
        raise CycleEncodingError(
            f"bad strengths {spec!r}: give numbers separated by commas, e.g. -3,-1.5,0,1.5,3"
        ) from None
    if not out:
        raise CycleEncodingError("no strengths given")
    bad = [s for s in out if not math.isfinite(s)]
    if bad:
        raise CycleEncodingError(f"bad strengths {spec!r}: {bad[0]} is not a finite number")
    return [check_strength(s, "a strength") for s in out]


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _tensor(x: Any, path: Path, what: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    if not isinstance(x, torch.Tensor):
        raise CheckpointError(path, f"{what} is a {type(x).__name__}, not a tensor")
    if not torch.is_floating_point(x):
        raise CheckpointError(path, f"{what} holds {x.dtype} values, not floating point numbers")
    if not torch.isfinite(x).all():
        raise CheckpointError(path, f"{what} holds NaN or infinite values")
    return x.detach().float().cpu()


def _from_raw_tensor(t: torch.Tensor, path: Path) -> DirectionSet:
    """InterFaceGAN's raw layouts: [w_dim], [1, w_dim], [1, N, w_dim]; [K, w_dim] as K directions."""
    if t.ndim == 1:
        t = t[None]
    if not (t.ndim == 2 or (t.ndim == 3 and t.shape[0] == 1)):
        raise CheckpointError(
            path,
            f"a tensor of shape {list(t.shape)} is no direction layout (InterFaceGAN: [1, w_dim] or [1, N, w_dim])",
        )
    return DirectionSet("interfacegan", t, source=str(path), meta={"layout": f"raw tensor {list(t.shape)}"})


def _from_ganspace(d: dict[str, Any], path: Path) -> DirectionSet:
    mean = _tensor(d["mean"], path, "'mean'")
    comp = _tensor(d["comp"], path, "'comp'")
    std = _tensor(d["std"], path, "'std'")
    w_dim = comp.shape[-1]
    if comp.ndim == 3 and comp.shape[1] == 1:
        comp = comp[:, 0]
    if comp.ndim != 2:
        raise CheckpointError(path, f"GANSpace 'comp' must be [K, 1, w_dim] (or [K, w_dim]), got {list(comp.shape)}")
    if mean.numel() != w_dim:
        raise CheckpointError(path, f"GANSpace 'mean' has {mean.numel()} values, 'comp' has width {w_dim}")
    if std.numel() != comp.shape[0]:
        raise CheckpointError(path, f"GANSpace 'std' has {std.numel()} values for {comp.shape[0]} components")
    if (std <= 0).any():
        raise CheckpointError(path, "GANSpace 'std' holds values <= 0")
    return DirectionSet(
        "ganspace", comp, scales=std.reshape(-1), mean=mean.reshape(-1), values=std.reshape(-1) ** 2,
        source=str(path), meta={"layout": "GANSpace {'mean', 'comp', 'std'}"},
    )  # fmt: skip


def _from_eigvec(d: dict[str, Any], path: Path) -> DirectionSet:
    v = _tensor(d["eigvec"], path, "'eigvec'")
    if v.ndim != 2:
        raise CheckpointError(path, f"'eigvec' must be [w_dim, K], got {list(v.shape)}")
    return DirectionSet(
        "sefa", v.t().contiguous(), source=str(path),
        meta={"layout": "rosinality closed_form_factorization {'ckpt', 'eigvec'} (columns)", "ckpt": str(d.get("ckpt"))},
    )  # fmt: skip


def _from_native(path: Path) -> DirectionSet:
    nf = read_native(path, kind=DIRECTIONS_KIND, what="a directions file")
    c = nf.config
    t = nf.tensors
    if "vectors" not in t:
        raise CheckpointError(path, "a directions file without its 'vectors' tensor")
    try:
        return DirectionSet(
            method=c.get("method", "custom"),
            vectors=t["vectors"],
            scales=t.get("scales"),
            mean=t.get("mean"),
            values=t.get("values"),
            layers=tuple(c["layers"]) if c.get("layers") is not None else None,
            names=c.get("names"),
            meta=dict(nf.extra.get("meta", {})),
            source=str(path),
        )
    except (ValueError, TypeError) as e:
        raise CheckpointError(path, f"inconsistent directions file: {e}") from None


def load_directions(path: str | Path) -> DirectionSet:
    """Read a direction file of any layout of the design notes; a one-line error for anything else."""
    p = Path(path)
    if not p.exists():
        raise CheckpointError(p, "no such direction file")
    if p.is_file():
        with open(p, "rb") as f:
            head = f.read(6)
        if head == _NPY_MAGIC:
            try:
                arr = np.load(p, allow_pickle=False)
            except ValueError as e:
                raise CheckpointError(p, f"cannot read the .npy array (object arrays are refused): {e}") from None
            return _from_raw_tensor(_tensor(arr, p, "the array"), p)
    kind = sniff(p)
    if kind == "safetensors":
        return _from_native(p)
    obj = torch_load(p)
    if isinstance(obj, torch.Tensor):
        return _from_raw_tensor(_tensor(obj, p, "the tensor"), p)
    if isinstance(obj, dict):
        if {"mean", "comp", "std"} <= set(obj):
            return _from_ganspace(obj, p)
        if {"comp", "std"} & set(obj):
            lacking = ", ".join(repr(k) for k in ("mean", "comp", "std") if k not in obj)
            raise CheckpointError(p, f"a GANSpace PCA dict needs 'mean', 'comp' and 'std'; this one lacks {lacking}")
        if "eigvec" in obj:
            return _from_eigvec(obj, p)
        for key in ("direction", "boundary", "latent_direction"):
            if key in obj:
                return _from_raw_tensor(_tensor(obj[key], p, repr(key)), p)
        keys = ", ".join(sorted(str(k) for k in obj)[:8])
        raise CheckpointError(
            p,
            f"a dict with keys {keys}: no direction layout (InterFaceGAN tensor, GANSpace mean/comp/std, "
            "SeFa eigvec, or a cycle-encoding directions file)",
        )
    raise CheckpointError(p, f"holds a {type(obj).__name__}: no direction layout")


# ---------------------------------------------------------------------------------------------------------------
# Writing


def save_interfacegan(direction: DirectionSet | torch.Tensor, path: str | Path, component: int = 0) -> Path:
    """Write one direction in InterFaceGAN's published layout: a raw float32 tensor ``[1, w_dim]`` or ``[1, N, w_dim]``
    saved by ``torch.save`` (``.pt``), or a ``.npy`` array of that shape (InterFaceGAN's own boundary files)."""
    v = direction.vectors[direction.index(component)] if isinstance(direction, DirectionSet) else direction
    v = torch.as_tensor(v).detach().float().cpu()
    if v.ndim == 1 or (v.ndim == 2 and v.shape[0] != 1):
        v = v[None]
    p = Path(path)
    if p.suffix.lower() == ".npy":
        buf = io.BytesIO()  # not np.save(tmp): it would add ".npy" to the temporary name
        np.save(buf, v.numpy())
        return atomic_write(p, lambda tmp: tmp.write_bytes(buf.getvalue()))
    return atomic_torch_save(v.contiguous().clone(), p)


def save_ganspace(ds: DirectionSet, path: str | Path) -> Path:
    """Write a GANSpace set in the published layout ``{'mean': [1, w_dim], 'comp': [K, 1, w_dim], 'std': [K]}``."""
    if ds.mean is None or ds.scales is None or ds.per_layer:
        raise CycleEncodingError("only a GANSpace set (mean, [K, w_dim] components, std) has the GANSpace layout")
    obj = {
        "mean": ds.mean.reshape(1, -1).clone(),
        "comp": ds.vectors[:, None, :].clone(),
        "std": ds.scales.clone(),
    }
    return atomic_torch_save(obj, path)


def save_directions(ds: DirectionSet, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write any set in the project's format (``.safetensors``, kind ``directions``)."""
    tensors = {n: t for n in ("vectors", "scales", "mean", "values") if (t := getattr(ds, n)) is not None}
    config = {
        "method": ds.method,
        "count": len(ds),
        "w_dim": ds.w_dim,
        "num_ws": ds.num_ws,
        "layers": list(ds.layers) if ds.layers is not None else None,
        "names": ds.names,
    }
    return save_native(path, DIRECTIONS_KIND, config, tensors, provenance or default_provenance(), {"meta": ds.meta})


def save_any(ds: DirectionSet, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write by the file's suffix: ``.safetensors`` the own format; ``.pt``/``.pth`` the published layout of the set's
    method (InterFaceGAN tensor, GANSpace dict); ``.npy`` an InterFaceGAN boundary."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix == ".safetensors":
        return save_directions(ds, p, provenance)
    if suffix == ".npy":
        if len(ds) != 1:
            raise CycleEncodingError(f"a .npy boundary holds one direction; this set has {len(ds)} (use .safetensors)")
        return save_interfacegan(ds, p)
    if suffix in (".pt", ".pth"):
        if ds.method == "ganspace" and ds.mean is not None:
            return save_ganspace(ds, p)
        if len(ds) == 1:
            return save_interfacegan(ds, p)
        raise CycleEncodingError(
            f"{len(ds)} {ds.method} directions have no published .pt layout: write a .safetensors file instead"
        )
    raise CycleEncodingError(f"{p}: unknown direction file type {p.suffix!r} (use .pt, .npy or .safetensors)")


def inspect_directions(path: Path, container: str) -> dict[str, Any] | None:
    """``cycle-encoding info`` for own-format direction files."""
    h = native_header_of_kind(path, container, DIRECTIONS_KIND)
    if h is None:
        return None
    ds = _from_native(path)
    return {
        "format": "cycle-encoding",
        "network": "editing directions",
        **ds.describe(),
        "provenance": h.get("provenance", {}),
        "holds": [DIRECTIONS_KIND],
    }


register_inspector(inspect_directions)
