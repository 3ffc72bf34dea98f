"""``cycle-encoding invert``: pivots, refinement, projection and pivotal tuning over images (parsing only; the work is
in ``inversion/``)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..config import load_config_file, to_dict
from ..errors import CycleEncodingError
from ..inversion.config import TUNE_MODES, make_config
from ..inversion.inverter import Inverter
from ..inversion.targets import list_targets
from ..utils import check_finite
from .common import (
    EXIT_SOME_FAILED,
    add_command,
    add_device_arg,
    add_option_table,
    add_progress_arg,
    check_output_folder,
    comma_list,
    print_json,
    resolve_precision_option,
)

# option -> (dest in the InversionConfig, dotted for nested, _NAME: read by options_from_args; type or switch; help)
OPTIONS: list[tuple[str, str, Any, str]] = [
    ("--offsets", "offsets", str, "encoder offsets: all (default, the authors' inference) or trained"),
    ("--perceptual", "perceptual", str,
     "perceptual distance: lpips-alex, lpips-vgg, dlib-face, fmnist-features, ... or none (default: the one the "
     "encoder was trained with, as its file records; else lpips-alex)"),
    ("--lpips-backbone", "lpips_backbone", str,
     "torchvision ImageNet AlexNet/VGG16 state dict for LPIPS (default: the file the encoder recorded, else looked "
     "up as docs/TRAINING.md, Network files, says)"),
    ("--identity", "identity", str,
     "identity network of the refinement's ID term (weight 0.1): auto (default: the one the encoder file records, "
     "else the domain's, fmnist-features for Fashion-MNIST, arcface with --identity-weights, else none), arcface, "
     "dlib-face, moco, fmnist-features or none"),
    ("--identity-weights", "identity_weights", str,
     "weights file of the identity network (default: looked up as --lpips-backbone; arcface: model_ir_se50.pth, "
     "e.g. in pretrained_models/)"),
    ("--seed", "seed", int, "random seed (default 0); each image's draws derive from it and the image's index"),
    ("--refine-steps", "refine.steps", int, "refinement forward passes K (default 16: pivot after 15 updates)"),
    ("--refine-random", "refine.num_random", int, "random training images M per step (default 7)"),
    ("--refine-lambda", "refine.lambda_reg", float, "weight lambda_reg of the regularizer (default M)"),
    ("--refine-lr", "refine.lr", float, "refinement learning rate (default: the encoder's optimizer state's, 1e-4)"),
    ("--refine-size", "refine.image_size", int, "loss image size of the refinement (default: the training size)"),
    ("--refine-optimizer", "refine.optimizer_state", str,
     "the refinement's Ranger state: auto (default: restored from the encoder file, else the substitute), restore, "
     "substitute (moments estimated from training images) or fresh"),
    ("--refine-substitute-batches", "refine.substitute_batches", int,
     "batches of training images the substitute state is estimated from (default 20)"),
    ("--refine-noise", "refine.noise_mode", str, "generator noise in the refinement: random (default) or const"),
    ("--project-steps", "project.steps", int, "W projector steps (default 450)"),
    ("--project-lr", "project.lr", float, "W projector initial learning rate (default 0.01)"),
    ("--project-l2", "project.l2_lambda", float, "weight of a pixel MSE in the projector (default 0, as PTI)"),
    ("--project-perceptual", "project.perceptual", str,
     "the projector's own perceptual network (PTI: lpips-vgg); default: the run's --perceptual"),
    ("--project-lpips-backbone", "project.lpips_backbone", str,
     "LPIPS backbone file for --project-perceptual (default: --lpips-backbone)"),
    ("--project-samples", "project.w_avg_samples", int, "mapped samples for the w mean/std (default 600, as PTI)"),
    ("--tune-steps", "tune.steps", int, "pivotal tuning: at most this many steps (default 350)"),
    ("--tune-lr", "tune.lr", float, "pivotal tuning Adam learning rate (default 3e-4)"),
    ("--stop-threshold", "tune.stop_threshold", float,
     "stop tuning once the perceptual distance is <= this (default 0.07, the authors' value for lpips-alex; for "
     "dlib-face 0.05 stops at a similar closeness, docs/FACES.md)"),
    ("--locality-alpha", "tune.locality_alpha", float, "locality regularizer: distance from the pivot (default 30)"),
    ("--locality-weights", "_locality_weights", str, "locality regularizer: MSE,perceptual weights (default 0.1,0.1)"),
    ("--locality-every", "tune.locality_every", int,
     "locality regularizer on every K-th tuning step only (default 1: every step, PTI's; docs/PERFORMANCE.md)"),
    ("--precision", "_precision", str,
     "compute precision of refine and tune: auto (default: bf16 where the CPU or GPU computes bfloat16 natively, "
     "else fp32), fp32 (the authors' loops exactly) or bf16 (bfloat16 autocast; docs/PERFORMANCE.md)"),
    ("--tune-batch", "tune_batch", int,
     "tune this many images at once, each its own generator copy, in one batched pass (default: chosen per run by "
     "invert, 1 by video; docs/PERFORMANCE.md)"),
    ("--delta-level", "delta_level", int, "zlib level of the stored generator change, 0-9 (default 1)"),
    ("--no-locality", "tune.locality", "store_false", "pivotal tuning without the locality regularizer"),
    ("--batch-passes", "tune.batch_passes", "store_true",
     "pivotal tuning: the pivot's and the locality regularizer's renders in one batched pass (docs/PERFORMANCE.md)"),
    ("--compile", "_compile", "store_true",
     "torch.compile the refinement's encoder body and generator and the tuning's generator passes (not "
     "--tune-batch's; needs a C++ compiler on a CPU; the first image pays a minute or two; docs/PERFORMANCE.md)"),
    ("--no-early-stop", "_no_early_stop", "store_true", "pivotal tuning always takes --tune-steps steps"),
]  # fmt: skip


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "invert", cmd_invert,
        help="invert images: encoder pivot, regularized refinement, W projection, pivotal tuning",
        description="Inverts one image or a folder's images into a generator, by stages chosen with --stages "
        "(encoder, refine, project, tune; default encoder,refine,tune = the paper's Method 2 with PTI's tuning). "
        "RUN_DIR receives config.json, summary.json and images/NAME/ with the pivots, the reconstruction after "
        "each stage, losses.jsonl, timings.json and the tuned generator as its change from the base "
        "(generator_delta.safetensors). Re-running into the same RUN_DIR skips finished images (and redoes those whose "
        "input file changed); a second invert into the same RUN_DIR leaves the images the first is working on to it. "
        "Under torchrun the images are split between the processes. Exit status: 0 all done, 3 some images failed (listed), 2 bad input.",
    )  # fmt: skip
    p.add_argument("images", type=Path,
                   help="an image file or a folder of images (faces aligned beforehand at the generator's size, or "
                        "use --align)")  # fmt: skip
    p.add_argument("--out", required=True, type=Path, metavar="RUN_DIR", help="the run folder")
    add_inversion_args(p)
    p.add_argument("--exact", action="store_true",
                   help="the authors' loop exactly: fp32, no batched pass, one image per tuning batch, nothing "
                        "compiled, one process with torch's default threads (default: each chosen per run for speed, "
                        "printed and recorded in config.json; docs/PERFORMANCE.md)")  # fmt: skip
    p.add_argument("--workers", type=int, default=None, metavar="N",
                   help="processes that share the images, one thread each (default: chosen by the images' number "
                        "and size and the cores; 1: one process using the cores' threads)")  # fmt: skip
    p.add_argument("--align", action="store_true",
                   help="FFHQ-align each photo's largest face first, at the generator's resolution (dlib 68 "
                        "landmarks, as cycle-encoding align); a photo without a face fails and is listed")  # fmt: skip
    p.add_argument("--no-delta", action="store_true", help="do not store the tuned generators")
    p.add_argument("--recursive", action="store_true", help="also take images in sub-folders")
    p.add_argument("--dry-run", action="store_true", help="print the resolved options and the images, run nothing")
    p.add_argument("--quiet", action="store_true",
                   help="no progress and no line per stage: one result line per image, then the summary")  # fmt: skip
    add_device_arg(p)
    add_progress_arg(p)


def add_inversion_args(p: argparse.ArgumentParser) -> None:
    """The networks and the inversion's options as ``invert`` takes them (also ``video``'s; ``options_from_args``)."""
    p.add_argument("--generator", required=True, help="generator file (any supported format)")
    p.add_argument("--encoder", default=None,
                   help="encoder: a train-encoder checkpoint.pt (gives the optimizer state and the training images for "
                        "refine), an encoder.safetensors, or an e4e/pSp/Cycle Encoding .pt")  # fmt: skip
    p.add_argument(
        "--stages", default=None, help="comma-separated: encoder,refine,project,tune (default encoder,refine,tune)"
    )
    p.add_argument("--train-data", default=None,
                   help="the encoder's training images (folder or dataset name) for refine; default: what the encoder "
                        "file records")  # fmt: skip
    p.add_argument("--config", default=None, help="YAML/JSON file of inversion options (command-line options win)")
    add_option_table(p, OPTIONS, metavars=True)
    p.add_argument("--tune", choices=TUNE_MODES, default=None,
                   help="each (default): every image its own tuned generator; shared: ONE generator tuned on all the "
                        "images (PTI's multi-ID mode: --tune-steps rounds of one step per image, no early stop), "
                        "stored once (RUN_DIR/generator_delta.safetensors); a finished shared run takes no new images")  # fmt: skip


def _set(d: dict[str, Any], dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        d = d.setdefault(k, {})
    d[keys[-1]] = value


def options_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The inversion options as a nested mapping: the --config file, then the command-line options over it."""
    data: dict[str, Any] = load_config_file(args.config) if args.config else {}
    if args.stages:
        data["stages"] = comma_list(args.stages)
    if args.train_data:
        data["train_data"] = args.train_data
    for flag, dest, tp, _ in OPTIONS:
        v = getattr(args, dest.replace(".", "__"))
        if v is None:
            continue
        if tp is float:
            check_finite(v, flag)
        if dest == "_locality_weights":
            try:
                l2, perc = (float(s) for s in v.split(","))
            except ValueError:
                raise CycleEncodingError(f"--locality-weights takes two numbers, MSE,perceptual; got {v!r}") from None
            check_finite(l2, flag)
            check_finite(perc, flag)
            _set(data, "tune.locality_l2_lambda", l2)
            _set(data, "tune.locality_perceptual_lambda", perc)
        elif dest in ("_precision", "_compile"):  # both stages'
            _set(data, f"refine.{dest[1:]}", v)
            _set(data, f"tune.{dest[1:]}", v)
        elif dest == "_no_early_stop":
            _set(data, "tune.stop_threshold", None)
        else:
            _set(data, dest, v)
    if getattr(args, "align", False):  # invert --align (video aligns its frames itself)
        data["align"] = True
    if args.tune:
        data["tune_mode"] = args.tune
    if getattr(args, "no_delta", False):
        data["save_delta"] = False
    return data


