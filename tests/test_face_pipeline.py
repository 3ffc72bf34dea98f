"""The face recipe end to end at small size, through the commands a user types:

a generator of config-f's shape at 256 px (8 mapping layers, 14 style inputs, rosinality's key layout; random
weights, every channel count divided by 16 and 64-d styles so that it runs in seconds) and a scaled-down encoder in
e4e's key layout (IR-SE body of 1 unit per block, 14 map2style heads, e4e's ``opts``), both written by the test in
the peers' layouts; real face photos from the registry cache (face-recognition 1.3.0's sdist) aligned inline at the
generator's size (``invert --align``), inverted (encoder -> a few tuning steps, dlib-face distance), edited with an
e4e-layout InterFaceGAN direction and a GANSpace PCA file (a named e4e edit), reported; every output file checked.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.assets import TEST_IMAGES, asset, load_embedder, require_predictor
from tests.layouts import e4e_encoder_sd, rosinality_g_ema

W_DIM = 64
SIZE = 256
NUM_WS = 14
PHOTOS = ("obama.jpg", "biden.jpg")


@pytest.fixture(scope="module")
def face_files(tmp_path_factory):
    require_predictor()
    load_embedder()  # the dlib-face distance's weights (skips when the face-api files are missing)
    photos = [asset(next(t for t in TEST_IMAGES if t.endswith("/" + n))) for n in PHOTOS]
    root = tmp_path_factory.mktemp("faces")
    (root / "photos").mkdir()
    for p in photos:
        (root / "photos" / p.name).symlink_to(p)
    g = torch.Generator().manual_seed(0)
    sd = rosinality_g_ema(SIZE, n_mlp=8, cm=2, style_dim=W_DIM, seed=1, channel_div=16)
    torch.save({"g_ema": sd, "latent_avg": 0.1 * torch.randn(W_DIM, generator=g)}, root / "stylegan2-config-f.pt")
    enc = e4e_encoder_sd(num_ws=NUM_WS, w_dim=W_DIM, widths=(8, 16, 24, 32), units=(1, 1, 1, 1), input_size=SIZE)
    opts = {"encoder_type": "Encoder4Editing", "stylegan_size": SIZE, "start_from_latent_avg": True,
            "lpips_lambda": 0.8, "id_lambda": 0.1, "dataset_type": "ffhq_encode"}  # fmt: skip
    torch.save(
        {"state_dict": {f"encoder.{k}": v * 0.05 for k, v in enc.items()}, "opts": opts,
         "latent_avg": 0.1 * torch.randn(1, W_DIM, generator=g).repeat(NUM_WS, 1)},
        root / "e4e_ffhq_encode.pt",
    )  # fmt: skip
    # e4e's editings/interfacegan_directions/smile.pt: a unit [1, w_dim] tensor
    v = torch.randn(1, W_DIM, generator=g)
    torch.save(v / v.norm(), root / "smile.pt")
    # e4e's editings/ganspace_pca/ffhq_pca.pt layout: mean [1, w], comp [K, 1, w] orthonormal, std [K]
    q, _ = torch.linalg.qr(torch.randn(W_DIM, W_DIM, generator=g))
    pca = {"mean": torch.zeros(1, W_DIM), "comp": q.t().contiguous()[:, None, :], "std": torch.linspace(2, 0.2, W_DIM)}
    torch.save(pca, root / "ffhq_pca.pt")
    return root


def png(path: Path, size: int | None = None, width: int | None = None) -> np.ndarray:
    assert path.is_file() and path.stat().st_size > 0, path
    with Image.open(path) as im:
        im.load()
        if size is not None:
            assert im.size == (size, size), (path, im.size)
        if width is not None:
            assert im.size[0] == width, (path, im.size)
        return np.asarray(im)


def test_face_recipe_end_to_end(face_files, tmp_path, capsys):
    from cycle_encoding.cli import main

    root = face_files
    gen, enc = str(root / "stylegan2-config-f.pt"), str(root / "e4e_ffhq_encode.pt")

    # the size the generator wants
    assert main(["align", "--generator", gen]) == 0
    assert f"makes {SIZE}x{SIZE} images" in capsys.readouterr().out

    # the encoder records e4e's losses (LPIPS-alex, ArcFace): offline, the error says what to use for faces
    run = tmp_path / "inv"
    base = ["invert", str(root / "photos"), "--generator", gen, "--encoder", enc, "--align", "--out", str(run),
            "--device", "cpu", "--quiet"]  # fmt: skip
    assert main([*base, "--stages", "encoder,tune"]) == 2
    err = capsys.readouterr().err
    assert "alexnet-owt-7be5be79.pth" in err and "--perceptual dlib-face" in err and err.count("\n") == 1

    # Method 1: encoder -> tune, faces aligned inline at 256
    code = main([*base, "--stages", "encoder,tune", "--perceptual", "dlib-face", "--tune-steps", "2"])
    err = capsys.readouterr().err
    assert code == 0, err
    assert "perceptual dlib-face" in err and "[option]" in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["options"]["align"] is True and cfg["encoder"]["config"]["num_ws"] == NUM_WS
    summary = json.loads((run / "summary.json").read_text())
    names = sorted(Path(p).stem for p in PHOTOS)
    assert summary["complete"] and sorted(summary["done"]) == names and not summary["failed"]
    for name in names:
        d = run / "images" / name
        target = png(d / "target.png", SIZE)
        assert target.std() > 20  # a photo, not a blank
        for stage in ("encoder", "tune"):
            png(d / f"recon_{stage}.png", SIZE)
        result = json.loads((d / "result.json").read_text())
        assert result["aligned"]["size"] == SIZE and len(result["aligned"]["quad"]) == 4
        assert "warning" not in result
        assert result["tune"]["updates"] == 2 and set(result["metrics"]) == {"encoder", "tune"}
        losses = [json.loads(line) for line in (d / "losses.jsonl").read_text().splitlines()]
        assert [r["stage"] for r in losses] == ["tune", "tune"] and all("perceptual" in r for r in losses)
        assert set(json.loads((d / "timings.json").read_text())) >= {"encoder", "tune", "total"}
        assert (d / "pivots.safetensors").stat().st_size > 0 and (d / "done").is_file()
        assert (d / "generator_delta.safetensors").stat().st_size > 0

    # edits: e4e's InterFaceGAN file, and a named GANSpace edit from e4e's PCA layout
    assert main(["edit", str(run), "--direction", str(root / "smile.pt"), "--strengths=-2,0,2", "--quiet"]) == 0
    assert main(["edit", str(run), "--direction", str(root / "ffhq_pca.pt"), "--component", "eye_openness",
                 "--quiet"]) == 0  # fmt: skip
    capsys.readouterr()
    for tag, count in (("smile", 3), ("eye_openness", 1)):
        folder = run / "edits" / tag
        doc = json.loads((folder / "edit.json").read_text())
        assert len(doc["images"]) == 2 and len(doc["strengths"]) == count
        for rec in doc["images"]:
            assert rec["generator"] == "tuned"
            files = [folder / f for f in rec["files"]]
            assert len(files) == count
            for f in files:
                png(f, SIZE)
            png(folder / rec["strip"])
        if tag == "smile":
            assert all(r["strength0_is_reconstruction"] for r in doc["images"])
        else:
            assert doc["mode"] == "set" and doc["layers"] == [7]
            assert doc["direction"]["named_edit"]["e4e_tuple"] == [54, 7, 8, 20.0]

    # the report
    assert main(["report", str(run)]) == 0
    capsys.readouterr()
    html = (run / "report.html").read_text()
    assert "dlib-face" in html and "eye_openness" in html and "smile" in html
    png(run / "report.png")
    assert json.loads((run / "report.json").read_text())


def test_a_target_smaller_than_the_generator_is_warned_about(face_files, tmp_path, capsys):
    from cycle_encoding.cli import main

    root = face_files
    small = tmp_path / "small"
    assert main(["align", str(root / "photos" / "obama.jpg"), str(small), "--size", "128"]) == 0
    run = tmp_path / "inv"
    code = main(["invert", str(small), "--generator", str(root / "stylegan2-config-f.pt"), "--encoder",
                 str(root / "e4e_ffhq_encode.pt"), "--stages", "encoder", "--out", str(run), "--device", "cpu",
                 "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "128x128 px, smaller than the generator's 256x256" in err and "--size 256" in err
    result = json.loads((run / "images" / "obama" / "result.json").read_text())
    assert "smaller than the generator's 256x256" in result["warning"]


def test_align_prints_the_size_a_generator_wants(tmp_path, capsys):
    """No dlib needed: `align --generator G` alone only reads the generator."""
    import cycle_encoding as ce
    from cycle_encoding.cli import main
    from tests.conftest import make_tiny_generator

    ce.save_generator(make_tiny_generator(resolution=32), tmp_path / "g.safetensors")
    assert main(["align", "--generator", str(tmp_path / "g.safetensors")]) == 0
    assert "makes 32x32 images: align its targets with --size 32" in capsys.readouterr().out
    assert main(["align"]) == 2
    assert "give INPUT and OUT" in capsys.readouterr().err


def test_library_inversion_warns_about_a_small_target():
    from cycle_encoding.inversion import Inverter
    from tests.conftest import make_tiny_generator

    G = make_tiny_generator(resolution=32)
    inv = Inverter(G, None, stages=("project",), perceptual="none", project={"steps": 1, "l2_lambda": 1.0})
    with pytest.warns(UserWarning, match=r"16x16 px, smaller than the generator's 32x32"):
        x = inv.load_image(torch.zeros(3, 16, 16))
    assert x.shape == (1, 3, 32, 32)
    notes: dict = {}
    inv.load_image(torch.zeros(3, 32, 32), notes)
    assert "warning" not in notes
