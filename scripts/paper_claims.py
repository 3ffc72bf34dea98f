"""Measure the paper's claims on Fashion-MNIST and write ``docs/RESULTS.md``.

    python scripts/paper_claims.py --out out/claims --workers 2 --markdown docs/RESULTS.md

What it does (all from the shipped models unless told otherwise, nothing downloaded):
1. takes N test images of Fashion-MNIST (never seen by the generator or the encoders, which trained on the training
   split): ``--per-class`` images of each of Pullover, Coat, Sneaker and Ankle boot (the classes of the two class
   edits) and the rest from the other six classes, the first ones of each class in the test file's order;
2. trains three edit directions on the generator (InterFaceGAN): Coat vs Pullover and Ankle boot vs Sneaker from the
   class labels that the FEATURE network (``fmnist-features``) gives generated samples, and brightness (the mean
   pixel value, no network) from the top and bottom 2% of samples;
3. inverts every image with every row's method, sharing work where the method is the same (the refined pivot of
   "Cycle + refine" is the pivot that "Cycle + refine + tune" tunes around);
4. measures, per row: MSE, SSIM, the domain perceptual distance (the fmnist-features distance, the training loss's),
   the identity-like similarity (cosine of the EVALUATION network's embeddings of input and reconstruction), edit
   success (the evaluation network, ``fmnist-eval``, which no training saw: the fraction of pullovers that become
   coats and coats that become pullovers, likewise sneaker <-> ankle boot, at the edit strength), the brightness
   change of the brightness edit (no network), LEC (e4e's Latent Editing Consistency, with the row's encoder), and
   seconds per image (CPU, one thread per worker);
5. writes a JSON of everything, the Markdown table, and a picture of examples.

Per-image results are appended to ``OUT/shard-K.jsonl`` as they finish; a re-run skips finished images (resume
after an interruption) and measures only the rows an image lacks or holds from other inputs: each row's record carries
a fingerprint of the files and settings it depends on, so a retrained W encoder re-measures the W row alone and an
added ``--cycle-zg`` adds its row; the table uses only rows measured with the current inputs. Workers are separate
processes (``--workers``), each one torch thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EDIT_CLASSES = ("Pullover", "Coat", "Sneaker", "Ankle boot")
PAIRS = {"pullover-coat": ("Coat", "Pullover"), "sneaker-boot": ("Ankle boot", "Sneaker")}


@dataclass(frozen=True)
class Row:
    key: str
    title: str
    pivot: str  # which pivot: enc:<encoder>:<offsets>, refine, refine-fresh, refine-bf16, project
    # tuning: None, "reg" (with the locality regularizer), "noreg", "reg-bf16", "reg-every4" (regularizer every 4th step)
    tune: str | None
    lec_encoder: str  # encoder:offsets used for LEC
    needs: str | None = None  # the option that must be given for this row (an extra encoder)


ROWS = (
    Row("w", "W encoder (`w`)", "enc:w:all", None, "w:all"),
    Row("e4e", "e4e (`e4e`)", "enc:e4e:all", None, "e4e:all"),
    Row("cycle-final", "Cycle encoder, final stage", "enc:cycle:trained", None, "cycle:trained"),
    Row("cycle-all", "Cycle encoder, all offsets", "enc:cycle:all", None, "cycle:all"),
    Row("cycle-refine", "Cycle + refine", "refine", None, "cycle:all"),
    Row("cycle-tune-noreg", "Cycle + tune, no regularizer", "enc:cycle:all", "noreg", "cycle:all"),
    Row("full", "Cycle + refine + tune (full method)", "refine", "reg", "cycle:all"),
    Row("pti", "PTI (W projection + tune)", "project", "noreg", "cycle:all"),
    # rows that isolate one setting each
    Row("cycle-refine-fresh", "Cycle + refine, fresh Ranger", "refine-fresh", None, "cycle:all"),
    Row("full-fresh", "Cycle + refine (fresh Ranger) + tune", "refine-fresh", "reg", "cycle:all"),
    Row(
        "cycle-zg-none",
        "Cycle encoder trained with `--zero-grad none`, all offsets",
        "enc:cycle_zg:all",
        None,
        "cycle_zg:all",
        needs="cycle_zg",
    ),
    Row("full-bf16", "full method, `--precision bf16`", "refine-bf16", "reg-bf16", "cycle:all"),
    Row("full-loc4", "full method, locality regularizer every 4th step", "refine", "reg-every4", "cycle:all"),
    Row("full-noreg", "Cycle + refine + tune, no regularizer", "refine", "noreg", "cycle:all"),
    Row("final-tune", "Cycle encoder, final stage (W pivot) + tune", "enc:cycle:trained", "reg", "cycle:all"),
)
ENCODERS = ("w", "e4e", "cycle", "cycle_zg")


def row_encoders(row: Row) -> list[str]:
    """The encoders a row's numbers depend on: its pivot's (the refinements fine-tune the Cycle encoder) and LEC's."""
    kind = row.pivot.split(":")
    pivot = [kind[1]] if kind[0] == "enc" else ["cycle"] if row.pivot.startswith("refine") else []
    return sorted({*pivot, row.lec_encoder.split(":")[0]})


