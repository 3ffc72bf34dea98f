"""A hostile-but-fair corpus, built here and never committed: each crafted file or bad value has one exact outcome
(exit status, the one-line message), and no code from a file runs and no earlier output is lost.

Issue 12's defects, each kept fixed: shipped names everywhere a file is taken (1), NVIDIA pickles with numpy scalars
(2), run files that lead outside the run (3), a failed edit that deleted the earlier one (4), own-format files that
declare a bigger network than their tensors (5), decompression bombs (6), torch's refusal advice (7), renders and the
CPU thread count (8), one corrupt image folder (10), bad values (11), ``--debug`` before the command (13).
"""

from __future__ import annotations

import base64
import json
import os
import pickle
import re
import shutil
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import cycle_encoding as ce
from cycle_encoding.assets import card_sha256, shipped_model_card, shipped_model_path
from cycle_encoding.checkpoints.native import META_KEY, file_sha256, read_native
from cycle_encoding.cli import main
from cycle_encoding.data.images import read_image
from cycle_encoding.editing import interfacegan_direction, save_interfacegan
from cycle_encoding.errors import CheckpointError, CycleEncodingError, UnsafePickleError
from cycle_encoding.inversion import Inverter, load_generator_delta, save_generator_delta
from cycle_encoding.losses.perceptual import FeatureMapDistance
from cycle_encoding.utils import DEFAULT_MAX_PIXELS, save_image, set_max_pixels
from tests.conftest import make_tiny_generator
from tests.layouts import StandInModules, nvidia_from_rosinality


@pytest.fixture(autouse=True)
def default_pixel_limit():
    yield
    set_max_pixels(DEFAULT_MAX_PIXELS)  # a test that lowered it leaves the default behind


def one_error_line(err: str) -> str:
    """The single line a user error prints (nothing else on stderr)."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


def render(G) -> torch.Tensor:
    ws = G.w_avg[None, None].expand(1, G.num_ws, -1) + 0.5
    with torch.no_grad():
        return G.synthesis(ws, noise_mode="const")


class StandInFeatures(torch.nn.Module):
    """A fixed random conv net: the perceptual distance of the tiny runs (no weights to download)."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.c = torch.nn.Conv2d(3, 4, 3, padding=1)
        with torch.no_grad():
            self.c.weight.copy_(torch.randn(self.c.weight.shape, generator=g) * 0.3)
            self.c.bias.zero_()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [torch.relu(self.c(x))]


@pytest.fixture(scope="module")
def run64(tmp_path_factory):
    """An inversion run (project, tune) of 3 images of a tiny 64 px generator, made with one CPU thread: at 64 px
    this machine's renders with 1 and 2 threads differ in their last bits."""
    root = tmp_path_factory.mktemp("run64")
    G = make_tiny_generator(seed=1, resolution=64)
    ce.save_generator(G, root / "G.safetensors")
    with torch.no_grad():
        imgs = G(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(5)))
    for i in range(3):
        save_image(imgs[i], root / "images" / f"im{i}.png")
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        inv = Inverter(
            str(root / "G.safetensors"), None, stages=("project", "tune"), perceptual="none",
            perceptual_net=FeatureMapDistance(StandInFeatures(), name="stand-in"), device="cpu",
            tune={"steps": 2, "lr": 0.01, "locality": False}, project={"steps": 2},
        )  # fmt: skip
        inv.run(root / "images", root / "run", log=lambda s: None)
    finally:
        torch.set_num_threads(n)
    direction = root / "dir.pt"
    save_interfacegan(
        interfacegan_direction(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(2))), direction
    )
    return {"root": root, "run": root / "run", "G": root / "G.safetensors", "direction": direction}


