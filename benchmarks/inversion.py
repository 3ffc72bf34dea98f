"""Inversion speed and quality per stage: seconds per image and the reconstruction reached (MSE, PSNR, perceptual).

By default everything is made up on the spot, so the script runs anywhere: a randomly initialized StyleGAN2 of the
size asked for, a randomly initialized encoder scaled to it, targets that are the generator's own images (so a perfect
reconstruction exists), the refinement's "training images" also the generator's own, and as perceptual distance
LPIPS-AlexNet with random weights (the real network's cost; its values mean nothing, so the early stop is off unless
--stop-threshold is given). Files can replace each part: --generator, --encoder, --targets, --train-data, and
--perceptual NAME (with --lpips-backbone). The stored generator change is measured too (size against a full copy).

    .venv/bin/python benchmarks/inversion.py --resolution 64 --channel-max 128 --images 2 \
        --encoder-widths 16,32,64,128 --encoder-units 1,1,1,1
    .venv/bin/python benchmarks/inversion.py --resolution 256 --stages encoder,tune --tune-steps 50 --device cuda

Compare figures only between runs on the same machine, ideally in one sitting (shared machines are noisy).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from cycle_encoding import Encoder4Editing, EncoderConfig, Generator, GeneratorConfig
from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.inversion import Inverter, save_generator_delta
from cycle_encoding.losses.perceptual import LPIPSDistance
from cycle_encoding.networks.lpips import LPIPS
from cycle_encoding.utils import resolve_device


def random_lpips() -> LPIPSDistance:
    """LPIPS-AlexNet with random backbone and (positive) heads: the cost of the real thing, not its values."""
    torch.manual_seed(123)
    net = LPIPS("alex")
    with torch.no_grad():
        for lin in net.lins:
            lin.weight.abs_()
    return LPIPSDistance(net, "random weights: timing only")


def own_images(G: Generator, n: int, seed: int) -> torch.Tensor:
    out = []
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(n):
            z = torch.randn(1, G.z_dim, generator=g).to(G.w_avg.device)
            out.append(G(z, truncation=0.7).clamp(-1, 1).cpu())
    return torch.cat(out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--channel-max", type=int, default=512, help="widest layer (512 in real StyleGAN2s)")
    ap.add_argument("--generator", default=None, help="a generator file instead of a random one")
    ap.add_argument("--encoder", default=None, help="an encoder file instead of a random one")
    ap.add_argument("--encoder-widths", default="64,128,256,512", help="random encoder: body widths")
    ap.add_argument("--encoder-units", default="3,4,14,3", help="random encoder: units per block (IR-SE-50)")
    ap.add_argument("--targets", default=None, help="a folder of target images instead of the generator's own")
    ap.add_argument("--train-data", default=None, help="refinement training images (default: the generator's own)")
    ap.add_argument("--images", type=int, default=2, help="number of targets (default 2)")
    ap.add_argument("--stages", default="encoder,refine,project,tune")
    ap.add_argument("--perceptual", default=None, help="a perceptual distance by name (default: random LPIPS-Alex)")
    ap.add_argument("--lpips-backbone", default=None)
    ap.add_argument("--refine-steps", type=int, default=16)
    ap.add_argument("--refine-random", type=int, default=7)
    ap.add_argument("--project-steps", type=int, default=450)
    ap.add_argument("--tune-steps", type=int, default=350)
    ap.add_argument("--stop-threshold", type=float, default=None, help="tuning early stop (default: off)")
    ap.add_argument("--no-locality", action="store_true")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)

    if args.generator:
        from cycle_encoding import load_generator

        G = load_generator(args.generator, device=device)
    else:
        torch.manual_seed(0)
        cfg = GeneratorConfig.rosinality(args.resolution, channel_multiplier=args.channel_multiplier)
        G = Generator(GeneratorConfig(**{**cfg.to_dict(), "channel_max": args.channel_max}))
        G = G.to(device).eval().requires_grad_(False)
        G.compute_w_avg(2000)
    stages = tuple(s.strip() for s in args.stages.split(",") if s.strip())
    E = None
    if "encoder" in stages or "refine" in stages:
        if args.encoder:
            E = args.encoder
        else:
            torch.manual_seed(1)
            E = Encoder4Editing(EncoderConfig(
                num_ws=G.num_ws, w_dim=G.w_dim, input_size=min(256, max(16, G.resolution)),
                in_channels=G.img_channels, widths=tuple(int(v) for v in args.encoder_widths.split(",")),
                units=tuple(int(v) for v in args.encoder_units.split(",")),
            )).to(device)  # fmt: skip
            E.set_w_avg(G.w_avg)
            E.eval()
    size = min(G.resolution, 256)
    train_images = None
    if "refine" in stages and not args.train_data:
        imgs = own_images(G, max(32, args.refine_random + 1), seed=1)
        imgs = torch.nn.functional.adaptive_avg_pool2d(imgs, size) if imgs.shape[-1] != size else imgs
        train_images = TensorDataset(imgs, name="the generator's own images")
    perceptual_net = None
    options: dict = {
        "stages": stages,
        "identity": "none",
        "train_data": args.train_data,
        "refine": {"steps": args.refine_steps, "num_random": args.refine_random},
        "project": {"steps": args.project_steps, "w_avg_samples": 10_000},
        "tune": {"steps": args.tune_steps, "stop_threshold": args.stop_threshold, "locality": not args.no_locality},
    }
    if args.perceptual:
        options["perceptual"] = args.perceptual
        options["lpips_backbone"] = args.lpips_backbone
    else:
        perceptual_net = random_lpips()
    inv = Inverter(G, E, options, device=device, perceptual_net=perceptual_net, train_images=train_images)
    if args.targets:
        from cycle_encoding.inversion import list_targets

        targets: list = list_targets(args.targets)[0][: args.images]
    else:
        targets = list(own_images(G, args.images, seed=99))

    nets = inv.network_names()
    params = sum(p.numel() for p in G.parameters())
    print(f"device={device} threads={torch.get_num_threads()} generator {G.resolution}px {params / 1e6:.1f}M params, "
          f"{G.num_ws} codes; perceptual: {nets['perceptual']}; images: {len(targets)}")  # fmt: skip
    rows: dict[str, dict[str, list[float]]] = {}
    delta_bytes, delta_secs, full = [], [], 0
    with tempfile.TemporaryDirectory() as tmp:
        for i, x in enumerate(targets):
            res = inv.invert(x, index=i)
            for s in stages:
                r = rows.setdefault(s, {"sec": [], "mse": [], "psnr": [], "perceptual": [], "steps": []})
                r["sec"].append(res.timings[s])
                for m in ("mse", "psnr", "perceptual"):
                    if m in res.metrics[s]:
                        r[m].append(res.metrics[s][m])
                n = sum(1 for rec in res.losses if rec.get("stage") == s)
                r["steps"].append(res.tune["updates"] if s == "tune" and res.tune else n)
            if res.generator is not None:
                t = time.perf_counter()
                d = save_generator_delta(G, res.generator, Path(tmp) / f"d{i}.safetensors", base_sha256=inv.g_sha256)
                delta_secs.append(time.perf_counter() - t)
                delta_bytes.append(d.file_bytes)
                full = d.full_copy_bytes
    print(f"{'stage':<8} {'s/image':>9} {'steps':>6} {'mse':>8} {'psnr':>7} {'perceptual':>10}")
    for s, r in rows.items():

        def mean(v: list[float]) -> str:
            return f"{statistics.mean(v):.4f}" if v else "n/a"

        print(f"{s:<8} {statistics.mean(r['sec']):>9.3f} {statistics.mean(r['steps']):>6.0f} {mean(r['mse']):>8} "
              f"{statistics.mean(r['psnr']):>7.2f} {mean(r['perceptual']):>10}")  # fmt: skip
    if delta_bytes:
        mb = statistics.mean(delta_bytes) / 1e6
        print(f"tuned generator stored: {mb:.2f} MB per image vs {full / 1e6:.2f} MB full copy "
              f"({mb * 1e6 / full:.1%}), {statistics.mean(delta_secs):.2f} s to write")  # fmt: skip


if __name__ == "__main__":
    main()
