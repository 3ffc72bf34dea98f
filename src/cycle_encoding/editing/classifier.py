"""Attribute classifiers the user gives: to label generated samples (InterFaceGAN training) and to measure whether an
edit changed what it should (edit success).

Two forms are accepted wherever a classifier is asked for:
- a Python callable ``f(images [B, C, H, W] in [-1, 1]) -> scores [B]`` or ``[B, K]`` (any ``nn.Module`` too);
- a file in the project's format (``.safetensors``, kind ``classifier``): the architecture is data (config below),
  built by this module, and the weights are loaded with strict key and shape checks; nothing in the file runs.

Architectures (``ClassifierConfig.arch``):
- ``convnet``: per entry of ``widths``, a 3x3 stride-2 convolution + LeakyReLU(0.2); global average pooling; a linear
  layer to the K outputs. Small and fast: attribute scorers for small domains and tests.
- ``vggbn``: VGG-style with BatchNorm: per entry of ``widths``, two 3x3 convolutions (stride 1) each followed by
  BatchNorm and ReLU, then a 2x2 max-pool; global average pooling; a linear layer to the K outputs. A second small
  architecture, different from ``convnet`` (e.g. the Fashion-MNIST evaluation network, independent of the feature
  network used in training losses).
- ``resnet50``: torchvision's ResNet-50 layout (``networks/resnet.py``) with a K-output ``fc``; its keys are
  torchvision's, so an attribute classifier trained with torchvision converts by ``save_classifier``.
Images are resized to ``input_size`` (antialiased bilinear), converted to ``in_channels`` and, for
``normalize="imagenet"``, mapped to [0, 1] and standardized with ImageNet's mean and std. Outputs are logits; the
score of attribute k is output k (higher = more of the attribute).

``features(images)`` (``convnet`` and ``vggbn``) returns the maps after each block and, last, the penultimate
embedding (the globally average-pooled last map, ``[B, widths[-1]]``): what perceptual / identity-like terms and the
classifier Frechet distance use (see :func:`classifier_perceptual`, :func:`classifier_identity`,
``metrics.classifier_frechet_distance``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints.common import check_state_dict
from ..checkpoints.native import default_provenance, native_header_of_kind, read_native, save_native
from ..errors import CheckpointError, CycleEncodingError

CLASSIFIER_KIND = "classifier"
ARCHS = ("convnet", "vggbn", "resnet50")
SMALL_ARCHS = ("convnet", "vggbn")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)

Scorer = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class ClassifierConfig:
    """What is needed to build an attribute classifier (see the module doc)."""

    arch: str = "convnet"
    outputs: tuple[str, ...] = ("attribute",)
    input_size: int = 64
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)
    normalize: str = "none"

    def __post_init__(self) -> None:
        if self.arch not in ARCHS:
            raise ValueError(f"arch must be one of {', '.join(ARCHS)}, got {self.arch!r}")
        if not self.outputs:
            raise ValueError("a classifier needs at least one output")
        if self.normalize not in ("none", "imagenet"):
            raise ValueError(f"normalize must be 'none' or 'imagenet', got {self.normalize!r}")
        if self.in_channels not in (1, 3) or (self.arch == "resnet50" and self.in_channels != 3):
            raise ValueError(f"in_channels must be 1 or 3 (3 for resnet50), got {self.in_channels}")
        if self.input_size < 8:
            raise ValueError(f"input_size must be >= 8, got {self.input_size}")
        object.__setattr__(self, "outputs", tuple(str(o) for o in self.outputs))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["outputs"], d["widths"] = list(self.outputs), list(self.widths)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ClassifierConfig:
        unknown = set(d) - set(cls.__dataclass_fields__)
        if unknown:
            raise ValueError(f"unknown classifier configuration fields: {sorted(unknown)}")
        d = dict(d)
        for k in ("outputs", "widths"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


class AttributeClassifier(nn.Module):
    """``forward(images in [-1, 1]) -> logits [B, K]``; ``score(images, attribute) -> [B]``."""

    def __init__(self, config: ClassifierConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config or ClassifierConfig(**kwargs)
        k = len(c.outputs)
        if c.arch == "convnet":
            layers: list[nn.Module] = []
            cin = c.in_channels
            for w in c.widths:
                layers += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
                cin = w
            self.body = nn.Sequential(*layers)
            self.head = nn.Linear(cin, k)
        elif c.arch == "vggbn":
            blocks: list[nn.Module] = []
            cin = c.in_channels
            for w in c.widths:
                blocks.append(
                    nn.Sequential(
                        nn.Conv2d(cin, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                        nn.Conv2d(w, w, 3, padding=1, bias=False), nn.BatchNorm2d(w), nn.ReLU(),
                        nn.MaxPool2d(2),
                    )
                )  # fmt: skip
                cin = w
            self.body = nn.Sequential(*blocks)
            self.head = nn.Linear(cin, k)
        else:
            from ..networks.resnet import ResNet50

            self.net = ResNet50(num_classes=k)
        self.name = f"{c.arch} classifier ({', '.join(c.outputs)})"

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.config.outputs

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4:
            raise CycleEncodingError(f"the classifier takes images [B, C, H, W], got {list(images.shape)}")
        x = images.float()
        if x.shape[1] != c.in_channels:
            if x.shape[1] == 1:
                x = x.expand(-1, 3, -1, -1)
            elif x.shape[1] == 3 and c.in_channels == 1:
                w = torch.tensor([0.299, 0.587, 0.114], device=x.device).view(1, 3, 1, 1)
                x = (x * w).sum(1, keepdim=True)
            else:
                raise CycleEncodingError(f"the classifier takes {c.in_channels}-channel images, got {x.shape[1]}")
        if x.shape[-1] != c.input_size or x.shape[-2] != c.input_size:
            x = F.interpolate(
                x, size=(c.input_size, c.input_size), mode="bilinear", align_corners=False, antialias=True
            )
        if c.normalize == "imagenet":
            mean = torch.tensor(_IMAGENET_MEAN, device=x.device).view(1, 3, 1, 1)
            std = torch.tensor(_IMAGENET_STD, device=x.device).view(1, 3, 1, 1)
            x = ((x + 1) / 2 - mean) / std
        return x

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.prepare(images)
        if self.config.arch in SMALL_ARCHS:
            return self.head(self.body(x).mean(dim=(2, 3)))
        return self.net(x)

    def _blocks(self) -> list[nn.Module]:
        if self.config.arch == "convnet":
            mods = list(self.body)
            return [nn.Sequential(mods[i], mods[i + 1]) for i in range(0, len(mods), 2)]
        if self.config.arch == "vggbn":
            return list(self.body)
        raise CycleEncodingError(f"features() is defined for the {' and '.join(SMALL_ARCHS)} classifiers only")

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The map after each block (``[B, widths[i], H_i, W_i]``), then the penultimate embedding
        (``[B, widths[-1]]``, the global average of the last map, the input of the final linear layer)."""
        x = self.prepare(images)
        out: list[torch.Tensor] = []
        for block in self._blocks():
            x = block(x)
            out.append(x)
        out.append(x.mean(dim=(2, 3)))
        return out

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate embedding ``[B, widths[-1]]`` (not normalized)."""
        return self.features(images)[-1]

    def score(self, images: torch.Tensor, attribute: int | str = 0) -> torch.Tensor:
        return self(images)[:, attribute_index(self.outputs, attribute)]


def parameter_count(model: nn.Module) -> int:
    """Number of learned parameters (BatchNorm running statistics are buffers, not counted)."""
    return sum(p.numel() for p in model.parameters())


class ClassifierEmbedder(nn.Module):
    """``embed(x) -> [B, D]``: a small classifier's penultimate embedding, L2-normalized; frozen, stays in eval."""

    def __init__(self, classifier: AttributeClassifier, name: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.requires_grad_(False).eval()
        self.name = name or classifier.name

    def train(self, mode: bool = True) -> ClassifierEmbedder:
        return super().train(False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.classifier.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.classifier.embed(x), dim=1)


def _small_classifier(path: str | Path, device: str | torch.device, what: str) -> AttributeClassifier:
    model = load_classifier(path, device)
    if model.config.arch not in SMALL_ARCHS:
        raise CheckpointError(
            Path(path), f"{what} needs a {' or '.join(SMALL_ARCHS)} classifier, this one is {model.config.arch}"
        )
    return model


def classifier_perceptual(path: str | Path, device: str | torch.device = "cpu", name: str = "classifier") -> Any:
    """A ``FeatureMapDistance`` (LPIPS-style, equal weights) on a small classifier's ``features`` (every block's
    map and the penultimate embedding), named ``NAME (feature maps of FILE)``."""
    from ..losses.perceptual import FeatureMapDistance

    model = _small_classifier(path, device, name)
    return FeatureMapDistance(ClassifierEmbedder(model), name=f"{name} (feature maps of {Path(path).name})")


def classifier_identity(path: str | Path, device: str | torch.device = "cpu", name: str = "classifier") -> Any:
    """An ``IdentitySimilarity``: cosine of a small classifier's penultimate embeddings, named ``NAME (FILE)``."""
    from ..losses.identity import IdentitySimilarity

    model = _small_classifier(path, device, name)
    return IdentitySimilarity(ClassifierEmbedder(model, name=f"{name} ({Path(path).name})"))


FMNIST_FEATURES = "fmnist-features"
FMNIST_EVAL = "fmnist-eval"


def fmnist_features_perceptual(device: str | torch.device = "cpu", weights: str | Path | None = None) -> Any:
    """The registered perceptual distance ``fmnist-features``: the shipped Fashion-MNIST feature network (or
    ``weights``, another classifier file), see :func:`classifier_perceptual`."""
    from ..assets import shipped_model_path

    return classifier_perceptual(weights or shipped_model_path(FMNIST_FEATURES), device, FMNIST_FEATURES)


def fmnist_features_identity(device: str | torch.device = "cpu", weights: str | Path | None = None) -> Any:
    """The registered identity-like similarity ``fmnist-features``: cosine of the shipped Fashion-MNIST feature
    network's penultimate embeddings (or those of ``weights``), see :func:`classifier_identity`."""
    from ..assets import shipped_model_path

    return classifier_identity(weights or shipped_model_path(FMNIST_FEATURES), device, FMNIST_FEATURES)


def attribute_index(outputs: Sequence[str] | None, attribute: int | str | None, width: int | None = None) -> int:
    """The column of ``attribute`` (a name or a number) among a classifier's outputs."""
    if attribute is None:
        attribute = 0
    if isinstance(attribute, str) and not attribute.lstrip("-").isdigit():
        if not outputs or attribute not in outputs:
            raise CycleEncodingError(
                f"the classifier has no output {attribute!r} (outputs: {', '.join(outputs or [])})"
            )
        return list(outputs).index(attribute)
    k = int(attribute)
    n = len(outputs) if outputs else width
    if n is not None and not 0 <= k < n:
        raise CycleEncodingError(f"the classifier has {n} output(s); output {k} does not exist")
    return k


def save_classifier(model: AttributeClassifier, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write a classifier in the project's format."""
    return save_native(
        path, CLASSIFIER_KIND, model.config.to_dict(), dict(model.state_dict()), provenance or default_provenance()
    )


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> AttributeClassifier:
    """Read a classifier file (own format, kind ``classifier``; or a shipped model's name), eval mode, frozen."""
    from ..assets import resolve_model

    p = resolve_model(path)
    nf = read_native(p)
    if nf.kind != CLASSIFIER_KIND:
        raise CheckpointError(p, f"a cycle-encoding {nf.kind} file, not a classifier")
    try:
        config = ClassifierConfig.from_dict(nf.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(p, f"bad classifier configuration in the file: {e}") from None
    model = AttributeClassifier(config)
    check_state_dict(model, nf.tensors, p, "classifier")
    model.load_state_dict(nf.tensors, strict=True)
    model.name = f"{model.name} from {p.name}"
    return model.to(device).eval().requires_grad_(False)


PAIR_SEPARATOR = " vs "


def brightness(images: torch.Tensor) -> torch.Tensor:
    """``[B]``: the mean pixel value of images in [-1, 1], mapped to [0, 1] (a measure, no network)."""
    return ((images.float().clamp(-1, 1) + 1) / 2).flatten(1).mean(1)


# scores computed from the pixels alone, usable wherever a classifier is asked for (``--classifier brightness``)
MEASURES: dict[str, tuple[Scorer, str]] = {
    "brightness": (brightness, "brightness (mean pixel value in [0, 1]; no network)"),
}


def parse_pair(attribute: int | str | None) -> tuple[str, str] | None:
    """``("A", "B")`` for an attribute written ``"A vs B"`` (two of a classifier's outputs), else None."""
    if not isinstance(attribute, str) or PAIR_SEPARATOR not in attribute:
        return None
    a, b = (part.strip() for part in attribute.split(PAIR_SEPARATOR, 1))
    if not a or not b or a == b:
        raise CycleEncodingError(f"a pair attribute is 'A vs B' with two different outputs, got {attribute!r}")
    return a, b


def as_scorer(
    classifier: Any, attribute: int | str | None = None, device: str | torch.device = "cpu", labels: bool = False
) -> Scorer:
    """A function ``images -> scores [B]`` from a classifier file (or a shipped classifier's name), an
    AttributeClassifier, any callable returning ``[B]`` or ``[B, K]`` (column ``attribute`` of the latter, by number
    or, for AttributeClassifiers, by name), or the name of a measure in ``MEASURES`` (``"brightness"``).

    ``attribute="A vs B"`` (two outputs): the score is ``logit_A - logit_B``; with ``labels=True`` it is the class
    label instead: 1 where the classifier's top class is A, 0 where it is B, NaN for images of any other class (the
    InterFaceGAN boundary between two classes is trained on the images of those two classes only)."""
    if isinstance(classifier, str) and classifier in MEASURES and not Path(classifier).exists():
        fn, name = MEASURES[classifier]
        if attribute not in (None, 0, "0") or labels:
            raise CycleEncodingError(f"{classifier} is a measure with one score per image; no attribute can be chosen")

        def measure(images: torch.Tensor) -> torch.Tensor:
            return fn(images)

        measure.name = name  # type: ignore[attr-defined]
        return measure
    if isinstance(classifier, (str, Path)):
        classifier = load_classifier(classifier, device)
    if not callable(classifier):
        raise CycleEncodingError(f"a classifier must be a file or a callable, got {type(classifier).__name__}")
    outputs = getattr(classifier, "outputs", None)
    pair = parse_pair(attribute)
    if labels and pair is None:
        raise CycleEncodingError("class labels need a pair attribute 'A vs B'")

    def columns(out: torch.Tensor) -> torch.Tensor:
        if out.ndim != 2:
            raise CycleEncodingError(f"a pair attribute needs [B, K] scores, got {list(out.shape)}")
        ia, ib = (attribute_index(outputs, c, out.shape[1]) for c in pair)  # type: ignore[union-attr]
        if not labels:
            return (out[:, ia] - out[:, ib]).float()
        top = out.argmax(1)
        nan = torch.full((out.shape[0],), float("nan"), device=out.device)
        return torch.where(top == ia, torch.ones_like(nan), torch.where(top == ib, torch.zeros_like(nan), nan))

    @torch.no_grad()
    def score(images: torch.Tensor) -> torch.Tensor:
        out = classifier(images)
        out = torch.as_tensor(out)
        if pair is not None:
            return columns(out)
        if out.ndim == 2 and out.shape[1] == 1 and attribute in (None, 0, "0"):
            return out[:, 0].float()
        if out.ndim == 1:
            if attribute not in (None, 0, "0"):
                raise CycleEncodingError("the classifier gives one score per image; no attribute can be chosen")
            return out.float()
        if out.ndim != 2:
            raise CycleEncodingError(f"a classifier must return [B] or [B, K] scores, got {list(out.shape)}")
        return out[:, attribute_index(outputs, attribute, out.shape[1])].float()

    score.name = getattr(classifier, "name", type(classifier).__name__)  # type: ignore[attr-defined]
    return score


def scorer_name(scorer: Any, attribute: int | str | None = None) -> str:
    base = getattr(scorer, "name", None) or getattr(scorer, "__name__", None) or type(scorer).__name__
    if attribute is None:
        return base
    pair = parse_pair(attribute)
    return f"{base}, logit {pair[0]} - logit {pair[1]}" if pair else f"{base}, output {attribute}"


def inspect_classifier(path: Path, container: str) -> dict[str, Any] | None:
    """``cycle-encoding info`` for classifier files."""
    h = native_header_of_kind(path, container, CLASSIFIER_KIND)
    if h is None:
        return None
    return {
        "format": "cycle-encoding",
        "network": "attribute classifier",
        "architecture": h.get("config", {}),
        "provenance": h.get("provenance", {}),
        "holds": [CLASSIFIER_KIND],
    }
