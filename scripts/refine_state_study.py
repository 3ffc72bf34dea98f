"""Measure what the refinement's optimizer state does (issue 13): the pivot after Method 2's refinement with the
encoder's training-run Ranger state restored, with the substitute (moments estimated from training images), and with
a fresh Ranger, on the test images ``docs/RESULTS.md`` uses (``scripts/paper_claims.py`` selects them); and, given a
second encoder trained with ``--zero-grad none``, the all-offsets encoder with vs without PyTorch 1.6's zero_grad.

    python scripts/refine_state_study.py --out out/refine-state [--images 48] [--zero-grad-none RUN/encoder.safetensors]

Per image and variant: MSE and the fmnist-features perceptual distance between the target and G's image of the
pivot (G's constant noise, as every stage's reconstruction), and the pivot's distance from the encoder's own (eval
mode, all offsets). Results go to ``OUT/results.json`` and a Markdown table to stdout (and ``OUT/table.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "scripts"))

import torch  # noqa: E402

VARIANTS = ("restored", "substitute", "fresh")


def mean_std(v: list[float]) -> tuple[float, float]:
    t = torch.tensor(v, dtype=torch.float64)
    return float(t.mean()), float(t.std()) if len(v) > 1 else 0.0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--encoder", default="fmnist-encoder")
    p.add_argument("--generator", default="fmnist-generator")
    p.add_argument("--zero-grad-none", default=None, help="an encoder trained alike but with --zero-grad none")
    p.add_argument("--images", type=int, default=200, help="the first N of paper_claims' 200 images (default all)")
    p.add_argument("--per-class", type=int, default=40)
    p.add_argument("--others", type=int, default=40)
    p.add_argument("--out", default="out/refine-state")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-refine", action="store_true", help="only the encoders' pivots (the zero_grad comparison)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)

    from paper_claims import select_images, test_image

    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.data.datasets import open_dataset
    from cycle_encoding.inversion import RefineConfig, RegularizedRefiner, build_loss_networks, load_encoder_source
    from cycle_encoding.inversion.common import render, stage_seed
    from cycle_encoding.inversion.pivot import encoder_pivot
    from cycle_encoding.losses.perceptual import build_perceptual
    from cycle_encoding.metrics import mse

    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    G = load_generator(a.generator)
    src = load_encoder_source(a.encoder)
    if src.optimizer_state is None:
        raise SystemExit(f"{a.encoder}: no optimizer state to restore (train-encoder's encoder-optimizer.safetensors)")
    nets = build_loss_networks("fmnist-features", None, "fmnist-features", None, torch.device("cpu"))
    dist = build_perceptual("fmnist-features")
    train = open_dataset(src.train_data or "fashion-mnist", 32, 1, "train")
    refiners = {}
    t0 = time.perf_counter()
    variants = () if a.no_refine else VARIANTS
    for v in variants:
        refiners[v] = RegularizedRefiner(
            G, src.encoder, train, RefineConfig(optimizer_state="auto" if v == "restored" else v), nets,
            optimizer_state=src.optimizer_state if v == "restored" else None,
            optimizer_settings=src.optimizer_settings, image_size=32, seed=a.seed, source=str(a.encoder),
        )  # fmt: skip
        print(f"{v}: {refiners[v].optimizer_note}", file=sys.stderr)
    setup_s = time.perf_counter() - t0
    encoders = {"zero (PyTorch 1.6)": src.encoder}
    if a.zero_grad_none:
        encoders["none (frozen heads)"] = load_encoder_source(a.zero_grad_none).encoder

    chosen = select_images(a.per_class, a.others)[: a.images]
    rows: dict[str, dict[str, list[float]]] = {}

    def add(key: str, x: torch.Tensor, pivot: torch.Tensor, ref: torch.Tensor | None) -> None:
        with torch.no_grad():
            y = render(G, pivot).clamp(-1, 1)
            r = rows.setdefault(key, {"mse": [], "perceptual": [], "moved": []})
            r["mse"].append(float(mse(y, x).mean()))
            r["perceptual"].append(float(dist(y, x).reshape(-1)[0]))
            r["moved"].append(float((pivot - ref).norm()) if ref is not None else 0.0)

    secs = {v: 0.0 for v in variants}
    done = 0
    for pos, (index, _label) in enumerate(chosen):
        x = test_image(index)
        base = encoder_pivot(src.encoder, x, "all").detach()
        add("encoder only (Method 1)", x, base, None)
        for v in variants:
            t = time.perf_counter()
            res = refiners[v].refine(x, stage_seed(a.seed, pos, "refine"))
            secs[v] += time.perf_counter() - t
            add(f"refine, {v}", x, res.pivot.detach(), base)
        for name, E in encoders.items():
            add(f"all-offsets encoder, zero_grad {name}", x, encoder_pivot(E, x, "all").detach(), None)
        done = pos + 1
        if done % 8 == 0 or done == len(chosen):
            print(f"{done}/{len(chosen)} images", file=sys.stderr)
            write(out, a, rows, refiners, secs, done, setup_s)
    return 0


def write(out: Path, a: argparse.Namespace, rows: dict, refiners: dict, secs: dict, done: int, setup_s: float) -> None:
    """results.json and table.md of the images done so far (the run can be stopped at any time)."""
    summary = {
        k: {m: dict(zip(("mean", "std"), mean_std(vals), strict=True)) for m, vals in r.items()}
        for k, r in rows.items()
    }
    result = {
        "images": done,
        "encoder": str(a.encoder),
        "command": " ".join(sys.argv),
        "optimizer_notes": {v: r.optimizer_note for v, r in refiners.items()},
        "seconds_per_image": {v: t / max(1, done) for v, t in secs.items()},
        "setup_seconds": setup_s,
        "summary": summary,
        "per_image": rows,
    }
    (out / "results.json").write_text(json.dumps(result, indent=1))
    lines = [
        "| pivot | MSE | perceptual (fmnist-features) | pivot moved from the encoder's (L2) |",
        "|---|---|---|---|",
    ]
    for k, s in summary.items():
        moved = f"{s['moved']['mean']:.3f}" if k.startswith("refine") else "-"
        lines.append(
            f"| {k} | {s['mse']['mean']:.4f} ± {s['mse']['std']:.4f} | "
            f"{s['perceptual']['mean']:.4f} ± {s['perceptual']['std']:.4f} | {moved} |"
        )
    table = "\n".join(lines)
    (out / "table.md").write_text(f"{done} images\n\n" + table + "\n")
    print(table)


if __name__ == "__main__":
    raise SystemExit(main())
