"""dlib's face chips in PyTorch (:func:`face_chip_details`, :func:`extract_face_chips`), differentiable with respect
to the image. Design notes: docs/INTERNALS.md, "cycle_encoding.data.face_chips"."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import CycleEncodingError
from .align import AlignedFace

# dlib's 5-point template (get_face_chip_details): outer/inner corners of the (image-)right then left eye, nose.
DLIB_MEAN_FACE_5 = np.array(
    [
        [0.8595674595992, 0.2134981538014],
        [0.6460604764104, 0.2289674387677],
        [0.1205750620789, 0.2137274526848],
        [0.3340850613712, 0.2290642403242],
        [0.4901123135679, 0.6277975316475],
    ]
)
# dlib's mean positions of the 68-point landmarks 17..67 in a unit face box (get_face_chip_details).
_MEAN_X_17_67 = (
    0.000213256, 0.0752622, 0.18113, 0.29077, 0.393397, 0.586856, 0.689483, 0.799124,
    0.904991, 0.98004, 0.490127, 0.490127, 0.490127, 0.490127, 0.36688, 0.426036,
    0.490127, 0.554217, 0.613373, 0.121737, 0.187122, 0.265825, 0.334606, 0.260918,
    0.182743, 0.645647, 0.714428, 0.793132, 0.858516, 0.79751, 0.719335, 0.254149,
    0.340985, 0.428858, 0.490127, 0.551395, 0.639268, 0.726104, 0.642159, 0.556721,
    0.490127, 0.423532, 0.338094, 0.290379, 0.428096, 0.490127, 0.552157, 0.689874,
    0.553364, 0.490127, 0.42689,
)  # fmt: skip
_MEAN_Y_17_67 = (
    0.106454, 0.038915, 0.0187482, 0.0344891, 0.0773906, 0.0773906, 0.0344891,
    0.0187482, 0.038915, 0.106454, 0.203352, 0.307009, 0.409805, 0.515625, 0.587326,
    0.609345, 0.628106, 0.609345, 0.587326, 0.216423, 0.178758, 0.179852, 0.231733,
    0.245099, 0.244077, 0.231733, 0.179852, 0.178758, 0.216423, 0.244077, 0.245099,
    0.780233, 0.745405, 0.727388, 0.742578, 0.727388, 0.745405, 0.780233, 0.864805,
    0.902192, 0.909281, 0.902192, 0.864805, 0.784792, 0.778746, 0.785343, 0.778746,
    0.784792, 0.824182, 0.831803, 0.824182,
)  # fmt: skip
DLIB_MEAN_FACE_68 = np.stack([_MEAN_X_17_67, _MEAN_Y_17_67], axis=1)
# the 68-point indices dlib uses for chips: 27..54 and 60..64 (no jaw, eyebrows or lower lip)
DLIB_CHIP_POINTS_68 = np.array([i for i in range(27, 68) if not (55 <= i <= 59 or 65 <= i <= 67)])


def find_similarity_transform(src: np.ndarray, dst: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The least-squares similarity (rotation, uniform scale, translation; no reflection) taking points ``src``
    [N, 2] to ``dst`` [N, 2] (Umeyama 1991): returns (A [2, 2], t [2]) with dst ~ src @ A.T + t."""
    src, dst = np.asarray(src, dtype=np.float64), np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(axis=0), dst.mean(axis=0)
    s, d = src - mu_s, dst - mu_d
    var_s = (s**2).sum() / len(src)
    cov = d.T @ s / len(src)
    u, sig, vt = np.linalg.svd(cov)
    e = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        e[1, 1] = -1
    r = u @ e @ vt
    c = float(np.trace(np.diag(sig) @ e) / var_s) if var_s > 0 else 1.0
    a = c * r
    return a, mu_d - a @ mu_s


@dataclass
class ChipDetails:
    """dlib's ``chip_details``: a rotated square (centre, width/height in dlib's r - l + 1 convention, angle in
    radians) in the source image, sampled into a ``rows`` x ``cols`` chip."""

    center: tuple[float, float]
    width: float
    height: float
    angle: float
    rows: int
    cols: int

    def rect(self) -> tuple[float, float, float, float]:
        """(left, top, right, bottom): dlib's ``centered_drect``."""
        (cx, cy), hw, hh = self.center, (self.width - 1) / 2, (self.height - 1) / 2
        return (cx - hw, cy - hh, cx + hw, cy + hh)


