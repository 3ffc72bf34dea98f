"""Build a StyleGAN2 generator, save it in the project's format and export it to rosinality's layout,
then check that both files load back to the same images. Until a trained generator ships with the
project (the Fashion-MNIST issue), the generator is freshly initialised: its samples are not images of
anything, but every part of the loading and rendering path is exercised."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

import cycle_encoding as ce


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--resolution", type=int, default=64)
    args = ap.parse_args()
    torch.manual_seed(0)
    G = ce.Generator(ce.GeneratorConfig.rosinality(args.resolution, channel_multiplier=1))
    G.compute_w_avg()
    native = ce.save_generator(G, args.out / "generator.safetensors", provenance={"made_by": "demo, random init"})
    ce.convert_generator(native, args.out / "generator.pt", to="rosinality")
    z = torch.randn(4, G.z_dim)
    with torch.no_grad():
        a = ce.load_generator(native)(z, truncation=0.7)
        b = ce.load_generator(args.out / "generator.pt")(z, truncation=0.7)
    same = torch.equal(a, b)
    print(f"wrote {native} and {args.out / 'generator.pt'}; both render identical images: {same}")
    if not same:
        raise SystemExit("the two formats disagree")


if __name__ == "__main__":
    main()
