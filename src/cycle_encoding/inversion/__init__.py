"""Inversion: the pivot from the encoder, its regularized refinement, PTI's W projector, pivotal tuning, the tuned
generator stored as a compact change, and the pipeline that runs them over many images (resumable, ``torchrun``).

>>> from cycle_encoding.inversion import Inverter
>>> inv = Inverter("G.safetensors", "checkpoint.pt", stages=("encoder", "refine", "tune"), perceptual="dlib-face")
>>> result = inv.invert("face.png")             # pivots, reconstructions, metrics, losses, the tuned G
>>> summary = inv.run("faces/", "runs/inv1")    # a folder, into a run folder
>>> shared = Inverter("G.safetensors", "E.safetensors", stages=("encoder", "tune"), tune_mode="shared")
>>> results = shared.invert_many(["a.png", "b.png"])  # ONE generator tuned on both: results[0].generator
"""

from ..checkpoints.delta import DeltaInfo, load_generator_delta, save_generator_delta, weights_sha256
from ..losses.networks import LossNetworks, build_loss_networks
from .config import STAGES, InversionConfig, make_config
from .inverter import Inverter
from .pivot import encoder_pivot
from .project import ProjectConfig, ProjectResult, project_w
from .refine import EncoderSource, RefineConfig, RefineResult, RegularizedRefiner, load_encoder_source
from .result import InversionResult
from .targets import list_targets
from .tune import TuneConfig, TuneResult, pivotal_tune
from .tune_shared import SharedTuneResult, pivotal_tune_shared

__all__ = [
    "STAGES",
    "DeltaInfo",
    "EncoderSource",
    "InversionConfig",
    "InversionResult",
    "Inverter",
    "LossNetworks",
    "ProjectConfig",
    "ProjectResult",
    "RefineConfig",
    "RefineResult",
    "RegularizedRefiner",
    "SharedTuneResult",
    "TuneConfig",
    "TuneResult",
    "build_loss_networks",
    "encoder_pivot",
    "list_targets",
    "load_encoder_source",
    "load_generator_delta",
    "make_config",
    "pivotal_tune",
    "pivotal_tune_shared",
    "project_w",
    "save_generator_delta",
    "weights_sha256",
]