def resolve_precisions(data: dict[str, Any], device: Any) -> str:
    """The refinement's and the tuning's precision in ``data`` (from --precision or --config; ``auto`` when neither
    gives one) resolved for the device: fp32 or bf16 in ``data``, and a line saying what was chosen and why."""
    lines = []
    for stage in ("refine", "tune"):
        section = data.setdefault(stage, {})
        if not isinstance(section, dict):
            continue  # make_config reports the malformed section
        section["precision"], why = resolve_precision_option(section.get("precision"), device)
        lines.append(f"{stage} {section['precision']} ({why})")
    return "precision: " + ", ".join(lines)


def speed_request(data: dict[str, Any], args: argparse.Namespace) -> str | dict[str, Any]:
    """``"exact"`` (--exact, which sets fp32 in ``data``; a speed option beside it is an error) or the speed options
    the command line or the --config file fixed, for the inversion to choose the rest (``speed.plan_speed``)."""
    tune, refine = data.get("tune", {}), data.get("refine", {})
    given = {"batch_passes": tune.get("batch_passes") if isinstance(tune, dict) else None,
             "tune_batch": data.get("tune_batch"), "workers": args.workers,
             "compile": next((d["compile"] for d in (tune, refine) if isinstance(d, dict) and "compile" in d),
                             None)}  # fmt: skip
    given = {k: v for k, v in given.items() if v is not None}
    if not args.exact:
        return given
    fixed = [k for k in given if k != "workers" or given[k] != 1]
    if getattr(args, "_precision", None) not in (None, "fp32") or fixed:
        raise CycleEncodingError(f"--exact is the authors' loop; it cannot go with {', '.join(fixed) or '--precision'}")
    for stage in ("refine", "tune"):
        data.setdefault(stage, {})["precision"] = "fp32"
    return "exact"


