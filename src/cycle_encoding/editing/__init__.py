"""Editing: InterFaceGAN (apply and train), GANSpace, SeFa, edits of an inversion run, editability measures.

>>> from cycle_encoding.editing import load_directions, sefa_directions
>>> ds = load_directions("age.pt")                      # InterFaceGAN [1, 512], GANSpace dict, own .safetensors
>>> edited = ds.apply(pivot, component=0, strength=3.0, layers=range(0, 8))
>>> sefa = sefa_directions(G, layers=range(0, 6), components=5)
>>> ed = Editor.open_run("out/demo/run", directions=["coat-pullover.safetensors"])   # the browser editor's engine
>>> ed.render({"coat-pullover": 3.0, "sefa:0": -2.0}).save("edit.png")
"""

from ..checkpoints.classifier import load_classifier, save_classifier
from ..networks.classifier import AttributeClassifier, ClassifierConfig
from .classifier import as_scorer
from .directions import (
    DirectionSet,
    interfacegan_direction,
    load_directions,
    parse_layers,
    parse_strengths,
    save_any,
    save_directions,
    save_ganspace,
    save_interfacegan,
)
from .editor import Editor
from .ganspace import ganspace_pca, sample_mapping
from .interfacegan import encode_labelled_folder, read_labels_csv, sample_and_score, train_boundary
from .measures import (
    Preservation,
    attribute_changes,
    build_preservation,
    direction_lec,
    latent_editing_consistency,
    success_summary,
)
from .sefa import sefa_directions, style_consumers

__all__ = [
    "AttributeClassifier",
    "ClassifierConfig",
    "DirectionSet",
    "Editor",
    "Preservation",
    "as_scorer",
    "attribute_changes",
    "build_preservation",
    "direction_lec",
    "encode_labelled_folder",
    "ganspace_pca",
    "interfacegan_direction",
    "latent_editing_consistency",
    "load_classifier",
    "load_directions",
    "parse_layers",
    "parse_strengths",
    "read_labels_csv",
    "sample_and_score",
    "sample_mapping",
    "save_any",
    "save_classifier",
    "save_directions",
    "save_ganspace",
    "save_interfacegan",
    "sefa_directions",
    "style_consumers",
    "success_summary",
    "train_boundary",
]
