"""The Editor API: renders equal what ``cycle-encoding edit`` renders for the same run, direction and strength;
several directions add up as a hand computation says; exports load back in their layouts (NVIDIA's projected_w
``.npz``, the project's generator file); inversion from an image reports its progress; uploads are checked."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.checkpoints.encoder import save_encoder
from cycle_encoding.checkpoints.generator import load_generator, save_generator
from cycle_encoding.editing import editor as editor_mod
from cycle_encoding.editing import interfacegan_direction, save_interfacegan, sefa_directions
from cycle_encoding.editing.editor import Editor
from cycle_encoding.editing.render import EditRequest, InversionRun, named_directions, render_run_edits
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion import Inverter, load_generator_delta
from cycle_encoding.utils import save_image, to_uint8
from tests.conftest import make_tiny_generator, own_images, tiny_encoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Directions computed by the editor go to a fresh cache folder, and the in-memory cache starts empty."""
    monkeypatch.setenv("CYCLE_ENCODING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(editor_mod, "_DIRECTION_CACHE", {})


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A tiny generator and encoder as files, two of the generator's images inverted by encoder -> tune."""
    root = tmp_path_factory.mktemp("editor-run")
    G = make_tiny_generator(seed=2)
    save_generator(G, root / "G.safetensors")
    save_encoder(tiny_encoder(G), root / "E.safetensors")
    imgs = own_images(G, 2, seed=4)
    for i in range(2):
        save_image(imgs[i], root / "images" / f"im{i}.png")
    inv = Inverter(str(root / "G.safetensors"), str(root / "E.safetensors"), stages=("encoder", "tune"),
                   perceptual="none", device="cpu", tune={"steps": 4, "lr": 0.01, "locality": False})  # fmt: skip
    inv.run(root / "images", root / "run", log=lambda s: None)
    v = torch.nn.functional.normalize(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(7)), dim=0)
    save_interfacegan(interfacegan_direction(v), root / "thick.pt")
    return {"root": root, "run": root / "run", "G": root / "G.safetensors", "dir": root / "thick.pt", "v": v}


def pixels(img: Image.Image | Path) -> np.ndarray:
    if isinstance(img, Path):
        with Image.open(img) as im:
            return np.asarray(im.convert("RGB"))
    return np.asarray(img.convert("RGB"))


def test_render_equals_the_edit_command_for_a_file_direction_and_sefa(run, tmp_path):
    ed = Editor.open_run(run["run"], "im1", directions=[run["dir"]], components=3, methods=("sefa",))
    assert [d.key for d in ed.directions()] == ["thick", "sefa:0", "sefa:1", "sefa:2"]
    assert ed.tuned is not None and ed.name == "im1"
    # strength 0 everywhere: the run's own reconstruction, pixel for pixel
    im = InversionRun(run["run"]).image("im1")
    np.testing.assert_array_equal(pixels(ed.render({})), pixels(im.recon_path("tune")))
    # one direction: what `cycle-encoding edit` writes for the same run, direction and strength
    request = EditRequest(named_directions(str(run["dir"]), ed.base), 0, [-2.0, 1.5], tag="thick")
    doc = render_run_edits(run["run"], request, out_dir=tmp_path / "e1", log=lambda s: None)
    rec = next(r for r in doc["images"] if r["name"] == "im1")
    assert rec["generator"] == "tuned"
    np.testing.assert_array_equal(pixels(ed.render({"thick": 1.5})), pixels(tmp_path / "e1" / rec["files"][1]))
    np.testing.assert_array_equal(pixels(ed.render({"thick": -2.0})), pixels(tmp_path / "e1" / rec["files"][0]))
    # a SeFa component of the generator: the edit command's "sefa" directions, same component
    doc = render_run_edits(run["run"], EditRequest(named_directions("sefa", ed.base), 1, [2.5], tag="sefa"),
                           out_dir=tmp_path / "e2", log=lambda s: None)  # fmt: skip
    rec = next(r for r in doc["images"] if r["name"] == "im1")
    np.testing.assert_array_equal(pixels(ed.render({"sefa:1": 2.5})), pixels(tmp_path / "e2" / rec["files"][0]))
    # SeFa's vectors are the generator's top components
    want = sefa_directions(ed.base, components=3).vectors
    torch.testing.assert_close(ed.direction("sefa:2").set.vectors, want, rtol=0, atol=0)


