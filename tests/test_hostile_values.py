"""Hostile-but-fair inputs, continued (tests/test_hostile_inputs.py is at its size limit): issue 29's values out of
any sensible range, oversized inputs, file-level mistakes. Each has one exact outcome: exit status and one line."""

from __future__ import annotations

import json

import numpy as np
import pytest
from safetensors import safe_open
from safetensors.torch import save_file

import cycle_encoding as ce
from cycle_encoding.checkpoints.native import META_KEY
from cycle_encoding.cli import main
from tests.conftest import make_tiny_generator


def one_error_line(err: str) -> str:
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, d / "g.safetensors")
    return d


def test_a_string_where_an_architecture_number_goes_is_one_line(tiny, tmp_path, capsys):
    """A file whose configuration says style_dim "32", and the API given one: the field named, not torch's 4 lines."""
    with safe_open(tiny / "g.safetensors", "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    doc = json.loads(meta[META_KEY])
    doc["config"]["style_dim"] = "32"
    save_file(tensors, tmp_path / "bad.safetensors", {META_KEY: json.dumps(doc)})
    assert main(["generate", "-g", str(tmp_path / "bad.safetensors"), "--out", str(tmp_path / "o")]) == 2
    assert one_error_line(capsys.readouterr().err).endswith("style_dim must be an integer, got '32'")
    with pytest.raises(ValueError, match=r"^style_dim must be an integer, got '512'$"):
        ce.GeneratorConfig(style_dim="512")
    assert ce.GeneratorConfig(resolution=np.int64(64)).resolution == 64  # numpy integers still do


def test_a_big_image_is_reduced_while_decoded_and_resizes_as_the_full_one(tmp_path):
    """A 5000 x 5000 PNG (small on disk, under the pixel limit): read_image reduces it while decoding, so reading it
    costs about its decoded bytes and the floats of the reduced image, not float copies of the full image (invert
    peaked at 4.1 GB on a 7000 x 7000 one); resized to a generator's size it agrees with the full-size read to within the difference
    of the two filters on a smooth image (box then bilinear vs bilinear: well under one grey level here)."""
    import subprocess
    import sys

    from PIL import Image

    from cycle_encoding.data.datasets import resize_square
    from cycle_encoding.data.images import DECODE_MIN_SIDE, read_image

    n = 5000
    ramp = np.linspace(0, 255, n, dtype=np.float32)
    rgb = np.stack([np.add.outer(ramp, ramp) / 2, np.add.outer(ramp, 255 - ramp) / 2, np.tile(ramp, (n, 1))], -1)
    Image.fromarray(np.rint(rgb).astype(np.uint8)).save(tmp_path / "big.png", compress_level=1)
    del rgb
    code = (
        "import resource, sys; from cycle_encoding.data.images import read_image; "
        "before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss; x = read_image(sys.argv[1]); "
        "print(list(x.shape), (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)"
    )
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big.png")], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    shape, grown_mb = r.stdout.rsplit(" ", 1)
    assert shape == "[3, 2500, 2500]" and n // 2 >= DECODE_MIN_SIDE
    # measured: 286 MB (decoded 75 MB, the reduced copies, its floats twice: 2 x 75 MB); before: 965 MB
    assert int(grown_mb) < 500, r.stdout
    # the same reduction at a smaller scale: the result a generator gets is the full-size read's, within the filters'
    Image.open(tmp_path / "big.png").resize((1000, 1000)).save(tmp_path / "mid.png")
    small = resize_square(read_image(tmp_path / "mid.png", min_side=128), 64)  # reduced 7x while decoded
    full = resize_square(read_image(tmp_path / "mid.png", min_side=None), 64)
    assert (small - full).abs().max() < 2 / 255


def test_an_image_lock_file_is_removed_when_released_and_never_shared(tmp_path):
    """images/.NAME.lock: held while the image is worked on (a second holder is refused), removed on release, also
    when an earlier, killed process left it behind."""
    from cycle_encoding.inversion.run_folder import image_lock, image_lock_path

    (tmp_path / "images").mkdir()
    path = image_lock_path(tmp_path, "a")
    path.write_bytes(b"")  # left by a killed process
    with image_lock(tmp_path, "a") as got:
        assert got and path.is_file()
        with image_lock(tmp_path, "a") as other:  # another open file description: flock refuses it
            assert other is False
        assert path.is_file()  # the refused one removed nothing
    assert not path.exists()
    assert list((tmp_path / "images").iterdir()) == []


@pytest.mark.parametrize("layout", ["own", "e4e"])
def test_a_missing_network_file_is_reported_before_the_encoder_is_read(tiny, tmp_path, monkeypatch, layout):
    """The loss networks an encoder file records (the project's header; e4e files record none, so the default
    lpips-alex) are located before the encoder's weights are read: a missing LPIPS backbone stops `invert` at once,
    not after loading a 600 MB encoder."""
    import torch

    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.errors import CycleEncodingError
    from cycle_encoding.inversion import inverter
    from tests.conftest import tiny_encoder
    from tests.layouts import e4e_encoder_sd

    G = ce.load_generator(tiny / "g.safetensors")
    if layout == "own":
        path = tmp_path / "e.safetensors"
        prov = default_provenance(networks={"perceptual": "lpips-vgg", "identity": "none"})
        ce.save_encoder(tiny_encoder(G), path, provenance=prov)
        wanted = "lpips-vgg needs"
    else:
        path = tmp_path / "e4e.pt"
        sd = e4e_encoder_sd(num_ws=G.num_ws, w_dim=G.w_dim)
        torch.save({"state_dict": {f"encoder.{k}": v for k, v in sd.items()}}, path)
        wanted = "lpips-alex needs"
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))

    def must_not_load(*a, **k):
        raise AssertionError("the encoder was read before the missing network file was reported")

    monkeypatch.setattr(inverter, "load_encoder_source", must_not_load)
    with pytest.raises(CycleEncodingError, match=wanted):
        inverter.Inverter(G, path, stages=("encoder", "tune"), device="cpu")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--truncation=1e30"], "--truncation must be between -10 and 10, got 1e+30"),
        (["--trunc=-1e308"], "--truncation must be between -10 and 10, got -1e+308"),
    ],
)
def test_generate_truncation_is_bounded(tiny, tmp_path, capsys, args, message):
    rc = main(["generate", "--network", str(tiny / "g.safetensors"), "--outdir", str(tmp_path / "o"), *args])
    assert rc == 2 and message in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "o").exists()


