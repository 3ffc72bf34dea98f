"""Seconds per encoder-training step at the paper's sizes (or smaller), with random weights.

Builds a random StyleGAN2 (rosinality config, given resolution and channel multiplier), a folder of random
training images, and runs a few steps of `train-encoder` (full IR-SE-50 e4e encoder unless told otherwise,
latent discriminator with R1, perceptual term off since no LPIPS backbone exists here). Prints s/step and the
implied time for the paper's 750k-step schedule. Usage:

    .venv/bin/python benchmarks/encoder_training.py --resolution 1024 --image-size 256 --batch-size 8 --device cuda
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import cycle_encoding as ce
from cycle_encoding.training.encoder_trainer import EncoderTrainer, load_train_config
from cycle_encoding.utils import save_image


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--small-encoder", action="store_true", help="widths 16-64, one unit per block")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        torch.manual_seed(0)
        G = ce.Generator(ce.GeneratorConfig.rosinality(args.resolution, channel_multiplier=args.channel_multiplier))
        G.compute_w_avg(1000)
        ce.save_generator(G, root / "g.safetensors")
        (root / "data").mkdir()
        for i in range(2 * args.batch_size):
            save_image(torch.rand(3, args.image_size, args.image_size) * 2 - 1, root / "data" / f"{i}.png")
        enc = {"widths": [16, 32, 48, 64], "units": [1, 1, 1, 1]} if args.small_encoder else {}
        cfg = load_train_config(dict(
            generator=str(root / "g.safetensors"), data=str(root / "data"), out=str(root / "runs"), preset="paper",
            batch_size=args.batch_size, perceptual="none", image_size=args.image_size, val_count=0, encoder=enc,
            device=args.device, log_every=1000, image_every=10**9, val_every=10**9, checkpoint_every=10**9,
        ))  # fmt: skip
        t = EncoderTrainer(cfg, quiet=True)
        t.step = 60_000  # W+ stage: all heads active, the most expensive phase
        t.train_step()  # warm-up
        dev = t.device
        if dev.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for _ in range(args.steps):
            t.train_step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t0) / args.steps
        n_e = sum(p.numel() for p in t.E.parameters())
        print(f"device={dev} G={args.resolution}px cm={args.channel_multiplier} encoder={n_e / 1e6:.1f}M params "
              f"batch={args.batch_size} image={args.image_size}: {dt:.3f} s/step; "
              f"750k steps = {dt * 750_000 / 3600:.1f} h")  # fmt: skip
        t.close()


if __name__ == "__main__":
    main()
