"""Training the e4e encoder by a schedule (the cycle W -> W+ -> W of Cycle Encoding, or e4e's, or W only).
Design notes: docs/INTERNALS.md, "cycle_encoding.training.encoder_trainer"."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from .. import distributed as dd
from ..assets import resolve_model
from ..checkpoints import load_generator
from ..checkpoints.encoder import TRAINING_CHECKPOINT_FORMAT, init_encoder_weights, save_encoder
from ..checkpoints.native import default_provenance, file_sha256
from ..checkpoints.optimizer import companion_path, from_optimizer, save_optimizer_state
from ..config import check_at_least, check_one_of, from_mapping
from ..data.datasets import EpochSampler, SubsetDataset, open_dataset, split_holdout
from ..errors import CycleEncodingError
from ..losses.adversarial import (
    discriminator_loss,
    encoder_adversarial_loss,
    fake_codes_for_discriminator,
    lazy_r1_loss,
    r1_due,
    sample_real_codes,
)
from ..losses.delta import delta_loss
from ..losses.identity import identity_default
from ..losses.latent_pool import LatentPool
from ..losses.networks import LossNetworks, build_loss_networks
from ..networks.encoder import Encoder4Editing, EncoderConfig
from ..networks.latent_discriminator import LatentDiscriminator, LatentDiscriminatorConfig
from ..networks.stylegan2 import Generator
from ..ops import PRECISIONS, autocast, compile_pass, pool_to
from ..optim import Ranger
from ..utils import make_grid, read_json, save_image
from .plateau import check_rule, plateau_holds
from .schedule import Schedule, ScheduleState, get_schedule, save_schedule
from .trainer import Trainer, read_run_config

ENCODER_PRECISION_NOTES = {
    "fp32": "float32 throughout (the authors' computation)",
    "bf16": "bfloat16 autocast for the encoder, generator, loss networks and latent discriminator; float32 weights, "
    "codes, losses, Ranger/Adam and R1 penalty",
}


@dataclass(frozen=True)
class EncoderArch:
    """The encoder's shape (EncoderConfig without the parts that follow the generator)."""

    input_size: int | None = None  # default: the training image size
    widths: tuple[int, ...] = (64, 128, 256, 512)
    units: tuple[int, ...] = (3, 4, 14, 3)
    mode: Literal["ir", "ir_se"] = "ir_se"
    w_only: bool = False  # one head, stage 0 forever: the W-encoder baseline


@dataclass(frozen=True)
class EncoderTrainConfig:
    generator: str
    data: str
    out: str = "runs"
    name: str | None = None
    preset: str = "paper"
    schedule_file: str | None = None
    total_steps: int | None = None  # rescale the schedule to this many steps (same proportions)
    max_steps: int | None = None  # stop here (the schedule's step count otherwise)
    batch_size: int = 8
    lr: float = 1e-4
    betas: tuple[float, ...] = (0.95, 0.999)
    eps: float = 1e-5
    d_lr: float = 2e-5
    l2_lambda: float = 1.0
    perceptual: str = "auto"  # auto: the domain's distance (perceptual_choice), as invert takes the encoder's
    perceptual_lambda: float = 0.8
    lpips_backbone: str | None = None
    identity: str = "auto"  # auto: the domain's identity network (identity_default), none when there is none
    identity_lambda: float = 0.1
    identity_weights: str | None = None
    adversarial: bool = True
    d_fake_codes: Literal["absolute", "raw-offset"] = "absolute"  # raw-offset: the authors' D input (no w_avg)
    noise_mode: Literal["random", "const"] = "random"  # G's noise while training (authors: random)
    zero_grad: Literal["zero", "none"] = "zero"  # zero: PyTorch 1.6's zero_grad (authors'); none: set to None
    pool_size: int = 50
    r1_gamma: float = 10.0
    r1_every: int = 16
    image_size: int | None = None  # training images and G's pooled output; default min(G.resolution, 256)
    flip: bool = True
    val_data: str | None = None
    val_count: int = 16
    encoder: EncoderArch = field(default_factory=EncoderArch)
    encoder_init: str | None = None  # ArcFace IR-SE-50 (body) or an encoder checkpoint (all weights)
    log_every: int = 50
    image_every: int = 1000
    val_every: int = 1000
    val_patience: int = 0  # stop when this many validations of the final stage miss the best by the margin (0: never)
    val_min_improvement: float = 0.02  # the margin: a relative improvement of the best validation loss that counts
    checkpoint_every: int = 1000
    seed: int = 0
    device: str = "auto"
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16: networks under bfloat16 autocast
    compile: bool = False  # torch.compile G's synthesis and the encoder's body for the training steps

    def __post_init__(self) -> None:
        check_at_least(self, batch_size=1, log_every=1, image_every=1, val_every=1, checkpoint_every=1)
        check_rule(self.val_patience, self.val_min_improvement, "val_")
        check_one_of(self, precision=PRECISIONS, d_fake_codes=("absolute", "raw-offset"), zero_grad=("zero", "none"))
        check_one_of(self, noise_mode=("random", "const"))


