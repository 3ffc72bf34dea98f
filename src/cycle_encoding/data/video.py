"""Video files and per-frame alignment: read and write clips, crop each frame for the generator, put edits back.
Design notes: docs/INTERNALS.md, "cycle_encoding.data.video"."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from ..errors import CycleEncodingError
from ..utils import max_pixels
from .align import align_face, ffhq_quad

AV_PIN = "av==18.1.0"
STILL_FORMATS = ("image2",)  # FFmpeg demuxers of single images (also every "*_pipe" one: png_pipe, jpeg_pipe, ...)


def import_av() -> Any:
    """The ``av`` module (PyAV), or a CycleEncodingError that says how to install it."""
    try:
        import av  # lazy: an optional dependency
    except ImportError:
        raise CycleEncodingError(f"video needs PyAV, which is not installed: pip install {AV_PIN}") from None
    return av


@dataclass
class VideoClip:
    """A video's frames (RGB uint8 ``[H, W, 3]``) and frame rate."""

    frames: list[np.ndarray]
    fps: Fraction
    source: str | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height)."""
        h, w = self.frames[0].shape[:2]
        return w, h


def read_video(path: str | Path, max_frames: int | None = None) -> VideoClip:
    """Every frame of the first video stream of ``path`` (at most ``max_frames``), with its frame rate."""
    av = import_av()
    p = Path(path)
    if not p.is_file():
        raise CycleEncodingError(f"{p}: no such video file")
    try:
        with av.open(str(p)) as c:
            fmt = c.format.name
            if not c.streams.video:
                raise CycleEncodingError(f"{p}: not a video (no video stream in this {fmt} file)")
            if fmt in STILL_FORMATS or fmt.endswith("_pipe"):
                raise CycleEncodingError(f"{p}: a still image, not a video (edit it with invert and edit)")
            s = c.streams.video[0]
            if s.width * s.height > max_pixels():
                raise CycleEncodingError(f"{p}: frames of {s.width}x{s.height} exceed --max-pixels {max_pixels()}")
            fps = Fraction(s.average_rate or s.guessed_rate or 25)
            frames: list[np.ndarray] = []
            for f in c.decode(s):
                frames.append(f.to_ndarray(format="rgb24"))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except av.FFmpegError as e:
        raise CycleEncodingError(f"{p}: not a video file FFmpeg can read ({e.strerror or e})") from None
    if not frames:
        raise CycleEncodingError(f"{p}: the video has no frames")
    return VideoClip(frames, fps, str(p))


class VideoWriter:
    """An H.264 MP4 written frame by frame (RGB uint8 ``[H, W, 3]``, or ``[H, W]`` grey), into a temporary file that
    replaces ``path`` on :meth:`close` (a killed run leaves no half video). yuv420p needs even sides: an odd side is
    padded by repeating the last row or column. ``crf``: libx264's quality, 0 (lossless luma) to 51; 18 looks lossless."""

    def __init__(self, path: str | Path, fps: Fraction | float, crf: int = 18) -> None:
        self.av = import_av()
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.path.with_name(f".{self.path.name}.tmp")
        self.fps = Fraction(fps).limit_denominator(1_000_000)
        if not 0 <= int(crf) <= 51:
            raise CycleEncodingError(f"crf must be 0..51, got {crf}")
        self.crf, self.frames = int(crf), 0
        self._c: Any = None
        self._s: Any = None

    def write(self, frame: np.ndarray) -> None:
        a = np.asarray(frame, dtype=np.uint8)
        if a.ndim == 2:
            a = np.repeat(a[..., None], 3, axis=2)
        h, w = a.shape[:2]
        if h % 2 or w % 2:
            a = np.pad(a, ((0, h % 2), (0, w % 2), (0, 0)), mode="edge")
        if self._c is None:
            self._c = self.av.open(str(self.tmp), "w", format="mp4")
            self._s = self._c.add_stream("libx264", rate=self.fps)
            self._s.width, self._s.height = a.shape[1], a.shape[0]
            self._s.pix_fmt = "yuv420p"
            self._s.options = {"crf": str(self.crf)}
        frame_ = self.av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")
        self._c.mux(self._s.encode(frame_))
        self.frames += 1

    def close(self) -> Path:
        """Flush, close and move the video into place."""
        if self._c is None:
            raise CycleEncodingError(f"{self.path}: no frames written")
        self._c.mux(self._s.encode())
        self._c.close()
        self._c = None
        os.replace(self.tmp, self.path)
        return self.path

    def abort(self) -> None:
        if self._c is not None:
            self._c.close()
            self._c = None
        self.tmp.unlink(missing_ok=True)


