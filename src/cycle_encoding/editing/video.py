"""Video editing on the inversion pipeline, as STIT (Tzaban et al. 2022) does it on e4e + PTI: crop, invert, tune, edit
each frame, paste back, write the videos. Design notes: docs/INTERNALS.md, "cycle_encoding.editing.video"."""

from __future__ import annotations

import datetime as _dt
import json
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.latents import save_latents
from ..checkpoints.native import file_sha256
from ..checkpoints.run_folder import InversionRun
from ..data.align import LandmarkDetector
from ..data.video import (
    VideoClip,
    VideoWriter,
    crop_frame,
    face_quads,
    parse_crop,
    paste_back,
    read_video,
    rect_quad,
    side_by_side,
    smooth_quads,
    smooth_track,
)
from ..errors import CycleEncodingError
from ..inversion.config import TUNE_MODES
from ..inversion.inverter import Inverter
from ..progress import Progress
from ..utils import atomic_write, format_int_list, to_uint8, write_json
from .directions import DirectionSet, parse_strengths
from .render import named_directions, plan_edit, render_one

ALIGN_MODES = ("face", "frame")
ALIGN_FORMAT = "cycle-encoding-video-align"


def edit_label(a: float) -> str:
    return f"{a:g}"


def _frame_quads(
    clip: VideoClip, how: str, crop: Any, sigma: float, detector: Any, progress: Any
) -> list[np.ndarray | None]:
    """Each frame's quad: the whole frame, the ``crop`` rectangle, or its largest face's FFHQ square smoothed."""
    w, h = clip.size
    if crop is not None:
        return [rect_quad(*parse_crop(crop, w, h))] * len(clip.frames)
    if how == "frame":
        return [rect_quad(0, 0, w, h)] * len(clip.frames)
    detector = detector if detector is not None else LandmarkDetector()
    bar = Progress(len(clip.frames), "align: faces", "frame", progress, heartbeat=10.0)
    try:
        quads = face_quads(clip.frames, detector, lambda i, found: bar.update(1))
    finally:
        bar.close()
    return smooth_quads(quads, sigma)


def prepare_frames(
    clip: VideoClip,
    out: Path,
    size: int,
    channels: int,
    how: str = "face",
    crop: Any = None,
    sigma: float = 2.0,
    detector: Any = None,
    progress: Any = "none",
) -> tuple[list[np.ndarray | None], list[str | None], bool]:
    """Crop every frame into ``out/frames`` (see the design notes) and record the quads in ``out/align.json``: per
    frame its quad and file name (None: no face), and whether an earlier alignment of the same input and options
    was reused (then only missing crops are written). Crops of frames no longer cropped are removed."""
    key = {"input_sha256": file_sha256(clip.source) if clip.source else None, "frames": len(clip.frames),
           "size": size, "channels": channels, "align": how, "crop": None if crop is None else str(crop),
           "smooth_align": float(sigma)}  # fmt: skip
    doc_path = out / "align.json"
    try:
        old: dict[str, Any] = json.loads(doc_path.read_text()) if doc_path.is_file() else {}
    except (OSError, ValueError):
        old = {}
    reuse = bool(old) and {k: old.get(k) for k in key} == key
    if reuse:
        quads = [None if q is None else np.array(q, dtype=np.float64) for q in old["quads"]]
    else:
        quads = _frame_quads(clip, how, crop, sigma, detector, progress)
    names = [f"frame_{i:06d}" if q is not None else None for i, q in enumerate(quads)]
    folder = out / "frames"
    folder.mkdir(parents=True, exist_ok=True)
    keep = {f"{n}.png" for n in names if n}
    for stale in folder.iterdir():
        if stale.name not in keep and (stale.suffix == ".png" or stale.name.endswith(".tmp")):
            stale.unlink()
    for frame, q, n in zip(clip.frames, quads, names):
        dst = folder / f"{n}.png"
        if q is None or (reuse and dst.is_file()):
            continue
        im = crop_frame(frame, q, size, ffhq=how == "face" and crop is None, channels=channels)
        atomic_write(dst, lambda t, im=im: im.save(t, format="PNG"))
    doc = {"format": ALIGN_FORMAT, "version": 1, "input": clip.source, "fps": str(clip.fps),
           "frame_size": list(clip.size), **key, "quads": [None if q is None else q.tolist() for q in quads]}  # fmt: skip
    atomic_write(doc_path, lambda t: t.write_text(json.dumps(doc) + "\n"))
    return quads, names, reuse


