"""The inversion pipeline over a folder: the run folder's files, a rebuilt generator reproducing the stored
reconstruction's hash, resuming after an interruption with the same results as an uninterrupted run, a corrupt image
reported and skipped (exit status 3), options changed on re-run refused, and two torchrun ranks splitting a folder."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.checkpoints.native import default_provenance, read_native
from cycle_encoding.checkpoints.run_folder import tensor_sha256
from cycle_encoding.cli import main
from cycle_encoding.inversion import Inverter, load_generator_delta
from cycle_encoding.inversion import inverter as inverter_module
from cycle_encoding.inversion.common import render
from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
from cycle_encoding.utils import save_image
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")

STANDIN = "test-inversion-stand-in"
FAST = {"refine": {"steps": 4, "num_random": 3, "lr": 1e-3}, "tune": {"steps": 6, "lr": 3e-3, "locality_alpha": 3.0}}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A generator file, an encoder file that records its training images, a folder of 5 targets."""
    root = tmp_path_factory.mktemp("inv")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    train = root / "train"
    for i, im in enumerate(own_images(G, 12, seed=1)):
        save_image(im, train / f"t{i:02d}.png")
    E = tiny_encoder(G)
    ce.save_encoder(E, root / "e.safetensors", provenance=default_provenance(data=str(train)), trained_stage=0)
    targets = root / "targets"
    for i, im in enumerate(own_images(G, 5, seed=9)):
        save_image(im, targets / f"img{i}.png")
    register_perceptual(STANDIN, lambda device, weights: stand_in_perceptual().to(device), "tests", replace=True)
    yield root
    unregister_perceptual(STANDIN)


def inverter(root: Path, **kw) -> Inverter:
    opts = {"stages": ("encoder", "refine", "tune"), "perceptual": STANDIN, "identity": "none", **FAST, **kw}
    return Inverter(root / "g.safetensors", root / "e.safetensors", device="cpu", **opts)


def image_outputs(run: Path, name: str) -> dict:
    d = run / "images" / name
    out = {
        "pivots": {k: v for k, v in read_native(d / "pivots.safetensors").tensors.items()},
        "delta": {k: v for k, v in read_native(d / "generator_delta.safetensors").tensors.items()},
        "losses": (d / "losses.jsonl").read_text(),
        "pngs": {p.name: p.read_bytes() for p in sorted(d.glob("*.png"))},
    }
    res = json.loads((d / "result.json").read_text())
    out["result"] = {k: res[k] for k in ("metrics", "recon_sha256", "tune", "refine", "index")}
    return out