def fingerprints(args: argparse.Namespace) -> dict[str, str]:
    """Per row, a hash of everything its numbers depend on: the files of the generator and of its encoders, and the
    measuring settings. A record measured with other inputs is stale: a re-run measures that row again."""
    import hashlib

    from cycle_encoding.assets import resolve_model

    files: dict[str, str] = {}

    def sha(name: str) -> str:
        if name not in files:
            files[name] = hashlib.sha256(resolve_model(name).read_bytes()).hexdigest()
        return files[name]

    settings = {k: getattr(args, k) for k in ("tune_steps", "project_steps", "refine_steps", "strengths", "samples",
                                               "seed", "per_class", "others")}  # fmt: skip
    out = {}
    for row in active_rows(args):
        parts = {"generator": sha(args.generator), **{k: sha(getattr(args, k)) for k in row_encoders(row)}, **settings}
        out[row.key] = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
    return out


def active_rows(options: argparse.Namespace | dict[str, Any]) -> list[Row]:
    """The rows this run measures: those of ``--rows`` (default all), less any that needs an encoder not given."""
    o = options if isinstance(options, dict) else vars(options)
    only = [k for k in str(o.get("rows") or "").split(",") if k]
    return [r for r in ROWS if (r.needs is None or o.get(r.needs)) and (not only or r.key in only)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--generator", default="fmnist-generator")
    p.add_argument("--cycle", default="fmnist-encoder", help="the Cycle encoder (paper schedule)")
    p.add_argument("--e4e", default="fmnist-encoder-e4e", help="the e4e-schedule encoder")
    p.add_argument("--w", default="fmnist-encoder-w", help="the W encoder")
    p.add_argument("--cycle-zg", default=None,
                   help="optional: the Cycle encoder trained with --zero-grad none (adds its row)")  # fmt: skip
    p.add_argument("--out", default="out/claims")
    p.add_argument("--per-class", type=int, default=40, help="test images of each edit class (default 40)")
    p.add_argument("--others", type=int, default=40, help="test images of the other six classes (default 40)")
    p.add_argument("--strengths", default="3,6",
                   help="edit strengths in standard deviations of the samples' codes along the direction (default "
                   "3,6; LEC at the first)")  # fmt: skip
    p.add_argument("--samples", type=int, default=10_000, help="generated samples per direction (default 10000)")
    p.add_argument("--tune-steps", type=int, default=350)
    p.add_argument("--project-steps", type=int, default=450)
    p.add_argument("--refine-steps", type=int, default=16)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--shard", default=None, help=argparse.SUPPRESS)
    p.add_argument("--collect-only", action="store_true", help="write the results of the images finished so far")
    p.add_argument("--markdown", default=None, help="also write the Markdown here (e.g. docs/RESULTS.md)")
    p.add_argument("--figure", default=None, help="the examples picture (default: beside --markdown, images/)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rows", default=None,
                   help="measure only these rows (comma-separated keys: " + ",".join(r.key for r in ROWS) + ")")  # fmt: skip
    args = p.parse_args(argv)
    unknown = sorted(set(str(args.rows or "").split(",")) - {r.key for r in ROWS} - {""})
    if unknown:
        p.error(f"unknown row(s) {','.join(unknown)}; the rows are {','.join(r.key for r in ROWS)}")
    return args


# ---------------------------------------------------------------------------------------------------------------
# set-up shared by the workers


def select_images(per_class: int, others: int) -> list[tuple[int, int]]:
    """(test index, label) of the chosen test images, in a fixed order."""
    from cycle_encoding.data.fashion_mnist import CLASSES, load_split

    _, labels = load_split("test")
    chosen: list[tuple[int, int]] = []
    for name in EDIT_CLASSES:
        k = CLASSES.index(name)
        chosen += [(int(i), k) for i in (labels == k).nonzero()[0][:per_class]]
    rest = [k for k, n in enumerate(CLASSES) if n not in EDIT_CLASSES]
    take = {k: others // len(rest) + (1 if j < others % len(rest) else 0) for j, k in enumerate(rest)}
    for k in rest:
        chosen += [(int(i), k) for i in (labels == k).nonzero()[0][: take[k]]]
    return chosen


def test_image(index: int) -> Any:
    from cycle_encoding.data.fashion_mnist import load_split, pad_to_32, to_unit_range

    images, _ = load_split("test")
    return pad_to_32(to_unit_range(images[index]))[None, None]


def make_directions(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Train (or read back) the three directions; their strengths in code units."""
    import torch

    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.editing import as_scorer, load_directions, sample_and_score, save_directions, train_boundary

    info_file = out / "directions.json"
    if info_file.is_file():
        info = json.loads(info_file.read_text())
        for k in info:
            info[k]["direction"] = load_directions(out / f"{k}.safetensors")
        return info
    G = load_generator(args.generator)
    info: dict[str, Any] = {}
    specs = {
        **{k: ("fmnist-features", f"{a} vs {b}") for k, (a, b) in PAIRS.items()},
        "brightness": ("brightness", None),
    }
    with torch.no_grad():
        ws = G.mapping(torch.randn(args.samples, G.z_dim, generator=torch.Generator().manual_seed(args.seed + 1)))[:, 0]
    for key, (clf, attribute) in specs.items():
        print(f"direction {key}: {args.samples} samples scored by {clf} {attribute or ''}", flush=True)
        scorer = as_scorer(clf, attribute, labels=attribute is not None)
        codes, scores = sample_and_score(G, scorer, args.samples, seed=args.seed)
        res = train_boundary(codes, scores, seed=args.seed, name=key)
        d = res.direction.vectors.reshape(-1)
        sigma = float((ws @ d).std())
        save_directions(res.direction, out / f"{key}.safetensors")
        info[key] = {"classifier": clf, "attribute": attribute, "sigma": sigma,
                     **{k: v for k, v in res.summary().items() if k != "direction"}}  # fmt: skip
    info_file.write_text(json.dumps(info, indent=1))
    for k in info:
        info[k]["direction"] = load_directions(out / f"{k}.safetensors")
    return info


class Context:
    """The networks one worker needs, loaded once."""

    def __init__(self, args: argparse.Namespace, out: Path) -> None:
        import torch

        from cycle_encoding.checkpoints.generator import load_generator
        from cycle_encoding.editing import load_classifier
        from cycle_encoding.inversion import RefineConfig, RegularizedRefiner, build_loss_networks, load_encoder_source
        from cycle_encoding.inversion.refine import open_training_images
        from cycle_encoding.losses.perceptual import build_perceptual

        self.args = args
        self.G = load_generator(args.generator)
        self.sources = {k: load_encoder_source(getattr(args, k)) for k in ENCODERS if getattr(args, k)}
        self.E = {k: s.encoder for k, s in self.sources.items()}
        self.nets = build_loss_networks("fmnist-features", None, "fmnist-features", None, torch.device("cpu"))
        self.perceptual = build_perceptual("fmnist-features")
        self.eval_net = load_classifier("fmnist-eval")
        cyc = self.sources["cycle"]
        size = int(cyc.image_size or self.G.resolution)
        train = open_training_images(cyc.train_data or "fashion-mnist", size, self.G.img_channels, args.cycle)
        variants = {"refine": {}, "refine-fresh": {"optimizer_state": "fresh"}, "refine-bf16": {"precision": "bf16"}}
        self.refiners = {
            key: RegularizedRefiner(
                self.G, self.E["cycle"], train, RefineConfig(steps=args.refine_steps, **extra), self.nets,
                optimizer_state=cyc.optimizer_state, optimizer_settings=cyc.optimizer_settings, image_size=size,
                source=args.cycle,
            )
            for key, extra in variants.items()
        }  # fmt: skip
        self.rows = active_rows(args)
        self.directions = make_directions(args, out)
        self.classes = list(self.eval_net.outputs)


def strengths(args: argparse.Namespace) -> list[float]:
    return [float(v) for v in str(args.strengths).split(",")]


def timed(fn: Any, *a: Any, **k: Any) -> tuple[Any, float]:
    t0 = time.perf_counter()
    r = fn(*a, **k)
    return r, time.perf_counter() - t0


def measure_image(
    ctx: Context, position: int, index: int, label: int, rows: list[Row] | None = None
) -> tuple[dict[str, Any], dict[str, Any]]:
    """The measures of every row (or of ``rows``) for one test image, and each such row's reconstruction."""
    import torch
    import torch.nn.functional as F

    from cycle_encoding.editing.classifier import brightness
    from cycle_encoding.inversion import ProjectConfig, TuneConfig, encoder_pivot, pivotal_tune, project_w
    from cycle_encoding.inversion.common import render, stage_seed
    from cycle_encoding.inversion.pivot import resolve_stage
    from cycle_encoding.metrics import mse, ssim

    a, G = ctx.args, ctx.G
    x = test_image(index)
    pivots: dict[str, torch.Tensor] = {}
    seconds: dict[str, float] = {}

    def pivot_of(name: str) -> torch.Tensor:  # computed on first use: a re-run that fills one row pays for its own
        if name not in pivots:
            if name.startswith("enc:"):
                _, key, offsets = name.split(":")
                pivots[name], seconds[name] = timed(encoder_pivot, ctx.E[key], x, offsets)
            elif name in ctx.refiners:  # the same seed: the same random training images
                r, seconds[name] = timed(ctx.refiners[name].refine, x, stage_seed(a.seed, position, "refine"))
                pivots[name] = r.pivot.detach()
            else:
                pc = ProjectConfig(steps=a.project_steps)
                p, seconds[name] = timed(project_w, G, x, ctx.nets, pc, stage_seed(a.seed, position, "project"))
                pivots[name] = p.pivot.detach()
        return pivots[name]

    tuned: dict[tuple[str, str], Any] = {}
    recons: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {"position": position, "index": index, "label": label, "rows": {}}
    for row in ctx.rows if rows is None else rows:
        pivot = pivot_of(row.pivot)
        secs = seconds[row.pivot]
        if row.pivot.startswith("refine"):  # the refinement starts from the encoder's code
            pivot_of("enc:cycle:all")
            secs += seconds["enc:cycle:all"]
        G_row = G
        extra: dict[str, Any] = {}
        if row.tune is not None:
            cache = (row.pivot, row.tune)
            if cache not in tuned:
                tc = TuneConfig(steps=a.tune_steps, locality=row.tune.startswith("reg"),
                                precision="bf16" if row.tune.endswith("bf16") else "fp32",
                                locality_every=4 if row.tune.endswith("every4") else 1)  # fmt: skip
                tuned[cache] = timed(pivotal_tune, G, pivot, x, ctx.nets, tc, stage_seed(a.seed, position, "tune"))
            t, s = tuned[cache]
            G_row, secs = t.generator, secs + s
            extra = {"tune_updates": t.updates, "stopped_early": t.stopped_early}
        with torch.no_grad():
            y = render(G_row, pivot).clamp(-1, 1)
            m: dict[str, Any] = {
                "mse": float(mse(y, x)[0]),
                "ssim": float(ssim(y, x)[0]),
                "perceptual": float(ctx.perceptual(y, x).reshape(-1)[0]),
                "identity": float(F.cosine_similarity(ctx.eval_net.embed(y), ctx.eval_net.embed(x), dim=1)[0]),
                "seconds": secs,
                **extra,
            }
            enc_key, enc_offsets = row.lec_encoder.split(":")
            E = ctx.E[enc_key]
            stage = resolve_stage(E, enc_offsets)
            lec: list[float] = []
            classes = ctx.classes
            for ekey, info in ctx.directions.items():
                d = info["direction"].vectors.reshape(1, 1, -1).to(pivot)
                vs = []
                for j, k in enumerate(strengths(a)):
                    s = k * float(info["sigma"])
                    tag = f"edit_{ekey}" + ("" if j == 0 else f"@{k:g}")
                    if ekey in PAIRS:
                        pos_name, neg_name = PAIRS[ekey]
                        true = classes[label]
                        if true not in (pos_name, neg_name):
                            continue
                        sign = 1.0 if true == neg_name else -1.0  # toward the other class
                        target = classes.index(pos_name if sign > 0 else neg_name)
                        v = sign * s * d
                        edited = render(G_row, pivot + v).clamp(-1, 1)
                        m[tag] = float(ctx.eval_net(edited).argmax(1)[0] == target)
                        m[f"recon_class_{ekey}"] = float(ctx.eval_net(y).argmax(1)[0] == label)
                        vs += [v] if j == 0 else []
                    else:
                        up = render(G_row, pivot + s * d).clamp(-1, 1)
                        down = render(G_row, pivot - s * d).clamp(-1, 1)
                        b0, b1, b2 = (float(brightness(t)[0]) for t in (y, up, down))
                        m[tag] = ((b1 - b0) + (b0 - b2)) / 2
                        vs += [s * d, -s * d] if j == 0 else []
                prev = E.stage
                try:
                    E.stage = stage
                    for v in vs:
                        back = E(render(G_row, pivot + v)) - v
                        lec.append(float((pivot - back).flatten(1).norm(dim=1)[0]))
                finally:
                    E.stage = prev
            m["lec"] = sum(lec) / len(lec)
        out["rows"][row.key] = m
        recons[row.key] = y[0]
    return out, recons


# ---------------------------------------------------------------------------------------------------------------
# workers and collection


def read_records(shards: list[Path]) -> list[dict[str, Any]]:
    """The per-image records of these shard files, in file order (a missing file holds none)."""
    recs = []
    for shard in shards:
        if shard.is_file():
            recs += [json.loads(line) for line in shard.read_text().splitlines() if line.strip()]
    return recs


def pending(
    recs: list[dict[str, Any]], chosen: list[tuple[int, int]], rows: list[Row], prints: dict[str, str], k: int, n: int
) -> list[tuple[int, int, int, list[Row]]]:
    """Worker k of n's images still to measure: (position, test index, label, rows), the rows being those that the
    records (every worker's, so that a re-run may use another ``--workers``) lack for the image or hold with a
    fingerprint other than the current one in ``prints``."""
    have: dict[int, set[tuple[str, str]]] = {}  # position -> (row, fingerprint) measured, over all its records
    for rec in recs:
        have.setdefault(rec["position"], set()).update(rec.get("fingerprints", {}).items())
    todo = []
    for pos, (i, lab) in enumerate(chosen):
        missing = [row for row in rows if (row.key, prints[row.key]) not in have.get(pos, set())]
        if pos % n == k and missing:
            todo.append((pos, i, lab, missing))
    return todo


def run_shard(args: argparse.Namespace, out: Path, k: int, n: int) -> None:
    import torch

    torch.set_num_threads(1)
    chosen = select_images(args.per_class, args.others)
    shard = out / f"shard-{k}.jsonl"
    prints = fingerprints(args)
    rows = active_rows(args)
    todo = pending(read_records(sorted(out.glob("shard-*.jsonl"))), chosen, rows, prints, k, n)
    if not todo:
        return
    ctx = Context(args, out)
    (out / "examples").mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for j, (pos, i, lab, missing) in enumerate(todo):
        rec, recons = measure_image(ctx, pos, i, lab, missing)
        rec["fingerprints"] = {row.key: prints[row.key] for row in missing}
        if pos in example_positions(chosen):
            file = out / "examples" / f"{pos}.pt"
            old = torch.load(file, weights_only=True) if file.is_file() else {}
            torch.save({**old, "target": test_image(i)[0], **recons}, file)
        with shard.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        el = time.perf_counter() - t0
        what = "" if len(missing) == len(rows) else f", rows {','.join(r.key for r in missing)}"
        print(f"[worker {k}] {j + 1}/{len(todo)} images ({el / (j + 1):.1f} s/image, test index {i}{what})", flush=True)


def merge_records(recs: list[dict[str, Any]], prints: dict[str, str] | None = None) -> list[dict[str, Any]]:
    """One record per image, in position order: a later record's rows (a re-run that added or re-measured rows)
    replace the earlier ones'. With ``prints``, only the rows measured with those inputs are kept."""
    by_pos: dict[int, dict[str, Any]] = {}
    for r in recs:
        rows = {key: m for key, m in r["rows"].items()
                if prints is None or r.get("fingerprints", {}).get(key) == prints.get(key)}  # fmt: skip
        if r["position"] in by_pos:
            by_pos[r["position"]]["rows"].update(rows)
        else:
            by_pos[r["position"]] = {**r, "rows": rows}
    return [by_pos[p] for p in sorted(by_pos) if by_pos[p]["rows"]]


def collect(args: argparse.Namespace, out: Path, prints: dict[str, str] | None = None) -> dict[str, Any]:
    import statistics

    recs = merge_records(read_records(sorted(out.glob("shard-*.jsonl"))), prints)
    table: dict[str, Any] = {}
    for row in active_rows(args):
        per = [r["rows"][row.key] for r in recs if row.key in r["rows"]]
        if not per:
            continue
        cols: dict[str, Any] = {}
        edit_cols = sorted({c for p in per for c in p if c.startswith("edit_")})
        for col in ("mse", "ssim", "perceptual", "identity", "lec", "seconds", *edit_cols):
            vals = [p[col] for p in per if col in p]
            if vals:
                sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
                cols[col] = {"mean": statistics.fmean(vals), "std": statistics.pstdev(vals), "n": len(vals),
                             "se": sd / len(vals) ** 0.5}  # fmt: skip
        table[row.key] = {"title": row.title, **cols}
    return {"images": len(recs), "rows": table, "per_image": recs}


def class_success(m: dict[str, Any]) -> float | None:
    """One image's class-edit success, averaged over its edit's strengths (None: not an edit class's image)."""
    vals = [v for c, v in m.items() if c.startswith(("edit_pullover-coat", "edit_sneaker-boot"))]
    return sum(vals) / len(vals) if vals else None


def paired(recs: list[dict[str, Any]], a: str, b: str, col: str) -> dict[str, float]:
    """Row a minus row b over the images that have both: mean, its standard error, n, and the two means."""
    import statistics

    pairs = []
    for r in recs:
        ra, rb = r["rows"].get(a), r["rows"].get(b)
        if ra is None or rb is None:
            continue
        va, vb = (class_success(x) if col == "success" else x.get(col) for x in (ra, rb))
        if va is not None and vb is not None:
            pairs.append((float(va), float(vb)))
    if not pairs:
        return {"diff": float("nan"), "se": float("nan"), "n": 0, "a": float("nan"), "b": float("nan")}
    d = [x - y for x, y in pairs]
    se = statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else float("nan")
    return {"diff": statistics.fmean(d), "se": se, "n": len(d),
            "a": statistics.fmean(x for x, _ in pairs), "b": statistics.fmean(y for _, y in pairs)}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.shard:
        k, n = (int(v) for v in args.shard.split("/"))
        run_shard(args, out, k, n)
        return 0
    t0 = time.perf_counter()
    # directions first, once (the workers read them back)
    import torch

    torch.set_num_threads(max(1, args.workers))
    make_directions(args, out)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:])]
    procs = [] if args.collect_only else [
        subprocess.Popen([*base, "--shard", f"{k}/{args.workers}"], env=env) for k in range(args.workers)
    ]  # fmt: skip
    codes = [p.wait() for p in procs]
    if any(codes):
        print(f"a worker failed (exit codes {codes}); re-run to resume", file=sys.stderr)
        return 1
    result = collect(args, out, fingerprints(args))
    directions = json.loads((out / "directions.json").read_text())
    # wall time over every invocation that measured (a resumed or row-adding run adds its own; a rewrite adds none)
    spent = (
        json.loads((out / "wall.json").read_text()) if (out / "wall.json").is_file() else {"seconds": 0.0, "runs": 0}
    )
    if not args.collect_only:
        spent = {"seconds": spent["seconds"] + time.perf_counter() - t0, "runs": spent["runs"] + 1}
        (out / "wall.json").write_text(json.dumps(spent))
    result.update(directions=directions, options={k: v for k, v in vars(args).items() if k != "shard"},
                  wall_seconds=spent["seconds"], invocations=spent["runs"])  # fmt: skip
    (out / "results.json").write_text(json.dumps({k: v for k, v in result.items() if k != "per_image"}, indent=1))
    figure = Path(args.figure) if args.figure else None
    if args.markdown and figure is None:
        figure = Path(args.markdown).parent / "images" / "results-examples.png"
    if figure is not None:
        write_figure(args, out, figure)
    md = markdown(result, figure, Path(args.markdown).parent if args.markdown else out)
    (out / "RESULTS.md").write_text(md)
    if args.markdown:
        target = Path(args.markdown)
        kept = target.read_text().split(MARKER, 1)[1] if target.is_file() and MARKER in target.read_text() else "\n"
        target.write_text(md + kept.lstrip("\n"))
    print(md)
    return 0


