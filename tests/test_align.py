"""Face alignment and dlib face chips: the FFHQ quad's geometry against its formula, the rendered alignment against
the source pixels, dlib's chip geometry and pixels against dlib itself, the eyes of real aligned faces against the
FFHQ positions (re-detected by the landmark detector), and the ``align`` command's messages."""

from __future__ import annotations

import functools
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.cli import main
from cycle_encoding.data import align as al
from cycle_encoding.data import face_chips as fc
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.networks import dlib_resnet as dr
from tests import assets


def synthetic_landmarks(center=(300.0, 260.0), eye_dist=60.0, mouth_drop=66.0, angle_deg=0.0) -> np.ndarray:
    """68 points whose eye centres and mouth corners are where we say (the rest only fill the array)."""
    lm = np.zeros((68, 2))
    ex = eye_dist / 2
    eye_l, eye_r = np.array([-ex, 0.0]), np.array([ex, 0.0])
    ring = np.array([[-8, 0], [-4, -3], [4, -3], [8, 0], [4, 3], [-4, 3]], dtype=float)  # mean 0
    lm[36:42] = eye_l + ring
    lm[42:48] = eye_r + ring
    lm[48:68] = [0.0, mouth_drop]
    lm[48] = [-25.0, mouth_drop]
    lm[54] = [25.0, mouth_drop]
    lm[0:36] = [0.0, 30.0]
    a = math.radians(angle_deg)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return lm @ rot.T + np.array(center)


# -- FFHQ alignment geometry (no dlib needed) -------------------------------------------------------------------


def test_ffhq_quad_follows_the_recipe_formula():
    e, h = 60.0, 66.0
    lm = synthetic_landmarks(eye_dist=e, mouth_drop=h)
    quad, qsize = al.ffhq_quad(lm)
    half = max(2 * e, 1.8 * h)  # |x| of the recipe
    assert qsize == pytest.approx(2 * half)
    c = np.array([300.0, 260.0 + 0.1 * h])  # eye midpoint + 0.1 * eye-to-mouth
    assert np.allclose(quad.mean(axis=0), c)
    assert np.allclose(quad[0], c - half) and np.allclose(quad[2], c + half)
    # where the eyes land at 256: centred horizontally, 0.1*h/(2*half) of the side above the centre
    size = 256
    eyes = al.quad_to_output(np.array([[300 - e / 2, 260.0], [300 + e / 2, 260.0]]), quad, size)
    y = size * (0.5 - 0.1 * h / (2 * half)) - 0.5
    assert np.allclose(eyes, [[size / 2 - size * e / (4 * half) - 0.5, y], [size / 2 + size * e / (4 * half) - 0.5, y]])


def test_ffhq_quad_rotates_with_the_face():
    q0, s0 = al.ffhq_quad(synthetic_landmarks(angle_deg=0))
    q1, s1 = al.ffhq_quad(synthetic_landmarks(angle_deg=25))
    assert s1 == pytest.approx(s0)
    a = math.radians(25)
    rot = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    assert np.allclose(q1, (q0 - [300, 260]) @ rot.T + [300, 260])
    # mapped back into the output, the rotated face's landmarks sit where the upright face's do
    lm0, lm1 = synthetic_landmarks(angle_deg=0), synthetic_landmarks(angle_deg=25)
    assert np.allclose(al.quad_to_output(lm1, q1, 128), al.quad_to_output(lm0, q0, 128))


def _smooth_image(h: int, w: int) -> np.ndarray:
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    r = 127.5 + 100 * np.sin(xx / 37.0) * np.cos(yy / 53.0)
    g = 127.5 + 100 * np.cos(xx / 41.0 + yy / 67.0)
    b = 20 + 0.3 * xx * 200 / w + 0.3 * yy * 200 / h
    return np.clip(np.stack([r, g, b], axis=2), 0, 255).round().astype(np.uint8)


@pytest.mark.parametrize("angle", [0.0, 17.0])
def test_aligned_pixels_come_from_where_the_quad_says(angle):
    src = _smooth_image(600, 640)
    lm = synthetic_landmarks(angle_deg=angle)
    a = al.align_face(src, lm, size=128)
    out = np.asarray(a.image).astype(np.float64)
    assert out.shape == (128, 128, 3)
    rng = np.random.default_rng(0)
    pts = np.array([300.0, 290.0]) + rng.uniform(-90, 90, size=(40, 2))
    uv = a.to_output(pts)
    inside = (uv > 4).all(axis=1) & (uv < 123).all(axis=1)
    assert inside.sum() > 20
    for p, (u, v) in zip(pts[inside], uv[inside]):
        got = out[round(v), round(u)]
        want = src[round(p[1]), round(p[0])].astype(np.float64)
        assert np.abs(got - want).max() < 12, (p, got, want)


