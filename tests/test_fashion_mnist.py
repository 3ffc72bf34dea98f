"""Fashion-MNIST reader: the Debian package's files (counts, class balance, exact padding) and idx files written here."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_encoding.data import fashion_mnist as fm
from cycle_encoding.data.datasets import DATASETS, EpochSampler, open_dataset
from cycle_encoding.errors import CycleEncodingError

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "train-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)


def write_idx(path: Path, array: np.ndarray, type_code: int = 0x08) -> None:
    """An idx file in the published layout: bytes 0, 0, type code, number of dimensions; big-endian uint32 sizes;
    the values big-endian, row-major. Gzipped when the name ends with .gz."""
    header = bytes([0, 0, type_code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    body = array.astype(array.dtype.newbyteorder(">")).tobytes()
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "wb") as f:
        f.write(header + body)


def raw_idx_values(path: Path, header: int) -> np.ndarray:
    """The uint8 values after an idx header of ``header`` bytes, read by offset only (no header parsing)."""
    return np.frombuffer(gzip.decompress(path.read_bytes())[header:], dtype=np.uint8)


@pytest.fixture
def tiny_idx(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(5)
    images = rng.integers(0, 256, (7, 28, 28), dtype=np.uint8)
    images[0] = 0
    images[1] = 255
    labels = np.array([9, 0, 3, 3, 1, 8, 5], dtype=np.uint8)
    write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    write_idx(tmp_path / "train-images-idx3-ubyte", images[:5])  # not gzipped: also accepted
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels[:5])
    return tmp_path, images, labels


def reference_pixels(a: np.ndarray) -> np.ndarray:
    """The documented mapping computed independently in numpy float32: v / 127.5 - 1."""
    return a.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# -- the Debian package's files -------------------------------------------------------------------------------
@needs_debian
def test_debian_counts_labels_and_class_balance():
    train = open_dataset("fashion-mnist:train", 32, 1)
    test = open_dataset("fashion-mnist:test", 32, 1)
    assert len(train) == 60_000 and len(test) == 10_000
    assert train.class_counts() == [6000] * 10 and test.class_counts() == [1000] * 10
    assert train.labels.dtype == torch.int64 and len(train.classes) == 10
    assert train.classes[9] == "Ankle boot" and train.classes[0] == "T-shirt/top"
    # labels and pixels equal the files' bytes read by offset (8-byte label header, 16-byte image header)
    assert np.array_equal(train.labels.numpy(), raw_idx_values(DEBIAN / "train-labels-idx1-ubyte.gz", 8))
    raw = raw_idx_values(DEBIAN / "t10k-images-idx3-ubyte.gz", 16).reshape(10_000, 28, 28)
    assert np.array_equal(test.images, raw)
    assert test.label_name(0) == fm.CLASSES[int(raw_idx_values(DEBIAN / "t10k-labels-idx1-ubyte.gz", 8)[0])]


@needs_debian
def test_debian_padding_is_exact():
    ds = open_dataset("fashion-mnist:train", 32, 1)
    for i in (0, 1, 12_345, 59_999):
        x = ds.load(i)
        assert x.shape == (1, 32, 32) and x.dtype == torch.float32
        border = torch.ones(32, 32, dtype=torch.bool)
        border[2:30, 2:30] = False
        assert torch.all(x[0][border] == -1.0)  # 2 px of background, value exactly -1.0
        assert np.array_equal(x[0, 2:30, 2:30].numpy(), reference_pixels(ds.images[i]))
    native = open_dataset("fashion-mnist:train", 28, 3)
    y = native.load(3)
    assert y.shape == (3, 28, 28)
    assert np.array_equal(y[1].numpy(), reference_pixels(ds.images[3]))
    assert torch.equal(y[0], y[2])


# -- idx files written here ----------------------------------------------------------------------------------
def test_idx_written_here_reads_back(tiny_idx):
    root, images, labels = tiny_idx
    ds = open_dataset(f"fashion-mnist:test@{root}", 32, 1)
    assert len(ds) == 7 and ds.name == "fashion-mnist:test"
    assert ds.labels.tolist() == labels.tolist()
    assert ds.label_name(0) == "Ankle boot"
    assert ds.class_counts() == [1, 1, 0, 2, 0, 1, 0, 0, 1, 1]
    for i in range(7):
        x = ds.load(i)
        assert torch.all(x[0, :2] == -1) and torch.all(x[0, -2:] == -1)
        assert torch.all(x[0, :, :2] == -1) and torch.all(x[0, :, -2:] == -1)
        assert np.array_equal(x[0, 2:30, 2:30].numpy(), reference_pixels(images[i]))
    assert torch.all(ds.load(0) == -1.0)  # pixel 0 and the padding are the same value
    assert torch.all(ds.load(1)[0, 2:30, 2:30] == 1.0)  # 255 -> exactly 1.0
    # the plain (not gzipped) train files, and the library's own entry point with an explicit folder
    tr = fm.FashionMNIST("train", 16, 3, root=root)
    assert len(tr) == 5 and tr.load(2).shape == (3, 16, 16)
    # another size: the padded 32x32 image, resized (antialiased): background stays -1 in the corners
    assert torch.allclose(tr.load(0), torch.full((3, 16, 16), -1.0))


def test_general_idx_types_read_back(tmp_path):
    a = np.arange(-12, 12, dtype=np.int32).reshape(2, 3, 4) * 1000
    write_idx(tmp_path / "x-idx3.gz", a, 0x0C)
    got = fm.read_idx(tmp_path / "x-idx3.gz")
    assert got.dtype == np.int32 and np.array_equal(got, a)
    f = np.linspace(-1, 1, 10, dtype=np.float32)
    write_idx(tmp_path / "f-idx1", f, 0x0D)
    assert np.array_equal(fm.read_idx(tmp_path / "f-idx1"), f)


def test_bad_files_give_one_clear_line(tiny_idx, tmp_path):
    root, images, labels = tiny_idx
    with pytest.raises(CycleEncodingError, match="apt-get install dataset-fashion-mnist"):
        fm.FashionMNIST("train", 32, 1, root=tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CycleEncodingError, match=r"t10k-images-idx3-ubyte\.gz not found.*apt-get install"):
        open_dataset(f"fashion-mnist:test@{empty}", 32, 1)
    with pytest.raises(CycleEncodingError, match="splits 'train' and 'test'"):
        open_dataset(f"fashion-mnist:valid@{root}", 32, 1)
    # labels where images should be: the magic number is wrong
    bad = tmp_path / "bad"
    bad.mkdir()
    write_idx(bad / "t10k-images-idx3-ubyte.gz", labels)
    write_idx(bad / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(CycleEncodingError, match="magic number 2049, expected 2051"):
        open_dataset(f"fashion-mnist:test@{bad}", 32, 1)
    # fewer labels than images
    write_idx(bad / "t10k-images-idx3-ubyte.gz", images)
    write_idx(bad / "t10k-labels-idx1-ubyte.gz", labels[:4])
    with pytest.raises(CycleEncodingError, match="7 images but 4 labels"):
        open_dataset(f"fashion-mnist:test@{bad}", 32, 1)
    # a file cut short
    data = gzip.decompress((root / "t10k-images-idx3-ubyte.gz").read_bytes())
    (bad / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(data[:-100]))
    write_idx(bad / "t10k-labels-idx1-ubyte.gz", labels)
    with pytest.raises(CycleEncodingError, match=r"header says \[7, 28, 28\].*but the file has 5404 bytes"):
        open_dataset(f"fashion-mnist:test@{bad}", 32, 1)
    with pytest.raises(CycleEncodingError, match="not an idx file"):
        fm.parse_idx(b"\x01\x02\x08\x01", "junk")


def test_registered_and_sampled(tiny_idx):
    root, images, _ = tiny_idx
    assert "fashion-mnist" in DATASETS
    ds = open_dataset(f"fashion-mnist:test@{root}", 32, 1)
    batch = EpochSampler(ds, 7, seed=1).next_batch()
    # one epoch is a permutation of the images: the batch holds each image exactly once
    matched = [
        [i for i in range(7) if np.array_equal(b[0, 2:30, 2:30].numpy(), reference_pixels(images[i]))] for b in batch
    ]
    assert sorted(m[0] for m in matched if len(m) == 1) == list(range(7))
