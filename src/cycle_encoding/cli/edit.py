"""``cycle-encoding edit``: render edits of every image of an inversion run with its own (tuned) generator, and measure
them (parsing and printing only; the work is in ``editing/render.py``)."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from ..checkpoints.run_folder import EDITS, InversionRun, check_output
from ..editing.classifier import as_scorer, parse_pair, scorer_name
from ..editing.directions import parse_layers, parse_strengths
from ..editing.measures import build_preservation
from ..editing.render import named_directions, plan_edit, render_run_edits
from ..utils import resolve_device
from .common import (
    EXIT_SOME_FAILED,
    add_classifier_args,
    add_command,
    add_device_arg,
    add_progress_arg,
    check_output_folder,
    comma_list,
)

NUMBER_LIST = re.compile(r"^-\d+$|^-\d*\.\d+$|^-[\d.]+(?:[eE][-+]?\d+)?(?:,[-+]?[\d.]+(?:[eE][-+]?\d+)?)*$")


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "edit", cmd_edit,
        help="render edits (InterFaceGAN, GANSpace, SeFa) of an inversion run's images with their tuned generators",
        description="For each finished image of RUN_DIR (made by `cycle-encoding invert`), moves its pivot along a "
        "direction by each strength and renders it with the image's tuned generator (rebuilt from the base and the "
        "stored change; the base generator when the run did not tune). Strength 0 gives the reconstruction bit for "
        "bit (checked against the run's hash). Writes RUN_DIR/edits/TAG/NAME/*.png, a labelled strip per image and "
        "edit.json, with the measures asked for (--lec, --classifier, --preservation). Exit status: 0 all edited, 3 "
        "some image folders could not be read (listed; the others are edited), 2 bad input (nothing written; an "
        "earlier edit of the name is kept).",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an inversion run folder")
    add_direction_args(p)
    p.add_argument(
        "--name", default=None, help="the edit's folder name under RUN_DIR/edits (default: from the direction)"
    )
    p.add_argument("--out", type=Path, default=None, help="write the edits here instead of RUN_DIR/edits/TAG")
    p.add_argument("--generator", default=None, help="the base generator file, when the run's is not where it was")
    p.add_argument("--images", default=None, help="comma-separated image names to edit (default: all finished)")
    p.add_argument("--lec", action="store_true", help="measure Latent Editing Consistency with the run's encoder")
    p.add_argument("--encoder", default=None, help="encoder file for LEC (default: the run's; implies --lec)")
    add_classifier_args(p, " to measure edit success", "logit A - logit B")
    p.add_argument("--preservation", default=None,
                   help="distance to the reconstruction: mse, lpips-alex / lpips-vgg (need --preservation-weights), "
                        "dlib-face, or identity:NAME (identity:arcface, identity:dlib-face)")  # fmt: skip
    p.add_argument("--preservation-weights", default=None, help="weights file of the preservation network")
    p.add_argument("--all-images", action="store_true",
                   help="with a class edit ('A vs B'): measure on every image, not only on the images the "
                   "classifier puts in class A or B")  # fmt: skip
    p.add_argument("--no-gif", action="store_true", help="do not write each image's sweep as a GIF")
    p.add_argument("--allow-base-generator", action="store_true",
                   help="when the run tuned but did not store its generators, edit with the base generator")  # fmt: skip
    p.add_argument("--quiet", action="store_true", help="no line per image (the summary only)")
    add_device_arg(p)
    add_progress_arg(p)


def add_direction_args(p: argparse.ArgumentParser) -> None:
    """The edit's direction, component, strengths, layers and mode as ``edit`` takes them (also ``video``'s)."""
    # "--strengths -3,-1.5,0" must read "-3,-1.5,0" as the value: argparse takes only plain negative numbers for
    # values, so widen its test to comma-separated lists of numbers ("--strengths=-3,..." works in any case)
    if hasattr(p, "_negative_number_matcher"):
        p._negative_number_matcher = NUMBER_LIST
    p.add_argument("--direction", required=True, metavar="FILE_OR_NAME",
                   help="a direction file (InterFaceGAN .pt/.npy, GANSpace .pt, SeFa factor .pt, own .safetensors) "
                        "or a name computed from the run's generator: sefa, ganspace")  # fmt: skip
    p.add_argument("--component", default="0",
                   help="which direction of a set: a number counted from 0, as everywhere in the project (0, the "
                        "default, is the first: SeFa's and GANSpace's strongest), or a name; with a GANSpace PCA file (e4e's "
                        "ffhq_pca.pt) also a named edit: eye_openness, smile, trimmed_beard, white_hair, lipstick "
                        "(its component, layers, set mode and strength, from e4e)")  # fmt: skip
    p.add_argument("--strengths", default=None,
                   help="comma-separated strengths (default -3,-1.5,0,1.5,3; a named GANSpace edit: its own); "
                        "GANSpace: in standard deviations")  # fmt: skip
    p.add_argument("--layers", default=None, metavar="A-B",
                   help="style layers to edit, inclusive (e.g. 0-5 or 0,2,4; default: the set's own (SeFa), else all)")  # fmt: skip
    p.add_argument("--mode", choices=("add", "set"), default=None,
                   help="add (default): w += strength * direction; set (default of named GANSpace edits): e4e's "
                        "GANSpace edits, the component's coordinate set to the strength")  # fmt: skip


def cmd_edit(args: argparse.Namespace) -> int:
    run = InversionRun(args.run_dir)
    layers = parse_layers(args.layers)
    check_output_folder(args.out if args.out is not None else run.dir / EDITS, "--out")
    if args.out is not None:  # never into a run's own files, but its edits
        check_output(args.out / "edit.json", "--out", allowed=[run.dir / EDITS])
    dev = resolve_device(args.device)
    base = run.load_generator(args.generator, dev)
    ds = named_directions(args.direction, base)
    request = plan_edit(ds, args.component, parse_strengths(args.strengths) if args.strengths else None, layers,
                        args.mode, args.name)  # fmt: skip
    strengths = list(request.strengths)
    encoder = args.encoder if args.encoder else ("run" if args.lec else None)
    scorer = as_scorer(args.classifier, args.attribute, dev) if args.classifier else None
    pres = build_preservation(args.preservation, dev, args.preservation_weights) if args.preservation else None
    images = comma_list(args.images) if args.images else None
    members = members_info = None
    pair = parse_pair(args.attribute) if args.classifier else None
    if pair is not None and not args.all_images:  # a class edit is measured on images of its two classes
        members = as_scorer(args.classifier, args.attribute, dev, labels=True)
        members_info = {"classes": list(pair), "classifier": str(args.classifier)}
    doc = render_run_edits(
        run, request, generator=base, device=dev, encoder=encoder, scorer=scorer,
        scorer_name=scorer_name(scorer, args.attribute) if scorer else None, preservation=pres,
        allow_base=args.allow_base_generator, out_dir=args.out, log=(lambda s: None) if args.quiet else None,
        images=images, progress="none" if args.quiet else args.progress, members=members,
        members_info=members_info, gif=not args.no_gif,
    )  # fmt: skip
    out = args.out or run.dir / EDITS / doc["tag"]
    tuned = sum(1 for r in doc["images"] if r["generator"] == "tuned")
    lines = [f"{out}: {len(doc['images'])} image(s) x {len(strengths)} strengths "
             f"({tuned} with their tuned generator), layers {doc['layers']}"]  # fmt: skip
    bad = [r["name"] for r in doc["images"] if r.get("strength0_is_reconstruction") is False]
    if bad:
        lines.append(f"  WARNING: strength 0 differs from the stored reconstruction for {', '.join(bad[:5])}")
    ms = doc["measures"]
    for key, field, form, label in (("lec", "lec", ".4f", "LEC (mean over images)"),
                                    ("edit_success", "score_change", "+.4f", "score change ({classifier})"),
                                    ("preservation", "value", ".4f", "preservation ({measure}, {kind})")):  # fmt: skip
        if key in ms:
            vals = ", ".join(f"{a:+g}: {r[field]['mean']:{form}}" for a, r in zip(strengths, ms[key]["per_strength"]))
            lines.append(f"  {label.format(**ms[key])} {vals}")
    if "measured_on" in doc:
        m = doc["measured_on"]
        lines.append(f"  measured on {len(m['images'])} image(s) of classes {' / '.join(m['classes'])}; "
                     f"{len(m['left_out'])} of other classes left out")  # fmt: skip
    lines += [f"  failed: {f['name']}: {f['reason']}" for f in doc.get("failed", [])]
    lines.append(f"details: {Path(out) / 'edit.json'}")
    print("\n".join(lines))
    return EXIT_SOME_FAILED if doc.get("failed") else 0
