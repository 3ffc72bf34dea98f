"""``cycle-encoding evaluate`` on folders written by the test: pairing by name, unmatched and unreadable files listed
(not fatal), networks named, JSON whose means are the means of its per-image values."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.cli import main

# torchvision AlexNet `features` convs: (index, out, in, kernel)
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]


def alexnet_features_state_dict() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    sd = {}
    for i, o, c, k in ALEX_CONVS:
        sd[f"features.{i}.weight"] = torch.randn(o, c, k, k, generator=g) * (2.0 / (c * k * k)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    return sd


@pytest.fixture
def folders(tmp_path):
    rng = np.random.default_rng(0)
    pred, target = tmp_path / "pred", tmp_path / "target"
    pred.mkdir()
    target.mkdir()
    images = {}
    for name in ("a", "b", "c", "d"):
        t = rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)
        p = np.clip(t.astype(int) + rng.integers(-30, 31, t.shape), 0, 255).astype(np.uint8)
        images[name] = (p, t)
        Image.fromarray(t, "RGB").save(target / f"{name}.png")
    Image.fromarray(images["a"][0], "RGB").save(pred / "a.png")
    Image.fromarray(images["b"][0], "RGB").save(pred / "b.bmp")  # another extension: paired by name
    Image.fromarray(images["c"][0][:, :, 0], "L").save(pred / "c.png")  # grey against an RGB target
    (pred / "d.png").write_bytes(b"not an image at all")  # unreadable
    Image.fromarray(images["a"][0], "RGB").save(pred / "extra.png")  # no target
    (pred / "log.txt").write_text("not an image")
    Image.fromarray(images["a"][1], "RGB").save(target / "lonely.png")  # no prediction
    return pred, target, images


def test_evaluate_folders_to_json(folders, tmp_path, stand_in_dlib, capsys):
    pred, target, images = folders
    backbone = tmp_path / "alexnet-features.pth"
    torch.save(alexnet_features_state_dict(), backbone)
    out = tmp_path / "report.json"
    rc = main(["evaluate", "--pred", str(pred), "--target", str(target), "--lpips-backbone", str(backbone),
               "--identity", "dlib-face", "--json", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 3  # everything measured and written; an unreadable file is listed and makes the status non-zero
    text = capsys.readouterr().out
    assert "perceptual: lpips-alex (backbone alexnet-features.pth)" in text
    assert "identity: dlib-resnet-face" in text
    assert (
        "unreadable: pred/d.png" in text and "only in pred: extra.png" in text and "only in target: lonely.png" in text
    )

    rep = json.loads(out.read_text())
    assert rep["networks"] == {
        "perceptual": "lpips-alex (backbone alexnet-features.pth)",
        "identity": "dlib-resnet-face",
    }
    assert [r["name"] for r in rep["images"]] == ["a", "b", "c"]
    assert rep["pred_only"] == ["extra.png"] and rep["target_only"] == ["lonely.png"]
    assert [u["file"] for u in rep["unreadable"]] == ["pred/d.png"]
    assert any("log.txt" in i for i in rep["ignored"])
    by_name = {r["name"]: r for r in rep["images"]}
    assert any("channels differ: pred has 1, target 3" in n for n in by_name["c"]["notes"])
    # per-image MSE from the files, computed here with numpy on the [-1, 1] scale
    for name in ("a", "b"):
        p, t = (x.astype(np.float64) / 127.5 - 1 for x in images[name])
        assert by_name[name]["mse"] == pytest.approx(((p - t) ** 2).mean(), rel=1e-5)
    p = np.repeat(images["c"][0][:, :, :1], 3, axis=2).astype(np.float64) / 127.5 - 1
    assert by_name["c"]["mse"] == pytest.approx(((p - (images["c"][1] / 127.5 - 1)) ** 2).mean(), rel=1e-5)
    # summary = mean and sample std of the per-image values
    for m in ("mse", "psnr", "ssim", "perceptual", "identity"):
        vals = [r[m] for r in rep["images"]]
        assert rep["summary"][m]["n"] == 3
        assert rep["summary"][m]["mean"] == pytest.approx(np.mean(vals), rel=1e-9)
        assert rep["summary"][m]["std"] == pytest.approx(np.std(vals, ddof=1), rel=1e-9)
    assert all(0 < r["perceptual"] for r in rep["images"]) and all(-1 <= r["identity"] <= 1 for r in rep["images"])
    # 48 px images: MS-SSIM is n/a, with the reason
    assert rep["summary"]["ms_ssim"]["n"] == 0 and all(r["ms_ssim"] is None for r in rep["images"])
    assert "needs both sides > 160 px" in rep["summary"]["ms_ssim"]["note"]


def test_evaluate_without_networks_and_with_resize(folders, tmp_path, capsys):
    pred, target, _ = folders
    out = tmp_path / "r.json"
    assert (
        main(["evaluate", "--pred", str(pred), "--target", str(target), "--size", "32", "--json", str(out), "--quiet"])
        == 3  # pred/d.png is unreadable
    )
    rep = json.loads(out.read_text())
    assert rep["networks"] == {"perceptual": None, "identity": None}
    assert rep["metrics"] == ["mse", "psnr", "ssim", "ms_ssim"] and all(r["size"] == [32, 32] for r in rep["images"])
    assert "perceptual: not computed" in capsys.readouterr().out


def test_evaluate_errors(folders, tmp_path, capsys):
    pred, target, _ = folders
    # LPIPS without its backbone: a one-line error naming the file, exit status 2
    assert main(["evaluate", "--pred", str(pred), "--target", str(target), "--perceptual", "lpips-alex"]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and err.count("\n") == 1
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["evaluate", "--pred", str(empty), "--target", str(target)]) == 2
    assert "no image pairs" in capsys.readouterr().err
