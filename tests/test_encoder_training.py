"""Encoder training: the loss falls, a resumed run repeats an uninterrupted one exactly, torchrun stays in sync."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.cli import main
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.training.encoder_trainer import EncoderTrainer, load_train_config
from cycle_encoding.utils import save_image
from tests.conftest import make_tiny_generator

SMALL_ENCODER = {"widths": [8, 16, 16, 32], "units": [1, 1, 1, 1]}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny generator and 24 of its own images (so that perfect reconstruction exists)."""
    root = tmp_path_factory.mktemp("enc")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    data = root / "data"
    data.mkdir()
    torch.manual_seed(1)
    with torch.no_grad():
        imgs = G(torch.randn(24, G.z_dim), truncation=0.8).clamp(-1, 1)
    for i, im in enumerate(imgs):
        save_image(im, data / f"img{i:03d}.png")
    return root


def config(root: Path, **kw):
    base = dict(
        generator=str(root / "g.safetensors"),
        data=str(root / "data"),
        out=str(root / "runs"),
        preset="e4e",
        total_steps=40,  # e4e preset rescaled: W for 2 steps, one offset more every step to 4, then W+
        batch_size=4,
        perceptual="none",
        identity="none",
        encoder=SMALL_ENCODER,
        val_count=4,
        r1_every=2,
        log_every=1,
        image_every=1000,
        val_every=1000,
        checkpoint_every=1000,
        seed=3,
    )
    base.update(kw)
    return load_train_config(base)


def losses(run_dir: Path) -> list[tuple[int, float, int]]:
    recs = [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["stage"]) for r in recs if r["kind"] == "train"]


def test_training_lowers_reconstruction_loss(setup):
    t = EncoderTrainer(config(setup, lr=2e-3, max_steps=40), quiet=True)
    before = t.validate()["l2"]
    t.run()
    after = t.validate()["l2"]
    t.close()
    assert after < 0.85 * before, (before, after)
    # the run folder holds what it says
    run = t.run_dir
    assert (run / "config.json").is_file() and (run / "schedule.json").is_file()
    assert (run / "checkpoint.pt").is_file() and (run / "encoder.safetensors").is_file()
    # the Ranger state beside the encoder, the one of the training checkpoint
    from cycle_encoding.inversion import load_encoder_source

    side = load_encoder_source(run / "encoder.safetensors").optimizer_state
    ck = load_encoder_source(run / "checkpoint.pt").optimizer_state
    assert side is not None and ck is not None and set(side.state) == set(ck.state)
    for name, st in ck.state.items():
        assert side.state[name]["step"] == st["step"] and torch.equal(side.state[name]["exp_avg"], st["exp_avg"])
        torch.testing.assert_close(side.state[name]["slow_buffer"], st["slow_buffer"])
    assert list((run / "images").glob("step*.png"))
    E = ce.load_encoder(run / "encoder.safetensors")
    assert E.trained_stage == E.max_stage == 5  # e4e preset: W+ at the end
    E_ck = ce.load_encoder(run / "checkpoint.pt")  # the training checkpoint reads as an encoder too
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(E(x), E_ck(x))
    stages = [s for _, _, s in losses(run)]
    assert stages[0] == 0 and max(stages) == 5


def test_resume_repeats_the_uninterrupted_run_exactly(setup):
    full = EncoderTrainer(config(setup, max_steps=8, name="full"), quiet=True)
    full.run()
    full.close()
    ref = losses(full.run_dir)
    assert len(ref) == 8 and len({s for _, _, s in ref}) > 2  # the stage changes during these steps

    part = EncoderTrainer(config(setup, max_steps=8, name="part", checkpoint_every=3), quiet=True)
    part.run(until=3)  # "killed" right after the checkpoint of step 3
    part.close()
    resumed = EncoderTrainer(
        config(setup, max_steps=8, name="part", checkpoint_every=3), resume=part.run_dir, quiet=True
    )
    assert resumed.step == 3
    resumed.run()
    resumed.close()
    got = losses(part.run_dir)
    assert [s for s, _, _ in got] == list(range(1, 9))
    assert got == ref  # identical losses and stages, step by step
    resumes = [
        r for r in map(json.loads, (part.run_dir / "log.jsonl").read_text().splitlines()) if r["kind"] == "resume"
    ]
    assert [(r["step"], r["changed"]) for r in resumes] == [(3, {})]


