"""Attribute classifiers (``convnet``, ``vggbn``, ``resnet50``): outputs score attributes, feature maps serve as
distances. Design notes: docs/INTERNALS.md, "cycle_encoding.networks.classifier"."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ConfigRecord, check_at_least, check_one_of
from ..errors import CycleEncodingError
from ..networks.resnet import ResNet50
from ..ops import FixedMeasure, convert_channels, resize

ARCHS = ("convnet", "vggbn", "resnet50")
SMALL_ARCHS = ("convnet", "vggbn")
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClassifierConfig(ConfigRecord):
    """What is needed to build an attribute classifier (see the design notes)."""

    arch: str = "convnet"
    outputs: tuple[str, ...] = ("attribute",)
    input_size: int = 64
    in_channels: int = 3
    widths: tuple[int, ...] = (32, 64, 128)
    normalize: str = "none"

    def __post_init__(self) -> None:
        check_one_of(self, arch=ARCHS, normalize=("none", "imagenet"))
        if not self.outputs:
            raise ValueError("a classifier needs at least one output")
        if self.in_channels not in (1, 3) or (self.arch == "resnet50" and self.in_channels != 3):
            raise ValueError(f"in_channels must be 1 or 3 (3 for resnet50), got {self.in_channels}")
        check_at_least(self, input_size=8)
        object.__setattr__(self, "outputs", tuple(str(o) for o in self.outputs))
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))


class AttributeClassifier(nn.Module):
    """``forward(images in [-1, 1]) -> logits [B, K]``."""

    def __init__(self, config: ClassifierConfig | None = None, **kwargs: Any) -> None:
        super().__init__()
        self.config = c = config or ClassifierConfig(**kwargs)
        k = len(c.outputs)
        if c.arch in SMALL_ARCHS:
            blocks: list[nn.Module] = []  # convnet: a flat list (keys body.0, body.2, ...); vggbn: one Sequential each
            cin = c.in_channels
            for w in c.widths:
                if c.arch == "convnet":
                    blocks += [nn.Conv2d(cin, w, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
                else:
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
            self.net = ResNet50(num_classes=k)
        self.name = f"{c.arch} classifier ({', '.join(c.outputs)})"

    @property
    def outputs(self) -> tuple[str, ...]:
        return self.config.outputs

    def prepare(self, images: torch.Tensor) -> torch.Tensor:
        c = self.config
        if images.ndim != 4:
            raise CycleEncodingError(f"the classifier takes images [B, C, H, W], got {list(images.shape)}")
        x = resize(convert_channels(images.float(), c.in_channels, "the classifier"), c.input_size)
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


class ClassifierEmbedder(FixedMeasure):
    """``embed(x) -> [B, D]``: a small classifier's penultimate embedding, L2-normalized; frozen, stays in eval."""

    def __init__(self, classifier: AttributeClassifier, name: str | None = None) -> None:
        super().__init__()
        self.classifier = classifier.requires_grad_(False).eval()
        self.name = name or classifier.name

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.classifier.features(x)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.classifier.embed(x), dim=1)


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