def test_face_near_the_border_is_reflect_padded():
    src = _smooth_image(300, 300)
    lm = synthetic_landmarks(center=(40.0, 60.0), eye_dist=50, mouth_drop=55)
    a = al.align_face(src, lm, size=64)
    assert a.meta["padded"] and a.image.size == (64, 64)
    out = np.asarray(a.image)
    assert out.std() > 5  # reflected content, not a flat fill


def test_shrink_step_for_large_faces():
    src = _smooth_image(1500, 1500)
    lm = synthetic_landmarks(center=(750.0, 700.0), eye_dist=400, mouth_drop=440)
    a = al.align_face(src, lm, size=64, supersample=2)
    assert a.meta["shrink"] > 1 and a.image.size == (64, 64)


# -- dlib's chip geometry and pixels, in torch ------------------------------------------------------------------


def test_similarity_transform_recovers_a_known_one():
    rng = np.random.default_rng(3)
    src = rng.uniform(0, 100, size=(12, 2))
    a = 1.7 * np.array([[math.cos(0.4), -math.sin(0.4)], [math.sin(0.4), math.cos(0.4)]])
    t = np.array([12.0, -7.0])
    got_a, got_t = fc.find_similarity_transform(src, src @ a.T + t)
    assert np.allclose(got_a, a) and np.allclose(got_t, t)


def test_unrotated_unscaled_chip_is_a_plain_crop():
    img = torch.rand(3, 200, 220) * 2 - 1
    img = torch.round((img + 1) * 127.5) / 127.5 - 1  # integer pixels, as dlib's images are
    d = fc.ChipDetails(center=(20 + 74.5, 30 + 74.5), width=150, height=150, angle=0.0, rows=150, cols=150)
    chip = fc.extract_face_chip(img, d)
    assert torch.allclose(chip, img[:, 30:180, 20:170], atol=1e-5)


