"""Fitting the other StyleGAN tools: codes in NVIDIA's projector / e4e layouts, a run's tuned generator exported as a
standalone file (rosinality's layout, own format) that renders the run's reconstruction bit for bit, stored changes
accepted by convert / generate, NVIDIA-style generator calls, and the Python API taking and giving PIL images."""

from __future__ import annotations

import hashlib
import json
import shlex
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cycle_encoding as ce
from cycle_encoding.checkpoints.delta import save_generator_delta
from cycle_encoding.checkpoints.native import read_native
from cycle_encoding.cli import main
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.losses.perceptual import register_perceptual, unregister_perceptual
from cycle_encoding.utils import save_image
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual, tiny_encoder

STANDIN = "test-ecosystem-stand-in"


def f32_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes, computed here (the run's result.json records the same for each stage)."""
    return hashlib.sha256(t.detach().float().contiguous().numpy().tobytes()).hexdigest()


@pytest.fixture(scope="module")
def run(tmp_path_factory, one_thread):
    """An inversion run (encoder -> tune) of 2 images with a tiny generator and encoder, made by the CLI (--quiet)."""
    root = tmp_path_factory.mktemp("eco")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    ce.save_encoder(tiny_encoder(G), root / "e.safetensors", trained_stage=0)
    for i, im in enumerate(own_images(G, 2, seed=9)):
        save_image(im, root / "targets" / f"img{i}.png")
    register_perceptual(STANDIN, lambda device, weights: stand_in_perceptual().to(device), "tests", replace=True)
    rc = main(["invert", str(root / "targets"), "--generator", str(root / "g.safetensors"), "--encoder",
               str(root / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", STANDIN, "--tune-steps", "4",
               "--tune-lr", "3e-3", "--no-early-stop", "--device", "cpu", "--out", str(root / "run"), "--quiet",
               "--progress", "bar"])  # fmt: skip
    assert rc == 0
    yield root
    unregister_perceptual(STANDIN)


def tuned_record(root: Path, name: str) -> tuple[torch.Tensor, str]:
    """(the pivot tuning started from [1, N, w_dim], the run's hash of the tuned reconstruction), read from the files."""
    d = root / "run" / "images" / name
    res = json.loads((d / "result.json").read_text())
    pivot = read_native(d / "pivots.safetensors").tensors[res["tune"]["pivot_stage"]].float()[None]
    return pivot, res["recon_sha256"]["tune"]


# -- export -----------------------------------------------------------------------------------------------------------


def test_export_rosinality_layout_renders_the_tuned_reconstruction(run, capsys):
    out = run / "img0-tuned.pt"
    assert main(["export", str(run / "run"), "img0", "--format", "rosinality", "--out", str(out)]) == 0
    assert "bit for bit" in capsys.readouterr().out
    obj = torch.load(out, map_location="cpu", weights_only=True)  # what rosinality's scripts do (no code run)
    assert set(obj) == {"g_ema", "latent_avg", "cycle_encoding"}  # + the architecture, which rosinality's code skips
    base = ce.load_generator(run / "g.safetensors")
    # the same keys and shapes as the base generator in rosinality's layout (checked against the spec elsewhere)
    ref = ce.checkpoints.rosinality.rosinality_state_dict(base)
    assert {k: tuple(v.shape) for k, v in obj["g_ema"].items()} == {k: tuple(v.shape) for k, v in ref.items()}
    assert any(not torch.equal(obj["g_ema"][k], ref[k]) for k in ref)  # tuned: not the base
    G = ce.load_generator(out)
    pivot, want = tuned_record(run, "img0")
    with torch.no_grad():
        assert f32_sha256(G.synthesis(pivot, noise_mode="const")) == want


def test_export_safetensors_and_refusals(run, capsys):
    assert main(["export", str(run / "run"), "img1", "--format", "safetensors"]) == 0
    out = run / "run" / "images" / "img1" / "tuned_generator.safetensors"
    G = ce.load_generator(out)
    assert G.provenance["image"] == "img1"
    pivot, want = tuned_record(run, "img1")
    with torch.no_grad():
        assert f32_sha256(G.synthesis(pivot, noise_mode="const")) == want
    capsys.readouterr()
    assert main(["export", str(run / "run"), "nope"]) == 2
    assert "no finished image named 'nope' (finished: img0, img1)" in capsys.readouterr().err


# -- stored changes in convert / generate ------------------------------------------------------------------------------


def test_convert_and_generate_accept_a_stored_change(run, tmp_path, capsys):
    delta = run / "run" / "images" / "img0" / "generator_delta.safetensors"
    pivot, want = tuned_record(run, "img0")
    # the base found from the run's record, and given explicitly
    assert main(["convert", str(delta), str(tmp_path / "a.pt")]) == 0
    assert main(["convert", str(delta), str(tmp_path / "b.safetensors"), "--base", str(run / "g.safetensors")]) == 0
    for f in ("a.pt", "b.safetensors"):
        with torch.no_grad():
            assert f32_sha256(ce.load_generator(tmp_path / f).synthesis(pivot, noise_mode="const")) == want
    # a change whose base is nowhere to be found: refused, naming the base and --base
    base2 = make_tiny_generator(seed=5, resolution=16)
    tuned2 = make_tiny_generator(seed=5, resolution=16)
    with torch.no_grad():
        tuned2.to_rgb1.bias.add_(0.1)
    lone = tmp_path / "lone" / "generator_delta.safetensors"
    save_generator_delta(base2, tuned2, lone, base_file="mybase.safetensors")
    capsys.readouterr()
    assert main(["convert", str(lone), str(tmp_path / "c.pt")]) == 2
    err = capsys.readouterr().err
    assert "stored as its change from mybase.safetensors" in err and "--base FILE" in err
    # the wrong base: refused by the stored hash
    assert main(["convert", str(lone), str(tmp_path / "c.pt"), "--base", str(run / "g.safetensors")]) == 2
    assert "other weights" in capsys.readouterr().err
    # generate with the change renders the tuned generator's images
    np.savez(tmp_path / "projected_w.npz", w=pivot.numpy())  # NVIDIA's projector layout, written here by numpy
    assert main(["generate", "-g", str(delta), "--projected-w", str(tmp_path / "projected_w.npz"),
                 "--out", str(tmp_path / "gen"), "--device", "cpu"]) == 0  # fmt: skip
    G = ce.load_generator(tmp_path / "a.pt")
    with torch.no_grad():
        ref = ((G.synthesis(pivot, noise_mode="const")[0, :, :, :].clamp(-1, 1) + 1) * 127.5).round().byte()
    got = torch.from_numpy(np.array(Image.open(tmp_path / "gen" / "proj00.png"))).permute(2, 0, 1)
    assert torch.equal(got, ref)


# -- codes in other tools' layouts -------------------------------------------------------------------------------------


def test_run_writes_projected_w_per_image_and_stacked_latents(run):
    names = ["img0", "img1"]
    for n in names:
        pivot, _ = tuned_record(run, n)
        with np.load(run / "run" / "images" / n / "projected_w.npz") as z:  # as NVIDIA's generate.py reads it
            assert z.files == ["w"] and z["w"].dtype == np.float32
            assert np.array_equal(z["w"], pivot.numpy())  # [1, num_ws, w_dim], the pivot tuning started from
    stacked = torch.load(run / "run" / "latents.pt", weights_only=True)
    assert (run / "run" / "latents.txt").read_text().split() == names
    assert torch.equal(stacked, torch.cat([tuned_record(run, n)[0] for n in names]))
    assert np.array_equal(np.load(run / "run" / "latents.npy"), stacked.numpy())
    summary = json.loads((run / "run" / "summary.json").read_text())
    assert summary["latents"]["shape"] == list(stacked.shape)
    # the recorded command pastes back: argv kept, the command shell-quoted
    cfg = json.loads((run / "run" / "config.json").read_text())
    assert isinstance(cfg["argv"], list) and cfg["command"] == shlex.join(cfg["argv"])


def test_projected_w_and_latents_layouts(tmp_path):
    ws = torch.randn(3, 8, 32)
    ce.save_projected_w(tmp_path / "one.npz", ws[0])
    with np.load(tmp_path / "one.npz") as z:  # as NVIDIA's generate.py reads it
        assert z.files == ["w"] and z["w"].shape == (1, 8, 32) and z["w"].dtype == np.float32
        assert np.array_equal(z["w"][0], ws[0].numpy())
    ce.save_projected_w(tmp_path / "two.npz", ws[1], extra={"pivot": ws[2:3]})
    with np.load(tmp_path / "two.npz") as z:
        assert sorted(z.files) == ["pivot", "w"] and np.array_equal(z["pivot"], ws[2:3].numpy())
    assert torch.equal(ce.load_latents(tmp_path / "two.npz"), ws[1:2])
    paths = ce.save_latents(tmp_path, ws, ["a", "b", "c"])
    assert [p.name for p in paths] == ["latents.pt", "latents.npy", "latents.txt"]
    assert torch.equal(torch.load(tmp_path / "latents.pt", weights_only=True), ws)  # e4e's latents.pt: a tensor
    assert np.array_equal(np.load(tmp_path / "latents.npy"), ws.numpy())
    assert (tmp_path / "latents.txt").read_text().split() == ["a", "b", "c"]
    # the reader: each layout, a dict of one, W codes repeated, wrong shapes and keys refused
    assert torch.equal(ce.load_latents(tmp_path / "latents.pt", 8, 32), ws)
    assert torch.equal(ce.load_latents(tmp_path / "latents.npy"), ws)
    torch.save({"latents": ws[:1]}, tmp_path / "d.pt")
    assert torch.equal(ce.load_latents(tmp_path / "d.pt"), ws[:1])
    np.save(tmp_path / "w.npy", ws[:, 0].numpy())
    assert torch.equal(ce.load_latents(tmp_path / "w.npy", num_ws=8), ws[:, :1].expand(-1, 8, -1))
    with pytest.raises(CycleEncodingError, match=r"do not fit a generator taking \[n, 10, 32\]"):
        ce.load_latents(tmp_path / "one.npz", num_ws=10, w_dim=32)
    np.savez(tmp_path / "x.npz", z=np.zeros((1, 8, 32)))
    with pytest.raises(CycleEncodingError, match=r"no array 'w'.*has z"):
        ce.load_latents(tmp_path / "x.npz")


def test_generate_projected_w_matches_nvidia_naming_and_checks_shapes(tmp_path, capsys):
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, tmp_path / "g.safetensors")
    with torch.no_grad():
        ws = G.mapping(torch.randn(3, G.z_dim, generator=torch.Generator().manual_seed(0)))
    np.savez(tmp_path / "w.npz", w=ws.numpy())
    assert main(["generate", "-g", str(tmp_path / "g.safetensors"), "--projected-w", str(tmp_path / "w.npz"),
                 "--out", str(tmp_path / "o"), "--device", "cpu"]) == 0  # fmt: skip
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["grid.png", "proj00.png", "proj01.png", "proj02.png"]
    with torch.no_grad():
        ref = ((G.synthesis(ws[2:3], noise_mode="const")[0].clamp(-1, 1) + 1) * 127.5).round().byte()
    got = torch.from_numpy(np.array(Image.open(tmp_path / "o" / "proj02.png"))).permute(2, 0, 1)
    assert torch.equal(got, ref)
    np.savez(tmp_path / "bad.npz", w=np.zeros((1, 5, 32), np.float32))
    capsys.readouterr()
    assert main(["generate", "-g", str(tmp_path / "g.safetensors"), "--projected-w", str(tmp_path / "bad.npz"),
                 "--out", str(tmp_path / "o")]) == 2  # fmt: skip
    assert f"do not fit a generator taking [n, {G.num_ws}, 32]" in capsys.readouterr().err
    assert main(["generate", "-g", str(tmp_path / "g.safetensors"), "--projected-w", str(tmp_path / "w.npz"),
                 "--seeds", "0-3", "--out", str(tmp_path / "o")]) == 2  # fmt: skip


# -- NVIDIA-style calls ------------------------------------------------------------------------------------------------


def test_nvidia_style_generator_calls():
    G = make_tiny_generator(resolution=16)
    z = torch.randn(2, G.z_dim, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        # the reference from first principles: w_avg + psi (w - w_avg) on every layer, then synthesis
        w = G.style(z)
        ws = (G.w_avg + 0.7 * (w - G.w_avg))[:, None].repeat(1, G.num_ws, 1)
        ref = G.synthesis(ws, noise_mode="const")
        assert torch.allclose(G(z, None, truncation_psi=0.7, noise_mode="const"), ref, atol=1e-6)
        assert torch.allclose(G(z, torch.zeros(2, 0), 0.7), ref, atol=1e-6)
        assert torch.allclose(G(z, truncation=0.7), ref, atol=1e-6)
        assert torch.allclose(G.mapping(z, None, truncation_psi=0.7), ws, atol=1e-6)
        assert torch.allclose(G.mapping(z, 0.7), ws, atol=1e-6)
    assert (G.c_dim, G.img_resolution) == (0, 16)
    with pytest.raises(TypeError, match=r"class label.*call G\(z, None, truncation_psi=0.7\)"):
        G(z, 0.7)
    with pytest.raises(ValueError, match=r"unconditional.*call G\(z, None\)"):
        G(z, torch.ones(2, 10))


# -- images in and out of the Python API -------------------------------------------------------------------------------


def test_to_pil_from_pil_round_trip():
    rgb = np.random.default_rng(0).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    x = ce.from_pil(Image.fromarray(rgb, "RGB"))
    assert x.shape == (1, 3, 5, 7) and x.dtype == torch.float32
    assert torch.allclose(x[0, :, 2, 3], torch.from_numpy(rgb[2, 3].astype(np.float32)) / 127.5 - 1)
    assert np.array_equal(np.asarray(ce.to_pil(x)), rgb) and np.array_equal(np.asarray(ce.to_pil(x[0])), rgb)
    grey = rgb[:, :, 0]
    assert ce.from_pil(Image.fromarray(grey, "L")).shape == (1, 1, 5, 7)
    assert ce.to_pil(ce.from_pil(Image.fromarray(grey, "L"))).mode == "L"
    rgba = np.concatenate([rgb, np.full((5, 7, 1), 9, np.uint8)], axis=2)
    assert torch.equal(ce.from_pil(Image.fromarray(rgba, "RGBA")), x)
    with pytest.raises(CycleEncodingError, match=r"index the batch"):
        ce.to_pil(torch.zeros(2, 3, 4, 4))


def test_invert_takes_path_pil_array_tensor_and_gives_pil(run):
    target = run / "targets" / "img0.png"
    inv = ce.Inverter(run / "g.safetensors", run / "e.safetensors", stages=("encoder",), perceptual="none",
                      device="cpu")  # fmt: skip
    pil = Image.open(target)
    results = [inv.invert(target), inv.invert(pil), inv.invert(np.asarray(pil)), inv.invert(ce.from_pil(pil)),
               inv.invert(np.asarray(pil).astype(np.float32) / 255)]  # fmt: skip
    assert results[0].name == results[1].name == "img0"  # a PIL image opened from a file keeps its name
    for r in results[1:]:
        assert torch.equal(r.pivots["encoder"], results[0].pivots["encoder"])
    im = results[0].to_pil("encoder")
    assert isinstance(im, Image.Image) and im.size == (16, 16)
    assert np.array_equal(np.asarray(results[0].to_pil("target")), np.asarray(pil))
    # an edit of strength 0 is the reconstruction; a non-zero one differs; the API returns PIL images
    d = torch.randn(results[0].pivot.shape[-1])
    assert np.array_equal(np.asarray(results[0].edit(d, 0.0)), np.asarray(im))
    assert not np.array_equal(np.asarray(results[0].edit(d, 3.0)), np.asarray(im))
    with pytest.raises(CycleEncodingError, match="cannot read an image from a dict"):
        inv.invert({"not": "an image"})


# -- the console -------------------------------------------------------------------------------------------------------


def test_train_encoder_dry_run_opens_what_the_run_needs(run, capsys):
    base = ["train-encoder", "--generator", str(run / "g.safetensors"), "--data", str(run / "targets"),
            "--batch-size", "1", "--val-count", "1", "--total-steps", "100", "--dry-run"]  # fmt: skip
    # the default perceptual distance needs an LPIPS backbone file: refused now, not at step one
    assert main(base) == 2
    assert "--lpips-backbone" in capsys.readouterr().err
    assert main([*base, "--perceptual", STANDIN, "--identity", "arcface"]) == 2
    assert "arcface" in capsys.readouterr().err.lower()
    assert main([*base, "--lpips-backbone", str(run / "missing.pth")]) == 2
    assert "missing.pth" in capsys.readouterr().err
    assert main([*base, "--perceptual", STANDIN]) == 0
    out = capsys.readouterr().out
    G = ce.load_generator(run / "g.safetensors")
    assert f"offsets (num_ws {G.num_ws})" in out  # the schedule for this generator, not a 1024-px one's 18 codes
    assert f"{G.num_ws} codes of {G.w_dim}" in out and "data " in out and "2 images" in out


def test_directions_print_text_or_json(tmp_path, capsys):
    from cycle_encoding.editing import interfacegan_direction, save_directions

    save_directions(interfacegan_direction(torch.randn(32), name="smile"), tmp_path / "d.safetensors")
    assert main(["directions", "show", str(tmp_path / "d.safetensors")]) == 0
    text = capsys.readouterr().out
    assert "method: interfacegan" in text and "{" not in text
    assert main(["directions", "show", str(tmp_path / "d.safetensors"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["names"] == ["smile"]


def test_info_brief_is_one_line(run, capsys):
    assert main(["info", "--brief", str(run / "g.safetensors")]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "16x16x3" in out[0] and "6 codes of 32" in out[0]


def test_evaluate_a_run_folder_against_its_inputs(run, tmp_path, capsys):
    assert main(["evaluate", "--pred", str(run / "run"), "--stage", "tune", "--json", str(tmp_path / "m.json")]) == 0
    rep = json.loads((tmp_path / "m.json").read_text())
    assert rep["pairs"] == 2 and "stage tune" in rep["pred_dir"]
    for rec in rep["images"]:
        d = run / "run" / "images" / rec["name"]
        # MSE of the two PNGs as [-1, 1] images, computed here with numpy
        a, b = (np.asarray(Image.open(d / f), dtype=np.float64) / 127.5 - 1 for f in ("recon_tune.png", "target.png"))
        assert rec["mse"] == pytest.approx(float(((a - b) ** 2).mean()), rel=1e-5)
    # the encoder stage is worse than the tuned one on these images; a stage the run lacks is refused
    assert main(["evaluate", "--pred", str(run / "run"), "--stage", "encoder", "--json", str(tmp_path / "e.json")]) == 0
    enc = json.loads((tmp_path / "e.json").read_text())["summary"]["mse"]["mean"]
    assert enc > rep["summary"]["mse"]["mean"]
    capsys.readouterr()
    assert main(["evaluate", "--pred", str(run / "run"), "--stage", "refine"]) == 2
    assert "no stage 'refine' (its stages: encoder, tune)" in capsys.readouterr().err
    # the original images as --target: paired by name
    assert main(["evaluate", "--pred", str(run / "run"), "--target", str(run / "targets"), "--quiet"]) == 0
    assert "paired 2 image(s)" in capsys.readouterr().out


# -- class edits measured on their classes -----------------------------------------------------------------------------


def test_class_edit_measures_only_images_of_its_classes(run, tmp_path):
    from cycle_encoding.editing import interfacegan_direction
    from cycle_encoding.editing.measures import build_preservation
    from cycle_encoding.editing.render import EditRequest, render_run_edits

    names = sorted(p.name for p in (run / "run" / "images").iterdir() if p.is_dir() and not p.name.startswith("."))
    # a stand-in "classifier": images brighter than the darker of the two reconstructions are "of the classes"
    means = {n: float(ce.from_pil(Image.open(run / "run" / "images" / n / "recon_tune.png")).clamp(-1, 1).mean())
             for n in names}  # fmt: skip
    thr = min(means.values()) + 1e-3
    member = [n for n in names if means[n] > thr]
    assert len(member) == 1

    def members(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x.mean((1, 2, 3)) > thr, torch.ones(len(x)), torch.full((len(x),), float("nan")))

    d = interfacegan_direction(torch.randn(32, generator=torch.Generator().manual_seed(3)))
    doc = render_run_edits(run / "run", EditRequest(d, 0, (-1.0, 0.0, 1.0), tag="cls"), device="cpu",
                           preservation=build_preservation("mse", "cpu"), out_dir=tmp_path / "cls",
                           log=lambda s: None, members=members, members_info={"classes": ["A", "B"]})  # fmt: skip
    assert doc["measured_on"] == {
        "classes": ["A", "B"],
        "images": member,
        "left_out": [n for n in names if n not in member],
    }
    per = {r["name"]: r["preservation"] for r in doc["images"]}
    assert set(per) == set(names)  # every image keeps its own values
    summary = [r["value"]["mean"] for r in doc["measures"]["preservation"]["per_strength"]]
    assert summary == pytest.approx(per[member[0]])  # the summary is over the member image only
    assert (tmp_path / "cls" / f"{names[0]}_sweep.gif").is_file()


def test_invert_console_quiet_lines_and_bars(run, tmp_path, capsys):
    base = ["invert", str(run / "targets"), "--generator", str(run / "g.safetensors"), "--encoder",
            str(run / "e.safetensors"), "--stages", "encoder,tune", "--perceptual", STANDIN, "--tune-steps", "3",
            "--no-early-stop", "--device", "cpu"]  # fmt: skip
    # a log (lines): a line per stage per image, no carriage-return redraws
    assert main([*base, "--out", str(tmp_path / "a"), "--progress", "lines"]) == 0
    err = capsys.readouterr().err
    assert "\r" not in err
    stage_lines = [x for x in err.splitlines() if ": encoder mse" in x or ": tune mse" in x]
    assert len(stage_lines) == 2 * 2  # (and a status line as each tuning starts, then every 30 s)
    # --quiet: the result line of each image only
    assert main([*base, "--out", str(tmp_path / "b"), "--quiet"]) == 0
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("[")]
    assert len(lines) == 2 and all(": tune mse" in x for x in lines) and "\r" not in err
    # bars: each stage's bar has its total (3 tuning steps)
    assert main([*base, "--out", str(tmp_path / "c"), "--progress", "bar"]) == 0
    err = capsys.readouterr().err
    assert "\r" in err and "/3 " in err
