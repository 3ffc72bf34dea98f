"""Training a StyleGAN2 generator for a small domain (Fashion-MNIST at 32x32 first), on CPU or GPU.
Design notes: docs/INTERNALS.md, "cycle_encoding.training.generator_trainer"."""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F

from .. import distributed as dd
from ..checkpoints.classifier import load_classifier
from ..checkpoints.generator import W_AVG_SAMPLES, save_generator
from ..checkpoints.native import default_provenance
from ..config import check_at_least, check_one_of, from_mapping
from ..data.datasets import EpochSampler, open_dataset
from ..errors import CycleEncodingError
from ..losses.adversarial import discriminator_loss, r1_penalty
from ..metrics import generator_sample_metrics
from ..networks.discriminator import Discriminator, DiscriminatorConfig
from ..networks.stylegan2 import Generator, GeneratorConfig
from ..ops import PRECISIONS, autocast, compile_pass
from ..utils import make_grid, save_image
from .plateau import check_rule, plateau_holds
from .runs import machine_info
from .trainer import Trainer, read_run_config

GREY_DATASETS = ("fashion-mnist",)
GENERATOR_PRECISION_NOTES = {
    "fp32": "float32 throughout",
    "bf16": "bfloat16 autocast for G (mapping and synthesis) and D, the R1 penalty's passes included; float32 "
    "weights, losses, Adam, g_ema and path-length penalty",
}


@dataclass(frozen=True)
class GeneratorArch:
    """The generator's width and mapping network (the resolution and channels come from the run)."""

    style_dim: int = 128
    n_mlp: int = 4
    channel_base: int = 2048  # channels at resolution r: min(channel_base // r, channel_max)
    channel_max: int = 128
    lr_mlp: float = 0.01


@dataclass(frozen=True)
class DiscriminatorArch:
    channel_base: int | None = None  # default: the generator's
    channel_max: int | None = None  # default: the generator's
    stddev_group: int = 4


