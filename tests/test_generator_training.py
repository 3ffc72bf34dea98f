"""Generator training: fakes move toward the data, g_ema follows its formula, a resumed run repeats an uninterrupted
one exactly, two torchrun processes stay in sync, and the command line resolves and checks its options."""

from __future__ import annotations

import gzip
import json
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import cycle_encoding as ce
from cycle_encoding.cli import main
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.training.generator_trainer import (
    GeneratorTrainer,
    accumulate,
    ema_beta,
    lazy_ratio,
    load_generator_train_config,
)

TINY_G = {"style_dim": 32, "n_mlp": 2, "channel_base": 256, "channel_max": 32}  # 32, 32, 16 channels at 4, 8, 16 px


# these networks are tiny: a second intra-op thread only adds waiting (7x slower on 2 busy cores)
pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def write_idx(path: Path, array: np.ndarray, magic: int) -> None:
    """idx layout: big-endian uint32 magic (0x0000 08 NDIM), big-endian uint32 sizes, uint8 values; gzipped."""
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape) + array.tobytes())


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    """256 Fashion-MNIST-like images (bright centred rectangles on black) in the idx layout of the real files."""
    root = tmp_path_factory.mktemp("fmnist")
    rng = np.random.default_rng(0)
    images = np.zeros((256, 28, 28), np.uint8)
    for i in range(len(images)):
        h, w = rng.integers(8, 22, 2)
        top, left = (28 - h) // 2, (28 - w) // 2
        images[i, top : top + h, left : left + w] = rng.integers(120, 256)
    labels = rng.integers(0, 10, len(images)).astype(np.uint8)
    write_idx(root / "train-images-idx3-ubyte.gz", images, 2051)
    write_idx(root / "train-labels-idx1-ubyte.gz", labels, 2049)
    return root


def config(root: Path, out: Path, **kw):
    base = dict(
        data=f"fashion-mnist:train@{root}",
        resolution=16,
        out=str(out),
        batch_size=8,
        max_steps=8,
        generator=TINY_G,
        r1_every=4,
        log_every=1,
        image_every=1000,
        checkpoint_every=1000,
        sample_count=16,
        device="cpu",
        seed=0,
    )
    base.update(kw)
    return load_generator_train_config(base)


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last train record of each step (a killed part's records are superseded by the resumed run's)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = r
    return out


LOSS_KEYS = ("d_loss", "d_real", "d_fake", "real_score", "fake_score", "g_loss", "r1", "path_penalty", "path_length")


def test_training_moves_fakes_toward_the_data(data_root, tmp_path):
    """What must move: the mean image. Every real image has a black (-1) frame and a bright centre; the random G
    starts far from that mean. D separates reals from fakes first by such first-order statistics, so the
    non-saturating G loss pushes the fakes' mean image toward the reals' within a few dozen steps, while D
    (winning early) drives its loss below chance level 2 ln 2 and scores reals above fakes."""
    t = GeneratorTrainer(config(data_root, tmp_path, max_steps=30, ema_kimg=0.05), quiet=True)
    real_mean = torch.stack([t.data.load(i) for i in range(len(t.data))]).mean(0)
    z = t.sample_latents()

    def distance() -> float:
        with torch.no_grad():
            return float((t.G(z, noise_mode="const").clamp(-1, 1).mean(0) - real_mean).pow(2).mean())

    before = distance()
    summary = t.run()
    after = distance()
    ema_after = float((t.samples().mean(0) - real_mean).pow(2).mean())
    t.close()
    assert after < 0.5 * before, (before, after)
    assert ema_after < before, (before, ema_after)
    recs = [train_records(t.run_dir)[s] for s in range(21, 31)]
    assert np.mean([r["d_loss"] for r in recs]) < 2 * math.log(2)
    assert np.mean([r["real_score"] - r["fake_score"] for r in recs]) > 0
    assert "r1" in train_records(t.run_dir)[1] and "r1" not in train_records(t.run_dir)[2]  # lazy: steps 0, 4, ...
    # the run folder and the exported g_ema
    run = t.run_dir
    assert summary["step"] == 30 and run.name.endswith("generator-fashion-mnist-16")
    for name in (
        "config.json",
        "checkpoint.pt",
        "generator.safetensors",
        "images/reals.png",
        "images/fakes0000030.png",
    ):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["_resolved"]["img_channels"] == 1 and cfg["_resolved"]["r1_gamma"] == pytest.approx(0.0002 * 16**2 / 8)
    G = ce.load_generator(run / "generator.safetensors")
    assert G.config == t.g_ema.config and G.img_channels == 1
    for k, v in t.g_ema.state_dict().items():
        assert torch.equal(G.state_dict()[k], v), k
    prov = G.provenance
    assert prov["step"] == 30 and prov["network"] == "g_ema" and prov["made_by"] == "cycle-encoding train-generator"
    assert {"command", "data", "train_seconds", "machine"} <= set(prov) and prov["machine"][
        "torch"
    ] == torch.__version__
    with torch.no_grad():  # w_avg exported = mean of mapping(z)
        w = G.style(torch.randn(20_000, G.z_dim, generator=torch.Generator().manual_seed(9))).mean(0)
    assert w.abs().max() > 0.5 and torch.allclose(G.w_avg, w, atol=0.1)  # Monte Carlo means of 10k and 20k draws


