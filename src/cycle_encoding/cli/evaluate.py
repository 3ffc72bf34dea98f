"""``cycle-encoding evaluate``: reconstruction metrics between two folders of images paired by name."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Any

from ..checkpoints.run_folder import InversionRun
from ..errors import CycleEncodingError
from ..losses import build_identity, build_perceptual
from ..metrics import evaluate_folders, jsonable, pair_files, pair_folders
from ..progress import Progress
from ..utils import resolve_device, write_json
from .common import EXIT_SOME_FAILED, add_command, add_device_arg, add_progress_arg, check_output_file


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "evaluate", cmd_evaluate,
        help="MSE, PSNR, SSIM, MS-SSIM, perceptual distance and identity similarity between two image folders",
        description="Pairs the images of --pred and --target by file name (without extension) and reports each "
        "metric per image and as mean +- std. --pred may be an inversion run folder (cycle-encoding invert): its "
        "reconstructions after --stage are measured against the targets it inverted (or --target's files of the "
        "same names). Unmatched and unreadable files are listed, not fatal (unreadable ones make the exit status 3).",
    )  # fmt: skip
    p.add_argument("--pred", required=True, type=Path,
                   help="folder of reconstructed / predicted images, or an inversion run folder (RUN_DIR)")  # fmt: skip
    p.add_argument("--target", type=Path, default=None,
                   help="folder of the original images (default with a run: the targets the run inverted)")  # fmt: skip
    p.add_argument("--stage", default=None,
                   help="with a run folder: whose reconstructions to measure, e.g. encoder, refine, tune (default: "
                   "tune when the run tuned, else its last stage)")  # fmt: skip
    p.add_argument("--lpips-backbone", type=Path, default=None,
                   help="torchvision AlexNet/VGG16 ImageNet state dict (e.g. alexnet-owt-7be5be79.pth); "
                        "implies --perceptual lpips-alex unless another is named")  # fmt: skip
    p.add_argument("--perceptual", default=None,
                   help="perceptual distance by name: lpips-alex, lpips-vgg (need --lpips-backbone), dlib-face, "
                        "or any registered one (default: lpips-alex with --lpips-backbone, else none)")  # fmt: skip
    p.add_argument("--identity", default=None,
                   help="identity network by name: arcface, moco (need --identity-weights), dlib-face (default: none)")  # fmt: skip
    p.add_argument("--identity-weights", type=Path, default=None,
                   help="weights file of the identity network (arcface: model_ir_se50.pth; moco: the MoCo v2 file)")  # fmt: skip
    p.add_argument("--size", type=int, default=None,
                   help="resize both images to SIZE x SIZE (antialiased bilinear) before measuring, e.g. 256")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", type=Path, default=None, metavar="OUT", help="also write the full report as JSON")
    p.add_argument("--quiet", action="store_true", help="print the summary only, not the per-image table")
    add_device_arg(p)
    add_progress_arg(p)


def _fmt(v: Any) -> str:
    if isinstance(v, float) and math.isfinite(v):
        return f"{v:.4f}" if abs(v) < 1000 else f"{v:.1f}"
    return "n/a" if v is None else str(v)


def report_text(rep: dict[str, Any], per_image: bool = True) -> list[str]:
    """The human-readable lines of an evaluation report (``metrics.evaluate_folders``)."""
    metrics = rep["metrics"]
    lines = [f"paired {rep['pairs']} image(s): pred {rep['pred_dir']} vs target {rep['target_dir']}"
             + (f", resized to {rep['size']}x{rep['size']}" if rep.get("size") else "")]  # fmt: skip
    nets = rep["networks"]
    lines.append(f"perceptual: {nets['perceptual'] or 'not computed (no --perceptual / --lpips-backbone)'}")
    lines.append(f"identity: {nets['identity'] or 'not computed (no --identity)'}")
    if per_image and rep["images"]:
        w = max(8, *(len(r["name"]) for r in rep["images"]))
        lines += ["", f"{'image':<{w}}  " + "  ".join(f"{m:>10}" for m in metrics)]
        for r in rep["images"]:
            lines.append(f"{r['name']:<{w}}  " + "  ".join(f"{_fmt(r[m]):>10}" for m in metrics))
            lines += [f"{'':<{w}}  note: {n}" for n in r.get("notes", [])]
    lines += ["", f"{'metric':<11} {'mean':>10} {'std':>10} {'n':>5}"]
    for m in metrics:
        s = rep["summary"][m]
        lines.append(f"{m:<11} {_fmt(s['mean']):>10} {_fmt(s['std']):>10} {s['n']:>5}")
        if s.get("note"):
            lines.append(f"{'':<11} {s['note']}")
    for key, label in (("pred_only", "unmatched, only in pred"), ("target_only", "unmatched, only in target")):
        if rep[key]:
            lines.append(f"{label}: {', '.join(rep[key])}")
    lines += [f"unreadable: {u['file']}: {u['reason']}" for u in rep["unreadable"]]
    lines += [f"skipped {s['name']}: {s['reason']}" for s in rep["skipped"] if s["reason"] != "unreadable file"]
    lines += [f"ambiguous: {a}" for a in rep["ambiguous"]]
    return lines + [f"ignored: {i}" for i in rep["ignored"]]


def cmd_evaluate(args: argparse.Namespace) -> int:
    if args.json is not None:
        check_output_file(args.json, "--json")
    if args.size is not None and args.size < 1:
        raise CycleEncodingError(f"--size must be positive, got {args.size}")
    device = resolve_device(args.device)
    name = args.perceptual or ("lpips-alex" if args.lpips_backbone is not None else None)
    perceptual = build_perceptual(name, device, args.lpips_backbone) if name else None
    if args.identity_weights is not None and args.identity is None:
        raise CycleEncodingError("--identity-weights given without --identity (arcface, moco, ...)")
    identity = build_identity(args.identity, device, args.identity_weights) if args.identity else None

    pairing = None
    pred_label, target_label = args.pred, args.target
    if (args.pred / "config.json").is_file():  # an inversion run folder
        run = InversionRun(args.pred)
        stage, recons, targets = run.stage_files(args.stage)
        if not recons:
            raise CycleEncodingError(f"{args.pred}: no finished image has a reconstruction after stage {stage!r}")
        pairing = pair_files(recons, targets if args.target is None else args.target)
        pred_label = f"{args.pred} (stage {stage})"
        target_label = args.target or f"{args.pred} (the targets inverted)"
    elif args.stage is not None and not args.pred.exists():
        raise CycleEncodingError(f"no such run folder: {args.pred}")
    elif args.stage is not None:
        raise CycleEncodingError(f"--stage is for an inversion run folder; {args.pred} is not one (no config.json)")
    elif args.target is None:
        raise CycleEncodingError("--target is required (a folder of the original images) unless --pred is a run folder")
    else:
        pairing = pair_folders(args.pred, args.target)
    with Progress(len(pairing.pairs), "evaluate", "pair", args.progress, heartbeat=30) as bar:
        rep = evaluate_folders(
            pred_label, target_label, perceptual, identity, size=args.size, batch_size=max(1, args.batch_size),
            device=device, progress=bar.update, pairing=pairing,
        )  # fmt: skip
    print("\n".join(report_text(rep, per_image=not args.quiet)))
    if args.json is not None:
        write_json(args.json, jsonable(rep))
        print(f"wrote {args.json}")
    if rep["pairs"] == 0:
        raise CycleEncodingError(f"no image pairs could be measured between {args.pred} and {args.target}")
    return EXIT_SOME_FAILED if rep["unreadable"] else 0
