"""The ``cycle-encoding`` command line: argument parsing and printing only; the work is in the library.
Design notes: docs/INTERNALS.md, "cycle_encoding.cli"."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import CycleEncodingError
from ..ops import keep_freed_memory
from ..utils import DEFAULT_MAX_PIXELS, set_max_pixels

COMMAND_MODULES = [
    "generator",  # info, generate, convert
    "export",
    "faces",  # align
    "evaluate",
    "schedule",
    "train",  # train-generator, train-encoder, train-classifier
    "invert",
    "directions",
    "edit",
    "video",  # edit a video frame by frame
    "report",
    "curves",
    "ui",  # the browser editor (optional extra: gradio)
]

EXIT_USER_ERROR = 2
EXIT_INTERNAL_ERROR = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="cycle-encoding",
        description="Cycle Encoding of a StyleGAN encoder: train, invert, tune, edit and evaluate (CPU or GPU).",
    )
    # options of every command, before or after the command's name: the command's copies (common) have no default,
    # so they cannot reset a value given before it
    common = argparse.ArgumentParser(add_help=False)
    for p, debug, pixels in ((parser, False, DEFAULT_MAX_PIXELS), (common, argparse.SUPPRESS, argparse.SUPPRESS)):
        p.add_argument("--debug", action="store_true", default=debug, help="show the full traceback on errors")
        p.add_argument("--max-pixels", type=int, metavar="N", default=pixels,
                       help=f"refuse images of more pixels than N before decoding them (default {DEFAULT_MAX_PIXELS:,})")  # fmt: skip
    parser.add_argument("--version", action="version", version=f"cycle-encoding {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(sub, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    if argv is None and os.environ.get("CYCLE_ENCODING_MALLOC", "keep") != "system":
        # launched as the program: freed memory stays in the process (the 1024-px generator forward ~2x faster,
        # docs/PERFORMANCE.md); CYCLE_ENCODING_MALLOC=system opts out
        keep_freed_memory()
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        set_max_pixels(args.max_pixels)
        return int(args.func(args) or 0)
    except CycleEncodingError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        sys.stderr.close()
        return 0
    except Exception as e:
        if args.debug:
            raise
        if isinstance(e, OSError) and e.filename and e.strerror:  # a full disk, a size limit: the file named
            print(f"error: {e.filename}: {e.strerror}", file=sys.stderr)
            return EXIT_USER_ERROR
        print(f"error: {type(e).__name__}: {e} (run with --debug for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL_ERROR


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