def frame_pivots(run: InversionRun, names: Sequence[str | None], sigma: float = 0.0) -> dict[str, torch.Tensor]:
    """The pivot each finished frame's edits move (``run``'s images by name), smoothed over time by a Gaussian of
    ``sigma`` frames (frames without a pivot are left out of their neighbours' means)."""
    finished = set(run.image_names())
    have = [n is not None and n in finished for n in names]
    if not any(have):
        return {}
    piv = {n: run.image(n).pivot[0] for n, ok in zip(names, have) if ok and n is not None}
    shape = next(iter(piv.values())).shape
    stack = np.stack([piv[n].numpy() if ok and n is not None else np.zeros(shape) for n, ok in zip(names, have)])
    sm = smooth_track(stack, sigma, have)
    return {n: torch.from_numpy(sm[i]).float() for i, n in enumerate(names) if have[i] and n is not None}


def render_video_edits(
    clip: VideoClip,
    quads: Sequence[np.ndarray | None],
    names: Sequence[str | None],
    pivots: Mapping[str, torch.Tensor],
    run: InversionRun,
    base: Any,
    request: Any,
    out: Path,
    feather: float = 0.1,
    crf: int = 18,
    progress: Any = "none",
) -> dict[str, str]:
    """Render the edit at every strength for every frame with a pivot (with its own generator from ``run``), paste it
    back, and write ``edit_<strength>.mp4`` and ``preview.mp4``; frames without a pivot pass through unedited.
    Returns the files by strength label (and ``preview``)."""
    ds: DirectionSet = request.directions
    comp = ds.index(request.component)
    layers = ds.resolve_layers(request.layers, base.num_ws)
    strengths = parse_strengths(list(request.strengths))
    files = {edit_label(a): out / f"edit_{edit_label(a)}.mp4" for a in strengths}
    writers = [VideoWriter(f, clip.fps, crf) for f in files.values()]
    preview = VideoWriter(out / "preview.mp4", clip.fps, crf)
    bar = Progress(len(clip.frames), "render", "frame", progress, heartbeat=10.0)
    try:
        for frame, q, n in zip(clip.frames, quads, names):
            edited = [frame] * len(strengths)
            if q is not None and n is not None and n in pivots:
                G, _ = run.generator_for(run.image(n), base)
                pivot = pivots[n][None].to(base.w_avg.device)
                edited = []
                for a in strengths:
                    y = render_one(G, ds.apply(pivot, comp, a, layers, request.mode))
                    edited.append(paste_back(frame, to_uint8(y)[0], q, feather))
            for w, e in zip(writers, edited):
                w.write(e)
            preview.write(side_by_side([frame, *edited]))
            bar.update(1)
        paths = {k: str(w.close()) for k, w in zip(files, writers)}
        paths["preview"] = str(preview.close())
    except BaseException:
        for w in [*writers, preview]:
            w.abort()
        raise
    finally:
        bar.close()
    return paths


