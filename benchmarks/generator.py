"""Generator speed: grouped-convolution ("fused") vs activation-scaling modulated convolution.

Prints, side by side in one run on the same machine, seconds per batch for forward (and forward+backward)
synthesis with both formulations, and their ratio. Usage:

    .venv/bin/python benchmarks/generator.py --resolution 256 --channel-multiplier 2 --batches 1,4,8
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from cycle_encoding import Generator, GeneratorConfig
from cycle_encoding.utils import parse_int_list, resolve_device


def timed(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--batches", default="1,4,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--backward", action="store_true", help="time forward+backward instead of forward")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    device = resolve_device(args.device)
    torch.manual_seed(0)
    G = Generator(GeneratorConfig.rosinality(args.resolution, channel_multiplier=args.channel_multiplier)).to(device)
    G.requires_grad_(args.backward)
    what = "forward+backward" if args.backward else "forward"
    print(f"device={device} threads={torch.get_num_threads()} resolution={args.resolution} "
          f"cm={args.channel_multiplier} ({what}, median of {args.repeats})")  # fmt: skip
    print(f"{'batch':>5} {'fused s':>10} {'unfused s':>10} {'fused/unfused':>14}")
    for b in parse_int_list(args.batches):
        ws = G.mapping(torch.randn(b, G.z_dim, device=device)).detach()

        def run(ws: torch.Tensor = ws) -> None:
            if args.backward:
                G.synthesis(ws).square().mean().backward()
            else:
                with torch.no_grad():
                    G.synthesis(ws)

        # alternate the two formulations repeat by repeat, so that load changes on a shared machine hit both
        times: dict[bool, list[float]] = {True: [], False: []}
        for fused in (True, False):  # warm-up
            G.set_fused_modconv(fused)
            run()
        for _ in range(args.repeats):
            for fused in (True, False):
                G.set_fused_modconv(fused)
                times[fused].append(timed(run, device))
        res = {k: statistics.median(v) for k, v in times.items()}
        print(f"{b:>5} {res[True]:>10.3f} {res[False]:>10.3f} {res[True] / res[False]:>14.2f}")


if __name__ == "__main__":
    main()
