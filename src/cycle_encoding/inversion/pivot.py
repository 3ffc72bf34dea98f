"""Stage ``encoder``: the pivot straight from the encoder, E(x) in eval mode, with all offsets or the trained stage's.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.pivot"."""

from __future__ import annotations

import torch

from ..errors import CycleEncodingError
from ..networks.encoder import Encoder4Editing

OFFSETS = ("all", "trained")


def resolve_stage(E: Encoder4Editing, offsets: str) -> int:
    """The encoder stage that ``offsets`` ("all" or "trained") means for ``E``."""
    if offsets == "all":
        return E.max_stage
    if offsets == "trained":
        if E.trained_stage is None:
            raise CycleEncodingError(
                "offsets 'trained' asked for, but the encoder file does not record the stage its training ended in "
                "(e4e-family files never do): use offsets 'all'"
            )
        return int(E.trained_stage)
    raise CycleEncodingError(f"offsets must be one of {', '.join(OFFSETS)}, got {offsets!r}")


@torch.no_grad()
def encoder_pivot(E: Encoder4Editing, images: torch.Tensor, offsets: str = "all") -> torch.Tensor:
    """E(x) in eval mode with the offsets asked for: images ``[B, C, H, W]`` in [-1, 1] (any size: the encoder
    resizes them) -> codes ``[B, N, w_dim]``; the encoder's mode and stage are restored afterwards."""
    stage, was_training = E.stage, E.training
    try:
        E.stage = resolve_stage(E, offsets)
        E.eval()
        return E(images.to(E.latent_avg.device)).detach()
    finally:
        E.stage = stage
        E.train(was_training)
