"""`train-encoder`: train the e4e encoder by a schedule (argument parsing only; the loop is in training/)."""

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


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


# option name -> (dest in the config, type, help)
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--generator", "generator", str, "generator file (any supported format)"),
    ("--data", "data", str, "training images: a folder, or a dataset name such as fashion-mnist"),
    ("--out", "out", str, "folder that receives the numbered run folder (default runs)"),
    ("--name", "name", str, "run folder label (default encoder-PRESET)"),
    ("--preset", "preset", str, "schedule preset: paper, e4e or w (default paper)"),
    ("--schedule", "schedule_file", str, "a schedule file (YAML/JSON) instead of a preset"),
    ("--total-steps", "total_steps", int, "rescale the schedule to this many steps (same proportions)"),
    ("--max-steps", "max_steps", int, "stop after this step (default: the schedule's end)"),
    ("--batch-size", "batch_size", int, "global batch size (default 8), split over processes"),
    ("--lr", "lr", float, "Ranger learning rate (default 1e-4)"),
    ("--d-lr", "d_lr", float, "latent discriminator Adam learning rate (default 2e-5)"),
    ("--l2-lambda", "l2_lambda", float, "weight of the pixel MSE (default 1.0)"),
    ("--perceptual", "perceptual", str,
     "perceptual distance: auto (default: the domain's, fmnist-features for Fashion-MNIST or a grey generator, else "
     "lpips-alex), lpips-alex, lpips-vgg, dlib-face, fmnist-features, ... or none"),
    ("--perceptual-lambda", "perceptual_lambda", float, "weight of the perceptual term (default 0.8)"),
    ("--lpips-backbone", "lpips_backbone", str, "torchvision ImageNet AlexNet/VGG16 state dict for LPIPS"),
    ("--identity", "identity", str,
     "identity network: auto (default: fmnist-features for Fashion-MNIST, arcface with --identity-weights, else "
     "none), arcface, dlib-face, moco, fmnist-features or none"),
    ("--identity-lambda", "identity_lambda", float, "weight of the identity term (default 0.1)"),
    ("--identity-weights", "identity_weights", str, "weights file of the identity network"),
    ("--image-size", "image_size", int, "training image size; G's output is pooled to it (default min(G, 256))"),
    ("--encoder-input-size", "encoder.input_size", int, "encoder input size (default: the image size)"),
    ("--encoder-widths", "encoder.widths", _ints, "body widths of the 4 blocks (default 64,128,256,512)"),
    ("--encoder-units", "encoder.units", _ints, "units per block (default 3,4,14,3 = IR-SE-50)"),
    ("--encoder-mode", "encoder.mode", str, "ir or ir_se (default ir_se)"),
    ("--encoder-init", "encoder_init", str, "ArcFace IR-SE-50 file (body) or an encoder checkpoint (all weights)"),
    ("--val-data", "val_data", str, "held-out images (default: --val-count images held out of --data)"),
    ("--val-count", "val_count", int, "images held out of --data for validation (default 16)"),
    ("--log-every", "log_every", int, "log every N steps (default 50)"),
    ("--image-every", "image_every", int, "reconstruction grid every N steps (default 1000)"),
    ("--val-every", "val_every", int, "validation every N steps (default 1000)"),
    ("--val-patience", "val_patience", int,
     "stop (and export) when this many validations in a row, counted in the schedule's last stage only, miss the "
     "best earlier validation loss of that stage by the margin (default 0: never; the rule of `cycle-encoding "
     "curves --patience`)"),
    ("--val-min-improvement", "val_min_improvement", float,
     "the margin of --val-patience: a relative improvement that counts (default 0.02 = 2%%)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint every N steps (default 1000)"),
    ("--pool-size", "pool_size", int, "pool of past codes for the latent discriminator (default 50)"),
    ("--r1-gamma", "r1_gamma", float, "R1 weight on real codes (default 10)"),
    ("--r1-every", "r1_every", int, "lazy R1 interval in steps (default 16)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--noise", "noise_mode", str, "generator noise while training: random (default, the authors') or const"),
    ("--zero-grad", "zero_grad", str,
     "zero (default: PyTorch 1.6's zero_grad as the authors ran it; switched-off offset heads keep moving under "
     "Ranger's momentum) or none (gradients set to None; switched-off heads freeze)"),
    ("--precision", "precision", str,
     "auto (default: bf16 where the CPU or GPU computes bfloat16 natively, else fp32), fp32 (float32 throughout, "
     "the authors' computation) or bf16 (bfloat16 autocast for the networks' passes, float32 weights, losses and "
     "optimizers; equal validation loss in benchmarks/encoder_training.py); a resumed run keeps its own"),
    ("--d-fake-codes", "d_fake_codes", str,
     "latent discriminator's fake codes: absolute (default, with w_avg) or raw-offset (the authors' input, without)"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser(
        "train-encoder",
        parents=[common],
        help="train the e4e encoder by the cycle schedule (or e4e's, or W only)",
        description="Train the encoder. One process, or many with torchrun (same command after "
        "`torchrun --nproc_per_node N -m cycle_encoding.cli`).",
    )
    for flag, dest, typ, hlp in OPTIONS:
        p.add_argument(flag, dest=dest.replace(".", "__"), type=typ, default=None, help=hlp)
    p.add_argument("--w-only", dest="encoder__w_only", action="store_true", default=None,
                   help="the W-encoder baseline: one head, stage 0 throughout")  # fmt: skip
    p.add_argument("--no-adversarial", dest="adversarial", action="store_false", default=None,
                   help="no latent discriminator")  # fmt: skip
    p.add_argument("--no-flip", dest="flip", action="store_false", default=None, help="no random horizontal flips")
    p.add_argument("--compile", dest="compile", action="store_true", default=None,
                   help="torch.compile G's synthesis and the encoder body for the training steps: faster after a minute or two of "
                   "compiling (needs a C++ compiler on a CPU); a resumed run keeps its own")  # fmt: skip
    p.add_argument("--config", type=Path, help="options from a YAML/JSON file (command-line options override it)")
    p.add_argument("--resume", type=Path, help="continue the run in this folder exactly where its checkpoint is")
    p.add_argument("--dry-run", action="store_true",
                   help="open everything the run needs (generator, data, LPIPS backbone, identity weights, encoder "
                   "initialisation), print the resolved configuration and the schedule for the generator's number of "
                   "codes, then exit")  # fmt: skip
    add_device_arg(p)
    add_progress_arg(p)
    p.set_defaults(func=cmd_train_encoder, device=None)


def cmd_train_encoder(args: argparse.Namespace) -> int:
    from ..config import to_dict
    from ..training.encoder_trainer import EncoderTrainer, load_train_config, resume_config

    over = option_overrides(args)
    if args.resume is not None:
        cfg = resume_config(args.resume, over)
        precision_line = f"precision: {cfg.precision} (the run's own)"
    else:
        data = options_from(args, required=("generator", "data"))
        data["precision"], why = resolve_precision_option(data.get("precision"), data.get("device"))
        precision_line = f"precision: {data['precision']} ({why})"
        cfg = load_train_config(data)
    if args.dry_run:
        from ..training.preflight import check_encoder_run

        pre = check_encoder_run(cfg)  # opens what the run needs: a missing file fails here, not at step one
        print(json.dumps(to_dict(cfg), indent=2))
        print(pre.schedule.format_table(pre.num_ws))
        print(pre.format())
        return 0
    check_output_folder(args.resume if args.resume is not None else cfg.out, "--resume" if args.resume else "--out")
    trainer = EncoderTrainer(cfg, resume=args.resume)
    trainer.progress = args.progress
    if trainer.dist.is_main:
        print(precision_line, file=sys.stderr)
        for kind, rec in trainer.nets.files().items():
            print(f"{kind} {rec['name']}: {rec['file']} ({rec['found']})", file=sys.stderr)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    if trainer.dist.is_main:
        print(f"run folder: {trainer.run_dir} (step {summary['step']}, stage {summary['trained_stage']})")
    return 0
