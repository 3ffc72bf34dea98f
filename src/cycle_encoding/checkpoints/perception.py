"""Readers of the perception networks' files (torchvision AlexNet / VGG16, LPIPS v0.1 heads, ArcFace IR-SE-50, MoCo v2
ResNet-50): ``weights_only`` loads, strict key and shape checks, one-line errors naming the first key that differs."""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, CycleEncodingError
from ..networks.irse import UNITS_PER_BLOCK, ArcFaceBackbone
from ..networks.lpips import BACKBONES, LPIPS, LPIPS_NETS
from ..networks.resnet import ResNet50
from .common import check_shapes, count_parameters, torch_load
from .locate import missing_file_message

# torchvision's classifier keys: name -> shape, with None where any size is fine (the number of classes). AlexNet's
# three linear layers are classifier.1, .4, .6 (9216 inputs), VGG16's classifier.0, .3, .6 (25088 inputs).
_CLASSIFIERS: dict[str, dict[str, tuple[int | None, ...]]] = {
    net: {f"classifier.{i}.{p}": (out, n_in)[: 2 if p == "weight" else 1]
          for i, out, n_in in ((a, 4096, first_in), (b, 4096, 4096), (6, None, 4096)) for p in ("weight", "bias")}
    for net, a, b, first_in in (("alexnet", 1, 4, 9216), ("vgg16", 0, 3, 25088))
}  # fmt: skip


def check_strict(model: nn.Module, sd: Mapping[str, Any], source: str | Path, what: str) -> dict[str, torch.Tensor]:
    """``sd`` checked against ``model``'s state dict (``check_shapes``), missing counters filled from the model,
    floating tensors as float32."""
    want = model.state_dict()
    check_shapes(sd, {k: tuple(v.shape) for k, v in want.items()}, source, what, optional=("num_batches_tracked",))
    return {
        k: (sd[k].float() if sd[k].is_floating_point() else sd[k]) if k in sd else v.clone() for k, v in want.items()
    }


def _as_state_dict(obj: Any, source: str | Path, what: str) -> dict[str, Any]:
    """A plain state dict from a loaded object: unwraps ``{'state_dict': ...}`` and a DataParallel ``module.`` prefix."""
    if isinstance(obj, Mapping) and set(obj.keys()) == {"state_dict"} and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(source, f"{what}: expected a state dict, found a {type(obj).__name__}")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):
        sd = {k[len("module.") :]: v for k, v in sd.items()}
    return sd


# -- torchvision AlexNet / VGG16 backbones and LPIPS -------------------------------------------------------------------


def infer_backbone_arch(sd: Mapping[str, Any]) -> str | None:
    """'alexnet' or 'vgg16' from a torchvision state dict's keys, or None."""
    if "features.28.weight" in sd:
        return "vgg16"
    if "features.10.weight" in sd and "features.12.weight" not in sd:
        return "alexnet"
    return None


def read_torchvision_backbone(path: str | Path, arch: str | None = None) -> tuple[str, dict[str, torch.Tensor]]:
    """(arch, the ``features.*`` part checked strictly) of a torchvision AlexNet or VGG16 state dict, the full model's
    (classifier checked, then dropped) or the features' alone; ``arch``, when given, must match the file."""
    p = Path(path)
    what = "torchvision backbone"
    sd = _as_state_dict(torch_load(p), p, what)
    if all(re.match(r"^\d+\.", k) for k in sd):
        sd = {f"features.{k}": v for k, v in sd.items()}
    if any(k.endswith(("running_mean", "running_var")) for k in sd):
        raise CheckpointError(p, f"{what}: has BatchNorm statistics (a *_bn model?); LPIPS uses plain AlexNet / VGG16")
    found = infer_backbone_arch(sd)
    if found is None:
        raise CheckpointError(
            p,
            f"{what}: not a torchvision AlexNet or VGG16 state dict (no features.10.weight / features.28.weight; "
            f"first key {next(iter(sd))})",
        )
    if arch is not None and arch != found:
        raise CheckpointError(p, f"{what}: this is a {found} state dict, but {arch} was asked for")
    classifier = {k: v for k, v in sd.items() if k.startswith("classifier.")}
    if classifier:
        check_shapes(classifier, _CLASSIFIERS[found], p, what)
    features = {k: v for k, v in sd.items() if not k.startswith("classifier.")}
    return found, check_strict(BACKBONES[found](), features, p, f"{what} ({found})")