def test_several_directions_add_up_on_their_layers(run):
    ed = Editor(run["G"], directions=[run["dir"]], components=2)  # sefa (its conv layers) and ganspace (all)
    ed.attach_run(run["run"], "im0")
    im = InversionRun(run["run"]).image("im0")
    Gt = load_generator_delta(im.delta_path, load_generator(run["G"]))
    sefa = ed.direction("sefa:1").set
    gs = ed.direction("ganspace:0").set
    assert gs.scales is not None and sefa.layers is not None
    ws = im.pivot.clone()
    ws += 0.8 * run["v"]  # the file's direction: every layer
    ws[:, list(sefa.layers)] += -1.5 * sefa.vectors[1]
    ws += 2.0 * float(gs.scales[0]) * gs.vectors[0]  # GANSpace strengths are in standard deviations
    with torch.no_grad():
        want = to_uint8(Gt.synthesis(ws, noise_mode="const"))[0]
    got = pixels(ed.render({"thick": 0.8, "sefa:1": -1.5, "ganspace:0": 2.0}))
    np.testing.assert_array_equal(got[:, :, :3], np.broadcast_to(want, got.shape))
    # GANSpace sliders run over +-3 std; the others over 3 std of the mapping's codes along the vector
    assert ed.direction("ganspace:0").limit == 3.0 and ed.direction("thick").limit > 0


def test_export_writes_files_that_load_back(run, tmp_path):
    ed = Editor.open_run(run["run"], "im1", directions=[run["dir"]], components=0)
    strengths = {"thick": -1.25}
    shown = ed.render(strengths)
    files = ed.export(tmp_path / "out")
    assert {p.name for p in files.values()} == {"edited.png", "codes.npz", "generator.safetensors", "edit.json"}
    np.testing.assert_array_equal(pixels(files["png"]), pixels(shown))
    with np.load(files["npz"], allow_pickle=False) as z:
        w, pivot = z["w"], z["pivot"]
    G = ed.base
    assert w.shape == (1, G.num_ws, G.w_dim) and w.dtype == np.float32  # NVIDIA's projected_w.npz layout
    np.testing.assert_array_equal(pivot, InversionRun(run["run"]).image("im1").pivot.numpy())
    # the generator written renders the codes written into the PNG written
    G2 = load_generator(files["generator"])
    with torch.no_grad():
        y = G2.synthesis(torch.from_numpy(w), noise_mode="const")
    np.testing.assert_array_equal(np.broadcast_to(to_uint8(y)[0], (*y.shape[-2:], 3)), pixels(files["png"]))
    doc = json.loads(files["json"].read_text())
    assert doc["strengths"] == strengths and doc["generator"] == "tuned" and doc["image"] == "im1"
    # an editor on the exported codes and generator renders the same edit
    ed2 = Editor(run["G"], directions=[run["dir"]], components=0)
    ed2.set_codes(pivot, files["generator"])
    np.testing.assert_array_equal(pixels(ed2.render(strengths)), pixels(shown))


def test_invert_from_an_image_reports_progress_and_becomes_the_image():
    ed = Editor("fmnist-generator", "fmnist-encoder", components=1)
    src = EXAMPLES / "test-00006-coat.png"
    events = []
    res = ed.invert(Image.open(src), ("encoder", "tune"), progress=events.append, tune={"steps": 3})
    steps = [(e.stage, e.step, e.total) for e in events if not e.done]
    assert steps[:1] == [("tune", 1, 3)] and steps[-1][:2] == ("tune", len(steps))
    done = [e for e in events if e.done]
    assert [e.stage for e in done] == ["encoder", "tune"] and all(e.image is not None for e in done)
    # each finished stage's picture is its reconstruction
    np.testing.assert_array_equal(pixels(done[1].image)[:, :, 0], to_uint8(res.recons["tune"])[0][:, :, 0])
    # the editor now edits this image with its tuned generator: strength 0 is the tuned reconstruction
    assert ed.tuned is res.generator and torch.equal(ed.pivot, res.pivots["encoder"])
    np.testing.assert_array_equal(pixels(ed.render({}))[:, :, 0], to_uint8(res.recons["tune"])[0][:, :, 0])
    # a path, a PIL image and a numpy array are one target
    arr = np.asarray(Image.open(src))
    t = ed.load_image(src)
    assert torch.equal(ed.load_image(arr), t) and torch.equal(ed.load_image(Image.open(src)), t)
    assert t.shape == (1, 1, 32, 32)


