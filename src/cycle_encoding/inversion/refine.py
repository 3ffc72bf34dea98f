"""Stage ``refine``: the regularized pivot refinement of the paper (Eq. 5-6), as the authors run it ("Method 2"): the
encoder's weights optimized on the target and M random training images, from its restored Ranger state.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.refine"."""

from __future__ import annotations

import copy
import sys
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from ..assets import resolve_model
from ..checkpoints.common import sniff, torch_load
from ..checkpoints.e4e import is_e4e_checkpoint
from ..checkpoints.encoder import TRAINING_CHECKPOINT_FORMAT, encoder_from_training_checkpoint, load_encoder
from ..checkpoints.optimizer import (
    OptimizerState,
    companion_path,
    from_e4e_checkpoint,
    from_training_checkpoint,
    load_optimizer_state,
)
from ..config import check_at_least, check_one_of
from ..data.datasets import ImageDataset, ImageFolderDataset, open_dataset
from ..errors import CheckpointError, CycleEncodingError
from ..networks.encoder import Encoder4Editing
from ..networks.stylegan2 import Generator
from ..ops import PRECISIONS, autocast, compile_pass, pool_to, resize
from ..optim import Ranger, centralized_gradient
from ..utils import resolve_device
from .common import LossNetworks, cpu_generator, frozen, reconstruction_terms, synthesis_pass, weighted_sum

PAPER_RANGER = {"lr": 1e-4, "betas": (0.95, 0.999), "eps": 1e-5}
OPTIMIZER_CHOICES = ("auto", "restore", "substitute", "fresh")
SUBSTITUTE_STEP = 6000  # the substitute's step count: RAdam fully adaptive, a multiple of Lookahead's k


@dataclass(frozen=True)
class RefineConfig:
    """Options of the regularized refinement (defaults: the authors' run)."""

    steps: int = 16  # forward passes; the pivot comes from the last, after steps - 1 updates
    num_random: int = 7  # M: random training images per step
    lambda_reg: float | None = None  # None: M
    l2_lambda: float = 1.0
    perceptual_lambda: float = 0.8
    identity_lambda: float = 0.1
    lr: float | None = None  # None: the optimizer state's learning rate (1e-4 without one)
    image_size: int | None = None  # None: the encoder's training size (checkpoint) or min(G.resolution, 256)
    resample_each_step: bool = True
    optimizer_state: str = "auto"  # auto | restore | substitute | fresh
    substitute_batches: int = 20  # K batches estimating Ranger's moments when the file has no state
    noise_mode: str = "random"  # G's noise: random (the authors') or const
    precision: str = "fp32"  # "bf16": encoder, G and loss networks under bf16 autocast; fp32 weights, loss, Ranger
    compile: bool = False  # torch.compile the encoder's body and G's synthesis (the first target pays the compile)

    def __post_init__(self) -> None:
        check_one_of(self, "refine.", optimizer_state=OPTIMIZER_CHOICES, noise_mode=("random", "const"),
                     precision=PRECISIONS)  # fmt: skip
        check_at_least(self, "refine.", substitute_batches=1, steps=1, num_random=0, lambda_reg=0)
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"refine.lr must be positive, got {self.lr}")

    @property
    def reg_weight(self) -> float:
        return float(self.num_random if self.lambda_reg is None else self.lambda_reg)

    def weights(self) -> dict[str, float]:
        return {"l2": self.l2_lambda, "perceptual": self.perceptual_lambda, "identity": self.identity_lambda}


@dataclass
class EncoderSource:
    """An encoder as read from its file, with what the refinement needs besides the weights."""

    encoder: Encoder4Editing
    optimizer_state: OptimizerState | None = None
    optimizer_settings: dict[str, Any] = field(default_factory=lambda: dict(PAPER_RANGER))
    train_data: str | None = None  # the training images' folder or dataset name, when the file records it
    image_size: int | None = None  # the size the encoder was trained at, when the file records it
    path: str | None = None