def copy_run(run64, tmp_path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run64["run"], dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["generator"]["file"] = str(run64["G"])
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# --- 1. shipped model names --------------------------------------------------------------------------------------


def test_shipped_generator_name_converts_and_trains_an_encoder_to_its_end(tmp_path, capsys):
    sha = card_sha256(shipped_model_card("fmnist-generator"))
    assert main(["convert", "fmnist-generator", str(tmp_path / "g.safetensors")]) == 0
    assert read_native(tmp_path / "g.safetensors").provenance["source_sha256"] == sha
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "L").save(data / f"{i}.png")
    rc = main(["train-encoder", "--generator", "fmnist-generator", "--encoder-init", "fmnist-encoder", "--data",
               str(data), "--out", str(tmp_path / "runs"), "--preset", "w", "--total-steps", "100", "--max-steps", "2",
               "--perceptual", "none", "--encoder-widths", "32,48,64,128", "--encoder-units", "1,2,2,1",
               "--batch-size", "2", "--val-count", "2", "--device", "cpu"])  # fmt: skip
    assert rc == 0, capsys.readouterr().err
    run = next((tmp_path / "runs").iterdir())
    prov = read_native(run / "encoder.safetensors").provenance
    assert prov["generator_sha256"] == sha == file_sha256(shipped_model_path("fmnist-generator"))
    log = (run / "log.jsonl").read_text()
    assert "all weights from encoder fmnist-encoder.safetensors" in log


