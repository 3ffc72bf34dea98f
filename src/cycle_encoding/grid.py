"""Labelled image grids as PNG: the edit strips and the report's overview grid.
Design notes: docs/INTERNALS.md, "cycle_encoding.grid"."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from .utils import atomic_write, open_image, to_pil


def as_pil(image: object) -> Image.Image | None:
    """A PIL RGB image from a PIL image, a tensor [C, H, W] in [-1, 1] or a file."""
    if image is None:
        return None
    if isinstance(image, (str, Path)):
        with open_image(image) as im:  # bounded in pixels, one-line errors
            return im.convert("RGB")
    if isinstance(image, torch.Tensor):
        return to_pil(image[0] if image.ndim == 4 else image).convert("RGB")
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    raise TypeError(f"not an image: {type(image).__name__}")


def _text_size(draw: ImageDraw.ImageDraw, text: str, font: object) -> tuple[int, int]:
    l, t, r, b = draw.textbbox((0, 0), text, font=font)  # type: ignore[arg-type]
    return r - l, b - t


def _fit_label(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> str:
    if _text_size(draw, text, font)[0] <= width:
        return text
    while len(text) > 1 and _text_size(draw, text + "…", font)[0] > width:
        text = text[:-1]
    return text + "…"


def _pieces(draw: ImageDraw.ImageDraw, word: str, font: object, width: int) -> list[str]:
    """A word too wide for ``width`` split after its hyphens, else between characters, and the pieces joined back
    while they fit ("ankle-boot-" on one line)."""
    if _text_size(draw, word, font)[0] <= width:
        return [word]
    out: list[str] = []
    for part in re.findall(r"[^-]*-|[^-]+", word):
        while part:
            n = len(part)
            while n > 1 and _text_size(draw, part[:n], font)[0] > width:
                n -= 1
            piece, part = part[:n], part[n:]
            if out and _text_size(draw, out[-1] + piece, font)[0] <= width:
                out[-1] += piece
            else:
                out.append(piece)
    return out


def wrap_label(draw: ImageDraw.ImageDraw, text: str, font: object, width: int) -> list[str]:
    """``text`` on as many lines of at most ``width`` pixels as it needs: nothing is cut off."""
    lines: list[str] = []
    for word in str(text).split():
        for piece in _pieces(draw, word, font, width):
            if lines and _text_size(draw, f"{lines[-1]} {piece}", font)[0] <= width and not lines[-1].endswith("-"):
                lines[-1] = f"{lines[-1]} {piece}"
            else:
                lines.append(piece)
    return lines or [""]


def cell_size(side: int, min_cell: int, max_cell: int) -> int:
    """The side an image of ``side`` pixels is shown at: enlarged by a whole factor to at least ``min_cell``, or
    reduced to at most ``max_cell``."""
    return min(side, max_cell) if side >= min_cell else side * -(-min_cell // side)


def compose_grid(
    rows: Sequence[Sequence[object]],
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    min_cell: int = 96,
    max_cell: int = 256,
    pad: int = 4,
) -> Image.Image:
    """One RGB image laying out ``rows`` of images (see the design notes)."""
    pils = [[as_pil(x) for x in row] for row in rows]
    sides = [max(p.size) for row in pils for p in row if p is not None]
    if not sides:
        raise ValueError("no images to lay out")
    cell = cell_size(max(sides), min_cell, max_cell)
    ncols = max(len(r) for r in pils)
    font = ImageFont.load_default()
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = _text_size(probe, "Ag-0.5", font)[1] + 4
    wrapped = [wrap_label(probe, str(t), font, cell) for t in (col_labels or [])[:ncols]]
    head_h = max((len(w) for w in wrapped), default=1) * line_h + pad if col_labels else 0
    label_w = 0
    if row_labels:
        label_w = min(200, max(_text_size(probe, s, font)[0] for s in row_labels) + 2 * pad)
    width = label_w + pad + ncols * (cell + pad)
    height = head_h + pad + len(pils) * (cell + pad)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for j, lines in enumerate(wrapped):  # column labels wrap instead of being cut ("ankle-boot-sneaker +6")
        for k, s in enumerate(lines):
            w = _text_size(draw, s, font)[0]
            x = label_w + pad + j * (cell + pad) + (cell - w) // 2
            draw.text((x, pad // 2 + k * line_h), s, fill=(0, 0, 0), font=font)
    for i, row in enumerate(pils):
        y = head_h + pad + i * (cell + pad)
        if row_labels and i < len(row_labels):
            s = _fit_label(draw, str(row_labels[i]), font, label_w - pad)
            draw.text((pad, y + cell // 2 - line_h // 2), s, fill=(0, 0, 0), font=font)
        for j, im in enumerate(row):
            x = label_w + pad + j * (cell + pad)
            if im is None:
                draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(220, 220, 220))
                continue
            w, h = im.size
            scale = cell / max(w, h)
            size = (max(1, round(w * scale)), max(1, round(h * scale)))
            resample = Image.Resampling.NEAREST if scale >= 1 else Image.Resampling.LANCZOS
            canvas.paste(im.resize(size, resample), (x + (cell - size[0]) // 2, y + (cell - size[1]) // 2))
    return canvas


def save_png(image: Image.Image, path: str | Path) -> Path:
    """Save a PIL image as PNG, atomically."""
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def strength_label(a: float) -> str:
    """``-3``, ``+1.5``, ``0``: a strength as a column label."""
    return "0" if a == 0 else f"{a:+g}"


def strip_image(target: object, edits: Sequence[object], strengths: Sequence[float]) -> Image.Image:
    """One row: the input (when given), then the edits labelled by strength (0 marked as the reconstruction)."""
    head: list[object] = [target] if target is not None else []
    labels = ["input"] * len(head) + [("0 (recon)" if a == 0 else strength_label(a)) for a in strengths]
    return compose_grid([[*head, *edits]], col_labels=labels)
