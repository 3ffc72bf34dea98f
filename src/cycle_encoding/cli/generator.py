"""Commands about generators: info, generate, convert."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import convert_generator
from ..checkpoints.delta import open_generator
from ..checkpoints.inspect import inspect_file
from ..checkpoints.latents import latent_names, load_latents
from ..checkpoints.rosinality import rosinality_note
from ..errors import CycleEncodingError
from ..progress import Progress
from ..sampling import MAX_SEED, MAX_TRUNCATION, TRUNCATION_WHY, render_seeds
from ..utils import check_finite, make_grid, parse_int_list, save_image
from .common import (
    add_command,
    add_device_arg,
    add_progress_arg,
    check_output_file,
    check_output_folder,
    print_result,
)

MAX_SEEDS = 1_000_000  # images one `generate` writes at most
MAX_CODES = 10_000  # codes of a --projected-w file rendered without --max-codes (a small .npz can hold 250,000)
GRID_IMAGES = 64  # grid.png shows the first images only: the others are not kept in memory


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = add_command(
        sub, common, "info", cmd_info,
        help="what a checkpoint file is and holds",
        description="Reads FILE without running any code from it and prints its format (docs/FORMATS.md), the "
        "architecture read from its tensors (resolution, number of codes num_ws, style size, widths, image channels), "
        "the parameter count, whether w_avg is stored, what else the file holds and, for the project's files "
        "(generator, encoder, classifier, a tuned generator's stored change, directions), how each was made.",
    )  # fmt: skip
    p.add_argument("file", type=Path, metavar="FILE",
                   help="a checkpoint file of any supported format, or a shipped model's name (e.g. fmnist-generator)")  # fmt: skip
    p.add_argument("--json", action="store_true", help="print everything as JSON instead of text")
    p.add_argument("--brief", action="store_true",
                   help="one line: format, network, resolution, codes and parameter count (no provenance)")  # fmt: skip

    p = add_command(
        sub, common, "generate", cmd_generate,
        help="render a generator's samples by seed, or codes from a file (--projected-w)",
        description="Renders images with a generator: by seed (z drawn as NVIDIA's generate.py does, so seed 42 here "
        "is seed 42 there) or the codes of --projected-w, written as seedNNNN.png or projNN.png plus grid.png. A tuned "
        "generator stored as its change (generator_delta.safetensors) is rebuilt on its base (--base, else the base "
        "it records).",
    )  # fmt: skip
    p.add_argument("--generator", "-g", "--network", required=True, type=Path,
                   help="generator file (any supported format, a stored change, or a shipped name; --network as "
                   "NVIDIA's generate.py names it)")  # fmt: skip
    p.add_argument("--base", type=Path, default=None,
                   help="the base generator of a stored change (default: the base file the change records)")  # fmt: skip
    p.add_argument("--seeds", default=None, help="seeds, e.g. 0-7 or 1,5,9 (default 0-7)")
    p.add_argument("--projected-w", type=Path, default=None, metavar="FILE",
                   help="render these codes instead of seeds: .npz (key w, NVIDIA's projector), .pt or .npy, "
                   "[n, num_ws, w_dim] (or [n, w_dim]: one W code per image)")  # fmt: skip
    p.add_argument("--truncation", "--trunc", type=float, default=None,
                   help=f"truncation psi toward w_avg, -{MAX_TRUNCATION:g} .. {MAX_TRUNCATION:g} (default 1.0; seeds)")  # fmt: skip
    p.add_argument("--noise", choices=["const", "random", "none"], default="const", help="noise mode (default const)")
    p.add_argument("--out", "-o", "--outdir", required=True, type=Path, help="output folder")
    p.add_argument("--max-codes", type=int, default=MAX_CODES, metavar="N",
                   help=f"--projected-w: refuse a file of more than N codes, one image each (default {MAX_CODES:,})")  # fmt: skip
    p.add_argument("--batch-size", type=int, default=8)
    add_device_arg(p)
    add_progress_arg(p)

    p = add_command(
        sub, common, "convert", cmd_convert,
        help="convert a generator to the own format or rosinality .pt",
        description="Reads SRC (any supported format, docs/FORMATS.md, or a tuned generator's stored change rebuilt "
        "on its base) and writes DST: the project's .safetensors or rosinality's {'g_ema', 'latent_avg'} .pt, which "
        "rosinality/stylegan2-pytorch, e4e and PTI load when rosinality's Generator builds its widths and 3 image "
        "channels (otherwise a note, and the file, say what to patch in that class; this project reads any).",
    )  # fmt: skip
    p.add_argument("src", type=Path, metavar="SRC", help="the generator file to read (any supported format)")
    p.add_argument("dst", type=Path, metavar="DST", help="the file to write (.safetensors or .pt)")
    p.add_argument("--to", choices=["native", "rosinality"], default=None,
                   help="target format (default: from DST's extension: .safetensors -> native, .pt -> rosinality)")  # fmt: skip
    p.add_argument("--base", type=Path, default=None,
                   help="the base generator when SRC is a stored change (default: the base file the change records)")  # fmt: skip


def cmd_info(args: argparse.Namespace) -> int:
    info = inspect_file(args.file)
    if args.brief:
        print(brief_line(info))
        return 0
    if "parameters" in info and not args.json:
        info = {**info, "parameters": f"{info['parameters']:,}"}
    print_result(info, args.json)
    return 0


def brief_line(info: dict) -> str:
    """``info --brief``: the file, its format and network, and the architecture's headline numbers, on one line."""
    arch = info.get("architecture") or {}
    parts = [str(info.get("format", "?")), str(info.get("network", "?"))]
    if "resolution" in arch:
        parts.append(f"{arch['resolution']}x{arch['resolution']}x{arch.get('img_channels', '?')}")
    elif "input_size" in arch:
        parts.append(f"input {arch['input_size']}x{arch['input_size']}x{arch.get('in_channels', '?')}")
    if "num_ws" in arch:
        parts.append(f"{arch['num_ws']} codes of {arch.get('style_dim', arch.get('w_dim', '?'))}")
    if isinstance(info.get("parameters"), int):
        parts.append(f"{info['parameters']:,} parameters")
    return f"{info['file']}: " + ", ".join(parts)


