"""Copy a trained Fashion-MNIST generator and Cycle encoder into the package (``assets/models``) with model cards.

    python scripts/ship_models.py --generator-run RUNS/00000-fmnist32 --encoder-run RUNS/encoders/00000-cycle

The generator card gives the evaluation-classifier Frechet distance (``fmnist-eval`` features; not the Inception FID)
of 10,000 samples to the 10,000 test images, beside the same distance from 10,000 TRAINING images to the test images
(the floor a perfect generator would reach at this sample size). The encoder card gives reconstruction measures of
the first 1,000 test images (never seen in training), with the offsets of the stage training ended in and with all.
The encoder's training-run Ranger state (from the run's ``checkpoint.pt``) is shipped beside it in bf16
(``fmnist-encoder-optimizer.safetensors``; the refinement restores it for every target), and the card gives how much
the refinement's result changes between the fp32 state and the bf16 one.
The sample grid goes to ``docs/images/fmnist-generator-samples.png``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

import torch  # noqa: E402

from cycle_encoding.assets import MODELS_DIR, SHIPPED_MODELS  # noqa: E402
from cycle_encoding.checkpoints.native import file_sha256, read_native_header  # noqa: E402
from cycle_encoding.report.curves import setting_resumes  # noqa: E402

FD_SAMPLES = 10_000
RECON_IMAGES = 1_000


def run_log(run: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines() if line.strip()]


def machine_line(m: dict[str, Any]) -> str:
    import os

    threads = m.get("cpu_threads", m.get("torch_threads"))
    return (f"{m.get('platform')}, {os.cpu_count()} CPUs, {threads} torch thread(s), {m.get('device', 'cpu')}, "
            f"torch {m.get('torch')}, Python {m.get('python')}")  # fmt: skip


def this_machine() -> str:
    """The machine this script runs on (the encoder runs do not record theirs; they ran here)."""
    import os
    import platform

    return (f"{platform.platform()}, {os.cpu_count()} CPUs, 1 torch thread per process, cpu, torch "
            f"{torch.__version__}, Python {platform.python_version()}")  # fmt: skip


def test_images(n: int | None = None) -> torch.Tensor:
    from cycle_encoding.training.classifier_trainer import load_tensors

    return load_tensors("fashion-mnist", "test", limit=n)[0]


@torch.no_grad()
def generator_metrics(G: Any) -> dict[str, Any]:
    from cycle_encoding.data.fashion_mnist import load_split, pad_to_32, to_unit_range
    from cycle_encoding.editing import load_classifier
    from cycle_encoding.metrics import classifier_frechet_distance, generator_sample_metrics

    clf = load_classifier("fmnist-eval")
    test = test_images()
    m = generator_sample_metrics(G, clf, test, FD_SAMPLES, seed=0)
    train_images, _ = load_split("train")
    idx = torch.randperm(len(train_images), generator=torch.Generator().manual_seed(1))[:FD_SAMPLES].numpy()
    train = pad_to_32(to_unit_range(train_images[idx]))[:, None]
    floor = classifier_frechet_distance(train, test, clf)
    return {"fd": {k: m[k] for k in ("name", "fd", "images_a", "images_b", "dims")}, "floor": floor,
            "class_counts": m["class_counts"]}  # fmt: skip


def reproduce_command(cfg: dict[str, Any]) -> str:
    """The run's recorded command with the program as ``cycle-encoding`` and the output folder as ``runs``."""
    import shlex

    words = shlex.split(cfg.get("_resolved", {}).get("command", ""))
    if not words:
        return "(the run's config.json records no command)"
    words[0] = "cycle-encoding"
    if "--out" in words[:-1]:
        words[words.index("--out") + 1] = "runs"
    return shlex.join(words)


