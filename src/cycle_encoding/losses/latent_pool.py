"""A pool of past fake latent codes for the latent discriminator (the image-pool logic of CycleGAN, as e4e uses it).
Design notes: docs/INTERNALS.md, "cycle_encoding.losses.latent_pool"."""

from __future__ import annotations

from typing import Any

import torch

from ..errors import CycleEncodingError


class LatentPool:
    """History buffer of ``size`` codes; ``query`` swaps each incoming code for a stored one with probability ``p``."""

    def __init__(self, size: int = 50, p: float = 0.5, seed: int | None = None) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise CycleEncodingError(f"latent pool size must be a non-negative integer, got {size!r}")
        if not 0.0 <= p <= 1.0:
            raise CycleEncodingError(f"latent pool probability must be in [0, 1], got {p!r}")
        self.size = size
        self.p = float(p)
        self.generator = torch.Generator(device="cpu")
        if seed is None:
            self.generator.seed()  # a fresh random seed
        else:
            self.generator.manual_seed(seed)
        self.codes: list[torch.Tensor] = []

    def __len__(self) -> int:
        return len(self.codes)

    def _randint(self, high: int) -> int:
        return int(torch.randint(high, (1,), generator=self.generator).item())

    @torch.no_grad()
    def query(self, codes: torch.Tensor) -> torch.Tensor:
        """``[B, w_dim]`` or ``[B, n, w_dim]`` -> ``[B, w_dim]``: each sample's code, or a past one (see the module
        doc). The output is detached; the pool stores detached copies."""
        if codes.ndim == 3:
            picks = [self._randint(codes.shape[1]) for _ in range(codes.shape[0])]
            codes = codes[torch.arange(codes.shape[0], device=codes.device), torch.tensor(picks, device=codes.device)]
        if codes.ndim != 2:
            raise CycleEncodingError(f"latent pool: codes must be [B, w_dim] or [B, n, w_dim], got {list(codes.shape)}")
        codes = codes.detach()
        if self.size == 0:
            return codes
        out = []
        for w in codes:
            if len(self.codes) < self.size:
                self.codes.append(w.clone())
                out.append(w)
            elif float(torch.rand((), generator=self.generator)) < self.p:
                i = self._randint(self.size)
                out.append(self.codes[i].to(w.device))
                self.codes[i] = w.clone()
            else:
                out.append(w)
        return torch.stack(out, 0)

    def state_dict(self) -> dict[str, Any]:
        """Stored codes (one tensor ``[len, w_dim]``), settings and the random generator state: a resumed run
        continues exactly."""
        stored = torch.stack(self.codes, 0).cpu() if self.codes else torch.zeros(0)
        return {"size": self.size, "p": self.p, "codes": stored, "rng_state": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, Any], device: str | torch.device | None = None) -> None:
        """Restore what :meth:`state_dict` saved (codes moved to ``device`` when given)."""
        try:
            size, p, codes, rng = int(state["size"]), float(state["p"]), state["codes"], state["rng_state"]
        except (KeyError, TypeError, ValueError) as e:
            raise CycleEncodingError(f"latent pool state: missing or bad entry ({e})") from None
        if codes.ndim != 2 and codes.numel() != 0:
            raise CycleEncodingError(f"latent pool state: codes must be [n, w_dim], got {list(codes.shape)}")
        if codes.numel() and codes.shape[0] > size:
            raise CycleEncodingError(f"latent pool state: {codes.shape[0]} codes stored in a pool of size {size}")
        self.size, self.p = size, p
        self.codes = [c.to(device or codes.device, copy=True) for c in codes]  # none for the empty torch.zeros(0)
        self.generator.set_state(rng)