def cmd_invert(args: argparse.Namespace) -> int:
    data = options_from_args(args)
    speed = speed_request(data, args)
    precision_line = resolve_precisions(data, args.device)
    config = make_config(data)
    check_output_folder(args.out, "--out")
    if args.dry_run:
        files, names = list_targets(args.images, args.recursive)
        print_json({"options": to_dict(config), "speed": speed, "run_dir": str(args.out), "images": len(files),
                    "names": names[:20] + (["..."] if len(names) > 20 else [])})  # fmt: skip
        return 0
    progress = "none" if args.quiet else args.progress
    inv = Inverter(args.generator, args.encoder, config, device=args.device, progress=progress)
    try:
        if inv.dist.is_main:
            nets, src = inv.network_names(), inv.networks_from
            notes = [f"networks: perceptual {nets['perceptual']} [{src['perceptual']}]; identity {nets['identity']} "
                     f"[{src['identity']}]", *(f"  {line}" for line in inv.nets.file_lines())]  # fmt: skip
            if inv.identity_note.startswith("auto"):
                notes.append(f"identity: {inv.identity_note}")
            if inv.refiner is not None:
                notes.append(f"refine: optimizer state {inv.refiner.optimizer_note}")
            notes.append(precision_line)
            if config.refine.compile or config.tune.compile:
                notes.append("--compile: the first image compiles the networks' passes (a minute or two; later runs "
                             "reuse torch's on-disk cache)")  # fmt: skip
            print("\n".join(notes), file=sys.stderr)
        summary = inv.run(args.images, args.out, recursive=args.recursive,
                          verbose="images" if args.quiet else True, debug=args.debug, speed=speed)  # fmt: skip
    finally:
        inv.close()
    if not inv.dist.is_main:
        return EXIT_SOME_FAILED if summary.get("failed") else 0
    lines = [f"{args.out}: {summary['finished']} of {summary['images']} image(s) finished "
             f"({len(summary['done'])} now, {len(summary['skipped'])} before), {len(summary['failed'])} failed"]  # fmt: skip
    for s, e in summary["per_stage"].items():
        lines.append(f"  {s:<8} {e['seconds_per_image']:8.2f} s/image  mse {e.get('mse', float('nan')):.4f}"
                     + (f"  perceptual {e['perceptual']:.4f}" if "perceptual" in e else ""))  # fmt: skip
    if "generator_delta" in summary:
        d = summary["generator_delta"]
        lines.append(f"  tuned generator stored as its change: {d['mean_bytes_per_image'] / 1e6:.2f} MB per image vs "
                     f"{d['full_copy_bytes'] / 1e6:.2f} MB for a full copy ({d['ratio']:.1%})")  # fmt: skip
    if "latents" in summary:
        la = summary["latents"]
        lines.append(f"  final pivots: images/NAME/projected_w.npz (NVIDIA's layout) and stacked in "
                     f"{', '.join(la['files'])} {la['shape']}")  # fmt: skip
    lines += [f"  failed: {f['name']}: {f['reason']}" for f in summary["failed"]]
    lines += [f"  left to another process inverting it into {args.out}: {b['name']}" for b in summary.get("busy", [])]
    lines.append(f"summary: {Path(args.out) / 'summary.json'}")
    print("\n".join(lines))
    return EXIT_SOME_FAILED if summary["failed"] else 0
