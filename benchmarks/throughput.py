"""Images per hour of a folder through the full method (encoder -> refine -> tune): the plain ``cycle-encoding invert``
(the speed it chooses per run) against ``--exact`` (the authors' loop: fp32, one process, torch's default threads),
side by side in one run, each a fresh command as a user types it (start-up included), repeats interleaved, with the
quality each reaches (mean final MSE and perceptual distance over the images, and their relative difference).

Cases (``--cases``):

- ``32``: the shipped Fashion-MNIST models (fmnist-generator, fmnist-encoder) on the first ``--images-32`` images of
  the Fashion-MNIST test set, at most ``--tune-steps-32`` tuning steps with the early stop (the defaults);
- ``256``: random stand-ins of config-f's shape (``speed.config_f``, a small encoder, LPIPS-AlexNet with a random
  backbone: the real networks' cost, not their quality) on ``--images-256`` of the generator's own images, a fixed
  number of refinement and tuning steps (no early stop).

    python benchmarks/throughput.py --cases 32,256 --repeats 2

OMP_NUM_THREADS is removed from the commands' environment (both use the whole machine as their defaults do); read
the ratios on a shared machine (the header line gives the load average).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _setup import environment
from speed import config_f, small_or_full_encoder

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"exact": ["--exact"], "default": []}


def fmnist_case(work: Path, n: int, steps: int) -> list[str]:
    """The 32-px case's images written as PNG files; the command's arguments."""
    from cycle_encoding.data.datasets import open_dataset
    from cycle_encoding.utils import save_image

    data = open_dataset("fashion-mnist", 32, 1, "test")
    for i in range(n):
        save_image(data.load(i), work / "images" / f"test-{i:05d}.png")
    return ["--generator", "fmnist-generator", "--encoder", "fmnist-encoder", "--tune-steps", str(steps)]


def standin_case(work: Path, n: int, refine_steps: int, tune_steps: int) -> list[str]:
    """The 256-px case's networks and images written to ``work``; the command's arguments."""
    import cycle_encoding as ce
    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.networks.lpips import BACKBONES
    from cycle_encoding.utils import save_image

    G = config_f(256, torch.device("cpu"))
    ce.save_generator(G, work / "g.safetensors")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for folder, count in (("train", 16), ("images", n)):
            for i in range(count):
                save_image(G(torch.randn(1, G.z_dim, generator=g), truncation=0.7).clamp(-1, 1)[0],
                           work / folder / f"{folder}{i:03d}.png")  # fmt: skip
    E = small_or_full_encoder(G, torch.device("cpu"), full=False)
    ce.save_encoder(E, work / "e.safetensors", provenance=default_provenance(data=str(work / "train")), trained_stage=0)
    torch.manual_seed(123)
    torch.save(BACKBONES["alexnet"]().state_dict(), work / "alexnet-random.pth")
    return ["--generator", str(work / "g.safetensors"), "--encoder", str(work / "e.safetensors"),
            "--perceptual", "lpips-alex", "--lpips-backbone", str(work / "alexnet-random.pth"), "--identity", "none",
            "--refine-steps", str(refine_steps), "--refine-random", "3", "--tune-steps", str(tune_steps),
            "--no-early-stop"]  # fmt: skip


def run_once(work: Path, args: list[str], variant: str, k: int) -> dict[str, Any]:
    """One command into a fresh run folder: wall seconds, the images, the final quality and what it chose."""
    out = work / f"run-{variant}-{k}"
    shutil.rmtree(out, ignore_errors=True)
    env = {key: v for key, v in os.environ.items() if key != "OMP_NUM_THREADS"}
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "cycle_encoding.cli", "invert", str(work / "images"), "--out", str(out), "--quiet",
           *args, *VARIANTS[variant]]  # fmt: skip
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if p.returncode != 0:
        raise SystemExit(f"{variant} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    tune = summary["per_stage"]["tune"]
    chose = next((ln for ln in p.stderr.splitlines() if ln.startswith("speed")), "")
    return {"sec": wall, "images": summary["finished"], "mse": tune["mse"], "perceptual": tune.get("perceptual"),
            "chose": chose}  # fmt: skip


def measure(name: str, work: Path, args: list[str], repeats: int, variants: list[str]) -> None:
    runs: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    for k in range(repeats):
        for v in variants:  # interleaved: exact, default, exact, default, ...
            runs[v].append(run_once(work, args, v, k))
            r = runs[v][-1]
            print(f"  {name} {v} #{k + 1}: {r['sec']:.1f} s, load {os.getloadavg()[0]:.2f}", flush=True)
    if len(variants) < 2:  # one variant alone (e.g. re-measured after the other): its time only
        r = runs[variants[0]][0]
        print(f"  {name}, {variants[0]}: {3600 * r['images'] / r['sec']:.0f} images/h, MSE {r['mse']:.4f}, "
              f"perceptual {r['perceptual']}\n  {r['chose']}")  # fmt: skip
        return
    a, b = runs["exact"], runs["default"]
    n = a[0]["images"]
    per_hour = {v: 3600 * n / statistics.median(r["sec"] for r in runs[v]) for v in variants}

    def rel(key: str) -> str:
        x, y = a[0][key], b[0][key]
        return "-" if x is None else f"{x:.4f} / {y:.4f} ({y / x - 1:+.1%})"

    print(f"| {name}, {n} images | {per_hour['exact']:.0f} | {per_hour['default']:.0f} | "
          f"{per_hour['default'] / per_hour['exact']:.2f}x | {rel('mse')} | {rel('perceptual')} |")  # fmt: skip
    print(f"  exact: {a[0]['chose']}\n  default: {b[0]['chose']}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="32,256")
    ap.add_argument("--images-32", type=int, default=24)
    ap.add_argument("--tune-steps-32", type=int, default=350)
    ap.add_argument("--images-256", type=int, default=4)
    ap.add_argument("--refine-steps-256", type=int, default=2)
    ap.add_argument("--tune-steps-256", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of both commands, interleaved (median time)")
    ap.add_argument("--variants", default="exact,default", help="exact and/or default (both: the ratio)")
    ap.add_argument("--work", type=Path, default=None, help="a folder for the images and runs (default: temporary)")
    args = ap.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    if set(cases) - {"32", "256"}:
        ap.error("--cases: 32 and/or 256")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if not variants or set(variants) - set(VARIANTS):
        ap.error("--variants: exact and/or default")
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), "?")  # fmt: skip
    from cycle_encoding.ops import bf16_units

    print(f"CPU {cpu} ({os.cpu_count()} CPUs, {torch.backends.cpu.get_cpu_capability()}, bf16: "
          f"{bf16_units('cpu') or 'none'}); {environment()}; load {os.getloadavg()[0]:.2f}")  # fmt: skip
    print(
        "| case | exact images/h | default images/h | ratio | final MSE exact / default | perceptual exact / default |"
    )
    print("|---|---|---|---|---|---|", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.work or Path(tmp)
        for case in cases:
            work = root / f"case{case}"
            shutil.rmtree(work, ignore_errors=True)
            (work / "images").mkdir(parents=True)
            if case == "32":
                cmd = fmnist_case(work, args.images_32, args.tune_steps_32)
                measure("32 px, shipped Fashion-MNIST models", work, cmd, args.repeats, variants)
            else:
                cmd = standin_case(work, args.images_256, args.refine_steps_256, args.tune_steps_256)
                measure("256 px, config-f stand-ins", work, cmd, args.repeats, variants)


if __name__ == "__main__":
    main()
