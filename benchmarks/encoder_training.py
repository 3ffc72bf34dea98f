"""Encoder training: images per second and the loss reached after the same images, plain fp32 against the fast
options (``--precision bf16``, ``--compile``), side by side in one process, steps interleaved.

``--setting fmnist`` (default): the shipped Fashion-MNIST encoder's setting (the model card's command: fmnist-generator,
Fashion-MNIST, fmnist-features perceptual and identity terms, widths 32,48,64,128, units 1,2,2,1, batch 16, the paper
schedule rescaled to ``--steps``). Every variant trains from the same seed on the same batches; after the same number
of images each is validated (float32, the same ``--val-images`` Fashion-MNIST test images). With ``--seeds 0,1`` every
variant trains once per seed, and the seed-to-seed spread of the validation loss is the noise the differences are
read against. The rule printed: a variant's loss is "equal within noise" when its mean over the seeds differs from
fp32's mean by no more than the larger of the two variants' seed-to-seed ranges.

``--setting random``: a random StyleGAN2 (rosinality config, ``--resolution``) and random images at ``--image-size``
(perceptual and identity terms off: no backbone files), for timing at larger sizes; the losses are printed but mean
little.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/encoder_training.py --threads 1 --steps 600 --seeds 0,1
    python benchmarks/encoder_training.py --setting random --resolution 256 --steps 6 --variants fp32,bf16

Timing: the median seconds of a variant's steps after ``--warmup`` steps (compilation happens there; its cost is
printed separately); images/s = batch / that median. On a shared machine compare the ratios, not the seconds.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _setup import apply_setup, environment

from cycle_encoding.training.encoder_trainer import EncoderTrainer, load_train_config
from cycle_encoding.utils import parse_int_list

VARIANTS = {  # name -> options
    "fp32": {"precision": "fp32"},
    "bf16": {"precision": "bf16"},
    "bf16+compile": {"precision": "bf16", "compile": True},
    "fp32+compile": {"precision": "fp32", "compile": True},
}


def fmnist_options(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    return dict(generator="fmnist-generator", data="fashion-mnist", val_data="fashion-mnist:test", out=str(out),
                preset="paper", total_steps=args.steps, batch_size=args.batch_size or 16, perceptual="fmnist-features",
                identity="fmnist-features", encoder={"widths": [32, 48, 64, 128], "units": [1, 2, 2, 1]},
                device=args.device)  # fmt: skip


def random_options(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    import cycle_encoding as ce
    from cycle_encoding.utils import save_image

    torch.manual_seed(0)
    G = ce.Generator(ce.GeneratorConfig.rosinality(args.resolution, channel_multiplier=args.channel_multiplier))
    G.compute_w_avg(1000)
    ce.save_generator(G, out / "g.safetensors")
    batch = args.batch_size or 8
    (out / "data").mkdir()
    for i in range(4 * batch):
        save_image(torch.rand(3, args.image_size, args.image_size) * 2 - 1, out / "data" / f"{i}.png")
    enc = {} if args.full_encoder else {"widths": [16, 32, 48, 64], "units": [1, 1, 1, 1]}
    return dict(generator=str(out / "g.safetensors"), data=str(out / "data"), out=str(out), preset="paper",
                total_steps=max(args.steps, 100), batch_size=batch, perceptual="none", identity="none",
                image_size=args.image_size, val_count=batch, encoder=enc, device=args.device)  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=("fmnist", "random"), default="fmnist")
    ap.add_argument("--variants", default="fp32,bf16,bf16+compile", help=f"of {', '.join(VARIANTS)}")
    ap.add_argument("--steps", type=int, default=300, help="training steps per variant (fmnist: the schedule's length)")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--warmup", type=int, default=10, help="steps not timed (compilation happens there)")
    ap.add_argument("--val-images", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=None, help="default: 16 (fmnist), 8 (random)")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--channel-multiplier", type=int, default=2)
    ap.add_argument("--image-size", type=int, default=256)
    ap.add_argument("--full-encoder", action="store_true", help="random setting: IR-SE-50 instead of a small encoder")
    ap.add_argument("--keep-freed-memory", action="store_true", help="glibc malloc keeps freed memory (ops)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    names = apply_setup(ap, args, list(VARIANTS))
    seeds = parse_int_list(args.seeds)
    print(f"encoder training, setting {args.setting}, {args.steps} steps, seeds {seeds}, {environment()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        base = fmnist_options(args, root) if args.setting == "fmnist" else random_options(args, root)
        base.update(log_every=10**6, image_every=10**9, val_every=10**9, checkpoint_every=10**9)
        trainers: dict[tuple[str, int], EncoderTrainer] = {}
        for seed in seeds:
            for v in names:
                cfg = load_train_config({**base, **VARIANTS[v], "seed": seed, "name": f"{v}-{seed}"})
                trainers[(v, seed)] = EncoderTrainer(cfg, quiet=True)
        batch = base["batch_size"]
        sec: dict[tuple[str, int], list[float]] = {k: [] for k in trainers}
        last: dict[tuple[str, int], dict[str, float]] = {}
        for step in range(args.steps):
            for k, t in trainers.items():  # interleaved: one step of each in turn
                t0 = time.perf_counter()
                last[k] = t.train_step()
                sec[k].append(time.perf_counter() - t0)
            if (step + 1) % max(1, args.steps // 10) == 0:
                print(f"  step {step + 1}: " + ", ".join(f"{v}/{s} loss {last[(v, s)]['loss']:.4f}"
                                                         for v, s in trainers), flush=True)  # fmt: skip
        val: dict[tuple[str, int], dict[str, float]] = {}
        for k, t in trainers.items():
            val[k] = t.validate(max_images=args.val_images) if len(t.val) else {}
            t.close()
    med = {v: statistics.median([x for s in seeds for x in sec[(v, s)][args.warmup :]]) for v in names}
    extra = {v: statistics.mean(sum(sec[(v, s)][: args.warmup]) - args.warmup * med[v] for s in seeds) for v in names}
    print(f"\n{args.steps} steps of batch {batch} ({args.steps * batch} images) per run; validation on "
          f"{args.val_images} held-out images after them (float32), mean over seeds {seeds}")  # fmt: skip
    head = f"{'variant':<14} {'s/step':>8} {'img/s':>8} {'vs fp32':>8} {'warm-up extra s':>15}"
    keys = sorted({q for d in val.values() for q in d})
    print(head + "".join(f" {q:>20}" for q in keys))
    ref = names[0]
    for v in names:
        cells = []
        for q in keys:
            vals = [val[(v, s)][q] for s in seeds]
            m = statistics.mean(vals)
            rng = max(vals) - min(vals)
            cells.append(f"{m:.4f}" + (f" (range {rng:.4f})" if len(seeds) > 1 else ""))
        print(f"{v:<14} {med[v]:>8.3f} {batch / med[v]:>8.2f} {med[ref] / med[v]:>7.2f}x {extra[v]:>15.1f}"
              + "".join(f" {c:>20}" for c in cells))  # fmt: skip
    if len(seeds) > 1 and "weighted" in keys:
        a = [val[(ref, s)]["weighted"] for s in seeds]
        for v in names[1:]:
            b = [val[(v, s)]["weighted"] for s in seeds]
            diff = statistics.mean(b) - statistics.mean(a)
            noise = max(max(a) - min(a), max(b) - min(b))
            verdict = "equal within noise" if abs(diff) <= noise else ("worse" if diff > 0 else "better")
            print(f"{v}: weighted validation loss {statistics.mean(b):.4f} vs {ref} {statistics.mean(a):.4f}: "
                  f"difference {diff:+.4f}, seed-to-seed range {noise:.4f} -> {verdict}")  # fmt: skip


if __name__ == "__main__":
    main()
