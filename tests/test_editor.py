"""The Editor API: renders equal what ``cycle-encoding edit`` renders for the same run, direction and strength;
several directions add up as a hand computation says; exports load back in their layouts (NVIDIA's projected_w
``.npz``, the project's generator file); inversion from an image reports its progress; uploads are checked."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.checkpoints.encoder import save_encoder
from cycle_encoding.checkpoints.generator import load_generator, save_generator
from cycle_encoding.checkpoints.run_folder import InversionRun
from cycle_encoding.editing import interfacegan_direction, save_interfacegan, sefa_directions
from cycle_encoding.editing import sliders as sliders_mod
from cycle_encoding.editing.editor import Editor
from cycle_encoding.editing.render import EditRequest, named_directions, render_run_edits
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion import Inverter, load_generator_delta
from cycle_encoding.utils import save_image, to_uint8
from tests.conftest import make_tiny_generator, own_images, tiny_encoder

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


@pytest.fixture(autouse=True)
def own_cache(tmp_path, monkeypatch):
    """Directions computed by the editor go to a fresh cache folder, and the in-memory cache starts empty."""
    monkeypatch.setenv("CYCLE_ENCODING_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(sliders_mod, "_DIRECTION_CACHE", {})


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


def test_slider_ranges_cover_the_spread_of_the_generators_codes_and_the_cli_strengths(run):
    """Each range is max(spread of 2,000 mapping codes along the direction, 3) rounded up to a whole step of about
    1/40 of it (the module doc's rule), computed here independently of the editor's code."""
    ed = Editor(run["G"], directions=[run["dir"]], components=2)
    G = ed.base
    with torch.no_grad():
        z = torch.randn(2000, G.z_dim, generator=torch.Generator().manual_seed(0))
        codes = G.style(z).double()
    for d in ed.directions():
        v = d.set.vectors[d.component].double()
        unit = float(v.norm()) * (float(d.set.scales[d.component]) if d.set.scales is not None else 1.0)
        proj = codes @ (v / v.norm()) / unit  # each code's coordinate in the direction's strength units
        want = max(float(proj.max() - proj.min()), 3.0)  # 3: the largest default strength of `edit`
        n = d.limit / d.step
        assert abs(n - round(n)) < 1e-6 and 20 <= round(n) <= 80, (d.key, d.limit, d.step)
        assert want <= d.limit + 1e-9 and d.limit - d.step < want, (d.key, d.limit, want)
        mantissa = d.step / 10 ** np.floor(np.log10(d.step))
        assert min(abs(mantissa - m) for m in (1, 2, 5, 10)) < 1e-6


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


def test_cancel_stops_an_inversion_between_steps_and_the_editor_keeps_its_image(run):
    import threading

    from cycle_encoding.editing.editor import InversionCancelled

    ed = Editor(run["G"], str(run["root"] / "E.safetensors"), components=0, perceptual="none")
    ed.attach_run(run["run"], "im0")
    pivot, tuned = ed.pivot.clone(), ed.tuned
    target = np.asarray(Image.open(run["root"] / "images" / "im1.png"))
    stop = threading.Event()
    seen = []

    def progress(p):  # the user presses Cancel during the second tuning step
        seen.append((p.stage, p.step, p.done))
        if p.stage == "tune" and p.step == 2 and not p.done:
            stop.set()

    with pytest.raises(InversionCancelled, match="cancelled"):
        ed.invert(target, ("encoder", "tune"), progress=progress, cancel=stop, tune={"steps": 50, "lr": 0.01})
    # no step was reported after the one under way when the flag was set: the loop stopped between two steps
    assert [x for x in seen if x[0] == "tune"] == [("tune", 1, False), ("tune", 2, False)]
    assert ed.name == "im0" and torch.equal(ed.pivot, pivot) and ed.tuned is tuned
    # the inversion lock is free again, and a flag set before the start stops before the first step
    with pytest.raises(InversionCancelled):
        ed.invert(target, ("encoder", "tune"), cancel=stop, tune={"steps": 50})
    ed.invert(target, ("encoder", "tune"), cancel=threading.Event(), tune={"steps": 1})
    assert ed.name == "image" and ed.tuned is not tuned


def test_forks_share_a_run_images_tuned_generator_and_release_it(run):
    import gc
    import weakref

    ed = Editor(run["G"], components=0)
    a, b = ed.fork(), ed.fork()
    a.attach_run(run["run"], "im1")
    b.attach_run(run["run"], "im1")
    assert a.tuned is not None and a.tuned is b.tuned  # rebuilt once, shared
    ref = weakref.ref(a.tuned)
    a.open_image("im0")
    b.open_image("im0")
    gc.collect()
    assert ref() is None  # no editor has im1 open: its generator is gone


def test_export_names_the_files_for_the_image_and_the_edit(run, tmp_path):
    ed = Editor.open_run(run["run"], "im1", directions=[run["dir"]], components=1, methods=("sefa",))
    files = ed.export(tmp_path, {"thick": -1.25, "sefa:0": 2.0}, named=True)
    assert {k: p.name for k, p in files.items()} == {
        "png": "im1_thick-1.25_sefa-0+2.png", "npz": "im1_thick-1.25_sefa-0+2.npz",
        "json": "im1_thick-1.25_sefa-0+2.json", "generator": "im1_tuned-generator.safetensors"}  # fmt: skip
    assert ed.edit_name({}) == "im1_recon"
    ed.name = "a/b: " + "x" * 300  # unsafe characters go, a long name is cut and kept apart by a hash
    long = ed.edit_name({"thick": 1.0})
    assert len(long) == 120 and long.startswith("a-b-xxx") and re.fullmatch(r"[A-Za-z0-9_.+-]+", long)
    assert long != ed.edit_name({"thick": 2.0})


def test_a_colour_image_for_a_one_channel_generator_gets_a_note():
    ed = Editor("fmnist-generator", None, components=0)
    rgb = np.zeros((40, 40, 3), np.uint8)
    rgb[..., 0] = 200  # red
    notes: list[str] = []
    ed.load_image(rgb, notes=notes)
    assert len(notes) == 1 and "colour image" in notes[0] and "1-channel" in notes[0]
    notes.clear()
    ed.load_image(np.repeat(rgb[..., :1], 3, axis=2), notes=notes)  # grey stored as RGB: nothing to say
    assert notes == []
    ed.load_image(np.zeros((20, 20), np.uint8), notes=notes)  # smaller than 32 x 32: upsampled, said so
    assert len(notes) == 1 and "smaller than" in notes[0]


def test_generator_directions_are_computed_once_and_cached_on_disk(run, tmp_path):
    Editor(run["G"], components=2)
    files = sorted(p.name for p in (tmp_path / "cache" / "directions").iterdir())
    assert len(files) == 2 and any("sefa" in f for f in files) and any("ganspace" in f for f in files)
    # a fresh process (empty memory) reads them back instead of computing again
    sliders_mod._DIRECTION_CACHE.clear()
    calls = []
    orig = sliders_mod.load_directions

    def spy(p):
        calls.append(Path(p).name)
        return orig(p)

    sliders_mod.load_directions = spy
    try:
        ed = Editor(run["G"], components=2)
    finally:
        sliders_mod.load_directions = orig
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
    assert main(["ui", "--tune-steps", "3501"]) == 2  # bounded, said before anything loads
    assert "tuning steps must be 0-3500" in capsys.readouterr().err
    assert main(["ui", "--components", "0", "--device", "cpu", "--host", "0.0.0.0"]) == 0
    err = capsys.readouterr().err
    assert calls[-1][:2] == ("0.0.0.0", 7860) and "warning: binding 0.0.0.0" in err
    import os

    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False"


def test_api_calls_without_a_session_hold_at_most_max_sessions(run, tmp_path):
    """Each API call that comes without a browser session makes a session of its own (with its own tuned
    generator); beyond ``max_sessions`` the least recently used are released: editor, generator and folder."""
    import gc
    import socket
    import weakref

    pytest.importorskip("gradio")
    from gradio_client import Client, handle_file

    from cycle_encoding.ui.app import EditorApp

    ed = Editor(run["G"], str(run["root"] / "E.safetensors"), components=0, perceptual="none")
    app = EditorApp(ed, work_dir=tmp_path, tune_steps=1, max_sessions=2)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app.launch("127.0.0.1", port, block=False, quiet=True)
    refs = []
    try:
        for i in range(5):
            c = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=False, analytics_enabled=False)
            c.predict(handle_file(str(run["root"] / "images" / f"im{i % 2}.png")), ["encoder", "tune"], 1, False,
                      api_name="/on_invert")  # fmt: skip
            held = app.sessions.held()
            assert len(held) == min(i + 1, 2)
            newest = held[-1].editor
            assert newest is not None and newest.tuned is not None and newest.pivot is not None
            refs.append(weakref.ref(newest.tuned))
        gc.collect()
        assert sum(r() is not None for r in refs) == 2  # the three released generators are gone
        assert len(list(app.root.glob("session-*"))) == 2  # and so are their folders
    finally:
        app.close()
    assert not app.root.exists()


def test_sigterm_removes_the_servers_folder_and_a_start_removes_those_of_dead_servers(tmp_path):
    import os
    import signal
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    pytest.importorskip("gradio")
    if os.name != "posix":
        pytest.skip("signals and process probes are POSIX")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()  # a process id that is gone
    stale = tmp_path / f"cycle-encoding-ui-{dead.pid}-abc_123"
    (stale / "session-x").mkdir(parents=True)
    (stale / "session-x" / "edited.png").write_bytes(b"x" * 1000)
    alive = tmp_path / f"cycle-encoding-ui-{os.getpid()}-keep"  # this test's own process: running
    alive.mkdir()
    other = tmp_path / "cycle-encoding-ui-notapid"  # not a server folder's name: left alone
    other.mkdir()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(root / "src"), "OMP_NUM_THREADS": "1",
           "GRADIO_TEMP_DIR": str(tmp_path / "gradio"), "CYCLE_ENCODING_CACHE": str(tmp_path / "cache")}  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-m", "cycle_encoding.cli", "ui", "--components", "0", "--device", "cpu",
                             "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)  # fmt: skip
    try:
        lines = []
        for line in proc.stdout:  # the server says its address once it is listening
            lines.append(line)
            if line.startswith("editor: http"):
                break
        assert proc.poll() is None, "".join(lines)
        for _ in range(600):  # until the page is served (a hang, not slowness, would end this)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(1)
        mine = list(tmp_path.glob(f"cycle-encoding-ui-{proc.pid}-*"))
        assert len(mine) == 1 and mine[0].is_dir()
        assert not stale.exists() and alive.is_dir() and other.is_dir()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=600)  # a hang, not slowness, would reach this
    finally:
        if proc.poll() is None:
            proc.kill()
    # stopped as Ctrl-C stops it: 0 once serving, 130 ("interrupted") when the signal came while the server was
    # still finishing its start (not -15, killed without its clean-up); either way its folder is gone
    assert rc in (0, 130) and not mine[0].exists()
