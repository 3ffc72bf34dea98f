"""Readers for the checkpoint files users bring, and the project's own format."""

from .common import atomic_torch_save, atomic_write, check_state_dict, sniff, torch_load
from .generator import (
    GeneratorWeights,
    build_generator,
    convert_generator,
    load_generator,
    read_generator_weights,
    save_generator,
)
from .native import NativeFile, read_native, read_native_header, save_native
from .rosinality import export_rosinality, infer_generator_config

__all__ = [
    "GeneratorWeights",
    "NativeFile",
    "atomic_torch_save",
    "atomic_write",
    "build_generator",
    "check_state_dict",
    "convert_generator",
    "export_rosinality",
    "infer_generator_config",
    "load_generator",
    "read_generator_weights",
    "read_native",
    "read_native_header",
    "save_generator",
    "save_native",
    "sniff",
    "torch_load",
]
