"""Edits of an inversion run: read a run folder, render each edit of each inverted image with that image's generator.

``InversionRun(run_dir)`` reads what ``cycle-encoding invert`` wrote (``inversion/run_folder.py``): ``config.json``
(options, generator and encoder files, networks, the command) and, for each finished image (``done``),
``images/NAME/``: ``pivots.safetensors`` (one ``[N, w_dim]`` code per pivot stage), ``result.json`` (metrics, the
sha256 of each reconstruction's float32 tensor, which pivot tuning started from), ``target.png``,
``recon_STAGE.png``, ``losses.jsonl``, ``timings.json`` and, when the run tuned and stored it,
``generator_delta.safetensors`` (the tuned generator as its change from the base).

``render_run_edits`` renders, for every image, the pivot edited at every strength with the image's tuned generator
(rebuilt from the base and its delta; the base generator when the run did not tune), one code at a time with the
generator's constant noise, exactly as the run rendered its reconstructions: an edit of strength 0 therefore gives
the reconstruction bit for bit, which is checked against the hash the run stored and recorded. It writes::

    RUN_DIR/edits/TAG/
        NAME/NN_sSTRENGTH.png     each edit (NN: the strength's position)
        NAME_strip.png           the input, then the edits in the order of the strengths, labelled
        NAME_sweep.gif           the edits as an animation, from the lowest strength to the highest and back
        edit.json                the direction, strengths, layers, the generator used per image, the measures asked
                                 for (LEC, edit success, preservation) per image and per strength, timings

The classifier (edit success) and the preservation measure see the images as saved, clamped to [-1, 1], the
reference being the reconstruction; LEC re-encodes the raw rendering (as e4e does). An edit is rendered into a
temporary folder and swapped in when done: the files the previous ``edit.json`` listed are removed then, so a re-run
leaves no stale images and a failed one leaves the earlier edit as it was.

Strength 0 is compared with the run's reconstruction bit for bit when rendered on the run's device with its CPU thread
count (recorded per image as ``threads``); with another thread count (the order of a CPU's sums changes with it, and
with it the last bits of the floats), within RECON_TOLERANCE_LEVELS of 255 of the saved ``recon_STAGE.png``.
``edit.json`` says which check was made (``reconstruction_check``). Every file read from the run folder must lie
inside it (no symbolic link out of it). With ``members`` (for a class edit "A vs B": the images whose
reconstruction the classifier puts in class A or B) the summaries are over those images only; every image's own
values are kept.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
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
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..checkpoints.common import atomic_write
from ..checkpoints.native import read_native
from ..errors import CheckpointError, CycleEncodingError
from ..networks.stylegan2 import Generator
from ..progress import Progress
from ..utils import save_image
from .directions import DirectionSet, GanspaceMode, load_directions, named_edit_for
from .measures import Preservation, direction_lec, lec_summary, preservation_summary, success_summary

RUN_FORMAT = "cycle-encoding-inversion-run"
PIVOT_STAGES = ("encoder", "refine", "project")
EDITS_DIR = "edits"
RECON_TOLERANCE_LEVELS = 1  # of 255: how far a rendering with another CPU thread count may be from the saved one
DEFAULT_STRENGTHS = (-3.0, -1.5, 0.0, 1.5, 3.0)


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (the run's ``recon_sha256``)."""
    v = t.detach().to("cpu").float().contiguous()
    return hashlib.sha256(v.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except OSError as e:
        raise CycleEncodingError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise CycleEncodingError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (symbolic links followed) lies inside the folder ``root``: every path read from a run's own
    files must, so that a crafted run folder cannot make ``edit`` or ``report`` read or embed other files."""
    try:
        p, r = Path(path).resolve(), Path(root).resolve()
    except (OSError, RuntimeError):
        return False
    return p == r or r in p.parents


def _recorded_file(f: str, run_dir: Path) -> Path:
    """A file a run recorded: as given, else relative to the run folder or its parent, else the shipped model of
    that name (``fmnist-generator``, ...: runs record the name they were given); else ``Path(f)`` as it is."""
    for cand in (Path(f), run_dir / f, run_dir.parent / f):
        if cand.is_file():
            return cand
    from ..assets import resolve_model

    try:
        return resolve_model(f)
    except CycleEncodingError:  # a shipped name whose file this install lacks: the caller reports it as missing
        return Path(f)


@dataclass
class RunImage:
    """One finished image of a run."""

    name: str
    folder: Path
    result: dict[str, Any]
    pivots: dict[str, torch.Tensor]  # stage -> [N, w_dim]

    @property
    def stages(self) -> list[str]:
        return list(self.result.get("stages") or [*self.pivots, *(["tune"] if self.tuned else [])])

    @property
    def tuned(self) -> bool:
        return "tune" in (self.result.get("stages") or []) or "tune" in self.result.get("metrics", {})

    @property
    def pivot_stage(self) -> str:
        """The stage whose pivot the edits move: the one pivotal tuning started from, else the last pivot stage."""
        t = self.result.get("tune") or {}
        if t.get("pivot_stage") in self.pivots:
            return str(t["pivot_stage"])
        order = [s for s in self.stages if s in self.pivots] or list(self.pivots)
        return order[-1]

    @property
    def pivot(self) -> torch.Tensor:
        """``[1, N, w_dim]``."""
        return self.pivots[self.pivot_stage][None]

    @property
    def recon_stage(self) -> str:
        """The stage whose reconstruction an edit of strength 0 reproduces."""
        return "tune" if self.tuned else self.pivot_stage

    @property
    def recon_sha256(self) -> str | None:
        return (self.result.get("recon_sha256") or {}).get(self.recon_stage)

    def checked(self, p: Path) -> Path | None:
        """``p`` when it is a file inside the image's folder, None when there is none; a file that leads outside the
        folder (a symbolic link) is refused by name."""
        if not p.is_file():
            return None
        if not inside(p, self.folder):
            raise CycleEncodingError(f"{p}: refused: it leads outside the run folder")
        return p

    @property
    def delta_path(self) -> Path | None:
        return self.checked(self.folder / "generator_delta.safetensors")

    @property
    def target_path(self) -> Path:
        return self.folder / "target.png"

    def recon_path(self, stage: str) -> Path:
        return self.folder / f"recon_{stage}.png"

    def losses(self) -> list[dict[str, Any]]:
        p = self.folder / "losses.jsonl"
        if not p.is_file() or not inside(p, self.folder):
            return []
        out = []
        for line in p.read_text().splitlines():
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return out


class InversionRun:
    """A run folder of ``cycle-encoding invert`` (see the module doc). Only images with ``done`` are listed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        cfg_path = self.dir / "config.json"
        if not cfg_path.is_file():
            raise CycleEncodingError(f"{self.dir}: not an inversion run folder (no config.json)")
        self.config: dict[str, Any] = _read_json(cfg_path)
        if self.config.get("format") != RUN_FORMAT:
            raise CycleEncodingError(f"{self.dir}: config.json is not an inversion run's ({self.config.get('format')})")
        summary = self.dir / "summary.json"
        self.summary: dict[str, Any] = _read_json(summary) if summary.is_file() else {}
        self._images: list[RunImage] | None = None
        self.unreadable: list[dict[str, str]] = []

    @property
    def stages(self) -> list[str]:
        return list((self.config.get("options") or {}).get("stages") or [])

    @property
    def command(self) -> str:
        return str(self.config.get("command", ""))

    @property
    def networks(self) -> dict[str, str]:
        return dict(self.config.get("networks") or {})

    def image_names(self) -> list[str]:
        root = self.dir / "images"
        if not root.is_dir():
            return []
        return sorted(d.name for d in root.iterdir() if d.is_dir() and (d / "done").is_file())

    def image(self, name: str) -> RunImage:
        folder = self.dir / "images" / name
        if Path(name).name != name or name in ("", ".", "..") or not inside(folder, self.dir / "images"):
            raise CycleEncodingError(f"{name!r}: refused: not an image folder inside {self.dir / 'images'}")
        if not (folder / "done").is_file():
            raise CycleEncodingError(f"{folder}: not finished (no 'done')")
        for f in ("result.json", "pivots.safetensors"):
            if (folder / f).exists() and not inside(folder / f, folder):
                raise CycleEncodingError(f"{folder / f}: refused: it leads outside the run folder")
        result = _read_json(folder / "result.json")
        if not isinstance(result, dict):
            raise CycleEncodingError(f"{folder / 'result.json'}: not a JSON object")
        nf = read_native(folder / "pivots.safetensors")
        if nf.kind != "pivots":
            raise CheckpointError(folder / "pivots.safetensors", f"a {nf.kind} file, not the run's pivots")
        pivots = {k: v.float() for k, v in nf.tensors.items()}
        order = list(nf.config.get("stages") or pivots)
        pivots = {k: pivots[k] for k in order if k in pivots}
        if not pivots:
            raise CycleEncodingError(f"{folder}: no pivots stored")
        return RunImage(name, folder, result, pivots)

    def load_images(self) -> tuple[list[RunImage], list[dict[str, str]]]:
        """Every finished image that can be read, and the others as ``{"name", "reason"}`` (a corrupt
        ``result.json`` or pivots file, a folder that leads outside the run): one bad folder does not stop the rest."""
        good: list[RunImage] = []
        bad: list[dict[str, str]] = []
        for n in self.image_names():
            try:
                good.append(self.image(n))
            except CycleEncodingError as e:
                bad.append({"name": n, "reason": str(e)})
        return good, bad

    @property
    def images(self) -> list[RunImage]:
        """The readable finished images (``unreadable`` lists the others)."""
        if self._images is None:
            self._images, self.unreadable = self.load_images()
        return self._images

    def generator_file(self) -> Path | None:
        """The base generator's file as the run recorded it (as given, else relative to the run folder)."""
        f = (self.config.get("generator") or {}).get("file")
        return _recorded_file(f, self.dir) if f else None

    def encoder_file(self) -> Path | None:
        enc = self.config.get("encoder") or {}
        f = enc.get("file")
        return _recorded_file(f, self.dir) if f else None

    def load_generator(
        self, generator: Generator | str | Path | None = None, device: str | torch.device = "cpu"
    ) -> Generator:
        """The base generator: the one given, else the file the run recorded; its weights must be the run's."""
        from ..checkpoints.generator import load_generator
        from ..inversion.delta import weights_sha256

        if isinstance(generator, Generator):
            G = generator
        else:
            from ..assets import resolve_model

            path = resolve_model(generator) if generator is not None else self.generator_file()
            if path is None:
                raise CycleEncodingError(
                    f"{self.dir}: the run does not record its generator file (it was given as a network): pass "
                    "--generator FILE"
                )
            if not path.is_file():
                raise CycleEncodingError(f"the run's generator {path} is not there: pass --generator FILE")
            G = load_generator(path, device=device)
        want = (self.config.get("generator") or {}).get("weights_sha256")
        if want and weights_sha256(G) != want:
            raise CycleEncodingError(
                f"the generator given is not the one {self.dir} was inverted with (weights sha256 differs)"
            )
        return G.to(device).eval().requires_grad_(False)

    def generator_for(self, image: RunImage, base: Generator, allow_base: bool = False) -> tuple[Generator, str]:
        """(the generator that renders ``image``'s pivot, 'tuned' or 'base')."""
        from ..inversion.delta import load_generator_delta

        if not image.tuned:
            return base, "base"
        if image.delta_path is None:
            if allow_base:
                return base, "base (the run tuned the generator but did not store it)"
            raise CycleEncodingError(
                f"{image.folder}: the run tuned the generator but did not store it (run invert without --no-delta), "
                "so the edits cannot use it; allow the base generator explicitly to go on"
            )
        G = load_generator_delta(image.delta_path, base)
        return G.to(base.w_avg.device).eval(), "tuned"

    def stage_files(self, stage: str | None = None) -> tuple[str, dict[str, Path], dict[str, Path]]:
        """(the stage, each finished image's reconstruction after it, each one's target as inverted), by image name.
        ``stage`` None: ``tune`` when the run tuned, else its last stage."""
        stages = self.stages
        if stage is None:
            stage = "tune" if "tune" in stages else (stages[-1] if stages else "tune")
        if stages and stage not in stages:
            raise CycleEncodingError(f"{self.dir}: the run has no stage {stage!r} (its stages: {', '.join(stages)})")
        recons: dict[str, Path] = {}
        targets: dict[str, Path] = {}
        for name in self.image_names():
            folder = self.dir / "images" / name
            if (folder / f"recon_{stage}.png").is_file():
                recons[name] = folder / f"recon_{stage}.png"
            if (folder / "target.png").is_file():
                targets[name] = folder / "target.png"
        return stage, recons, targets

    def edit_folders(self) -> list[Path]:
        root = self.dir / EDITS_DIR
        if not root.is_dir():
            return []
        return sorted(d for d in root.iterdir() if d.is_dir() and (d / "edit.json").is_file())


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


def strength_file(j: int, a: float) -> str:
    return f"{j:02d}_s{a:+.3g}.png"


def named_directions(spec: str, G: Generator) -> DirectionSet:
    """A direction file, or a name computed from the generator: ``sefa`` (SeFa over all conv layers) or
    ``ganspace`` (PCA of 50k mapping outputs, seed 0; the first 16 directions of each)."""
    if spec in ("sefa", "ganspace"):
        if spec == "sefa":
            from .sefa import sefa_directions

            ds = sefa_directions(G, components=min(16, G.w_dim))
        else:
            from .ganspace import ganspace_pca

            ds = ganspace_pca(G, n_samples=50_000, components=min(16, G.w_dim))
        ds.source = spec
        return ds
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
        for rel in [*rec.get("files", []), rec.get("strip"), rec.get("gif")]:
            if not rel:
                continue
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
    """Whether the rendering ``y [1, C, H, W]`` of the image's pivot is the run's reconstruction, and how that was
    decided. Bit for bit (the sha256 of the float32 tensor the run stored) when this process renders with the run's
    device and CPU thread count; otherwise (the thread count changes how the CPU sums, so the last bits of a float
    may differ; also runs that did not record it) within a stated tolerance of the reconstruction the run saved as
    ``recon_STAGE.png``: every 8-bit pixel value equal up to RECON_TOLERANCE_LEVELS. None when there is nothing to
    compare with."""
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
    from ..data.images import read_image
    from ..utils import to_uint8

    saved = to_uint8(read_image(ref, channels=y.shape[1])[None])
    got = to_uint8(y.clamp(-1, 1))
    if saved.shape != got.shape:
        return False, how
    diff = int(np.abs(saved.astype(np.int16) - got.astype(np.int16)).max())
    return diff <= RECON_TOLERANCE_LEVELS, how


def save_sweep_gif(
    rendered: Sequence[torch.Tensor],
    strengths: Sequence[float],
    path: Path,
    min_side: int = 128,
    max_side: int = 256,
    ms: int = 250,
) -> Path:
    """The edits of one image as a looping GIF (Pillow): lowest strength to highest and back, each frame enlarged by a
    whole factor (nearest neighbour) to at least ``min_side`` pixels, or reduced to at most ``max_side`` (a GIF to
    share, not the full images: those are the PNGs beside it)."""
    from PIL import Image

    from ..utils import to_pil

    order = sorted(range(len(strengths)), key=lambda j: strengths[j])
    order = order + order[-2:0:-1]  # ping-pong without repeating the ends
    frames = []
    for j in order:
        im = to_pil(rendered[j][0].clamp(-1, 1)).convert("RGB")
        k = max(1, -(-min_side // max(im.size)))
        if k > 1:
            im = im.resize((im.width * k, im.height * k), Image.Resampling.NEAREST)
        elif max(im.size) > max_side:
            im.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        frames.append(im)
    return atomic_write(path, lambda t: frames[0].save(t, format="GIF", save_all=True, append_images=frames[1:],
                                                        duration=ms, loop=0))  # fmt: skip


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
    """Render ``request`` for every finished image of ``run`` (see the module doc) and return what ``edit.json``
    holds. ``encoder`` (an Encoder4Editing or a file; ``"run"`` for the run's own) turns on LEC; ``scorer`` (a
    function images -> [B]) edit success; ``preservation`` the distance to the reconstruction. ``log`` receives one
    line per image (default: stderr); ``progress`` (auto, bar, lines, none; default none) a bar over the images.

    ``members`` (images -> [B], NaN for an image to leave out) picks the images the summaries are over, described
    by ``members_info`` (e.g. the classes); ``gif`` writes each image's sweep as a GIF.
    Everything is checked before anything is written; the edit is rendered into a temporary folder and swapped in
    at the end, so a failed edit leaves an earlier one of the same name as it was. An image whose folder cannot be
    read is listed in ``failed`` (name and reason) and the others go on; when none can be edited, nothing is
    swapped in and the error names the first reason."""
    from ..utils import resolve_device
    from .directions import parse_strengths

    say = log or (lambda s: print(s, file=sys.stderr, flush=True))
    run = run if isinstance(run, InversionRun) else InversionRun(run)
    strengths = parse_strengths(list(request.strengths))
    finished = run.image_names()
    if images is None:
        names = finished
    else:
        names = list(dict.fromkeys(images))
        unknown = [n for n in names if n not in finished]
        if unknown:
            raise CycleEncodingError(
                f"{run.dir}: no finished image named {unknown[0]!r}"
                + (f" (finished: {', '.join(finished[:8])}{', ...' if len(finished) > 8 else ''})" if finished else "")
            )
    if not names:
        raise CycleEncodingError(f"{run.dir}: no finished images to edit")
    dev = resolve_device(device)
    base = run.load_generator(generator, dev)
    ds = request.directions
    if ds.w_dim != base.w_dim:
        raise CycleEncodingError(
            f"the {ds.label()} have width {ds.w_dim}; the run's generator has codes of width {base.w_dim}"
        )
    layers = ds.resolve_layers(request.layers, base.num_ws)
    comp = ds.index(request.component)
    tag = request.name()
    out = Path(out_dir) if out_dir is not None else run.dir / EDITS_DIR / tag

    E = None
    encoder_name: str | None = None
    offsets = (run.config.get("options") or {}).get("offsets", "all")
    if encoder is not None:
        from ..checkpoints.encoder import load_encoder

        if isinstance(encoder, str) and encoder == "run":
            f = run.encoder_file()
            if f is None or not f.is_file():
                raise CycleEncodingError(f"{run.dir}: the run's encoder file is not there: give the encoder file")
            encoder = f
        if isinstance(encoder, (str, Path)):
            encoder_name = str(encoder)
            E = load_encoder(encoder, dev)
        else:
            encoder_name = getattr(encoder, "name", None) or type(encoder).__name__
            E = encoder.to(dev).eval()
        if (E.config.num_ws, E.config.w_dim) != (base.num_ws, base.w_dim):
            raise CycleEncodingError("the encoder's codes do not fit the run's generator")

    out.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    bar = Progress(len(names), f"edit {out.name}", "img", progress if progress is not None else "none")
    if log is None:
        say = bar.say  # lines above the bar, when one is drawn
    try:
        doc = _render_into(
            stage, run, names, request, ds, comp, strengths, layers, base, dev, E, encoder_name, offsets, scorer,
            scorer_name, preservation, allow_base, say, bar, members, members_info, gif,
        )  # fmt: skip
        if not doc["images"]:
            first = doc["failed"][0]
            raise CycleEncodingError(
                f"no image could be edited ({first['name']}: {first['reason']})"
                + (f"; the earlier edit in {out} is kept" if (out / "edit.json").is_file() else "")
            )
        _swap_in(stage, out, doc)
    finally:
        bar.close()
        shutil.rmtree(stage, ignore_errors=True)
    return doc


def _swap_in(stage: Path, out: Path, doc: dict[str, Any]) -> None:
    """Replace the edit in ``out`` by the one rendered into ``stage``: the files the earlier ``edit.json`` listed go,
    the new files move in, ``edit.json`` last."""
    out.mkdir(parents=True, exist_ok=True)
    remove_previous_edit(out)
    for rec in doc["images"]:
        for rel in [*rec["files"], rec["strip"], *([rec["gif"]] if rec.get("gif") else [])]:
            dst = out / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(stage / rel, dst)
    atomic_write(out / "edit.json", lambda t: t.write_text(json.dumps(doc, indent=2) + "\n"))


def _render_into(
    out: Path,
    run: InversionRun,
    names: list[str],
    request: EditRequest,
    ds: DirectionSet,
    comp: int,
    strengths: list[float],
    layers: list[int],
    base: Generator,
    dev: torch.device,
    E: Any,
    encoder_name: str | None,
    offsets: str,
    scorer: Callable[[torch.Tensor], torch.Tensor] | None,
    scorer_name: str | None,
    preservation: Preservation | None,
    allow_base: bool,
    say: Callable[[str], None],
    bar: Progress,
    members: Callable[[torch.Tensor], torch.Tensor] | None = None,
    members_info: dict[str, Any] | None = None,
    gif: bool = True,
) -> dict[str, Any]:
    from ..grid import save_png, strip_image

    per_image: list[dict[str, Any]] = []
    failed: list[dict[str, str]] = []
    lec_rows: list[list[float]] = []
    change_rows: list[torch.Tensor] = []
    pres_rows: list[list[float]] = []
    measured: list[str] = []
    left_out: list[str] = []
    t_all = time.perf_counter()
    for i, name in enumerate(names):
        try:
            im = run.image(name)
            t0 = time.perf_counter()
            G, which = run.generator_for(im, base, allow_base)
            target = im.checked(im.target_path)
        except CycleEncodingError as e:  # one unreadable image folder does not stop the others
            failed.append({"name": name, "reason": str(e)})
            say(f"[{i + 1}/{len(names)}] {name}: FAILED: {e}")
            continue
        t_gen = time.perf_counter() - t0
        pivot = im.pivot.to(dev)
        folder = out / name
        rendered: list[torch.Tensor] = []
        files: list[str] = []
        t0 = time.perf_counter()
        for j, a in enumerate(strengths):
            ws = ds.apply(pivot, comp, a, layers, request.mode)
            y = render_one(G, ws)
            rendered.append(y)
            f = folder / strength_file(j, a)
            save_image(y[0], f)
            files.append(str(f.relative_to(out)))
        t_render = time.perf_counter() - t0
        rec: dict[str, Any] = {"name": name, "generator": which, "pivot_stage": im.pivot_stage,
                               "files": files, "seconds": {"generator": t_gen, "render": t_render}}  # fmt: skip
        recon = render_one(G, pivot)
        ok, how = matches_reconstruction(im, recon, dev)
        if ok is not None:
            rec["reconstruction_hash_matches"] = im.recon_sha256 is not None and tensor_sha256(recon) == im.recon_sha256
            rec["reconstruction_check"] = how
            zero = [j for j, a in enumerate(strengths) if a == 0 and request.mode == "add"]
            if zero:
                rec["strength0_is_reconstruction"] = matches_reconstruction(im, rendered[zero[0]], dev)[0]
        strip = strip_image(target, rendered, strengths)
        strip_path = out / f"{name}_strip.png"
        save_png(strip, strip_path)
        rec["strip"] = str(strip_path.relative_to(out))
        if gif:
            rec["gif"] = str(save_sweep_gif(rendered, strengths, out / f"{name}_sweep.gif").relative_to(out))
        # classifier and preservation see the images as saved (clamped to [-1, 1]); LEC re-encodes the raw rendering
        edited = torch.stack([r[0] for r in rendered])[None].clamp(-1, 1)  # [1, S, C, H, W]
        recon_shown = recon.clamp(-1, 1)
        member = True
        if members is not None:
            member = not bool(torch.isnan(members(recon_shown.to(dev))).any())
            rec["measured"] = member
            (measured if member else left_out).append(name)
        t0 = time.perf_counter()
        if E is not None:
            from ..inversion.pivot import encoder_pivot

            def encode(x: torch.Tensor) -> torch.Tensor:
                return encoder_pivot(E, x, offsets)

            def render(ws: torch.Tensor, G: Generator = G) -> torch.Tensor:
                return G.synthesis(ws.to(G.w_avg.device), noise_mode="const")

            vals = [float(direction_lec(ds, comp, a, pivot, encode, render, layers)[0]) if request.mode == "add"
                    else float("nan") for a in strengths]  # fmt: skip
            rec["lec"] = vals
            if member:
                lec_rows.append(vals)
        if scorer is not None:
            from .measures import attribute_changes

            ch = attribute_changes(scorer, recon_shown.to(dev), edited.to(dev))[0].cpu()
            rec["score_change"] = ch.tolist()
            if member:
                change_rows.append(ch)
        if preservation is not None:
            vals = preservation(edited[0].to(dev), recon_shown.expand(len(strengths), -1, -1, -1).to(dev)).tolist()
            rec["preservation"] = vals
            if member:
                pres_rows.append(vals)
        rec["seconds"]["measures"] = time.perf_counter() - t0
        per_image.append(rec)
        say(f"[{i + 1}/{len(names)}] {name}: {len(strengths)} edits with the {which} generator"
            + (f", LEC {' '.join(f'{v:.3f}' for v in rec['lec'])}" if "lec" in rec else ""))  # fmt: skip
        bar.update(1)
        if G is not base:
            del G

    direction_info = {
        "source": ds.source,
        "method": ds.method,
        "component": comp,
        "name": ds.names[comp] if ds.names else None,
        "space": "W+" if ds.per_layer else "W",
        "scale": float(ds.scales[comp]) if ds.scales is not None else 1.0,
        **request.extra,
    }
    doc: dict[str, Any] = {
        "format": "cycle-encoding-edits",
        "version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "command": shlex.join(sys.argv),
        "argv": list(sys.argv),
        "run_dir": str(run.dir),
        "tag": request.name(),
        "direction": direction_info,
        "strengths": strengths,
        "layers": layers,
        "mode": request.mode,
        "images": per_image,
        "failed": failed,
        "threads": torch.get_num_threads(),
        "seconds": time.perf_counter() - t_all,
        "measures": {},
    }
    if members is not None:
        doc["measured_on"] = {**(members_info or {}), "images": measured, "left_out": left_out}
    if lec_rows:
        doc["measures"]["lec"] = {"encoder": encoder_name,
                                  "offsets": offsets, **lec_summary(torch.tensor(lec_rows), strengths)}  # fmt: skip
    if change_rows:
        doc["measures"]["edit_success"] = {"classifier": scorer_name or getattr(scorer, "name", "classifier"),
                                           **success_summary(torch.stack(change_rows), strengths)}  # fmt: skip
    if pres_rows and preservation is not None:
        doc["measures"]["preservation"] = preservation_summary(torch.tensor(pres_rows), strengths, preservation)
    return doc
