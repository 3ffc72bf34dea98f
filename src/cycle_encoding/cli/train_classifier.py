"""`train-classifier`: train a small Fashion-MNIST classifier (argument parsing only; the loop is in training/)."""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from .common import add_progress_arg, option_overrides, options_from


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "fashion-mnist (default), or fashion-mnist@FOLDER for the idx files in FOLDER"),
    ("--arch", "arch", str, "convnet (default) or vggbn"),
    ("--widths", "widths", _ints, "channel widths of the blocks (default 32,64,128 for convnet, 16,32,64 for vggbn)"),
    ("--seed", "seed", int, "seed of the initialization, shuffling and augmentation (default 0)"),
    ("--epochs", "epochs", int, "epochs over the training set (default 4)"),
    ("--batch-size", "batch_size", int, "batch size (default 128)"),
    ("--lr", "lr", float, "Adam learning rate, decayed to 0 by a cosine (default 2e-3)"),
    ("--shift", "shift", int, "random shift in pixels, each axis (default 2; 0 = none)"),
    ("--threads", "threads", int, "torch CPU threads (default 1)"),
    ("--limit", "limit", int, "train on the first N training images only"),
    ("--test-limit", "test_limit", int, "test on the first N test images only"),
    ("--max-steps", "max_steps", int, "stop after N steps"),
    ("--log-every", "log_every", int, "log every N steps (default 50)"),
    ("--checkpoint-every", "checkpoint_every", int, "write checkpoint.pt every N steps (default 500)"),
    ("--out", "out", str, "folder that receives the numbered run folder (default runs)"),
    ("--name", "name", str, "run folder label (default classifier-ARCH-seedN)"),
    ("--export", "export", str, "also copy the model to this .safetensors path and write NAME-card.md beside it"),
]


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train-classifier",
        parents=[common],
        help="train a small Fashion-MNIST classifier (feature network or evaluation network)",
        description="Train a small classifier of the 10 Fashion-MNIST classes on the CPU; writes a run folder with "
        "config.json, log.jsonl, checkpoint.pt, classifier.safetensors and metrics.json (test accuracy, per class, "
        "confusion matrix).",
    )
    for flag, dest, typ, hlp in OPTIONS:
        p.add_argument(flag, dest=dest, type=typ, default=None, help=hlp)
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no random horizontal flips")
    p.add_argument("--config", type=Path, help="options from a YAML/JSON file (command-line options override it)")
    p.add_argument("--resume", type=Path, help="continue the run in this folder exactly where its checkpoint is")
    add_progress_arg(p)
    p.set_defaults(func=cmd_train_classifier)


def cmd_train_classifier(args: argparse.Namespace) -> int:
    from ..config import from_mapping
    from ..training.classifier_trainer import ClassifierTrainConfig, resume_classifier_config, train_classifier
    from .common import check_output_folder

    if args.resume is not None:  # the command that started the run stays the one recorded
        cfg = resume_classifier_config(args.resume, option_overrides(args))
        check_output_folder(args.resume, "--resume")
        result = train_classifier(cfg, resume=args.resume, progress_mode=args.progress)
    else:
        cfg = from_mapping(ClassifierTrainConfig, options_from(args), "train-classifier")
        check_output_folder(cfg.out, "--out")
        result = train_classifier(cfg, command=_command(args), progress_mode=args.progress)
    print(f"wrote {result['file']} (test accuracy {result['metrics']['accuracy']:.4f})")
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line as typed (from ``sys.argv`` when this is the running command), else rebuilt from options."""
    argv = sys.argv[1:]
    if "train-classifier" in argv:
        return shlex.join(["cycle-encoding", *argv[argv.index("train-classifier") :]])
    parts = ["cycle-encoding", "train-classifier"]
    for k, v in options_from(args).items():
        if isinstance(v, bool):
            parts += [] if v else [f"--no-{k}"]
        else:
            parts += [f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)]
    return shlex.join(parts)
