"""Generator training (train-generator): seconds per step and images per second, plain fp32 against the fast options
(``--precision bf16``, ``--compile``) and batch sizes, side by side in one process, steps interleaved.

The default is the shipped Fashion-MNIST generator's setting (the model card's command: Fashion-MNIST at 32 px, the
default architecture, batch 32, lazy R1 every 16 steps). Every variant starts from the same seed. Timing: the mean
seconds per step over the steps after ``--warmup`` (compilation happens in the warm-up; its extra cost is printed);
run at least 16 timed steps so that the lazy R1 step is in the mean. The losses after the same steps are printed as a
sanity check (GAN losses are no quality measure: the generator's quality is its Frechet distance after a long run).

    OMP_WAIT_POLICY=PASSIVE python benchmarks/generator_training.py --threads 1 --steps 48
    python benchmarks/generator_training.py --variants bf16 --batch-sizes 16,32,64 --steps 32

On a shared machine compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _setup import apply_setup, environment

from cycle_encoding.training.generator_trainer import GeneratorTrainer, load_generator_train_config
from cycle_encoding.utils import parse_int_list

VARIANTS = {
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+compile": {"precision": "bf16", "compile": True},
    "fp32+compile": {"precision": "fp32", "compile": True},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="fp32,bf16,bf16+compile", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--batch-sizes", default="32")
    ap.add_argument("--data", default="fashion-mnist")
    ap.add_argument("--resolution", type=int, default=32)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc malloc keeps freed memory (ops)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    names = apply_setup(ap, args, list(VARIANTS))
    batches = parse_int_list(args.batch_sizes)
    print(f"generator training, {args.data} {args.resolution} px, {args.steps} steps ({args.warmup} warm-up), "
          f"{environment()}", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        trainers: dict[tuple[str, int], GeneratorTrainer] = {}
        for b in batches:
            for v in names:
                cfg = load_generator_train_config(dict(
                    data=args.data, resolution=args.resolution, batch_size=b, out=str(Path(tmp)), name=f"{v}-{b}",
                    max_steps=10**9, log_every=10**6, image_every=10**9, checkpoint_every=10**9, device=args.device,
                    **VARIANTS[v]))  # fmt: skip
                trainers[(v, b)] = GeneratorTrainer(cfg, quiet=True)
        sec: dict[tuple[str, int], list[float]] = {k: [] for k in trainers}
        logs: dict[tuple[str, int], list[dict[str, float]]] = {k: [] for k in trainers}
        for _ in range(args.steps):
            for k, t in trainers.items():
                t0 = time.perf_counter()
                logs[k].append(t.train_step())
                sec[k].append(time.perf_counter() - t0)
        for t in trainers.values():
            t.close()
    ref = (names[0], batches[0])
    mean = {k: statistics.mean(v[args.warmup :]) for k, v in sec.items()}
    ips = {k: k[1] / m for k, m in mean.items()}
    print(f"\n{'variant':<14} {'batch':>5} {'s/step':>8} {'img/s':>8} {'img/s vs ' + ref[0] + '/' + str(ref[1]):>16} "
          f"{'warm-up extra s':>15}  losses, mean of the last 8 steps")  # fmt: skip
    for k in trainers:
        extra = sum(sec[k][: args.warmup]) - args.warmup * mean[k]
        tail = logs[k][-8:]
        d = statistics.mean(r["d_loss"] for r in tail)
        g = statistics.mean(r["g_loss"] for r in tail)
        print(f"{k[0]:<14} {k[1]:>5} {mean[k]:>8.3f} {ips[k]:>8.1f} {ips[k] / ips[ref]:>15.2f}x {extra:>15.1f}  "
              f"d {d:.4f}  g {g:.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
