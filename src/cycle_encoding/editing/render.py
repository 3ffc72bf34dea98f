"""Edits of an inversion run: render each edit of each inverted image with that image's generator, into
``RUN_DIR/edits/TAG/``. Design notes: docs/INTERNALS.md, "cycle_encoding.editing.render"."""

from __future__ import annotations

import datetime as _dt
import glob
import json
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoints.encoder import load_encoder
from ..checkpoints.run_folder import EDITS, InversionRun, RunImage, inside, lock, remove_temporaries, tensor_sha256
from ..data.images import read_image
from ..errors import CycleEncodingError
from ..grid import cell_size, save_png, strip_image
from ..inversion.pivot import encoder_pivot
from ..networks.stylegan2 import Generator
from ..progress import Progress
from ..utils import atomic_write, resolve_device, save_image, to_pil, to_uint8, write_json
from .directions import DirectionSet, GanspaceMode, load_directions, named_edit_for, parse_strengths
from .ganspace import ganspace_pca
from .measures import Preservation, attribute_changes, direction_lec, lec_summary, preservation_summary, success_summary
from .sefa import sefa_directions

RECON_TOLERANCE_LEVELS = 1  # of 255: how far a rendering with another CPU thread count may be from the saved one
DEFAULT_STRENGTHS = (-3.0, -1.5, 0.0, 1.5, 3.0)
GANSPACE_SAMPLES = 50_000  # mapping outputs of the GANSpace directions computed from a generator


@dataclass
class EditRequest:
    """What to render: a direction (set and component), strengths, layers (None: the set's default), mode."""

    directions: DirectionSet
    component: int | str = 0
    strengths: Sequence[float] = DEFAULT_STRENGTHS
    layers: Sequence[int] | None = None
    mode: GanspaceMode = "add"
    tag: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def name(self) -> str:
        if self.tag:
            return _safe(self.tag)
        base = Path(self.directions.source).stem if self.directions.source else self.directions.method
        if len(self.directions) > 1 or self.directions.method in ("ganspace", "sefa"):
            base += f"_c{self.directions.index(self.component)}"
        if self.layers is not None:
            lay = sorted(set(self.layers))
            contiguous = lay == list(range(lay[0], lay[-1] + 1))
            base += f"_l{lay[0]}-{lay[-1]}" if contiguous else "_l" + "-".join(map(str, lay))
        if self.mode == "set":
            base += "_set"
        return _safe(base)


def plan_edit(
    ds: DirectionSet,
    component: int | str = 0,
    strengths: Sequence[float] | None = None,
    layers: Sequence[int] | None = None,
    mode: GanspaceMode | None = None,
    tag: str | None = None,
) -> EditRequest:
    """The request for an edit as a user names it. A named GANSpace edit (``eye_openness``, ... with e4e's
    ``ffhq_pca.pt``) gives its component, its layers, ``set`` mode and its published strength, each unless given;
    otherwise the defaults are: all layers (the set's own for SeFa), ``add`` mode, strengths -3,-1.5,0,1.5,3."""
    named = named_edit_for(ds, component)
    if named is None:
        return EditRequest(ds, component, tuple(strengths) if strengths else DEFAULT_STRENGTHS, layers,
                           mode or "add", tag)  # fmt: skip
    return EditRequest(
        ds, named.component, tuple(strengths) if strengths else (named.strength,),
        layers if layers is not None else named.layers, mode or "set", tag or named.name,
        extra={"named_edit": {"name": named.name, "e4e_tuple": list(named.as_tuple()),
                              "table": "cycle_encoding/assets/ganspace_ffhq_edits.csv"}},
    )  # fmt: skip


