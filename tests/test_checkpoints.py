"""Generator checkpoint readers: rosinality, NVIDIA pickles, e4e, the own format; bad files."""

from __future__ import annotations

import argparse
import io
import os
import pickle
import re
import sys

import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.checkpoints import read_native_header, sniff
from cycle_encoding.errors import CheckpointError, UnsafePickleError
from cycle_encoding.networks.stylegan2 import Generator, GeneratorConfig
from tests.conftest import make_tiny_generator
from tests.layouts import StandInModules, nvidia_from_rosinality, rosinality_channels, rosinality_g_ema


def render(G: Generator, seed: int = 0, n: int = 2) -> torch.Tensor:
    z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return G.synthesis(G.mapping(z, truncation=0.8), noise_mode="const")


# --- rosinality ---------------------------------------------------------------------------------------


def test_rosinality_layout_from_spec_loads_strict_and_renders(tmp_path):
    sd = rosinality_g_ema(64, n_mlp=4, cm=1)
    latent_avg = torch.randn(512)
    torch.save({"g_ema": sd, "latent_avg": latent_avg}, tmp_path / "g.pt")
    G = ce.load_generator(tmp_path / "g.pt")
    c = G.config
    assert (c.resolution, c.n_mlp, c.style_dim, c.channel_multiplier) == (64, 4, 512, 1.0)
    # the same dict loads strict into a model built from rosinality's constructor arguments
    G2 = Generator(GeneratorConfig.rosinality(64, n_mlp=4, channel_multiplier=1))
    G2.load_state_dict(sd, strict=True)
    assert torch.equal(G.w_avg, latent_avg)
    img = render(G)
    assert img.shape == (2, 3, 64, 64) and torch.isfinite(img).all()
    assert G.provenance["source_format"] == "rosinality"


def test_rosinality_channel_multiplier_2_inferred(tmp_path):
    sd = rosinality_g_ema(128, n_mlp=2, cm=2)
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(512)}, tmp_path / "g.pt")
    G = ce.load_generator(tmp_path / "g.pt")
    assert G.config.channel_multiplier == 2.0 and G.config.channels()[128] == 256


def test_rosinality_training_checkpoint_computes_w_avg(tmp_path):
    G0 = make_tiny_generator()
    ckpt = {
        "g": G0.state_dict(),
        "d": {},
        "g_ema": G0.state_dict(),
        "g_optim": {},
        "d_optim": {},
        "args": argparse.Namespace(size=16, n_mlp=2),
        "ada_aug_p": 0.0,
    }
    torch.save(ckpt, tmp_path / "train.pt")
    G = ce.load_generator(tmp_path / "train.pt")
    assert G.provenance["source_format"] == "rosinality-training"
    z = torch.randn(10_000, G.z_dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = G0.style(z).double().mean(0).float()
    torch.testing.assert_close(G.w_avg, ref, atol=1e-5, rtol=1e-5)


def test_wrong_shape_names_key(tmp_path):
    sd = rosinality_g_ema(32, n_mlp=2, cm=1)
    sd["convs.3.conv.weight"] = torch.randn(1, 512, 256, 3, 3)
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(512)}, tmp_path / "bad.pt")
    with pytest.raises(
        CheckpointError, match=r"convs\.3\.conv\.weight has shape \[1, 512, 256, 3, 3\], expected \[1, 512, 512, 3, 3\]"
    ):
        ce.load_generator(tmp_path / "bad.pt")


def test_missing_key_is_named(tmp_path):
    sd = rosinality_g_ema(16, n_mlp=2, cm=1)
    del sd["convs.1.noise.weight"]
    torch.save({"g_ema": sd, "latent_avg": torch.zeros(512)}, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"missing key convs\.1\.noise\.weight"):
        ce.load_generator(tmp_path / "bad.pt")


# --- NVIDIA pickles ------------------------------------------------------------------------------------


