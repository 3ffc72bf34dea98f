"""``cycle-encoding report``: an HTML page and a PNG grid of an inversion run (the work is in ``report/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import CycleEncodingError
from ..report.html import report_page, write_report
from .common import EXIT_SOME_FAILED, add_command, check_output_file


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "report", cmd_report,
        help="write an HTML report and a PNG grid of an inversion run (images, edits, metrics, timings, losses)",
        description="Writes RUN_DIR/report.html (one self-contained page: images inlined, no network, no script), "
        "RUN_DIR/report.png (a row per image: input, reconstruction after each stage, edits) and RUN_DIR/report.json "
        "(the numbers shown). The page holds the metrics per stage and the networks behind them, the edits and their "
        "measures, timings, loss plots and the run's command (docs/USAGE.md, The report). Image folders or edits that "
        "cannot be read, or that name files outside the run folder, are left out and listed (exit status 3).",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an inversion run folder")
    p.add_argument("--out", type=Path, default=None, help="the HTML file to write (default RUN_DIR/report.html)")
    p.add_argument("--link-images", action="store_true",
                   help="link the run's image files by relative path instead of inlining them (smaller page; it "
                        "must stay beside the run)")  # fmt: skip
    p.add_argument("--max-images", type=int, default=None, help="show at most N images (the tables use all)")
    p.add_argument("--no-png", action="store_true", help="do not write the PNG grid")
    p.add_argument("--no-plots", action="store_true", help="leave out the loss plots")


def cmd_report(args: argparse.Namespace) -> int:
    if args.max_images is not None and args.max_images < 1:
        raise CycleEncodingError(f"--max-images must be 1 or more, got {args.max_images}")
    page = report_page(args.run_dir, args.out)
    for f in (page, page.with_suffix(".json"), *([] if args.no_png else [page.with_suffix(".png")])):
        check_output_file(f, "--out" if args.out is not None else "RUN_DIR")  # never over a run's own files

    files = write_report(
        args.run_dir, args.out, inline=not args.link_images, max_images=args.max_images, png=not args.no_png,
        plots=not args.no_plots,
    )  # fmt: skip
    print(f"report: {files.html}")
    if files.png is not None:
        print(f"grid:   {files.png}")
    print(f"data:   {files.json}")
    for u in files.unreadable:
        print(f"left out: {u['name']}: {u['reason']}", file=sys.stderr)
    return EXIT_SOME_FAILED if files.unreadable else 0