@dataclass(frozen=True)
class GeneratorTrainConfig:
    data: str
    resolution: int = 32
    img_channels: int | None = None  # default: 1 for fashion-mnist, else 3
    out: str = "runs"
    name: str | None = None
    max_steps: int = 20_000
    batch_size: int = 32  # global, split over processes
    lr: float = 0.002
    betas: tuple[float, ...] = (0.0, 0.99)
    r1_gamma: float | None = None  # default: NVIDIA's heuristic 0.0002 * resolution^2 / batch_size
    r1_every: int = 16
    pl_weight: float = 0.0  # path-length regularization (rosinality's default when on: 2)
    pl_every: int = 4
    pl_batch_shrink: int = 2
    pl_decay: float = 0.01
    mixing_prob: float = 0.9
    ema_kimg: float = 10.0
    ema_rampup: float | None = None
    flip: bool = False
    generator: GeneratorArch = field(default_factory=GeneratorArch)
    discriminator: DiscriminatorArch = field(default_factory=DiscriminatorArch)
    sample_count: int = 64
    metric_every: int = 0  # classifier FD of g_ema every N steps and at the end (0: never)
    metric_samples: int = 10_000
    metric_classifier: str | None = None  # default: fmnist-eval for fashion-mnist (required for other data)
    metric_reference: str | None = None  # reference images; default: the data's test split (fashion-mnist:test)
    metric_patience: int = 0  # stop when this many evaluations in a row miss the best FD by the margin (0: never)
    metric_min_improvement: float = 0.02  # the margin: a relative improvement of the best FD that counts
    log_every: int = 50
    image_every: int = 1000
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: G and D under bfloat16 autocast
    compile: bool = False  # torch.compile G's synthesis and D for the D and G steps (not the regularizers)

    def __post_init__(self) -> None:
        check_at_least(self, batch_size=1, log_every=1, image_every=1, checkpoint_every=1, r1_every=1, pl_every=1)
        check_at_least(self, pl_batch_shrink=1, max_steps=0, ema_kimg=0, metric_every=0, metric_samples=2)
        check_one_of(self, precision=PRECISIONS)
        if len(self.betas) != 2:
            raise ValueError(f"betas must be two numbers, got {list(self.betas)}")
        if not 0 <= self.mixing_prob <= 1:
            raise ValueError(f"mixing_prob must be in [0, 1], got {self.mixing_prob}")
        check_rule(self.metric_patience, self.metric_min_improvement, "metric_")
        if self.metric_every and self.classifier_name is None:
            raise ValueError("metric_every needs metric_classifier (a classifier file of this domain)")
        self.generator_config()  # the architectures, built once so that a bad width is reported before anything runs
        self.discriminator_config()

    @property
    def classifier_name(self) -> str | None:
        """The metric's classifier: as given, or the shipped fmnist-eval for Fashion-MNIST."""
        if self.metric_classifier is not None:
            return self.metric_classifier
        return "fmnist-eval" if str(self.data).partition(":")[0] == "fashion-mnist" else None

    @property
    def reference_spec(self) -> str:
        """The metric's reference images: as given, or the data's test split for a registered dataset (else the data)."""
        if self.metric_reference is not None:
            return self.metric_reference
        name = str(self.data).partition(":")[0]
        return f"{name}:test" if name == "fashion-mnist" else str(self.data)

    @property
    def channels(self) -> int:
        if self.img_channels is not None:
            return self.img_channels
        return 1 if str(self.data).partition(":")[0] in GREY_DATASETS else 3

    @property
    def gamma(self) -> float:
        """The R1 weight: as given, or NVIDIA's small-data heuristic ``0.0002 * res^2 / batch``."""
        if self.r1_gamma is not None:
            return self.r1_gamma
        return 0.0002 * self.resolution**2 / self.batch_size

    def generator_config(self) -> GeneratorConfig:
        a = self.generator
        return GeneratorConfig(
            resolution=self.resolution, style_dim=a.style_dim, n_mlp=a.n_mlp, channel_base=a.channel_base,
            channel_max=a.channel_max, img_channels=self.channels, lr_mlp=a.lr_mlp,
        )  # fmt: skip

    def discriminator_config(self) -> DiscriminatorConfig:
        g, d = self.generator, self.discriminator
        return DiscriminatorConfig(
            resolution=self.resolution, channel_base=g.channel_base if d.channel_base is None else d.channel_base,
            channel_max=g.channel_max if d.channel_max is None else d.channel_max, img_channels=self.channels,
            stddev_group=d.stddev_group,
        )  # fmt: skip


def load_generator_train_config(data: dict[str, Any]) -> GeneratorTrainConfig:
    """A checked configuration from plain data (YAML/JSON options); unknown keys and bad types are one clear line."""
    return from_mapping(GeneratorTrainConfig, data, "train-generator options")


def lazy_ratio(every: int, active: bool = True) -> float:
    """StyleGAN2's correction for a regularizer applied every ``every`` steps: ``every / (every + 1)`` (1 if off)."""
    return every / (every + 1) if active else 1.0


def ema_beta(batch: int, ema_kimg: float, cur_nimg: int = 0, rampup: float | None = None) -> float:
    """``0.5 ** (batch / ema_nimg)``: the decay of g_ema for a half-life of ``ema_nimg = ema_kimg * 1000`` images,
    shortened to ``cur_nimg * rampup`` early in training when ``rampup`` is set (NVIDIA's ema_rampup)."""
    nimg = ema_kimg * 1000
    if rampup is not None:
        nimg = min(nimg, cur_nimg * rampup)
    if nimg <= 0:
        return 0.0
    return 0.5 ** (batch / nimg)


@torch.no_grad()
def accumulate(ema: torch.nn.Module, model: torch.nn.Module, beta: float) -> None:
    """``p_ema <- beta * p_ema + (1 - beta) * p`` for every parameter (the buffers are constant during training)."""
    for pe, p in zip(ema.parameters(), model.parameters()):
        pe.mul_(beta).add_(p.detach(), alpha=1 - beta)