def load_train_config(data: dict[str, Any]) -> EncoderTrainConfig:
    return from_mapping(EncoderTrainConfig, data, "train-encoder options")


def data_domain(data: str | None, img_channels: int) -> str:
    """'fashion-mnist' for its images (the dataset's name) or a grey generator, 'faces' otherwise: the domain whose
    networks ``auto`` picks and a missing-file error suggests, as ``invert`` infers it."""
    grey_domain = identity_default(data)[0] == "fmnist-features"
    return "fashion-mnist" if grey_domain or img_channels == 1 else "faces"


def perceptual_choice(cfg: EncoderTrainConfig, img_channels: int) -> tuple[str, str]:
    """The perceptual distance of a run and why (empty when given): ``auto`` is the domain's, ``fmnist-features``
    for Fashion-MNIST (shipped; the shipped encoders were trained with it, and ``invert`` takes what an encoder file
    records), else the paper's ``lpips-alex``."""
    if cfg.perceptual != "auto":
        return cfg.perceptual, ""
    if data_domain(cfg.data, img_channels) == "fashion-mnist":
        return "fmnist-features", "auto: fmnist-features, the shipped network of the Fashion-MNIST domain"
    return "lpips-alex", "auto: lpips-alex, the paper's distance"


def identity_choice(cfg: EncoderTrainConfig) -> tuple[str, str]:
    """The identity network of a run and why (empty when given): ``auto`` is the domain's (``identity_default``)."""
    return (cfg.identity, "") if cfg.identity != "auto" else identity_default(cfg.data, cfg.identity_weights)


def encoder_config(arch: EncoderArch, G: Generator, image_size: int) -> EncoderConfig:
    """The encoder's configuration for generator ``G`` and training images of ``image_size`` px."""
    return EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim, input_size=arch.input_size or image_size,
                         in_channels=G.img_channels, widths=arch.widths, units=arch.units, mode=arch.mode,
                         max_stage=0 if arch.w_only else None)  # fmt: skip