def load_encoder_source(path: str | Path, device: str | torch.device = "cpu") -> EncoderSource:
    """Read an encoder file for inversion: a ``train-encoder`` ``checkpoint.pt`` gives the encoder, its Ranger state,
    its training data and image size; the project's ``encoder.safetensors`` gives the encoder and the training data
    recorded in its provenance; e4e-family files give the encoder only."""
    p = resolve_model(path)
    dev = resolve_device(device)
    if sniff(p) in ("torch-zip", "torch-legacy"):
        obj = torch_load(p)
        if isinstance(obj, dict) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT:
            try:
                E = encoder_from_training_checkpoint(obj, p, dev)
            except (KeyError, TypeError, ValueError, RuntimeError) as e:
                raise CheckpointError(p, f"a train-encoder checkpoint whose encoder cannot be built: {e}") from None
            cfg = obj.get("config") or {}
            return EncoderSource(E, from_training_checkpoint(obj, E, p), _ranger_settings(cfg), cfg.get("data"),
                                 cfg.get("image_size"), str(p))  # fmt: skip
        if is_e4e_checkpoint(obj):
            st = from_e4e_checkpoint(obj, p)
            return EncoderSource(load_encoder(p, device=dev), st, _ranger_settings(st and st.settings), path=str(p))
    E = load_encoder(p, device=dev)
    prov = getattr(E, "provenance", {}) or {}
    data = prov.get("data") if isinstance(prov, dict) else None
    side = companion_path(p)
    st = load_optimizer_state(side, E) if sniff(p) == "safetensors" and side.is_file() else None
    return EncoderSource(E, st, _ranger_settings(st and st.settings), str(data) if data else None, path=str(p))


def _ranger_settings(given: dict[str, Any] | None) -> dict[str, Any]:
    """The paper's Ranger settings, with the ``lr``, ``betas`` and ``eps`` that a file records in ``given``."""
    settings = dict(PAPER_RANGER)
    for k in ("lr", "betas", "eps"):
        if given and k in given:
            settings[k] = tuple(given[k]) if k == "betas" else float(given[k])
    return settings


def open_training_images(spec: str | None, size: int, channels: int, encoder_path: str | None) -> ImageDataset:
    """The encoder's training images at ``size``; a clear error when none are named or the folder is gone."""
    where = f" ({encoder_path})" if encoder_path else ""
    if not spec:
        raise CycleEncodingError(
            f"stage 'refine' needs the encoder's training images, and the encoder file{where} records none: "
            "pass --train-data FOLDER (or a dataset name such as fashion-mnist)"
        )
    if Path(spec).is_dir():  # no in-memory cache: random draws over a large set must not fill the memory
        return ImageFolderDataset(spec, size, channels, cache=False)
    try:
        return open_dataset(spec, size, channels, "train")
    except CycleEncodingError as e:
        raise CycleEncodingError(
            f"stage 'refine' needs the encoder's training images: {e}; pass --train-data to name where they are now"
        ) from None


@dataclass
class RefineResult:
    pivot: torch.Tensor  # [1, N, w_dim]
    losses: list[dict[str, Any]]
    first_target_loss: float  # L_S of the target at the first forward (the trained encoder)
    target_loss: float  # L_S of the target at the pivot