def curve_lines(run: Path) -> list[str]:
    """The run's classifier-FD evaluations (``metric`` records of ``--metric-every``) as a markdown table."""
    recs = [r for r in run_log(run) if r.get("kind") == "metric"]
    if not recs:
        return []
    out = ["## Training curve", "", "| step | kimg | FD | smallest class share |", "|---|---|---|---|"]
    out += [f"| {r['step']} | {r['kimg']:g} | {r['fd']:.2f} | {100 * r['min_class_share']:.1f}% |" for r in recs]
    out += ["", "(10,000 samples of g_ema against the test set at each step, fmnist-eval features.)", ""]
    return out


def schedule_note(run: Path, log: list[dict[str, Any]]) -> str:
    """How the run's schedule ended: by its own length, or by the validation plateau rule (a ``stop`` record), and
    any resume after such a stop (a ``resume`` record and the settings it changed)."""
    sched = json.loads((run / "schedule.json").read_text()) if (run / "schedule.json").is_file() else {}
    phases = ", ".join(f"{p['name']} {p['start']}-{p['end']}" for p in sched.get("phases", []))
    events = []
    for r in log:
        if r.get("kind") == "stop":
            events.append(f"stopped at step {r['step']} because {r['reason']}")
        elif r.get("kind") == "resume" and r.get("changed"):
            events.append(f"resumed at step {r['step']} with {resume_flags(r)}")
    ends = [r["step"] for r in log if r.get("kind") == "end"]
    if events and ends and not events[-1].startswith("stopped at step " + str(ends[-1])):
        events.append(f"ended at step {ends[-1]}")
    parts = [x for x in (phases, *events) if x]
    return f": {'; '.join(parts)}" if parts else ""


def resume_flags(record: dict[str, Any]) -> str:
    """The command-line options that give a resume's changed settings (``--max-steps 38000 --val-patience 0``)."""
    return " ".join(f"--{k.replace('_', '-')} {new}" for k, (_, new) in record.get("changed", {}).items())


def running_seconds(log: list[dict[str, Any]]) -> float:
    """Wall time while the run ran: from each start or resume to the last record before the next one (the gaps
    between a stop or a crash and the resume are not counted)."""
    total, begin, last = 0.0, None, None
    for r in log:
        if r.get("kind") in ("start", "resume"):
            if begin is not None and last is not None:
                total += last - begin
            begin = last = float(r["time"])
        elif "time" in r and begin is not None:
            last = float(r["time"])
    return total + (last - begin if begin is not None and last is not None else 0.0)