def test_chip_extraction_is_differentiable():
    img = (torch.rand(3, 400, 380, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    lm = synthetic_landmarks(center=(190.0, 170.0), eye_dist=110, mouth_drop=120, angle_deg=12)
    d = fc.face_chip_details(lm, 150, 0.25)
    assert d.width > 2 * 150 - 50  # large enough for dlib's pyramid path

    def f(x):
        return fc.extract_face_chip(x, d, exact=False).square().mean()

    (g,) = torch.autograd.grad(f(img), img)
    v = torch.randn_like(img)
    with torch.no_grad():
        fd = (f(img + 1e-6 * v) - f(img - 1e-6 * v)) / 2e-6
    assert (g * v).sum().item() == pytest.approx(fd.item(), rel=1e-5)
    (g2,) = torch.autograd.grad(fc.extract_face_chip(img, d).sum(), img)  # exact: straight-through floors
    assert g2.abs().sum() > 0


def test_chips_match_dlib():
    """Chip geometry (rect, angle) and pixels equal dlib's get_face_chip_details / get_face_chip, for 68- and
    5-point landmarks, including faces large enough for dlib's pyramid."""
    dlib = assets.require_dlib()
    sp68 = assets.predictor68()
    sp5 = dlib.shape_predictor(str(assets.asset(assets.DLIB_PREDICTOR_5)))
    photos = assets.assets((assets.TEST_IMAGES[3], assets.TEST_IMAGES[0], assets.DEMO_PHOTOS[0]))  # biden: pyramid
    n = 0
    for p in photos:
        img, faces = assets.detect(p)
        x = assets.to_tensor(img)
        for f in faces[:2]:
            rect = dlib.rectangle(*f.box)
            for sp in (sp68, sp5):
                shape = sp(img, rect)
                pts = np.array([[shape.part(i).x, shape.part(i).y] for i in range(shape.num_parts)], dtype=float)
                ref = dlib.get_face_chip_details(shape, 150, 0.25)
                d = fc.face_chip_details(pts, 150, 0.25)
                l, t, r, b = d.rect()
                assert (l, t, r, b) == pytest.approx(
                    (ref.rect.left(), ref.rect.top(), ref.rect.right(), ref.rect.bottom()), abs=1e-6
                )
                assert d.angle == pytest.approx(ref.angle, abs=1e-9)
                want = dlib.get_face_chip(img, shape, size=150, padding=0.25).astype(np.float64)
                got = ((fc.extract_face_chip(x.double(), d) + 1) * 127.5).permute(1, 2, 0).numpy()
                diff = np.abs(got - want)
                assert diff.max() <= 1.0 + 1e-6 and diff.mean() < 0.01, (p.name, diff.max(), diff.mean())
                n += 1
    assert n >= 6


# -- real photos: FFHQ alignment ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def _aligned_demo_faces() -> tuple:
    photos = assets.assets(assets.DEMO_PHOTOS) + assets.assets(assets.TEST_IMAGES[:4])
    out = []
    for p in photos:
        img, faces = assets.detect(p)
        for k, f in enumerate(faces):
            if f.box[2] - f.box[0] < 150:  # sample1's badge: a HOG false positive of about 100 px
                continue
            out.append((p.name, k, al.align_face(img, f.landmarks, size=256)))
    return tuple(out)


def test_aligned_eyes_sit_at_the_ffhq_positions():
    """Re-running the landmark detector on each 256 aligned face finds its eyes where the FFHQ geometry puts them."""
    assets.require_predictor()
    faces = _aligned_demo_faces()
    assert len(faces) >= 20
    redetect = al.LandmarkDetector(upsample=1)
    errors, largest, mids = [], [], []
    for name, k, a in faces:
        assert a.image.size == (256, 256)
        found = redetect(np.asarray(a.image))
        assert found, f"no face found again in the aligned {name} #{k}"
        lm = found[0].landmarks
        eyes = np.stack([lm[36:42].mean(axis=0), lm[42:48].mean(axis=0)])
        err = float(np.hypot(*(eyes - a.eyes).T).max())
        errors.append(err)
        if k == 0:
            largest.append((name, err))
        mids.append(eyes.mean(axis=0))
    errors = np.array(errors)
    assert max(e for _, e in largest) <= 3.0, largest  # the largest face of each photo: within 3 px
    assert np.median(errors) <= 1.5 and (errors <= 3.0).mean() >= 0.8, errors
    assert errors.max() <= 10.0, errors  # turned or made-up faces: landmark fits differ by a few more px
    mid = np.mean(mids, axis=0)  # the FFHQ eye line: centred, a little above the middle
    assert abs(mid[0] - 127.5) <= 2.0 and 0.44 * 256 <= mid[1] <= 0.49 * 256, mid


def test_ffhq_chip_box_constant_is_what_the_faces_give():
    assets.require_predictor()
    m = fc.measure_chip_box([a for _, _, a in _aligned_demo_faces()])
    assert np.allclose(m["box"], dr.FFHQ_CHIP_BOX, atol=0.01), m
    assert abs(m["angle_deg"][0]) < 3


# -- the align command ---------------------------------------------------------------------------------------------


def _run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["align", *args])
    printed = capsys.readouterr()
    return rc, printed.out, printed.err


def test_align_reports_images_without_a_face(tmp_path, capsys):
    assets.require_predictor()
    src = tmp_path / "in"
    src.mkdir()
    Image.fromarray(_smooth_image(200, 240)).save(src / "landscape.png")
    (src / "broken.jpg").write_bytes(b"not an image")
    photo = assets.asset(assets.TEST_IMAGES[0])
    (src / "obama.jpg").write_bytes(photo.read_bytes())
    rc, out, err = _run_cli(capsys, str(src), str(tmp_path / "out"), "--size", "128")
    assert rc == 3, err  # some images listed, the others aligned (2 is for bad input, nothing written)
    assert f"no face found: {src / 'landscape.png'}" in err
    assert "broken.jpg" in err and "cannot read" in err
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["obama.png"]
    assert Image.open(tmp_path / "out" / "obama.png").size == (128, 128)
    assert "aligned 1 face(s) from 1 image(s)" in out and "1 without a face" in out


def test_align_all_faces_and_resume(tmp_path, capsys):
    assets.require_predictor()
    photo = assets.asset(assets.DEMO_PHOTOS[2])  # sample3: three faces
    _, faces = assets.detect(photo)
    rc, _, err = _run_cli(capsys, str(photo), str(tmp_path / "out"), "--size", "64", "--all-faces", "--upsample", "0")
    assert rc == 0, err
    names = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert names == [f"sample3_{k:02d}.png" for k in range(len(faces))] and len(faces) >= 3
    rc, out, _ = _run_cli(capsys, str(photo), str(tmp_path / "out"), "--size", "64", "--all-faces", "--upsample", "0")
    assert rc == 0 and "1 already done" in out


def test_missing_dlib_and_predictor_say_how_to_install(monkeypatch):
    monkeypatch.setattr(al, "predictor_candidates", lambda: [])
    with pytest.raises(CycleEncodingError, match="apt-get install libdlib-data"):
        al.find_predictor()
    with pytest.raises(CycleEncodingError, match="no such landmark predictor"):
        al.find_predictor("/nonexistent/predictor.dat")
    monkeypatch.setenv(al.PREDICTOR_ENV, "/nonexistent/from-env.dat")
    with pytest.raises(CycleEncodingError, match="from-env"):
        al.find_predictor()
    monkeypatch.delenv(al.PREDICTOR_ENV)
    monkeypatch.setitem(sys.modules, "dlib", None)  # import dlib -> ImportError
    with pytest.raises(CycleEncodingError, match=r"pip install dlib-bin==20\.0\.1\.post1"):
        al.import_dlib()
    with pytest.raises(CycleEncodingError, match="dlib-bin"):
        al.LandmarkDetector()


def test_read_rgb_errors_name_the_file(tmp_path):
    (tmp_path / "x.png").write_bytes(b"\x89PNG broken")
    with pytest.raises(CycleEncodingError, match=r"x\.png"):
        al.read_rgb(tmp_path / "x.png")
    with pytest.raises(CycleEncodingError, match="no such file"):
        al.read_rgb(tmp_path / "missing.png")
