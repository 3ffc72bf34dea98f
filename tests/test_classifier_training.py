"""The classifier trainer on a small synthetic Fashion-MNIST-layout folder (idx files written here): augmentation
geometry, features(), a few steps lower the loss, the export loads back bit-exactly, the card's hash, the CLI."""

from __future__ import annotations

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.assets import card_sha256
from cycle_encoding.checkpoints.classifier import load_classifier, save_classifier
from cycle_encoding.checkpoints.native import file_sha256, read_native_header
from cycle_encoding.cli import main
from cycle_encoding.data.fashion_mnist import CLASSES, pad_to_32, to_unit_range
from cycle_encoding.networks.classifier import AttributeClassifier, ClassifierConfig
from cycle_encoding.training.classifier_trainer import ClassifierTrainConfig, augment, train_classifier


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
