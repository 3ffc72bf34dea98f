"""``cycle-encoding curves``: training runs' curves (generator FD, encoder validation losses) with a plateau verdict."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..report.curves import curves_report, format_table
from .common import add_command, comma_list, print_json


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "curves", cmd_curves,
        help="draw training runs' curves and say whether each one reached a plateau",
        description="Read training runs' log.jsonl (train-generator runs with --metric-every: the classifier FD and "
        "the smallest class share; train-encoder runs: the validation losses, per phase of constant stage), draw "
        "one panel per measure with the runs overlaid (encoder stage changes as dashed lines), and print per run (and "
        "phase) the best value, its step and the verdict of the trainers' plateau rule (--patience, "
        "--min-improvement; docs/TRAINING.md).",
    )  # fmt: skip
    p.add_argument(
        "runs", nargs="+", type=Path, metavar="RUN", help="a run folder or its log.jsonl (several: overlaid)"
    )
    p.add_argument("--out", type=Path, default=None, metavar="FILE.png", help="write the figure here (PNG)")
    p.add_argument(
        "--labels", default=None, metavar="A,B,...", help="the runs' names in the legend (default: folder names)"
    )
    p.add_argument("--measures", default=None, metavar="M,N,...",
                   help="the curves to draw and judge (generator runs: fd, min_class_share; encoder runs: weighted, l2, "
                   "perceptual, identity; default: fd,min_class_share or weighted,l2,perceptual)")  # fmt: skip
    p.add_argument("--patience", type=int, default=3, metavar="K",
                   help="evaluations in a row without improvement that make a plateau (default 3)")  # fmt: skip
    p.add_argument("--min-improvement", type=float, default=0.02, metavar="M",
                   help="the relative improvement on the best that counts (default 0.02: 2%%)")  # fmt: skip
    p.add_argument("--dpi", type=int, default=100, help="figure resolution (default 100; 4.8 x 3.4 inches a panel)")
    p.add_argument("--json", action="store_true", help="print the runs and verdicts as JSON instead of the table")


def cmd_curves(args: argparse.Namespace) -> int:
    rep = curves_report(args.runs, args.out, comma_list(args.labels), comma_list(args.measures), args.patience,
                        args.min_improvement, args.dpi)  # fmt: skip
    if args.json:
        print_json(rep)
        return 0
    print(format_table(rep["rows"]))
    for r in rep["runs"]:
        if r["stop"]:
            print(f"{r['label']}: stopped early at step {r['stop']['step']}: {r['stop']['reason']}")
        for res in r["resumes"]:
            changed = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in res["changed"].items())
            print(f"{r['label']}: resumed at step {res['step']} with {changed}")
        if r["stage_changes"]:
            changes = ", ".join(f"{s} (stage {st})" for s, st in r["stage_changes"])
            print(f"{r['label']}: stage changes at steps {changes} (from {r['stage_changes_from']})")
    print(f"rule: plateau when {rep['patience']} evaluations in a row miss the best before them by less than "
          f"{100 * rep['min_improvement']:g}%")  # fmt: skip
    if rep["figure"]:
        print(f"wrote {rep['figure']}")
    return 0
