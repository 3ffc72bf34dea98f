"""`train-generator`: train a StyleGAN2 generator on a small domain (argument parsing only; the loop is in training/)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .common import (
    add_device_arg,
    add_progress_arg,
    check_output_folder,
    option_overrides,
    options_from,
    resolve_precision_option,
)


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v.strip())


# option name -> (dest in the config, type, help)
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--data", "data", str, "training images: fashion-mnist[:train|:test][@FOLDER], or a folder of images"),
    ("--resolution", "resolution", int, "output size, a power of two (default 32)"),
    ("--channels", "img_channels", int, "image channels, 1 or 3 (default: 1 for fashion-mnist, else 3)"),
    ("--out", "out", str, "folder that receives the numbered run folder (default runs)"),
    ("--name", "name", str, "run folder label (default generator-DATA-RES)"),
    ("--max-steps", "max_steps", int, "train until this step (iterations of one D and one G step; default 20000)"),
    ("--batch-size", "batch_size", int, "global batch size (default 32), split over processes"),
    ("--lr", "lr", float, "Adam learning rate of G and D (default 0.002)"),
    ("--betas", "betas", _floats, "Adam betas (default 0,0.99)"),
    ("--r1-gamma", "r1_gamma", float, "R1 weight (default 0.0002 * resolution^2 / batch size)"),
    ("--r1-every", "r1_every", int, "lazy R1 interval in steps (default 16)"),
    ("--pl-weight", "pl_weight", float, "path-length regularization weight (default 0: off; StyleGAN2 uses 2)"),
    ("--pl-every", "pl_every", int, "lazy path-length interval in steps (default 4)"),
    ("--mixing-prob", "mixing_prob", float, "style mixing probability (default 0.9)"),
    ("--ema-kimg", "ema_kimg", float, "half-life of g_ema in thousands of images (default 10)"),
    ("--ema-rampup", "ema_rampup", float, "shorten the EMA half-life to this fraction of the images seen early on"),
    ("--style-dim", "generator.style_dim", int, "style (z and w) dimension (default 128)"),
    ("--n-mlp", "generator.n_mlp", int, "mapping network layers (default 4)"),
    ("--channel-base", "generator.channel_base", int, "channels at resolution r: min(base / r, max) (default 2048)"),
    ("--channel-max", "generator.channel_max", int, "largest channel count (default 128)"),
    ("--d-channel-base", "discriminator.channel_base", int, "discriminator channel base (default: the generator's)"),
    ("--d-channel-max", "discriminator.channel_max", int, "discriminator channel max (default: the generator's)"),
    ("--sample-count", "sample_count", int, "images in the sample grids (default 64)"),
    ("--metric-every", "metric_every", int, "classifier FD of g_ema every N steps and at the end (default 0: never)"),
    (
        "--metric-samples",
        "metric_samples",
        int,
        "samples (and at most as many reference images) per FD (default 10000)",
    ),
    (
        "--metric-classifier",
        "metric_classifier",
        str,
        "the FD's classifier file (default fmnist-eval for fashion-mnist)",
    ),
    ("--metric-reference", "metric_reference", str, "the FD's reference images (default: the data's test split)"),
    (
        "--metric-patience",
        "metric_patience",
        int,
        "stop when this many FDs in a row miss the best by the margin (default 0: never)",
    ),
    (
        "--metric-min-improvement",
        "metric_min_improvement",
        float,
        "the margin: a relative improvement of the best FD that counts (default 0.02)",
    ),
    ("--log-every", "log_every", int, "log every N steps (default 50)"),
    ("--image-every", "image_every", int, "sample grid every N steps (default 1000)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint and export g_ema every N steps (default 1000)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--precision", "precision", str,
     "auto (default: bf16 where the CPU or GPU computes bfloat16 natively, else fp32), fp32 (float32 throughout) "
     "or bf16 (bfloat16 autocast for G and D, float32 weights, losses, Adam and regularizers); a resumed run keeps "
     "its own"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train-generator",
        parents=[common],
        help="train a StyleGAN2 generator (e.g. on Fashion-MNIST at 32x32)",
        description="Train a StyleGAN2 generator; g_ema is exported as RUN/generator.safetensors. One process, or "
        "many with torchrun (same command after `torchrun --nproc_per_node N -m cycle_encoding.cli`).",
    )
    for flag, dest, typ, hlp in OPTIONS:
        p.add_argument(flag, dest=dest.replace(".", "__"), type=typ, default=None, help=hlp)
    p.add_argument("--flip", dest="flip", action="store_true", default=None, help="random horizontal flips of reals")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile G's synthesis and D for the training steps: faster after a minute or two of "
                   "compiling (needs a C++ compiler on a CPU); a resumed run keeps its own")  # fmt: skip
    p.add_argument("--config", type=Path, help="options from a YAML/JSON file (command-line options override it)")
    p.add_argument("--resume", type=Path, help="continue the run in this folder exactly where its checkpoint is")
    p.add_argument("--dry-run", action="store_true", help="print the resolved configuration, then exit")
    add_device_arg(p)
    add_progress_arg(p)
    p.set_defaults(func=cmd_train_generator, device=None)


def cmd_train_generator(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from ..training.generator_trainer import (
        GeneratorTrainer,
        load_generator_train_config,
        resume_generator_config,
    )

    over = option_overrides(args)
    if args.resume is not None:
        cfg = resume_generator_config(args.resume, over)
        precision_line = f"precision: {cfg.precision} (the run's own)"
    else:
        data = options_from(args, required=("data",))
        data["precision"], why = resolve_precision_option(data.get("precision"), data.get("device"))
        precision_line = f"precision: {data['precision']} ({why})"
        cfg = load_generator_train_config(data)
    if args.dry_run:
        out = to_dict(cfg)
        g, d = cfg.generator_config(), cfg.discriminator_config()
        out["_resolved"] = {
            "img_channels": cfg.channels,
            "r1_gamma": cfg.gamma,
            "generator": g.to_dict(),
            "generator_channels": g.channels(),
            "discriminator": d.to_dict(),
        }
        print(json.dumps(out, indent=2))
        return 0
    check_output_folder(args.resume if args.resume is not None else cfg.out, "--resume" if args.resume else "--out")
    trainer = GeneratorTrainer(cfg, resume=args.resume)
    trainer.progress = args.progress
    if trainer.dist.is_main:
        print(precision_line, file=sys.stderr)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(
            f"run folder: {trainer.run_dir} (step {summary['step']}); "
            f"generator: {trainer.run_dir / 'generator.safetensors'}"
        )
    return 0
