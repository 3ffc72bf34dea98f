"""Stage ``project``: the baseline pivot by optimization in W, as PTI's projector finds it (for comparisons).
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.project"."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from ..config import check_at_least
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from .common import LossNetworks, cpu_generator, frozen


@dataclass(frozen=True)
class ProjectConfig:
    """Options of the W projector (defaults: PTI's)."""

    steps: int = 450
    lr: float = 0.01
    lr_rampdown: float = 0.25
    lr_rampup: float = 0.05
    noise_factor: float = 0.05
    noise_ramp: float = 0.75
    noise_reg_weight: float = 1e5
    w_avg_samples: int = 600  # PTI's
    perceptual_lambda: float = 1.0
    perceptual: str | None = None  # this stage's perceptual network (PTI: lpips-vgg); None: the run's
    lpips_backbone: str | None = None  # its LPIPS backbone file when it is an LPIPS other than the run's
    l2_lambda: float = 0.0
    loss_size: int = 256  # images larger than this are area-downsampled to it before the loss

    def __post_init__(self) -> None:
        check_at_least(self, "project.", steps=1, w_avg_samples=2)


def learning_rate(step: int, config: ProjectConfig) -> float:
    """The projector's learning rate at ``step`` (cosine ramp-down over the last ``lr_rampdown``, linear ramp-up)."""
    t = step / config.steps
    ramp = min(1.0, (1.0 - t) / config.lr_rampdown)
    ramp = 0.5 - 0.5 * math.cos(ramp * math.pi)
    ramp = ramp * min(1.0, t / config.lr_rampup)
    return config.lr * ramp


def noise_regularization(noises: list[torch.Tensor]) -> torch.Tensor:
    """Sum over maps and scales of the squared mean correlation with the one-pixel shifts (see the design notes)."""
    reg = noises[0].new_zeros(())
    for v in noises:
        n = v
        while True:
            reg = reg + (n * torch.roll(n, shifts=1, dims=3)).mean().square()
            reg = reg + (n * torch.roll(n, shifts=1, dims=2)).mean().square()
            if n.shape[2] <= 8:
                break
            n = F.avg_pool2d(n, kernel_size=2)
    return reg


@dataclass
class ProjectResult:
    pivot: torch.Tensor  # [1, N, w_dim], the same code on every layer
    losses: list[dict[str, Any]]


def project_w(
    G: Generator,
    target: torch.Tensor,
    nets: LossNetworks | None = None,
    config: ProjectConfig | None = None,
    seed: int = 0,
    on_step: Callable[[dict[str, Any]], None] | None = None,
) -> ProjectResult:
    """Find a W code whose image matches ``target`` ``[1, C, R, R]`` (see the design notes). G is not changed."""
    c = config or ProjectConfig()
    nets = nets or LossNetworks()
    if nets.perceptual is None and c.l2_lambda <= 0:
        raise CycleEncodingError(
            "stage 'project' needs a perceptual distance (--perceptual) or a pixel loss (project.l2_lambda > 0)"
        )
    device = G.w_avg.device
    gen = cpu_generator(seed)
    with torch.no_grad():
        z = torch.randn(c.w_avg_samples, G.z_dim, generator=gen).to(device)
        w_samples = torch.cat([G.style(zb) for zb in z.split(1000)]).double()
        w_mean = w_samples.mean(0, keepdim=True)
        w_std = float(((w_samples - w_mean).square().sum() / c.w_avg_samples).sqrt())
    w_opt = w_mean.float()[None].clone().requires_grad_(True)  # [1, 1, w_dim]
    noises = [torch.randn(b.shape, generator=gen).to(device).requires_grad_(True) for b in G.noise_buffers()]
    opt = torch.optim.Adam([w_opt, *noises], betas=(0.9, 0.999), lr=c.lr)

    def down(img: torch.Tensor) -> torch.Tensor:
        if img.shape[-1] > c.loss_size:
            return F.interpolate(img, size=(c.loss_size, c.loss_size), mode="area")
        return img

    x = down(target.to(device))
    losses: list[dict[str, Any]] = []
    with frozen(G):
        for step in range(c.steps):
            t = step / c.steps
            noise_scale = w_std * c.noise_factor * max(0.0, 1.0 - t / c.noise_ramp) ** 2
            lr = learning_rate(step, c)
            for g in opt.param_groups:
                g["lr"] = lr
            w_noise = torch.randn(w_opt.shape, generator=gen).to(device) * noise_scale
            ws = (w_opt + w_noise).expand(-1, G.num_ws, -1)
            y = down(G.synthesis(ws, noise=noises))
            loss = y.new_zeros(())
            rec: dict[str, Any] = {"stage": "project", "step": step, "lr": lr}
            if nets.perceptual is not None and c.perceptual_lambda:
                p = nets.perceptual(y, x).sum()
                loss = loss + c.perceptual_lambda * p
                rec["perceptual"] = float(p.detach())
            if c.l2_lambda:
                mse = F.mse_loss(y, x)
                loss = loss + c.l2_lambda * mse
                rec["l2"] = float(mse.detach())
            reg = noise_regularization(noises)
            loss = loss + c.noise_reg_weight * reg
            rec.update(noise_reg=float(reg.detach()), loss=float(loss.detach()))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():
                for n in noises:
                    n -= n.mean()
                    n *= n.square().mean().rsqrt()
            losses.append(rec)
            if on_step is not None:
                on_step(rec)
    pivot = w_opt.detach().expand(-1, G.num_ws, -1).clone()
    return ProjectResult(pivot=pivot, losses=losses)