def fmt(cell: dict[str, Any] | None, digits: int = 4, pct: bool = False, se: bool = True) -> str:
    """A cell's mean, with its standard error (over images) after a +/- when the collection has one."""
    if cell is None:
        return "n/a"
    err = cell.get("se") if se else None
    if pct:
        return f"{100 * cell['mean']:.1f}%" + ("" if err is None else f" ±{100 * err:.1f}")
    return f"{cell['mean']:.{digits}f}" + ("" if err is None else f" ±{err:.{digits}f}")


MARKER = "<!-- everything above is written by scripts/paper_claims.py; what follows is kept on re-runs -->"


def short(path: Any) -> str:
    """A path as the page shows it: the run cache as ``runs``, the home folder as ``~``."""
    return str(path).replace(str(Path.home() / ".cache/cycle-encoding/runs"), "runs").replace(str(Path.home()), "~")


def command_line(options: dict[str, Any]) -> str:
    """The command that makes these results: the options that differ from the defaults (home paths shortened)."""
    defaults = vars(parse_args([]))
    parts = ["python scripts/paper_claims.py"]
    for k, v in options.items():
        if k in ("shard", "collect_only", "figure") or v == defaults.get(k):
            continue
        parts.append(f"--{k.replace('_', '-')} {short(v)}")
    return " ".join(parts)


