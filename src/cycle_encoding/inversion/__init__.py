"""Inversion: the pivot from the encoder, its regularized refinement, PTI's W projector, pivotal tuning, the tuned
generator stored as a compact change, and the pipeline that runs them over many images (resumable, ``torchrun``).

>>> from cycle_encoding.inversion import Inverter
>>> inv = Inverter("G.safetensors", "checkpoint.pt", stages=("encoder", "refine", "tune"), perceptual="dlib-face")
>>> result = inv.invert("face.png")             # pivots, reconstructions, metrics, losses, the tuned G
>>> summary = inv.run("faces/", "runs/inv1")    # a folder, into a run folder
>>> shared = Inverter("G.safetensors", "E.safetensors", stages=("encoder", "tune"), tune_mode="shared")
>>> results = shared.invert_many(["a.png", "b.png"])  # ONE generator tuned on both: results[0].generator
"""

from ..checkpoints.delta import load_generator_delta, save_generator_delta
from ..losses.networks import build_loss_networks
from .config import make_config
from .inverter import Inverter
from .pivot import encoder_pivot
from .project import ProjectConfig, project_w
from .refine import RefineConfig, RegularizedRefiner, load_encoder_source
from .targets import list_targets
from .tune import TuneConfig, pivotal_tune

__all__ = [
    "Inverter",
    "ProjectConfig",
    "RefineConfig",
    "RegularizedRefiner",
    "TuneConfig",
    "build_loss_networks",
    "encoder_pivot",
    "list_targets",
    "load_encoder_source",
    "load_generator_delta",
    "make_config",
    "pivotal_tune",
    "project_w",
    "save_generator_delta",
]