def test_generator_directions_are_computed_once_and_cached_on_disk(run, tmp_path):
    Editor(run["G"], components=2)
    files = sorted(p.name for p in (tmp_path / "cache" / "directions").iterdir())
    assert len(files) == 2 and any("sefa" in f for f in files) and any("ganspace" in f for f in files)
    # a fresh process (empty memory) reads them back instead of computing again
    editor_mod._DIRECTION_CACHE.clear()
    calls = []
    orig = editor_mod.load_directions

    def spy(p):
        calls.append(Path(p).name)
        return orig(p)

    editor_mod.load_directions = spy
    try:
        ed = Editor(run["G"], components=2)
    finally:
        editor_mod.load_directions = orig
    assert sorted(calls) == files
    assert [d.key for d in ed.directions()] == ["sefa:0", "sefa:1", "ganspace:0", "ganspace:1"]


def test_bad_requests_fail_with_one_line(run, tmp_path):
    ed = Editor(run["G"], components=1, methods=("sefa",))
    with pytest.raises(CycleEncodingError, match="no image yet"):
        ed.render({})
    ed.attach_run(run["run"])
    with pytest.raises(CycleEncodingError, match="no direction 'nope'"):
        ed.render({"nope": 1.0})
    with pytest.raises(CycleEncodingError, match="finite"):
        ed.render({"sefa:0": float("nan")})
    with pytest.raises(CycleEncodingError, match="need an encoder"):
        ed.invert(np.zeros((16, 16, 3), np.uint8), ("encoder",))
    other = Editor(make_tiny_generator(seed=9), components=0)
    with pytest.raises(CycleEncodingError, match="not this editor's generator"):
        other.attach_run(run["run"])
    with pytest.raises(CycleEncodingError, match="codes must be"):
        ed.set_codes(np.zeros((1, 3, 5), np.float32))


def test_uploads_are_checked_before_they_are_read(tmp_path):
    from cycle_encoding.ui.app import check_upload

    good = EXAMPLES / "test-00006-coat.png"
    check_upload(good, 10_000)
    text = tmp_path / "notes.png"
    text.write_text("not an image at all\n")
    with pytest.raises(CycleEncodingError, match="not an image"):
        check_upload(text, 10_000)
    with pytest.raises(CycleEncodingError, match="over the upload limit"):
        check_upload(good, 100)
    big = tmp_path / "big.png"
    Image.new("L", (300, 200)).save(big)
    with pytest.raises(CycleEncodingError, match="over the limit of 50,000 pixels"):
        check_upload(big, 10_000_000, max_pixels=50_000)


@pytest.mark.slow
def test_face_alignment_is_the_align_commands(tmp_path):
    """``align=True`` crops a photo as ``cycle-encoding align`` does (at the generator's resolution); an image with
    no face is refused."""
    from tests import assets

    assets.require_predictor()
    photo = assets.asset(assets.DEMO_PHOTOS[1])
    from cycle_encoding.cli import main

    assert main(["align", str(photo), str(tmp_path / "aligned"), "--size", "16"]) == 0
    from cycle_encoding.data.images import read_image

    want = read_image(tmp_path / "aligned" / f"{photo.stem}.png")
    ed = Editor(make_tiny_generator(seed=3), components=0)  # 16 x 16, 3 channels
    got = ed.load_image(photo, align=True)[0]
    assert got.shape == want.shape == (3, 16, 16)
    torch.testing.assert_close(got, want, rtol=0, atol=1 / 127.5 + 1e-6)  # the PNG rounds to 8 bits
    with pytest.raises(CycleEncodingError, match="no face found"):
        ed.load_image(EXAMPLES / "test-00006-coat.png", align=True)


def test_ui_command_binds_the_loopback_address_and_warns_otherwise(monkeypatch, capsys):
    pytest.importorskip("gradio")
    from cycle_encoding.cli import main
    from cycle_encoding.ui import app

    calls = []
    monkeypatch.setattr(app.EditorApp, "launch", lambda self, host, port, **kw: calls.append((host, port, self)))
    assert main(["ui", "--components", "0", "--device", "cpu", "--port", "7999"]) == 0
    err = capsys.readouterr().err
    assert calls[-1][:2] == ("127.0.0.1", 7999) and "warning" not in err
    ed = calls[-1][2].template
    assert ed.base.resolution == 32 and ed.has_encoder  # the shipped Fashion-MNIST models by default
    assert main(["ui", "--components", "0", "--device", "cpu", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert calls[-1][:2] == ("0.0.0.0", 7860) and "warning: binding 0.0.0.0" in err
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"