def test_optimizer_settings_and_ema_follow_the_formulas(data_root, tmp_path):
    assert ema_beta(32, 10) == 0.5 ** (32 / (10 * 1000))  # rosinality's accum at batch 32
    assert ema_beta(16, 10, cur_nimg=160, rampup=0.05) == 0.5 ** (16 / 8)  # NVIDIA's ramp-up: 160 * 0.05 images
    assert lazy_ratio(16) == 16 / 17 and lazy_ratio(4, active=False) == 1.0
    t = GeneratorTrainer(config(data_root, tmp_path, pl_weight=2.0, pl_every=4, r1_every=16, ema_kimg=0.1), quiet=True)
    assert t.opt_d.defaults["lr"] == pytest.approx(0.002 * 16 / 17)
    assert t.opt_d.defaults["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert t.opt_g.defaults["lr"] == pytest.approx(0.002 * 4 / 5)
    assert t.opt_g.defaults["betas"] == pytest.approx((0.0, 0.99 ** (4 / 5)))
    # g_ema after one step = beta * g_ema before + (1 - beta) * G after
    old = {k: v.clone() for k, v in t.g_ema.named_parameters()}
    logs = t.train_step()
    assert {"r1", "path_penalty", "mean_path_length"} <= set(logs)  # step 0: both lazy regularizers run
    beta = 0.5 ** (8 / 100)
    for k, p in t.G.named_parameters():
        assert torch.allclose(dict(t.g_ema.named_parameters())[k], beta * old[k] + (1 - beta) * p, atol=1e-6), k
    t.close()
    t2 = GeneratorTrainer(config(data_root, tmp_path), quiet=True)  # path length off: no correction for G
    assert t2.opt_g.defaults["lr"] == 0.002 and t2.opt_g.defaults["betas"] == (0.0, 0.99)
    t2.close()
    d = accumulate  # the EMA helper on its own
    a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    wa = a.weight.detach().clone()
    d(a, b, 0.25)
    assert torch.allclose(a.weight, 0.25 * wa + 0.75 * b.weight)


def test_resume_repeats_the_uninterrupted_run_exactly(data_root, tmp_path):
    kw = dict(max_steps=8, r1_every=2, pl_weight=2.0, pl_every=3, mixing_prob=0.9, checkpoint_every=3)
    full = GeneratorTrainer(config(data_root, tmp_path, name="full", **kw), quiet=True)
    full.run()
    full.close()
    ref = train_records(full.run_dir)

    part = GeneratorTrainer(config(data_root, tmp_path, name="part", **kw), quiet=True)
    part.run(until=4)  # checkpoint at step 3 (and at 4, the end of this call)
    part.train_step()  # steps 5 and 6 happen but are never saved: the process is "killed" here
    part.train_step()
    part.close()
    ck = torch.load(part.run_dir / "checkpoint.pt", weights_only=True)
    assert ck["step"] == 4
    resumed = GeneratorTrainer(config(data_root, tmp_path, name="part", **kw), resume=part.run_dir, quiet=True)
    assert resumed.step == 4
    resumed.run()
    got = train_records(part.run_dir)
    assert sorted(got) == sorted(ref) == list(range(1, 9))
    for s in range(1, 9):
        for k in LOSS_KEYS:
            assert got[s].get(k) == ref[s].get(k), (s, k)  # identical, not close
    assert any("path_penalty" in r for r in ref.values()) and any("r1" in r for r in ref.values())
    assert resumed.weights_digest() == full.weights_digest()
    resumed.close()


def test_two_processes_under_torchrun_stay_in_sync(data_root, tmp_path):
    opts = {"data": f"fashion-mnist:train@{data_root}", "resolution": 16, "batch_size": 8, "generator": TINY_G,
            "r1_every": 2, "pl_weight": 2.0, "pl_every": 2, "log_every": 1, "sample_count": 4}  # fmt: skip
    (tmp_path / "opts.yaml").write_text(yaml.safe_dump(opts))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "cycle_encoding.cli", "train-generator", "--config", str(tmp_path / "opts.yaml"),
           "--out", str(tmp_path / "runs"), "--max-steps", "4", "--device", "cpu"]  # fmt: skip
    r = subprocess.run(
        cmd, capture_output=True, text=True, env=env, timeout=3600
    )  # catches a hang only: a slow machine must not fail it
    assert r.returncode == 0, r.stderr[-3000:]
    run = next((tmp_path / "runs").iterdir())
    recs = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    assert recs[0]["kind"] == "start" and recs[0]["world_size"] == 2
    assert [r["step"] for r in recs if r["kind"] == "train"] == [1, 2, 3, 4]
    end = recs[-1]
    assert end["kind"] == "end" and len(end["weights_sha256"]) == 2
    assert end["ranks_in_sync"] and end["weights_sha256"][0] == end["weights_sha256"][1]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["max_steps"] == 4 and cfg["pl_weight"] == 2.0 and cfg["_resolved"]["world_size"] == 2
    assert ce.load_generator(run / "generator.safetensors").provenance["world_size"] == 2