class EncoderTrainer(Trainer):
    """Builds everything from a config (or a run folder to resume) and runs the loop (``trainer.Trainer``)."""

    desc = "train-encoder"
    checkpoint_format = TRAINING_CHECKPOINT_FORMAT
    scalar_kinds = ("train", "val")
    checkpoint_attrs = ("val_history",)

    def __init__(self, cfg: EncoderTrainConfig, resume: str | Path | None = None, quiet: bool = False) -> None:
        self._start(cfg, quiet)
        torch.manual_seed(cfg.seed + self.dist.rank)
        self.G: Generator = load_generator(cfg.generator, device=self.device)
        G = self.G
        self.image_size = cfg.image_size or min(G.resolution, 256)
        self.schedule: Schedule = get_schedule(cfg.preset, cfg.schedule_file, cfg.total_steps)
        self.max_steps = min(cfg.max_steps or self.schedule.total_steps, self.schedule.total_steps)

        # data
        data = open_dataset(cfg.data, self.image_size, G.img_channels, "train")
        if cfg.val_data:
            self.val = open_dataset(cfg.val_data, self.image_size, G.img_channels, "test")
            self.train_data = data
        else:
            tr, va = split_holdout(len(data), min(cfg.val_count, max(0, len(data) - cfg.batch_size)), cfg.seed)
            self.train_data = SubsetDataset(data, tr, f"{data.name} (training part)")
            self.val = SubsetDataset(data, va, f"{data.name} (held out)")
        self.sampler = EpochSampler(
            self.train_data, cfg.batch_size, cfg.seed, cfg.flip, self.dist.rank, self.dist.world_size
        )

        # networks
        self.E = Encoder4Editing(encoder_config(cfg.encoder, G, self.image_size)).to(self.device)
        self.init_note = init_encoder_weights(self.E, cfg.encoder_init) if cfg.encoder_init else "random"
        self.E.set_w_avg(G.w_avg)
        self.D = LatentDiscriminator(LatentDiscriminatorConfig(w_dim=G.w_dim)).to(self.device)
        self.D.requires_grad_(False)
        self._discriminator = self.D
        dd.broadcast_module(self.E, self.dist)
        dd.broadcast_module(self.D, self.dist)
        self.opt_e = Ranger(self.E.parameters(), lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)  # type: ignore[arg-type]
        self.opt_d = torch.optim.Adam(self.D.parameters(), lr=cfg.d_lr)
        self.pool = LatentPool(cfg.pool_size, 0.5, seed=cfg.seed * 7919 + self.dist.rank)
        self.gen = torch.Generator().manual_seed(cfg.seed * 104_729 + self.dist.rank)
        # the validation losses so far (over resumed parts) and where the schedule's last stage begins: the plateau
        # rule (--val-patience) looks at the validations from there on only
        self.val_history: list[dict[str, Any]] = []
        self.final_stage_start = self.schedule.stage_changes(G.num_ws)[-1][0]

        # the training steps' passes of G and of the encoder's body: compiled (--compile) or as they are
        self._synthesis = compile_pass(G.synthesis, self.device) if cfg.compile else G.synthesis
        self._features = compile_pass(self.E.features, self.device) if cfg.compile else None
        if cfg.compile and self.dist.is_main and not quiet:
            print("--compile: the first steps compile G and the encoder body (a minute or two)", file=sys.stderr)

        # losses
        self.nets = self._build_losses(resume)
        self.perceptual, self.identity = self.nets.perceptual, self.nets.identity
        self.step = 0
        self._open_run(resume)

    # -- set-up ---------------------------------------------------------------------------------------
    def _build_losses(self, resume: str | Path | None = None) -> LossNetworks:
        """The loss networks; weight files not given are looked up (``checkpoints.locate``), a resumed run first
        taking the files it recorded in its config.json."""
        cfg = self.cfg
        recorded: dict[str, Any] = {}
        if resume is not None and (Path(resume) / "config.json").is_file():
            try:
                recorded = read_json(Path(resume) / "config.json")["_resolved"]["network_files"] or {}
            except (CycleEncodingError, KeyError, TypeError):
                recorded = {}
        pname, self.perceptual_note = perceptual_choice(cfg, self.G.img_channels)
        name, self.identity_note = identity_choice(cfg)
        nets = build_loss_networks(pname, cfg.lpips_backbone, name, cfg.identity_weights, self.device,
                                   cfg.perceptual_lambda > 0, cfg.identity_lambda > 0, recorded,
                                   data_domain(cfg.data, self.G.img_channels))  # fmt: skip
        if self.dist.is_main and not self.quiet:
            if self.perceptual_note:
                print(f"perceptual term: {pname} x {cfg.perceptual_lambda:g} ({self.perceptual_note})", file=sys.stderr)
            line = f"identity term: {getattr(nets.identity, 'name', 'none')} x {cfg.identity_lambda:g}"
            print(line + (f" ({self.identity_note})" if self.identity_note else ""), file=sys.stderr)
        return nets

    def run_label(self) -> str:
        return self.cfg.name or f"encoder-{self.schedule.name}"

    def resolved(self) -> dict[str, Any]:
        return {
            "image_size": self.image_size,
            "max_steps": self.max_steps,
            "encoder": self.E.config.to_dict(),
            "encoder_init": self.init_note,
            "networks": self.nets.names(),
            "perceptual_choice": self.perceptual_note or "as given",
            "identity_choice": self.identity_note or "as given",
            "noise_mode": self.cfg.noise_mode,
            "zero_grad": "PyTorch 1.6 (zero gradients: switched-off heads keep moving)"
            if self.cfg.zero_grad == "zero"
            else "set to None (switched-off heads freeze)",
            "d_fake_codes": self.cfg.d_fake_codes,
            "precision": ENCODER_PRECISION_NOTES[self.cfg.precision],
            "compile": "torch.compile: G's synthesis and the encoder's body in the training steps"
            if self.cfg.compile
            else "off",
            "network_files": self.nets.files(),
            "world_size": self.dist.world_size,
            "command": " ".join(sys.argv),
            "train_images": len(self.train_data),
            "val_images": len(self.val),
        }

    def write_run_files(self, run: Path) -> None:
        save_schedule(self.schedule, run / "schedule.json")

    # -- checkpoints ------------------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        return {**super().rank_state(), "pool": self.pool.state_dict()}

    def checkpoint_state(self) -> dict[str, Any]:
        st = self.schedule.at(min(self.step, self.schedule.total_steps - 1), self.G.num_ws)
        return {
            "trained_stage": self.E.stage,
            "schedule": self.schedule.to_dict(),
            "schedule_state": st.to_dict(),
            "network_files": self.nets.files(),
            "generator": {"path": str(self.cfg.generator), "w_avg": self.G.w_avg.cpu()},
        }

    def stateful(self) -> dict[str, Any]:
        return {"encoder": self.E, "discriminator": self.D, "opt_e": self.opt_e, "opt_d": self.opt_d,
                "sampler": self.sampler}  # fmt: skip

    def network_configs(self) -> dict[str, dict[str, Any]]:
        return {"encoder_config": self.E.config.to_dict(), "discriminator_config": self.D.config.to_dict()}

    def restore_checkpoint(self, ck: dict[str, Any], rank_state: dict[str, Any]) -> None:
        self.E.stage = int(ck.get("trained_stage", self.E.max_stage))  # a run resumed at its end exports this stage
        self.pool.load_state_dict(rank_state["pool"], device=self.device)

    # -- one step -----------------------------------------------------------------------------------------
    def render(self, ws: torch.Tensor, precision: str = "fp32") -> torch.Tensor:
        """G's images of ``ws`` with the run's noise (random noise drawn from the run's generator, so that a resumed
        run draws the same), float32; ``precision="bf16"``: G under bfloat16 autocast."""
        kw: dict[str, Any] = {"noise_mode": "const"}
        if self.cfg.noise_mode == "random":
            kw = {"noise": [n.to(ws.device) for n in self.G.make_noise(ws.shape[0], generator=self.gen, device="cpu")]}
        with autocast(ws.device, precision):
            return self._synthesis(ws, **kw).float()

    def reconstruction_losses(
        self, x: torch.Tensor, y: torch.Tensor, precision: str = "fp32"
    ) -> dict[str, torch.Tensor]:
        """Per-term losses (batch means, float32) between targets ``x`` and reconstructions ``y``; ``precision=
        "bf16"``: the loss networks under bfloat16 autocast (their per-sample distances and the means in float32)."""
        out = {"l2": F.mse_loss(y, x)}
        with autocast(y.device, precision):
            if self.perceptual is not None:
                out["perceptual"] = self.perceptual(y, x).float().mean()
            if self.identity is not None:
                out["identity"] = (1 - self.identity(y, x).float()).mean()
        return out

    def weighted(self, losses: dict[str, torch.Tensor]) -> torch.Tensor:
        c = self.cfg
        w = {"l2": c.l2_lambda, "perceptual": c.perceptual_lambda, "identity": c.identity_lambda}
        return sum(w[k] * v for k, v in losses.items() if k in w)  # type: ignore[return-value]

    def _d_step(self, real: torch.Tensor, fake: torch.Tensor) -> dict[str, float]:
        D, opt = self.D, self.opt_d
        D.requires_grad_(True)
        loss, logs = discriminator_loss(self.discriminate, real, fake)
        self.optimizer_step(opt, loss, D)
        logs["d_loss"] = float(loss.detach())
        if self.cfg.r1_gamma > 0 and r1_due(self.step, self.cfg.r1_every):
            r1 = lazy_r1_loss(D, real, self.cfg.r1_gamma, self.cfg.r1_every)
            self.optimizer_step(opt, r1, D)
            logs["d_r1"] = float(r1.detach())
        opt.zero_grad(set_to_none=True)
        D.requires_grad_(False)
        return logs

    def train_step(self) -> dict[str, float]:
        st: ScheduleState = self.schedule.at(self.step, self.G.num_ws)
        E = self.E
        E.stage = min(st.stage, E.max_stage)
        E.train()
        x = self.sampler.next_batch().to(self.device)
        prec = self.cfg.precision
        with autocast(self.device, prec):
            ws = E(x, self._features)
        ws = ws.float()  # the codes, losses and everything after them in float32 (a no-op in fp32)
        logs: dict[str, float] = {}
        if self.cfg.adversarial:
            real = sample_real_codes(self.G, x.shape[0], generator=self.gen)
            codes = ws - E.latent_avg[None] if self.cfg.d_fake_codes == "raw-offset" else ws
            fake = fake_codes_for_discriminator(codes, E.stage, self.pool)
            logs.update(self._d_step(real, fake))
        y = pool_to(self.render(ws, prec), self.image_size)
        rec = self.reconstruction_losses(x, y, prec)
        total = self.weighted(rec)
        d_loss = delta_loss(ws, E.stage)
        total = total + st.delta_weight * d_loss
        if self.cfg.adversarial and st.adversarial_weight > 0:
            adv = encoder_adversarial_loss(self.discriminate, ws, E.stage)
            total = total + st.adversarial_weight * adv
            logs["adv"] = float(adv.detach())
        self.optimizer_step(self.opt_e, total, E, self.cfg.zero_grad)
        dd.broadcast_buffers(E, self.dist)
        logs.update({k: float(v.detach()) for k, v in {**rec, "delta": d_loss, "loss": total}.items()})
        logs = dd.all_reduce_mean(logs, self.dist)
        logs.update(stage=E.stage, delta_weight=st.delta_weight, adversarial_weight=st.adversarial_weight)
        self.step += 1
        return logs

    # -- validation and pictures ------------------------------------------------------------------------
    @torch.no_grad()
    def validate(self, max_images: int | None = None) -> dict[str, float]:
        """Mean reconstruction losses on the held-out images (eval mode, the current stage)."""
        n = len(self.val) if max_images is None else min(max_images, len(self.val))
        sums: dict[str, float] = {}
        for i in range(0, n, self.cfg.batch_size):
            x, y = self._reconstruct(range(i, min(n, i + self.cfg.batch_size)))
            rec = self.reconstruction_losses(x, y)
            rec["weighted"] = self.weighted(rec)
            for k, v in rec.items():
                sums[k] = sums.get(k, 0.0) + float(v) * x.shape[0]
        return {k: v / max(n, 1) for k, v in sums.items()}

    def _reconstruct(self, indices: range) -> tuple[torch.Tensor, torch.Tensor]:
        """Held-out images and their reconstructions (eval mode, the current stage, G's constant noise)."""
        was = self.E.training
        self.E.eval()
        x = torch.stack([self.val.load(j) for j in indices]).to(self.device)
        y = pool_to(self.G.synthesis(self.E(x), noise_mode="const"), self.image_size)
        self.E.train(was)
        return x, y

    @torch.no_grad()
    def save_grid(self, count: int = 8) -> Path | None:
        if not len(self.val):
            return None
        x, y = self._reconstruct(range(min(count, len(self.val))))
        grid = make_grid(torch.cat([x, y.clamp(-1, 1)]).cpu(), ncols=x.shape[0])
        path = save_image(grid, self.run_dir / "images" / f"step{self.step:07d}.png")
        self.log.add_image("reconstructions", (grid + 1) / 2, self.step)
        return path

    # -- export and the loop's hooks -----------------------------------------------------------------------
    def export(self) -> Path | None:
        """Write the encoder in the project's format (with the stage the run ended in)."""
        if not self.dist.is_main:
            return None
        prov = default_provenance(
            made_by="cycle-encoding train-encoder",
            run=self.run_dir.name,
            step=self.step,
            schedule=self.schedule.name,
            generator=Path(self.cfg.generator).name,
            generator_sha256=file_sha256(resolve_model(self.cfg.generator)),
            data=str(self.cfg.data),
            networks=self.nets.names(),
            network_files=self.nets.files(),
        )
        path = save_encoder(self.E, self.run_dir / "encoder.safetensors", prov, trained_stage=self.E.stage)
        # the Ranger state beside it: the refinement restores it for every target, as the authors do
        st = from_optimizer(self.opt_e, self.E, f"{self.run_dir.name}: train-encoder step {self.step}")
        save_optimizer_state(companion_path(path), st, self.E, provenance=prov)
        return path

    def digest_modules(self) -> tuple[nn.Module, ...]:
        return (self.E, self.D)

    def on_start(self) -> None:
        self._log({"kind": "start", "step": 0, "time": time.time(), "networks": self.nets.names(),
                   "encoder_init": self.init_note, "train_images": len(self.train_data),
                   "val_images": len(self.val), "world_size": self.dist.world_size,
                   "precision": self.cfg.precision, "compile": self.cfg.compile})  # fmt: skip

    def postfix(self, logs: dict[str, Any]) -> dict[str, Any]:
        return {"stage": logs["stage"], "loss": f"{logs['loss']:.4f}"}

    def after_log(self, last: bool) -> None:
        if self.step % self.cfg.val_every == 0 or last:
            v = self.validate() if len(self.val) else {}
            v = dd.all_reduce_mean(v, self.dist)  # the same numbers on every rank: they all decide alike below
            self._log({"kind": "val", "step": self.step, "time": time.time(), "stage": self.E.stage, **v})
            if "weighted" in v and not any(h["step"] == self.step for h in self.val_history):
                self.val_history.append({"step": self.step, "stage": self.E.stage, "loss": v["weighted"]})
            # the plateau rule over the validations of the schedule's last stage (after its first step)
            final = [h["loss"] for h in self.val_history if h["step"] > self.final_stage_start]
            if not last and plateau_holds(final, self.cfg.val_patience, self.cfg.val_min_improvement):
                self.request_stop(
                    f"the validation loss of the final stage (from step {self.final_stage_start}) has not improved "
                    f"by {100 * self.cfg.val_min_improvement:g}% on its best for {self.cfg.val_patience} validations"
                )

    def end_fields(self) -> dict[str, Any]:
        return {"trained_stage": self.E.stage}

    def on_end(self) -> None:
        if self.step >= self.max_steps or self._stop_reason is not None:
            self.export()


def resume_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> EncoderTrainConfig:
    """The configuration a run was started with (``config.json``), with ``max_steps`` etc. overridable."""
    allowed = ("max_steps", "log_every", "image_every", "val_every", "checkpoint_every", "device", "val_patience",
               "val_min_improvement")  # fmt: skip
    data = read_run_config(run_dir, "train-encoder", overrides, allowed)
    data.setdefault("precision", "fp32")  # a run from before these options computed in float32, uncompiled:
    data.setdefault("compile", False)  # it keeps doing so
    return load_train_config(data)