def test_edit_takes_a_shipped_generator_name(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    rc = main(["edit", str(run), "--direction", str(run64["direction"]), "--generator", "fmnist-generator", "--quiet"])
    # the shipped generator is found (then refused as not the run's), not reported missing
    assert rc == 2
    assert "is not the one" in one_error_line(capsys.readouterr().err)


# --- 2 and 7. pickles and torch files ----------------------------------------------------------------------------


class NumpyLayers(StandInModules):
    """NVIDIA's layers as its own code pickles them: numpy float64 attributes beside the tensors
    (``weight_gain = lr_multiplier / np.sqrt(in_features)``, ``act_gain = np.sqrt(2)``)."""

    def persistent(self, class_name, **kw):
        obj = super().persistent(class_name, **kw)
        state = obj.__reduce__()[1][0]["state"]
        state["weight_gain"] = np.float64(0.01) / np.sqrt(np.float64(32))
        state["act_gain"] = np.sqrt(np.float64(2))
        state["conv_clamp"] = np.float32(256)
        return obj


def nvidia_pickle_bytes(G, protocol: int) -> bytes:
    with NumpyLayers() as s:
        return pickle.dumps({"G_ema": nvidia_from_rosinality(G, s), "augment_pipe": None}, protocol=protocol)


@pytest.mark.parametrize(
    "protocol,numpy_module",
    [
        (4, "numpy._core.multiarray"),
        (3, "numpy.core.multiarray"),
        (3, "numpy._core.multiarray"),
        (2, "numpy.core.multiarray"),
    ],
)
def test_nvidia_pickle_with_numpy_scalars_loads(tmp_path, protocol, numpy_module):
    G0 = make_tiny_generator(resolution=16)
    data = nvidia_pickle_bytes(G0, protocol)
    assert b"numpy._core.multiarray" in data and b"dtype" in data  # what numpy 2 writes
    if numpy_module == "numpy.core.multiarray":  # numpy 1 wrote this name: protocols <= 3 name globals as text
        data = data.replace(b"cnumpy._core.multiarray\nscalar\n", b"cnumpy.core.multiarray\nscalar\n")
        assert b"numpy.core.multiarray\nscalar" in data
    (tmp_path / "ffhq.pkl").write_bytes(data)
    G = ce.load_generator(tmp_path / "ffhq.pkl")
    assert torch.equal(render(G), render(G0))


class Call:
    """Pickles as a call of ``func(*args)``: how a crafted pickle asks for a function."""

    def __init__(self, func, *args) -> None:
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def hostile_pickles(marker: Path) -> dict[str, tuple[bytes, str]]:
    import codecs

    from numpy.testing._private.utils import runstring

    scalar = np._core.multiarray.scalar
    code = f"open({str(marker)!r}, 'w').write('ran')"
    return {
        # a numpy function that runs Python source: refused by name, never looked up
        "runstring": (
            pickle.dumps({"G_ema": Call(runstring, code, {})}, protocol=4),
            "refused: the pickle asks for numpy.testing._private.utils.runstring, which is not among the "
            "allowed classes (nothing from the file was run)",
        ),
        "ndarray reconstruction": (
            pickle.dumps(Call(np._core.multiarray._reconstruct, np.ndarray, (0,), b"b"), protocol=3).replace(
                b"numpy._core.multiarray\n_reconstruct", b"numpy.core.multiarray\n_reconstruct"
            ),
            "refused: the pickle asks for numpy.core.multiarray._reconstruct, which is not among the allowed classes",
        ),
        "numpy.load": (pickle.dumps(Call(np.load, "a.npy"), protocol=4), "refused: the pickle asks for numpy.load,"),
        # an object scalar would hand any object through: its dtype is not a plain numeric type
        "object scalar": (
            pickle.dumps(Call(scalar, np.dtype("O"), [1]), protocol=4),
            "cannot read pickle: numpy dtype 'O8' is not a plain numeric type",
        ),
        "structured dtype": (
            pickle.dumps(Call(scalar, np.dtype([("a", "<f8")]), b"12345678"), protocol=4),
            "cannot read pickle: numpy dtype 'V8' is not a plain numeric type",
        ),
        "scalar of the wrong length": (
            pickle.dumps(Call(scalar, np.dtype("f8"), b"abc"), protocol=4),
            "cannot read pickle: numpy scalar of type float64 without its 8 raw bytes",
        ),
        "scalar with more arguments": (
            pickle.dumps(Call(scalar, np.dtype("f8"), b"12345678", 1), protocol=4),
            "cannot read pickle: _numpy_scalar() takes from 1 to 2 positional arguments",
        ),
        # numpy.dtype.__new__(numpy.dtype) (NEWOBJ): a dtype that never received its type code
        "dtype made without its type code": (
            b"\x80\x03cnumpy._core.multiarray\nscalar\ncnumpy\ndtype\n)\x81C\x0812345678\x86R.",
            "cannot read pickle: numpy dtype without its type code",
        ),
        "codecs with another encoding": (
            pickle.dumps(Call(codecs.encode, "eA==", "base64"), protocol=2),
            "cannot read pickle: _codecs.encode is admitted only for bytes written as latin1 text",
        ),
    }


@pytest.mark.parametrize("case", sorted(hostile_pickles(Path("m"))))
def test_hostile_pickles_are_refused_and_run_nothing(tmp_path, case, capsys):
    marker = tmp_path / "pwned"
    payload, message = hostile_pickles(marker)[case]
    (tmp_path / "x.pkl").write_bytes(payload)
    with pytest.raises(CheckpointError) as info:
        ce.load_generator(tmp_path / "x.pkl")
    assert str(info.value).startswith(f"{tmp_path / 'x.pkl'}: {message}")
    assert main(["info", str(tmp_path / "x.pkl")]) == 2
    assert one_error_line(capsys.readouterr().err).startswith(f"error: {tmp_path / 'x.pkl'}: {message}")
    assert not marker.exists()


def test_torch_file_that_asks_to_run_code_is_refused_without_advice_to_turn_the_guard_off(tmp_path, capsys):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    class Eval:
        def __reduce__(self):
            return (eval, (f"open({str(marker)!r}, 'w')",))

    torch.save({"g_ema": Evil()}, tmp_path / "system.pt")
    torch.save({"state_dict": {"x": Eval()}}, tmp_path / "eval.pt")
    for name, what in (("system.pt", "posix.system"), ("eval.pt", "eval")):
        with pytest.raises(UnsafePickleError) as info:
            ce.load_generator(tmp_path / name)
        assert str(info.value) == (
            f"{tmp_path / name}: refused: the file asks to run code ({what}, not a tensor or a plain container); "
            "cycle-encoding will not load it (nothing from it was run)"
        )
        assert main(["info", str(tmp_path / name)]) == 2
        line = one_error_line(capsys.readouterr().err)
        assert "asks to run code" in line and "weights_only" not in line and "trust" not in line
    assert not marker.exists()


# --- 5. own-format files whose declared architecture is bigger than their tensors -------------------------------


def _lie(src: Path, dst: Path, **config) -> None:
    with safe_open(str(src), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    header = json.loads(meta[META_KEY])
    header["config"].update(config)
    save_file(tensors, str(dst), metadata={META_KEY: json.dumps(header)})


@pytest.fixture
def no_real_build(monkeypatch):
    """Building a network anywhere but on the meta device (shapes only) fails the test: a lying file must be refused
    before memory is allocated for what it declares."""
    from cycle_encoding.checkpoints import encoder as enc_mod
    from cycle_encoding.checkpoints import generator as gen_mod

    def guard(real):
        def build(cfg):
            if (
                torch.get_default_device().type != "meta"
                and max(getattr(cfg, "style_dim", 0), *getattr(cfg, "widths", (0,)), sum(getattr(cfg, "units", (0,))))
                > 4096
            ):
                raise AssertionError(f"allocated a declared network before checking it: {cfg}")
            return real(cfg)

        return build

    monkeypatch.setattr(gen_mod, "Generator", guard(gen_mod.Generator))
    monkeypatch.setattr(enc_mod, "Encoder4Editing", guard(enc_mod.Encoder4Editing))


def test_generator_file_that_declares_a_huge_network_is_refused_before_allocation(tmp_path, no_real_build, capsys):
    _lie(shipped_model_path("fmnist-generator"), tmp_path / "g.safetensors", style_dim=65536)
    with pytest.raises(CheckpointError, match=r"generator: key style\.1\.weight has shape \[128, 128\], expected "
                       r"\[65536, 65536\]"):  # fmt: skip
        ce.load_generator(tmp_path / "g.safetensors")
    assert main(["generate", "-g", str(tmp_path / "g.safetensors"), "-o", str(tmp_path / "out")]) == 2
    assert "expected [65536, 65536]" in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_encoder_file_that_declares_a_huge_network_is_refused_before_allocation(tmp_path, no_real_build):
    src = shipped_model_path("fmnist-encoder")
    _lie(src, tmp_path / "wide.safetensors", widths=[65536] * 4)
    with pytest.raises(CheckpointError, match=r"encoder: key input_layer\.0\.weight has shape \[32, 1, 3, 3\], "
                       r"expected \[65536, 1, 3, 3\]"):  # fmt: skip
        ce.load_encoder(tmp_path / "wide.safetensors")
    _lie(src, tmp_path / "deep.safetensors", units=[10**9, 1, 1, 1])
    with pytest.raises(CheckpointError, match=r"the declared units \(1000000003\) cannot fit the \d+ tensors"):
        ce.load_encoder(tmp_path / "deep.safetensors")


# --- 6. decompression bombs ----------------------------------------------------------------------------------------


def test_huge_image_is_refused_from_its_header_and_evaluate_goes_on(tmp_path, capsys):
    pred, target = tmp_path / "pred", tmp_path / "target"
    pred.mkdir()
    target.mkdir()
    Image.new("L", (9000, 9000)).save(pred / "bomb.png")  # ~80 KB on disk, 81 million pixels
    assert (pred / "bomb.png").stat().st_size < 1_000_000
    for name in ("a", "bomb"):
        Image.new("RGB", (16, 16), (10, 20, 30)).save(target / f"{name}.png")
    Image.new("RGB", (16, 16), (12, 20, 30)).save(pred / "a.png")
    want = (
        f"{pred / 'bomb.png'}: image of 9000 x 9000 = 81,000,000 pixels, over the limit of 50,000,000 (raise it with "
        "--max-pixels)"
    )
    with pytest.raises(CycleEncodingError) as info:
        read_image(pred / "bomb.png")
    assert str(info.value) == want
    rc = main(["evaluate", "--pred", str(pred), "--target", str(target), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    assert rc == 3
    assert f"unreadable: pred/bomb.png: {want}" in out
    assert json.loads((tmp_path / "r.json").read_text())["pairs"] == 1  # the good pair is measured
    # the limit is an option, before or after the command; PIL's own bomb check gives the same message
    rc = main(["--max-pixels", "100", "evaluate", "--pred", str(pred), "--target", str(target)])
    out = capsys.readouterr().out
    assert (rc == 2 and "over the limit of 100" in out) or "larger than the limit of 100 pixels" in out


def test_align_lists_a_bomb_and_goes_on(tmp_path):
    from cycle_encoding.data.align import AlignReport, align_files

    Image.new("L", (9000, 9000)).save(tmp_path / "bomb.png")

    class NoFaces:
        def __call__(self, image):
            return []

    rep = align_files([tmp_path / "bomb.png"], tmp_path / "out", NoFaces())  # type: ignore[arg-type]
    assert isinstance(rep, AlignReport)
    assert [p.name for p, _ in rep.failed] == ["bomb.png"] and "over the limit of 50,000,000" in rep.failed[0][1]


def test_zlib_bomb_in_a_generator_delta_is_refused_without_expanding_it(tmp_path):
    base = make_tiny_generator(resolution=16)
    tuned = make_tiny_generator(resolution=16)
    with torch.no_grad():
        tuned.to_rgb1.bias.add_(0.5)  # 3 floats changed: the delta stores 12 bytes for them
    d = save_generator_delta(base, tuned, tmp_path / "d.safetensors")
    assert torch.equal(render(load_generator_delta(d.path, base)), render(tuned))
    with safe_open(str(d.path), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(iter(tensors))
    bomb = zlib.compress(b"\0" * 200_000_000, 9)  # 200 MB from ~200 KB
    tensors[key] = torch.frombuffer(bytearray(bomb), dtype=torch.uint8)
    save_file(tensors, str(tmp_path / "bomb.safetensors"), metadata=meta)
    calls = []
    real = zlib.decompressobj

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    zlib.decompressobj, saved = spy, zlib.decompressobj
    try:
        with pytest.raises(CheckpointError, match=rf"tensor {key}: corrupt stored change \(the stored change does "
                           r"not end at the 12 bytes the tensor needs"):  # fmt: skip
            load_generator_delta(tmp_path / "bomb.safetensors", base)
    finally:
        zlib.decompressobj = saved
    assert calls  # decompressed by a bounded stream, never all at once


# --- 3, 4, 8, 10. run folders: edit and report -------------------------------------------------------------------


def test_strength_zero_with_another_thread_count_is_compared_within_the_stated_tolerance(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    assert json.loads((run / "images" / "im0" / "result.json").read_text())["threads"] == 1
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        rc = main(["edit", str(run), "--direction", str(run64["direction"]), "--strengths", "-1,0", "--images", "im0,im1",
                   "--quiet"])  # fmt: skip
        out = capsys.readouterr().out
        assert rc == 0 and "WARNING" not in out
        doc = json.loads((run / "edits" / "dir" / "edit.json").read_text())
        assert doc["threads"] == 2
        for rec in doc["images"]:
            assert rec["strength0_is_reconstruction"] is True
            assert rec["reconstruction_check"].startswith("within 1 of 255 levels of recon_tune.png")
        # a reconstruction that really differs is still caught
        png = run / "images" / "im1" / "recon_tune.png"
        a = np.asarray(Image.open(png)).copy()
        a[0, 0] = (a[0, 0].astype(int) + 40) % 256
        Image.fromarray(a).save(png)
        rc = main(["edit", str(run), "--direction", str(run64["direction"]), "--strengths", "0", "--images", "im1",
                   "--quiet"])  # fmt: skip
        out = capsys.readouterr().out
        assert rc == 0 and "WARNING: strength 0 differs from the stored reconstruction for im1" in out
    finally:
        torch.set_num_threads(n)


def test_failed_edit_keeps_the_earlier_edit_of_its_name(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    args = ["edit", str(run), "--direction", str(run64["direction"]), "--name", "keep", "--strengths=-1,0", "--quiet"]
    assert main(args) == 0
    before = tree(run / "edits" / "keep")
    assert "edit.json" in before and len(before) == 1 + 3 * 4  # 2 strengths, a strip and a GIF sweep per image
    capsys.readouterr()
    for bad, message in (
        (["--encoder", str(tmp_path / "missing.safetensors")], f"{tmp_path / 'missing.safetensors'}: no such file"),
        (["--images", "im0,nosuch"], f"{run}: no finished image named 'nosuch'"),
        (["--strengths=nan,inf"], "bad strengths 'nan,inf': nan is not a finite number"),
        (["--images", "../.."], f"{run}: no finished image named '../..'"),
    ):
        assert main(args + bad) == 2
        assert message in one_error_line(capsys.readouterr().err)
        assert tree(run / "edits" / "keep") == before
    assert sorted(p.name for p in run.parent.iterdir()) == ["run"]  # nothing written beside the run
    assert not list((run / "edits").glob(".*"))  # no temporary folder left


def test_corrupt_image_folders_are_listed_and_the_others_edited_and_reported(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    (run / "images" / "im1" / "result.json").write_text('{"name": "im1", "metr')
    pivots = run / "images" / "im2" / "pivots.safetensors"
    pivots.write_bytes(pivots.read_bytes()[:-7])
    rc = main(["edit", str(run), "--direction", str(run64["direction"]), "--strengths", "0,1", "--quiet"])
    out = capsys.readouterr().out
    assert rc == 3
    assert f"failed: im1: {run / 'images' / 'im1' / 'result.json'}: not valid JSON" in out
    assert f"failed: im2: {pivots}: truncated" in out
    doc = json.loads((run / "edits" / "dir" / "edit.json").read_text())
    assert [r["name"] for r in doc["images"]] == ["im0"] and [f["name"] for f in doc["failed"]] == ["im1", "im2"]
    rc = main(["report", str(run)])
    err = capsys.readouterr().err
    assert rc == 3
    assert f"left out: im1: {run / 'images' / 'im1' / 'result.json'}: not valid JSON" in err
    assert "left out: im2: " in err
    page = (run / "report.html").read_text()
    assert 'id="img-im0"' in page and 'id="img-im1"' not in page and "Left out (unreadable or refused)" in page


def test_report_never_embeds_files_outside_the_run(run64, tmp_path, capsys):
    run = copy_run(run64, tmp_path)
    secret = tmp_path / "secret.txt"
    secret.write_text("the secret of the test")
    encoded = base64.b64encode(secret.read_bytes()).decode()
    assert main(["edit", str(run), "--direction", str(run64["direction"]), "--strengths", "0,1", "--quiet"]) == 0
    doc_path = run / "edits" / "dir" / "edit.json"
    doc = json.loads(doc_path.read_text())
    depth = "/".join([".."] * len((run / "edits" / "dir").resolve().parts))
    doc["images"][0]["files"][0] = str(secret)  # an absolute path
    doc["images"][1]["files"][1] = depth + str(secret)  # climbing out
    doc_path.write_text(json.dumps(doc))
    (run / "images" / "im2" / "target.png").unlink()
    (run / "images" / "im2" / "target.png").symlink_to(secret)  # a symbolic link out of the run
    capsys.readouterr()
    rc = main(["report", str(run)])
    err = capsys.readouterr().err
    assert rc == 3
    assert f"left out: edits/dir/im0: {doc_path}: refused: {str(secret)!r} leads outside the edit's folder" in err
    assert f"left out: edits/dir/im1: {doc_path}: refused: {depth + str(secret)!r} leads outside" in err
    assert f"left out: im2: {run / 'images' / 'im2' / 'target.png'}: refused: it leads outside the run folder" in err
    for f in ("report.html", "report.json"):
        text = (run / f).read_text()
        assert encoded not in text and "the secret of the test" not in text
    assert main(["report", str(run), "--link-images", "--out", str(run / "linked.html")]) == 3
    sources = re.findall(r'src="([^"]*)"', (run / "linked.html").read_text())
    assert sources and not [src for src in sources if "secret" in src or src.startswith("..")]


# --- 11. bad values: one line before any work, exit 2 ---------------------------------------------------------------


@pytest.mark.parametrize(
    "args,message",
    [
        (["--seeds=-1"], "error: bad --seeds '-1': -1 is outside 0..4294967295"),
        (["--seeds", "4294967296"], "error: bad --seeds '4294967296': 4294967296 is outside 0..4294967295"),
        (["--seeds", "0-99999999"], "error: bad --seeds '0-99999999': more than 1,000,000 numbers"),
        (["--batch-size", "0"], "error: --batch-size must be 1 or more, got 0"),
        (["--batch-size", "0", "--max-codes", "-5"], "error: --batch-size must be 1 or more, got 0"),
        (["--max-codes", "0"], "error: --max-codes must be 1 or more, got 0"),
        (["--truncation", "nan"], "error: --truncation must be a finite number, got nan"),
        (["--truncation", "inf"], "error: --truncation must be a finite number, got inf"),
    ],
)
def test_generate_bad_values(tmp_path, capsys, args, message):
    out = tmp_path / "out"
    assert main(["generate", "-g", "no-such-generator", "-o", str(out), *args]) == 2
    assert one_error_line(capsys.readouterr().err) == message
    assert not out.exists()


def test_unwritable_outputs_are_refused_before_any_work(tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("x")
    assert main(["generate", "-g", "fmnist-generator", "-o", str(afile / "sub")]) == 2
    assert one_error_line(capsys.readouterr().err) == (
        f"error: --out {afile / 'sub'}: {afile} is a file, so no folder can be made under it"
    )
    (tmp_path / "p").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "p" / "a.png")
    assert main(["evaluate", "--pred", str(tmp_path / "p"), "--target", str(tmp_path / "p"), "--json",
                 str(afile / "r.json")]) == 2  # fmt: skip
    captured = capsys.readouterr()
    assert one_error_line(captured.err) == f"error: --json {afile / 'r.json'}: {afile} exists and is not a folder"
    assert captured.out == ""  # nothing measured
    if os.geteuid() != 0:  # root writes anywhere
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(0o555)
        try:
            assert main(["generate", "-g", "fmnist-generator", "-o", str(ro / "x")]) == 2
            assert (
                one_error_line(capsys.readouterr().err)
                == f"error: --out {ro / 'x'}: cannot write in {ro} (permission denied)"
            )
        finally:
            ro.chmod(0o755)


def test_invert_nan_option_is_refused_before_any_work(tmp_path, capsys):
    assert main(["invert", str(tmp_path), "--generator", "x", "--out", str(tmp_path / "r"), "--tune-lr", "nan"]) == 2
    assert one_error_line(capsys.readouterr().err) == "error: --tune-lr must be a finite number, got nan"
    assert not (tmp_path / "r").exists()


# --- 13. --debug before or after the command -------------------------------------------------------------------------


@pytest.mark.parametrize("argv", [["--debug", "info", "NOFILE"], ["info", "NOFILE", "--debug"]])
def test_debug_shows_the_traceback_wherever_it_is_given(tmp_path, argv):
    argv = [str(tmp_path / "nofile") if a == "NOFILE" else a for a in argv]
    with pytest.raises(CheckpointError, match="no such file"):
        main(argv)


def test_without_debug_one_line(tmp_path, capsys):
    assert main(["info", str(tmp_path / "nofile")]) == 2
    assert one_error_line(capsys.readouterr().err) == f"error: {tmp_path / 'nofile'}: no such file"


# --- 9 and 12. re-runs and concurrent runs into one folder -------------------------------------------------------


def quick_inverter(G):
    return Inverter(
        G, None, stages=("project",), perceptual="none", device="cpu",
        project={"steps": 1, "l2_lambda": 1.0, "perceptual_lambda": 0.0},
    )  # fmt: skip


@pytest.fixture
def two_images(tmp_path):
    G = make_tiny_generator(resolution=16)
    with torch.no_grad():
        imgs = G(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(7)))
    for i in range(2):
        save_image(imgs[i], tmp_path / "images" / f"im{i}.png")
    return G, imgs[2], tmp_path


def test_rerun_redoes_an_image_whose_input_changed(two_images):
    G, other, root = two_images
    lines: list[str] = []
    s = quick_inverter(G).run(root / "images", root / "run", log=lines.append)
    assert s["done"] == ["im0", "im1"]
    first = tree(root / "run" / "images" / "im1")
    save_image(other, root / "images" / "im0.png")  # same name, other content
    lines.clear()
    s = quick_inverter(G).run(root / "images", root / "run", log=lines.append)
    assert s["done"] == ["im0"] and s["skipped"] == ["im1"]
    assert any("im0: the input file changed since it was inverted: inverting it again" in ln for ln in lines), lines
    result = json.loads((root / "run" / "images" / "im0" / "result.json").read_text())
    assert result["input_sha256"] == file_sha256(root / "images" / "im0.png")
    np.testing.assert_array_equal(
        np.asarray(Image.open(root / "run" / "images" / "im0" / "target.png")),
        np.asarray(Image.open(root / "images" / "im0.png")),
    )
    assert tree(root / "run" / "images" / "im1") == first  # untouched


def test_an_image_another_process_is_inverting_is_left_to_it(two_images):
    import fcntl

    from cycle_encoding.inversion.run_folder import image_lock_path

    G, _, root = two_images
    (root / "run" / "images").mkdir(parents=True)
    lock = image_lock_path(root / "run", "im0")
    with open(lock, "a+b") as held:  # another process holds im0
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        lines: list[str] = []
        s = quick_inverter(G).run(root / "images", root / "run", log=lines.append)
        assert s["done"] == ["im1"] and s["failed"] == []
        assert [b["name"] for b in s["busy"]] == ["im0"]
        assert any("im0: being inverted by another process: left to it" in ln for ln in lines), lines
        assert not (root / "run" / "images" / "im0" / "done").exists()
    # released (the other process ended or was killed): the next run does it
    s = quick_inverter(G).run(root / "images", root / "run", log=lambda s: None)
    assert s["done"] == ["im0"] and s["skipped"] == ["im1"] and s["busy"] == []
