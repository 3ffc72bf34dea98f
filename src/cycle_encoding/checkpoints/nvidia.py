"""NVIDIA stylegan2-ada-pytorch ``.pkl`` files, read without NVIDIA's code and without running any (a restricted
unpickler), converted to rosinality's layout. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.nvidia".
"""

from __future__ import annotations

import collections
import io
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import CheckpointError, UnsafePickleError, first_line
from ..networks.stylegan2 import GeneratorConfig
from .common import raise_refusal, sniff
from .rosinality import _infer_channel_rule


@dataclass
class PersistentObject:
    """What a persistent NVIDIA object is reduced to: its class name and its ``__dict__``."""

    class_name: str
    module_name: str
    state: dict[str, Any] = field(default_factory=dict)


def _reconstruct_persistent_obj(meta: Any) -> PersistentObject:
    if not isinstance(meta, Mapping) or "state" not in meta:
        raise pickle.UnpicklingError("persistent object without a state")
    state = meta.get("state") or {}
    return PersistentObject(
        class_name=str(meta.get("class_name", "?")),
        module_name=str(meta.get("module_name", meta.get("type", ""))),
        state=dict(state) if isinstance(state, Mapping) else {},
    )


def _load_storage_from_bytes(b: bytes) -> Any:
    # torch.storage._load_from_bytes would use weights_only=False; the bytes come from the untrusted file
    return torch.load(io.BytesIO(b), weights_only=True, map_location="cpu")


class _EasyDict(dict):
    """Stand-in for dnnlib.util.EasyDict (a dict with attribute access; only the dict part is kept)."""


_TORCH_FUNCS = {
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_tensor"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._utils", "_rebuild_parameter_with_state"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("torch", "Size"),
    ("torch", "Tensor"),
    ("torch.nn.parameter", "Parameter"),
}


# numpy scalars: stand-ins for numpy.dtype and numpy's scalar (docs/INTERNALS.md, "cycle_encoding.checkpoints.nvidia")
_PLAIN_DTYPE = re.compile(r"^(b1|[iu][1248]|f[248]|c(8|16))$")


class _NumpyDtypeSpec:
    """What ``numpy.dtype(code, align, copy)`` plus its pickled state says: a plain numeric type and a byte order."""

    code: str | None = None  # None when a pickle made the object without calling it
    order = "<"

    def __init__(self, code: Any, align: Any = False, copy: Any = True) -> None:
        if not isinstance(code, str) or not _PLAIN_DTYPE.match(code):
            raise pickle.UnpicklingError(f"numpy dtype {str(code)[:20]!r} is not a plain numeric type")
        self.code = code

    def __setstate__(self, state: Any) -> None:
        # (version, byte order, subarray, names, fields, elsize, alignment, flags): plain types have no sub-parts
        if not isinstance(state, tuple) or len(state) < 5 or any(x is not None for x in state[2:5]):
            raise pickle.UnpicklingError("numpy dtype with fields or sub-arrays: not a plain numeric type")
        if state[1] not in ("<", ">", "|", "="):
            raise pickle.UnpicklingError(f"numpy dtype byte order {str(state[1])[:8]!r}")
        self.order = "<" if state[1] in ("|", "=") else state[1]

    def dtype(self) -> Any:
        if self.code is None:
            raise pickle.UnpicklingError("numpy dtype without its type code")
        return np.dtype(self.order + self.code)


def _numpy_scalar(spec: Any, data: Any = None) -> Any:
    if not isinstance(spec, _NumpyDtypeSpec):
        raise pickle.UnpicklingError("numpy scalar without a plain numeric dtype")
    dt = spec.dtype()
    if not isinstance(data, (bytes, bytearray)) or len(data) != dt.itemsize:
        raise pickle.UnpicklingError(f"numpy scalar of type {dt} without its {dt.itemsize} raw bytes")
    return np.frombuffer(bytes(data), dtype=dt)[0]


def _codecs_encode(text: Any, encoding: Any = "utf-8") -> bytes:
    # pickle protocols 0-2 write bytes as _codecs.encode(str, 'latin1'); nothing else is admitted
    if not isinstance(text, str) or encoding != "latin1":
        raise pickle.UnpicklingError("_codecs.encode is admitted only for bytes written as latin1 text")
    return text.encode("latin1")


