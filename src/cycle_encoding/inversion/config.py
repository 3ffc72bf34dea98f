"""The inversion's options: which stages run, in which order, with which networks and settings (``InversionConfig``),
and ``make_config`` to build them from a mapping (a YAML file's) and keyword overrides."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..config import check_at_least, check_one_of, from_mapping, to_dict
from .pivot import OFFSETS
from .project import ProjectConfig
from .refine import RefineConfig
from .tune import TuneConfig

STAGES = ("encoder", "refine", "project", "tune")
TUNE_MODES = ("each", "shared")
PIVOT_STAGES = ("encoder", "refine", "project")


@dataclass(frozen=True)
class InversionConfig:
    """Everything that decides an inversion's result (defaults: the paper's "Method 2" with PTI's tuning)."""

    stages: tuple[str, ...] = ("encoder", "refine", "tune")
    offsets: str = "all"  # encoder offsets: "all" (the authors' inference) or "trained" (the stage training ended in)
    # None: the network the encoder was trained with (its file records it), else lpips-alex
    perceptual: str | None = None
    lpips_backbone: str | None = None  # None: looked up (checkpoints.locate), first the file the encoder recorded
    # auto: the network the encoder was trained with (its file records it), else the domain's
    # (losses.identity.identity_default), else none
    identity: str = "auto"
    identity_weights: str | None = None
    train_data: str | None = None  # the encoder's training images (default: what the encoder file records)
    align: bool = False  # FFHQ-align each photo's largest face at G's resolution first (dlib 68 landmarks)
    seed: int = 0
    save_delta: bool = True
    delta_level: int = 1  # zlib level of the stored generator change (1: fast; 9 gains ~2%)
    # images tuned at once over a folder or list (tune_batch.py: each its own weights, one batched pass; the same
    # result as one by one within float rounding); 1: one by one with pivotal_tune, the authors' loop
    tune_batch: int = 1
    # "each": every image its own tuned generator; "shared": ONE generator tuned on all the images of a run (PTI's
    # multi-ID mode, tune_shared.py), its state saved every tune_save_every rounds so a killed run resumes
    tune_mode: str = "each"
    tune_save_every: int = 10
    refine: RefineConfig = field(default_factory=RefineConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("no stages given (choose from encoder, refine, project, tune)")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice: {', '.join(stages)}")
        if list(stages) != sorted(stages, key=STAGES.index):
            raise ValueError(f"stages run in the order {', '.join(STAGES)}; got {', '.join(stages)}")
        if "tune" in stages and not any(s in PIVOT_STAGES for s in stages):
            raise ValueError("stage 'tune' needs a pivot: list encoder, refine or project before it")
        check_one_of(self, offsets=OFFSETS, tune_mode=TUNE_MODES)
        check_at_least(self, tune_batch=1, tune_save_every=1)  # their types: from_mapping (make_config)
        if self.tune_mode == "shared" and self.tune_batch > 1:
            raise ValueError("tune_batch does not apply to shared tuning (one generator for all images)")
        if not 0 <= self.delta_level <= 9:
            raise ValueError("delta_level is a zlib level, 0-9")
        object.__setattr__(self, "stages", stages)

    @property
    def needs_encoder(self) -> bool:
        return "encoder" in self.stages or "refine" in self.stages

    @property
    def needs_perceptual(self) -> bool:
        s = self.stages
        return (
            ("refine" in s and self.refine.perceptual_lambda > 0)
            or ("project" in s and self.project.perceptual_lambda > 0 and not self.project.perceptual)
            or "tune" in s
        )

    @property
    def needs_identity(self) -> bool:
        return "refine" in self.stages and self.refine.identity_lambda > 0


def make_config(config: InversionConfig | Mapping[str, Any] | None = None, **overrides: Any) -> InversionConfig:
    """An InversionConfig from a config, a mapping (e.g. a YAML file's) and/or keyword overrides (nested as dicts)."""
    if isinstance(config, InversionConfig):
        data = to_dict(config)
    else:
        data = dict(config or {})
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(data.get(k), Mapping):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return from_mapping(InversionConfig, data, "inversion options")
