"""Baseline (fp32, the authors' loops) against the fast path (``precision="bf16"``: bfloat16 autocast, fp32 weights,
loss and fused Adam), side by side in one process, repeats interleaved, medians.

Per workload it prints seconds for each, the ratio, the quality each reaches (the loss after the same steps, and its
relative difference from fp32's), the peak memory a call adds (resident memory sampled during the call on a CPU;
``torch.cuda.max_memory_allocated`` on CUDA), and the machine's measured fp32 / bf16 matmul rates with the share of
them the generator reaches. Workloads (``--workloads``, comma-separated):

- ``rates``: 2048x2048 matmul GFLOP/s in fp32 and bf16;
- ``gen``: generator forward and forward+backward, batch 1, at ``--gen-resolutions`` (config-f widths);
- ``tune``: pivotal-tuning steps (PTI's loss with the locality regularizer, LPIPS-AlexNet with random weights: the
  real network's cost) at ``--tune-resolutions``;
- ``refine``: steps of the regularized refinement (encoder + G + LPIPS on a batch of 8) at ``--refine-resolution``;
- ``encoder``: the encoder's forward+backward at batch 8 (the encoder-training step's largest part);
- ``malloc``: the 1024-px (``--malloc-resolution``) generator forward in two fresh processes, glibc malloc as is
  against ``keep_freed_memory()``;
- ``tune-batch``: seconds per image of tuning N images one by one (``pivotal_tune``) against all N at once
  (``pivotal_tune_many``), N in ``--tune-batch-sizes``, fp32 and bf16, at ``--tune-batch-resolutions`` (32: the shipped
  Fashion-MNIST generator with its perceptual network; others: config-f widths, LPIPS-AlexNet with random weights),
  each against fp32 one by one, with the final loss of each (mean over the images) and how far the batched images'
  losses are from their one-by-one ones;
- ``e2e``: the full method (encoder -> refine -> tune) with the shipped Fashion-MNIST models on ``--e2e-images`` of
  examples/fashion-mnist, the authors' fp32 loop image by image against bf16, ``batch_passes`` and the images' tuning
  in one batch (``Inverter.invert_many``; ``--e2e-tune-batch``): seconds per image and the final MSE / perceptual
  distance.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --threads 1 --workloads rates,gen,tune --tune-resolutions 64
    OMP_WAIT_POLICY=PASSIVE python benchmarks/speed.py --threads 1 --workloads tune-batch --tune-batch-resolutions 32,64
    python benchmarks/speed.py --device cuda --gen-resolutions 256,1024 --tune-resolutions 256,1024

On a shared machine compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cycle_encoding import Encoder4Editing, EncoderConfig, Generator, GeneratorConfig
from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.inversion import RefineConfig, RegularizedRefiner, TuneConfig, pivotal_tune
from cycle_encoding.inversion.common import LossNetworks
from cycle_encoding.losses.perceptual import LPIPSDistance
from cycle_encoding.networks.lpips import LPIPS
from cycle_encoding.ops import autocast
from cycle_encoding.utils import parse_int_list, resolve_device

ROOT = Path(__file__).resolve().parents[1]
MODES = ("fp32", "bf16")


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class PeakMemory:
    """Peak memory a block adds: resident memory sampled every 2 ms (CPU) or the CUDA allocator's peak."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_mb = float("nan")

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            return self
        if not os.path.exists("/proc/self/statm"):
            return self
        self._base = self._rss()
        self._max = self._base
        self._stop = threading.Event()

        def sample() -> None:
            while not self._stop.wait(0.002):
                self._max = max(self._max, self._rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif hasattr(self, "_thread"):
            self._stop.set()
            self._thread.join()
            self._max = max(self._max, self._rss())
            self.peak_mb = (self._max - self._base) / 2**20


def interleaved(fns: dict[str, Callable[[], Any]], repeats: int, device: torch.device) -> dict[str, dict[str, Any]]:
    """Each function once to warm up, then ``repeats`` rounds, one call of each per round: median seconds, the
    largest peak memory, the last call's return value."""
    out: dict[str, dict[str, Any]] = {k: {"sec": [], "mem": [], "value": None} for k in fns}
    for k, fn in fns.items():
        out[k]["value"] = fn()
    for _ in range(repeats):
        for k, fn in fns.items():
            sync(device)
            with PeakMemory(device) as pm:
                t = time.perf_counter()
                out[k]["value"] = fn()
                sync(device)
                out[k]["sec"].append(time.perf_counter() - t)
            out[k]["mem"].append(pm.peak_mb)
    for r in out.values():
        r["median"] = statistics.median(r["sec"])
        r["peak_mb"] = max(r["mem"]) if r["mem"] else float("nan")
    return out


def row(name: str, res: dict[str, dict[str, Any]], quality: str = "", extra: str = "", fast: str = "bf16") -> None:
    a, b = res["fp32"], res[fast]
    print(f"{name:<34} {a['median']:>9.3f} {b['median']:>9.3f} {a['median'] / b['median']:>6.2f}x "
          f"{a['peak_mb']:>8.0f} {b['peak_mb']:>8.0f}  {quality}{extra}", flush=True)  # fmt: skip


def header(title: str) -> None:
    print(f"\n{title}\n{'workload':<34} {'fp32 s':>9} {'bf16 s':>9} {'ratio':>7} {'fp32 MB':>8} {'bf16 MB':>8}  "
          "quality", flush=True)  # fmt: skip


def random_lpips(device: torch.device) -> LPIPSDistance:
    torch.manual_seed(123)
    net = LPIPS("alex")
    with torch.no_grad():
        for lin in net.lins:
            lin.weight.abs_()
    return LPIPSDistance(net, "random weights: timing only").to(device)


def config_f(resolution: int, device: torch.device) -> Generator:
    torch.manual_seed(0)
    G = Generator(GeneratorConfig.rosinality(resolution, channel_multiplier=2)).to(device).eval()
    G.requires_grad_(False)
    G.compute_w_avg(1000)
    return G


def matmul_rates(device: torch.device, n: int = 2048, repeats: int = 5) -> dict[str, float]:
    rates = {}
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        a = torch.randn(n, n, device=device).to(dt)
        b = torch.randn(n, n, device=device).to(dt)
        a @ b
        ts = []
        for _ in range(repeats):
            sync(device)
            t = time.perf_counter()
            a @ b
            sync(device)
            ts.append(time.perf_counter() - t)
        rates[name] = 2 * n**3 / statistics.median(ts) / 1e9
    return rates


def generator_flops(G: Generator, ws: torch.Tensor) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc, torch.no_grad():
        G.synthesis(ws)
    return float(fc.get_total_flops())


def bench_gen(args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> None:
    header("generator, batch 1 (utilization: GFLOP/s reached over the machine's matmul rate of that precision)")
    for r in parse_int_list(args.gen_resolutions):
        bench_gen_one(r, args, device, rates)


def bench_gen_one(r: int, args: argparse.Namespace, device: torch.device, rates: dict[str, float]) -> None:
    G = config_f(r, device)
    ws = G.mapping(torch.randn(1, G.z_dim, device=device)).detach()
    flops = generator_flops(G, ws)
    ref = G.synthesis(ws)

    def fwd(prec: str) -> Callable[[], torch.Tensor]:
        def run() -> torch.Tensor:
            with torch.no_grad(), autocast(device, prec):
                return G.synthesis(ws).float()

        return run

    def fwd_bwd(prec: str) -> Callable[[], None]:
        def run() -> None:
            G.requires_grad_(True)
            with autocast(device, prec):
                y = G.synthesis(ws).float()
            y.square().mean().backward()
            G.zero_grad(set_to_none=True)
            G.requires_grad_(False)

        return run

    for what, make, mult in (("forward", fwd, 1), ("forward+backward", fwd_bwd, 3)):
        res = interleaved({m: make(m) for m in MODES}, args.repeats, device)
        util = {m: mult * flops / res[m]["median"] / 1e9 for m in MODES}
        q = ""
        if what == "forward":
            y = res["bf16"]["value"]
            q = f"bf16 image differs from fp32 by {float((y - ref).abs().mean()):.4f} mean abs; "
        q += (f"{mult * flops / 1e9:.0f} GFLOP: fp32 {util['fp32']:.0f} GFLOP/s "
              f"({util['fp32'] / rates['fp32']:.0%} of fp32 matmul), bf16 {util['bf16']:.0f} GFLOP/s "
              f"({util['bf16'] / rates['bf16']:.0%} of bf16 matmul)")  # fmt: skip
        row(f"G {r}px {what}", res, q)


def tune_setup(G: Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        x = G(torch.randn(1, G.z_dim, generator=g).to(device), truncation=0.7).clamp(-1, 1)
        pivot = G.mapping(torch.randn(1, G.z_dim, generator=g).to(device), truncation=0.7)
    return pivot, x


def bench_tune(args: argparse.Namespace, device: torch.device) -> None:
    header(f"pivotal tuning, {args.tune_steps} steps per call (PTI's loss + locality regularizer, LPIPS-AlexNet)")
    P = random_lpips(device)
    for r in parse_int_list(args.tune_resolutions):
        bench_tune_one(r, P, args, device)


def bench_tune_one(r: int, P: LPIPSDistance, args: argparse.Namespace, device: torch.device) -> None:
    G = config_f(r, device)
    pivot, x = tune_setup(G, device)

    def run(prec: str, batched: bool, comp: bool = False) -> Callable[[], dict[str, float]]:
        def go() -> dict[str, float]:
            cfg = TuneConfig(steps=args.tune_steps, stop_threshold=None, precision=prec, batch_passes=batched,
                             compile=comp)  # fmt: skip
            t = pivotal_tune(G, pivot, x, LossNetworks(P), cfg, seed=0)
            with torch.no_grad():
                y = t.generator.synthesis(pivot)
                mse = float((y - x).square().mean())
                p = float(P(y, x)[0])
            return {"loss": t.losses[-1]["loss"], "mse": mse, "perceptual": p}

        return go

    # the first (untimed) call of a compiled variant compiles
    variants = {"fp32": ("fp32", False), "fp32+batch": ("fp32", True), "bf16": ("bf16", False),
                "bf16+batch": ("bf16", True), "bf16+batch+compile": ("bf16", True, True)}  # fmt: skip
    res = interleaved({k: run(*v) for k, v in variants.items()}, args.repeats, device)
    for m in variants:
        res[m]["median"] /= args.tune_steps
    a = res["fp32"]["value"]
    for fast in list(variants)[1:]:
        b = res[fast]["value"]
        q = (f"after {args.tune_steps} steps: loss {a['loss']:.4f} vs {b['loss']:.4f}, MSE {a['mse']:.5f} vs "
             f"{b['mse']:.5f} ({b['mse'] / a['mse'] - 1:+.1%}), perceptual {a['perceptual']:.4f} vs "
             f"{b['perceptual']:.4f} ({b['perceptual'] / a['perceptual'] - 1:+.1%})")  # fmt: skip
        row(f"tune step {r}px, {fast} (s/step)", res, q, fast=fast)


def shipped_fmnist(device: torch.device) -> tuple[Generator, Any]:
    """The shipped Fashion-MNIST generator (32 px) and its perceptual network (fmnist-features)."""
    from cycle_encoding.checkpoints.generator import open_generator_arg
    from cycle_encoding.inversion import build_loss_networks

    G, _ = open_generator_arg("fmnist-generator", device)
    nets = build_loss_networks("fmnist-features", None, None, None, device, need_identity=False,
                               domain="fashion-mnist")  # fmt: skip
    return G.requires_grad_(False), nets.perceptual


def bench_tune_batch(args: argparse.Namespace, device: torch.device) -> None:
    sizes = parse_int_list(args.tune_batch_sizes)
    header(f"tuning N images one by one against all N at once ({args.tune_steps} steps, no early stop): s per image "
           "and step; each against fp32 one by one")  # fmt: skip
    for r in parse_int_list(args.tune_batch_resolutions):
        if r == 32:
            G, P = shipped_fmnist(device)
        else:
            G, P = config_f(r, device), random_lpips(device)
        g = torch.Generator().manual_seed(11)
        with torch.no_grad():
            xs = G(torch.randn(max(sizes), G.z_dim, generator=g).to(device), truncation=0.7).clamp(-1, 1)
            ws = G.mapping(torch.randn(max(sizes), G.z_dim, generator=g).to(device), truncation=0.7)
        for n in sizes:
            bench_tune_batch_one(G, P, ws[:n, None], xs[:n, None], r, args, device)


def bench_tune_batch_one(
    G: Generator, P: Any, ws: torch.Tensor, xs: torch.Tensor, r: int, args: argparse.Namespace, device: torch.device
) -> None:
    from cycle_encoding.inversion.tune_batch import pivotal_tune_many

    n = ws.shape[0]
    seeds = list(range(n))

    def run(prec: str, batched: bool) -> Callable[[], list[float]]:
        cfg = TuneConfig(steps=args.tune_steps, stop_threshold=None, precision=prec)

        def go() -> list[float]:
            if batched:
                out = pivotal_tune_many(G, list(ws), list(xs), LossNetworks(P), cfg, seeds)
            else:
                out = [pivotal_tune(G, ws[i], xs[i], LossNetworks(P), cfg, seed=seeds[i]) for i in range(n)]
            return [t.losses[-1]["loss"] for t in out]

        return go

    variants = {"fp32": ("fp32", False), "fp32 batched": ("fp32", True), "bf16": ("bf16", False),
                "bf16 batched": ("bf16", True)}  # fmt: skip
    res = interleaved({k: run(*v) for k, v in variants.items()}, args.repeats, device)
    for k in variants:
        res[k]["median"] /= n * args.tune_steps
    base = res["fp32"]["value"]
    for k in ("fp32 batched", "bf16", "bf16 batched"):
        v = res[k]["value"]
        alone = res[k.split()[0]]["value"]
        q = f"final loss {statistics.mean(base):.5f} vs {statistics.mean(v):.5f}"
        if k.endswith("batched"):
            dev = max(abs(b / a - 1) for a, b in zip(alone, v))
            q += f"; batched vs one by one in {k.split()[0]}: max {dev:.1e} relative"
            if k == "bf16 batched":
                one = res["bf16"]["median"]
                q += f"; {one / res[k]['median']:.2f}x over bf16 one by one"
        row(f"tune {r}px N={n}, {k} (s/img/step)", res, q, fast=k)


def small_or_full_encoder(G: Generator, device: torch.device, full: bool) -> Encoder4Editing:
    torch.manual_seed(1)
    kw = {} if full else {"widths": (16, 32, 64, 128), "units": (1, 1, 1, 1)}
    E = Encoder4Editing(EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim, input_size=min(256, G.resolution), **kw))
    E.set_w_avg(G.w_avg)
    return E.to(device).eval()


def bench_refine(args: argparse.Namespace, device: torch.device) -> None:
    r = args.refine_resolution
    kind = "IR-SE-50 encoder" if args.full_encoder else "small encoder (widths 16-128, one unit per block)"
    header(f"refinement, {args.refine_steps} steps per call, batch 8, {r}px, {kind}")
    G = config_f(r, device)
    E = small_or_full_encoder(G, device, args.full_encoder)
    P = random_lpips(device)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        imgs = G(torch.randn(16, G.z_dim, generator=g).to(device), truncation=0.7).clamp(-1, 1).cpu()
    data = TensorDataset(imgs, name="own images")
    x = imgs[:1].to(device)

    def run(prec: str) -> Callable[[], dict[str, float]]:
        refiner = RegularizedRefiner(G, E, data, RefineConfig(steps=args.refine_steps, identity_lambda=0,
                                                              precision=prec), LossNetworks(P), image_size=r)  # fmt: skip

        def go() -> dict[str, float]:
            out = refiner.refine(x, seed=0)
            return {"first": out.first_target_loss, "last": out.target_loss}

        return go

    res = interleaved({m: run(m) for m in MODES}, args.repeats, device)
    for m in MODES:
        res[m]["median"] /= args.refine_steps
    a, b = res["fp32"]["value"], res["bf16"]["value"]
    row(f"refine step {r}px (s/step)", res, f"target L_S first {a['first']:.4f} vs {b['first']:.4f}, at the pivot "
        f"{a['last']:.4f} vs {b['last']:.4f} ({b['last'] / a['last'] - 1:+.1%})")  # fmt: skip


def bench_encoder(args: argparse.Namespace, device: torch.device) -> None:
    r = args.refine_resolution
    header(f"encoder forward+backward, batch 8, {min(256, r)}px input")
    G = config_f(r, device)
    E = small_or_full_encoder(G, device, args.full_encoder).train().requires_grad_(True)
    E.stage = "all"
    x = torch.rand(8, 3, min(256, r), min(256, r), device=device) * 2 - 1

    def run(prec: str) -> Callable[[], torch.Tensor]:
        def go() -> torch.Tensor:
            with autocast(device, prec):
                ws = E(x).float()
            ws.square().mean().backward()
            E.zero_grad(set_to_none=True)
            return ws.detach()

        return go

    res = interleaved({m: run(m) for m in MODES}, args.repeats, device)
    a, b = res["fp32"]["value"], res["bf16"]["value"]
    row("encoder fwd+bwd", res, f"codes differ by {float((a - b).norm() / a.norm()):.2%} (relative norm)")


MALLOC_CHILD = """
import os, statistics, sys, time, torch
torch.set_num_threads({threads})
from cycle_encoding import Generator, GeneratorConfig
from cycle_encoding.ops import keep_freed_memory
if {keep}:
    assert keep_freed_memory()
torch.manual_seed(0)
G = Generator(GeneratorConfig.rosinality({res})).eval().requires_grad_(False)
ws = G.mapping(torch.randn(1, 512))
ts = []
for _ in range({repeats} + 1):
    t = time.perf_counter()
    with torch.no_grad():
        G.synthesis(ws)
    ts.append(time.perf_counter() - t)
print(statistics.median(ts[1:]))
"""


def bench_malloc(args: argparse.Namespace) -> None:
    r = args.malloc_resolution
    print(f"\nglibc malloc: G {r}px forward (CPU), fresh process each, alternating, {args.repeats} repeats per process")
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    times: dict[bool, list[float]] = {False: [], True: []}
    for _ in range(2):
        for keep in (False, True):
            code = MALLOC_CHILD.format(threads=torch.get_num_threads(), keep=keep, res=r, repeats=args.repeats)
            out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
            times[keep].append(float(out.stdout.strip().splitlines()[-1]))
    a, b = statistics.median(times[False]), statistics.median(times[True])
    print(f"{'as is':<10} {a:.3f} s   keep_freed_memory() {b:.3f} s   ratio {a / b:.2f}x")


def bench_e2e(args: argparse.Namespace, device: torch.device) -> None:
    from cycle_encoding.inversion import Inverter

    files = sorted((ROOT / "examples" / "fashion-mnist").glob("*.png"))[: args.e2e_images]
    nb = args.e2e_tune_batch
    header(f"full method (encoder -> refine -> tune <= {args.e2e_tune_steps} steps), shipped Fashion-MNIST models, "
           f"{len(files)} images: s/image, each variant against the authors' fp32 loop image by image "
           f"('passes': tune.batch_passes; 'batch {nb}': the images tuned {nb} at a time; 'tune bf16': the "
           "refinement in fp32)")  # fmt: skip
    # name -> (refine precision, tune precision, batch_passes, tune batch, compiled (refine and, one by one, tune))
    variants = {"fp32": ("fp32", "fp32", False, 1, False), f"fp32+batch {nb}": ("fp32", "fp32", False, nb, False),
                f"fp32+passes+batch {nb}": ("fp32", "fp32", True, nb, False), "bf16": ("bf16", "bf16", False, 1, False),
                f"bf16+passes+batch {nb}": ("bf16", "bf16", True, nb, False),
                f"tune bf16+passes+batch {nb}": ("fp32", "bf16", True, nb, False),
                "bf16+passes+compile": ("bf16", "bf16", True, 1, True),
                f"bf16+passes+batch {nb}+compile": ("bf16", "bf16", True, nb, True)}  # fmt: skip
    unknown = set(args.e2e_variants or ()) - set(variants)
    if unknown:
        raise SystemExit(f"--e2e-variants: unknown {sorted(unknown)}; known: {sorted(variants)}")
    variants = {k: v for k, v in variants.items() if k == "fp32" or args.e2e_variants is None
                or k in args.e2e_variants}  # fmt: skip
    invs = {}
    for k, (rprec, tprec, passes, _, comp) in variants.items():
        invs[k] = Inverter("fmnist-generator", "fmnist-encoder", device=device, stages=("encoder", "refine", "tune"),
                           perceptual="fmnist-features", identity="fmnist-features", train_data="fashion-mnist",
                           refine={"precision": rprec, "compile": comp},
                           tune={"precision": tprec, "batch_passes": passes, "steps": args.e2e_tune_steps,
                                 "compile": comp})  # fmt: skip
        t = time.perf_counter()
        invs[k].invert_many(files[:1], [0])  # warm-up (a compiled variant compiles here), not timed below
        print(f"warm-up, one image: {k} {time.perf_counter() - t:.1f} s", flush=True)
    per: dict[str, dict[str, list[float]]] = {k: {"sec": [], "mse": [], "perceptual": [], "updates": []} for k in invs}
    for _ in range(args.e2e_rounds):
        for k, inv in invs.items():  # interleaved variant by variant, every variant on all images per round
            size = variants[k][3]
            for start in range(0, len(files), size):
                chunk = files[start : start + size]
                sync(device)
                t = time.perf_counter()
                results = inv.invert_many(chunk, list(range(start, start + len(chunk))))
                per[k]["sec"].append((time.perf_counter() - t) / len(chunk))
                for res in results:
                    per[k]["mse"].append(res.metrics["tune"]["mse"])
                    per[k]["perceptual"].append(res.metrics["tune"]["perceptual"])
                    per[k]["updates"].append(res.tune["updates"] if res.tune else 0)
    s = {k: {q: statistics.mean(v) for q, v in per[k].items()} for k in invs}
    a = s["fp32"]
    for k in list(variants)[1:]:
        b = s[k]
        print(f"{'full method per image, ' + k:<34} {a['sec']:>9.2f} {b['sec']:>9.2f} {a['sec'] / b['sec']:>6.2f}x "
              f"{'':>17}  final MSE {a['mse']:.5f} vs {b['mse']:.5f} ({b['mse'] / a['mse'] - 1:+.1%}), perceptual "
              f"{a['perceptual']:.4f} vs {b['perceptual']:.4f} ({b['perceptual'] / a['perceptual'] - 1:+.1%}), "
              f"tuning steps {a['updates']:.1f} vs {b['updates']:.1f}")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workloads", default="rates,gen,tune,tune-batch,refine,encoder,malloc,e2e")
    ap.add_argument("--gen-resolutions", default="64,256,1024")
    ap.add_argument("--tune-resolutions", default="64,256")
    ap.add_argument("--tune-steps", type=int, default=3, help="tuning steps per timed call (default 3)")
    ap.add_argument("--refine-resolution", type=int, default=64)
    ap.add_argument("--refine-steps", type=int, default=3)
    ap.add_argument("--full-encoder", action="store_true", help="IR-SE-50 (the paper's) instead of a small encoder")
    ap.add_argument("--malloc-resolution", type=int, default=1024)
    ap.add_argument("--e2e-images", type=int, default=3)
    ap.add_argument("--e2e-tune-steps", type=int, default=150, help="the demo's tuning budget (default 150)")
    ap.add_argument("--e2e-tune-batch", type=int, default=8, help="images tuned at once in e2e (default 8)")
    ap.add_argument("--e2e-rounds", type=int, default=1, help="rounds of all e2e variants over the images")
    ap.add_argument(
        "--e2e-variants",
        type=lambda v: [x.strip() for x in v.split(",")],
        default=None,
        help="comma-separated e2e variants besides fp32 (default: all), e.g. 'bf16+passes+batch 8'",
    )
    ap.add_argument("--tune-batch-sizes", default="1,4,8", help="tune-batch: images tuned at once")
    ap.add_argument("--tune-batch-resolutions", default="32,64", help="tune-batch: 32 = the shipped Fashion-MNIST G")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--malloc", choices=("system", "keep"), default="system",
                    help="keep: glibc keeps freed memory in this process, as the CLI sets it (keep_freed_memory); "
                    "batched tuning's stacked tensors exceed glibc's 32 MB mmap threshold at 64 px and up")  # fmt: skip
    args = ap.parse_args()
    if args.malloc == "keep":
        from cycle_encoding.ops import keep_freed_memory

        if not keep_freed_memory():
            ap.error("--malloc keep: the C library is not glibc")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    work = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown = set(work) - {"rates", "gen", "tune", "tune-batch", "refine", "encoder", "malloc", "e2e"}
    if unknown:
        ap.error(f"unknown workload(s): {', '.join(sorted(unknown))}")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else torch.backends.cpu.get_cpu_capability()
    print(f"device={device} ({name}) threads={torch.get_num_threads()} torch {torch.__version__} "
          f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')} malloc={args.malloc}")  # fmt: skip
    rates = matmul_rates(device)
    print(f"matmul 2048x2048: fp32 {rates['fp32']:.0f} GFLOP/s, bf16 {rates['bf16']:.0f} GFLOP/s")
    if "gen" in work:
        bench_gen(args, device, rates)
    if "tune" in work:
        bench_tune(args, device)
    if "tune-batch" in work:
        bench_tune_batch(args, device)
    if "refine" in work:
        bench_refine(args, device)
    if "encoder" in work:
        bench_encoder(args, device)
    if "malloc" in work and device.type == "cpu":
        bench_malloc(args)
    if "e2e" in work:
        bench_e2e(args, device)


if __name__ == "__main__":
    main()
