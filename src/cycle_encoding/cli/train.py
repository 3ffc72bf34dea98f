"""The training commands, ``train-generator``, ``train-encoder`` and ``train-classifier`` (argument parsing only; the
loops are in training/): each an option table over its config, --config, --resume and one skeleton."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from ..config import from_mapping, to_dict
from ..training.classifier_trainer import ClassifierTrainConfig, resume_classifier_config, train_classifier
from ..training.encoder_trainer import EncoderTrainer, load_train_config, resume_config
from ..training.generator_trainer import GeneratorTrainer, load_generator_train_config, resume_generator_config
from ..training.preflight import check_encoder_run
from .common import (
    add_command,
    add_device_arg,
    add_option_table,
    add_progress_arg,
    check_output_folder,
    option_overrides,
    options_from,
    print_json,
    resolve_precision_option,
)


def _ints(s: str) -> tuple[int, ...]:
    return tuple(int(v) for v in s.split(",") if v.strip())


def _floats(s: str) -> tuple[float, ...]:
    return tuple(float(v) for v in s.split(",") if v.strip())


PRECISION_HELP = ("auto (default: bf16 where the CPU or GPU computes bfloat16 natively, else fp32), fp32 (float32 "
                  "throughout, the authors' computation) or bf16 (bfloat16 autocast of the networks' passes, float32 "
                  "weights, losses and optimizers; docs/PERFORMANCE.md); a resumed run keeps its own")  # fmt: skip
COMPILE_HELP = ("torch.compile {} for the training steps: faster after a minute or two of compiling (needs a C++ "
                "compiler on a CPU); a resumed run keeps its own")  # fmt: skip

# option name -> (dest in the config, dotted for nested; type or switch action; help)
GENERATOR_OPTIONS: list[tuple[str, str, Any, str]] = [
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
    ("--metric-samples", "metric_samples", int,
     "samples (and at most as many reference images) per FD (default 10000)"),
    ("--metric-classifier", "metric_classifier", str,
     "the FD's classifier file (default fmnist-eval for fashion-mnist)"),
    ("--metric-reference", "metric_reference", str, "the FD's reference images (default: the data's test split)"),
    ("--metric-patience", "metric_patience", int,
     "stop when this many FDs in a row miss the best by the margin (default 0: never)"),
    ("--metric-min-improvement", "metric_min_improvement", float,
     "the margin: a relative improvement of the best FD that counts (default 0.02)"),
    ("--log-every", "log_every", int, "log every N steps (default 50)"),
    ("--image-every", "image_every", int, "sample grid every N steps (default 1000)"),
    ("--checkpoint-every", "checkpoint_every", int, "checkpoint and export g_ema every N steps (default 1000)"),
    ("--seed", "seed", int, "random seed (default 0)"),
    ("--precision", "precision", str, PRECISION_HELP),
    ("--flip", "flip", "store_true", "random horizontal flips of reals"),
    ("--compile", "compile", "store_true", COMPILE_HELP.format("G's synthesis and D")),
]  # fmt: skip

ENCODER_OPTIONS: list[tuple[str, str, Any, str]] = [
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
    ("--precision", "precision", str, PRECISION_HELP),
    ("--d-fake-codes", "d_fake_codes", str,
     "latent discriminator's fake codes: absolute (default, with w_avg) or raw-offset (the authors' input, without)"),
    ("--w-only", "encoder.w_only", "store_true", "the W-encoder baseline: one head, stage 0 throughout"),
    ("--no-adversarial", "adversarial", "store_false", "no latent discriminator"),
    ("--no-flip", "flip", "store_false", "no random horizontal flips"),
    ("--compile", "compile", "store_true", COMPILE_HELP.format("G's synthesis and the encoder body")),
]  # fmt: skip

CLASSIFIER_OPTIONS: list[tuple[str, str, Any, str]] = [
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
    ("--no-flip", "flip", "store_false", "no random horizontal flips"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    torchrun = (
        "One process, or many with torchrun (same command after `torchrun --nproc_per_node N -m cycle_encoding.cli`)."
    )
    _training_parser(
        sub, common, "train-generator", GENERATOR_OPTIONS, cmd_train_generator,
        help="train a StyleGAN2 generator (e.g. on Fashion-MNIST at 32x32)",
        description=f"Train a StyleGAN2 generator; g_ema is exported as RUN/generator.safetensors. {torchrun}",
        dry_run="print the resolved configuration, then exit",
    )  # fmt: skip
    _training_parser(
        sub, common, "train-encoder", ENCODER_OPTIONS, cmd_train_encoder,
        help="train the e4e encoder by the cycle schedule (or e4e's, or W only)",
        description=f"Train the encoder. {torchrun}",
        dry_run="open everything the run needs (generator, data, LPIPS backbone, identity weights, encoder "
        "initialisation), print the resolved configuration and the schedule for the generator's number of codes, "
        "then exit",
    )  # fmt: skip
    _training_parser(
        sub, common, "train-classifier", CLASSIFIER_OPTIONS, cmd_train_classifier,
        help="train a small Fashion-MNIST classifier (feature network or evaluation network)",
        description="Train a small classifier of the 10 Fashion-MNIST classes on the CPU; writes a run folder with "
        "config.json, log.jsonl, checkpoint.pt, classifier.safetensors and metrics.json (test accuracy, per class, "
        "confusion matrix).",
    )  # fmt: skip


def _training_parser(
    sub: argparse._SubParsersAction,
    common: argparse.ArgumentParser,
    name: str,
    options: list[tuple[str, str, Any, str]],
    func: Callable[[argparse.Namespace], int],
    dry_run: str | None = None,
    **texts: str,
) -> None:
    """A training command: its option table, --config, --resume and --progress; with ``dry_run`` (its help) also
    --dry-run and --device (None unless given, so that a resumed run keeps its own)."""
    p = add_command(sub, common, name, func, **texts)
    add_option_table(p, options)
    p.add_argument("--config", type=Path, help="options from a YAML/JSON file (command-line options override it)")
    p.add_argument("--resume", type=Path, help="continue the run in this folder exactly where its checkpoint is")
    if dry_run is not None:
        p.add_argument("--dry-run", action="store_true", help=dry_run)
        add_device_arg(p)
        p.set_defaults(device=None)
    add_progress_arg(p)


def _train_config(
    args: argparse.Namespace, load: Callable, resume: Callable, required: tuple[str, ...] = ()
) -> tuple[Any, str]:
    """The run's configuration: the resumed run's own with the options given over it (``--resume``), else --config
    with the options over it, its precision resolved when it has one; and the line saying which precision."""
    if args.resume is not None:
        cfg = resume(args.resume, option_overrides(args))
        return cfg, f"precision: {getattr(cfg, 'precision', None)} (the run's own)"
    data = options_from(args, required=required)
    if "precision" not in vars(args):
        return load(data), ""
    data["precision"], why = resolve_precision_option(data.get("precision"), data.get("device"))
    return load(data), f"precision: {data['precision']} ({why})"


def _output_folder(args: argparse.Namespace, cfg: Any) -> None:
    check_output_folder(args.resume if args.resume is not None else cfg.out, "--resume" if args.resume else "--out")


def _run(
    args: argparse.Namespace, trainer_class: Callable, cfg: Any, notes: Callable[[Any], list[str]]
) -> tuple[Any, dict[str, Any]]:
    """Train (one process of a torchrun job, or the only one), the main process printing ``notes(trainer)`` first."""
    _output_folder(args, cfg)
    trainer = trainer_class(cfg, resume=args.resume)
    trainer.progress = args.progress
    if trainer.dist.is_main:
        print("\n".join(notes(trainer)), file=sys.stderr)
    try:
        summary = trainer.run()
    finally:
        trainer.close()
    return trainer, summary


def cmd_train_generator(args: argparse.Namespace) -> int:
    cfg, precision_line = _train_config(args, load_generator_train_config, resume_generator_config, required=("data",))
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
        print_json(out)
        return 0
    trainer, summary = _run(args, GeneratorTrainer, cfg, lambda t: [precision_line])
    if trainer.dist.is_main:
        print(
            f"run folder: {trainer.run_dir} (step {summary['step']}); "
            f"generator: {trainer.run_dir / 'generator.safetensors'}"
        )
    return 0


def cmd_train_encoder(args: argparse.Namespace) -> int:
    cfg, precision_line = _train_config(args, load_train_config, resume_config, required=("generator", "data"))
    if args.dry_run:
        pre = check_encoder_run(cfg)  # opens what the run needs: a missing file fails here, not at step one
        print_json(to_dict(cfg))
        print(pre.schedule.format_table(pre.num_ws))
        print(pre.format())
        return 0

    def notes(trainer: EncoderTrainer) -> list[str]:
        files = trainer.nets.files().items()
        return [precision_line, *(f"{kind} {rec['name']}: {rec['file']} ({rec['found']})" for kind, rec in files)]

    trainer, summary = _run(args, EncoderTrainer, cfg, notes)
    if trainer.dist.is_main:
        print(f"run folder: {trainer.run_dir} (step {summary['step']}, stage {summary['trained_stage']})")
    return 0


def cmd_train_classifier(args: argparse.Namespace) -> int:
    load = partial(from_mapping, ClassifierTrainConfig, where="train-classifier")
    cfg, _ = _train_config(args, load, resume_classifier_config)
    _output_folder(args, cfg)
    # a resumed run keeps the command that started it
    command = None if args.resume is not None else _classifier_command(args)
    result = train_classifier(cfg, resume=args.resume, command=command, progress_mode=args.progress)
    print(f"wrote {result['file']} (test accuracy {result['metrics']['accuracy']:.4f})")
    return 0


def _classifier_command(args: argparse.Namespace) -> str:
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