def test_a_resume_logs_the_settings_it_changed(setup):
    part = EncoderTrainer(config(setup, max_steps=8, name="part", checkpoint_every=3), quiet=True)
    part.run(until=3)
    part.close()
    resumed = EncoderTrainer(
        config(setup, max_steps=5, name="part", checkpoint_every=3, val_patience=0), resume=part.run_dir, quiet=True
    )
    resumed.run()
    resumed.close()
    log = [json.loads(line) for line in (part.run_dir / "log.jsonl").read_text().splitlines()]
    kinds = [r["kind"] for r in log]
    assert kinds.count("start") == 1 and kinds.count("resume") == 1 and kinds.index("start") < kinds.index("resume")
    resume = log[kinds.index("resume")]
    assert resume["step"] == 3 and resume["changed"] == {"max_steps": [8, 5]}
    assert log[-1]["kind"] == "end" and log[-1]["step"] == 5


def test_cli_trains_and_reports_bad_input(setup, tmp_path, capsys):
    rc = main(["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(setup / "data"),
               "--out", str(tmp_path), "--preset", "w", "--total-steps", "100", "--max-steps", "2",
               "--perceptual", "none", "--encoder-widths", "8,16,16,32", "--encoder-units", "1,1,1,1",
               "--w-only", "--batch-size", "2", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    run = next(tmp_path.iterdir())
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["encoder"]["w_only"] and cfg["_resolved"]["networks"] == {"perceptual": "none", "identity": "none"}
    assert ce.load_encoder(run / "encoder.safetensors").max_stage == 0
    capsys.readouterr()
    # a folder with no images
    (tmp_path / "empty").mkdir()
    rc = main(["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(tmp_path / "empty"),
               "--perceptual", "none"])  # fmt: skip
    assert rc == 2 and "no image files" in capsys.readouterr().err
    # LPIPS without its backbone is an error that names the missing file, not a silent fallback
    rc = main(["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(setup / "data"),
               "--out", str(tmp_path / "x"), "--max-steps", "1"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "backbone" in err.lower()


def test_mostly_unreadable_data_stops_with_a_clear_message(setup, tmp_path):
    bad = tmp_path / "bad"
    bad.mkdir()
    for i in range(12):
        (bad / f"broken{i:02d}.png").write_bytes(b"not a png")
    (bad / "good.png").write_bytes((setup / "data" / "img000.png").read_bytes())
    t = EncoderTrainer(config(setup, data=str(bad), val_count=0, max_steps=2), quiet=True)
    with pytest.raises(CycleEncodingError, match="unreadable"):
        t.run()
    t.close()


def test_encoder_init_with_wrong_number_of_layers_is_refused(setup, tmp_path):
    E = ce.Encoder4Editing(ce.EncoderConfig(num_ws=4, w_dim=32, input_size=16, **SMALL_ENCODER))
    ce.save_encoder(E, tmp_path / "e.safetensors")
    with pytest.raises(CycleEncodingError, match="4 heads but the generator has 6 style layers"):
        EncoderTrainer(config(setup, encoder_init=str(tmp_path / "e.safetensors")), quiet=True)


def test_two_processes_under_torchrun_stay_in_sync(setup, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cycle_encoding.cli", "train-encoder", "--generator", str(setup / "g.safetensors"),
           "--data", str(setup / "data"), "--out", str(tmp_path), "--preset", "e4e", "--total-steps", "40",
           "--max-steps", "4", "--batch-size", "4", "--perceptual", "none", "--encoder-widths", "8,16,16,32",
           "--encoder-units", "1,1,1,1", "--r1-every", "2", "--log-every", "1", "--device", "cpu"]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=3600
    )  # catches a hang only: a slow machine must not fail it
    assert r.returncode == 0, r.stderr[-3000:]
    run = next(tmp_path.iterdir())
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    end = recs[-1]
    assert end["kind"] == "end" and len(end["weights_sha256"]) == 2
    assert end["ranks_in_sync"] and end["weights_sha256"][0] == end["weights_sha256"][1]
    assert recs[0]["world_size"] == 2


def test_encoder_body_initialised_from_arcface_layout(setup, tmp_path):
    """An ArcFace IR-SE-50 file (FORMATS.md layout, written here) initialises the encoder's input layer and body."""
    from tests.layouts import irse_body_sd

    sd = irse_body_sd()  # IR-SE-50: widths 64..512, units 3, 4, 14, 3
    g = torch.Generator().manual_seed(5)
    for name, c in (("output_layer.0", 512), ("output_layer.4", 512)):
        sd[f"{name}.weight"], sd[f"{name}.bias"] = torch.ones(c), torch.zeros(c)
        sd[f"{name}.running_mean"], sd[f"{name}.running_var"] = torch.zeros(c), torch.ones(c)
    sd["output_layer.3.weight"] = torch.randn(512, 512 * 7 * 7, generator=g) * 0.01
    sd["output_layer.3.bias"] = torch.zeros(512)
    torch.save(sd, tmp_path / "model_ir_se50.pth")
    t = EncoderTrainer(config(setup, encoder={}, encoder_init=str(tmp_path / "model_ir_se50.pth")), quiet=True)
    own = t.E.state_dict()
    for k in ("input_layer.0.weight", "body.3.shortcut_layer.0.weight", "body.23.res_layer.5.fc2.weight"):
        assert torch.equal(own[k], sd[k]), k
    assert "ArcFace" in t.init_note
    t.close()
    # a scaled-down body cannot take IR-SE-50 weights: the key is named
    with pytest.raises(CycleEncodingError, match=r"ArcFace key input_layer\.0\.weight has shape"):
        EncoderTrainer(config(setup, encoder_init=str(tmp_path / "model_ir_se50.pth")), quiet=True)


def test_validation_plateau_stops_in_the_final_stage_only(setup, tmp_path):
    """--val-patience K: the run stops at the K-th validation after the first one of the schedule's last stage that
    misses the best (a margin of 1000% makes every one miss), exports its encoder and says why; validations of the
    earlier stages do not count (counted, the run would stop at step K + 1)."""
    cfg = config(setup, out=str(tmp_path / "runs"), val_every=1, val_patience=2, val_min_improvement=10.0)
    t = EncoderTrainer(cfg, quiet=True)
    start = t.final_stage_start
    assert start == t.schedule.stage_changes(t.G.num_ws)[-1][0] and start > 3  # the e4e preset grows its stage first
    summary = t.run()
    t.close()
    assert summary["step"] == start + 3  # validations at start+1, start+2, start+3 in the last stage: the third stops
    recs = [json.loads(line) for line in (t.run_dir / "log.jsonl").read_text().splitlines()]
    stops = [r for r in recs if r["kind"] == "stop"]
    assert len(stops) == 1 and stops[0]["step"] == start + 3 and "validation loss" in stops[0]["reason"]
    assert (t.run_dir / "encoder.safetensors").is_file()
    ck = torch.load(t.run_dir / "checkpoint.pt", weights_only=False)
    assert [h["step"] for h in ck["val_history"]] == list(range(1, start + 4))


def test_validation_plateau_off_or_never_reached_runs_to_the_end(setup, tmp_path):
    for kw in ({"val_patience": 0}, {"val_patience": 2, "val_min_improvement": 0.0, "val_every": 1000}):
        t = EncoderTrainer(config(setup, out=str(tmp_path / "runs"), max_steps=12, **kw), quiet=True)
        summary = t.run()
        t.close()
        assert summary["step"] == 12
        recs = [json.loads(line) for line in (t.run_dir / "log.jsonl").read_text().splitlines()]
        assert not [r for r in recs if r["kind"] == "stop"]


def test_perceptual_auto_is_the_domains_as_invert_takes_it(setup, tmp_path, monkeypatch, capsys):
    """`--perceptual` defaults to the domain's distance, as the identity term does: Fashion-MNIST (its data, or a grey
    generator) gets the shipped fmnist-features, which needs no file; colour images the paper's lpips-alex, whose
    missing backbone is named. The README's example runs its dry run without any LPIPS file."""
    from cycle_encoding.data import fashion_mnist as fm
    from cycle_encoding.training.encoder_trainer import perceptual_choice

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "no-torch-home"))  # no LPIPS backbone can be found
    assert perceptual_choice(config(setup, perceptual="auto", data="fashion-mnist"), 3)[0] == "fmnist-features"
    assert perceptual_choice(config(setup, perceptual="auto", data="/photos"), 1)[0] == "fmnist-features"
    assert perceptual_choice(config(setup, perceptual="auto", data="/photos"), 3)[0] == "lpips-alex"
    assert perceptual_choice(config(setup, perceptual="dlib-face", data="fashion-mnist"), 1) == ("dlib-face", "")
    base = ["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(setup / "data"),
            "--batch-size", "2", "--dry-run"]  # fmt: skip
    assert main(base) == 2 and "lpips-alex needs" in capsys.readouterr().err  # colour: the paper's distance
    if not (fm.DEFAULT_ROOT / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip("Debian package dataset-fashion-mnist not installed")
    rc = main(["train-encoder", "--generator", "fmnist-generator", "--data", "fashion-mnist", "--preset", "paper",
               "--dry-run"])  # fmt: skip
    out, err = capsys.readouterr()
    assert rc == 0, err
    line = next(s for s in out.splitlines() if s.strip().startswith("perceptual "))
    assert line.split()[1] == "fmnist-features" and "(auto: fmnist-features, the shipped network" in line
    assert "identity fmnist-features" in out