def test_cli_dry_run_resume_and_errors(data_root, tmp_path, capsys):
    opts = tmp_path / "opts.yaml"
    opts.write_text(yaml.safe_dump({"data": f"fashion-mnist:train@{data_root}", "batch_size": 16, "n_mlp": 3}))
    assert main(["train-generator", "--config", str(opts), "--dry-run"]) == 2  # n_mlp belongs under generator:
    assert "unknown option(s) n_mlp" in capsys.readouterr().err
    opts.write_text(yaml.safe_dump({"data": f"fashion-mnist:train@{data_root}", "batch_size": 16,
                                    "generator": {"n_mlp": 3}}))  # fmt: skip
    assert main(["train-generator", "--config", str(opts), "--batch-size", "64", "--channel-max", "64",
                 "--dry-run"]) == 0  # fmt: skip
    cfg = json.loads(capsys.readouterr().out)
    assert cfg["batch_size"] == 64 and cfg["generator"]["n_mlp"] == 3 and cfg["generator"]["channel_max"] == 64
    assert cfg["_resolved"]["r1_gamma"] == pytest.approx(0.0002 * 32**2 / 64)
    assert cfg["_resolved"]["generator_channels"] == {"4": 64, "8": 64, "16": 64, "32": 64}
    assert cfg["_resolved"]["img_channels"] == 1
    assert not (tmp_path / "runs").exists()

    # train 2 steps, then resume to 3 with the same command line tool
    common = ["--data", f"fashion-mnist:train@{data_root}", "--resolution", "16", "--style-dim", "32", "--n-mlp", "2",
              "--channel-base", "256", "--channel-max", "32", "--batch-size", "4", "--sample-count", "4",
              "--log-every", "1", "--device", "cpu"]  # fmt: skip
    assert main(["train-generator", *common, "--out", str(tmp_path / "runs"), "--max-steps", "2"]) == 0
    run = next((tmp_path / "runs").iterdir())
    assert main(["train-generator", "--resume", str(run), "--max-steps", "3"]) == 0
    assert sorted(train_records(run)) == [1, 2, 3]
    assert ce.load_generator(run / "generator.safetensors").provenance["step"] == 3
    capsys.readouterr()
    assert main(["train-generator", "--resume", str(run), "--batch-size", "8"]) == 2
    assert "cannot change when resuming" in capsys.readouterr().err
    # missing data: one line that says how to get it
    assert main(["train-generator", "--data", f"fashion-mnist:train@{tmp_path / 'none'}", "--out", str(tmp_path)]) == 2
    assert "apt-get install dataset-fashion-mnist" in capsys.readouterr().err
    with pytest.raises(CycleEncodingError, match="resolution must be a power of two"):
        config(data_root, tmp_path, resolution=24)