def compare(recs: list[dict[str, Any]], a: str, b: str, col: str, lower_is_better: bool) -> tuple[str, str]:
    """Row a against row b on one measure, paired over images: ("better" | "worse" | "equal within noise", text).
    Better or worse means the mean paired difference is more than two standard errors from zero."""
    p = paired(recs, a, b, col)
    d, se = p["diff"], p["se"]
    if not (abs(d) > 2 * se):
        word = "equal within noise"
    else:
        word = "better" if (d < 0) == lower_is_better else "worse"
    pct = col == "success"
    if pct:
        text = f"{100 * p['a']:.1f}% vs {100 * p['b']:.1f}% (difference {100 * d:+.1f} ± {100 * se:.1f} points)"
    else:
        digits = 2 if col == "lec" else 4
        text = f"{p['a']:.{digits}f} vs {p['b']:.{digits}f} (difference {d:+.{digits}f} ± {se:.{digits}f})"
    return word, text


def verdicts(rows: dict[str, Any], recs: list[dict[str, Any]]) -> list[str]:
    """The paper's claims, each as measured here, and what each isolating row shows. Every comparison is paired over
    the same images; a difference counts when it is more than two standard errors (of the paired difference) from
    zero, otherwise the page says "equal within noise"."""
    out = []
    for enc in ("cycle-final", "cycle-all"):
        if enc not in rows:
            continue
        dist = {c: compare(recs, enc, "w", c, True) for c in ("mse", "perceptual")}
        edit = {c: compare(recs, enc, "w", c, c != "success") for c in ("success", "lec")}
        lower = all(w == "better" for w, _ in dist.values())
        keeps = all(w != "worse" for w, _ in edit.values())
        verdict = "holds" if lower and keeps else "does not hold"
        out.append(
            f"- (a) {rows[enc]['title']} vs the W encoder, lower distortion with W's editability: **{verdict}**. "
            f"MSE {dist['mse'][1]}: {dist['mse'][0]}; perceptual {dist['perceptual'][1]}: {dist['perceptual'][0]}; "
            f"class edit success {edit['success'][1]}: {edit['success'][0]}; LEC {edit['lec'][1]}: {edit['lec'][0]}."
        )
    if "full" in rows and "pti" in rows:
        p = paired(recs, "full", "pti", "mse")
        ratio = p["a"] / p["b"]
        out.append(
            f"- (b) the full method reconstructs within 10% of PTI's MSE: **{'holds' if ratio <= 1.10 else 'does not hold'}** "
            f"(MSE {p['a']:.4f} vs {p['b']:.4f}, ratio {ratio:.2f}; perceptual "
            f"{compare(recs, 'full', 'pti', 'perceptual', True)[1]})."
        )
        edit = {c: compare(recs, "full", "pti", c, c != "success") for c in ("success", "lec", "edit_brightness")}
        better = edit["success"][0] == "better" or (edit["success"][0] != "worse" and edit["lec"][0] == "better")
        out.append(
            f"- (b) the full method edits better than PTI: **{'holds' if better else 'does not hold'}** (taking better "
            "as: class edits succeed more often, or as often with a lower LEC). Class edit success "
            f"{edit['success'][1]}: {edit['success'][0]}; LEC {edit['lec'][1]}: {edit['lec'][0]}; brightness change "
            f"{edit['edit_brightness'][1]} (larger moves more)."
        )
    isolating = [
        (
            "cycle-refine",
            "cycle-refine-fresh",
            "the refinement with the restored Ranger state vs a fresh Ranger, pivot only",
        ),
        ("full", "full-fresh", "the full method with the restored state vs a fresh Ranger, after tuning"),
        (
            "cycle-zg-none",
            "cycle-all",
            "the all-offsets encoder trained with `--zero-grad none` vs the authors' zero_grad",
        ),
        ("full-bf16", "full", "the full method in bf16 vs fp32"),
        ("full-loc4", "full", "the full method with the locality regularizer on every 4th tuning step vs every step"),
        ("full", "full-noreg", "the full method with the locality regularizer vs without it (the same refined pivot)"),
        ("final-tune", "full", "regularized tuning around the Cycle encoder's W pivot vs the refined W+ pivot"),
        ("final-tune", "pti", "regularized tuning around the Cycle encoder's W pivot vs PTI"),
    ]
    for a, b, what in isolating:
        if a not in rows or b not in rows:
            continue
        parts = []
        for col, label in (("mse", "MSE"), ("perceptual", "perceptual"), ("success", "class edit success"),
                           ("lec", "LEC")):  # fmt: skip
            word, text = compare(recs, a, b, col, col != "success")
            parts.append(f"{label} {text}: {word}")
        sa, sb = rows[a].get("seconds"), rows[b].get("seconds")
        if a in ("full-bf16", "full-loc4") and sa and sb:
            parts.append(f"{sb['mean'] / sa['mean']:.2f}x the speed")
        elif b == "full-noreg" and sa and sb:
            parts.append(f"{sa['mean'] / sb['mean']:.2f}x the time")
        out.append(f"- {what}: " + "; ".join(parts) + ".")
    return out