def cmd_generate(args: argparse.Namespace) -> int:
    # every value checked before the generator is read: one clear line, exit 2
    if args.projected_w is not None and (args.seeds is not None or args.truncation is not None):
        raise CycleEncodingError("--projected-w renders the file's codes: --seeds and --truncation do not apply")
    for option, value in (("--batch-size", args.batch_size), ("--max-codes", args.max_codes)):
        if value < 1:
            raise CycleEncodingError(f"{option} must be 1 or more, got {value}")
    check_output_folder(args.out, "--out")
    seeds: list[int] = []
    if args.projected_w is None:
        seeds = parse_int_list(args.seeds or "0-7", low=0, high=MAX_SEED, max_count=MAX_SEEDS, what="--seeds")
        args.truncation = 1.0 if args.truncation is None else args.truncation
        check_finite(args.truncation, "--truncation", MAX_TRUNCATION, TRUNCATION_WHY)
    G = open_generator(args.generator, args.base, device=args.device)
    if args.projected_w is None:
        batches = (images for _, images in render_seeds(G, seeds, args.truncation, args.noise, args.batch_size))
        write_images(batches, [f"seed{s:04d}" for s in seeds], args)
        return 0
    # one image per code, named as the codes' latents.txt names them, else projNN.png as NVIDIA's generate.py does
    ws = load_latents(args.projected_w, G.num_ws, G.w_dim, max_count=args.max_codes)
    named = latent_names(args.projected_w, len(ws))
    batches = (G.synthesis(w.to(G.w_avg.device), noise_mode=args.noise).cpu() for w in ws.split(args.batch_size))
    how = f"named as {args.projected_w.with_suffix('.txt').name} names them" if named else "proj00.png ..."
    write_images(batches, named or [f"proj{i:02d}" for i in range(len(ws))], args, f" ({how})")
    return 0


def write_images(batches: Iterator[Any], names: list[str], args: argparse.Namespace, note: str = "") -> None:
    """The images of ``batches`` as OUT/NAME.png in order, grid.png of the first GRID_IMAGES (the others are not
    kept in memory), and the line saying what was written."""
    args.out.mkdir(parents=True, exist_ok=True)
    shown: list[Any] = []
    with torch.no_grad(), Progress(len(names), "generate", "img", args.progress, heartbeat=30) as bar:
        for images in batches:
            for name, im in zip(names[bar.done :], images):
                save_image(im, args.out / f"{name}.png")
            shown += list(images[: GRID_IMAGES - len(shown)])
            bar.update(len(images))
    save_image(make_grid(torch.stack(shown).clamp(-1, 1)), args.out / "grid.png")
    first = f" (the first {len(shown)})" if len(names) > len(shown) else ""
    print(f"wrote {len(names)} images{note} and grid.png{first} to {args.out}")


def cmd_convert(args: argparse.Namespace) -> int:
    to = args.to or ("rosinality" if args.dst.suffix in (".pt", ".pth") else "native")
    check_output_file(args.dst, "DST", inputs=(args.src, args.base))
    G = open_generator(args.src, args.base)  # a stored change is rebuilt on its base
    out = convert_generator(args.src, args.dst, to=to, generator=G)
    print(f"wrote {out} ({to})")
    if to == "rosinality":
        rosinality_warning(G)
    return 0


def rosinality_warning(G) -> None:
    """After writing rosinality's layout: on stderr, what loads the file when rosinality's own class cannot build G."""
    note = rosinality_note(G.config)
    if note:
        print(f"note: {note}", file=sys.stderr)