def test_nvidia_spellings_names_from_latents_txt_and_the_code_bound(tiny, tmp_path, capsys):
    """NVIDIA's --network/--outdir/--trunc; --projected-w names images as latents.txt does; a file of more codes than
    --max-codes is refused from its header (a small .npz can expand to GBs), an empty one is one line."""
    import torch

    from cycle_encoding.checkpoints.latents import save_latents

    G = ce.load_generator(tiny / "g.safetensors")
    ws = G.mapping(torch.randn(3, G.z_dim)).detach()
    save_latents(tmp_path, ws, ["shoe", "coat", "bag"])
    assert main(["generate", "--network", str(tiny / "g.safetensors"), "--outdir", str(tmp_path / "a"),
                 "--projected-w", str(tmp_path / "latents.pt")]) == 0  # fmt: skip
    assert "named as latents.txt names them" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["bag.png", "coat.png", "grid.png", "shoe.png"]
    (tmp_path / "latents.txt").write_text("shoe\n../coat\nbag\n")  # not plain file names: NVIDIA's names instead
    assert main(["generate", "-g", str(tiny / "g.safetensors"), "-o", str(tmp_path / "b"),
                 "--projected-w", str(tmp_path / "latents.npy")]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["grid.png", "proj00.png", "proj01.png", "proj02.png"]
    capsys.readouterr()
    big = np.zeros((250_000, G.num_ws, G.w_dim), np.float32)
    np.savez_compressed(tmp_path / "many.npz", w=big)  # 0.2 MB on disk, 190 MB as floats (250,000 images to render)
    for f, msg in ((tmp_path / "many.npz", "250,000 codes, more than the 10,000 allowed at once"),
                   (tmp_path / "empty.npz", "holds no codes")):  # fmt: skip
        if f.name == "empty.npz":
            np.savez(f, w=np.zeros((0, G.num_ws, G.w_dim), np.float32))
        rc = main(["generate", "-g", str(tiny / "g.safetensors"), "-o", str(tmp_path / "c"), "--projected-w", str(f)])
        assert rc == 2 and msg in one_error_line(capsys.readouterr().err)
    assert not (tmp_path / "c").exists()


def test_info_of_a_url_says_it_is_not_downloaded(capsys):
    assert main(["info", "https://example.com/stylegan2-ffhq-config-f.pt"]) == 2
    line = one_error_line(capsys.readouterr().err)
    assert line == (
        "error: https://example.com/stylegan2-ffhq-config-f.pt: URLs are not downloaded: download the file and pass "
        "its path"
    )


def test_api_refuses_non_finite_images_and_out_of_range_strengths(tiny):
    import torch

    from cycle_encoding.editing import interfacegan_direction
    from cycle_encoding.editing.directions import MAX_STRENGTH
    from cycle_encoding.errors import CycleEncodingError
    from cycle_encoding.inversion import Inverter

    G = ce.load_generator(tiny / "g.safetensors")
    inv = Inverter(G, None, stages=("project",), project={"steps": 1, "l2_lambda": 1.0}, perceptual="none")
    x = torch.zeros(3, 16, 16)
    x[0, 0, 0] = float("nan")
    with pytest.raises(CycleEncodingError, match="NaN or infinite"):
        inv.invert(x)
    res = inv.invert(torch.zeros(3, 16, 16))
    d = interfacegan_direction(torch.randn(G.w_dim))
    for bad in (float("nan"), float("inf"), 1e308, -MAX_STRENGTH * 1.01):
        with pytest.raises(CycleEncodingError, match="strength must be"):
            res.edit(d, bad)
        with pytest.raises(CycleEncodingError, match="strength must be"):
            res.edit(torch.randn(G.w_dim), bad)
    res.edit(d, MAX_STRENGTH)  # the bound itself renders
    from cycle_encoding.editing.directions import parse_strengths  # what `edit --strengths` and the editor parse

    for spec in ("1e308", "-3,1e30"):
        with pytest.raises(CycleEncodingError, match=r"a strength must be between -100 and 100, got [-+0-9e]+ \(the"):
            parse_strengths(spec)
    assert parse_strengths("-100,0,20") == [-100.0, 0.0, 20.0]


def test_a_write_that_fails_for_space_names_the_file(tiny, tmp_path):
    """A real write failure without a file name from the OS (files capped at 300 bytes: EFBIG, as ENOSPC on a full
    disk): one line naming the file, exit status 2, no partial file left."""
    import resource
    import signal
    import subprocess
    import sys

    def cap() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))

    out = tmp_path / "o"
    cmd = [sys.executable, "-m", "cycle_encoding.cli", "generate", "-g", str(tiny / "g.safetensors"), "-o", str(out),
           "--seeds", "0", "--device", "cpu", "--progress", "none"]  # fmt: skip
    r = subprocess.run(cmd, capture_output=True, text=True, preexec_fn=cap)
    assert r.returncode == 2, r.stderr
    assert one_error_line(r.stderr) == f"error: {out / 'seed0000.png'}: File too large"
    assert list(out.iterdir()) == []