def same(a: dict, b: dict) -> bool:
    for k in a:
        if k in ("pivots", "delta"):
            if a[k].keys() != b[k].keys() or not all(torch.equal(a[k][t], b[k][t]) for t in a[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def test_run_folder_and_bit_exact_rebuild(files, tmp_path):
    run = tmp_path / "run"
    summary = inverter(files).run(files / "targets", run, log=lambda s: None)
    names = [f"img{i}" for i in range(5)]
    assert summary["done"] == names and summary["complete"] and not summary["failed"] and not summary["skipped"]
    assert json.loads((run / "summary.json").read_text())["done"] == names
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["networks"]["perceptual"] == "stand-in perceptual" and cfg["refine"]["train_images"].endswith("train")
    d = run / "images" / "img2"
    for f in ("target.png", "pivots.safetensors", "recon_encoder.png", "recon_refine.png", "recon_tune.png",
              "losses.jsonl", "timings.json", "result.json", "generator_delta.safetensors", "done"):  # fmt: skip
        assert (d / f).is_file(), f
    lines = [json.loads(s) for s in (d / "losses.jsonl").read_text().splitlines()]
    assert [r["stage"] for r in lines] == ["refine"] * 4 + ["tune"] * len([r for r in lines if r["stage"] == "tune"])
    assert set(json.loads((d / "timings.json").read_text())) >= {"encoder", "refine", "tune", "total"}
    res = json.loads((d / "result.json").read_text())
    # tuning lowers the error below the pivot's; refinement lowers the target's L_S
    assert res["metrics"]["tune"]["mse"] < res["metrics"]["refine"]["mse"]
    assert res["refine"]["target_l_s"] < res["refine"]["target_l_s_first"]
    # base file + stored change -> the tuned generator: renders the pivot to the very tensor the run hashed
    Gt = load_generator_delta(d / "generator_delta.safetensors", files / "g.safetensors")
    pivot = read_native(d / "pivots.safetensors").tensors[res["tune"]["pivot_stage"]][None]
    assert res["tune"]["pivot_stage"] == "refine"
    assert tensor_sha256(render(Gt, pivot)) == res["recon_sha256"]["tune"]
    assert res["delta"]["file_bytes"] < res["delta"]["full_copy_bytes"]
    assert summary["per_stage"]["tune"]["images"] == 5 and 0 < summary["generator_delta"]["ratio"] < 1


def test_interrupted_run_resumes_with_identical_results(files, tmp_path, monkeypatch):
    ref = tmp_path / "uninterrupted"
    inverter(files).run(files / "targets", ref, log=lambda s: None)

    real = inverter_module.pivotal_tune
    calls: list[int] = []

    def killed_on_third(*a, **kw):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt  # stopped in the middle of the third image
        return real(*a, **kw)

    monkeypatch.setattr(inverter_module, "pivotal_tune", killed_on_third)
    run = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        inverter(files).run(files / "targets", run, log=lambda s: None)
    assert [(run / "images" / f"img{i}" / "done").is_file() for i in range(5)] == [True, True, False, False, False]
    assert (run / "images" / "img2" / "recon_refine.png").is_file()  # the interrupted image was half done
    stray = run / "images" / "img2" / ".recon_tune.png.x1y2.tmp"  # as a kill during a write would leave it
    stray.write_bytes(b"half")
    mtimes = {i: (run / "images" / f"img{i}" / "done").stat().st_mtime_ns for i in (0, 1)}

    calls.clear()
    monkeypatch.setattr(inverter_module, "pivotal_tune", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    summary = inverter(files).run(files / "targets", run, log=lambda s: None)
    assert len(calls) == 3  # images 2, 3, 4 only
    assert summary["skipped"] == ["img0", "img1"] and summary["done"] == ["img2", "img3", "img4"]
    assert summary["complete"] and not stray.exists()
    assert {i: (run / "images" / f"img{i}" / "done").stat().st_mtime_ns for i in (0, 1)} == mtimes
    for i in range(5):
        assert same(image_outputs(ref, f"img{i}"), image_outputs(run, f"img{i}")), f"img{i}"
    assert not list(run.rglob("*.tmp"))


def test_corrupt_image_is_reported_and_skipped(files, tmp_path, capsys):
    folder = tmp_path / "targets"
    folder.mkdir()
    for p in sorted((files / "targets").glob("*.png"))[:3]:
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    run = tmp_path / "run"
    args = ["invert", str(folder), "--generator", str(files / "g.safetensors"), "--encoder",
            str(files / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", STANDIN, "--tune-steps", "3",
            "--out", str(run), "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 3
    cap = capsys.readouterr()
    assert "broken" in cap.err and "FAILED" in cap.err and "cannot read image" in cap.err
    assert "failed: broken" in cap.out and "3 of 4 image(s) finished" in cap.out
    summary = json.loads((run / "summary.json").read_text())
    assert [f["name"] for f in summary["failed"]] == ["broken"] and "cannot read image" in summary["failed"][0][
        "reason"
    ]
    assert sorted(summary["done"]) == ["img0", "img1", "img2"]
    assert not (run / "images" / "broken").exists()
    # a re-run skips the finished ones and reports the broken one again
    assert main(args) == 3
    summary = json.loads((run / "summary.json").read_text())
    assert summary["done"] == [] and sorted(summary["skipped"]) == ["img0", "img1", "img2"]
    # other options into the same folder: refused with what differs
    assert main([*args, "--tune-steps", "4"]) == 2  # the last of a repeated option wins
    assert "tune.steps" in capsys.readouterr().err


def test_cli_errors_and_dry_run(files, tmp_path, capsys):
    enc = tmp_path / "e_nodata.safetensors"
    ce.save_encoder(tiny_encoder(make_tiny_generator(resolution=16)), enc)
    base = ["invert", str(files / "targets"), "--generator", str(files / "g.safetensors"), "--encoder", str(enc),
            "--out", str(tmp_path / "r"), "--device", "cpu", "--perceptual", "none"]  # fmt: skip
    assert main([*base, "--stages", "encoder,refine"]) == 2
    err = capsys.readouterr().err
    assert "needs the encoder's training images" in err and "--train-data" in err and err.count("\n") == 1
    assert main([*base, "--stages", "tune,encoder"]) == 2
    assert "stages run in the order" in capsys.readouterr().err
    assert main([*base, "--stages", "encoder,tune", "--tune-steps", "7", "--dry-run"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["options"]["tune"]["steps"] == 7 and out["images"] == 5 and not (tmp_path / "r").exists()
    assert main([*base, "--stages", "encoder,tune", "--locality-every", "4", "--dry-run"]) == 0
    tune = json.loads(capsys.readouterr().out)["options"]["tune"]
    assert tune["locality_every"] == 4 and tune["locality"] is True
    assert main([*base, "--stages", "encoder,tune", "--locality-every", "0", "--dry-run"]) == 2
    assert "locality_every" in capsys.readouterr().err


def test_two_torchrun_ranks_split_a_folder(files, tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cycle_encoding.cli", "invert", str(files / "targets"), "--generator", str(files / "g.safetensors"),
           "--encoder", str(files / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", "none",
           "--tune-steps", "2", "--out", str(run), "--device", "cpu", "--quiet"]  # fmt: skip
    p = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=3600
    )  # catches a hang only: a slow machine must not fail it
    assert p.returncode == 0, p.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    names = [f"img{i}" for i in range(5)]
    assert summary["world_size"] == 2 and summary["complete"]
    by_rank = {r["rank"]: r["done"] for r in summary["ranks"]}
    assert set(by_rank) == {0, 1} and by_rank[0] and by_rank[1]
    assert sorted(by_rank[0] + by_rank[1]) == names and not set(by_rank[0]) & set(by_rank[1])  # none twice, none missed
    for rank, done in by_rank.items():
        for n in done:
            assert json.loads((run / "images" / n / "done").read_text())["rank"] == rank
    assert sorted(summary["done"]) == names
