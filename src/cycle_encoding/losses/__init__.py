"""Losses by name: perceptual distances (LPIPS or a named feature network) and identity similarities
(ArcFace, MoCo, dlib face embedder). Registries let later code add more (``register_perceptual``,
``register_identity``)."""

from .identity import (
    ArcFaceEmbedder,
    IdentitySimilarity,
    MocoEmbedder,
    build_identity,
    identity_names,
    register_identity,
    unregister_identity,
)
from .perceptual import (
    FeatureMapDistance,
    LPIPSDistance,
    PerceptualDistance,
    build_perceptual,
    perceptual_names,
    register_perceptual,
    unregister_perceptual,
)

__all__ = [
    "ArcFaceEmbedder",
    "FeatureMapDistance",
    "IdentitySimilarity",
    "LPIPSDistance",
    "MocoEmbedder",
    "PerceptualDistance",
    "build_identity",
    "build_perceptual",
    "identity_names",
    "perceptual_names",
    "register_identity",
    "register_perceptual",
    "unregister_identity",
    "unregister_perceptual",
]