def face_chip_details(landmarks: np.ndarray, size: int = 150, padding: float = 0.25) -> ChipDetails:
    """dlib's ``get_face_chip_details(shape, size, padding)`` for 68 or 5 landmarks [N, 2]."""
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape == (5, 2):
        template, pts = DLIB_MEAN_FACE_5, lm
    elif lm.shape == (68, 2):
        template, pts = DLIB_MEAN_FACE_68[DLIB_CHIP_POINTS_68 - 17], lm[DLIB_CHIP_POINTS_68]
    else:
        raise CycleEncodingError(f"face chips need 5 or 68 landmarks [N, 2], got an array of shape {lm.shape}")
    if padding < 0 or size < 1:
        raise CycleEncodingError(f"bad chip size {size} / padding {padding}")
    chip_pts = (padding + template) / (2 * padding + 1) * size
    a, t = find_similarity_transform(chip_pts, pts)
    p = a @ np.array([1.0, 0.0])
    scale = float(np.hypot(*p))
    center = a @ np.array([size / 2.0, size / 2.0]) + t
    return ChipDetails(
        center=(float(center[0]), float(center[1])),
        width=size * scale,
        height=size * scale,
        angle=math.atan2(p[1], p[0]),
        rows=size,
        cols=size,
    )


def _rect_down(r: Sequence[float]) -> tuple[float, float, float, float]:
    """dlib ``pyramid_down<2>::rect_down``: each corner p -> p/2 - (1.25, 0.75)."""
    l, t, rr, b = r
    return (l / 2 - 1.25, t / 2 - 0.75, rr / 2 - 1.25, b / 2 - 0.75)


def _area(r: Sequence[float]) -> float:
    l, t, rr, b = r
    return 0.0 if (t > b or l > rr) else (rr - l + 1) * (b - t + 1)


def _rotate(center: np.ndarray, p: np.ndarray, angle: float) -> np.ndarray:
    c, s = math.cos(angle), math.sin(angle)
    d = p - center
    return center + np.array([c * d[0] - s * d[1], s * d[0] + c * d[1]])


def _corners(r: Sequence[float], angle: float) -> dict[str, np.ndarray]:
    l, t, rr, b = r
    cen = np.array([(l + rr) / 2, (t + b) / 2])
    pts = {"tl": (l, t), "tr": (rr, t), "bl": (l, b), "br": (rr, b)}
    return {k: _rotate(cen, np.array(v, dtype=np.float64), angle) for k, v in pts.items()}


def _floor_st(x: torch.Tensor) -> torch.Tensor:
    """floor(x) in the forward pass, the identity in the backward pass (dlib stores integer pixels)."""
    return x + (torch.floor(x) - x).detach()


def _pyramid_down(x: torch.Tensor, exact: bool = True) -> torch.Tensor:
    """dlib ``pyramid_down<2>`` on [B, C, H, W] (0..255 scale): 5x5 binomial filter ([1 4 6 4 1]^2 / 256), every
    second pixel, truncated to integers like dlib's uint8 pixels when ``exact``; output pixel (r, c) is centred on
    input (2r + 2, 2c + 2); size ((H - 3) // 2, (W - 3) // 2)."""
    k1 = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=x.dtype, device=x.device)
    k = (k1[:, None] * k1[None, :] / 256.0).expand(x.shape[1], 1, 5, 5)
    y = F.conv2d(x, k, stride=2, groups=x.shape[1])
    return _floor_st(y) if exact else y