def ship_generator(run: Path, grid: Path) -> Path:
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.utils import save_image

    src = run / "generator.safetensors"
    dst = MODELS_DIR / "fmnist-generator.safetensors"
    shutil.copyfile(src, dst)
    G = load_generator(dst)
    pv = read_native_header(dst)["provenance"]
    cfg = json.loads((run / "config.json").read_text())
    m = generator_metrics(G)
    with torch.no_grad():
        z = torch.randn(64, G.z_dim, generator=torch.Generator().manual_seed(0))
        imgs = G(z, noise_mode="const").clamp(-1, 1)
    rows = torch.cat([torch.cat(list(imgs[r * 8 : (r + 1) * 8]), dim=2) for r in range(8)], dim=1)
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_image(torch.nn.functional.interpolate(rows[None], scale_factor=2, mode="nearest")[0], grid)
    n_params = sum(p.numel() for p in G.parameters())
    step = int(pv["step"])
    counts = ", ".join(f"{k} {v}" for k, v in m["class_counts"].items())
    lines = [
        "# fmnist-generator",
        "",
        f"A StyleGAN2 generator of Fashion-MNIST at 32x32, 1 channel ({SHIPPED_MODELS['fmnist-generator']}), in the "
        "project's format (safetensors, kind `generator`; nothing in the file runs). It is g_ema, the moving average "
        "of the trained generator, with its average code w_avg. Load it with "
        '`cycle_encoding.checkpoints.generator.load_generator("fmnist-generator")` or give `--generator '
        "fmnist-generator` to any command.",
        "",
        "## Reproduce",
        "",
        "```",
        reproduce_command(cfg),
        "```",
        "",
        f"The run was stopped at the checkpoint of step {step} (`--resume` continues it exactly, tested; the learning "
        "rate and the EMA do not depend on `--max-steps`). The weights also depend on the torch thread count and, "
        f"in bf16, on the CPU's kernels (the run used {machine_line(pv.get('machine', {}))}).",
        "",
        *curve_lines(run),
        "## Facts",
        "",
        f"- file: `{dst.name}`, {dst.stat().st_size:,} bytes",
        f"- sha256: `{file_sha256(dst)}`",
        f"- parameters: {n_params:,} (mapping {pv.get('n_mlp', cfg['generator']['n_mlp'])} layers of "
        f"{G.w_dim}; synthesis channels {cfg['_resolved']['generator_channels']})",
        f"- data: {pv.get('data')}",
        f"- training: {step} steps of batch {pv.get('batch_size')} ({pv.get('kimg')} kimg), Adam lr "
        f"{cfg['lr']} betas {cfg['betas']}, lazy R1 gamma {pv.get('r1_gamma')} every {cfg['r1_every']}, style mixing "
        f"{pv.get('mixing_prob')}, EMA half-life {pv.get('ema_kimg')} kimg, no path-length regularization, seed "
        f"{pv.get('seed')}",
        f"- wall time: {float(pv.get('train_seconds', 0)):.0f} s of training on {machine_line(pv.get('machine', {}))}",
        f"- written by: {pv.get('tool')} at {pv.get('created')}",
        "",
        "## Metrics",
        "",
        f"- {m['fd']['name']}: **{m['fd']['fd']:.2f}** between {m['fd']['images_a']:,} samples (z ~ N(0, I) seed 0, "
        f"no truncation) and the {m['fd']['images_b']:,} test images",
        f"- the same distance between {m['floor']['images_a']:,} training images and the test images (the floor at "
        f"this sample size): {m['floor']['fd']:.2f}",
        f"- the samples' classes by fmnist-eval: {counts} (the test set has 1,000 of each)",
        "- 64 samples (seed 0): `docs/images/fmnist-generator-samples.png`",
        "",
        "Made by `python scripts/ship_models.py`, which also wrote these figures.",
        "",
    ]
    (MODELS_DIR / "fmnist-generator-card.md").write_text("\n".join(lines), encoding="utf-8")
    return dst


@torch.no_grad()
def encoder_metrics(E: Any, G: Any) -> dict[str, Any]:
    from cycle_encoding.inversion import encoder_pivot
    from cycle_encoding.inversion.common import render
    from cycle_encoding.losses.perceptual import build_perceptual
    from cycle_encoding.metrics import mse, ssim

    x = test_images(RECON_IMAGES)
    dist = build_perceptual("fmnist-features")
    out = {}
    for offsets in ("trained", "all"):
        vals: dict[str, list[float]] = {"mse": [], "ssim": [], "perceptual": []}
        for i in range(0, len(x), 100):
            xb = x[i : i + 100]
            y = render(G, encoder_pivot(E, xb, offsets)).clamp(-1, 1)
            vals["mse"] += mse(y, xb).tolist()
            vals["ssim"] += ssim(y, xb).tolist()
            vals["perceptual"] += dist(y, xb).reshape(-1).tolist()
        out[offsets] = {k: sum(v) / len(v) for k, v in vals.items()}
    return out


REFINE_COMPARE_IMAGES = 16


def refine_state_comparison(E: Any, G: Any, states: dict[str, Any], n: int = REFINE_COMPARE_IMAGES) -> dict[str, Any]:
    """Refine the first ``n`` test images with each optimizer state (same seeds and draws): the pivots' largest
    difference and the reconstruction MSE after refinement, per state."""
    from cycle_encoding.data.datasets import open_dataset
    from cycle_encoding.inversion import RefineConfig, RegularizedRefiner
    from cycle_encoding.inversion.common import LossNetworks, render
    from cycle_encoding.losses.identity import build_identity
    from cycle_encoding.losses.perceptual import build_perceptual
    from cycle_encoding.metrics import mse

    nets = LossNetworks(build_perceptual("fmnist-features"), build_identity("fmnist-features"))
    train = open_dataset("fashion-mnist", 32, 1, "train")
    x = test_images(n)
    pivots: dict[str, torch.Tensor] = {}
    out: dict[str, Any] = {}
    for label, st in states.items():
        ref = RegularizedRefiner(G, E, train, RefineConfig(), nets, optimizer_state=st, image_size=32)
        ps = torch.cat([ref.refine(x[i : i + 1], seed=i).pivot for i in range(n)])
        pivots[label] = ps
        with torch.no_grad():
            out[label] = float(mse(render(G, ps).clamp(-1, 1), x).mean())
    a, b = list(pivots.values())
    out["max_pivot_diff"] = float((a - b).abs().max())
    out["mean_pivot_diff"] = float((a - b).abs().mean())
    return out


