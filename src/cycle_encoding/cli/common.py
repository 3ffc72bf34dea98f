"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")


_NOT_OPTIONS = ("func", "debug", "config", "resume", "dry_run", "command")


def option_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The options given on the command line (None = not given); ``a__b`` dests become nested ``{a: {b: ...}}``."""
    out: dict[str, Any] = {}
    for key, value in vars(args).items():
        if value is None or key in _NOT_OPTIONS:
            continue
        if "__" in key:
            head, tail = key.split("__", 1)
            out.setdefault(head, {})[tail] = value
        else:
            out[key] = value
    return out


def options_from(args: argparse.Namespace, required: tuple[str, ...] = ()) -> dict[str, Any]:
    """Options from ``--config FILE`` (if given) overridden by the command line; ``required`` keys must be set."""
    from ..config import load_config_file
    from ..errors import CycleEncodingError

    data = load_config_file(args.config) if getattr(args, "config", None) else {}
    for k, v in option_overrides(args).items():
        if isinstance(v, dict):
            data.setdefault(k, {}).update(v)
        else:
            data[k] = v
    for needed in required:
        if needed not in data:
            raise CycleEncodingError(f"--{needed} is required (or give it in --config)")
    return data
