"""What values of the dlib-face distance mean: the distance between real aligned faces and mildly degraded copies of
them, and between different faces, to choose a tuning early-stop threshold for ``--perceptual dlib-face``.

The authors stop pivotal tuning at LPIPS-AlexNet 0.07 (PTI: 0.06). LPIPS needs torchvision's ImageNet AlexNet, which
these machines cannot have, so the two distances cannot be compared directly here; instead this measures the dlib-face
distance of defined, barely visible changes of real faces (JPEG re-encoding, a resample down and up, a slight blur) on
every face dlib finds in the registry's photos (face-api's demo pictures and face-recognition's test images, from the
cache: scripts/fetch_assets.sh), FFHQ-aligned at --size. Usage:

    .venv/bin/python benchmarks/dlib_face_threshold.py --size 256
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFilter

from cycle_encoding.data.align import LandmarkDetector, align_image, read_rgb
from cycle_encoding.losses.perceptual import build_perceptual
from cycle_encoding.paths import cache_dir


def jpeg(im: Image.Image, q: int) -> Image.Image:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=q)
    return Image.open(io.BytesIO(buf.getvalue())).convert("RGB")


def resample(im: Image.Image, factor: int) -> Image.Image:
    s = im.size[0]
    return im.resize((s // factor, s // factor), Image.Resampling.BICUBIC).resize((s, s), Image.Resampling.BICUBIC)


DEGRADATIONS = {
    "jpeg q90": lambda im: jpeg(im, 90),
    "jpeg q75": lambda im: jpeg(im, 75),
    "jpeg q50": lambda im: jpeg(im, 50),
    "down-up x2 (bicubic)": lambda im: resample(im, 2),
    "down-up x4 (bicubic)": lambda im: resample(im, 4),
    "gaussian blur 1 px": lambda im: im.filter(ImageFilter.GaussianBlur(1)),
    "gaussian blur 2 px": lambda im: im.filter(ImageFilter.GaussianBlur(2)),
}


def tensor(im: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None] / 127.5 - 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=256)
    args = ap.parse_args()
    cache = cache_dir(create=False)
    photos = sorted((cache / "face-api" / "demo").glob("*.jpg")) + sorted(
        (cache / "face-recognition" / "test_images").glob("*.jpg")
    )
    if not photos:
        sys.exit(f"no photos in {cache}: run scripts/fetch_assets.sh")
    det = LandmarkDetector()
    faces: list[Image.Image] = []
    for p in photos:
        for f in align_image(read_rgb(p), det, size=args.size, all_faces=True):
            if f.box is not None and (f.box[2] - f.box[0]) >= 80:  # dlib's HOG finds faces from ~80 px
                faces.append(f.image)
    dist = build_perceptual("dlib-face", "cpu")
    rows: dict[str, list[float]] = {}
    with torch.no_grad():
        xs = [tensor(f) for f in faces]
        for name, fn in DEGRADATIONS.items():
            rows[name] = [float(dist(x, tensor(fn(f)))[0]) for x, f in zip(xs, faces)]
        rows["another face"] = [float(dist(xs[i], xs[(i + 1) % len(xs)])[0]) for i in range(len(xs))]
    print(f"dlib-face distance, {len(faces)} faces from {len(photos)} photos, aligned at {args.size} px")
    print(f"{'change':<24} {'median':>8} {'q25':>8} {'q75':>8}")
    for name, v in rows.items():
        q = np.quantile(v, [0.25, 0.75])
        print(f"{name:<24} {statistics.median(v):8.4f} {q[0]:8.4f} {q[1]:8.4f}")
    print(Path(__file__).name, "done")


if __name__ == "__main__":
    main()
