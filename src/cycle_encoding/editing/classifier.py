"""Attribute classifiers the user gives (a callable or a classifier file), as scorers: to label generated samples
(InterFaceGAN training) and to measure edit success.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.classifier"."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.classifier import load_classifier
from ..errors import CycleEncodingError
from ..networks.classifier import attribute_index

Scorer = Callable[[torch.Tensor], torch.Tensor]

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
        measure = partial(fn)  # a wrapper to name: the module-level function stays unchanged
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
        out = torch.as_tensor(classifier(images))
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
