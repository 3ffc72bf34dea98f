"""Readers for the checkpoint files users bring, and the project's own format."""

from .common import sniff
from .generator import convert_generator, load_generator, save_generator
from .native import read_native_header
from .rosinality import export_rosinality

__all__ = [
    "convert_generator",
    "export_rosinality",
    "load_generator",
    "read_native_header",
    "save_generator",
    "sniff",
]
