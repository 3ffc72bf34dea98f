"""Losses by name: perceptual distances (LPIPS or a named feature network) and identity similarities
(ArcFace, MoCo, dlib face embedder). Registries let later code add more (``register_perceptual``,
``register_identity``)."""

from .identity import (
    ArcFaceEmbedder,
    IdentitySimilarity,
    build_identity,
    identity_names,
    register_identity,
    unregister_identity,
)
from .perceptual import FeatureMapDistance, build_perceptual, perceptual_names, register_perceptual

__all__ = [
    "ArcFaceEmbedder",
    "FeatureMapDistance",
    "IdentitySimilarity",
    "build_identity",
    "build_perceptual",
    "identity_names",
    "perceptual_names",
    "register_identity",
    "register_perceptual",
    "unregister_identity",
]