# what the unpickler hands out for each (module, name) it admits besides _TORCH_FUNCS and torch's dtypes
_ALLOWED = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("dnnlib.util", "EasyDict"): _EasyDict,
    ("torch.storage", "_load_from_bytes"): _load_storage_from_bytes,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "dict"): dict,
    ("builtins", "list"): list,
    ("builtins", "tuple"): tuple,
    ("__builtin__", "set"): set,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("numpy", "dtype"): _NumpyDtypeSpec,  # numpy 1 and 2 both pickle a dtype as numpy.dtype
    ("_codecs", "encode"): _codecs_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, f: Any, source: str | Path) -> None:
        super().__init__(f)
        self.source = source

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module.startswith("dnnlib.tflib"):
            raise CheckpointError(
                self.source,
                f"a TensorFlow-era StyleGAN pickle ({module}.{name}), not a PyTorch one: convert it first "
                "(NVIDIA's stylegan2-ada-pytorch legacy.py, or rosinality's convert_weight.py), then load the result",
            )
        if (module, name) in _TORCH_FUNCS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(
            self.source,
            f"refused: the pickle asks for {module}.{name}, which is not among the allowed classes "
            "(nothing from the file was run)",
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError(self.source, f"refused: unexpected persistent id {str(pid)[:60]!r}")


@dataclass
class NvidiaPickle:
    networks: dict[str, PersistentObject]
    other: dict[str, Any]


def read_nvidia_pickle(path: str | Path) -> NvidiaPickle:
    """NVIDIA's pickled dict, read with the restricted unpickler: its networks and its other entries."""
    p = Path(path)
    if sniff(p) != "pickle":
        raise CheckpointError(p, "not a pickle file")
    try:
        with open(p, "rb") as f:
            obj = RestrictedUnpickler(f, p).load()
    except CheckpointError:
        raise
    except Exception as e:  # anything the crafted stream provokes (wrong arguments, ...) is one line
        msg = first_line(e)
        if isinstance(e, EOFError) or "truncated" in msg or "Ran out of input" in msg:
            raise CheckpointError(p, "truncated: the pickle ends early (incomplete download?)") from None
        raise_refusal(p, e, "inside a tensor's storage")
        raise CheckpointError(p, f"cannot read pickle: {msg}") from None
    if not isinstance(obj, Mapping):
        raise CheckpointError(p, f"unknown layout: the pickle holds a {type(obj).__name__}, not NVIDIA's dict")
    nets = {k: v for k, v in obj.items() if isinstance(v, PersistentObject)}
    if not nets:
        raise CheckpointError(p, "unknown layout: a pickle without NVIDIA persistent networks (G, D, G_ema)")
    return NvidiaPickle(networks=nets, other={k: v for k, v in obj.items() if k not in nets})


def flatten_module(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """NVIDIA-style state dict of a reduced module (``_parameters`` and ``_buffers``, recursively)."""
    state = obj.state if isinstance(obj, PersistentObject) else obj
    out: dict[str, torch.Tensor] = {}
    if not isinstance(state, Mapping):
        return out
    for group in ("_parameters", "_buffers"):
        for k, v in (state.get(group) or {}).items():
            if isinstance(v, torch.Tensor):
                out[prefix + k] = v.detach()
    for k, m in (state.get("_modules") or {}).items():
        if m is not None:
            out.update(flatten_module(m, prefix + k + "."))
    return out


def _kw(state: Mapping[str, Any], key: str) -> dict[str, Any]:
    v = state.get(key) or {}
    return dict(v) if isinstance(v, Mapping) else {}


_BLOCK = re.compile(r"^synthesis\.b(\d+)\.")


def nvidia_generator_to_rosinality(
    net: PersistentObject, source: str | Path
) -> tuple[GeneratorConfig, dict[str, torch.Tensor], torch.Tensor]:
    """Convert an NVIDIA StyleGAN2 (ADA) generator to (config, rosinality g_ema state dict, w_avg)."""
    if "stylegan3" in net.module_name:
        raise CheckpointError(source, "a StyleGAN3 generator: only StyleGAN2 generators are supported")
    init = _kw(net.state, "_init_kwargs")
    sd = flatten_module(net)
    if "mapping.fc0.weight" not in sd or "synthesis.b4.const" not in sd:
        raise CheckpointError(
            source,
            f"unknown layout: {net.class_name} has no mapping.fc0 / synthesis.b4.const (not a StyleGAN2 G)",
        )
    if any(k.startswith("synthesis.b") and ".skip." in k for k in sd):
        raise CheckpointError(source, "a 'resnet' synthesis network: only the 'skip' architecture is supported")
    if int(init.get("c_dim", 0) or 0) > 0 or "mapping.embed.weight" in sd:
        raise CheckpointError(source, "a conditional generator (c_dim > 0): not supported")
    syn_kw = _kw(init, "synthesis_kwargs")
    map_kw = _kw(init, "mapping_kwargs")
    if syn_kw.get("architecture", "skip") != "skip":
        raise CheckpointError(source, f"synthesis architecture {syn_kw['architecture']!r}: only 'skip' is supported")

    n_mlp = len({k.split(".")[1] for k in sd if re.match(r"^mapping\.fc\d+\.weight$", k)})
    z_dim = sd["mapping.fc0.weight"].shape[1]
    w_dim = sd[f"mapping.fc{n_mlp - 1}.weight"].shape[0]
    if z_dim != w_dim:
        raise CheckpointError(source, f"z_dim {z_dim} != w_dim {w_dim}: the rosinality layout needs them equal")
    resolutions = sorted({int(m.group(1)) for k in sd if (m := _BLOCK.match(k))})
    res = resolutions[-1]
    img_channels = sd[f"synthesis.b{res}.torgb.weight"].shape[0]
    chans = {r: int(sd[f"synthesis.b{r}.conv1.weight"].shape[0]) for r in resolutions}
    base, cmax = _infer_channel_rule(chans)
    base = int(syn_kw.get("channel_base", base))
    cmax = int(syn_kw.get("channel_max", cmax))
    rf = sd.get(f"synthesis.b{resolutions[1]}.resample_filter") if len(resolutions) > 1 else None
    blur = (1.0, 3.0, 3.0, 1.0)
    if rf is not None and rf.ndim == 1:
        blur = tuple(round(float(v / rf[0]), 6) for v in rf)
    try:
        config = GeneratorConfig(
            resolution=res,
            style_dim=int(w_dim),
            n_mlp=n_mlp,
            channel_base=base,
            channel_max=cmax,
            img_channels=int(img_channels),
            lr_mlp=float(map_kw.get("lr_multiplier", 0.01)),
            blur_kernel=blur,
        )
    except ValueError as e:
        raise CheckpointError(source, f"shapes fit no StyleGAN2 architecture: {e}") from None

    out: dict[str, torch.Tensor] = {}

    def get(k: str) -> torch.Tensor:
        if k not in sd:
            raise CheckpointError(source, f"missing key {k} in the NVIDIA generator")
        return sd[k]

    for i in range(n_mlp):
        out[f"style.{i + 1}.weight"] = get(f"mapping.fc{i}.weight")
        out[f"style.{i + 1}.bias"] = get(f"mapping.fc{i}.bias")
    out["input.input"] = get("synthesis.b4.const").unsqueeze(0)
    noise_idx = 0

    def layer(src: str, dst: str, torgb: bool = False) -> None:
        nonlocal noise_idx
        out[f"{dst}.conv.weight"] = get(f"{src}.weight").unsqueeze(0)
        out[f"{dst}.conv.modulation.weight"] = get(f"{src}.affine.weight")
        out[f"{dst}.conv.modulation.bias"] = get(f"{src}.affine.bias")
        if torgb:  # no noise, no activation: a bias [1, C, 1, 1]
            out[f"{dst}.bias"] = get(f"{src}.bias").reshape(1, -1, 1, 1)
            return
        out[f"{dst}.activate.bias"] = get(f"{src}.bias")
        out[f"{dst}.noise.weight"] = get(f"{src}.noise_strength").reshape(1)
        nc = get(f"{src}.noise_const")
        out[f"noises.noise_{noise_idx}"] = nc.reshape(1, 1, *nc.shape[-2:])
        noise_idx += 1

    layer("synthesis.b4.conv1", "conv1")
    layer("synthesis.b4.torgb", "to_rgb1", torgb=True)
    for k, r in enumerate(resolutions[1:]):
        layer(f"synthesis.b{r}.conv0", f"convs.{2 * k}")
        layer(f"synthesis.b{r}.conv1", f"convs.{2 * k + 1}")
        layer(f"synthesis.b{r}.torgb", f"to_rgbs.{k}", torgb=True)
    return config, out, get("mapping.w_avg").float()