def edit_video(
    video: str | Path,
    out: str | Path,
    direction: str | Path | DirectionSet,
    generator: Any,
    encoder: Any = None,
    *,
    strengths: Sequence[float] | None = None,
    component: int | str = 0,
    layers: Sequence[int] | None = None,
    mode: str | None = None,
    config: Any = None,
    tune: str = "each",
    align: str = "face",
    crop: str | Sequence[int] | None = None,
    smooth_align: float = 2.0,
    smooth_pivots: float = 0.0,
    feather: float = 0.1,
    crf: int = 18,
    max_frames: int | None = None,
    device: str | torch.device = "auto",
    progress: str | bool = "auto",
    detector: Any = None,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Edit a video (see the design notes): returns what ``out/video.json`` holds.

    ``direction``: a direction file, a name computed from the generator (``sefa``, ``ganspace``) or a DirectionSet;
    ``component``, ``strengths``, ``layers``, ``mode`` as ``edit`` takes them. ``config``: the inversion's options
    (an InversionConfig or mapping, as ``Inverter``; e.g. ``{"stages": ["encoder", "tune"], "tune": {"steps": 50}}``).
    ``tune``: ``each`` (every frame tuned alone) or ``shared`` (one generator tuned on all the frames). ``align``: ``face`` (the FFHQ
    square of each frame's largest face, ``smooth_align`` frames of Gaussian smoothing; frames without a face pass
    through) or ``frame`` (the whole frame); ``crop`` ``"x,y,w,h"``: that rectangle of every frame instead.
    ``smooth_pivots``: sigma in frames of the pivots' smoothing (0: none). ``feather``: the paste-back mask's soft
    edge, a fraction of the crop's side. ``crf``: the H.264 quality of the written videos. ``detector``: a face
    detector to use instead of dlib's (``data.align.LandmarkDetector``'s interface)."""
    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    out, times = Path(out), {}
    t = time.perf_counter()
    clip = read_video(video, max_frames)
    inv, request = _set_up(clip, direction, generator, encoder, config, tune, align, crop, device, progress,
                           dict(strengths=strengths, component=component, layers=layers, mode=mode))  # fmt: skip
    base = inv.G
    times["read"] = time.perf_counter() - t
    say(f"read: {len(clip.frames)} frames of {clip.size[0]}x{clip.size[1]} at {float(clip.fps):.3f} fps")

    t = time.perf_counter()
    quads, names, reused = prepare_frames(clip, out, base.resolution, base.img_channels, align, crop, smooth_align,
                                          detector, progress)  # fmt: skip
    no_face = [i for i, q in enumerate(quads) if q is None]
    times["align"] = time.perf_counter() - t
    say(f"align: {len(clip.frames) - len(no_face)} frame(s) cropped into {out / 'frames'}"
        + (" (as before)" if reused else "") + (f"; no face in {len(no_face)}: {format_int_list(no_face, ', ')}" if no_face else ""))  # fmt: skip

    t = time.perf_counter()
    summary: dict[str, Any] = {"failed": []}
    if len(no_face) < len(clip.frames):
        summary = inv.run(out / "frames", out / "run", log=say)  # resumable; tuned as ``tune`` says
    times["invert"] = time.perf_counter() - t
    say(f"invert: {summary.get('finished', 0)} frame(s) inverted into {out / 'run'}, {len(summary['failed'])} failed")

    t = time.perf_counter()
    run = InversionRun(out / "run") if (out / "run" / "config.json").is_file() else None
    pivots = frame_pivots(run, names, smooth_pivots) if run is not None else {}
    if pivots:
        kept = [n for n in names if n in pivots]
        save_latents(out, torch.stack([pivots[n] for n in kept]), kept, stem="pivots")
    files = render_video_edits(clip, quads, names, pivots, run, base, request, out, feather, crf, progress)  # type: ignore[arg-type]
    times["render"] = time.perf_counter() - t
    say(f"render: {len(files) - 1} video(s) and a preview in {out}")
    ds = request.directions
    doc = {
        "format": "cycle-encoding-video", "version": 1, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "argv": list(sys.argv), "input": clip.source, "fps": str(clip.fps), "frames": len(clip.frames),
        "frame_size": list(clip.size),
        "options": {"tune": tune if "tune" in inv.config.stages else None, "stages": list(inv.config.stages),
                    "align": "crop" if crop is not None else align, "crop": None if crop is None else str(crop),
                    "smooth_align": smooth_align, "smooth_pivots": smooth_pivots, "feather": feather, "crf": crf},
        "direction": {"source": ds.source, "method": ds.method, "component": ds.index(request.component),
                      "mode": request.mode, "layers": request.layers},
        "strengths": [float(a) for a in request.strengths], "edited_frames": len(pivots), "no_face": no_face,
        "failed": [{"frame": int(f["name"].split("_")[-1]), **f} for f in summary.get("failed", [])],
        "unedited": [i for i, m in enumerate(names) if m is None or m not in pivots],
        "files": {"edits": {k: Path(v).name for k, v in files.items() if k != "preview"}, "frames": "frames",
                  "preview": Path(files["preview"]).name, "run": "run", "pivots": "pivots.pt" if pivots else None},
        "seconds": times, "seconds_per_frame": {k: v / len(clip.frames) for k, v in times.items()},
    }  # fmt: skip
    write_json(out / "video.json", doc)
    return doc


def _set_up(
    clip: VideoClip,
    direction: Any,
    generator: Any,
    encoder: Any,
    config: Any,
    tune: str,
    align: str,
    crop: Any,
    device: Any,
    progress: Any,
    edit: dict[str, Any],
) -> tuple[Any, Any]:
    """Everything checked before any work: the modes, the crop, the networks (an Inverter) and the edit request."""
    for option, value, choices in (("tune", tune, TUNE_MODES), ("align", align, ALIGN_MODES)):
        if value not in choices:
            raise CycleEncodingError(f"{option} must be one of {', '.join(choices)}, not {value!r}")
    if crop is not None:
        parse_crop(crop, *clip.size)
    inv = Inverter(generator, encoder, config, device=device, progress=progress, tune_mode=tune)
    ds = direction if isinstance(direction, DirectionSet) else named_directions(str(direction), inv.G)
    strengths = parse_strengths(edit["strengths"]) if edit["strengths"] else None
    request = plan_edit(ds, edit["component"], strengths, edit["layers"], edit["mode"])
    ds.check_fits(inv.G, request.layers)
    return inv, request