def write_nvidia_pickle(G: Generator, path, **kw) -> None:
    with StandInModules() as s:
        g_ema = nvidia_from_rosinality(G, s, **kw)
        data = {
            "G": g_ema,
            "D": s.persistent("training.networks.Discriminator", params={"b4.out.weight": torch.zeros(1, 4)}),
            "G_ema": g_ema,
            "augment_pipe": None,
            "training_set_kwargs": s.EasyDict(path="ffhq.zip", resolution=G.resolution),
        }
        with open(path, "wb") as f:
            pickle.dump(data, f, protocol=4)
    assert "torch_utils" not in sys.modules and "dnnlib" not in sys.modules


@pytest.mark.parametrize("img_channels", [3, 1])
def test_nvidia_pickle_renders_like_rosinality(tmp_path, img_channels):
    G0 = make_tiny_generator(resolution=32, img_channels=img_channels)
    write_nvidia_pickle(G0, tmp_path / "net.pkl")
    ce.export_rosinality(G0, tmp_path / "net.pt")
    with pytest.raises(ImportError):
        __import__("torch_utils")
    G_pkl = ce.load_generator(tmp_path / "net.pkl")
    G_pt = ce.load_generator(tmp_path / "net.pt")
    assert G_pkl.config == G_pt.config
    assert G_pkl.provenance["source_format"] == "nvidia-pkl (G_ema)"
    assert torch.equal(render(G_pkl), render(G_pt))
    assert torch.equal(render(G_pkl), render(G0))


