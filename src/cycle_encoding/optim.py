"""Ranger: RAdam + Lookahead + gradient centralization, the encoder optimizer of e4e and Cycle Encoding.

Written here because the packaged versions do not fit: ``pytorch-ranger`` 0.1.1 (2020) and ``torch-optimizer`` 0.3.0
(2021) are unmaintained, have no gradient centralization, and use tensor-method overloads that PyTorch 2.13 only
accepts with deprecation warnings. The update below is the one of the Ranger that e4e ships
(Ranger 2020, GC on every weight with more than one dimension, Lookahead k=6, alpha=0.5, threshold 5).

For each parameter p with gradient g, at step t (1-based):

1. gradient centralization (``use_gc``): if ``g.dim() > 1`` (``> 3`` with ``gc_conv_only``), subtract the mean of g
   over all dimensions but the first (per output unit);
2. moments: ``m = b1 m + (1 - b1) g``, ``v = b2 v + (1 - b2) g^2``;
3. RAdam rectification: ``rho_inf = 2 / (1 - b2) - 1``, ``rho_t = rho_inf - 2 t b2^t / (1 - b2^t)``;
   if ``rho_t > threshold``:
   ``p -= lr * sqrt((1 - b2^t) (rho_t - 4)(rho_t - 2) rho_inf / ((rho_inf - 4)(rho_inf - 2) rho_t)) / (1 - b1^t)
   * m / (sqrt(v) + eps)``, else ``p -= lr * m / (1 - b1^t)`` (momentum SGD while the variance estimate is poor);
   weight decay, when non-zero, first does ``p -= weight_decay * lr * p``;
4. Lookahead: the slow weights start as p before its first update; every k steps
   ``slow += alpha (p - slow)`` and p is set to slow.

All state (step count, moments, slow weights) lives in ``optimizer.state`` and the hyper-parameters in the param
groups, so ``state_dict()`` / ``load_state_dict()`` resume bit-exactly.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch.optim import Optimizer


class Ranger(Optimizer):
    """RAdam with Lookahead and gradient centralization (the update: the module doc); the defaults are e4e's."""

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
    """``grad`` in float32, centralized as the param group's ``use_gc`` and ``gc_conv_only`` ask (step 1 above)."""
    grad = grad.float()
    if group["use_gc"] and grad.dim() > (3 if group["gc_conv_only"] else 1):
        grad = grad - grad.mean(dim=tuple(range(1, grad.dim())), keepdim=True)
    return grad


def zero_grad(optimizer: Optimizer, mode: str = "zero") -> None:
    """Clear the gradients of ``optimizer``'s parameters before a backward pass.

    ``mode="none"``: gradients set to None (PyTorch >= 2.0's default): a parameter the next backward does not reach
    has no gradient, and Ranger skips it (it freezes, its moments stay as they were).

    ``mode="zero"``: PyTorch 1.6's ``zero_grad()`` (the authors' version): every gradient that exists is zeroed in
    place, and a parameter keeps a (zero) gradient once it has received one. A parameter the next backward does not
    reach (an offset head switched off in W+ -> W) still takes a Ranger step on a zero gradient: its moments decay
    (``m *= b1``, ``v *= b2``) and it keeps moving by ``m / (sqrt(v) + eps)``, as in the authors' run. "Has received
    one" is read off the optimizer state (Ranger creates it on a parameter's first gradient), so this also holds
    after resuming from a checkpoint or restoring a saved state, where no gradient tensors exist yet.
    """
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
