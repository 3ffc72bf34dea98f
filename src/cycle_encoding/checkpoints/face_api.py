"""face-api's TF.js weights of dlib's ResNet face embedder (npm ``@vladmandic/face-api``, network
``networks.dlib_resnet``) and the own file they become (kind ``face_embedder``): reading, converting, loading."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from ..errors import CheckpointError, CycleEncodingError
from ..networks.dlib_resnet import (
    CHIP_PADDING,
    CHIP_SIZE,
    DESCRIPTOR_DIM,
    INPUT_SCALE,
    MEAN_RGB,
    NAME,
    DlibFaceEmbedder,
    DlibResNet,
)
from ..paths import cache_dir
from ..utils import resolve_device
from .common import check_state_dict
from .native import default_provenance, file_sha256, read_native, save_native

FACE_EMBEDDER_KIND = "face_embedder"
NPM_PACKAGE = "@vladmandic/face-api@1.7.15"
MANIFEST_NAME = "face_recognition_model-weights_manifest.json"
WEIGHTS_NAME = "face_recognition_model.bin"
NATIVE_NAME = "dlib_resnet_face_v1.safetensors"


# face-api's TF.js layer names, stage by stage (each unit holds a conv+affine pair per convolution)
_TFJS_STAGES = (
    ("conv32_1", "conv32_2", "conv32_3"),
    ("conv64_down", "conv64_1", "conv64_2", "conv64_3"),
    ("conv128_down", "conv128_1", "conv128_2"),
    ("conv256_down", "conv256_1", "conv256_2"),
    ("conv256_down_out",),
)
# (TF.js prefix, torch prefix) of every layer
_TFJS_LAYERS = [("conv32_down", "stem")] + [
    (name, f"stages.{s}.{u}") for s, units in enumerate(_TFJS_STAGES) for u, name in enumerate(units)
]


# -- TF.js weights -----------------------------------------------------------------------------------------------

_QUANT_DTYPES = {"uint8": np.uint8, "uint16": np.uint16, "float16": np.float16}
_PLAIN_DTYPES = {"float32": np.float32, "int32": np.int32}


def read_tfjs_weights(manifest: str | Path) -> dict[str, np.ndarray]:
    """A TF.js weights manifest and its binary shards as float32 arrays by weight name. Each manifest group names its
    shard files (concatenated in order) and its weights in stored order; a weight with ``quantization {dtype:
    uint8|uint16, scale, min}`` stores integers ``q`` meaning ``q * scale + min`` (in float64, rounded to float32, as
    TF.js computes it), ``float16`` quantization half floats, plain weights little-endian float32."""
    mpath = Path(manifest)
    try:
        groups = json.loads(mpath.read_text())
    except FileNotFoundError:
        raise CheckpointError(mpath, "no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(mpath, f"not a TF.js weights manifest (JSON): {e}") from None
    if not isinstance(groups, list) or not all(isinstance(g, dict) and "paths" in g and "weights" in g for g in groups):
        raise CheckpointError(mpath, "not a TF.js weights manifest: expected a list of {paths, weights} groups")
    out: dict[str, np.ndarray] = {}
    for group in groups:
        data = b""
        for shard in group["paths"]:
            spath = mpath.parent / shard
            if not spath.is_file():
                raise CheckpointError(spath, f"missing weights shard named by {mpath.name}")
            data += spath.read_bytes()
        offset = 0
        for wspec in group["weights"]:
            name, shape = wspec["name"], [int(s) for s in wspec["shape"]]
            count = int(np.prod(shape)) if shape else 1
            quant = wspec.get("quantization")
            code = quant.get("dtype") if quant else wspec.get("dtype", "float32")
            dtype = (_QUANT_DTYPES if quant else _PLAIN_DTYPES).get(code)
            if dtype is None:
                raise CheckpointError(
                    mpath, f"weight {name}: unsupported {'quantization' if quant else 'dtype'} {code!r}"
                )
            stored = np.dtype(dtype).newbyteorder("<")
            nbytes = count * stored.itemsize
            if offset + nbytes > len(data):
                raise CheckpointError(
                    mpath, f"weight {name}: the shards end early ({len(data)} bytes; truncated download?)"
                )
            raw = np.frombuffer(data, dtype=stored, count=count, offset=offset)
            offset += nbytes
            if quant and quant["dtype"] in ("uint8", "uint16"):
                values = (raw.astype(np.float64) * float(quant["scale"]) + float(quant["min"])).astype(np.float32)
            else:
                values = raw.astype(np.float32)
            out[name] = values.reshape(shape)
        if offset != len(data):
            raise CheckpointError(mpath, f"{len(data) - offset} bytes left over after the last weight")
    return out


def tfjs_to_state_dict(weights: Mapping[str, np.ndarray], source: str | Path = "face-api weights") -> dict:
    """face-api's TF.js names (``conv64_1/conv2/conv/filters`` ...) as :class:`DlibResNet` keys: filters
    ``[kh, kw, in, out]`` become ``[out, in, kh, kw]``; ``fc [256, 128]`` becomes ``fc.weight [128, 256]``."""
    sd: dict[str, torch.Tensor] = {}

    def take(name: str) -> np.ndarray:
        if name not in weights:
            raise CheckpointError(source, f"missing weight {name}: not face-api's face recognition model")
        return weights[name]

    def conv_affine(tf_prefix: str, pt_prefix: str) -> None:
        sd[f"{pt_prefix}.conv.weight"] = torch.from_numpy(take(f"{tf_prefix}/conv/filters").transpose(3, 2, 0, 1))
        sd[f"{pt_prefix}.conv.bias"] = torch.from_numpy(take(f"{tf_prefix}/conv/bias"))
        sd[f"{pt_prefix}.affine_weight"] = torch.from_numpy(take(f"{tf_prefix}/scale/weights"))
        sd[f"{pt_prefix}.affine_bias"] = torch.from_numpy(take(f"{tf_prefix}/scale/biases"))

    for tf_name, pt_name in _TFJS_LAYERS:
        if pt_name == "stem":
            conv_affine(tf_name, pt_name)
        else:
            conv_affine(f"{tf_name}/conv1", f"{pt_name}.conv1")
            conv_affine(f"{tf_name}/conv2", f"{pt_name}.conv2")
    sd["fc.weight"] = torch.from_numpy(take("fc").T)
    used = {k for k in weights if k == "fc" or any(k.startswith(t + "/") for t, _ in _TFJS_LAYERS)}
    extra = sorted(set(weights) - used)
    if extra:
        raise CheckpointError(source, f"unexpected weight {extra[0]} ({len(extra)} unexpected in all)")
    return {k: v.contiguous().clone() for k, v in sd.items()}


def build_from_state_dict(sd: Mapping[str, torch.Tensor], source: str | Path, layout: str = "ffhq") -> DlibFaceEmbedder:
    """A :class:`DlibFaceEmbedder` holding ``sd`` (strict: every key and shape must fit)."""
    net = DlibResNet()
    check_state_dict(net, sd, source, "dlib face embedder")
    net.load_state_dict(dict(sd))
    return DlibFaceEmbedder(net, layout=layout)


CONFIG = {
    "architecture": NAME,
    "input_size": CHIP_SIZE,
    "chip_padding": CHIP_PADDING,
    "mean_rgb": list(MEAN_RGB),
    "input_scale": INPUT_SCALE,
    "descriptor_dim": DESCRIPTOR_DIM,
}


def convert_face_api_weights(manifest: str | Path, out: str | Path) -> Path:
    """face-api's TF.js face recognition weights (the manifest beside its ``.bin``) as the project's file ``out``."""
    mpath = Path(manifest)
    sd = tfjs_to_state_dict(read_tfjs_weights(mpath), mpath)
    build_from_state_dict(sd, mpath)  # checks keys and shapes
    bins = [mpath.parent / p for g in json.loads(mpath.read_text()) for p in g["paths"]]
    prov = default_provenance(
        source=f"npm {NPM_PACKAGE}: model/{mpath.name}",
        source_format="tfjs-layers-weights (uint8-quantized: value = q*scale + min)",
        source_sha256={p.name: file_sha256(p) for p in [mpath, *bins]},
        original="dlib_face_recognition_resnet_model_v1 (Davis King, dlib; public domain / CC0 model)",
    )
    return save_native(out, FACE_EMBEDDER_KIND, CONFIG, sd, provenance=prov)


def load_dlib_face_embedder(
    device: str | torch.device = "cpu", path: str | Path | None = None, layout: str = "ffhq"
) -> DlibFaceEmbedder:
    """The dlib face embedder, frozen, in eval mode, on ``device``, from ``path`` (a converted file or face-api's
    weights manifest), else the converted file in the cache (converted once from the cached face-api files)."""
    dev = resolve_device(device)
    if path is None:
        native = cache_dir("models", create=False) / NATIVE_NAME
        if not native.is_file():
            manifest = cache_dir("face-api", create=False) / "model" / MANIFEST_NAME  # scripts/fetch_assets.sh puts it
            if not manifest.is_file():
                raise CycleEncodingError(
                    f"the dlib face embedder's weights are not in the cache ({native} or {manifest}): run "
                    f"scripts/fetch_assets.sh (it runs `npm pack {NPM_PACKAGE}` and keeps model/{WEIGHTS_NAME} "
                    f"and model/{MANIFEST_NAME} there), or pass the path of a converted file"
                )
            try:
                convert_face_api_weights(manifest, native)
            except OSError:  # a read-only cache: convert in memory
                path = manifest
        path = native if path is None else path
    p = Path(path)
    if p.suffix == ".json":
        model = build_from_state_dict(tfjs_to_state_dict(read_tfjs_weights(p), p), p, layout)
    else:
        nf = read_native(p, kind=FACE_EMBEDDER_KIND, what="a face embedder")
        arch = nf.config.get("architecture")
        if arch != NAME:
            raise CheckpointError(p, f"face embedder architecture {arch!r} is not {NAME!r}")
        model = build_from_state_dict(nf.tensors, p, layout)
    return model.requires_grad_(False).eval().to(dev)