def write_video(path: str | Path, frames: Iterable[np.ndarray], fps: Fraction | float, crf: int = 18) -> Path:
    """Write ``frames`` as an H.264 MP4 at ``fps`` (see :class:`VideoWriter`)."""
    w = VideoWriter(path, fps, crf)
    try:
        for f in frames:
            w.write(f)
        return w.close()
    except BaseException:
        w.abort()
        raise


# -- where each frame's crop lies ---------------------------------------------------------------------------------


def rect_quad(x: float, y: float, w: float, h: float) -> np.ndarray:
    """The quad [4, 2] (upper-left, lower-left, lower-right, upper-right; pixel-index coordinates, so the frame's
    top-left pixel spans -0.5..0.5) of the rectangle of pixels x..x+w-1, y..y+h-1."""
    l, t, r, b = x - 0.5, y - 0.5, x + w - 0.5, y + h - 0.5
    return np.array([[l, t], [l, b], [r, b], [r, t]], dtype=np.float64)


def parse_crop(spec: str | Sequence[int], width: int, height: int) -> tuple[int, int, int, int]:
    """``"x,y,w,h"`` (pixels) checked against a frame of ``width`` x ``height``."""
    try:
        vals = [int(v) for v in (spec.split(",") if isinstance(spec, str) else spec)]
    except ValueError:
        vals = []
    if len(vals) != 4:
        raise CycleEncodingError(f"--crop takes x,y,w,h in pixels, got {spec!r}")
    x, y, w, h = vals
    if w < 1 or h < 1 or x < 0 or y < 0 or x + w > width or y + h > height:
        raise CycleEncodingError(f"--crop {x},{y},{w},{h} does not lie inside the {width}x{height} frame")
    return x, y, w, h


def smooth_track(values: Any, sigma: float, valid: Sequence[bool] | None = None) -> np.ndarray:
    """``values [T, ...]`` smoothed over the first axis by a Gaussian of ``sigma`` frames (cut at 3 sigma), each
    valid frame a weighted mean of the valid frames near it (weights renormalized); ``sigma`` <= 0 changes nothing."""
    v = np.array(values, dtype=np.float64)
    n = len(v)
    ok = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if sigma <= 0 or n < 2:
        return v
    filled = np.where(ok.reshape(-1, *[1] * (v.ndim - 1)), v, 0.0)
    r = max(1, math.ceil(3 * sigma))
    out = v.copy()
    for i in np.flatnonzero(ok):
        lo, hi = max(0, i - r), min(n, i + r + 1)
        w = np.exp(-0.5 * ((np.arange(lo, hi) - i) / sigma) ** 2) * ok[lo:hi]
        out[i] = np.tensordot(w / w.sum(), filled[lo:hi], axes=1)
    return out


def face_quads(
    frames: Sequence[np.ndarray], detector: Any, on_frame: Callable[[int, bool], None] | None = None
) -> list[np.ndarray | None]:
    """The FFHQ square of each frame's largest face (None where there is none)."""
    quads: list[np.ndarray | None] = []
    for i, f in enumerate(frames):
        faces = detector(f)
        quads.append(ffhq_quad(faces[0].landmarks)[0] if faces else None)
        if on_frame is not None:
            on_frame(i, bool(faces))
    return quads


def smooth_quads(quads: Sequence[np.ndarray | None], sigma: float) -> list[np.ndarray | None]:
    """Each quad averaged with its neighbours in time (:func:`smooth_track`; frames without one are left out). The
    average of FFHQ squares is a square: each corner is linear in the square's centre and half-axis."""
    ok = [q is not None for q in quads]
    if not any(ok):
        return list(quads)
    stack = np.stack([q if q is not None else np.zeros((4, 2)) for q in quads])
    sm = smooth_track(stack, sigma, ok)
    return [sm[i] if good else None for i, good in enumerate(ok)]