def ship_optimizer_state(
    run: Path, E: Any, G: Any, name: str, compare: int = REFINE_COMPARE_IMAGES
) -> tuple[Path, dict[str, Any]]:
    """The run's Ranger state (its ``checkpoint.pt``) beside the shipped encoder, in bf16; and the comparison."""
    from cycle_encoding.checkpoints.optimizer import companion_path, load_optimizer_state, save_optimizer_state
    from cycle_encoding.inversion import load_encoder_source

    src = load_encoder_source(run / "checkpoint.pt")
    if src.optimizer_state is None:
        raise SystemExit(f"{run / 'checkpoint.pt'} holds no optimizer state")
    ck_w = dict(src.encoder.state_dict())
    if any(not torch.equal(ck_w[k], v) for k, v in E.state_dict().items()):
        raise SystemExit(f"{run / 'checkpoint.pt'} is not the checkpoint of the exported encoder")
    dst = companion_path(MODELS_DIR / f"{name}.safetensors")
    save_optimizer_state(dst, src.optimizer_state, E, torch.bfloat16)
    shipped = load_optimizer_state(dst, E)
    cmp = refine_state_comparison(E, G, {"fp32": src.optimizer_state, "bf16": shipped}, compare)
    cmp["images"] = compare
    return dst, cmp


# how each shipped encoder was trained, for its card (the Cycle encoder's is the method; the other two are the
# baselines that docs/RESULTS.md compares it with)
TRAINING_WORDS = {
    "fmnist-encoder": "Trained by the cycle schedule W -> W+ -> W",
    "fmnist-encoder-e4e": "Trained by e4e's schedule (W, then the offsets switched on layer by layer, W+ to the end: "
    "the cycle schedule's first three phases) for `docs/RESULTS.md`",
    "fmnist-encoder-w": "Trained in W only (no offsets: one code for every layer) for `docs/RESULTS.md`",
}


