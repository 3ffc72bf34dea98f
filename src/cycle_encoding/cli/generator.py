"""Commands about generators: info, generate, convert."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from tqdm import tqdm

from .common import add_device_arg, check_output_file, check_output_folder, print_json

MAX_SEEDS = 1_000_000  # images one `generate` writes at most


def register(sub: argparse._SubParsersAction, common: argparse.ArgumentParser) -> None:
    p = sub.add_parser("info", parents=[common], help="what a checkpoint file is and holds")
    p.add_argument("file", type=Path)
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("generate", parents=[common], help="render a generator's samples by seed")
    p.add_argument("--generator", "-g", required=True, type=Path, help="generator file (any supported format)")
    p.add_argument("--seeds", default="0-7", help="seeds, e.g. 0-7 or 1,5,9 (default 0-7)")
    p.add_argument("--truncation", type=float, default=1.0, help="truncation psi toward w_avg (default 1.0)")
    p.add_argument("--noise", choices=["const", "random", "none"], default="const", help="noise mode (default const)")
    p.add_argument("--out", "-o", required=True, type=Path, help="output folder")
    p.add_argument("--batch-size", type=int, default=8)
    add_device_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("convert", parents=[common], help="convert a generator to the own format or rosinality .pt")
    p.add_argument("src", type=Path)
    p.add_argument("dst", type=Path)
    p.add_argument("--to", choices=["native", "rosinality"], default=None,
                   help="target format (default: from the extension: .safetensors -> native, .pt -> rosinality)")  # fmt: skip
    p.set_defaults(func=cmd_convert)


def _text(info: dict, indent: int = 0) -> list[str]:
    lines = []
    pad = "  " * indent
    for k, v in info.items():
        if isinstance(v, dict):
            if all(not isinstance(x, (dict, list)) for x in v.values()) and len(v) > 6:
                lines.append(f"{pad}{k}: " + json.dumps(v))
            else:
                lines.append(f"{pad}{k}:")
                lines += _text(v, indent + 1)
        elif isinstance(v, list) and len(v) <= 8 and all(isinstance(x, (int, float)) for x in v):
            lines.append(f"{pad}{k}: {v}")
        elif isinstance(v, list):
            lines.append(f"{pad}{k}:")
            lines += [f"{pad}  - {x}" for x in v]
        else:
            lines.append(f"{pad}{k}: {v}")
    return lines


def cmd_info(args: argparse.Namespace) -> int:
    from ..checkpoints.inspect import inspect_file

    info = inspect_file(args.file)
    if args.json:
        print_json(info)
    else:
        if "parameters" in info:
            info = {**info, "parameters": f"{info['parameters']:,}"}
        print("\n".join(_text(info)))
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from .. import load_generator
    from ..errors import CycleEncodingError
    from ..sampling import MAX_SEED, render_seeds
    from ..utils import check_finite, make_grid, parse_int_list, save_image

    # every value checked before the generator is read: one clear line, exit 2
    seeds = parse_int_list(args.seeds, low=0, high=MAX_SEED, max_count=MAX_SEEDS, what="--seeds")
    check_finite(args.truncation, "--truncation")
    if args.batch_size < 1:
        raise CycleEncodingError(f"--batch-size must be 1 or more, got {args.batch_size}")
    check_output_folder(args.out, "--out")
    G = load_generator(args.generator, device=args.device)
    args.out.mkdir(parents=True, exist_ok=True)
    all_images = []
    with tqdm(total=len(seeds), desc="generate", unit="img") as bar:
        for chunk, images in render_seeds(G, seeds, args.truncation, args.noise, args.batch_size):
            for s, im in zip(chunk, images):
                save_image(im, args.out / f"seed{s:04d}.png")
            all_images.append(images)
            bar.update(len(chunk))
    import torch

    grid = make_grid(torch.cat(all_images).clamp(-1, 1))
    save_image(grid, args.out / "grid.png")
    print(f"wrote {len(seeds)} images and grid.png to {args.out}")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from ..checkpoints import convert_generator

    to = args.to or ("rosinality" if args.dst.suffix in (".pt", ".pth") else "native")
    check_output_file(args.dst, "DST")
    out = convert_generator(args.src, args.dst, to=to)
    print(f"wrote {out} ({to})")
    return 0