def _safe(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", s).strip("._") or "edit"


def generator_directions(G: Generator, method: str, components: int) -> DirectionSet:
    """``G``'s top ``components`` directions by ``method``: ``sefa`` (SeFa over all conv layers) or ``ganspace`` (PCA
    of GANSPACE_SAMPLES mapping outputs, seed 0)."""
    if method == "sefa":
        ds = sefa_directions(G, components=components)
    else:
        ds = ganspace_pca(G, n_samples=GANSPACE_SAMPLES, components=components)
    ds.source = method
    return ds


def named_directions(spec: str, G: Generator) -> DirectionSet:
    """A direction file, or a name computed from the generator: ``sefa`` or ``ganspace`` (``generator_directions``;
    the first 16 directions of each)."""
    if spec in ("sefa", "ganspace"):
        return generator_directions(G, spec, min(16, G.w_dim))
    p = Path(spec)
    if not p.exists():
        raise CycleEncodingError(f"{spec}: no such direction file (or a name: sefa, ganspace)")
    return load_directions(p)


def remove_previous_edit(folder: Path) -> None:
    """Remove the files an earlier edit listed in ``folder/edit.json`` (only those), so a re-run leaves no stale
    images (e.g. of strengths no longer asked for)."""
    doc_path = folder / "edit.json"
    if not doc_path.is_file():
        return
    try:
        doc = json.loads(doc_path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    root = folder.resolve()
    for rec in doc.get("images", []):
        for rel in filter(None, [*rec.get("files", []), rec.get("strip"), rec.get("gif")]):
            p = (folder / rel).resolve()
            if root in p.parents and p.suffix in (".png", ".gif"):
                p.unlink(missing_ok=True)
    doc_path.unlink(missing_ok=True)


@torch.no_grad()
def render_one(G: Generator, ws: torch.Tensor) -> torch.Tensor:
    """G's image of codes ``ws [1, N, w_dim]`` with its constant noise (as the run's reconstructions)."""
    return G.synthesis(ws.to(G.w_avg.device), noise_mode="const").cpu()


def _run_threads(im: RunImage) -> int | None:
    t = im.result.get("threads")
    return int(t) if isinstance(t, int) else None


def matches_reconstruction(im: RunImage, y: torch.Tensor, device: torch.device) -> tuple[bool | None, str]:
    """Whether the rendering ``y [1, C, H, W]`` of the image's pivot is the run's reconstruction (None: nothing to
    compare with), and how that was decided: bit for bit, or within RECON_TOLERANCE_LEVELS (the design notes)."""
    want = im.recon_sha256
    if want is not None and tensor_sha256(y) == want:
        return True, "bit for bit"
    same_setup = im.result.get("device") == str(device) and (
        device.type != "cpu" or _run_threads(im) == torch.get_num_threads()
    )
    if want is not None and same_setup:
        return False, "bit for bit"
    ref = im.checked(im.recon_path(im.recon_stage))
    how = (
        f"within {RECON_TOLERANCE_LEVELS} of 255 levels of {im.recon_path(im.recon_stage).name} (inverted with "
        f"{_run_threads(im) or 'an unrecorded number of'} CPU thread(s) on {im.result.get('device', '?')}, rendered "
        f"now with {torch.get_num_threads()} on {device})"
    )
    if ref is None:
        return (False if want is not None else None), "bit for bit"
    saved = to_uint8(read_image(ref, channels=y.shape[1])[None])
    got = to_uint8(y.clamp(-1, 1))
    if saved.shape != got.shape:
        return False, how
    diff = int(np.abs(saved.astype(np.int16) - got.astype(np.int16)).max())
    return diff <= RECON_TOLERANCE_LEVELS, how


def save_sweep_gif(rendered: Sequence[torch.Tensor], strengths: Sequence[float], path: Path) -> Path:
    """The edits of one image as a looping GIF (Pillow, 250 ms a frame): lowest strength to highest and back, each
    frame enlarged by a whole factor (nearest neighbour) to at least 128 pixels, or reduced to at most 256 (a GIF to
    share, not the full images: those are the PNGs beside it)."""
    order = sorted(range(len(strengths)), key=lambda j: strengths[j])
    order = order + order[-2:0:-1]  # ping-pong without repeating the ends
    frames = []
    for j in order:
        im = to_pil(rendered[j][0].clamp(-1, 1)).convert("RGB")
        side = max(im.size)
        cell = cell_size(side, 128, 256)
        if cell > side:
            im = im.resize((im.width * cell // side, im.height * cell // side), Image.Resampling.NEAREST)
        elif cell < side:
            im.thumbnail((cell, cell), Image.Resampling.LANCZOS)
        frames.append(im)
    return atomic_write(path, lambda t: frames[0].save(t, format="GIF", save_all=True, append_images=frames[1:],
                                                        duration=250, loop=0))  # fmt: skip


def render_run_edits(
    run: InversionRun | str | Path,
    request: EditRequest,
    generator: Generator | str | Path | None = None,
    device: str | torch.device = "cpu",
    encoder: Any = None,
    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None,
    scorer_name: str | None = None,
    preservation: Preservation | None = None,
    allow_base: bool = False,
    out_dir: str | Path | None = None,
    log: Callable[[str], None] | None = None,
    images: Sequence[str] | None = None,
    progress: str | bool | None = None,
    members: Callable[[torch.Tensor], torch.Tensor] | None = None,
    members_info: dict[str, Any] | None = None,
    gif: bool = True,
) -> dict[str, Any]:
    """Render ``request`` for every finished image of ``run`` and return what ``edit.json`` holds (failures and the
    swap-in: the design notes). ``encoder`` (an Encoder4Editing or a file; ``"run"`` for the run's own) turns on LEC;
    ``scorer`` (a function images -> [B]) edit success; ``preservation`` the distance to the reconstruction.
    ``members`` (images -> [B], NaN for an image to leave out) picks the images the summaries are over, described
    by ``members_info`` (e.g. the classes). ``log`` receives one line per image (default: stderr); ``progress``
    (auto, bar, lines, none; default none) a bar over the images; ``gif`` writes each image's sweep as a GIF."""
    run = run if isinstance(run, InversionRun) else InversionRun(run)
    strengths = parse_strengths(list(request.strengths))
    names = run.find_images(images)
    if not names:
        raise CycleEncodingError(f"{run.dir}: no finished images to edit")
    dev = resolve_device(device)
    base = run.load_generator(generator, dev)
    ds = request.directions
    layers = ds.check_fits(base, request.layers, "the run's generator's")
    job = _Job(run, request, ds.index(request.component), strengths, layers, base, dev, allow_base, gif, scorer=scorer,
               scorer_name=scorer_name, preservation=preservation, members=members, members_info=members_info,
               offsets=(run.config.get("options") or {}).get("offsets", "all"))  # fmt: skip
    if encoder is not None:
        if isinstance(encoder, str) and encoder == "run":
            f = run.encoder_file()
            if f is None or not f.is_file():
                raise CycleEncodingError(f"{run.dir}: the run's encoder file is not there: give the encoder file")
            encoder = f
        if isinstance(encoder, (str, Path)):
            job.encoder_name, job.E = str(encoder), load_encoder(encoder, dev)
        else:
            job.encoder_name, job.E = getattr(encoder, "name", None) or type(encoder).__name__, encoder.to(dev).eval()
        if (job.E.config.num_ws, job.E.config.w_dim) != (base.num_ws, base.w_dim):
            raise CycleEncodingError("the encoder's codes do not fit the run's generator")

    out = Path(out_dir) if out_dir is not None else run.dir / EDITS / request.name()
    if out_dir is None and not inside(out, run.dir):
        raise CycleEncodingError(f"{out}: refused: it leads outside the run folder (a symbolic link): remove it")
    out.parent.mkdir(parents=True, exist_ok=True)
    # what a killed edit left (in RUN/edits every edit's; elsewhere this edit's only)
    remove_temporaries(out.parent, ".*.tmp" if out_dir is None else f".{glob.escape(out.name)}.*.tmp")
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    bar = Progress(len(names), f"edit {out.name}", "img", progress if progress is not None else "none")
    say = log if log is not None else bar.say  # bar.say: stderr, above the bar when one is drawn
    try:
        with lock(stage):  # held while rendering: no other edit takes the folder for a killed one's
            t0 = time.perf_counter()
            per_image, failed = _render_into(stage, job, names, say, bar)
            if not per_image:
                raise CycleEncodingError(
                    f"no image could be edited ({failed[0]['name']}: {failed[0]['reason']})"
                    + (f"; the earlier edit in {out} is kept" if (out / "edit.json").is_file() else "")
                )
            doc = _edit_doc(job, per_image, failed, time.perf_counter() - t0)
            _swap_in(stage, out, doc)
    finally:
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)
    return doc


@dataclass
class _Job:
    """What every image of one edit shares (checked by ``render_run_edits`` before anything is written)."""

    run: InversionRun
    request: EditRequest
    comp: int
    strengths: list[float]
    layers: list[int]
    base: Generator
    dev: torch.device
    allow_base: bool = False
    gif: bool = True
    E: Any = None  # the encoder for LEC
    encoder_name: str | None = None
    offsets: str = "all"
    scorer: Callable[[torch.Tensor], torch.Tensor] | None = None
    scorer_name: str | None = None
    preservation: Preservation | None = None
    members: Callable[[torch.Tensor], torch.Tensor] | None = None
    members_info: dict[str, Any] | None = None


def _swap_in(stage: Path, out: Path, doc: dict[str, Any]) -> None:
    """Replace the edit in ``out`` by the one rendered into ``stage``: the files the earlier ``edit.json`` listed go,
    the new files move in, ``edit.json`` last."""
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_edit(out)
    for rec in doc["images"]:
        for rel in filter(None, [*rec["files"], rec["strip"], rec.get("gif")]):
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dst)
    write_json(out / "edit.json", doc)


def _render_into(
    out: Path, job: _Job, names: list[str], say: Callable[[str], None], bar: Progress
) -> tuple[list[dict[str, Any]], list[dict[str, str]]]:
    """Each image's edits rendered into ``out``: (the records of the images edited, the failed ones with reasons)."""
    per_image: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    for i, name in enumerate(names):
        head = f"[{i + 1}/{len(names)}] {name}"
        try:
            im = job.run.image(name)
            head = f"[{i + 1}/{len(names)}] {im.label}"
            rec = _render_image(job, im, out)
        except CycleEncodingError as e:  # one image that cannot be edited does not stop the others
            failed.append({"name": name, "reason": str(e)})
            say(f"{head}: FAILED: {e}")
            continue
        per_image.append(rec)
        say(f"{head}: {len(job.strengths)} edits with the {rec['generator']} generator"
            + (f", LEC {' '.join(f'{v:.3f}' for v in rec['lec'])}" if "lec" in rec else ""))  # fmt: skip
        bar.update(1)
    return per_image, failed


def _render_image(job: _Job, im: RunImage, out: Path) -> dict[str, Any]:
    """One image's edits rendered into ``out`` and measured: its record of ``edit.json``."""
    t0 = time.perf_counter()
    G, which = job.run.generator_for(im, job.base, job.allow_base)
    target = im.checked(im.target_path, image=True)
    t_gen = time.perf_counter() - t0
    ds, mode = job.request.directions, job.request.mode
    pivot = im.pivot.to(job.dev)
    t0 = time.perf_counter()
    rendered = [render_one(G, ds.apply(pivot, job.comp, a, job.layers, mode)) for a in job.strengths]
    files = [f"{im.name}/{j:02d}_s{a:+.3g}.png" for j, a in enumerate(job.strengths)]
    for y, f in zip(rendered, files):
        save_image(y[0], out / f)
    # recon_sha256: which inversion of the image was edited (``report`` leaves out edits of an earlier one)
    rec: dict[str, Any] = {"name": im.name, "generator": which, "pivot_stage": im.pivot_stage, "files": files,
                           "seconds": {"generator": t_gen, "render": time.perf_counter() - t0},
                           "recon_sha256": im.recon_sha256}  # fmt: skip
    recon = render_one(G, pivot)
    ok, how = matches_reconstruction(im, recon, job.dev)
    if ok is not None:
        rec["reconstruction_hash_matches"] = im.recon_sha256 is not None and tensor_sha256(recon) == im.recon_sha256
        rec["reconstruction_check"] = how
        zero = [j for j, a in enumerate(job.strengths) if a == 0 and mode == "add"]
        if zero:
            rec["strength0_is_reconstruction"] = matches_reconstruction(im, rendered[zero[0]], job.dev)[0]
    rec["strip"] = f"{im.name}_strip.png"
    save_png(strip_image(target, rendered, job.strengths), out / rec["strip"])
    if job.gif:
        rec["gif"] = str(save_sweep_gif(rendered, job.strengths, out / f"{im.name}_sweep.gif").relative_to(out))
    t0 = time.perf_counter()
    _measure(job, rec, G, pivot, recon, rendered)
    rec["seconds"]["measures"] = time.perf_counter() - t0
    return rec


def _measure(
    job: _Job, rec: dict[str, Any], G: Generator, pivot: torch.Tensor, recon: torch.Tensor, rendered: list[torch.Tensor]
) -> None:
    """The measures asked for, into ``rec``. The classifier and the preservation measure see the images as saved
    (clamped to [-1, 1]); LEC re-encodes the raw rendering."""
    dev, ds = job.dev, job.request.directions
    edited = torch.stack([r[0] for r in rendered])[None].clamp(-1, 1)  # [1, S, C, H, W]
    recon_shown = recon.clamp(-1, 1)
    if job.members is not None:
        rec["measured"] = not bool(torch.isnan(job.members(recon_shown.to(dev))).any())
    if job.E is not None:  # the pivot, its edits and G are on job.dev
        encode = partial(encoder_pivot, job.E, offsets=job.offsets)
        render = partial(G.synthesis, noise_mode="const")
        rec["lec"] = [float(direction_lec(ds, job.comp, a, pivot, encode, render, job.layers)[0])
                      if job.request.mode == "add" else float("nan") for a in job.strengths]  # fmt: skip
    if job.scorer is not None:
        rec["score_change"] = attribute_changes(job.scorer, recon_shown.to(dev), edited.to(dev))[0].cpu().tolist()
    if job.preservation is not None:
        refs = recon_shown.expand(len(job.strengths), -1, -1, -1).to(dev)
        rec["preservation"] = job.preservation(edited[0].to(dev), refs).tolist()


def _edit_doc(job: _Job, per_image: list[dict[str, Any]], failed: list[dict[str, str]], seconds: float) -> dict:
    """What ``edit.json`` holds: the edit, each image's record, and the measures' summaries over the images measured
    (all, or with ``members`` those of its classes)."""
    ds, comp, strengths = job.request.directions, job.comp, job.strengths
    measured = [r for r in per_image if r.get("measured", True)]
    doc: dict[str, Any] = {
        "format": "cycle-encoding-edits",
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "run_dir": str(job.run.dir),
        "tag": job.request.name(),
        "direction": {"source": ds.source, "method": ds.method, "component": comp,
                      "name": ds.names[comp] if ds.names else None, "space": "W+" if ds.per_layer else "W",
                      "scale": float(ds.scales[comp]) if ds.scales is not None else 1.0, **job.request.extra},
        "strengths": strengths,
        "layers": job.layers,
        "mode": job.request.mode,
        "images": per_image,
        "failed": failed,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "measures": {},
    }  # fmt: skip
    if job.members is not None:
        doc["measured_on"] = {**(job.members_info or {}), "images": [r["name"] for r in measured],
                              "left_out": [r["name"] for r in per_image if not r["measured"]]}  # fmt: skip
    ms = doc["measures"]
    if rows := [r["lec"] for r in measured if "lec" in r]:
        ms["lec"] = {"encoder": job.encoder_name, "offsets": job.offsets, **lec_summary(torch.tensor(rows), strengths)}
    if rows := [r["score_change"] for r in measured if "score_change" in r]:
        ms["edit_success"] = {"classifier": job.scorer_name or getattr(job.scorer, "name", "classifier"),
                              **success_summary(torch.tensor(rows), strengths)}  # fmt: skip
    if (rows := [r["preservation"] for r in measured if "preservation" in r]) and job.preservation is not None:
        ms["preservation"] = preservation_summary(torch.tensor(rows), strengths, job.preservation)
    return doc
