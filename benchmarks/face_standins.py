"""Write random-weight stand-ins for the face files users hold, in those files' own layouts, to time the face recipe
where the real files cannot be had (no pretrained StyleGAN or e4e weights exist on these machines):

- ``stylegan2-config-f-random.pt``: rosinality's layout ``{'g_ema', 'latent_avg'}`` with config-f's shape
  (``Generator(size, 512, 8, channel_multiplier=2)``; 1024 px like ``stylegan2-ffhq-config-f.pt``);
- ``e4e-random.pt``: e4e's layout ``{'state_dict': {'encoder.*'}, 'opts', 'latent_avg'}`` with e4e's full IR-SE-50
  encoder (18 heads at 1024 px, input 256), like ``e4e_ffhq_encode.pt`` without its ``decoder.*``;
- ``ffhq_pca.pt``: e4e's GANSpace layout (a PCA of 20,000 of the random generator's mapped codes, 80 components).

The weights are random, so any timing made with them is the real networks' cost, not their quality. Usage:

    .venv/bin/python benchmarks/face_standins.py --resolution 1024 --out /tmp/faces
    nice -n 10 /usr/bin/time -v cycle-encoding invert ALIGNED.png --generator /tmp/faces/stylegan2-config-f-random.pt \\
        --encoder /tmp/faces/e4e-random.pt --stages encoder,tune --perceptual dlib-face --tune-steps 5 --out /tmp/run
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from cycle_encoding import Encoder4Editing, EncoderConfig, Generator, GeneratorConfig
from cycle_encoding.checkpoints.rosinality import export_rosinality
from cycle_encoding.editing import ganspace_pca, save_ganspace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=1024)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(args.seed)
    t = time.perf_counter()
    G = Generator(GeneratorConfig.rosinality(args.resolution, channel_multiplier=args.channel_multiplier)).eval()
    G.compute_w_avg(10_000)
    g_path = export_rosinality(G, args.out / "stylegan2-config-f-random.pt")
    E = Encoder4Editing(EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim)).eval()
    sd = {f"encoder.{k}": v for k, v in E.state_dict().items()}
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": args.resolution, "start_from_latent_avg": True}
    e_path = args.out / "e4e-random.pt"
    torch.save({"state_dict": sd, "opts": opts, "latent_avg": G.w_avg.detach()[None].repeat(G.num_ws, 1)}, e_path)
    pca = ganspace_pca(G, n_samples=20_000, components=80)
    p_path = save_ganspace(pca, args.out / "ffhq_pca.pt")
    n_g = sum(p.numel() for p in G.parameters())
    n_e = sum(p.numel() for p in E.parameters())
    print(f"{g_path}: {args.resolution} px, {G.num_ws} style layers, {n_g / 1e6:.1f} M parameters")
    print(f"{e_path}: e4e encoder, {n_e / 1e6:.1f} M parameters")
    print(f"{p_path}: GANSpace, 80 components ({time.perf_counter() - t:.0f} s in all)")


if __name__ == "__main__":
    main()
