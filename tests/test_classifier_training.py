"""The classifier trainer on a small synthetic Fashion-MNIST-layout folder (idx files written here): augmentation
geometry, features(), a few steps lower the loss, the export loads back bit-exactly, the card's hash, a resumed run
repeats an uninterrupted one exactly, the CLI."""

from __future__ import annotations

import gzip
import json
import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from cycle_encoding.assets import card_sha256
from cycle_encoding.checkpoints.classifier import load_classifier, save_classifier
from cycle_encoding.checkpoints.native import file_sha256, read_native_header
from cycle_encoding.cli import main
from cycle_encoding.data.fashion_mnist import CLASSES, pad_to_32, to_unit_range
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.networks.classifier import AttributeClassifier, ClassifierConfig
from cycle_encoding.training.classifier_trainer import (
    ClassifierTrainConfig,
    ClassifierTrainer,
    augment,
    train_classifier,
)


def write_idx(path: Path, array: np.ndarray) -> None:
    """idx layout: 0, 0, 0x08 (uint8), ndim; big-endian uint32 sizes; the bytes (gzipped)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Class k: stripes (horizontal for k < 5, vertical otherwise) of period 2 + k % 5 over a 16x16 patch at a random
    place, on noise: a texture a small global-average-pooled convnet can tell apart (and unchanged by flips)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, size=n).astype(np.uint8)
    images = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    grid = np.arange(16)
    for i, k in enumerate(labels):
        period = 2 + int(k) % 5
        on = (grid % period) < (period + 1) // 2
        patch = (
            np.where(on[:, None], 220, 30) * np.ones((16, 16))
            if k < 5
            else np.where(on[None, :], 220, 30) * np.ones((16, 16))
        )
        r, c = rng.integers(0, 13, size=2)
        images[i, r : r + 16, c : c + 16] = patch.astype(np.uint8)
    return images, labels


@pytest.fixture(scope="module")
def fake_fmnist(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("fmnist")
    for prefix, n, seed in (("train", 600, 0), ("t10k", 200, 1)):
        images, labels = synthetic(n, seed)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return root


def test_augment_shifts_by_at_most_shift_and_fills_background() -> None:
    x = torch.full((64, 1, 32, 32), -1.0)
    x[:, 0, 15, 10] = 1.0
    out = augment(x, torch.Generator().manual_seed(0), shift=2, flip=False)
    assert out.shape == x.shape
    pos = (out[:, 0] == 1.0).flatten(1).float().argmax(1)
    rows, cols = pos // 32, pos % 32
    assert ((out == 1.0).flatten(1).sum(1) == 1).all()  # the pixel moved, nothing else appeared
    assert ((out == -1.0).flatten(1).sum(1) == 32 * 32 - 1).all()
    assert set((rows - 15).tolist()) == {-2, -1, 0, 1, 2} and set((cols - 10).tolist()) == {-2, -1, 0, 1, 2}


def test_augment_flip_mirrors_about_half() -> None:
    x = torch.randn(200, 1, 8, 8)
    out = augment(x, torch.Generator().manual_seed(1), shift=0, flip=True)
    same = (out == x).flatten(1).all(1)
    mirrored = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | mirrored).all()
    assert 60 < int(mirrored.sum()) < 140


@pytest.mark.parametrize("arch", ["convnet", "vggbn"])
def test_features_end_with_the_penultimate_embedding(arch: str) -> None:
    torch.manual_seed(0)
    m = AttributeClassifier(ClassifierConfig(arch=arch, outputs=CLASSES, input_size=32, in_channels=1, widths=(4, 8)))
    m.eval()
    x = torch.rand(3, 1, 32, 32) * 2 - 1
    feats = m.features(x)
    assert [tuple(f.shape) for f in feats] == [(3, 4, 16, 16), (3, 8, 8, 8), (3, 8)]
    torch.testing.assert_close(feats[-1], feats[-2].mean(dim=(2, 3)))
    torch.testing.assert_close(m.head(feats[-1]), m(x))  # the embedding feeds the final linear layer
    torch.testing.assert_close(m.embed(x), feats[-1])


def test_vggbn_round_trips_with_batchnorm_buffers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    m = AttributeClassifier(ClassifierConfig(arch="vggbn", outputs=("a", "b"), input_size=16, in_channels=1))
    m.train()
    m(torch.randn(8, 1, 16, 16))  # moves the running statistics
    m.eval()
    back = load_classifier(save_classifier(m, tmp_path / "v.safetensors"))
    assert back.config.arch == "vggbn"
    sd, sd2 = m.state_dict(), back.state_dict()
    assert any("running_mean" in k for k in sd)
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)


def train_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float(F.cross_entropy(model(x), y))


def test_a_few_steps_lower_the_loss_and_export_is_exact(fake_fmnist: Path, tmp_path: Path) -> None:
    from cycle_encoding.data.fashion_mnist import load_split

    images, labels = load_split("train", fake_fmnist)
    x = pad_to_32(to_unit_range(images)[:, None])
    y = torch.from_numpy(labels.astype(np.int64))
    cfg = ClassifierTrainConfig(
        data=f"fashion-mnist@{fake_fmnist}", arch="vggbn", widths=(8, 16), seed=3, epochs=4, batch_size=32,
        lr=5e-3, out=str(tmp_path / "runs"), log_every=5, export=str(tmp_path / "ship" / "tiny.safetensors"),
    )  # fmt: skip
    torch.manual_seed(3)  # the trainer seeds the same way before building its model: this is its initial state
    initial = AttributeClassifier(ClassifierConfig(arch="vggbn", outputs=CLASSES, input_size=32, in_channels=1,
                                                   widths=(8, 16)))  # fmt: skip
    res = train_classifier(cfg, command="test", progress=None)
    before, after = train_loss(initial, x, y), train_loss(res["model"], x, y)
    assert after < 0.6 * before, (before, after)
    assert res["metrics"]["accuracy"] > 0.5  # 10 classes: chance is 0.1

    # the exported file holds exactly the trained weights
    loaded = load_classifier(res["exported"])
    sd, sd2 = res["model"].state_dict(), loaded.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    assert torch.equal(res["model"](x[:16]), loaded(x[:16]))
    assert file_sha256(res["exported"]) == file_sha256(res["file"]) == card_sha256(res["card"])

    # the log and the provenance
    records = [json.loads(line) for line in (res["run_dir"] / "log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "start" and records[-1]["kind"] == "test"
    steps = [r["step"] for r in records if r["kind"] == "train"]
    assert steps[-1] == 4 * 19 and steps[0] == 5  # 600 images / 32 = 19 batches an epoch
    pv = read_native_header(res["file"])["provenance"]
    assert pv["command"] == "test" and pv["steps"] == 76 and pv["test_accuracy"] == res["metrics"]["accuracy"]
    assert pv["machine"]["cpu_count"] >= 1 and pv["wall_time_s"] >= 0
    conf = np.array(res["metrics"]["confusion"])
    assert conf.sum() == 200 and np.trace(conf) / 200 == pytest.approx(res["metrics"]["accuracy"])


def test_same_seed_same_weights(fake_fmnist: Path, tmp_path: Path) -> None:
    kw = dict(data=f"fashion-mnist@{fake_fmnist}", arch="vggbn", widths=(4, 8), seed=5, epochs=1, max_steps=4,
              batch_size=32, out=str(tmp_path))  # fmt: skip
    a = train_classifier(ClassifierTrainConfig(**kw), progress=None)["model"].state_dict()
    b = train_classifier(ClassifierTrainConfig(**kw), progress=None)["model"].state_dict()
    c = train_classifier(ClassifierTrainConfig(**{**kw, "seed": 6}), progress=None)["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_train_classifier(fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(["train-classifier", "--data", f"fashion-mnist@{fake_fmnist}", "--arch", "vggbn", "--widths", "4,8",
               "--max-steps", "3", "--out", str(tmp_path), "--no-flip", "--seed", "2"])  # fmt: skip
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    (run,) = tmp_path.iterdir()
    assert run.name == "00000-classifier-vggbn-seed2"
    pv = read_native_header(run / "classifier.safetensors")["provenance"]
    assert "--arch vggbn" in pv["command"] and "--no-flip" in pv["command"] and pv["steps"] == 3
    assert load_classifier(run / "classifier.safetensors").config.widths == (4, 8)


def test_bad_options_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train-classifier", "--arch", "resnet50"]) == 2
    assert "arch must be one of convnet, vggbn" in capsys.readouterr().err
    assert main(["train-classifier", "--data", "mnist"]) == 2
    assert "data must be fashion-mnist" in capsys.readouterr().err


def train_records(run_dir: Path) -> dict[int, dict]:
    """The last train record of each step, without its time (a killed part's records are superseded on resume)."""
    out: dict[int, dict] = {}
    for line in (run_dir / "log.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r["kind"] == "train":
            out[r["step"]] = {k: v for k, v in r.items() if k != "time"}
    return out


def test_resume_repeats_the_uninterrupted_run_exactly(fake_fmnist: Path, tmp_path: Path) -> None:
    """Stopped at step 17 (mid-epoch, between two records), three more steps lost, resumed: the same weights, train
    records and test metrics as one uninterrupted run of 2 epochs (19 steps each, the last batch short)."""
    kw = dict(data=f"fashion-mnist@{fake_fmnist}", arch="vggbn", widths=(4, 8), seed=7, epochs=2, batch_size=32,
              log_every=5, checkpoint_every=100, out=str(tmp_path))  # fmt: skip
    full = train_classifier(ClassifierTrainConfig(**kw, name="full"), command="full", progress=None)

    part = ClassifierTrainer(ClassifierTrainConfig(**kw, name="part"), command="part", progress=None)
    part.run(until=17)  # checkpoint at step 17 (the end of this call)
    for _ in range(3):  # steps 18-20 (across the epoch's end) happen but are never saved: the process is "killed"
        part.train_step()
    part.close()
    assert torch.load(part.run_dir / "checkpoint.pt", weights_only=True)["step"] == 17
    with pytest.raises(CycleEncodingError, match="trained 20 of 38 steps"):
        part.finish()
    resumed = train_classifier(ClassifierTrainConfig(**kw, name="part"), progress=None, resume=part.run_dir)

    ref, got = train_records(full["run_dir"]), train_records(part.run_dir)
    assert sorted(ref) == [5, 10, 15, 20, 25, 30, 35, 38] and 17 in got  # 17: the record of the stop
    assert all(got[s] == ref[s] for s in ref)  # identical, not close (the means span the stop at step 17)
    a, b = full["model"].state_dict(), resumed["model"].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["metrics"] == full["metrics"]
    assert load_file(resumed["file"]).keys() == load_file(full["file"]).keys()
    assert all(torch.equal(v, load_file(full["file"])[k]) for k, v in load_file(resumed["file"]).items())
    pv = read_native_header(resumed["file"])["provenance"]
    assert pv["command"] == "part" and pv["steps"] == 38  # the command that started the run, not the resume
    records = [json.loads(line) for line in (part.run_dir / "log.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records if r["kind"] != "train"] == ["start", "end", "resume", "end", "test"]
    assert next(r for r in records if r["kind"] == "resume")["changed"] == {}  # resumed with the same settings


def test_cli_resume_finishes_a_stopped_run(fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = ClassifierTrainConfig(data=f"fashion-mnist@{fake_fmnist}", arch="convnet", widths=(4, 8), max_steps=6,
                                out=str(tmp_path))  # fmt: skip
    part = ClassifierTrainer(cfg, command="cycle-encoding train-classifier --max-steps 6", progress=None)
    part.run(until=4)
    part.close()
    assert not (part.run_dir / "classifier.safetensors").exists()
    assert main(["train-classifier", "--resume", str(part.run_dir), "--max-steps", "9"]) == 2
    assert "--max-steps cannot change when resuming" in capsys.readouterr().err
    assert main(["train-classifier", "--resume", str(tmp_path / "none")]) == 2
    assert "no such run folder" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="the checkpoint's classifier does not match"):
        ClassifierTrainer(replace(cfg, widths=(4, 16)), resume=part.run_dir, progress=None)
    assert main(["train-classifier", "--resume", str(part.run_dir), "--log-every", "1"]) == 0
    assert "resumed at step 4" in capsys.readouterr().out
    assert sorted(train_records(part.run_dir)) == [4, 5, 6]
    pv = read_native_header(part.run_dir / "classifier.safetensors")["provenance"]
    assert pv["steps"] == 6 and pv["command"] == "cycle-encoding train-classifier --max-steps 6"


def test_cli_progress_bar_or_lines(fake_fmnist: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--progress: a bar with its total (redrawn) where asked, no redraws in a log; the record lines either way."""
    args = ["train-classifier", "--data", f"fashion-mnist@{fake_fmnist}", "--arch", "convnet", "--widths", "4,8",
            "--max-steps", "3", "--log-every", "1"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "bar"), "--progress", "bar"]) == 0
    out = capsys.readouterr()
    assert "\r" in out.err and "3/3" in out.err
    assert main([*args, "--out", str(tmp_path / "lines"), "--progress", "lines"]) == 0
    out = capsys.readouterr()
    assert "\r" not in out.err and "wrote " in out.out