def ship_encoder(
    run: Path,
    generator: Path,
    name: str = "fmnist-encoder",
    compare: int = REFINE_COMPARE_IMAGES,
    optimizer: bool = True,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Copy the run's encoder into the package with its card; ``optimizer``: its Ranger state beside it (the Cycle
    encoder's, for the refinement); ``dtype``: the stored weights' type (bf16 halves the file; the card then gives
    the reconstruction with the run's fp32 weights beside the shipped ones')."""
    from cycle_encoding.checkpoints.encoder import load_encoder
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.checkpoints.native import read_native, save_native

    src = run / "encoder.safetensors"
    dst = MODELS_DIR / f"{name}.safetensors"
    G = load_generator(generator)
    pv = read_native_header(src)["provenance"]
    if pv.get("generator_sha256") and pv["generator_sha256"] != file_sha256(generator):
        raise SystemExit(f"{src} was trained on another generator ({pv.get('generator')}), not {generator}")
    if dtype == torch.float32:
        shutil.copyfile(src, dst)
    else:
        nf = read_native(src)
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in nf.tensors.items()}
        save_native(dst, nf.kind, nf.config, tensors, {**nf.provenance, "stored_dtype": str(dtype)}, nf.extra)
    E = load_encoder(dst)
    cfg = json.loads((run / "config.json").read_text())
    log = run_log(run)
    start = next(r for r in log if r["kind"] == "start")
    end = [r for r in log if r["kind"] == "end"][-1]
    trains = [r for r in log if r["kind"] == "train"]
    vals = [r for r in log if r["kind"] == "val"]
    wall = running_seconds(log)
    m = encoder_metrics(E, G)
    m_run = encoder_metrics(load_encoder(src), G) if dtype != torch.float32 else None
    optimizer_section: list[str] = []
    if optimizer:
        opt_file, cmp = ship_optimizer_state(run, E, G, name, compare)
        optimizer_section = [
            "## Optimizer state (for the refinement)",
            "",
            f"`{opt_file.name}` ({opt_file.stat().st_size:,} bytes, sha256 `{file_sha256(opt_file)}`) is the training "
            "run's Ranger state at its last step (moments, step counts, Lookahead's slow weights as their offset from the "
            "weights), stored in bf16. `invert --stages encoder,refine,...` restores it for every target, as the authors' "
            "refinement restores theirs (`--refine-optimizer fresh|substitute` to do otherwise). Stored in bf16 rather "
            f"than fp32 it changes the refinement's result on the first {cmp['images']} test images by at most "
            f"{cmp['max_pivot_diff']:.2e} in any pivot entry (mean {cmp['mean_pivot_diff']:.2e}); reconstruction MSE "
            f"after refinement {cmp['fp32']:.5f} (fp32 state) vs {cmp['bf16']:.5f} (bf16 state).",
            "",
        ]
    command = cfg["_resolved"]["command"]
    for trained_on in (str(cfg["generator"]), str(generator)):  # the file the run was given is the shipped one
        command = command.replace(trained_on, "fmnist-generator")
    command = command.replace(str(Path.home() / ".cache/cycle-encoding/runs"), "runs").replace(str(ROOT) + "/", "")
    command = command.replace(".venv/bin/cycle-encoding", "cycle-encoding")
    out_dir = command.split("--out ", 1)[1].split(" ", 1)[0] if "--out " in command else "OUT"
    for r in setting_resumes(log):  # their commands follow (e.g. trained on past a plateau stop)
        command += f"\ncycle-encoding train-encoder --resume {out_dir}/{run.name} {resume_flags(r)}"
    n_params = sum(p.numel() for p in E.parameters())
    lines = [
        f"# {name}",
        "",
        f"An e4e-style encoder ({SHIPPED_MODELS.get(name, name)}) in the project's format (safetensors, kind "
        "`encoder`; nothing in the file runs): a scaled-down IR-SE body (widths "
        f"{list(E.config.widths)}, units {list(E.config.units)}) with "
        + (f"{E.config.num_ws - 1} offset heads" if E.config.max_stage else "no offset heads (W only)")
        + ", input "
        f"{E.config.input_size}x{E.config.input_size}, 1 channel. {TRAINING_WORDS.get(name, 'Trained')} "
        f"(`{pv.get('schedule')}`{schedule_note(run, log)}), it ends in stage "
        f'{E.trained_stage}. Load it with `cycle_encoding.checkpoints.encoder.load_encoder("{name}")` or give '
        f"`--encoder {name}` to any command.",
        "",
        "## Reproduce",
        "",
        "```",
        command,
        "```",
        "",
        "(`fmnist-generator` is the shipped generator, byte for byte the file the run was given: the card's sha256 "
        "check below. Paths of schedule files are relative to the repository.)",
        "",
        "## Facts",
        "",
        f"- file: `{dst.name}`, {dst.stat().st_size:,} bytes"
        + ("" if dtype == torch.float32 else f" (weights stored in {str(dtype).split('.')[-1]}, loaded as float32)"),
        f"- sha256: `{file_sha256(dst)}`",
        f"- parameters: {n_params:,}",
        f"- generator: `fmnist-generator` (sha256 `{pv.get('generator_sha256')}`)",
        f"- data: {pv.get('data')} training split ({start.get('train_images'):,} images; {start.get('val_images')} "
        "held out for validation)",
        f"- training: {end['step']} steps of batch {cfg['batch_size']}, Ranger lr {cfg['lr']}, losses L2 "
        f"{cfg['l2_lambda']}, perceptual {cfg['perceptual_lambda']} ({start['networks']['perceptual']}), identity-like "
        f"{cfg['identity_lambda']} ({start['networks']['identity']}), offset and latent-adversarial terms by the "
        "schedule; seed " + str(cfg["seed"]),
        f"- training choices: generator noise {cfg.get('noise_mode', 'const')}, zero_grad "
        f"{cfg.get('zero_grad', 'none')} ({'PyTorch 1.6: switched-off heads keep moving' if cfg.get('zero_grad') == 'zero' else 'set to None'}), "
        f"latent discriminator fed {cfg.get('d_fake_codes', 'absolute')} codes, precision "
        f"{cfg.get('precision', 'fp32')}{' with torch.compile' if cfg.get('compile') else ''}",
        f"- wall time: {wall:.0f} s ({trains[-1]['sec_per_step']:.2f} s/step at the end; other jobs shared the 2 "
        "cores) on "
        f"{this_machine()}",
        f"- written by: {pv.get('tool')} at {pv.get('created')}",
        "",
        "## Metrics",
        "",
        f"Reconstruction of the first {RECON_IMAGES:,} Fashion-MNIST test images (encoder only, fmnist-generator):",
        "",
        "| offsets | MSE | SSIM | perceptual (fmnist-features) |",
        "|---|---|---|---|",
        *[
            f"| {k} ({'stage ' + str(E.trained_stage) if k == 'trained' else 'stage ' + str(E.max_stage)}) | "
            f"{v['mse']:.4f} | {v['ssim']:.3f} | {v['perceptual']:.4f} |"
            for k, v in m.items()
        ],
        *(
            [
                "",
                f"The same with the run's float32 weights: {m_run['trained']['mse']:.4f} / {m_run['all']['mse']:.4f} "
                "MSE (trained / all offsets), "
                f"{m_run['trained']['perceptual']:.4f} / {m_run['all']['perceptual']:.4f} perceptual.",
            ]
            if m_run
            else []
        ),
        "",
        f"Last validation during training (step {vals[-1]['step'] if vals else 'n/a'}): "
        + (
            ", ".join(f"{k} {vals[-1][k]:.4f}" for k in ("l2", "perceptual", "identity") if k in vals[-1])
            if vals
            else "n/a"
        ),
        "",
        *optimizer_section,
        "Made by `python scripts/ship_models.py`.",
        "",
    ]
    (MODELS_DIR / f"{name}-card.md").write_text("\n".join(lines), encoding="utf-8")
    return dst


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--generator-run", type=Path, default=None)
    p.add_argument("--encoder-run", type=Path, default=None, help="the Cycle encoder's run (fmnist-encoder)")
    p.add_argument("--w-run", type=Path, default=None, help="the W encoder's run (fmnist-encoder-w)")
    p.add_argument("--e4e-run", type=Path, default=None, help="the e4e encoder's run (fmnist-encoder-e4e, bf16)")
    p.add_argument(
        "--compare-images",
        type=int,
        default=REFINE_COMPARE_IMAGES,
        help="test images refined with the fp32 and the bf16 optimizer state for the card (default 16)",
    )
    p.add_argument("--grid", type=Path, default=ROOT / "docs" / "images" / "fmnist-generator-samples.png")
    a = p.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    if a.generator_run:
        print(ship_generator(a.generator_run, a.grid))
    if a.encoder_run:
        print(ship_encoder(a.encoder_run, MODELS_DIR / "fmnist-generator.safetensors", compare=a.compare_images))
    for run, name, dtype in (
        (a.w_run, "fmnist-encoder-w", torch.float32),
        (a.e4e_run, "fmnist-encoder-e4e", torch.bfloat16),
    ):
        if run:  # the baselines: no optimizer state (the refinement fine-tunes the Cycle encoder only)
            print(ship_encoder(run, MODELS_DIR / "fmnist-generator.safetensors", name, optimizer=False, dtype=dtype))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
