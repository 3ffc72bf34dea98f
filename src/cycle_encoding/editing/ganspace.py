"""GANSpace (Härkönen et al. 2020): principal components of the mapping network's outputs.
Design notes: docs/INTERNALS.md, "cycle_encoding.editing.ganspace"."""

from __future__ import annotations

from typing import Any

import torch

from ..networks.stylegan2 import Generator
from .directions import DirectionSet


def components_count(components: int | None, d: int) -> int:
    """The number of components asked for, 1..d (None: all d)."""
    k = d if components is None else int(components)
    if not 1 <= k <= d:
        raise ValueError(f"components must be in 1..{d}, got {components}")
    return k


def top_eigenvectors(M: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(all eigenvalues of the symmetric ``M`` in decreasing order, the first ``k`` eigenvectors as rows), each
    eigenvector flipped so that its entry of largest magnitude is positive."""
    evals, evecs = torch.linalg.eigh((M + M.t()) / 2)
    order = torch.argsort(evals, descending=True)
    vectors = evecs[:, order[:k]].t()
    sign = torch.sign(torch.gather(vectors, 1, vectors.abs().argmax(dim=1, keepdim=True)))
    sign[sign == 0] = 1
    return evals[order], vectors * sign


@torch.no_grad()
def sample_mapping(G: Generator, n: int, seed: int = 0, batch: int = 4096, truncation: float = 1.0) -> torch.Tensor:
    """``n`` codes of ``G.style_batches`` ``[n, w_dim]``, on the CPU."""
    return torch.cat([w.float().cpu() for w in G.style_batches(n, seed, batch, truncation)])


@torch.no_grad()
def ganspace_pca(
    G: Generator,
    n_samples: int = 100_000,
    components: int | None = None,
    seed: int = 0,
    batch: int = 4096,
    truncation: float = 1.0,
) -> DirectionSet:
    """The principal components of ``n_samples`` mapping outputs (see the design notes); ``components`` keeps the first
    K (default: all w_dim)."""
    if n_samples < 2:
        raise ValueError("GANSpace needs at least 2 samples")
    d = G.w_dim
    k = components_count(components, d)
    s1 = torch.zeros(d, dtype=torch.float64)
    s2 = torch.zeros(d, d, dtype=torch.float64)
    shift = None  # sums are taken around the first batch's mean, for accuracy
    for w in G.style_batches(n_samples, seed, batch, truncation):
        w = w.double().cpu()
        if shift is None:
            shift = w.mean(0)
        w = w - shift
        s1 += w.sum(0)
        s2 += w.t() @ w
    assert shift is not None
    mean_c = s1 / n_samples
    cov = (s2 - n_samples * torch.outer(mean_c, mean_c)) / (n_samples - 1)
    evals, comp = top_eigenvectors(cov, k)
    var = evals[:k].clamp_min(0)
    # the total variance summed smallest eigenvalue first (eigh's order), so the ratios are those of a plain eigh
    meta: dict[str, Any] = {
        "samples": int(n_samples),
        "seed": int(seed),
        "truncation": float(truncation),
        "explained_variance_ratio": [round(float(v), 6) for v in (var / evals.flip(0).clamp_min(0).sum())[:10]],
        "of": "mapping outputs w = G.style(z)",
    }
    return DirectionSet(
        "ganspace",
        comp.float(),
        scales=var.sqrt().float(),
        mean=(shift + mean_c).float(),
        values=var.float(),
        names=[f"pc{i}" for i in range(k)],
        meta=meta,
    )
