"""Perceptual distances chosen by name: LPIPS (AlexNet / VGG16) with an ImageNet backbone file, or a feature network.
Design notes: docs/INTERNALS.md, "cycle_encoding.losses.perceptual"."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..assets import shipped_model_path
from ..checkpoints.classifier import load_small_classifier
from ..checkpoints.face_api import load_dlib_face_embedder
from ..checkpoints.perception import load_lpips
from ..errors import CycleEncodingError
from ..networks.classifier import ClassifierEmbedder
from ..networks.lpips import LPIPS, normalize_channels
from ..ops import FixedMeasure
from .registry import NetworkRegistry


class PerceptualDistance(FixedMeasure):
    """Base class: a frozen distance between images in [-1, 1], one value per sample; stays in eval mode."""

    name: str = "perceptual"

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


class LPIPSDistance(PerceptualDistance):
    """LPIPS v0.1 (see ``networks/lpips.py``) under the name ``lpips-{net} (backbone FILE)``."""

    def __init__(self, lpips: LPIPS, backbone_name: str) -> None:
        super().__init__()
        self.lpips = lpips
        self.name = f"lpips-{lpips.net_name} (backbone {backbone_name})"
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.lpips(x, y)


class FeatureMapDistance(PerceptualDistance):
    """An LPIPS-style distance on any network's feature maps, with equal weights:

    d(x, y) = sum_k mean_{h,w} sum_c (n(f_k(x)) - n(f_k(y)))^2,   n(f) = f / (||f||_2 over channels + 1e-10).
    """

    def __init__(self, net: nn.Module, name: str | None = None) -> None:
        super().__init__()
        if not hasattr(net, "features"):
            raise TypeError(f"{type(net).__name__} has no features(x) method")
        self.net = net
        self.name = name or f"feature-maps of {getattr(net, 'name', type(net).__name__)}"
        self.net.requires_grad_(False)
        self.eval()

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape:
            raise CycleEncodingError(f"{self.name}: images of different shapes {list(x.shape)} and {list(y.shape)}")
        b = x.shape[0]
        total = x.new_zeros(b)
        for f in self.net.features(torch.cat([x, y.to(x.dtype)])):
            f = normalize_channels(f)
            d = ((f[:b] - f[b:]) ** 2).sum(dim=1)  # over channels; what is left is spatial (nothing for [B, C] vectors)
            total = total + (d.flatten(1).mean(dim=1) if d.dim() > 1 else d)
        return total


# ---------------------------------------------------------------------------------------------------------------
# Registry

PERCEPTUAL: NetworkRegistry[PerceptualDistance] = NetworkRegistry("perceptual distance")
register_perceptual = PERCEPTUAL.register
unregister_perceptual = PERCEPTUAL.unregister
perceptual_names = PERCEPTUAL.names
build_perceptual = PERCEPTUAL.build  # (name, device, weights, recorded, domain)


def load_dlib_embedder(device: torch.device, weights: Path | None = None) -> nn.Module:
    """The dlib face embedder (``networks.dlib_resnet``, read by ``checkpoints.face_api`` from the cache); it takes no
    weights file."""
    if weights is not None:
        raise CycleEncodingError(
            f"dlib-face takes no weights file (it reads the dlib embedder from the cache); got {weights}"
        )
    return load_dlib_face_embedder(device=device)


def _lpips_distance(net: str, device: torch.device, weights: Path | None) -> LPIPSDistance:
    """``lpips-{net}``: the torchvision backbone ``weights`` (``load_lpips`` refuses None) and the lpips heads."""
    lpips = load_lpips(net, weights, device=device)
    return LPIPSDistance(lpips, Path(str(weights)).name)


def _dlib_face_distance(device: torch.device, weights: Path | None) -> PerceptualDistance:
    net = load_dlib_embedder(device, weights)
    return FeatureMapDistance(net, name=f"dlib-face (feature maps of {getattr(net, 'name', 'dlib-resnet-face')})")


FMNIST_FEATURES = "fmnist-features"


def classifier_perceptual(
    path: str | Path | None, device: str | torch.device = "cpu", name: str = FMNIST_FEATURES
) -> FeatureMapDistance:
    """A ``FeatureMapDistance`` (LPIPS-style, equal weights) on a small classifier's ``features`` (every block's
    map and the penultimate embedding), named ``NAME (feature maps of FILE)``; ``path`` None: the shipped
    Fashion-MNIST feature network (the registered distance ``fmnist-features``)."""
    path = path or shipped_model_path(FMNIST_FEATURES)
    model = load_small_classifier(path, device, name)
    return FeatureMapDistance(ClassifierEmbedder(model), name=f"{name} (feature maps of {Path(path).name})")


register_perceptual("lpips-alex", lambda d, w: _lpips_distance("alex", d, w),
                    "LPIPS v0.1, AlexNet backbone (needs the ImageNet file)")  # fmt: skip
register_perceptual("lpips-vgg", lambda d, w: _lpips_distance("vgg", d, w),
                    "LPIPS v0.1, VGG16 backbone (needs the ImageNet file)")  # fmt: skip
register_perceptual("dlib-face", _dlib_face_distance,
                    "LPIPS-style distance on the dlib face embedder's feature maps (faces)")  # fmt: skip
register_perceptual(FMNIST_FEATURES, lambda d, w: classifier_perceptual(w, d), "LPIPS-style distance on the shipped "
                    "Fashion-MNIST feature network's maps (or --lpips-backbone FILE)")  # fmt: skip