class GeneratorTrainer(Trainer):
    """Builds G, D, g_ema, the optimizers and the data from a config (or a run folder to resume) and runs the loop
    (``trainer.Trainer``)."""

    desc = "train-generator"
    checkpoint_format = "cycle-encoding-train-generator"
    checkpoint_kind = "cycle-encoding train-generator"
    scalar_kinds = ("train", "metric")
    checkpoint_attrs = ("train_seconds", "mean_path_length", "metric_history")

    def __init__(
        self,
        cfg: GeneratorTrainConfig,
        resume: str | Path | None = None,
        quiet: bool = False,
        command: str | None = None,
    ) -> None:
        self._start(cfg, quiet)
        self.command = command if command is not None else " ".join(sys.argv)
        self.world = self.dist.world_size
        if cfg.batch_size % self.world:
            raise CycleEncodingError(f"batch size {cfg.batch_size} is not divisible by the {self.world} processes")
        self.local_batch = cfg.batch_size // self.world
        self.max_steps = cfg.max_steps
        self.gamma = cfg.gamma

        # data
        self.data = open_dataset(cfg.data, cfg.resolution, cfg.channels, "train")
        self.sampler = EpochSampler(self.data, cfg.batch_size, cfg.seed, cfg.flip, self.dist.rank, self.world)

        # networks: same initial weights on every rank (seeded, then broadcast from rank 0)
        torch.manual_seed(cfg.seed)
        self.G = Generator(cfg.generator_config()).to(self.device)
        self.D = Discriminator(cfg.discriminator_config()).to(self.device)
        dd.broadcast_module(self.G, self.dist)
        dd.broadcast_module(self.D, self.dist)
        self.g_ema = Generator(cfg.generator_config()).to(self.device)
        self.g_ema.load_state_dict(self.G.state_dict())
        self.g_ema.eval().requires_grad_(False)
        torch.manual_seed(cfg.seed + self.dist.rank)

        b1, b2 = cfg.betas
        self.pl_on = cfg.pl_weight > 0
        self.r1_on = self.gamma > 0
        g_ratio = lazy_ratio(cfg.pl_every, self.pl_on)
        d_ratio = lazy_ratio(cfg.r1_every, self.r1_on)
        self.opt_g = torch.optim.Adam(self.G.parameters(), lr=cfg.lr * g_ratio, betas=(b1**g_ratio, b2**g_ratio))
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.lr * d_ratio, betas=(b1**d_ratio, b2**d_ratio))
        self.gen = torch.Generator().manual_seed(cfg.seed * 104_729 + 1 + self.dist.rank)
        # the D and G steps' passes: compiled (--compile) or as they are; R1 and path length (double backward) use
        # the plain modules
        self._synthesis = compile_pass(self.G.synthesis, self.device) if cfg.compile else self.G.synthesis
        self._discriminator = compile_pass(self.D.forward, self.device) if cfg.compile else self.D
        if cfg.compile and self.dist.is_main and not quiet:
            print("--compile: the first steps compile G and D (a minute or two)", file=sys.stderr)
        self.mean_path_length = 0.0
        self.step = 0
        self.train_seconds = 0.0  # wall time spent in training steps, over all resumed parts
        self.metric_history: list[dict[str, Any]] = []  # (step, fd) of every evaluation, over resumed parts
        self._metric_inputs: tuple[Any, torch.Tensor] | None = None
        self._open_run(resume)

    # -- set-up -----------------------------------------------------------------------------------------
    def resolved(self) -> dict[str, Any]:
        """What the options resolve to (architectures, R1 weight, optimizer settings, data), for config.json."""
        cfg = self.cfg
        return {
            "img_channels": cfg.channels,
            "r1_gamma": self.gamma,
            "generator": self.G.config.to_dict(),
            "generator_channels": self.G.config.channels(),
            "discriminator": self.D.config.to_dict(),
            "generator_parameters": sum(p.numel() for p in self.G.parameters()),
            "discriminator_parameters": sum(p.numel() for p in self.D.parameters()),
            "opt_g": {"lr": self.opt_g.defaults["lr"], "betas": list(self.opt_g.defaults["betas"])},
            "opt_d": {"lr": self.opt_d.defaults["lr"], "betas": list(self.opt_d.defaults["betas"])},
            "ema_beta": ema_beta(cfg.batch_size, cfg.ema_kimg),
            "precision": GENERATOR_PRECISION_NOTES[cfg.precision],
            "compile": "torch.compile: G's synthesis and D in the D and G steps" if cfg.compile else "off",
            "world_size": self.world,
            "data": self.data.describe(),
            "train_images": len(self.data),
            "command": self.command,
            "machine": machine_info(self.device),
        }

    def run_label(self) -> str:
        data_label = str(self.cfg.data).partition(":")[0]
        data_label = Path(data_label).name if not data_label.startswith("fashion-mnist") else data_label
        return self.cfg.name or f"generator-{data_label}-{self.cfg.resolution}"

    # -- checkpoints ------------------------------------------------------------------------------------
    def stateful(self) -> dict[str, Any]:
        return {"generator": self.G, "g_ema": self.g_ema, "discriminator": self.D, "opt_g": self.opt_g,
                "opt_d": self.opt_d, "sampler": self.sampler}  # fmt: skip

    def network_configs(self) -> dict[str, dict[str, Any]]:
        return {"generator_config": self.G.config.to_dict(), "discriminator_config": self.D.config.to_dict()}

    # -- one step -----------------------------------------------------------------------------------------
    def _fake(self, batch: int, grad: bool, plain: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Fakes (float32) and their codes: in the run's precision and through the compiled pass if any, or
        (``plain``) in float32 through the module as it is (for a double backward)."""
        prec = "fp32" if plain else self.cfg.precision
        synthesis = self.G.synthesis if plain else self._synthesis
        with torch.set_grad_enabled(grad), autocast(self.device, prec):
            ws = self.G.sample_ws(batch, self.cfg.mixing_prob, generator=self.gen).float()
            noise = [n.to(self.device) for n in self.G.make_noise(batch, generator=self.gen, device="cpu")]
            return synthesis(ws, noise=noise).float(), ws

    def _d_step(self, real: torch.Tensor) -> dict[str, float]:
        G, D, opt = self.G, self.D, self.opt_d
        G.requires_grad_(False)
        D.requires_grad_(True)
        fake, _ = self._fake(real.shape[0], grad=False)
        loss, parts = discriminator_loss(self.discriminate, real, fake, scores=True)
        self.optimizer_step(opt, loss, D)
        logs = {"d_loss": float(loss.detach()), **parts}
        if self.r1_on and self.step % self.cfg.r1_every == 0:
            # the plain D (no double backward through a compiled graph), in the run's precision: in bf16 the
            # penalty is within 0.4% and its gradient within 2% of float32's (measured), the step 1.5x faster
            with autocast(real.device, self.cfg.precision):
                r1 = r1_penalty(lambda x: D(x).float(), real)
            self.optimizer_step(opt, self.gamma / 2 * r1 * self.cfg.r1_every, D)
            logs["r1"] = float(r1.detach())
        opt.zero_grad(set_to_none=True)
        return logs

    def _g_step(self) -> dict[str, float]:
        G, D, opt = self.G, self.D, self.opt_g
        G.requires_grad_(True)
        D.requires_grad_(False)
        fake, _ = self._fake(self.local_batch, grad=True)
        loss = F.softplus(-self.discriminate(fake)).mean()
        self.optimizer_step(opt, loss, G)
        logs = {"g_loss": float(loss.detach())}
        if self.pl_on and self.step % self.cfg.pl_every == 0:
            logs.update(self._path_length_step())
        opt.zero_grad(set_to_none=True)
        return logs

    def _path_length_step(self) -> dict[str, float]:
        cfg = self.cfg
        batch = max(1, self.local_batch // cfg.pl_batch_shrink)
        fake, ws = self._fake(batch, grad=True, plain=True)  # a double backward through G: float32, not compiled
        y = torch.randn(fake.shape, generator=self.gen).to(self.device) / math.sqrt(fake.shape[2] * fake.shape[3])
        (grad,) = torch.autograd.grad((fake * y).sum(), ws, create_graph=True)
        lengths = grad.pow(2).sum(2).mean(1).sqrt()
        target = self.mean_path_length + cfg.pl_decay * (lengths.mean() - self.mean_path_length)
        penalty = (lengths - target).pow(2).mean()
        self.optimizer_step(self.opt_g, cfg.pl_weight * cfg.pl_every * penalty, self.G)
        # one running mean for all ranks (the mean of the ranks' updated means)
        self.mean_path_length = dd.all_reduce_mean({"m": float(target.detach())}, self.dist)["m"]
        return {"path_penalty": float(penalty.detach()), "path_length": float(lengths.detach().mean())}

    def train_step(self) -> dict[str, float]:
        """One iteration (D step, lazy R1, G step, lazy path length, EMA); returns the losses (means over ranks)."""
        t0 = time.perf_counter()
        real = self.sampler.next_batch().to(self.device)
        logs = self._d_step(real)
        logs.update(self._g_step())
        cur_nimg = (self.step + 1) * self.cfg.batch_size
        beta = ema_beta(self.cfg.batch_size, self.cfg.ema_kimg, cur_nimg, self.cfg.ema_rampup)
        accumulate(self.g_ema, self.G, beta)
        logs = dd.all_reduce_mean(logs, self.dist)
        if self.pl_on:
            logs["mean_path_length"] = self.mean_path_length
        self.step += 1
        self.train_seconds += time.perf_counter() - t0
        return logs

    # -- pictures and export ------------------------------------------------------------------------------
    def sample_latents(self) -> torch.Tensor:
        """The fixed latents of the sample grids (seeded by the run's seed)."""
        g = torch.Generator().manual_seed(self.cfg.seed + 12_345)
        return torch.randn(self.cfg.sample_count, self.G.z_dim, generator=g)

    @torch.no_grad()
    def samples(self) -> torch.Tensor:
        """g_ema's images of the fixed latents (constant noise), ``[sample_count, C, H, W]`` on the CPU."""
        z = self.sample_latents().to(self.device)
        out = [self.g_ema(z[i : i + 64], noise_mode="const") for i in range(0, z.shape[0], 64)]
        return torch.cat(out).clamp(-1, 1).cpu()

    def save_grid(self) -> Path:
        grid = make_grid(self.samples(), value=1.0)
        path = save_image(grid, self.run_dir / "images" / f"fakes{self.step:07d}.png")
        self.log.add_image("fakes", (grid + 1) / 2, self.step)
        return path

    def save_reals(self, count: int = 64) -> Path:
        n = min(count, len(self.data))
        grid = make_grid(torch.stack([self.data.load(i) for i in range(n)]), value=1.0)
        return save_image(grid, self.run_dir / "images" / "reals.png")

    def provenance(self) -> dict[str, Any]:
        cfg = self.cfg
        return default_provenance(
            made_by="cycle-encoding train-generator",
            command=self.command,
            run=self.run_dir.name,
            data=self.data.describe(),
            step=self.step,
            kimg=self.step * cfg.batch_size / 1000,
            batch_size=cfg.batch_size,
            train_seconds=round(self.train_seconds, 1),
            world_size=self.world,
            machine=machine_info(self.device),
            network="g_ema",
            ema_kimg=cfg.ema_kimg,
            r1_gamma=self.gamma,
            pl_weight=cfg.pl_weight,
            mixing_prob=cfg.mixing_prob,
            seed=cfg.seed,
        )

    def export(self) -> Path | None:
        """Write g_ema (with ``w_avg`` = mean of mapping(z) over 10,000 samples) as ``generator.safetensors``."""
        if not self.dist.is_main:
            return None
        self.g_ema.compute_w_avg(W_AVG_SAMPLES)
        return save_generator(self.g_ema, self.run_dir / "generator.safetensors", self.provenance())

    # -- the loop's hooks ---------------------------------------------------------------------------------
    def digest_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.G, self.D, self.g_ema)

    def on_start(self) -> None:
        self._log({"kind": "start", "step": 0, "time": time.time(), "world_size": self.world,
                   "train_images": len(self.data), "data": self.data.describe(),
                   "generator": self.G.config.to_dict(), "r1_gamma": self.gamma,
                   "precision": self.cfg.precision, "compile": self.cfg.compile})  # fmt: skip
        self.save_reals()
        self.save_grid()

    def log_fields(self) -> dict[str, Any]:
        return {"kimg": self.step * self.cfg.batch_size / 1000}

    def postfix(self, logs: dict[str, Any]) -> dict[str, Any]:
        return {"d": f"{logs['d_loss']:.3f}", "g": f"{logs['g_loss']:.3f}"}

    def on_checkpoint(self) -> None:
        self.export()

    # -- the sample metric (classifier FD) and the plateau stop ----------------------------------------------
    def _metric_networks(self) -> tuple[Any, torch.Tensor]:
        if self._metric_inputs is None:
            cfg = self.cfg
            clf = load_classifier(str(cfg.classifier_name), self.device)
            ref = open_dataset(cfg.reference_spec, cfg.resolution, cfg.channels, "test")
            n = min(len(ref), cfg.metric_samples)
            images = torch.stack([ref.load(i) for i in range(n)])
            self._metric_inputs = (clf, images)
        return self._metric_inputs

    def evaluate(self) -> dict[str, Any]:
        """The classifier FD of g_ema's samples to the reference images now, with the samples' classes; logged as a
        ``metric`` record (its numbers also to TensorBoard)."""
        t0 = time.perf_counter()
        clf, ref = self._metric_networks()
        m = generator_sample_metrics(self.g_ema, clf, ref, self.cfg.metric_samples, seed=0)
        rec = {"kind": "metric", "step": self.step, "kimg": self.step * self.cfg.batch_size / 1000,
               "time": time.time(), "fd": m["fd"], "fd_name": m["name"], "reference": self.cfg.reference_spec,
               "reference_images": m["images_b"], "samples": m["samples"], "min_class_share": m["min_class_share"],
               "class_counts": m["class_counts"], "seconds": time.perf_counter() - t0}  # fmt: skip
        self._log(rec)
        self.metric_history.append({"step": self.step, "fd": m["fd"], "min_class_share": m["min_class_share"]})
        return rec

    def plateau_reached(self) -> bool:
        """True when the last ``metric_patience`` evaluations all missed the best earlier FD by less than the margin
        (a relative improvement of ``metric_min_improvement``): the rule of :mod:`.plateau`."""
        fds = [h["fd"] for h in self.metric_history]
        return plateau_holds(fds, self.cfg.metric_patience, self.cfg.metric_min_improvement)

    def after_log(self, last: bool) -> None:
        every = self.cfg.metric_every
        if not every or not (self.step % every == 0 or last):
            return
        if self.dist.is_main:
            rec = self.evaluate()
            shares = ", ".join(f"{k} {100 * v / rec['samples']:.1f}%" for k, v in rec["class_counts"].items())
            self.message(f"step {self.step}: FD {rec['fd']:.2f} ({shares})")
        stop = dd.all_reduce_mean({"stop": float(self.dist.is_main and self.plateau_reached())}, self.dist)["stop"]
        if stop > 0 and not last:
            self.request_stop(
                f"the FD has not improved by {100 * self.cfg.metric_min_improvement:g}% on its best for "
                f"{self.cfg.metric_patience} evaluations"
            )

    def end_fields(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}


def resume_generator_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> GeneratorTrainConfig:
    """The configuration a run was started with (``config.json``); only the ``allowed`` options may change."""
    allowed = ("max_steps", "log_every", "image_every", "checkpoint_every", "device", "metric_every",
               "metric_samples", "metric_patience", "metric_min_improvement")  # fmt: skip
    data = read_run_config(run_dir, "train-generator", overrides, allowed)
    data.setdefault("precision", "fp32")  # a run from before these options computed in float32, uncompiled:
    data.setdefault("compile", False)  # it keeps doing so
    return load_generator_train_config(data)
