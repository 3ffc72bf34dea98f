"""Identity similarities chosen by name: ArcFace IR-SE-50, MoCo v2 ResNet-50, the dlib face embedder; more can be
registered. Design notes: docs/INTERNALS.md, "cycle_encoding.losses.identity"."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..assets import shipped_model_path
from ..checkpoints.classifier import load_small_classifier
from ..checkpoints.perception import load_arcface, load_moco
from ..errors import CycleEncodingError
from ..networks.classifier import ClassifierEmbedder
from ..networks.irse import ArcFaceBackbone
from ..networks.resnet import ResNet50
from ..ops import FixedMeasure, as_rgb
from .perceptual import FMNIST_FEATURES, load_dlib_embedder
from .registry import NetworkRegistry

# The e4e/pSp face crop of a 256x256 aligned face: rows 35:223, columns 32:220 (188 x 188), then pooled to 112.
ARCFACE_RESIZE = 256
ARCFACE_CROP = (35, 223, 32, 220)
MOCO_SIZE = 224


class ArcFaceEmbedder(FixedMeasure):
    """ArcFace on the e4e/pSp face crop: images not 256x256 are first average-pooled to 256 (as pSp's ID loss does),
    then ``x[:, :, 35:223, 32:220]`` is adaptive-average-pooled to the backbone's input (112) and embedded
    (L2-normalized, 512-d). One-channel images are repeated to three channels."""

    def __init__(self, backbone: ArcFaceBackbone, name: str = "arcface-ir-se50") -> None:
        super().__init__()
        self.backbone = backbone.requires_grad_(False).eval()
        self.name = name

    def crop(self, x: torch.Tensor) -> torch.Tensor:
        """The face crop fed to the backbone: [B, 3, H, W] -> [B, 3, input_size, input_size]."""
        x = as_rgb(x, self.name)
        if tuple(x.shape[-2:]) != (ARCFACE_RESIZE, ARCFACE_RESIZE):
            x = F.adaptive_avg_pool2d(x, (ARCFACE_RESIZE, ARCFACE_RESIZE))
        t, b, l, r = ARCFACE_CROP
        x = x[:, :, t:b, l:r]
        s = self.backbone.input_size
        return F.adaptive_avg_pool2d(x, (s, s))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] in [-1, 1] -> [B, 512], unit norm."""
        return self.backbone(self.crop(x))


class MocoEmbedder(FixedMeasure):
    """e4e's MoCo feature: ``F.interpolate(x, size=224)`` (nearest, e4e's call without a mode; no ImageNet
    mean/std: e4e feeds the [-1, 1] image as it is), ResNet-50 to the 2048-d pooled features, L2-normalized."""

    def __init__(self, resnet: ResNet50, name: str = "moco-v2-resnet50") -> None:
        super().__init__()
        self.resnet = resnet.requires_grad_(False).eval()
        self.name = name

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(as_rgb(x, self.name), size=(MOCO_SIZE, MOCO_SIZE))
        return F.normalize(self.resnet.pooled(x), dim=1)


class IdentitySimilarity(FixedMeasure):
    """Cosine similarity of two images' embeddings, one value per sample; frozen, stays in eval mode."""

    def __init__(self, embedder: nn.Module, name: str | None = None) -> None:
        super().__init__()
        if not hasattr(embedder, "embed"):
            raise TypeError(f"{type(embedder).__name__} has no embed(x) method")
        self.embedder = embedder
        self.embedder.requires_grad_(False)
        self.name: str = name or getattr(embedder, "name", type(embedder).__name__)
        self.eval()

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.embedder.embed(x)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] x 2 in [-1, 1] -> [B] cosine similarities (1 = same embedding direction)."""
        if x.shape == y.shape:
            ex, ey = self.embed(torch.cat([x, y.to(x.dtype)])).chunk(2)
        else:
            ex, ey = self.embed(x), self.embed(y)
        return F.cosine_similarity(ex, ey, dim=1)

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


# ---------------------------------------------------------------------------------------------------------------
# Registry

IDENTITY: NetworkRegistry[IdentitySimilarity] = NetworkRegistry("identity network")
register_identity = IDENTITY.register
unregister_identity = IDENTITY.unregister
identity_names = IDENTITY.names
build_identity = IDENTITY.build  # (name, device, weights, recorded, domain)


def _arcface(device: torch.device, weights: Path | None) -> IdentitySimilarity:
    if weights is None:
        raise CycleEncodingError(
            "arcface needs model_ir_se50.pth (the ArcFace IR-SE-50 of TreB1eN's InsightFace_Pytorch, the file pSp and "
            "e4e use for their ID loss): pass --identity-weights FILE (library: weights=FILE); it is not available on "
            "offline machines, where --identity dlib-face is the face network that exists"
        )
    bb = load_arcface(weights, device)
    tag = f"{bb.mode.replace('_', '-')}{bb.num_layers}"
    return IdentitySimilarity(ArcFaceEmbedder(bb, name=f"arcface-{tag} ({weights.name})"))


def _moco(device: torch.device, weights: Path | None) -> IdentitySimilarity:
    if weights is None:
        raise CycleEncodingError(
            "moco needs a MoCo v2 ResNet-50 checkpoint (e.g. moco_v2_800ep_pretrain.pth.tar from facebookresearch/moco, "
            "the file e4e uses): pass --identity-weights FILE (library: weights=FILE)"
        )
    return IdentitySimilarity(MocoEmbedder(load_moco(weights, device), name=f"moco-v2-resnet50 ({weights.name})"))


def classifier_identity(
    path: str | Path | None, device: str | torch.device = "cpu", name: str = FMNIST_FEATURES
) -> IdentitySimilarity:
    """An ``IdentitySimilarity``: cosine of a small classifier's penultimate embeddings, named ``NAME (FILE)``;
    ``path`` None: the shipped Fashion-MNIST feature network (the registered similarity ``fmnist-features``)."""
    path = path or shipped_model_path(FMNIST_FEATURES)
    model = load_small_classifier(path, device, name)
    return IdentitySimilarity(ClassifierEmbedder(model, name=f"{name} ({Path(path).name})"))


register_identity("arcface", _arcface, "ArcFace IR-SE-50 on the e4e face crop (needs model_ir_se50.pth)")
register_identity("moco", _moco, "MoCo v2 ResNet-50 features, e4e's non-face similarity (needs the MoCo file)")
register_identity("dlib-face", lambda d, w: IdentitySimilarity(load_dlib_embedder(d, w)),
                  "dlib's ResNet face embedder, 128-d (faces; available offline)")  # fmt: skip
register_identity(FMNIST_FEATURES, lambda d, w: classifier_identity(w, d), "cosine of the shipped Fashion-MNIST "
                  "feature network's penultimate embedding (Fashion-MNIST; offline)")  # fmt: skip


def identity_default(data: str | None, weights: str | Path | None = None) -> tuple[str, str]:
    """The identity network ``identity="auto"`` stands for, and why: the paper uses an identity term of weight 0.1
    whenever the domain has a network for it (Fashion-MNIST: the shipped one; a weights file given: ArcFace's)."""
    spec = str(data or "")
    if Path(spec).name.lower().startswith("fashion-mnist") or spec.lower().startswith("fashion-mnist"):
        return "fmnist-features", "auto: fmnist-features, the shipped network of the Fashion-MNIST domain"
    if weights is not None:
        return "arcface", "auto: arcface, since an identity weights file was given"
    what = f"the images {spec!r}" if spec else "these images"
    return "none", (
        f"auto: no identity network is known for {what}; the paper's identity term (0.1) is off. For faces pass "
        "--identity arcface --identity-weights model_ir_se50.pth (or --identity dlib-face offline), for other domains "
        "--identity moco --identity-weights FILE"
    )