class RegularizedRefiner:
    """Runs the refinement per target, resetting the encoder and its optimizer in between. ``E`` is copied (the
    caller's is never changed); ``train_images``: the encoder's training images at the loss image size."""

    def __init__(
        self,
        G: Generator,
        E: Encoder4Editing,
        train_images: ImageDataset,
        config: RefineConfig | None = None,
        nets: LossNetworks | None = None,
        optimizer_state: OptimizerState | None = None,
        optimizer_settings: dict[str, Any] | None = None,
        image_size: int | None = None,
        seed: int = 0,
        source: str | None = None,
        substitute: dict[str, Any] | None = None,
    ) -> None:
        self.config = config or RefineConfig()
        c = self.config
        self.G = G
        self.nets = nets or LossNetworks()
        self.image_size = int(c.image_size or image_size or min(G.resolution, 256))
        if train_images.size != self.image_size or train_images.channels != G.img_channels:
            raise CycleEncodingError(
                f"training images are {train_images.channels}x{train_images.size}px, the refinement needs "
                f"{G.img_channels}x{self.image_size}px"
            )
        if len(train_images) < c.num_random:
            raise CycleEncodingError(
                f"{train_images.name}: {len(train_images)} training image(s), the refinement draws {c.num_random} "
                "per step"
            )
        self.data = train_images
        self.E = copy.deepcopy(E)
        self.E.stage = "all"
        self.E.requires_grad_(True)
        self.use_compile(c.compile)
        self._settings = _ranger_settings(optimizer_settings)
        self._e_state = copy.deepcopy(self.E.state_dict())
        self._bad: set[int] = set()
        self.optimizer = self._new_optimizer()
        where = source or "the encoder file"
        choice = c.optimizer_state
        if choice == "restore" and optimizer_state is None:
            raise CycleEncodingError(
                f"refine.optimizer_state is 'restore' but {where} holds no optimizer state "
                "(choose auto, substitute or fresh)"
            )
        if optimizer_state is not None and choice in ("auto", "restore"):
            self.optimizer.load_state_dict(self._as_state_dict(optimizer_state, where))
            self.optimizer_source, self.optimizer_note = "restored", f"restored from {optimizer_state.source or where}"
        elif choice == "fresh":
            self.optimizer_source, self.optimizer_note = "fresh", "fresh Ranger (no state)"
        else:
            if substitute is None:
                self._estimate_substitute(seed)
            else:  # estimated by another process of this run (a worker's parent): taken as it is, not copied
                self.optimizer.load_state_dict(substitute)
            why = "requested" if choice == "substitute" else f"{where} holds no optimizer state"
            self.optimizer_source = "substitute"
            self.optimizer_note = (
                f"substitute ({why}): Ranger's moments estimated from {c.substitute_batches} batches of "
                f"{c.num_random + 1} training images, step {SUBSTITUTE_STEP}"
            )
        if c.lr is not None:
            for g in self.optimizer.param_groups:
                g["lr"] = c.lr
        self._opt_state = copy.deepcopy(self.optimizer.state_dict())

    def substitute_state(self) -> dict[str, Any] | None:
        """The substitute Ranger state this refiner estimated (None: it restored one or runs fresh), for another
        refiner of the same encoder, training images and options (``substitute=``, which takes it over: its
        tensors become that refiner's optimizer state, so hand it a copy, as a file does, to keep using it)."""
        return self._opt_state if self.optimizer_source == "substitute" else None

    def use_compile(self, on: bool) -> None:
        """Compile the encoder's body and G's synthesis or not, from the next target on (fixed shapes, batches of
        M + 1, and weights reset in place: one compile serves every target)."""
        self.config = replace(self.config, compile=on)
        device = self.G.w_avg.device
        self._features = compile_pass(self.E.features, device) if on else None
        self._synthesis = synthesis_pass(on, device)

    def _as_state_dict(self, st: OptimizerState, where: str) -> dict[str, Any]:
        """``st`` mapped by name onto the encoder's parameters; the Ranger settings it does not give are the run's."""
        defaults = {k: v for k, v in self.optimizer.param_groups[0].items() if k != "params"}
        sd = st.to_state_dict(self.E, where)
        for g in sd["param_groups"]:
            for k, v in defaults.items():
                g.setdefault(k, v)
        return sd

    def _estimate_substitute(self, seed: int) -> None:
        """Ranger's moments from K batches of training images (see the design notes); BatchNorm statistics restored."""
        c = self.config
        gen = cpu_generator(seed * 7_919 + 12_345)
        E = self.E
        E.train()
        group = self.optimizer.param_groups[0]
        params = [p for p in E.parameters() if p.requires_grad]
        m = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        v = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        k_batches = c.substitute_batches
        weights = c.weights()
        with frozen(self.G):
            for _ in range(k_batches):
                batch = self._draw(gen, c.num_random + 1)
                ws = E(batch, self._features)
                y = pool_to(self._render(ws, gen), self.image_size)
                loss = weighted_sum(reconstruction_terms(y, batch, self.nets), weights).mean()
                E.zero_grad(set_to_none=True)
                loss.backward()
                with torch.no_grad():
                    for i, p in enumerate(params):
                        if p.grad is None:
                            continue
                        g = centralized_gradient(p.grad, group)
                        m[i] += g / k_batches
                        v[i] += g * g / k_batches
        E.zero_grad(set_to_none=True)
        E.load_state_dict(self._e_state)
        for i, p in enumerate(params):
            self.optimizer.state[p] = {
                "step": SUBSTITUTE_STEP,
                "exp_avg": m[i],
                "exp_avg_sq": v[i],
                "slow_buffer": p.detach().clone(),
            }

    def _render(self, ws: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        if self.config.noise_mode == "random":
            noise = [n.to(ws.device) for n in self.G.make_noise(ws.shape[0], generator=gen, device="cpu")]
            return self._synthesis(self.G, ws, noise=noise)
        return self._synthesis(self.G, ws, noise_mode="const")

    def _new_optimizer(self) -> Ranger:
        return Ranger(self.E.parameters(), **self._settings)

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def reset(self) -> None:
        """Back to the trained encoder (weights and BatchNorm statistics) and its optimizer state."""
        self.E.load_state_dict(self._e_state)
        self.optimizer = self._new_optimizer()
        self.optimizer.load_state_dict(copy.deepcopy(self._opt_state))

    def _draw(self, gen: torch.Generator, m: int) -> torch.Tensor:
        """``m`` readable training images chosen at random (without repetition)."""
        device = self.G.w_avg.device
        if m == 0:
            return torch.empty(0, self.G.img_channels, self.image_size, self.image_size, device=device)
        out: list[torch.Tensor] = []
        for i in torch.randperm(len(self.data), generator=gen).tolist():
            if i in self._bad:
                continue
            try:
                out.append(self.data.load(i))
            except CycleEncodingError as e:
                self._bad.add(i)
                print(f"warning: skipping unreadable training image: {e}", file=sys.stderr)
                continue
            if len(out) == m:
                return torch.stack(out).to(device)
        raise CycleEncodingError(f"{self.data.name}: fewer than {m} readable training images")

    def refine(
        self, target: torch.Tensor, seed: int, on_step: Callable[[dict[str, Any]], None] | None = None
    ) -> RefineResult:
        """Refine the pivot of one target ``[1, C, H, W]`` (any size: resized to the loss size); resets afterwards."""
        c = self.config
        gen = cpu_generator(seed)
        x = target.to(self.G.w_avg.device)
        if x.shape[-2:] != (self.image_size, self.image_size):
            x = resize(x, self.image_size).clamp(-1, 1)
        lam = c.reg_weight
        weights = c.weights()
        losses: list[dict[str, Any]] = []
        pivot = None
        first = last = float("nan")
        E = self.E
        E.train()
        randoms = None
        try:
            with frozen(self.G):
                for k in range(c.steps):
                    if randoms is None or c.resample_each_step:
                        randoms = self._draw(gen, c.num_random)
                    batch = torch.cat([randoms, x])
                    with autocast(batch.device, c.precision):
                        ws = E(batch, self._features).float()
                    final = k == c.steps - 1
                    if final:
                        pivot = ws[-1:].detach().clone()
                    with autocast(batch.device, c.precision):
                        y = pool_to(self._render(ws, gen), self.image_size).float()
                        terms = {n: v.float() for n, v in reconstruction_terms(y, batch, self.nets).items()}
                    per = weighted_sum(terms, weights)  # L_S per image
                    reg = per[:-1].mean() if per.shape[0] > 1 else per.new_zeros(())
                    loss = (per[-1] + lam * reg) / (1.0 + lam)
                    rec = {
                        "stage": "refine",
                        "step": k,
                        "loss": float(loss.detach()),
                        "target_l_s": float(per[-1].detach()),
                        "reg_l_s": float(reg.detach()),
                        **{f"target_{name}": float(v[-1].detach()) for name, v in terms.items()},
                        "updated": not final,
                    }
                    if k == 0:
                        first = rec["target_l_s"]
                    last = rec["target_l_s"]
                    if not final:
                        self.optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                        self.optimizer.step()
                    losses.append(rec)
                    if on_step is not None:
                        on_step(rec)
        finally:
            self.optimizer.zero_grad(set_to_none=True)
            self.reset()
        assert pivot is not None
        return RefineResult(pivot=pivot, losses=losses, first_target_loss=first, target_loss=last)