def edit_cell(r: dict[str, Any], key: str, ks: list[float], pct: bool) -> str:
    """An edit's measure at every strength, ``a / b``."""
    cells = [r.get(f"edit_{key}" + ("" if j == 0 else f"@{k:g}")) for j, k in enumerate(ks)]
    return " / ".join(fmt(c, 3, pct=pct) for c in cells)


def markdown(result: dict[str, Any], figure: Path | None, base: Path) -> str:
    rows = result["rows"]
    o = result["options"]
    ks = [float(v) for v in str(o["strengths"]).split(",")]
    d = result["directions"]
    chosen = len(EDIT_CLASSES) * o["per_class"] + o["others"]
    lines = [
        "# Results: the paper's claims measured on Fashion-MNIST",
        "",
        f"Made by `{command_line(o)}` ({result['wall_seconds'] / 60:.0f} min of wall time on a 2-core CPU machine"
        + (f" over {result['invocations']} invocations" if result.get("invocations", 1) > 1 else "")
        + f", {o['workers']} worker process(es) with one torch thread each; a re-run resumes and measures only the "
        "rows whose models or settings changed, and `--collect-only` rewrites this page from the images finished so "
        "far).",
        "",
        "## Set-up",
        "",
        f"- **Images**: {result['images']} Fashion-MNIST test images"
        + (
            f" (of the {chosen} chosen: the rest not measured yet; a re-run resumes)"
            if result["images"] < chosen
            else ""
        )
        + ", none seen by any training: the first "
        f"{o['per_class']} test images of each of Pullover, Coat, Sneaker and Ankle boot, and {o['others']} of the other "
        "six classes.",
        f"- **Models**: generator `{short(o['generator'])}`; encoders `{short(o['cycle'])}` (the paper's cycle "
        f"schedule), `{short(o['e4e'])}` (e4e's schedule) and `{short(o['w'])}` (W only), trained on that generator "
        "with the same losses, images and batch (their commands, steps and validation curves: `docs/FAIR_SCALE.md` "
        "and the model cards in `src/cycle_encoding/assets/models/`).",
        f"- **Inversion**: refine = the regularized encoder refinement ({o['refine_steps']} forward passes, M = 7 "
        f"random training images); tune = pivotal tuning, at most {o['tune_steps']} steps (early stop at "
        f"perceptual <= 0.07), with or without the locality regularizer; PTI = W projection ({o['project_steps']} "
        "steps) + tuning without the regularizer (PTI's default). Losses: MSE + the fmnist-features perceptual "
        "distance (+ the fmnist-features identity-like term in refine).",
        f"- **Edits** (InterFaceGAN in W, trained on {o['samples']:,} generator samples; the same direction for every "
        f"row; strengths {' and '.join(f'{k:g}' for k in ks)} standard deviations of the samples' codes along the "
        "direction, each edit's cells below give both): "
        + "; ".join(
            f"{k} ({v['attribute'] or 'mean pixel value'}: {v['positives']} / {v['negatives']} samples, validation "
            f"accuracy {v['val_accuracy']}, 1 sd = {v['sigma']:.2f})"
            for k, v in d.items()
        )
        + ".",
        "- **Columns**: MSE and SSIM of the reconstruction ([-1, 1] images; SSIM on [0, 1]); perceptual = the "
        "fmnist-features distance (the domain's LPIPS-like distance, which the losses use); identity-like = cosine "
        "similarity of the evaluation network's (fmnist-eval) embeddings of input and reconstruction; class edit "
        "success = the fraction of pullovers (coats) that fmnist-eval calls coats (pullovers) after the edit, and the "
        "same for sneakers and ankle boots (fmnist-eval is used by no training or direction); brightness change = "
        "the mean pixel change of the +/- brightness edit, in [0, 1] units (no network); LEC = e4e's latent editing "
        "consistency over all edits, with the row's encoder (Cycle's with all offsets for refine, tune and PTI "
        "rows); s/image = CPU seconds of the inversion.",
        "",
        "## Table",
        "",
        "| method | MSE | SSIM | perceptual | identity-like | pullover <-> coat success | sneaker <-> boot success | "
        "brightness change | LEC | s/image |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    shown = [row for row in active_rows(o) if row.key in rows]  # rows with measurements (not yet: left out)
    for row in shown:
        r = rows[row.key]
        lines.append(
            f"| {row.title} | {fmt(r.get('mse'))} | {fmt(r.get('ssim'), 3)} | {fmt(r.get('perceptual'))} | "
            f"{fmt(r.get('identity'), 3)} | {edit_cell(r, 'pullover-coat', ks, True)} | "
            f"{edit_cell(r, 'sneaker-boot', ks, True)} | {edit_cell(r, 'brightness', ks, False)} | "
            f"{fmt(r.get('lec'), 2)} | {fmt(r.get('seconds'), 2)} |"
        )
    if figure is not None:
        lines += [
            "",
            f"![examples]({os.path.relpath(figure, base)})",
            "",
            "Columns: the first test image of each class. Rows: the input, then the rows of the table in order ("
            + ", ".join(r.title for r in shown)
            + ").",
        ]
    lines += [
        "",
        "## The claims, as measured",
        "",
        "Each comparison is paired over the same images: the difference of the two rows' means with its standard error "
        "(of the per-image differences); a difference counts when it is more than two standard errors from zero, "
        "otherwise it is called equal within noise. Table cells give the mean ± its standard error over images.",
        "",
        *verdicts(rows, result.get("per_image", [])),
        "",
        MARKER,
        "",
    ]
    return "\n".join(lines)


def example_positions(chosen: list[tuple[int, int]]) -> list[int]:
    """The first chosen image of each class (at most 8): the examples picture's columns."""
    firsts: dict[int, int] = {}
    for pos, (_, lab) in enumerate(chosen):
        firsts.setdefault(lab, pos)
    return sorted(firsts.values())[:8]


def write_figure(args: argparse.Namespace, out: Path, figure: Path) -> None:
    """Examples: one column per example image; rows: the input, then every method's reconstruction (3x upscaled)."""
    import torch

    from cycle_encoding.utils import save_image

    cols = []
    for pos in example_positions(select_images(args.per_class, args.others)):
        if not (out / "examples" / f"{pos}.pt").is_file():
            continue
        ex = torch.load(out / "examples" / f"{pos}.pt", weights_only=True)
        cols.append(torch.cat([ex["target"], *(ex[row.key] for row in active_rows(args) if row.key in ex)], dim=1))
    grid = torch.cat(cols, dim=2)
    grid = torch.nn.functional.interpolate(grid[None], scale_factor=3, mode="nearest")[0]
    figure.parent.mkdir(parents=True, exist_ok=True)
    save_image(grid, figure)


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT / "src"))
    raise SystemExit(main())