def _bilinear_dlib(img: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """dlib's ``interpolate_bilinear`` on [C, H, W] at float positions: 0 where a needed neighbour is outside."""
    _, h, w = img.shape
    x0, y0 = torch.floor(px), torch.floor(py)
    fx, fy = (px - x0).to(img.dtype), (py - y0).to(img.dtype)
    valid = (x0 >= 0) & (y0 >= 0) & (x0 + 1 <= w - 1) & (y0 + 1 <= h - 1)
    xi, yi = x0.long().clamp(0, max(w - 2, 0)), y0.long().clamp(0, max(h - 2, 0))
    flat = img.reshape(img.shape[0], -1)

    def at(yy: torch.Tensor, xx: torch.Tensor) -> torch.Tensor:
        return flat[:, (yy * w + xx).reshape(-1)].reshape(img.shape[0], *yy.shape)

    xj, yj = (xi + 1).clamp(max=w - 1), (yi + 1).clamp(max=h - 1)
    top = at(yi, xi) * (1 - fx) + at(yi, xj) * fx
    bot = at(yj, xi) * (1 - fx) + at(yj, xj) * fx
    out = top * (1 - fy) + bot * fy
    return out * valid.to(img.dtype)


def extract_face_chip(image: torch.Tensor, details: ChipDetails, exact: bool = True) -> torch.Tensor:
    """dlib's ``extract_image_chip`` in torch: image [C, H, W] in [-1, 1] -> chip [C, rows, cols] in [-1, 1]
    (black = -1 outside the image), differentiable with respect to the image.

    As dlib: if the chip is much smaller than its square in the image, the square is first reduced by dlib's 2x
    pyramid (built on the square's bounding box, grown by a border) until the next level would be smaller than the
    chip; then each chip pixel is sampled bilinearly, chip corners on the square's corners. ``exact`` truncates
    pyramid levels and chip pixels to integers as dlib's uint8 images do (a straight-through floor); then, for uint8
    photos, the chip equals dlib's ``get_face_chip`` to within one grey level.
    """
    if image.dim() != 3:
        raise CycleEncodingError(f"extract_face_chip expects one image [C, H, W], got {list(image.shape)}")
    x = (image + 1) * 127.5  # dlib's pixel scale; black background = 0
    _, h, w = x.shape
    rect = details.rect()
    rows, cols, angle = details.rows, details.cols, details.angle
    grow = 2.0
    r = _rect_down(rect)
    while _area(r) > rows * cols:
        r = _rect_down(r)
        grow = grow * 2 + 2
    corners = np.stack(list(_corners(rect, angle).values()))
    lo, hi = np.maximum(corners.min(0) - grow, 0.0), np.minimum(corners.max(0) + grow, [w - 1.0, h - 1.0])
    bl, bt, br, bb_ = (math.floor(v + 0.5) for v in (*lo, *hi))  # dlib's drectangle -> rectangle rounding
    if br < bl or bb_ < bt:
        return torch.full((x.shape[0], rows, cols), -1.0, dtype=image.dtype, device=image.device)
    src = x[:, bt : bb_ + 1, bl : br + 1]
    rect = (rect[0] - bl, rect[1] - bt, rect[2] - bl, rect[3] - bt)
    level = -1
    while _area(_rect_down(rect)) > rows * cols:
        level += 1
        rect = _rect_down(rect)
    for _ in range(level + 1):
        if src.shape[1] <= 8 or src.shape[2] <= 8:
            break
        src = _pyramid_down(src[None], exact)[0]
    cs = _corners(rect, angle)
    tl, tr, bl_ = cs["tl"], cs["tr"], cs["bl"]
    cc = torch.arange(cols, dtype=torch.float64, device=image.device) / max(cols - 1, 1)
    rr = torch.arange(rows, dtype=torch.float64, device=image.device) / max(rows - 1, 1)
    gy, gx = torch.meshgrid(rr, cc, indexing="ij")
    px = tl[0] + gx * (tr[0] - tl[0]) + gy * (bl_[0] - tl[0])
    py = tl[1] + gx * (tr[1] - tl[1]) + gy * (bl_[1] - tl[1])
    chip = _bilinear_dlib(src, px, py)
    if exact:
        # dlib truncates to uint8; the epsilon keeps float32 round-off from dropping a level
        chip = _floor_st(chip + 1e-3)
    return chip / 127.5 - 1


def extract_face_chips(
    image: torch.Tensor, landmarks: Sequence[np.ndarray], size: int = 150, padding: float = 0.25
) -> torch.Tensor:
    """dlib face chips [N, C, size, size] in [-1, 1] of the faces with ``landmarks`` (each [68, 2] or [5, 2]) in
    one image [C, H, W] in [-1, 1] (``get_face_chip_details(shape, size, padding)`` + ``extract_image_chip``)."""
    return torch.stack([extract_face_chip(image, face_chip_details(lm, size, padding)) for lm in landmarks])


def measure_chip_box(aligned: Sequence[AlignedFace], size: int = 150, padding: float = 0.25) -> dict[str, Any]:
    """Where dlib's chip lies in FFHQ-aligned images, from the source landmarks mapped into each aligned image:
    the mean and spread of the chip centre, side (fractions of the image side) and angle (degrees), and the mean
    box (left, top, right, bottom) -- how :data:`cycle_encoding.networks.dlib_resnet.FFHQ_CHIP_BOX` was found."""
    cx, cy, side, ang = [], [], [], []
    for a in aligned:
        s = a.image.size[0]
        d = face_chip_details(a.to_output(a.landmarks), size, padding)
        cx.append((d.center[0] + 0.5) / s)
        cy.append((d.center[1] + 0.5) / s)
        side.append(d.width / s)
        ang.append(math.degrees(d.angle))
    mx, my, ms = float(np.mean(cx)), float(np.mean(cy)), float(np.mean(side))
    return {
        "faces": len(cx),
        "center_x": (mx, float(np.std(cx))),
        "center_y": (my, float(np.std(cy))),
        "side": (ms, float(np.std(side))),
        "angle_deg": (float(np.mean(ang)), float(np.std(ang))),
        "box": (mx - ms / 2, my - ms / 2, mx + ms / 2, my + ms / 2),
    }