def crop_frame(frame: np.ndarray, quad: np.ndarray, size: int, ffhq: bool = False, channels: int = 3) -> Image.Image:
    """The frame's crop ``quad`` at ``size`` x ``size``: with ``ffhq``, rendered by ``align.align_face`` (the FFHQ
    recipe's padding where the square leaves the frame, supersampling); else the rectangle resized (Lanczos).
    ``channels`` 1: grey."""
    img = Image.fromarray(np.asarray(frame, dtype=np.uint8)).convert("RGB")
    if ffhq:
        out = align_face(img, np.zeros((68, 2)), size=size, quad=quad).image  # the quad decides, not the landmarks
    else:
        (l, t), (r, b) = quad[0], quad[2]
        out = img.resize((size, size), Image.Resampling.LANCZOS, box=(l + 0.5, t + 0.5, r + 0.5, b + 0.5))
    return out.convert("L") if channels == 1 else out


def paste_back(frame: np.ndarray, crop: Any, quad: np.ndarray, feather: float = 0.1) -> np.ndarray:
    """``frame`` (uint8 ``[H, W, 3]``) with ``crop`` (an image or array of any size, grey or RGB) warped onto
    ``quad`` by the inverse of the crop's transform: each frame pixel inside the quad samples the crop bilinearly
    at the point the crop transform sends it to, and is blended with the frame by a mask that rises from 0 at the
    quad's border to 1 at ``feather`` (a fraction of its side) inside, by a smoothstep; ``feather`` 0: a hard edge.
    A crop much larger than the quad in the frame is first reduced to that size (Lanczos), so it does not alias."""
    from scipy.ndimage import map_coordinates  # lazy: scipy takes 0.7 s to import

    out = np.asarray(frame, dtype=np.uint8)
    h, w = out.shape[:2]
    q = np.asarray(quad, dtype=np.float64)
    ax, ay = q[3] - q[0], q[1] - q[0]  # the crop's x and y axes in the frame
    pil = crop if isinstance(crop, Image.Image) else Image.fromarray(np.asarray(crop, dtype=np.uint8).squeeze())
    side = (max(1, round(math.hypot(*ax))), max(1, round(math.hypot(*ay))))
    if side[0] < pil.size[0] or side[1] < pil.size[1]:
        pil = pil.resize((min(side[0], pil.size[0]), min(side[1], pil.size[1])), Image.Resampling.LANCZOS)
    src = np.asarray(pil.convert("RGB"), dtype=np.float32)
    x0, x1 = max(0, math.floor(q[:, 0].min())), min(w, math.ceil(q[:, 0].max()) + 1)
    y0, y1 = max(0, math.floor(q[:, 1].min())), min(h, math.ceil(q[:, 1].max()) + 1)
    if x0 >= x1 or y0 >= y1:
        return out.copy()
    ys, xs = np.mgrid[y0:y1, x0:x1]
    rel = np.stack([xs.ravel(), ys.ravel()], axis=1) - q[0]
    a, b = np.linalg.solve(np.stack([ax, ay], axis=1), rel.T)  # fractions along the crop's axes
    d = np.minimum(np.minimum(a, 1 - a), np.minimum(b, 1 - b))
    if feather > 0:
        t = np.clip(d / feather, 0.0, 1.0)
        mask = t * t * (3 - 2 * t)
    else:
        mask = (d >= 0).astype(np.float64)
    coords = [b * src.shape[0] - 0.5, a * src.shape[1] - 0.5]
    sampled = np.stack([map_coordinates(src[..., c], coords, order=1, mode="nearest") for c in range(3)], axis=1)
    region = out[y0:y1, x0:x1].reshape(-1, 3).astype(np.float64)
    blended = region + (sampled - region) * mask[:, None]
    result = out.copy()
    result[y0:y1, x0:x1] = np.clip(np.rint(blended), 0, 255).astype(np.uint8).reshape(y1 - y0, x1 - x0, 3)
    return result


def side_by_side(images: Sequence[np.ndarray], max_width: int = 1920) -> np.ndarray:
    """Frames of one height next to each other (RGB uint8), scaled down to at most ``max_width`` pixels wide."""
    row = np.concatenate([np.asarray(i, dtype=np.uint8) for i in images], axis=1)
    if row.shape[1] <= max_width:
        return row
    s = max_width / row.shape[1]
    size = (max_width, max(2, round(row.shape[0] * s)))
    return np.asarray(Image.fromarray(row).resize(size, Image.Resampling.LANCZOS))
