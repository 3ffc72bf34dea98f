"""Ranger: RAdam + Lookahead + gradient centralization, the encoder optimizer of e4e and Cycle Encoding.
Design notes (the update, why not a packaged one): docs/INTERNALS.md, "cycle_encoding.optim"."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class Ranger(Optimizer):
    """RAdam with Lookahead and gradient centralization (the update: the design notes); the defaults are e4e's."""

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.95, 0.999),
        eps: float = 1e-5,
        weight_decay: float = 0.0,
        alpha: float = 0.5,
        k: int = 6,
        n_sma_threshold: float = 5.0,
        use_gc: bool = True,
        gc_conv_only: bool = False,
    ) -> None:
        if not lr > 0:
            raise ValueError(f"Ranger: lr must be positive, got {lr}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"Ranger: alpha must be in [0, 1], got {alpha}")
        if not (isinstance(k, int) and k >= 1):
            raise ValueError(f"Ranger: k must be a positive integer, got {k}")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Ranger: betas must be in [0, 1), got {betas}")
        if not eps > 0:
            raise ValueError(f"Ranger: eps must be positive, got {eps}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, alpha=alpha, k=k,
                        n_sma_threshold=n_sma_threshold, use_gc=use_gc, gc_conv_only=gc_conv_only)  # fmt: skip
        super().__init__(params, defaults)

    @staticmethod
    def rectification(step: int, betas: tuple[float, float], threshold: float) -> tuple[bool, float]:
        """(adaptive?, step size factor) of RAdam at 1-based ``step``: the factor multiplies ``lr * m`` (divided by
        ``sqrt(v) + eps`` when adaptive)."""
        b1, b2 = betas
        b2t = b2**step
        rho_inf = 2.0 / (1.0 - b2) - 1.0
        rho_t = rho_inf - 2.0 * step * b2t / (1.0 - b2t)
        bias1 = 1.0 - b1**step
        if rho_t > threshold:
            r = (1.0 - b2t) * (rho_t - 4.0) * (rho_t - 2.0) * rho_inf / ((rho_inf - 4.0) * (rho_inf - 2.0) * rho_t)
            return True, math.sqrt(r) / bias1
        return False, 1.0 / bias1

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:  # type: ignore[override]
        """One update of every parameter that has a gradient; returns the closure's loss if given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, eps, wd = group["lr"], group["eps"], group["weight_decay"]
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Ranger does not support sparse gradients")
                grad = centralized_gradient(p.grad, group)
                state = self.state[p]
                if len(state) == 0:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                    state["slow_buffer"] = p.detach().clone()
                state["step"] += 1
                t = int(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(b1).add_(grad, alpha=1.0 - b1)
                exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1.0 - b2)

                p32 = p.float()
                if wd != 0:
                    p32.add_(p32, alpha=-wd * lr)
                adaptive, step_size = self.rectification(t, (b1, b2), group["n_sma_threshold"])
                if adaptive:
                    p32.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(eps), value=-step_size * lr)
                else:
                    p32.add_(exp_avg, alpha=-step_size * lr)
                p.copy_(p32)

                if t % group["k"] == 0:
                    slow = state["slow_buffer"]
                    slow.add_(p - slow, alpha=group["alpha"])
                    p.copy_(slow)
        return loss

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """As Optimizer.load_state_dict; the step counters stay plain integers."""
        super().load_state_dict(state_dict)
        for st in self.state.values():
            if "step" in st and isinstance(st["step"], torch.Tensor):
                st["step"] = int(st["step"].item())


def centralized_gradient(grad: torch.Tensor, group: dict[str, Any]) -> torch.Tensor:
    """``grad`` in float32, centralized as the param group's ``use_gc`` and ``gc_conv_only`` ask (step 1 of the update)."""
    grad = grad.float()
    if group["use_gc"] and grad.dim() > (3 if group["gc_conv_only"] else 1):
        grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    return grad


def zero_grad(optimizer: Optimizer, mode: str = "zero") -> None:
    """Clear the gradients before a backward pass: ``"none"`` sets them to None (Ranger skips a parameter the backward
    does not reach); ``"zero"`` is PyTorch 1.6's (the authors'): zeroed in place, and a parameter with optimizer state
    gets a zero gradient, so it still takes a Ranger step (design notes: docs/INTERNALS.md, "cycle_encoding.optim")."""
    if mode not in ("zero", "none"):
        raise ValueError(f"zero_grad mode must be 'zero' (PyTorch 1.6) or 'none', got {mode!r}")
    for group in optimizer.param_groups:
        for p in group["params"]:
            if mode == "none":
                p.grad = None
            elif p.grad is not None:
                p.grad.detach_()
                p.grad.zero_()
            elif optimizer.state.get(p):
                p.grad = torch.zeros_like(p)