def tiny_classifier(tmp_path: Path) -> Path:
    """A random 3-output grey 16-px classifier, saved in the project's format (the metric only needs features)."""
    from cycle_encoding.checkpoints.classifier import save_classifier
    from cycle_encoding.networks.classifier import AttributeClassifier, ClassifierConfig

    torch.manual_seed(3)
    clf = AttributeClassifier(ClassifierConfig(outputs=("a", "b", "c"), input_size=16, in_channels=1, widths=(4, 8)))
    return save_classifier(clf, tmp_path / "clf.safetensors")


def test_sample_metrics_equal_an_independent_computation(tmp_path):
    from scipy import linalg

    from cycle_encoding.checkpoints.classifier import load_classifier
    from cycle_encoding.metrics import generator_sample_metrics

    torch.manual_seed(0)
    G = ce.Generator(ce.GeneratorConfig(resolution=16, style_dim=32, n_mlp=2, channel_base=256, channel_max=32,
                                        img_channels=1))  # fmt: skip
    clf = load_classifier(tiny_classifier(tmp_path))
    ref = torch.rand(50, 1, 16, 16) * 2 - 1
    m = generator_sample_metrics(G, clf, ref, samples=60, seed=5, batch_size=25)
    # by hand: the same draws (25, 25, 10 from one seeded CPU generator), features, Gaussian fit, sqrtm
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        fake = torch.cat([G(torch.randn(n, 32, generator=g), noise_mode="const").clamp(-1, 1) for n in (25, 25, 10)])
        fa, fb = clf.embed(fake).double().numpy(), clf.embed(ref).double().numpy()
        labels = clf(fake).argmax(1)
    s1, s2 = np.cov(fa, rowvar=False), np.cov(fb, rowvar=False)
    d = fa.mean(0) - fb.mean(0)
    fd = d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(np.real(linalg.sqrtm(s1 @ s2)))
    assert m["fd"] == pytest.approx(fd, rel=1e-6, abs=1e-9)
    assert m["class_counts"] == {k: int((labels == i).sum()) for i, k in enumerate(("a", "b", "c"))}
    assert sum(m["class_counts"].values()) == 60
    assert m["min_class_share"] == pytest.approx(min(m["class_counts"].values()) / 60)
    assert "not the Inception FID" in m["name"]


def test_metric_records_leave_training_unchanged_and_a_plateau_stops_the_run(data_root, tmp_path):
    clf = str(tiny_classifier(tmp_path))
    ref = f"fashion-mnist:train@{data_root}"
    plain = GeneratorTrainer(config(data_root, tmp_path, name="plain"), quiet=True)
    plain.run()
    plain.close()
    kw = dict(metric_every=2, metric_samples=40, metric_classifier=clf, metric_reference=ref)
    timed = GeneratorTrainer(config(data_root, tmp_path, name="metric", **kw), quiet=True)
    timed.run()
    timed.close()
    # the metric draws from its own generator: the training is the same, bit for bit
    assert timed.weights_digest() == plain.weights_digest()
    recs = [json.loads(line) for line in (timed.run_dir / "log.jsonl").read_text().splitlines()]
    metrics = [r for r in recs if r["kind"] == "metric"]
    assert [r["step"] for r in metrics] == [2, 4, 6, 8]
    assert all(r["samples"] == 40 and r["reference_images"] == 40 and math.isfinite(r["fd"]) for r in metrics)
    assert all(sum(r["class_counts"].values()) == 40 for r in metrics)
    assert not any(r["kind"] == "stop" for r in recs)
    # a margin no evaluation can meet: the run stops after the second evaluation, checkpointed there
    stop = GeneratorTrainer(config(data_root, tmp_path, name="stop", metric_patience=1, metric_min_improvement=1.0,
                                   **kw), quiet=True)  # fmt: skip
    summary = stop.run()
    stop.close()
    assert summary["step"] == 4
    recs = [json.loads(line) for line in (stop.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in recs if r["kind"] == "stop"] == [4]
    assert torch.load(stop.run_dir / "checkpoint.pt", weights_only=True)["step"] == 4
    back = GeneratorTrainer(config(data_root, tmp_path, name="stop", metric_patience=1, metric_min_improvement=1.0,
                                   **kw), resume=stop.run_dir, quiet=True)  # fmt: skip
    assert [h["step"] for h in back.metric_history] == [2, 4]  # the curve survives resuming
    back.close()
    with pytest.raises((ValueError, CycleEncodingError), match="metric_classifier"):
        load_generator_train_config({"data": str(tmp_path), "metric_every": 2})  # a folder: no default classifier
