"""``cycle-encoding schedule``: print a training schedule's phase table, or its stage and weights at given steps."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..training.schedule import PRESETS, get_schedule, save_schedule
from ..utils import parse_int_list
from .common import add_command


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "schedule", cmd_schedule,
        help="print the cycle schedule (phases, or stage and loss weights at given steps)",
        description="Print a training schedule: its phase table, or the stage and the delta / adversarial weights at "
        "the steps given with --at. A schedule is a preset or a YAML/JSON file of phases (--save writes one to edit).",
    )  # fmt: skip
    src = p.add_mutually_exclusive_group()
    src.add_argument("--preset", choices=PRESETS, default=None, help="a built-in schedule (default: paper)")
    src.add_argument("--schedule", type=Path, default=None, metavar="FILE", help="a schedule file (YAML or JSON)")
    p.add_argument("--total-steps", type=int, default=None, metavar="N",
                   help="rescale the schedule to N steps, same proportions")  # fmt: skip
    p.add_argument("--num-ws", type=int, default=18, metavar="N",
                   help="style inputs of the generator (18 at 1024, 14 at 256, 8 at 32); offsets = N - 1 (default 18)")  # fmt: skip
    p.add_argument("--at", default=None, metavar="STEPS", help="steps to evaluate, e.g. 21999,22000 or 0-10")
    p.add_argument("--json", action="store_true", help="print JSON lines (one per step, or one per phase)")
    p.add_argument("--save", type=Path, default=None, metavar="FILE",
                   help="also write the (rescaled) schedule to FILE (.json: JSON, else YAML)")  # fmt: skip


def cmd_schedule(args: argparse.Namespace) -> int:
    sched = get_schedule(args.preset, args.schedule, args.total_steps)
    states = [sched.at(s, args.num_ws) for s in parse_int_list(args.at)] if args.at is not None else None
    if args.save is not None:
        save_schedule(sched, args.save)
    if states is not None:
        for st in states:
            text = (f"step {st.step}: phase {st.phase!r}, stage {st.stage}/{st.num_offsets}, delta weight "
                    f"{st.delta_weight:.6g}, adversarial weight {st.adversarial_weight:.6g}")  # fmt: skip
            print(json.dumps(st.to_dict()) if args.json else text)
    elif args.json:
        for row in sched.table(args.num_ws):
            print(json.dumps(row))
    else:
        print(sched.format_table(args.num_ws))
    if args.save is not None and not args.json:
        print(f"wrote {args.save}")
    return 0