def test_pickle_that_runs_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    with open(tmp_path / "evil.pkl", "wb") as f:
        pickle.dump({"G_ema": Evil()}, f, protocol=4)
    with pytest.raises(UnsafePickleError, match=r"refused: the pickle asks for (posix|os)\.system"):
        ce.load_generator(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_evil_payload_hidden_in_tensor_storage_is_refused(tmp_path):
    """torch's own _load_from_bytes would unpickle storage bytes with weights_only=False."""
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    buf = io.BytesIO()
    torch.save(Evil(), buf, _use_new_zipfile_serialization=True)
    evil_bytes = buf.getvalue()

    class FakeStorage:
        def __reduce__(self):
            return (torch.storage._load_from_bytes, (evil_bytes,))

    with open(tmp_path / "evil2.pkl", "wb") as f:
        pickle.dump({"G_ema": FakeStorage()}, f, protocol=4)
    with pytest.raises(CheckpointError):
        ce.load_generator(tmp_path / "evil2.pkl")
    assert not marker.exists()


def test_tensorflow_pickle_is_recognised(tmp_path):
    # protocol-2 stream that asks for dnnlib.tflib.network.Network, as TF-era StyleGAN pickles do
    payload = b"\x80\x02cdnnlib.tflib.network\nNetwork\nq\x00)\x81q\x01}q\x02b."
    (tmp_path / "tf.pkl").write_bytes(payload)
    with pytest.raises(CheckpointError, match=r"TensorFlow-era StyleGAN pickle"):
        ce.load_generator(tmp_path / "tf.pkl")


def test_conditional_nvidia_generator_is_refused(tmp_path):
    G0 = make_tiny_generator()
    write_nvidia_pickle(G0, tmp_path / "c.pkl", c_dim=10)
    with pytest.raises(CheckpointError, match="conditional"):
        ce.load_generator(tmp_path / "c.pkl")


# --- e4e / pSp -----------------------------------------------------------------------------------------


def test_e4e_checkpoint_decoder_is_a_generator(tmp_path):
    G0 = make_tiny_generator()
    sd = {f"decoder.{k}": v for k, v in G0.state_dict().items()}
    sd["encoder.input_layer.0.weight"] = torch.randn(64, 3, 3, 3)
    ckpt = {"state_dict": sd, "opts": {"encoder_type": "Encoder4Editing"}, "latent_avg": G0.w_avg.repeat(6, 1)}
    torch.save(ckpt, tmp_path / "e4e.pt")
    G = ce.load_generator(tmp_path / "e4e.pt")
    assert G.provenance["source_format"] == "e4e"
    torch.testing.assert_close(G.w_avg, G0.w_avg)
    assert torch.equal(render(G), render(G0))
    torch.save({"state_dict": {"encoder.x": torch.zeros(1)}, "opts": {}}, tmp_path / "enc_only.pt")
    with pytest.raises(CheckpointError, match="holds no generator"):
        ce.load_generator(tmp_path / "enc_only.pt")


# --- own format and export ---------------------------------------------------------------------------


def test_own_format_round_trip_bit_exact(tmp_path):
    G0 = make_tiny_generator(resolution=32, img_channels=1)
    ce.save_generator(G0, tmp_path / "g.safetensors", provenance={"note": "test"})
    assert sniff(tmp_path / "g.safetensors") == "safetensors"
    header = read_native_header(tmp_path / "g.safetensors")
    assert header["kind"] == "generator" and header["config"]["img_channels"] == 1
    G = ce.load_generator(tmp_path / "g.safetensors")
    assert G.config == G0.config
    assert torch.equal(G.w_avg, G0.w_avg)
    assert torch.equal(render(G), render(G0))
    assert G.provenance["note"] == "test"


def test_export_rosinality_round_trip_bit_exact(tmp_path):
    G0 = make_tiny_generator()
    ce.export_rosinality(G0, tmp_path / "g.pt")
    obj = torch.load(tmp_path / "g.pt", weights_only=True)
    assert set(obj) == {"g_ema", "latent_avg", "cycle_encoding"}  # rosinality's loaders read g_ema (+ latent_avg)
    assert obj["cycle_encoding"]["architecture"] == G0.config.to_dict()
    G = ce.load_generator(tmp_path / "g.pt")
    assert torch.equal(render(G), render(G0))


def test_convert_between_formats_bit_exact(tmp_path):
    G0 = make_tiny_generator()
    ce.export_rosinality(G0, tmp_path / "a.pt")
    ce.convert_generator(tmp_path / "a.pt", tmp_path / "b.safetensors")
    ce.convert_generator(tmp_path / "b.safetensors", tmp_path / "c.pt", to="rosinality")
    prov = read_native_header(tmp_path / "b.safetensors")["provenance"]
    assert prov["source_format"] == "rosinality" and len(prov["source_sha256"]) == 64
    assert torch.equal(render(ce.load_generator(tmp_path / "c.pt")), render(G0))


# --- bad files -------------------------------------------------------------------------------------------


def test_bad_files_give_one_clear_line(tmp_path):
    (tmp_path / "text.pt").write_text("hello, I am not a checkpoint\n")
    (tmp_path / "empty.pt").write_bytes(b"")
    G0 = make_tiny_generator()
    ce.export_rosinality(G0, tmp_path / "full.pt")
    data = (tmp_path / "full.pt").read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    ce.save_generator(G0, tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    torch.save({"model": {"fc.weight": torch.zeros(2, 2)}}, tmp_path / "other.pt")
    cases = {
        "text.pt": "not a checkpoint",
        "empty.pt": "empty file",
        "trunc.pt": "truncated",
        "trunc.safetensors": "truncated",
        "other.pt": "unknown layout",
        "missing.pt": "no such file",
    }
    for name, expected in cases.items():
        with pytest.raises(CheckpointError) as info:
            ce.load_generator(tmp_path / name)
        msg = str(info.value)
        assert expected in msg, (name, msg)
        assert "\n" not in msg and name in msg


def test_safetensors_whose_header_length_looks_like_a_pickle(tmp_path):
    """A header of 640 bytes makes the file start with 80 02, a pickle's first bytes: still safetensors."""
    import json
    import struct

    from safetensors.torch import load_file

    header = json.dumps({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}).encode()
    header = header + b" " * (640 - len(header))
    (tmp_path / "x.safetensors").write_bytes(struct.pack("<Q", 640) + header + struct.pack("<2f", 1.0, 2.0))
    assert (tmp_path / "x.safetensors").read_bytes()[:2] == b"\x80\x02"
    assert sniff(tmp_path / "x.safetensors") == "safetensors"
    assert load_file(str(tmp_path / "x.safetensors"))["t"].tolist() == [1.0, 2.0]


def _shapes(sd: dict) -> dict:
    return {k: tuple(v.shape) for k, v in sd.items()}


@pytest.mark.parametrize(
    "config",
    [
        GeneratorConfig.rosinality(16, 64, 2, channel_multiplier=2),
        GeneratorConfig.rosinality(64, 64, 2, channel_multiplier=1),
        GeneratorConfig.rosinality(64, 64, 2, channel_multiplier=2),
        GeneratorConfig.rosinality(64, 64, 2, channel_multiplier=4),  # ours caps at 512, rosinality's does not
        GeneratorConfig.rosinality(16, 64, 2, img_channels=1),
        GeneratorConfig(resolution=32, style_dim=128, n_mlp=4, channel_base=2048, channel_max=128, img_channels=1),
        GeneratorConfig(resolution=16, style_dim=32, n_mlp=2, channel_base=512, channel_max=32),
    ],
    ids=["16-cm2", "64-cm1", "64-cm2", "64-cm4-capped", "16-grey", "fmnist-widths", "tiny"],
)
def test_rosinality_fit_says_whether_rosinalitys_class_builds_it_and_what_to_patch(config):
    """rosinality_fit against the layout rosinality's Generator(size, style_dim, n_mlp, channel_multiplier) builds
    (tests/layouts.py, written from the format's description): it 'loads' exactly when every key has the shape the
    export holds; otherwise the widths and image channels it names, patched into that layout, give the export's
    shapes key for key (the six-line patch a user makes)."""
    from cycle_encoding.checkpoints.rosinality import rosinality_fit, rosinality_note

    with torch.device("meta"):
        ours = _shapes(Generator(config).state_dict())
    fit = rosinality_fit(config)
    cm = int(re.search(r"channel_multiplier=(\d+)", fit["call"]).group(1))
    theirs = _shapes(rosinality_g_ema(config.resolution, config.n_mlp, cm, config.style_dim))
    assert fit["loads"] == (ours == theirs)
    assert (rosinality_note(config) is None) == fit["loads"]
    if not fit["loads"]:
        patched = rosinality_g_ema(config.resolution, config.n_mlp, cm, config.style_dim,
                                   channels=fit["channels"], img_channels=fit["img_channels"])  # fmt: skip
        assert _shapes(patched) == ours
        assert "cycle-encoding" in fit["loaders"]
        assert ("Generator.channels" in fit["patch"]) == (fit["channels"] != rosinality_channels(config.resolution, cm))
        assert ("ToRGB" in fit["patch"]) == (config.img_channels != 3)


def test_convert_to_rosinality_says_when_rosinalitys_class_cannot_build_it(tmp_path, capsys):
    """The shipped Fashion-MNIST generator (1 channel, narrow widths): the note on the console and in the file."""
    from cycle_encoding.cli import main

    assert main(["convert", "fmnist-generator", str(tmp_path / "g.pt")]) == 0
    err = capsys.readouterr().err
    assert "note: rosinality's Generator(32, 128, 4, channel_multiplier=2) cannot build this generator" in err
    assert "1-channel images" in err and "Generator.channels to {4: 128" in err
    fit = torch.load(tmp_path / "g.pt", weights_only=True)["cycle_encoding"]["rosinality"]
    assert fit["loads"] is False and fit["img_channels"] == 1
    G = make_tiny_generator(**GeneratorConfig.rosinality(16, 32, 2).to_dict())  # rosinality's widths: no note
    ce.save_generator(G, tmp_path / "r.safetensors")
    assert main(["convert", str(tmp_path / "r.safetensors"), str(tmp_path / "r.pt")]) == 0
    assert "note:" not in capsys.readouterr().err
