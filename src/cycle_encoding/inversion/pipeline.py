"""The inversion pipeline: stages chosen by name, over one image or a folder, resumable, splittable by ``torchrun``.

Stages (run in this order, each optional):
- ``encoder``: pivot = E(x), eval mode (``pivot.py``);
- ``refine``: the regularized refinement of the encoder per target (``refine.py``);
- ``project``: PTI's W projector, the baseline pivot (``project.py``); needs no encoder;
- ``tune``: pivotal tuning of G from the pivot of the last pivot stage before it (``tune.py``).

A run folder ``RUN_DIR``::

    config.json                 resolved options, generator / encoder files and weight hashes, loss networks' names
    summary.json                what was done, skipped and failed; per stage: seconds per image, MSE, PSNR, perceptual
    images/<name>/
        target.png              the target as inverted (centre-cropped, resized to G's resolution)
        pivots.safetensors      the [N, w_dim] code after each stage (own format, kind "pivots"; ``tune`` keeps
                                the pivot of the stage before it)
        recon_<stage>.png       G(pivot) after each stage (the tuned G after ``tune``)
        losses.jsonl            one line per optimization step of every stage
        timings.json            seconds per stage
        generator_delta.safetensors   the tuned G as its change from the base (``delta.py``)
        result.json             metrics per stage, tuning steps, delta size, sha256 of each reconstruction's float32
                                tensor (rebuild base + delta, render the pivot: the same hash, bit for bit)
        done                    written last: the image is finished

Every file is written atomically (temporary file, then rename), so a killed run leaves no half-written file; a re-run
with the same options skips images that have ``done``, removes stray temporary files and redoes the rest. Each
image's random draws are seeded by (seed, the image's index in the sorted list, stage), so results do not depend on
interruptions, order, or which process ran the image. A re-run with other options into the same folder is refused.

Under ``torchrun`` (WORLD_SIZE > 1) rank 0 lists the images still to do, rank r takes every world_size-th of them from
position r, and rank 0 gathers what each rank did into one ``summary.json``. Ranks share nothing else, so they may be
on different machines with a shared ``RUN_DIR``.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..checkpoints.common import atomic_write
from ..checkpoints.native import default_provenance, save_native
from ..config import from_mapping, to_dict
from ..errors import CycleEncodingError
from ..networks.encoder import Encoder4Editing
from ..networks.stylegan2 import Generator
from ..utils import resolve_device, save_image
from .common import build_loss_networks, check_target, render, stage_seed
from .delta import full_copy_bytes, save_generator_delta, weights_sha256
from .pivot import OFFSETS, encoder_pivot, resolve_stage
from .project import ProjectConfig, project_w
from .refine import EncoderSource, RefineConfig, RegularizedRefiner, load_encoder_source, open_training_images
from .tune import TuneConfig, pivotal_tune

STAGES = ("encoder", "refine", "project", "tune")
PIVOT_STAGES = ("encoder", "refine", "project")
RUN_FORMAT = "cycle-encoding-inversion-run"
RUN_VERSION = 1
# options that may differ between the runs that fill one folder (they do not change any result)
VOLATILE_OPTIONS = ("device",)


@dataclass(frozen=True)
class InversionConfig:
    """Everything that decides an inversion's result (defaults: the paper's "Method 2" with PTI's tuning)."""

    stages: tuple[str, ...] = ("encoder", "refine", "tune")
    offsets: str = "all"  # encoder offsets: "all" (the authors' inference) or "trained" (the stage training ended in)
    perceptual: str = "lpips-alex"
    lpips_backbone: str | None = None
    identity: str = "none"
    identity_weights: str | None = None
    train_data: str | None = None  # the encoder's training images (default: what the encoder file records)
    seed: int = 0
    save_delta: bool = True
    delta_level: int = 1  # zlib level of the stored generator change (1: fast; 9 gains ~2%)
    refine: RefineConfig = field(default_factory=RefineConfig)
    project: ProjectConfig = field(default_factory=ProjectConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        stages = tuple(self.stages)
        if not stages:
            raise ValueError("no stages given (choose from encoder, refine, project, tune)")
        unknown = [s for s in stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stage(s) {', '.join(unknown)} (known: {', '.join(STAGES)})")
        if len(set(stages)) != len(stages):
            raise ValueError(f"a stage is listed twice: {', '.join(stages)}")
        if list(stages) != sorted(stages, key=STAGES.index):
            raise ValueError(f"stages run in the order {', '.join(STAGES)}; got {', '.join(stages)}")
        if "tune" in stages and not any(s in PIVOT_STAGES for s in stages):
            raise ValueError("stage 'tune' needs a pivot: list encoder, refine or project before it")
        if self.offsets not in OFFSETS:
            raise ValueError(f"offsets must be one of {', '.join(OFFSETS)}, got {self.offsets!r}")
        if not 0 <= self.delta_level <= 9:
            raise ValueError("delta_level is a zlib level, 0-9")
        object.__setattr__(self, "stages", stages)

    @property
    def needs_encoder(self) -> bool:
        return "encoder" in self.stages or "refine" in self.stages

    @property
    def needs_perceptual(self) -> bool:
        s = self.stages
        return (
            ("refine" in s and self.refine.perceptual_lambda > 0)
            or ("project" in s and self.project.perceptual_lambda > 0)
            or "tune" in s
        )

    @property
    def needs_identity(self) -> bool:
        return "refine" in self.stages and self.refine.identity_lambda > 0


def make_config(config: InversionConfig | Mapping[str, Any] | None = None, **overrides: Any) -> InversionConfig:
    """An InversionConfig from a config, a mapping (e.g. a YAML file's) and/or keyword overrides (nested as dicts)."""
    if isinstance(config, InversionConfig):
        data = to_dict(config)
    else:
        data = dict(config or {})
    for k, v in overrides.items():
        if isinstance(v, Mapping) and isinstance(data.get(k), Mapping):
            data[k] = {**data[k], **v}
        else:
            data[k] = v
    return from_mapping(InversionConfig, data, "inversion options")


@dataclass
class InversionResult:
    """One image's inversion. Tensors are on the CPU; ``generator`` is the tuned G (None without ``tune``)."""

    name: str
    target: torch.Tensor  # [1, C, R, R]
    pivots: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [1, N, w_dim]
    recons: dict[str, torch.Tensor] = field(default_factory=dict)  # stage -> [1, C, R, R]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    losses: list[dict[str, Any]] = field(default_factory=list)
    generator: Generator | None = None
    tune: dict[str, Any] | None = None
    refine: dict[str, Any] | None = None

    @property
    def pivot(self) -> torch.Tensor:
        """The pivot of the last pivot stage."""
        return self.pivots[[s for s in self.pivots][-1]]


def tensor_sha256(t: torch.Tensor) -> str:
    v = t.detach().to("cpu").float().contiguous()
    return hashlib.sha256(v.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class Inverter:
    """Inverts images into a generator: ``Inverter(G, E, stages=("encoder", "refine", "tune")).invert(image)``.

    ``generator`` / ``encoder``: networks or files (any format the project reads; for ``refine`` a ``train-encoder``
    ``checkpoint.pt`` also gives the optimizer state and the training images). ``config`` (an InversionConfig or a
    mapping) and keyword ``options`` set the method's options (e.g. ``stages=("encoder", "tune")``,
    ``tune={"steps": 100}``). ``perceptual_net`` / ``identity_net``: networks to use instead of those named in the
    options; ``train_images``: the encoder's training images as a dataset (instead of a folder
    or dataset name). Under ``torchrun`` the constructor joins the process group.
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
        progress: bool = False,
        **options: Any,
    ) -> None:
        from ..checkpoints.generator import load_generator
        from ..training import distributed as dd

        self.config = make_config(config, **options)
        cfg = self.config
        if device is None:
            device = generator.w_avg.device if isinstance(generator, Generator) else "auto"
        base = resolve_device(device)
        self.dist = dd.init_distributed(base)
        self.device = dd.rank_device(base, self.dist)
        self.progress = progress

        if isinstance(generator, Generator):
            self.G = generator.to(self.device).eval().requires_grad_(False)
            self.generator_file: str | None = None
        else:
            self.G = load_generator(generator, device=self.device)
            self.generator_file = str(generator)
        self.g_sha256 = weights_sha256(self.G)

        self.source: EncoderSource | None = None
        self.E: Encoder4Editing | None = None
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

        self.nets = build_loss_networks(
            cfg.perceptual, cfg.lpips_backbone, cfg.identity, cfg.identity_weights, self.device,
            need_perceptual=cfg.needs_perceptual and perceptual_net is None,
            need_identity=cfg.needs_identity and identity_net is None,
        )  # fmt: skip
        if perceptual_net is not None:
            self.nets.perceptual = perceptual_net.to(self.device).eval().requires_grad_(False)
        if identity_net is not None:
            self.nets.identity = identity_net.to(self.device).eval().requires_grad_(False)
        if "project" in cfg.stages and self.nets.perceptual is None and cfg.project.l2_lambda <= 0:
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
                train_images = _open_training_images(spec, size, self.G.img_channels, self.source.path)
            self.train_data_name = getattr(train_images, "name", "training images")
            self.refiner = RegularizedRefiner(
                self.G, self.E, train_images, cfg.refine, self.nets,
                optimizer_state=self.source.optimizer_state,
                optimizer_settings=self.source.optimizer_settings,
                image_size=size,
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
        }
        if "tune" in self.config.stages:
            thr = self.config.tune.stop_threshold
            out["tune"] = {
                "early_stop": "off" if thr is None else (
                    f"perceptual <= {thr}" if self.nets.perceptual is not None else "off (no perceptual distance)"
                ),
                "locality": self.config.tune.locality,
            }  # fmt: skip
        if self.refiner is not None:
            out["refine"] = {
                "train_images": self.train_data_name,
                "image_size": self.refiner.image_size,
                "lr": self.refiner.lr,
                "optimizer_state": "from the encoder file" if self.refiner.has_optimizer_state else "fresh Ranger",
            }
        return out

    # -- one image -------------------------------------------------------------------------------------------------
    def load_image(self, image: torch.Tensor | str | Path) -> torch.Tensor:
        """A target as ``[1, C, R, R]`` on the device, from a tensor in [-1, 1] or an image file."""
        if isinstance(image, (str, Path)):
            from ..data.images import read_image

            image = read_image(image)
        return check_target(self.G, image)

    def _stage_metrics(self, y: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
        from ..metrics import mse, psnr

        with torch.no_grad():
            m = {"mse": float(mse(y, x)[0]), "psnr": float(psnr(y, x)[0])}
            if self.nets.perceptual is not None:
                m["perceptual"] = float(self.nets.perceptual(y, x).reshape(-1)[0])
        return m

    def invert(
        self,
        image: torch.Tensor | str | Path,
        index: int = 0,
        name: str | None = None,
        on_step: Callable[[dict[str, Any]], None] | None = None,
        on_stage: Callable[[str, InversionResult], None] | None = None,
    ) -> InversionResult:
        """Run the configured stages on one image. ``index`` seeds the image's random draws (its position in a run).

        ``on_step(record)`` sees each optimization step's losses; ``on_stage(stage, result)`` each finished stage.
        """
        cfg = self.config
        if name is None:
            name = Path(image).stem if isinstance(image, (str, Path)) else f"image{index}"
        x = self.load_image(image)
        res = InversionResult(name=name, target=x.cpu())
        pivot: torch.Tensor | None = None

        def step_hook(rec: dict[str, Any]) -> None:
            res.losses.append(rec)
            if on_step is not None:
                on_step(rec)

        for stage in cfg.stages:
            _sync(self.device)
            t0 = time.perf_counter()
            seed = stage_seed(cfg.seed, index, stage)
            G_render = self.G
            if stage == "encoder":
                assert self.E is not None
                pivot = encoder_pivot(self.E, x, cfg.offsets)
            elif stage == "refine":
                assert self.refiner is not None
                r = self.refiner.refine(x, seed, step_hook)
                pivot = r.pivot
                res.refine = {"target_l_s_first": r.first_target_loss, "target_l_s": r.target_loss,
                              "steps": cfg.refine.steps, "updates": max(0, cfg.refine.steps - 1)}  # fmt: skip
            elif stage == "project":
                pivot = project_w(self.G, x, self.nets, cfg.project, seed, step_hook).pivot
            elif stage == "tune":
                assert pivot is not None
                t = pivotal_tune(self.G, pivot, x, self.nets, cfg.tune, seed, step_hook)
                G_render = res.generator = t.generator
                res.tune = {"updates": t.updates, "stopped_early": t.stopped_early,
                            "pivot_stage": [s for s in res.pivots][-1]}  # fmt: skip
            assert pivot is not None
            y = render(G_render, pivot)
            _sync(self.device)
            res.timings[stage] = time.perf_counter() - t0
            if stage in PIVOT_STAGES:
                res.pivots[stage] = pivot.detach().cpu()
            res.recons[stage] = y.cpu()
            res.metrics[stage] = self._stage_metrics(y, x)
            if on_stage is not None:
                on_stage(stage, res)
        return res

    # -- a folder ----------------------------------------------------------------------------------------------------
    def run(
        self,
        images: str | Path | Sequence[str | Path],
        out_dir: str | Path,
        recursive: bool = False,
        log: Callable[[str], None] | None = None,
        verbose: bool = True,
        debug: bool = False,
    ) -> dict[str, Any]:
        """Invert an image file, a folder's images or a list of files into ``out_dir`` (see the module doc).

        ``log`` receives the progress lines (default: stderr): one per image and stage when ``verbose``, and one
        for each image that fails whatever ``verbose`` says. Returns the summary (also written to
        ``out_dir/summary.json`` by rank 0): ``done`` (this run), ``skipped`` (finished before), ``failed`` (name,
        file, reason), per-stage means.
        """
        from ..training import distributed as dd

        warn = log or (lambda s: print(s, file=sys.stderr, flush=True))
        say = warn if verbose else (lambda s: None)
        out = Path(out_dir)
        files, names = list_targets(images, recursive)
        info = self.dist
        prefix = f"[rank {info.rank}] " if info.enabled else ""
        plan: dict[str, Any] = {}
        if info.is_main:
            try:
                self._prepare_run_dir(out, images)
                pending = [i for i, n in enumerate(names) if not (out / "images" / n / "done").is_file()]
                plan = {"pending": pending}
            except CycleEncodingError as e:
                plan = {"error": str(e)}
        plan = dd.broadcast_object(plan, info)
        if "error" in plan:
            raise CycleEncodingError(plan["error"])
        pending = plan["pending"]
        skipped = [names[i] for i in range(len(names)) if i not in set(pending)]
        mine = pending[info.rank :: info.world_size]
        if info.is_main and skipped:
            say(f"{len(skipped)} of {len(names)} image(s) already done in {out}: skipped")
        done: list[str] = []
        failed: list[dict[str, str]] = []
        for k, i in enumerate(mine):
            head = f"{prefix}[{k + 1}/{len(mine)}] {names[i]}"
            try:
                self._run_one(files[i], names[i], i, out / "images" / names[i], head, say)
                done.append(names[i])
            except Exception as e:  # one bad image must not stop the batch
                if debug:
                    traceback.print_exc()
                reason = str(e) if isinstance(e, CycleEncodingError) else f"{type(e).__name__}: {e}"
                failed.append({"name": names[i], "file": str(files[i]), "reason": reason})
                warn(f"{head}: FAILED: {reason}")
        ranks = dd.gather_objects({"rank": info.rank, "done": done, "failed": failed}, info)
        summary: dict[str, Any] = {}
        if info.is_main:
            summary = self._write_summary(out, names, skipped, ranks)
        summary = dd.broadcast_object(summary, info)
        return summary

    def _fingerprint(self, desc: dict[str, Any]) -> dict[str, Any]:
        opts = {k: v for k, v in desc["options"].items() if k not in VOLATILE_OPTIONS}
        enc = desc["encoder"]["weights_sha256"] if desc.get("encoder") else None
        return {"options": opts, "generator": desc["generator"]["weights_sha256"], "encoder": enc,
                "networks": desc["networks"]}  # fmt: skip

    def _prepare_run_dir(self, out: Path, images: Any) -> None:
        desc = self.describe()
        cfg_path = out / "config.json"
        if cfg_path.is_file():
            try:
                old = json.loads(cfg_path.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise CycleEncodingError(f"{cfg_path}: unreadable ({e}); use another --out") from None
            if old.get("format") != RUN_FORMAT:
                raise CycleEncodingError(f"{out}: not an inversion run folder (config.json of another kind)")
            a, b = self._fingerprint(old), self._fingerprint(desc)
            if a != b:
                diff = _differences(a, b)
                raise CycleEncodingError(
                    f"{out} holds a run with other options or networks (differs in: {', '.join(diff[:6])}): "
                    "re-run with the same ones, or use another --out"
                )
        else:
            out.mkdir(parents=True, exist_ok=True)
            doc = {
                "format": RUN_FORMAT,
                "version": RUN_VERSION,
                "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
                "command": " ".join(sys.argv),
                "images": [str(p) for p in images] if isinstance(images, (list, tuple)) else str(images),
                "world_size": self.dist.world_size,
                **desc,
            }
            atomic_write(cfg_path, lambda t: t.write_text(json.dumps(doc, indent=2) + "\n"))
        for stray in out.glob(".*.tmp"):
            stray.unlink(missing_ok=True)
        (out / "images").mkdir(exist_ok=True)

    def _run_one(self, file: Path, name: str, index: int, folder: Path, head: str, say: Callable[[str], None]) -> None:
        cfg = self.config
        x = self.load_image(file)  # an unreadable image fails here, before its folder exists
        folder.mkdir(parents=True, exist_ok=True)
        for stray in folder.glob(".*.tmp"):  # left by a run killed while writing
            stray.unlink(missing_ok=True)
        t_start = time.perf_counter()
        bar = _StepBar(self.progress, head)
        lines: list[str] = []
        target_written = False

        def on_stage(stage: str, res: InversionResult) -> None:
            nonlocal target_written
            bar.close()
            if not target_written:
                save_image(res.target[0], folder / "target.png")
                target_written = True
            if stage in PIVOT_STAGES or stage == "tune":
                piv = {s: p[0] for s, p in res.pivots.items()}
                if stage == "tune" and res.tune is not None:  # tuning keeps its pivot: recorded for completeness
                    piv["tune"] = piv[res.tune["pivot_stage"]]
                save_native(folder / "pivots.safetensors", "pivots",
                            {"num_ws": self.G.num_ws, "w_dim": self.G.w_dim, "stages": list(piv)}, piv,
                            default_provenance(made_by="cycle-encoding invert", image=name))  # fmt: skip
            save_image(res.recons[stage][0], folder / f"recon_{stage}.png")
            text = "".join(json.dumps(r) + "\n" for r in res.losses)
            atomic_write(folder / "losses.jsonl", lambda t: t.write_text(text))
            m = res.metrics[stage]
            extra = ""
            if stage == "tune" and res.tune is not None:
                extra = f", {res.tune['updates']} steps" + (" (early stop)" if res.tune["stopped_early"] else "")
            if stage == "refine" and res.refine is not None:
                extra = f", target L_S {res.refine['target_l_s_first']:.4f} -> {res.refine['target_l_s']:.4f}"
            lines.append(f"{stage} mse {m['mse']:.4f}" + (f" perc {m['perceptual']:.4f}" if "perceptual" in m else "")
                         + f"{extra} ({res.timings[stage]:.1f} s)")  # fmt: skip
            say(f"{head}: {lines[-1]}")

        res = self.invert(x, index=index, name=name, on_step=bar.step, on_stage=on_stage)
        bar.close()
        record: dict[str, Any] = {
            "name": name,
            "file": str(file),
            "index": index,
            "rank": self.dist.rank,
            "stages": list(cfg.stages),
            "metrics": res.metrics,
            "recon_sha256": {s: tensor_sha256(y) for s, y in res.recons.items()},
            "networks": self.network_names(),
            "device": str(self.device),
        }
        if res.refine is not None:
            record["refine"] = res.refine
        if res.tune is not None:
            record["tune"] = res.tune
        if res.generator is not None and cfg.save_delta:
            t0 = time.perf_counter()
            d = save_generator_delta(
                self.G, res.generator, folder / "generator_delta.safetensors",
                base_file=Path(self.generator_file).name if self.generator_file else None,
                provenance=default_provenance(made_by="cycle-encoding invert", image=name),
                extra={"image": name, "pivot_stage": res.tune["pivot_stage"] if res.tune else None},
                level=cfg.delta_level, base_sha256=self.g_sha256,
            )  # fmt: skip
            res.timings["save_delta"] = time.perf_counter() - t0
            record["delta"] = {"file_bytes": d.file_bytes, "full_copy_bytes": d.full_copy_bytes,
                               "ratio": round(d.ratio, 4), "changed_tensors": d.changed,
                               "tuned_weights_sha256": d.tuned_sha256}  # fmt: skip
        res.timings["total"] = time.perf_counter() - t_start
        record["timings"] = res.timings
        atomic_write(folder / "timings.json", lambda t: t.write_text(json.dumps(res.timings, indent=2) + "\n"))
        atomic_write(folder / "result.json", lambda t: t.write_text(json.dumps(record, indent=2) + "\n"))
        stamp = json.dumps({"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(), "rank": self.dist.rank})
        atomic_write(folder / "done", lambda t: t.write_text(stamp + "\n"))

    def _write_summary(self, out: Path, names: list[str], skipped: list[str], ranks: list[dict]) -> dict[str, Any]:
        done = [n for r in ranks for n in r["done"]]
        failed = [f for r in ranks for f in r["failed"]]
        records = []
        for n in names:
            p = out / "images" / n / "result.json"
            if (out / "images" / n / "done").is_file() and p.is_file():
                records.append(json.loads(p.read_text()))
        per_stage: dict[str, dict[str, Any]] = {}
        for s in self.config.stages:
            rows = [r for r in records if s in r.get("metrics", {})]
            if not rows:
                continue
            entry: dict[str, Any] = {"images": len(rows)}
            entry["seconds_per_image"] = sum(r["timings"][s] for r in rows) / len(rows)
            for m in ("mse", "psnr", "perceptual"):
                vals = [r["metrics"][s][m] for r in rows if m in r["metrics"][s]]
                if vals:
                    entry[m] = sum(vals) / len(vals)
            per_stage[s] = entry
        deltas = [r["delta"] for r in records if "delta" in r]
        summary: dict[str, Any] = {
            "run_dir": str(out),
            "images": len(names),
            "finished": len(records),
            "complete": len(records) == len(names),
            "done": done,
            "skipped": skipped,
            "failed": failed,
            "stages": list(self.config.stages),
            "networks": self.network_names(),
            "world_size": self.dist.world_size,
            "ranks": ranks,
            "per_stage": per_stage,
        }
        if deltas:
            mean = sum(d["file_bytes"] for d in deltas) / len(deltas)
            full = deltas[0]["full_copy_bytes"]
            summary["generator_delta"] = {"mean_bytes_per_image": mean, "full_copy_bytes": full,
                                          "ratio": mean / max(1, full)}  # fmt: skip
        atomic_write(out / "summary.json", lambda t: t.write_text(json.dumps(summary, indent=2) + "\n"))
        return summary

    def close(self) -> None:
        """Leave the process group (under torchrun)."""
        from ..training import distributed as dd

        dd.shutdown(self.dist)


def _open_training_images(spec: str | None, size: int, channels: int, encoder_path: str | None) -> Any:
    """A folder without an in-memory cache (random draws over a large set must not fill the memory), or a name."""
    from ..data.datasets import ImageFolderDataset

    if spec and Path(spec).is_dir():
        return ImageFolderDataset(spec, size, channels, cache=False)
    return open_training_images(spec, size, channels, encoder_path)


def _differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += _differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "(all)"]


def list_targets(images: str | Path | Sequence[str | Path], recursive: bool = False) -> tuple[list[Path], list[str]]:
    """The image files to invert, sorted, and a folder name for each (its path under the folder without extension,
    ``/`` -> ``__``; with the extension too where two files would get one name)."""
    from ..data.images import is_image_file, list_images

    if isinstance(images, (str, Path)):
        p = Path(images)
        if p.is_dir():
            files = list_images(p, recursive=recursive)
            root = p
            if not files:
                raise CycleEncodingError(f"{p}: no image files found (png, jpg, ...)")
        elif p.is_file():
            if not is_image_file(p):
                raise CycleEncodingError(f"{p}: not an image file (by its extension)")
            files, root = [p], p.parent
        else:
            raise CycleEncodingError(f"{p}: no such file or folder")
        rel = [f.relative_to(root) for f in files]
    else:
        files = [Path(f) for f in images]
        rel = [Path(f.name) for f in files]
    stems = [str(r.with_suffix("")).replace(os.sep, "__") for r in rel]
    full = [str(r).replace(os.sep, "__") for r in rel]
    names = [s if stems.count(s) == 1 else f for s, f in zip(stems, full)]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise CycleEncodingError(f"two images would share the output name {dup[0]!r}")
    return files, names


class _StepBar:
    """A tqdm bar over a stage's steps (only when progress is shown)."""

    def __init__(self, enabled: bool, head: str) -> None:
        self.enabled = enabled
        self.head = head
        self.bar: Any = None
        self.stage: str | None = None

    def step(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if rec.get("stage") != self.stage:
            self.close()
            from tqdm import tqdm

            self.stage = rec.get("stage")
            self.bar = tqdm(desc=f"{self.head} {self.stage}", unit="step", leave=False, file=sys.stderr)
        self.bar.update(1)
        shown = {k: f"{rec[k]:.4f}" for k in ("loss", "perceptual", "target_l_s") if isinstance(rec.get(k), float)}
        if shown:
            self.bar.set_postfix(shown, refresh=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        self.bar = None
        self.stage = None
