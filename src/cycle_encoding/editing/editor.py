"""An interactive editor's engine: one image's pivot and tuned generator, directions as named sliders, renders, export.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.editor"."""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..checkpoints.delta import weights_sha256
from ..checkpoints.generator import open_generator_arg, save_generator
from ..checkpoints.latents import save_projected_w
from ..checkpoints.native import default_provenance
from ..checkpoints.run_folder import InversionRun
from ..data.align import LandmarkDetector, align_image, read_rgb, small_target_warning
from ..data.images import image_to_tensor, read_image
from ..errors import CycleEncodingError
from ..inversion import Inverter, make_config
from ..inversion.common import check_target
from ..inversion.config import PIVOT_STAGES
from ..networks.stylegan2 import Generator
from ..ops import convert_channels
from ..utils import resolve_device, save_image, to_pil, to_uint8, write_json
from .directions import DirectionSet, check_strength
from .render import render_one
from .sliders import SLIDER_METHODS, Direction, build_directions

DEFAULT_STAGES = ("encoder", "tune")
MAX_INVERTERS = 4  # inverters kept (each holds its loss networks and, for refine, the encoder's training images)
# the feature network the shipped Fashion-MNIST models were trained and evaluated with (see README)
SHIPPED_LOSS_NETWORKS = {"fmnist-generator": {"perceptual": "fmnist-features", "identity": "fmnist-features",
                                              "train_data": "fashion-mnist"}}  # fmt: skip


class InversionCancelled(CycleEncodingError):
    """An inversion stopped by its ``cancel`` event (between two optimization steps)."""


@dataclass
class InversionProgress:
    """What a progress callback sees: a step of a stage (``done`` False) or a finished stage (``done`` True, with
    its reconstruction as ``image`` and its ``metrics``). ``total`` is the stage's step budget (tuning may stop
    earlier)."""

    stage: str
    step: int
    total: int
    done: bool = False
    record: dict[str, Any] = field(default_factory=dict)
    image: Image.Image | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0


def _nonzero(strengths: Mapping[str, float] | None) -> dict[str, float]:
    return {k: float(v) for k, v in (strengths or {}).items() if float(v) != 0.0}


def _file_stem(parts: Sequence[str]) -> str:
    """``parts`` joined by ``_`` in the characters ``A-Za-z0-9_.+-``, at most 120 (a longer one is cut and kept apart
    by a hash of the whole)."""
    stem = re.sub(r"[^A-Za-z0-9_.+-]+", "-", "_".join(parts)).strip("-._") or "edit"
    if len(stem) > 120:
        stem = f"{stem[:111]}-{hashlib.sha256(stem.encode()).hexdigest()[:8]}"
    return stem


def tensor_to_pil(y: torch.Tensor) -> Image.Image:
    """``[1, C, H, W]`` or ``[C, H, W]`` in [-1, 1] -> PIL, exactly as the project saves its PNGs."""
    return to_pil(y[0] if y.ndim == 4 else y)


class _Shared:
    """What every editor of one base generator shares: networks, directions, inverters (built once each)."""

    def __init__(
        self,
        generator: Generator | str | Path,
        encoder: Any,
        directions: Sequence[str | Path | DirectionSet],
        components: int,
        methods: Sequence[str],
        device: str | torch.device,
        loss_options: dict[str, Any],
    ) -> None:
        self.device = resolve_device(device)
        self.G, _ = open_generator_arg(generator, self.device)
        self.G_sha256 = weights_sha256(self.G)
        self.encoder = encoder
        self.loss_options = dict(loss_options)
        self.lock = threading.Lock()  # one inversion at a time per base generator
        self._inverters: dict[str, Any] = {}
        self._run_generators: weakref.WeakValueDictionary[tuple[Any, ...], Generator] = weakref.WeakValueDictionary()
        self._run_lock = threading.Lock()
        self._directions = build_directions(self.G, directions, components, methods)

    def inverter(self, stages: Sequence[str], options: Mapping[str, Any]) -> Any:
        spec = json.dumps({"stages": list(stages), **options}, sort_keys=True, default=str)
        inv = self._inverters.pop(spec, None)
        if inv is None:
            if self.encoder is None and any(s in ("encoder", "refine") for s in stages):
                raise CycleEncodingError("stages encoder and refine need an encoder; this editor has none")
            opts = {**self.loss_options, **options}
            inv = Inverter(self.G, self.encoder, stages=tuple(stages), device=self.device, **opts)
        self._inverters[spec] = inv  # most recently used last; the oldest goes beyond MAX_INVERTERS
        while len(self._inverters) > MAX_INVERTERS:
            self._inverters.pop(next(iter(self._inverters)))
        return inv

    def run_generator(self, run: Any, im: Any) -> Generator | None:
        """The tuned generator of a run's image (None: the base renders it), rebuilt from its stored change once and
        shared by every editor that has the image open (released when none has)."""
        if not im.tuned:
            return None
        key = None if im.delta_path is None else (str(im.delta_path.resolve()), im.delta_path.stat().st_mtime_ns)
        with self._run_lock:
            G = self._run_generators.get(key) if key is not None else None
            if G is None:
                G, _ = run.generator_for(im, self.G)  # a stored change, or a one-line error
                self._run_generators[key] = G
        return G

    @cached_property
    def aligner(self) -> LandmarkDetector:
        return LandmarkDetector()  # built on first use: dlib loads its model