def lpips_heads_path(net: str) -> Path:
    """The ``lpips`` package's v0.1 head file for ``net`` ('alex' or 'vgg'), located without importing the package
    (its ``__init__`` imports torchvision)."""
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise CycleEncodingError(
            "the LPIPS linear heads come from the lpips package, which is not installed: "
            "pip install --no-deps lpips==0.1.4 (see requirements-nodeps.txt)"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "weights" / "v0.1" / f"{net}.pth"


def read_lpips_heads(net: str, path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """The v0.1 linear heads ``lin{k}.model.1.weight [1, C_k, 1, 1]`` for ``net``, checked strictly; ``path``
    defaults to the installed ``lpips`` package's ``weights/v0.1/{net}.pth``."""
    if net not in LPIPS_NETS:
        raise CycleEncodingError(f"unknown LPIPS net {net!r} (alex or vgg)")
    p = Path(path) if path is not None else lpips_heads_path(net)
    sd = _as_state_dict(torch_load(p), p, f"LPIPS {net} heads")
    channels = BACKBONES[LPIPS_NETS[net]].channels
    expected = {f"lin{k}.model.1.weight": (1, c, 1, 1) for k, c in enumerate(channels)}
    check_shapes(sd, expected, p, f"LPIPS {net} heads")
    return {k: sd[k].float() for k in expected}


def load_lpips(
    net: str,
    backbone: str | Path | None,
    heads: str | Path | None = None,
    device: str | torch.device = "cpu",
) -> LPIPS:
    """An LPIPS module: torchvision backbone from ``backbone`` (required: else an error naming the file), heads from
    ``heads`` or the lpips package."""
    if net not in LPIPS_NETS:
        raise CycleEncodingError(f"unknown LPIPS net {net!r} (alex or vgg)")
    if backbone is None:
        raise CycleEncodingError(missing_file_message(f"lpips-{net}"))
    _, features = read_torchvision_backbone(backbone, LPIPS_NETS[net])
    return LPIPS(net, features, read_lpips_heads(net, heads)).to(device)


# -- ArcFace IR-SE-50 --------------------------------------------------------------------------------------------------


def infer_arcface_config(sd: Mapping[str, Any], source: str | Path) -> dict[str, Any]:
    """``input_size``, ``num_layers``, ``mode``, ``affine`` of a TreB1eN ArcFace ``Backbone`` from its keys/shapes."""
    if "input_layer.0.weight" not in sd or "output_layer.3.weight" not in sd:
        missing = "input_layer.0.weight" if "input_layer.0.weight" not in sd else "output_layer.3.weight"
        raise CheckpointError(source, f"ArcFace: missing key {missing}: not an ArcFace IR / IR-SE backbone")
    units = {int(m.group(1)) for k in sd if (m := re.match(r"^body\.(\d+)\.", k))}
    n_units = max(units) + 1 if units else 0
    by_units = {sum(v): n for n, v in UNITS_PER_BLOCK.items()}
    if n_units not in by_units:
        raise CheckpointError(source, f"ArcFace: {n_units} body units fit no IR depth (50: 24, 100: 49, 152: 50 units)")
    flat = sd["output_layer.3.weight"].shape[-1]
    sizes = {512 * 7 * 7: 112, 512 * 14 * 14: 224}
    if flat not in sizes:
        raise CheckpointError(
            source, f"ArcFace: key output_layer.3.weight has {flat} inputs, expected 25088 (112 px) or 100352 (224 px)"
        )
    return {
        "input_size": sizes[flat],
        "num_layers": by_units[n_units],
        "mode": "ir_se" if "body.0.res_layer.5.fc1.weight" in sd else "ir",
        "affine": "output_layer.4.weight" in sd,
    }


def read_arcface(path: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read ``model_ir_se50.pth`` (or another TreB1eN ArcFace backbone): (config, state dict checked strictly)."""
    p = Path(path)
    sd = _as_state_dict(torch_load(p), p, "ArcFace")
    cfg = infer_arcface_config(sd, p)
    model = ArcFaceBackbone(**cfg)
    return cfg, check_strict(model, sd, p, f"ArcFace {cfg['mode'].upper().replace('_', '-')}-{cfg['num_layers']}")


def load_arcface(path: str | Path, device: str | torch.device = "cpu") -> ArcFaceBackbone:
    """An ArcFace backbone in eval mode with frozen weights, read from ``path``."""
    cfg, sd = read_arcface(path)
    model = ArcFaceBackbone(**cfg)
    model.load_state_dict(sd, strict=True)
    return model.requires_grad_(False).eval().to(device)


# -- MoCo v2 ResNet-50 -------------------------------------------------------------------------------------------------

MOCO_PREFIXES = ("module.encoder_q.", "encoder_q.")
_MOCO_OTHER = ("module.encoder_k.", "encoder_k.", "module.queue", "queue")


def read_moco(path: str | Path) -> dict[str, torch.Tensor]:
    """The ResNet-50 (query encoder) of a MoCo (v1/v2) checkpoint ``{'state_dict': {'module.encoder_q.*': ...}, ...}``
    or of a torchvision-layout state dict, its ``fc.*`` head dropped, checked strictly."""
    p = Path(path)
    obj = torch_load(p)
    sd = obj["state_dict"] if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping) else obj
    if not isinstance(sd, Mapping) or not sd:
        raise CheckpointError(p, f"MoCo: expected a checkpoint with a state_dict, found a {type(sd).__name__}")
    sd = {str(k): v for k, v in sd.items()}
    prefix = next((pre for pre in MOCO_PREFIXES if any(k.startswith(pre) for k in sd)), None)
    if prefix is not None:
        others = [k for k in sd if not k.startswith(prefix) and not k.startswith(_MOCO_OTHER)]
        if others:
            raise CheckpointError(p, f"MoCo: unexpected key {others[0]} beside the {prefix}* keys")
        sd = {k[len(prefix) :]: v for k, v in sd.items() if k.startswith(prefix)}
    elif "conv1.weight" not in sd:
        raise CheckpointError(
            p, f"MoCo: no module.encoder_q.* keys and not a ResNet-50 state dict (first key {next(iter(sd))})"
        )
    sd = {k: v for k, v in sd.items() if not k.startswith("fc.")}
    return check_strict(ResNet50(num_classes=None), sd, p, "MoCo ResNet-50")


def load_moco(path: str | Path, device: str | torch.device = "cpu") -> ResNet50:
    """The MoCo ResNet-50 feature extractor (no ``fc``), eval mode, frozen."""
    model = ResNet50(num_classes=None)
    model.load_state_dict(read_moco(path), strict=True)
    return model.requires_grad_(False).eval().to(device)


# -- cycle-encoding info -----------------------------------------------------------------------------------------------


def _count(sd: Mapping[str, Any]) -> int:
    return count_parameters(sd, lambda k: k.endswith("_tracked"))


def inspect_perception(path: Path, container: str) -> dict[str, Any] | None:
    """Describe a torchvision AlexNet/VGG16, LPIPS heads, ArcFace or MoCo file; None for other files."""
    if container not in ("torch-zip", "torch-legacy"):
        return None
    obj = torch_load(path)
    if not isinstance(obj, Mapping):
        return None
    inner = obj.get("state_dict") if isinstance(obj.get("state_dict"), Mapping) else obj
    keys = [str(k) for k in inner]
    if any(k.startswith(MOCO_PREFIXES) for k in keys):
        sd = read_moco(path)
        return {
            "format": "moco",
            "network": "MoCo ResNet-50 (query encoder; fc head dropped)",
            "architecture": {"arch": "resnet50", "features": 2048},
            "parameters": _count(sd),
            "holds": ["state_dict: module.encoder_q.*", *(str(k) for k in obj if k != "state_dict")],
        }
    if keys and all(re.match(r"^lin\d+\.model\.1\.weight$", k) for k in keys):
        channels = [
            int(inner[f"lin{k}.model.1.weight"].shape[1]) for k in range(len(keys)) if f"lin{k}.model.1.weight" in inner
        ]
        known = {tuple(BACKBONES[a].channels): n for n, a in LPIPS_NETS.items()}
        net = known.get(tuple(channels))
        if net is not None:
            read_lpips_heads(net, path)  # strict check
        return {
            "format": "lpips-heads",
            "network": f"LPIPS v0.1 linear heads ({net or 'a net this project does not implement'})",
            "architecture": {"net": net, "channels": channels},
            "parameters": sum(channels),
            "holds": [f"{len(keys)} heads lin0..lin{len(keys) - 1}"],
        }
    if "input_layer.0.weight" in keys and any(k.startswith("body.") for k in keys) and "output_layer.3.weight" in keys:
        cfg, sd = read_arcface(path)
        return {
            "format": "arcface",
            "network": f"ArcFace {cfg['mode'].upper().replace('_', '-')}-{cfg['num_layers']} (TreB1eN layout)",
            "architecture": cfg,
            "parameters": _count(sd),
            "holds": [f"a state dict ({len(sd)} tensors)"],
        }
    sd0 = {k.removeprefix("module."): v for k, v in inner.items()}
    if infer_backbone_arch(sd0) is not None:
        arch, _ = read_torchvision_backbone(path)
        full = any(k.startswith("classifier.") for k in sd0)
        return {
            "format": "torchvision",
            "network": f"torchvision {arch}" + (" (features and classifier)" if full else " (features only)"),
            "architecture": {"arch": arch, "lpips_net": {v: k for k, v in LPIPS_NETS.items()}[arch]},
            "parameters": _count(sd0),
            "holds": ["features.*", *(["classifier.*"] if full else [])],
        }
    return None
