"""Argument helpers shared by the command modules."""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..checkpoints.run_folder import check_output
from ..config import load_config_file
from ..errors import CycleEncodingError
from ..ops import resolve_precision
from ..progress import PROGRESS_MODES
from ..utils import resolve_device

EXIT_SOME_FAILED = 3  # some images (frames, pairs, edits) failed or were left out, and are listed; the others were done


def add_command(
    sub: argparse._SubParsersAction, common: argparse.ArgumentParser, name: str, func: Callable, **texts: str
) -> argparse.ArgumentParser:
    """The command ``name``, run by ``func(args)``, with the options every command takes (``common``)."""
    p = sub.add_parser(name, parents=[common], **texts)
    p.set_defaults(func=func)
    return p


def comma_list(text: str | None) -> list[str] | None:
    """``a, b,c`` as ``["a", "b", "c"]`` (blank entries skipped); None stays None."""
    return None if text is None else [x.strip() for x in text.split(",") if x.strip()]


def add_progress_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--progress", choices=PROGRESS_MODES, default="auto",
                   help="auto (default): bars with totals and time left on a terminal, one line per finished unit of "
                   "work otherwise (a log stays free of redrawn bars); bar; lines; none")  # fmt: skip


def add_option_table(
    p: argparse.ArgumentParser, options: list[tuple[str, str, Any, str]], metavars: bool = False
) -> None:
    """A table of ``(flag, dest, type, help)`` options, all None unless given (a dotted dest: docs/INTERNALS.md,
    "cycle_encoding.cli"); the type ``store_true`` / ``store_false`` makes a switch; ``metavars``: N, X or VALUE."""
    for flag, dest, kind, hlp in options:
        if kind in ("store_true", "store_false"):
            p.add_argument(flag, dest=dest.replace(".", "__"), action=kind, default=None, help=hlp)
        else:
            metavar = {int: "N", float: "X"}.get(kind, "VALUE") if metavars else None
            p.add_argument(flag, dest=dest.replace(".", "__"), type=kind, default=None, metavar=metavar, help=hlp)


def add_classifier_args(p: argparse.ArgumentParser, use: str, pair: str) -> None:
    """--classifier and --attribute (``directions train``, ``edit``): ``use``, what the scores serve; ``pair``, what
    an 'A vs B' attribute means there."""
    p.add_argument("--classifier", default=None,
                   help="attribute classifier (own .safetensors, kind classifier, or a shipped name such as fmnist-eval or "
                   f"fmnist-features) or a measure (brightness){use}")  # fmt: skip
    p.add_argument("--attribute", default=None,
                   help=f"the classifier's output to read: a name or a number (default 0), or 'A vs B': {pair}")  # fmt: skip


def add_device_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N (default: auto)")


def resolve_precision_option(value: Any, device: Any) -> tuple[str, str]:
    """``--precision`` as the commands take it (``auto``, their default, or fp32 / bf16) resolved for ``device``
    (``auto`` / None: the device the command will use): ``(fp32 | bf16, why)``; a bad value is a clear error."""
    try:
        return resolve_precision("auto" if value is None else value, resolve_device(device))
    except ValueError as e:  # ops checks the value: one list of the choices
        raise CycleEncodingError(f"--{e}") from None


def print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


def add_json_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of text")


def print_result(obj: dict[str, Any], as_json: bool) -> None:
    """A command's result: ``key: value`` text lines, or JSON with ``--json``."""
    if as_json:
        print_json(obj)
    else:
        print("\n".join(text_lines(obj)))


def text_lines(info: dict, indent: int = 0) -> list[str]:
    """A nested mapping as indented ``key: value`` lines (what commands print unless asked for --json)."""
    lines = []
    pad = "  " * indent
    for k, v in info.items():
        if isinstance(v, dict):
            if all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) > 6:
                lines.append(f"{pad}{k}: " + json.dumps(v))
            else:
                lines += [f"{pad}{k}:", *text_lines(v, indent + 1)]
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v):
            lines.append(f"{pad}{k}: {v}")
        elif isinstance(v, list):
            lines += [f"{pad}{k}:", *(f"{pad}  - {x}" for x in v)]
        else:
            lines.append(f"{pad}{k}: {v}")
    return lines


_NOT_OPTIONS = ("func", "debug", "max_pixels", "config", "resume", "dry_run", "command", "progress")


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


def check_output_folder(path: str | Path, option: str, shown: str | Path | None = None) -> None:
    """Before any work: ``path`` can be made or written as a folder; else one clear error naming ``option`` (and
    ``shown``, the path the user gave, when that is a file inside ``path``)."""
    p = Path(path)
    label = f"{option} {shown if shown is not None else p}"
    if p.exists() and not p.is_dir():
        raise CycleEncodingError(f"{label}: {p} exists and is not a folder")
    q = p.absolute()  # the nearest existing folder: where the new ones would be made
    while not q.exists() and q != q.parent:
        q = q.parent
    if not q.is_dir():
        raise CycleEncodingError(f"{label}: {q} is a file, so no folder can be made under it")
    if not os.access(q, os.W_OK | os.X_OK):
        raise CycleEncodingError(f"{label}: cannot write in {q} (permission denied)")


def check_output_file(path: str | Path, option: str, inputs: Any = (), allowed: Any = ()) -> None:
    """Before any work: the file ``path`` can be written (its folder made), and is neither one of the command's
    ``inputs`` nor a file of an inversion run (``check_output``); else one clear error naming ``option``."""
    check_output(path, option, inputs, allowed)
    p = Path(path)
    if p.is_dir():
        raise CycleEncodingError(f"{option} {p}: is a folder, not a file")
    if p.exists() and not os.access(p, os.W_OK):
        raise CycleEncodingError(f"{option} {p}: cannot write this file (permission denied)")
    check_output_folder(p.parent, option, shown=p)