class Editor:
    """Edit one image at a time with a generator's directions (see the design notes).

    ``generator``: a Generator or any generator file (or shipped name); ``encoder``: a file (a ``train-encoder``
    checkpoint gives ``refine`` its training images) or None (then only ``project`` inverts, or a run is opened);
    ``directions``: direction files or sets; ``components``: how many SeFa / GANSpace directions of the generator
    (``methods``) to offer; ``perceptual`` / ``identity`` / ``train_data``: the inversion's loss networks and the
    encoder's training images (defaults: those of the shipped Fashion-MNIST models when the generator is
    ``fmnist-generator``, else the inversion's own defaults).
    """

    def __init__(
        self,
        generator: Generator | str | Path = "fmnist-generator",
        encoder: Any = None,
        *,
        directions: Sequence[str | Path | DirectionSet] = (),
        components: int = 5,
        methods: Sequence[str] = SLIDER_METHODS,
        device: str | torch.device = "cpu",
        perceptual: str | None = None,
        identity: str | None = None,
        train_data: str | None = None,
        lpips_backbone: str | None = None,
        _shared: _Shared | None = None,
    ) -> None:
        if _shared is None:
            loss = dict(SHIPPED_LOSS_NETWORKS.get(str(generator), {})) if isinstance(generator, (str, Path)) else {}
            given = {"perceptual": perceptual, "identity": identity, "train_data": train_data,
                     "lpips_backbone": lpips_backbone}  # fmt: skip
            loss.update({k: v for k, v in given.items() if v is not None})
            _shared = _Shared(generator, encoder, directions, components, methods, device, loss)
        self._s = _shared
        self.base: Generator = _shared.G  # the base generator, its weights' hash, whether an encoder is there
        self.base_sha256: str = _shared.G_sha256
        self.has_encoder: bool = _shared.encoder is not None
        self.name: str | None = None
        self.target: torch.Tensor | None = None  # [1, C, R, R] in [-1, 1], CPU
        self.pivot: torch.Tensor | None = None  # [1, N, w_dim], CPU
        self.tuned: Generator | None = None  # the image's tuned generator (None: the base renders)
        self.result: Any = None  # the InversionResult of the last invert()
        self.stages: list[str] = []
        self.source: str | None = None  # where the codes came from: "inverted", a run image, "codes"
        self.run: Any = None  # the InversionRun opened, if any
        self._strengths: dict[str, float] = {}
        self._edited: torch.Tensor | None = None
        self._rendered: torch.Tensor | None = None

    # -- construction --------------------------------------------------------------------------------------------
    def fork(self) -> Editor:
        """A new editor sharing this one's generator, encoder, directions and inverters, with no image yet (one per
        browser session)."""
        ed = Editor(_shared=self._s)
        ed.run = self.run
        return ed

    @classmethod
    def open_run(
        cls,
        run_dir: str | Path,
        image: str | None = None,
        *,
        generator: Generator | str | Path | None = None,
        encoder: Any = "run",
        device: str | torch.device = "cpu",
        **kwargs: Any,
    ) -> Editor:
        """An editor on a finished ``cycle-encoding invert`` run: its base generator (the file it recorded, or the one
        given), its encoder (``"run"``: the one it recorded, when the file is there) and image ``image`` (default:
        the first finished one), whose tuned generator is rebuilt from the base and its stored change."""
        run = InversionRun(run_dir)
        base = run.load_generator(generator, device)
        if isinstance(encoder, str) and encoder == "run":
            f = run.encoder_file()
            encoder = str(f) if f is not None and f.is_file() else None
        opts = run.config.get("options") or {}
        for k in ("perceptual", "identity", "train_data", "lpips_backbone"):
            if opts.get(k) is not None:
                kwargs.setdefault(k, opts[k])
        ed = cls(base, encoder, device=device, **kwargs)
        ed.attach_run(run.dir, image)
        return ed

    # -- what there is -------------------------------------------------------------------------------------------
    @property
    def generator(self) -> Generator:
        """The generator that renders the current image: the tuned one, else the base."""
        return self.tuned if self.tuned is not None else self._s.G

    def directions(self) -> list[Direction]:
        """The directions render() takes, in slider order."""
        return list(self._s._directions)

    def direction(self, key: str) -> Direction:
        for d in self._s._directions:
            if d.key == key:
                return d
        known = ", ".join(d.key for d in self._s._directions) or "none"
        raise CycleEncodingError(f"no direction {key!r} (directions: {known})")

    def run_images(self) -> list[str]:
        """The finished images of the run opened (empty without one)."""
        return self.run.image_names() if self.run is not None else []

    # -- getting an image ------------------------------------------------------------------------------------------
    def load_image(
        self,
        image: Image.Image | np.ndarray | torch.Tensor | str | Path,
        align: bool = False,
        notes: list[str] | None = None,
    ) -> torch.Tensor:
        """The target as the inversion sees it: ``[1, C, R, R]`` in [-1, 1] at the generator's resolution (centre
        crop); ``align``: FFHQ-align the largest face first (dlib; an error when there is none). ``notes`` receives
        what the user should know: a colour image made grey for a 1-channel generator, a small image upsampled."""
        G = self._s.G
        if align:
            if isinstance(image, (str, Path)):
                rgb = read_rgb(image)
            else:
                x = image if isinstance(image, torch.Tensor) else image_to_tensor(image, 3)
                rgb = to_uint8(convert_channels(x if x.ndim == 4 else x[None], 3))[0]
            faces = align_image(rgb, self._s.aligner, size=G.resolution)
            if not faces:
                raise CycleEncodingError("no face found in the image (turn face alignment off for other images)")
            x = image_to_tensor(faces[0].image)
        elif isinstance(image, (str, Path)):
            x = read_image(image)
        elif isinstance(image, torch.Tensor):
            x = image.detach().float().cpu()
        else:
            x = image_to_tensor(image)
        x = x[0] if x.ndim == 4 else x
        name = Path(image).name if isinstance(image, (str, Path)) else "the image"
        if notes is not None and x.ndim == 3 and x.shape[0] == 3 and G.img_channels == 1:
            if not (torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])):
                notes.append(f"{name} is a colour image and this generator makes 1-channel images: it was made grey "
                             "(ITU-R 601 luma)")  # fmt: skip
        small = small_target_warning(name, int(x.shape[-2]), int(x.shape[-1]), G.resolution) if x.ndim == 3 else None
        if notes is not None and small is not None:
            notes.append(small)
        return check_target(G, x).cpu()

    def invert(
        self,
        image: Image.Image | np.ndarray | torch.Tensor | str | Path,
        stages: Sequence[str] = DEFAULT_STAGES,
        *,
        progress: Callable[[InversionProgress], None] | None = None,
        align: bool = False,
        name: str | None = None,
        cancel: threading.Event | None = None,
        notes: list[str] | None = None,
        **options: Any,
    ) -> Any:
        """Invert ``image`` with ``stages`` (the inversion pipeline's ``Inverter``; ``options`` as its keyword
        options, e.g. ``tune={"steps": 50}``) and make it the current image; returns the ``InversionResult``.
        ``progress`` sees every optimization step and each finished stage (with its reconstruction). Setting
        ``cancel`` (from another thread) stops the inversion after the step under way: ``InversionCancelled`` is
        raised and the editor keeps its image. ``notes``: as ``load_image``'s."""
        stages = tuple(stages)
        cfg = make_config(None, stages=stages, **{**self._s.loss_options, **options})
        totals = {"encoder": 1, "refine": cfg.refine.steps, "project": cfg.project.steps, "tune": cfg.tune.steps}
        x = self.load_image(image, align=align, notes=notes)
        if name is None:
            name = Path(image).stem if isinstance(image, (str, Path)) else "image"
        t_stage = [time.perf_counter()]
        at: dict[str, Any] = {"stage": None, "step": 0}  # the last step done

        def check() -> None:  # between two steps: the inversion's own step and stage hooks
            if cancel is not None and cancel.is_set():
                where = (
                    f"{at['step']} of {totals.get(at['stage'], '?')} {at['stage']} steps" if at["stage"] else "no step"
                )
                raise InversionCancelled(f"{name}: inversion cancelled after {where}")

        def on_step(rec: dict[str, Any]) -> None:
            at.update(stage=str(rec.get("stage", "")), step=int(rec.get("step", 0)) + 1)
            check()
            if progress is not None:
                progress(InversionProgress(at["stage"], at["step"], int(totals.get(at["stage"], 0)), record=rec))

        def on_stage(stage: str, res: Any) -> None:
            check()
            if progress is not None:
                img = tensor_to_pil(res.recons[stage])
                dt = time.perf_counter() - t_stage[0]
                progress(InversionProgress(stage, totals[stage], totals[stage], True, image=img,
                                  metrics=dict(res.metrics.get(stage, {})), seconds=dt))  # fmt: skip
            t_stage[0] = time.perf_counter()

        with self._s.lock:
            check()  # cancelled while waiting for another inversion
            inv = self._s.inverter(stages, options)
            res = inv.invert(x, name=name, on_step=on_step, on_stage=on_stage)
        pivot_stage = res.tune["pivot_stage"] if res.tune else [s for s in res.pivots if s in PIVOT_STAGES][-1]
        self._set(res.pivots[pivot_stage], res.generator, x.cpu(), name, "inverted")
        self.result = res
        self.stages = list(stages)
        return res

    def attach_run(self, run_dir: str | Path, image: str | None = None) -> list[str]:
        """Open a finished run of this editor's base generator (refused, naming the difference, for a run of another
        generator) at image ``image`` (default: its first); returns the run's finished images."""
        run = InversionRun(run_dir)
        want = (run.config.get("generator") or {}).get("weights_sha256")
        if want is not None and want != self.base_sha256:
            f = (run.config.get("generator") or {}).get("file") or "another generator"
            raise CycleEncodingError(
                f"{run.dir} was inverted with {f}, not this editor's generator: open it with "
                f"`cycle-encoding ui {run.dir}` (which uses the run's generator)"
            )
        names = run.image_names()
        if not names:
            raise CycleEncodingError(f"{run.dir}: no finished images in this run")
        self.run = run
        self.open_image(image or names[0])
        return names

    def open_image(self, name: str) -> None:
        """Make image ``name`` of the opened run the current one (pivot, tuned generator rebuilt from its change)."""
        if self.run is None:
            raise CycleEncodingError("no run folder is open")
        im = self.run.image(name)
        G = self._s.run_generator(self.run, im)
        target = check_target(self._s.G, read_image(im.target_path)).cpu() if im.target_path.is_file() else None
        self._set(im.pivot, G, target, name, f"run image {name}")
        self.stages = im.stages

    def set_codes(
        self,
        pivot: torch.Tensor | np.ndarray,
        generator: Generator | str | Path | None = None,
        target: Any = None,
        name: str = "codes",
    ) -> None:
        """Edit given codes ``[1, N, w_dim]`` (or ``[N, w_dim]``; e.g. the ``pivot`` of an exported ``codes.npz``),
        rendered by ``generator`` (e.g. an exported tuned generator; default: the base)."""
        p = torch.as_tensor(np.asarray(pivot) if isinstance(pivot, np.ndarray) else pivot).detach().float().cpu()
        p = p[None] if p.ndim == 2 else p
        G0 = self._s.G
        if p.ndim != 3 or p.shape[0] != 1 or tuple(p.shape[1:]) != (G0.num_ws, G0.w_dim):
            raise CycleEncodingError(
                f"codes must be [1, {G0.num_ws}, {G0.w_dim}] for this generator, got {list(p.shape)}"
            )
        G = None
        if generator is not None:
            G, _ = open_generator_arg(generator, self._s.device)
            if G.config != G0.config:
                raise CycleEncodingError(
                    "the generator given has another architecture than the editor's base generator"
                )
        x = self.load_image(target) if target is not None else None
        self._set(p, G, x, name, "codes")

    def _set(
        self, pivot: torch.Tensor, tuned: Generator | None, target: torch.Tensor | None, name: str, source: str
    ) -> None:
        self.pivot = pivot.detach().float().cpu().reshape(1, *pivot.shape[-2:])
        self.tuned = tuned
        self.target = target
        self.name = name
        self.source = source
        self.result = None  # invert() sets it after this
        self._strengths = {}
        self._edited = None
        self._rendered = None

    # -- editing ---------------------------------------------------------------------------------------------------
    def _need_image(self) -> torch.Tensor:
        if self.pivot is None:
            raise CycleEncodingError("no image yet: invert one, open a run or set codes first")
        return self.pivot

    def edited_codes(self, strengths: Mapping[str, float] | None = None) -> torch.Tensor:
        """The pivot with every direction of ``strengths`` applied in turn ``[1, N, w_dim]`` (on the device)."""
        ws = self._need_image().to(self._s.device)
        for key, a in (strengths or {}).items():
            d = self.direction(key)
            a = check_strength(a, f"strength of {key!r}")
            if a != 0.0:
                ws = d.set.apply(ws, d.component, a)
        return ws

    @torch.no_grad()
    def render_tensor(self, strengths: Mapping[str, float] | None = None) -> torch.Tensor:
        """The edited image ``[1, C, R, R]`` (raw, CPU), rendered as ``cycle-encoding edit`` renders."""
        ws = self.edited_codes(strengths)
        y = render_one(self.generator, ws)
        self._strengths = _nonzero(strengths)
        self._edited = ws.detach().cpu()
        self._rendered = y
        return y

    def render(self, strengths: Mapping[str, float] | None = None) -> Image.Image:
        """The edited image as PIL (several directions combine; ``{}`` gives the reconstruction)."""
        return tensor_to_pil(self.render_tensor(strengths))

    def reconstruction(self) -> Image.Image:
        return tensor_to_pil(render_one(self.generator, self._need_image()))

    def target_image(self) -> Image.Image | None:
        return tensor_to_pil(self.target) if self.target is not None else None

    # -- export ------------------------------------------------------------------------------------------------------
    def edit_name(self, strengths: Mapping[str, float] | None = None) -> str:
        """A file name for an edit: the image's name, then each direction with its strength (``_recon`` for none),
        in the characters ``A-Za-z0-9_.+-`` only and at most 120 of them, e.g. ``coat_coat-pullover+3_sefa-1-2``."""
        return _file_stem(
            [self.name or "image", *([f"{k}{v:+g}" for k, v in _nonzero(strengths).items()] or ["recon"])]
        )

    def export(
        self,
        folder: str | Path,
        strengths: Mapping[str, float] | None = None,
        *,
        generator: bool = True,
        named: bool = False,
    ) -> dict[str, Path]:
        """Write the edit (``strengths``; default: the last render's) into ``folder``: ``edited.png``, ``codes.npz``
        (``w``: the edited codes ``[1, num_ws, w_dim]`` float32, the layout of NVIDIA's ``projected_w.npz``; also
        ``pivot``, the unedited codes), ``generator.safetensors`` (the generator that renders them, in the project's
        format; skipped with ``generator=False``) and ``edit.json`` (the strengths and directions). Returns the paths.
        ``named``: the files are named for the image and the edit instead (``edit_name``: ``NAME.png``, ``NAME.npz``,
        ``NAME.json``; ``IMAGE-tuned-generator.safetensors``)."""
        out = Path(folder)
        out.mkdir(parents=True, exist_ok=True)
        chosen = dict(self._strengths) if strengths is None else {k: float(v) for k, v in strengths.items()}
        if self._rendered is None or list(_nonzero(chosen).items()) != list(self._strengths.items()):
            self.render_tensor(chosen)
        y = self._rendered
        assert y is not None and self._edited is not None and self.pivot is not None
        stem = self.edit_name(chosen) if named else None
        which = "tuned" if self.tuned is not None else "base"
        gen_name = _file_stem([self.name or "image", f"{which}-generator"]) if named else "generator"
        paths = {"png": save_image(y[0], out / f"{stem or 'edited'}.png")}
        paths["npz"] = save_projected_w(out / f"{stem or 'codes'}.npz", self._edited, extra={"pivot": self.pivot})
        if generator:
            prov = default_provenance(made_by="cycle-encoding editor", image=self.name,
                                      tuned=self.tuned is not None, base_weights_sha256=self.base_sha256)  # fmt: skip
            paths["generator"] = save_generator(self.generator, out / f"{gen_name}.safetensors", provenance=prov)
        doc = {
            "format": "cycle-encoding-editor-export",
            "version": 1,
            "image": self.name,
            "source": self.source,
            "strengths": chosen,
            "directions": [self.direction(k).describe() for k in chosen],
            "generator": which,
            "base_weights_sha256": self.base_sha256,
            "files": {k: p.name for k, p in paths.items()},
        }
        paths["json"] = write_json(out / f"{stem or 'edit'}.json", doc)
        return paths
