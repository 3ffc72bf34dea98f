"""The info / generate / convert commands, and the CLI's error behaviour."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import torch
from PIL import Image

import cycle_encoding as ce
from cycle_encoding.cli import main
from cycle_encoding.sampling import z_from_seed
from tests.conftest import make_tiny_generator


def test_info_json_describes_generator(tmp_path, capsys):
    G = make_tiny_generator(resolution=32)
    ce.export_rosinality(G, tmp_path / "g.pt")
    assert main(["info", str(tmp_path / "g.pt"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["format"] == "rosinality"
    assert info["architecture"]["resolution"] == 32 and info["architecture"]["num_ws"] == 8
    n_params = sum(p.numel() for p in G.parameters())
    assert info["parameters"] == n_params
    assert any(h.startswith("latent_avg") for h in info["holds"])
    assert main(["info", str(tmp_path / "g.pt")]) == 0
    assert "resolution: 32" in capsys.readouterr().out


def test_generate_writes_one_png_per_seed_and_a_grid(tmp_path, capsys):
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, tmp_path / "g.safetensors")
    out = tmp_path / "out"
    rc = main(["generate", "--generator", str(tmp_path / "g.safetensors"), "--seeds", "3-5,9", "--truncation", "0.7",
               "--out", str(out), "--device", "cpu"])  # fmt: skip
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["grid.png", "seed0003.png", "seed0004.png", "seed0005.png", "seed0009.png"]
    # the PNG of seed 4 is the generator's image for NVIDIA's z of seed 4
    with torch.no_grad():
        ref = G.synthesis(G.mapping(z_from_seed(4, G.z_dim), truncation=0.7))
    expected = ((ref[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    # batched rendering may differ from a batch of one by float rounding: at most one grey level
    got = np.asarray(Image.open(out / "seed0004.png")).astype(int)
    assert np.abs(got - expected.astype(int)).max() <= 1
    assert Image.open(out / "grid.png").size[0] > 2 * 16


def test_convert_command(tmp_path):
    G = make_tiny_generator()
    ce.export_rosinality(G, tmp_path / "g.pt")
    assert main(["convert", str(tmp_path / "g.pt"), str(tmp_path / "g.safetensors")]) == 0
    G2 = ce.load_generator(tmp_path / "g.safetensors")
    assert G2.config.channels() == G.config.channels() and G2.num_ws == G.num_ws
    z = torch.randn(2, G.z_dim)
    with torch.no_grad():
        assert torch.equal(G2(z), G(z))


def test_errors_are_one_line_without_traceback(tmp_path):
    (tmp_path / "junk.pt").write_text("junk")
    r = subprocess.run(
        [sys.executable, "-m", "cycle_encoding.cli", "info", str(tmp_path / "junk.pt")],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "not a checkpoint" in lines[0]
    assert "Traceback" not in r.stderr
    r = subprocess.run(
        [sys.executable, "-m", "cycle_encoding.cli", "info", str(tmp_path / "junk.pt"), "--debug"],
        capture_output=True,
        text=True,
    )
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_bad_seed_list_is_a_user_error(tmp_path, capsys):
    G = make_tiny_generator()
    ce.export_rosinality(G, tmp_path / "g.pt")
    rc = main(["generate", "-g", str(tmp_path / "g.pt"), "--seeds", "5-2", "--out", str(tmp_path / "o")])
    assert rc == 2
    assert "bad --seeds '5-2': use forms like 0-7 or 1,5,9" in capsys.readouterr().err
