"""cycle-encoding: Cycle Encoding of a StyleGAN encoder (Mao et al., ACM MM 2022), in plain PyTorch.

Public API (more arrives with each stage of the method):

>>> import cycle_encoding as ce
>>> G = ce.load_generator("stylegan2-ffhq-config-f.pt", device="cpu")   # rosinality, NVIDIA .pkl, e4e, own
>>> ws = G.mapping(torch.randn(4, G.z_dim), truncation=0.7)             # [4, G.num_ws, 512]
>>> images = G.synthesis(ws, noise_mode="const")                         # [4, 3, H, W] in [-1, 1]
>>> ce.to_pil(images[0]).save("sample.png")                             # and ce.from_pil(PIL image) back
>>> res = ce.Inverter(G, "fmnist-encoder", stages=("encoder", "tune")).invert("photo.png")  # path, PIL, array
>>> res.to_pil("tune")                                                   # the tuned reconstruction, a PIL image
>>> ce.edit_video("clip.mp4", "out/", "sefa", G, "fmnist-encoder", strengths=[2], align="frame")  # out/edit_2.mp4
"""

import os as _os
import sys as _sys

# waiting OpenMP threads sleep unless the user chose otherwise; set before torch's first import, when libgomp reads it
# (why: docs/INTERNALS.md, "cycle_encoding")
if "torch" not in _sys.modules:
    _os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .checkpoints import convert_generator, export_rosinality, load_generator, save_generator
from .checkpoints.encoder import load_encoder, save_encoder
from .checkpoints.latents import load_latents, save_latents, save_projected_w
from .data.images import from_pil, image_tensor
from .editing.editor import Editor
from .editing.video import edit_video
from .errors import CheckpointError, CycleEncodingError
from .inversion import Inverter
from .networks.discriminator import Discriminator, DiscriminatorConfig
from .networks.encoder import Encoder4Editing, EncoderConfig
from .networks.stylegan2 import Generator, GeneratorConfig
from .utils import to_pil
from .version import __version__

__all__ = [
    "CheckpointError",
    "CycleEncodingError",
    "Discriminator",
    "DiscriminatorConfig",
    "Editor",
    "Encoder4Editing",
    "EncoderConfig",
    "Generator",
    "GeneratorConfig",
    "Inverter",
    "__version__",
    "convert_generator",
    "edit_video",
    "export_rosinality",
    "from_pil",
    "image_tensor",
    "load_encoder",
    "load_generator",
    "load_latents",
    "save_encoder",
    "save_generator",
    "save_latents",
    "save_projected_w",
    "to_pil",
]

# modules that register readers for `cycle-encoding info` (checkpoints.inspect) that checkpoints does not import
from .checkpoints import delta as _delta  # noqa: F401
from .editing import directions as _directions  # noqa: F401
