"""``cycle-encoding export``: an image's tuned generator from an inversion run as a standalone file (parsing and
printing only; the run is read and the change rebuilt by ``checkpoints/run_folder.py``)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..checkpoints.delta import weights_sha256
from ..checkpoints.generator import load_generator, save_generator
from ..checkpoints.native import default_provenance
from ..checkpoints.rosinality import export_rosinality
from ..checkpoints.run_folder import InversionRun, tensor_sha256
from ..editing.render import render_one
from ..errors import CycleEncodingError
from .common import add_command, check_output_file
from .generator import rosinality_warning

FORMATS = {"rosinality": ".pt", "safetensors": ".safetensors"}


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "export", cmd_export,
        help="write an image's tuned generator (base + stored change) as a standalone file",
        description="Rebuilds the generator that pivotal tuning made for IMAGE of RUN_DIR (base + stored change, "
        "checked against the run's hash) as a standalone file (--format; docs/FORMATS.md, Other StyleGAN tools) and "
        "checks it by rendering the image's pivot: it must give the run's tuned reconstruction, bit for bit.",
    )  # fmt: skip
    p.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="an inversion run folder (cycle-encoding invert)")
    p.add_argument("image", metavar="IMAGE", help="the image's name in the run (a folder name under RUN_DIR/images)")
    p.add_argument("--format", choices=tuple(FORMATS), default="rosinality",
                   help="rosinality: {'g_ema', 'latent_avg'} .pt (default); safetensors: the project's own format")  # fmt: skip
    p.add_argument("--out", "-o", type=Path, default=None,
                   help="the file to write (default RUN_DIR/images/IMAGE/tuned_generator.pt or .safetensors)")  # fmt: skip
    p.add_argument("--generator", default=None,
                   help="the run's base generator, when its file is no longer where the run recorded it")  # fmt: skip


def cmd_export(args: argparse.Namespace) -> int:
    run = InversionRun(args.run_dir)
    image = run.image(run.find_images([args.image])[0])
    if not image.tuned:
        raise CycleEncodingError(
            f"{args.image} was not tuned (stages {', '.join(image.stages)}): its generator is the run's base "
            f"generator, {run.generator_file()}"
        )
    out = args.out or image.folder / f"tuned_generator{FORMATS[args.format]}"
    check_output_file(out, "--out", inputs=(args.generator, run.generator_file(), image.delta_path),
                      allowed=[image.folder / f"tuned_generator{s}" for s in FORMATS.values()])  # fmt: skip
    base = run.load_generator(args.generator, "cpu")
    G, _ = run.generator_for(image, base)
    tuned_sha = weights_sha256(G)
    if args.format == "rosinality":
        export_rosinality(G, out)
        rosinality_warning(G)  # a generator of other widths than rosinality's: what loads it
    else:
        prov = default_provenance(
            made_by="cycle-encoding export", run=str(run.dir), image=args.image,
            base_weights_sha256=(run.config.get("generator") or {}).get("weights_sha256"), weights_sha256=tuned_sha,
        )  # fmt: skip
        save_generator(G, out, prov)
    # the file as another program would read it: it must render the run's tuned reconstruction bit for bit
    back = load_generator(out, "cpu")
    same = tensor_sha256(render_one(back, image.pivot)) == image.recon_sha256
    check = "renders the run's tuned reconstruction bit for bit"
    if not same:
        made_on = image.result.get("device", "another device")
        check = f"WARNING: its rendering differs from the run's tuned reconstruction (the run rendered on {made_on})"
    print(f"wrote {out} ({args.format}; {args.image}'s tuned generator, weights sha256 {tuned_sha[:12]}...; {check})")
    return 0
