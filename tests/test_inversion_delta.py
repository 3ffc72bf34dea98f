"""A tuned generator stored as its change from the base: rebuilt bit-exactly from a base read back from its file,
smaller than a full copy, a wrong base refused by name, corruption detected, ``info`` describes the file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.checkpoints.delta import decode_change, encode_change, weights_sha256
from cycle_encoding.cli import main
from cycle_encoding.errors import CheckpointError
from cycle_encoding.inversion import TuneConfig, load_generator_delta, pivotal_tune, save_generator_delta
from cycle_encoding.inversion.common import LossNetworks, render
from tests.conftest import make_tiny_generator, own_images, stand_in_perceptual

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tuned(tmp_path_factory):
    root = tmp_path_factory.mktemp("delta")
    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "base.safetensors")
    x = own_images(G, 1, seed=3)
    with torch.no_grad():
        pivot = G.mapping(torch.randn(1, G.z_dim, generator=torch.Generator().manual_seed(4)), truncation=0.7)
    r = pivotal_tune(G, pivot, x, LossNetworks(stand_in_perceptual()), TuneConfig(steps=25, lr=3e-3), seed=0)
    return root, G, r.generator, pivot


def test_xor_encoding_is_exact_where_a_float_difference_is_not():
    a = torch.tensor([1.0, -2.5, 3e-39, 0.0, 1.0], dtype=torch.float32)  # a denormal and a zero among them
    b = torch.tensor([1e-8, 2.5, -7.0, -0.0, float("nan")], dtype=torch.float32)
    # the float difference loses the small value: 1e-8 - 1 rounds to -1 in float32
    assert not torch.equal((a + (b - a))[:1], b[:1])
    back = decode_change(a, encode_change(a, b))
    assert np.array_equal(back.view(torch.int32).numpy(), b.view(torch.int32).numpy())  # bits, NaN and -0.0 too
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float16, torch.float64):
        u = torch.randn(3, 5, 7, generator=g).to(dtype)
        v = u + 1e-3 * torch.randn(u.shape, generator=g).to(dtype)
        w = decode_change(u, encode_change(u, v))
        assert w.dtype == dtype and w.shape == v.shape and torch.equal(w, v)


def test_rebuilt_generator_renders_bit_exactly(tuned, tmp_path):
    root, G, Gt, pivot = tuned
    info = save_generator_delta(G, Gt, tmp_path / "d.safetensors", base_file="base.safetensors")
    base = ce.load_generator(root / "base.safetensors")  # the base read back from its file
    G2 = load_generator_delta(info.path, base)
    assert torch.equal(render(G2, pivot), render(Gt, pivot))
    assert weights_sha256(G2) == weights_sha256(Gt) == info.tuned_sha256
    G3 = load_generator_delta(info.path, root / "base.safetensors")  # a base given by file name works too
    assert torch.equal(render(G3, pivot), render(Gt, pivot))
    # compact: only what tuning changed is stored, and it is smaller than a full copy
    header = ce.checkpoints.read_native_header(info.path)["extra"]
    assert all(k.startswith("style.") or k.startswith("noises.") or k.endswith("kernel") or k == "latent_avg"
               for k in header["unchanged"])  # fmt: skip
    assert any(k.startswith("style.") for k in header["unchanged"])  # the mapping network is never tuned
    assert info.changed == len(header["tensors"]) > 0
    assert info.file_bytes < info.full_copy_bytes
    full = tmp_path / "full.safetensors"
    ce.save_generator(Gt, full)
    assert info.file_bytes < full.stat().st_size


def test_wrong_base_is_refused_by_name(tuned, tmp_path):
    _, G, Gt, _ = tuned
    info = save_generator_delta(G, Gt, tmp_path / "d.safetensors", base_file="ffhq-base.safetensors")
    other = make_tiny_generator(resolution=16, seed=1)
    with pytest.raises(CheckpointError, match=r"made from ffhq-base\.safetensors.*other weights"):
        load_generator_delta(info.path, other)
    bigger = make_tiny_generator(resolution=32)
    with pytest.raises(CheckpointError, match="architecture differs"):
        load_generator_delta(info.path, bigger)


def test_corrupt_delta_is_detected(tuned, tmp_path):
    _, G, Gt, _ = tuned
    info = save_generator_delta(G, Gt, tmp_path / "d.safetensors")
    data = bytearray(info.path.read_bytes())
    data[-40] ^= 0xFF  # inside the last compressed stream
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_generator_delta(bad, G)


def test_info_describes_a_delta(tuned, tmp_path, capsys):
    _, G, Gt, _ = tuned
    info = save_generator_delta(G, Gt, tmp_path / "d.safetensors", base_file="base.safetensors")
    assert main(["info", str(info.path), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["encoding"].startswith("xor") and out["base"]["file"] == "base.safetensors"
    assert out["changed_tensors"] == info.changed and "vs" in out["size_vs_full_copy"]
