"""SeFa (Shen & Zhou 2021, "Closed-Form Factorization of Latent Semantics in GANs"): editing directions from the
generator's weights alone.

Every style input i of the synthesis network is read by affine "modulation" layers (rosinality's
``conv.modulation``, an equalized linear map w_dim -> channels): ws[0] by ``conv1``; ws[i], 1 <= i <= N-2, by
``convs[i-1]``; the ToRGB layers read ws[1] (``to_rgb1``) and ws[3], ws[5], ... (``to_rgbs``). For the chosen layers,
stack their modulation weights A (rows = output channels, at their run-time scale) and take the eigenvectors of
A^T A with the largest eigenvalues: the unit directions n maximizing ||A n||, the largest change of the styles.
As SeFa's official code does, each row of A is first scaled to unit norm (``normalize=True``; rosinality's
``closed_form_factorization.py`` does not, and leaves out the ToRGB layers ``to_rgbs.*`` by key name, though not
``to_rgb1``; ``include_torgb=False`` here leaves out all of them). Eigenvectors are ordered by decreasing eigenvalue (computed with a symmetric solver: SeFa's ``np.linalg.eig``
does not promise an order) and signed so that the largest-magnitude entry is positive. The layers used are stored
with the set and are where its edits apply unless other layers are asked for.

Difference from e4e's SeFa editor (``editings/sefa.py``, which the Cycle Encoding authors' editing inherits): its
``factorize_weight(G, layers)`` reads the right modulation layers (``conv1`` for style 0, ``convs[l - 1]`` for style
l) but returns ``[l - 1 for l in layers if l != 0]`` as the layers, and its ``edit()`` adds the direction to those,
i.e. to the styles one BELOW the ones it factorized (asked for styles 0-5 it factorizes 0-5 and edits 0-4). Here an
edit moves exactly the styles the directions were factorized from (the correct pairing), so a SeFa edit of the same
"layers" differs from e4e's by that shift; to replay e4e's, edit with ``--layers`` shifted down by one.
"""

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
    """The top ``components`` eigenvectors of A^T A for the chosen style layers (see the module doc)."""
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
