"""The ``Inverter``: its networks and loss networks set up once, then the inversion of one image by the configured
stages (encoder, refine or project, tune), or of a folder into a run folder.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.inverter"."""

from __future__ import annotations

import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from .. import distributed as dd
from ..checkpoints.delta import full_copy_bytes, weights_sha256
from ..checkpoints.encoder import encoder_provenance_unloaded
from ..checkpoints.generator import open_generator_arg
from ..config import to_dict
from ..data.align import LandmarkDetector, align_file, aligned_tensor, small_target_warning
from ..data.images import image_tensor
from ..errors import CycleEncodingError
from ..losses.identity import identity_default
from ..losses.networks import LossNetworks, build_loss_networks, recorded_networks
from ..metrics import mse, psnr
from ..networks.encoder import Encoder4Editing
from ..networks.stylegan2 import Generator
from ..progress import resolve_progress
from ..utils import max_pixels, resolve_device
from .common import check_target, render, stage_seed
from .config import PIVOT_STAGES, InversionConfig, make_config
from .pivot import encoder_pivot, resolve_stage
from .project import project_w
from .refine import EncoderSource, RegularizedRefiner, load_encoder_source, open_training_images
from .result import InversionResult
from .run_folder import fill_folder, image_state, line_sinks, prepare_run_dir, recorded_options, write_summary
from .speed import SpeedPlan, plan_speed, resident_memory
from .targets import list_targets
from .tune import TuneResult, pivotal_tune
from .tune_batch import pivotal_tune_many
from .tune_shared import invert_shared, pivotal_tune_shared
from .workers import finish_workers, merge_records, start_workers, stop_workers


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Inverter:
    """Inverts images into a generator: ``Inverter(G, E, stages=("encoder", "refine", "tune")).invert(image)``.

    ``generator`` / ``encoder``: networks or files (any format the project reads; for ``refine`` a ``train-encoder``
    ``checkpoint.pt`` also gives the optimizer state and the training images). ``config`` (an InversionConfig or a
    mapping) and keyword ``options`` set the method's options (e.g. ``stages=("encoder", "tune")``,
    ``tune={"steps": 100}``). ``perceptual_net`` / ``identity_net``: networks to use instead of those named in the
    options; ``train_images``: the encoder's training images as a dataset (instead of a folder or dataset name);
    ``refine_substitute``: the refinement's substitute Ranger state another inverter of the same files and options
    estimated (``refiner.substitute_state()``), taken over, not copied. Under ``torchrun`` the constructor joins the
    process group.
    """

    def __init__(
        self,
        generator: Generator | str | Path,
        encoder: Encoder4Editing | str | Path | None = None,
        config: InversionConfig | Mapping[str, Any] | None = None,
        *,
        device: str | torch.device | None = None,
        perceptual_net: torch.nn.Module | None = None,
        identity_net: torch.nn.Module | None = None,
        train_images: Any = None,
        progress: bool | str = False,
        refine_substitute: dict[str, Any] | None = None,
        **options: Any,
    ) -> None:
        self.config = make_config(config, **options)
        cfg = self.config
        if device is None:
            device = generator.w_avg.device if isinstance(generator, Generator) else "auto"
        base = resolve_device(device)
        self.dist = dd.init_distributed(base)
        self.device = dd.rank_device(base, self.dist)
        self.progress = resolve_progress(progress)  # bar, lines or none; a bar per stage only for "bar"

        self.G, self.generator_file = open_generator_arg(generator, self.device)
        self.speed: SpeedPlan | None = None  # set by run(..., speed=...)
        # what a worker process needs to build the same inverter (files only; None: networks given as objects)
        self._rebuild: dict[str, Any] | None = None
        if (
            isinstance(generator, (str, Path))
            and (encoder is None or isinstance(encoder, (str, Path)))
            and all(a is None for a in (perceptual_net, identity_net, train_images))
        ):
            self._rebuild = {"generator": str(generator), "encoder": None if encoder is None else str(encoder),
                             "device": str(self.device)}  # fmt: skip
        self.g_sha256 = weights_sha256(self.G)

        self.source: EncoderSource | None = None
        self.E: Encoder4Editing | None = None
        early = None
        if isinstance(encoder, (str, Path)):  # the loss networks' files first when the file's record tells them:
            prov = encoder_provenance_unloaded(encoder)  # a missing one fails before a big encoder is read
            if prov is not None:
                early = (prov, self._loss_networks(prov, prov.get("data"), perceptual_net, identity_net))
        if encoder is not None:
            if isinstance(encoder, Encoder4Editing):
                prov = getattr(encoder, "provenance", {}) or {}
                self.source = EncoderSource(encoder.to(self.device).eval(), train_data=prov.get("data"))
            else:
                self.source = load_encoder_source(encoder, self.device)
                self.source.path = str(encoder)
            self.E = self.source.encoder
            self._check_encoder(self.E)
        elif cfg.needs_encoder:
            raise CycleEncodingError(
                f"stage(s) {', '.join(s for s in cfg.stages if s in ('encoder', 'refine'))} need an encoder (--encoder)"
            )
        if self.E is not None and "encoder" in cfg.stages:
            resolve_stage(self.E, cfg.offsets)  # "trained" without a recorded stage fails here, before any image
        prov = (getattr(self.E, "provenance", None) or {}) if self.E is not None else {}
        train_data = self.source.train_data if self.source is not None else None
        same = early is not None and (recorded_networks(early[0]), early[0].get("data")) == (
            recorded_networks(prov), train_data)  # fmt: skip
        self.nets = early[1] if same else self._loss_networks(prov, train_data, perceptual_net, identity_net)
        if perceptual_net is not None:
            self.nets.perceptual = perceptual_net.to(self.device).eval().requires_grad_(False)
        if identity_net is not None:
            self.nets.identity = identity_net.to(self.device).eval().requires_grad_(False)
        self.project_nets = self.nets
        if "project" in cfg.stages and cfg.project.perceptual:
            own = build_loss_networks(
                cfg.project.perceptual, cfg.project.lpips_backbone or cfg.lpips_backbone, None, None, self.device
            )
            self.project_nets = LossNetworks(own.perceptual, None)
        if "project" in cfg.stages and self.project_nets.perceptual is None and cfg.project.l2_lambda <= 0:
            raise CycleEncodingError(
                "stage 'project' needs a perceptual distance (--perceptual) or a pixel loss (project.l2_lambda > 0)"
            )

        self.refiner: RegularizedRefiner | None = None
        self.train_data_name: str | None = None
        if "refine" in cfg.stages:
            assert self.source is not None and self.E is not None
            size = int(cfg.refine.image_size or self.source.image_size or min(self.G.resolution, 256))
            if train_images is None:
                spec = cfg.train_data or self.source.train_data
                train_images = open_training_images(spec, size, self.G.img_channels, self.source.path)
            self.train_data_name = getattr(train_images, "name", "training images")
            self.refiner = RegularizedRefiner(
                self.G, self.E, train_images, cfg.refine, self.nets,
                optimizer_state=self.source.optimizer_state,
                optimizer_settings=self.source.optimizer_settings,
                image_size=size, seed=cfg.seed, source=self.source.path, substitute=refine_substitute,
            )  # fmt: skip

    # -- set-up --------------------------------------------------------------------------------------------------
    def _check_encoder(self, E: Encoder4Editing) -> None:
        G, c = self.G, E.config
        if (c.num_ws, c.w_dim, c.in_channels) != (G.num_ws, G.w_dim, G.img_channels):
            raise CycleEncodingError(
                f"the encoder makes {c.num_ws} codes of {c.w_dim} from {c.in_channels}-channel images; the generator "
                f"takes {G.num_ws} codes of {G.w_dim} and makes {G.img_channels}-channel images: they do not belong "
                "together"
            )
        prov = getattr(E, "provenance", {}) or {}
        if isinstance(prov, dict) and "no latent_avg" in str(prov.get("warning", "")):
            E.set_w_avg(self.G.w_avg)  # e4e files without latent_avg: offset by this generator's average code

    def _loss_networks(self, prov: Mapping[str, Any], train_data: Any, perceptual_net: Any, identity_net: Any) -> Any:
        """The loss networks the options and the encoder's record ``prov`` choose (names and why kept on self)."""
        cfg = self.config
        recorded = recorded_networks(prov)
        self.perceptual_name = cfg.perceptual or recorded.get("perceptual", {}).get("name") or "lpips-alex"
        identity, self.identity_note = cfg.identity, "as given"
        if identity == "auto" and "identity" in recorded:
            identity, self.identity_note = recorded["identity"]["name"], "auto: the one the encoder file records"
        elif identity == "auto":
            identity, self.identity_note = identity_default(cfg.train_data or train_data, cfg.identity_weights)
        self.networks_from = {
            "perceptual": "option" if cfg.perceptual else ("the encoder file" if "perceptual" in recorded else "default"),
            "identity": "option" if cfg.identity != "auto" else ("the encoder file" if "identity" in recorded
                                                                 else "default"),
        }  # fmt: skip
        return build_loss_networks(
            self.perceptual_name, cfg.lpips_backbone, identity, cfg.identity_weights, self.device,
            need_perceptual=cfg.needs_perceptual and perceptual_net is None,
            need_identity=cfg.needs_identity and identity_net is None,
            recorded=recorded, domain=self._domain(recorded, prov),
        )  # fmt: skip

    def _domain(self, recorded: Mapping[str, Mapping[str, str]], prov: Mapping[str, Any]) -> str:
        """'fashion-mnist' or 'faces': which offline network a missing-file error suggests (from the encoder's
        recorded networks or training data, else the generator's channels: grey -> Fashion-MNIST, colour -> faces)."""
        names = {r.get("name") for r in recorded.values()}
        if "fmnist-features" in names or str(prov.get("data", "")) == "fashion-mnist":
            return "fashion-mnist"
        return "faces" if self.G.img_channels == 3 else "fashion-mnist"

    def network_names(self) -> dict[str, str]:
        return self.nets.names()

    def describe(self) -> dict[str, Any]:
        """What this inverter is: resolved options, files, weight hashes, loss networks (``config.json``)."""
        enc = None
        if self.E is not None:
            assert self.source is not None
            enc = {
                "file": self.source.path,
                "weights_sha256": weights_sha256(dict(self.E.state_dict())),
                "trained_stage": self.E.trained_stage,
                "optimizer_state": self.source.optimizer_state is not None,
                "config": self.E.config.to_dict(),
            }
        out: dict[str, Any] = {
            "options": to_dict(self.config),
            "generator": {
                "file": self.generator_file,
                "weights_sha256": self.g_sha256,
                "config": self.G.config.to_dict(),
                "full_copy_bytes": full_copy_bytes(self.G),
            },
            "encoder": enc,
            "networks": self.network_names(),
            "identity_choice": self.identity_note,
            "network_files": self.nets.files(),
            "networks_from": self.networks_from,
        }
        if self.speed is not None:
            out["speed"] = to_dict(self.speed)
        if self.project_nets is not self.nets:
            out["project"] = {"perceptual": self.project_nets.names()["perceptual"]}
        if "tune" in self.config.stages:
            thr = self.config.tune.stop_threshold
            out["tune"] = {
                "early_stop": "off" if thr is None else (
                    "off (shared tuning: none, as PTI's multi-ID mode)" if self.config.tune_mode == "shared" else
                    f"perceptual <= {thr}" if self.nets.perceptual is not None else "off (no perceptual distance)"
                ),
                "locality": self.config.tune.locality,
            }  # fmt: skip
        if self.refiner is not None:
            out["refine"] = {
                "train_images": self.train_data_name,
                "image_size": self.refiner.image_size,
                "lr": self.refiner.lr,
                "optimizer_state": self.refiner.optimizer_source,
                "optimizer_state_note": self.refiner.optimizer_note,
                "noise": self.config.refine.noise_mode,
            }
        return out

    # -- one image -------------------------------------------------------------------------------------------------
    def load_image(self, image: Any, notes: dict[str, Any] | None = None) -> torch.Tensor:
        """A target as ``[1, C, R, R]`` on the device, from an image file, a PIL image, a numpy array of pixels
        (``[H, W(, C)]``, uint8 or floats in [0, 1]) or a tensor in [-1, 1] (``[C, H, W]`` / ``[1, C, H, W]``); with
        ``align``, an image file's largest face FFHQ-aligned at G's resolution. A target smaller than G's images is
        upsampled with a warning (in ``notes["warning"]`` when a dict is given, which also receives the alignment)."""
        name = str(image) if isinstance(image, (str, Path)) else "the target"
        if isinstance(image, (str, Path)) and self.config.align:
            face = align_file(image, self._face_detector, self.G.resolution)
            if notes is not None:
                notes["aligned"] = {"size": self.G.resolution, "box": list(face.box or ()),
                                    "quad": [[round(float(v), 2) for v in q] for q in face.quad]}  # fmt: skip
            image = aligned_tensor(face)
        else:
            image = image_tensor(image)
        msg = small_target_warning(name, int(image.shape[-2]), int(image.shape[-1]), self.G.resolution)
        if msg is not None:
            if notes is not None:
                notes["warning"] = msg
            else:
                warnings.warn(msg, stacklevel=2)
        return check_target(self.G, image)

    @cached_property
    def _face_detector(self) -> LandmarkDetector:
        """dlib's face detector and 68-point predictor, loaded once (for ``align``)."""
        return LandmarkDetector()

    def _stage_metrics(self, y: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        with torch.no_grad():
            m = {"mse": float(mse(y, x)[0]), "psnr": float(psnr(y, x)[0])}
            if self.nets.perceptual is not None:
                m["perceptual"] = float(self.nets.perceptual(y, x).reshape(-1)[0])
        return m

    def invert(
        self,
        image: Any,
        index: int = 0,
        name: str | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_stage: Callable[[str, InversionResult], None] | None = None,
    ) -> InversionResult:
        """Run the configured stages on one image: a path, a PIL image, a numpy array or a tensor (``load_image``).
        ``index`` seeds the image's random draws (its position in a run); ``on_step(record)`` sees each step's losses,
        ``on_stage(stage, result)`` each finished stage. The result's ``to_pil(stage)`` and ``edit(...)`` show it."""
        res = self.invert_many(
            [image], [index], [name], on_step=None if on_step is None else (lambda i, r: on_step(r)),
            on_stage=None if on_stage is None else (lambda i, s, r: on_stage(s, r)),
        )  # fmt: skip
        return res[0]

    def invert_many(
        self,
        images: Sequence[Any],
        indices: Sequence[int] | None = None,
        names: Sequence[str | None] | None = None,
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
        on_stage: Callable[[int, str, InversionResult], None] | None = None,
        pivots_only: bool = False,
    ) -> list[InversionResult]:
        """``invert`` for several images: the stages before tuning image by image, then the tuning of all of them at
        once (``tune_stage``). The callbacks get the image's position in ``images`` first. ``pivots_only``: the
        stages before tuning only."""
        cfg = self.config
        indices = list(range(len(images))) if indices is None else list(indices)
        names = [None] * len(images) if names is None else list(names)
        if not len(images) == len(indices) == len(names):
            raise CycleEncodingError(f"{len(images)} images, {len(indices)} indices and {len(names)} names")
        if not images:
            return []
        results: list[InversionResult] = []
        pivots: list[torch.Tensor | None] = []
        for k, (image, index, name) in enumerate(zip(images, indices, names)):
            if name is None:
                source = image if isinstance(image, (str, Path)) else getattr(image, "filename", None)
                name = Path(source).stem if source else f"image{index}"
            x = self.load_image(image)
            res = InversionResult(name=name, target=x.cpu(), base_generator=self.G)
            pivots.append(self._pivot_stages(x, index, res, _bind(on_step, k), _bind(on_stage, k)))
            results.append(res)
        if "tune" in cfg.stages and not pivots_only:
            self.tune_stage(results, pivots, indices, on_step, on_stage)  # type: ignore[arg-type]
        return results

    def tune_stage(
        self,
        results: list[InversionResult],
        pivots: list[torch.Tensor],
        indices: Sequence[int],
        on_step: Callable[[int, dict[str, Any]], None] | None = None,
        on_stage: Callable[[int, str, InversionResult], None] | None = None,
        **shared: Any,
    ) -> None:
        """3. Pivotal tuning: G tuned so that G(pivot) becomes each result's target, the pivots kept. By
        ``tune_mode``: ``each``, every image its own copy (``pivotal_tune``; several at once ``pivotal_tune_many``,
        equal within float rounding); ``shared``, ONE copy for all (PTI's multi-ID mode, ``pivotal_tune_shared``;
        ``shared``: its keyword arguments, e.g. ``resume``). ``timings["tune"]`` is the tuning's time per image."""
        cfg = self.config
        t0, _ = self._start_stage("tune", indices[0])
        seeds = [stage_seed(cfg.seed, i, "tune") for i in indices]
        xs = [r.target.to(self.device) for r in results]

        def hook(k: int, rec: dict[str, Any]) -> None:
            _record(results[k], _bind(on_step, k), rec)

        if cfg.tune_mode == "shared":
            s = pivotal_tune_shared(self.G, pivots, xs, self.nets, cfg.tune, seeds, on_step, **shared)
            tuned = [TuneResult(s.generator, recs, s.rounds, False) for recs in s.losses]
            for res, recs in zip(results, s.losses):  # all of its steps, also those before a resume
                res.losses.extend(recs)
        elif len(results) == 1:
            tuned = [pivotal_tune(self.G, pivots[0], xs[0], self.nets, cfg.tune, seeds[0], lambda r: hook(0, r))]
        else:
            tuned = pivotal_tune_many(self.G, pivots, xs, self.nets, cfg.tune, seeds, hook)
        _sync(self.device)
        per_image = (time.perf_counter() - t0) / len(results)
        for k, (res, t, x) in enumerate(zip(results, tuned, xs)):
            res.generator = t.generator
            res.tune = {"updates": t.updates, "stopped_early": t.stopped_early,
                        "pivot_stage": [s for s in res.pivots][-1]}  # fmt: skip
            if cfg.tune_mode == "shared":
                res.tune["shared"] = {"images": len(results), "rounds": t.updates, "updates": t.updates * len(results)}
            elif len(results) > 1:
                res.tune["batch"] = len(results)
            self._finish_stage("tune", time.perf_counter() - per_image, pivots[k], t.generator, x, res,
                               _bind(on_stage, k))  # fmt: skip

    def _pivot_stages(
        self,
        x: torch.Tensor,
        index: int,
        res: InversionResult,
        on_step: Callable[[dict[str, Any]], None] | None,
        on_stage: Callable[[str, InversionResult], None] | None,
    ) -> torch.Tensor | None:
        """The stages before tuning on one image (its target ``x``): the last one's pivot."""
        cfg = self.config
        pivot: torch.Tensor | None = None

        def step_hook(rec: dict[str, Any]) -> None:
            _record(res, on_step, rec)

        # 1. The encoder's pivot: w = E(x).
        if "encoder" in cfg.stages:
            t0, _ = self._start_stage("encoder", index)
            assert self.E is not None
            pivot = encoder_pivot(self.E, x, cfg.offsets)
            self._finish_stage("encoder", t0, pivot, self.G, x, res, on_stage)
        # 2. Regularized refinement: the encoder tuned on this target, kept near its training images; its pivot.
        if "refine" in cfg.stages:
            t0, seed = self._start_stage("refine", index)
            assert self.refiner is not None
            r = self.refiner.refine(x, seed, step_hook)
            pivot = r.pivot
            res.refine = {"target_l_s_first": r.first_target_loss, "target_l_s": r.target_loss,
                          "steps": cfg.refine.steps, "updates": max(0, cfg.refine.steps - 1)}  # fmt: skip
            self._finish_stage("refine", t0, pivot, self.G, x, res, on_stage)
        # (The baseline's pivot instead: PTI's projection into W, no encoder.)
        if "project" in cfg.stages:
            t0, seed = self._start_stage("project", index)
            pivot = project_w(self.G, x, self.project_nets, cfg.project, seed, step_hook).pivot
            self._finish_stage("project", t0, pivot, self.G, x, res, on_stage)
        return pivot

    def _start_stage(self, stage: str, index: int) -> tuple[float, int]:
        """The stage's start time (after the device's queued work) and the seed of its random draws."""
        _sync(self.device)
        return time.perf_counter(), stage_seed(self.config.seed, index, stage)

    def _finish_stage(
        self,
        stage: str,
        t0: float,
        pivot: torch.Tensor,
        G: Generator,
        x: torch.Tensor,
        res: InversionResult,
        on_stage: Callable[[str, InversionResult], None] | None,
    ) -> None:
        """After each stage: render G(pivot), time the stage, record its pivot, reconstruction and metrics."""
        y = render(G, pivot)
        _sync(self.device)
        res.timings[stage] = time.perf_counter() - t0
        if stage in PIVOT_STAGES:
            res.pivots[stage] = pivot.detach().cpu()
        res.recons[stage] = y.cpu()
        res.metrics[stage] = self._stage_metrics(y, x)
        if on_stage is not None:
            on_stage(stage, res)

    # -- a folder ----------------------------------------------------------------------------------------------------
    def run(
        self,
        images: str | Path | Sequence[str | Path],
        out_dir: str | Path,
        recursive: bool = False,
        log: Callable[[str], None] | None = None,
        verbose: bool | str = True,
        debug: bool = False,
        speed: str | Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Invert an image file, a folder's images or a list of files into ``out_dir`` (see ``run_folder.py``).

        ``log`` receives the progress lines (default: stderr): one per image and stage when ``verbose`` is True,
        one per finished image (its last stage's result) when it is ``"images"``, and one for each image that fails
        whatever ``verbose`` says. ``speed``: None runs the options as configured in this process; ``"exact"`` the
        authors' loop; a mapping of the speed options the user fixed (``{}``: all chosen) lets ``speed.plan_speed``
        choose the rest for these images, which may start worker processes; the plan is logged and recorded in
        ``config.json``. Returns the summary (also in ``out_dir/summary.json``, by rank 0): ``done`` (this run),
        ``skipped`` (finished before), ``failed`` (name, file, reason), ``busy`` (left to another process inverting
        them into the same folder), per-stage means. ``tune_mode`` shared: ``tune_shared.invert_shared``."""
        say, warn, per_image = line_sinks(verbose, log)
        out = Path(out_dir)
        files, names = list_targets(images, recursive)
        if self.config.tune_mode == "shared" and "tune" in self.config.stages:
            return invert_shared(self, out, images, files, names, say, warn, debug)
        info = self.dist
        prefix = f"[rank {info.rank}] " if info.enabled else ""
        plan: dict[str, Any] = {}
        if info.is_main:
            try:
                states = [image_state(out, n, f) for n, f in zip(names, files)]
                pending = [i for i, s in enumerate(states) if s != "done"]
                if speed is not None:
                    plan["speed"] = to_dict(self._plan_speed(speed, len(pending), out))
                    self._apply_speed(SpeedPlan(**plan["speed"]))
                prepare_run_dir(self, out, images)
                plan.update(pending=pending, changed=[names[i] for i, s in enumerate(states) if s == "changed"])
            except (CycleEncodingError, ValueError) as e:
                plan = {"error": str(e)}
        plan = dd.broadcast_object(plan, info)
        if "error" in plan:
            raise CycleEncodingError(plan["error"])
        if "speed" in plan and not info.is_main:
            self._apply_speed(SpeedPlan(**plan["speed"]))
        pending = plan["pending"]
        skipped = [names[i] for i in range(len(names)) if i not in set(pending)]
        mine = pending[info.rank :: info.world_size]
        if info.is_main:
            if skipped:
                say(f"{len(skipped)} of {len(names)} image(s) already done in {out}: skipped")
            if self.speed is not None:
                warn(self.speed.line())
            for n in plan["changed"]:
                warn(f"{n}: the input file changed since it was inverted: inverting it again")
        procs = []
        # the refinement's substitute optimizer state (minutes at 256 px) estimated once, read by the workers
        shared = out / f".substitute-{os.getpid()}.pt"
        if self.speed is not None and self.speed.workers > 1 and len(mine) > 1 and self._rebuild:
            task = {**self._rebuild, "options": to_dict(self.config), "images": [str(f) for f in files],
                    "names": names, "todo": mine, "out": str(out), "verbose": verbose, "debug": debug,
                    "max_pixels": max_pixels()}  # fmt: skip
            state = self.refiner.substitute_state() if self.refiner is not None else None
            if state is not None:
                torch.save(state, shared)
                task["substitute"] = str(shared)
            procs = start_workers(task, self.speed.workers - 1, self.speed.threads or 1)
        try:
            own = fill_folder(self, out, files, names, mine, prefix, say, warn, per_image, debug, bool(procs))
            others = finish_workers(procs, warn)
        except BaseException:
            stop_workers(procs)
            raise
        finally:
            shared.unlink(missing_ok=True)
        own = merge_records(own, others)
        ranks = [*dd.gather_objects({"rank": info.rank, **own}, info), *others]
        summary: dict[str, Any] = {}
        if info.is_main:
            summary = write_summary(self, out, names, skipped, ranks)
        summary = dd.broadcast_object(summary, info)
        return summary

    def _plan_speed(self, speed: str | Mapping[str, Any], images: int, out: Path) -> SpeedPlan:
        """The speed plan for ``images`` images into ``out`` (``"exact"``, or chosen around the options given)."""
        alone = "under torchrun" if self.dist.enabled else None if self._rebuild else "networks given as objects"
        return plan_speed(images, self.G.resolution, self.device, self.config.tune.precision,
                          given=None if speed == "exact" else dict(speed), exact=speed == "exact",
                          single_process=alone, resumed=recorded_options(out), held=resident_memory())  # fmt: skip

    def _apply_speed(self, plan: SpeedPlan) -> None:
        """Use ``plan``: its batched pass, tuning batch and compiling in the options, its threads in this process."""
        self.config = make_config(self.config, tune_batch=plan.tune_batch,
                                  tune={"batch_passes": plan.batch_passes, "compile": plan.compile},
                                  refine={"compile": plan.compile})  # fmt: skip
        if self.refiner is not None:
            self.refiner.use_compile(plan.compile)
        if plan.threads:
            torch.set_num_threads(plan.threads)
        self.speed = plan

    def close(self) -> None:
        """Leave the process group (under torchrun)."""
        dd.shutdown(self.dist)


def _bind(fn: Callable[..., None] | None, k: int) -> Callable[..., None] | None:
    """A per-image callback ``fn(k, ...)`` as the one-image callback ``(...)``."""
    return None if fn is None else (lambda *a: fn(k, *a))


def _record(res: InversionResult, on_step: Callable[[dict[str, Any]], None] | None, rec: dict[str, Any]) -> None:
    res.losses.append(rec)
    if on_step is not None:
        on_step(rec)
