"""SeFa (Shen & Zhou 2021): editing directions from the generator's modulation weights alone.
Design notes (and the layer shift of e4e's SeFa editor): docs/INTERNALS.md, "cycle_encoding.editing.sefa"."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import CycleEncodingError
from ..networks.stylegan2 import EqualLinear, Generator
from .directions import DirectionSet
from .ganspace import components_count, top_eigenvectors


def style_consumers(G: Generator, include_torgb: bool = False) -> list[list[tuple[str, EqualLinear]]]:
    """For each style input i (0..N-1): the (name, modulation layer) pairs that read ws[i]."""
    n = G.num_ws
    out: list[list[tuple[str, EqualLinear]]] = [[] for _ in range(n)]
    out[0].append(("conv1.conv.modulation", G.conv1.conv.modulation))
    for j, conv in enumerate(G.convs):
        out[j + 1].append((f"convs.{j}.conv.modulation", conv.conv.modulation))
    if include_torgb:
        out[1].append(("to_rgb1.conv.modulation", G.to_rgb1.conv.modulation))
        for j, rgb in enumerate(G.to_rgbs):
            out[3 + 2 * j].append((f"to_rgbs.{j}.conv.modulation", rgb.conv.modulation))
    return out


def modulation_matrix(
    G: Generator, layers: Sequence[int] | None = None, include_torgb: bool = False, normalize: bool = True
) -> tuple[torch.Tensor, list[str], list[int]]:
    """(A ``[sum of channels, w_dim]`` float64, the modulation layers' names, the style layers used)."""
    consumers = style_consumers(G, include_torgb)
    if layers is None:
        layers = [i for i, c in enumerate(consumers) if c]
    rows: list[torch.Tensor] = []
    names: list[str] = []
    used: list[int] = []
    for i in sorted(set(int(x) for x in layers)):
        if not 0 <= i < G.num_ws:
            raise CycleEncodingError(f"layer {i} does not exist: the generator has layers 0-{G.num_ws - 1}")
        if consumers[i]:
            used.append(i)
        for name, mod in consumers[i]:
            rows.append((mod.weight * mod.scale).detach().double().cpu())
            names.append(name)
    if not rows:
        raise CycleEncodingError(
            f"no modulation weights read layers {list(layers)}" + ("" if include_torgb else " (ToRGB left out)")
        )
    A = torch.cat(rows, 0)
    if normalize:
        A = A / A.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return A, names, used


@torch.no_grad()
def sefa_directions(
    G: Generator,
    layers: Sequence[int] | None = None,
    components: int | None = None,
    include_torgb: bool = False,
    normalize: bool = True,
) -> DirectionSet:
    """The top ``components`` eigenvectors of A^T A for the chosen style layers (see the design notes)."""
    A, names, used = modulation_matrix(G, layers, include_torgb, normalize)
    k = components_count(components, G.w_dim)
    evals, vectors = top_eigenvectors(A.t() @ A, k)
    return DirectionSet(
        "sefa",
        vectors.float(),
        values=evals[:k].float(),
        layers=tuple(used),
        names=[f"sefa{i}" for i in range(k)],
        meta={"modulations": names, "normalize_rows": normalize, "include_torgb": include_torgb},
    )
