"""The e4e encoder: progressive stages, w_avg offset, e4e/pSp checkpoints, own format, variants."""

from __future__ import annotations

import pytest
import torch

from cycle_encoding.checkpoints.encoder import load_encoder, save_encoder
from cycle_encoding.errors import CheckpointError
from cycle_encoding.networks.encoder import Encoder4Editing, EncoderConfig
from tests.conftest import make_tiny_generator
from tests.layouts import e4e_encoder_sd

SMALL = dict(widths=(16, 32, 48, 64), units=(1, 1, 2, 1))


def small_encoder(num_ws=8, w_dim=32, input_size=32, **kw) -> Encoder4Editing:
    torch.manual_seed(0)
    return Encoder4Editing(EncoderConfig(num_ws=num_ws, w_dim=w_dim, input_size=input_size, **{**SMALL, **kw})).eval()


def test_stage_zero_gives_identical_codes_and_stage_k_changes_layers_1_to_k():
    E = small_encoder(num_ws=10)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        E.stage = 0
        base = E(x)
        assert torch.equal(base, base[:, :1].expand_as(base))
        prev = base
        for k in range(1, E.max_stage + 1):
            E.stage = k
            cur = E(x)
            changed = (cur - base).abs().amax(dim=(0, 2)) > 0
            assert changed.tolist() == [False] + [True] * k + [False] * (E.num_ws - 1 - k)
            # turning stage k on changes exactly layer k relative to stage k-1
            step = (cur - prev).abs().amax(dim=(0, 2)) > 0
            assert step.nonzero().flatten().tolist() == [k]
            prev = cur


def test_codes_are_offset_by_w_avg():
    G = make_tiny_generator()
    E = small_encoder(num_ws=G.num_ws, w_dim=G.w_dim)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = E(x)
        E.set_w_avg(G.w_avg)
        after = E(x)
    torch.testing.assert_close(after - before, G.w_avg.expand_as(after))


def test_w_only_encoder_has_one_head():
    E = small_encoder(max_stage=0)
    assert len(E.styles) == 1 and not hasattr(E, "latlayer1")
    with pytest.raises(ValueError, match=r"stage must be in 0\.\.0"):
        E.stage = 1
    out = E(torch.randn(2, 3, 32, 32))
    assert torch.equal(out, out[:, :1].expand_as(out))


def test_input_is_resized_and_channels_checked():
    E = small_encoder(in_channels=1)
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert E(x).shape == (2, 8, 32)
    with pytest.raises(ValueError, match=r"takes images \[B, 1, H, W\]"):
        E(torch.randn(2, 3, 32, 32))


def test_gradients_reach_active_heads_only():
    E = small_encoder().train()
    E.stage = 2
    E(torch.randn(2, 3, 32, 32)).square().mean().backward()
    for i, head in enumerate(E.styles):
        has = head.linear.weight.grad is not None and bool(head.linear.weight.grad.abs().sum() > 0)
        assert has == (i <= 2), i


def write_e4e(tmp_path, name="e4e.pt", sd=None, opts=None, **kw):
    sd = sd if sd is not None else e4e_encoder_sd(**kw)
    num_ws = kw.get("num_ws", 18)
    w_dim = kw.get("w_dim", 512)
    ckpt = {
        "state_dict": {f"encoder.{k}": v for k, v in sd.items()},
        "opts": opts if opts is not None else {"encoder_type": "Encoder4Editing"},
        "latent_avg": torch.randn(w_dim).repeat(num_ws, 1),
    }
    torch.save(ckpt, tmp_path / name)
    return tmp_path / name, ckpt


def test_e4e_checkpoint_loads_strict_and_matches_a_direct_computation(tmp_path):
    path, ckpt = write_e4e(tmp_path, num_ws=8, w_dim=32, input_size=64, **SMALL)
    E = load_encoder(path)
    c = E.config
    assert (c.num_ws, c.w_dim, c.input_size, c.widths, c.units, c.mode) == (
        8,
        32,
        64,
        (16, 32, 48, 64),
        (1, 1, 2, 1),
        "ir_se",
    )
    assert E.stage == E.max_stage == 7 and E.provenance["source_format"] == "e4e"
    # the same weights loaded strict into a model built directly give the same codes
    E2 = Encoder4Editing(c)
    sd = {k[len("encoder.") :]: v for k, v in ckpt["state_dict"].items()}
    E2.load_state_dict({**sd, "latent_avg": ckpt["latent_avg"]}, strict=True)
    E2.eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(E(x), E2(x))


def test_full_size_e4e_layout_is_inferred(tmp_path):
    """FORMATS.md's IR-SE-50 / N = 18 layout: the architecture is read from the keys (not built: 267 M weights)."""
    from cycle_encoding.checkpoints.encoder import infer_encoder_config

    with torch.device("meta"):  # shapes without allocating or initialising 267 M weights
        full = Encoder4Editing(EncoderConfig(num_ws=18, w_dim=512)).state_dict()
    sd = {k: torch.empty(v.shape, device="meta") for k, v in full.items()}
    c = infer_encoder_config(sd, "e4e_ffhq_encode.pt", {"encoder_type": "Encoder4Editing", "stylegan_size": 1024})
    assert (c.num_ws, c.w_dim, c.input_size, c.widths, c.units, c.mode) == (
        18, 512, 256, (64, 128, 256, 512), (3, 4, 14, 3), "ir_se",
    )  # fmt: skip
    spec = e4e_encoder_sd(num_ws=18, w_dim=8, widths=(4, 8, 12, 16))
    ours = Encoder4Editing(EncoderConfig(num_ws=18, w_dim=8, widths=(4, 8, 12, 16))).state_dict()
    ours.pop("latent_avg")
    assert {k: tuple(v.shape) for k, v in spec.items()} == {k: tuple(v.shape) for k, v in ours.items()}


def test_wrong_e4e_checkpoints_name_the_key(tmp_path):
    sd = e4e_encoder_sd(num_ws=8, w_dim=32, input_size=64, **SMALL)
    bad = dict(sd)
    bad["latlayer1.weight"] = torch.zeros(64, 47, 1, 1)
    path, _ = write_e4e(tmp_path, "bad.pt", sd=bad, num_ws=8, w_dim=32)
    with pytest.raises(
        CheckpointError, match=r"latlayer1\.weight has shape \[64, 47, 1, 1\], expected \[64, 48, 1, 1\]"
    ):
        load_encoder(path)
    bad = dict(sd)
    del bad["styles.5.convs.2.bias"]
    path, _ = write_e4e(tmp_path, "bad2.pt", sd=bad, num_ws=8, w_dim=32)
    with pytest.raises(CheckpointError, match=r"missing key styles\.5\.convs\.2\.bias"):
        load_encoder(path)
    path, _ = write_e4e(tmp_path, "bad3.pt", sd=sd, opts={"encoder_type": "ResNetBackboneEncoder"}, num_ws=8, w_dim=32)
    with pytest.raises(CheckpointError, match="ResNetBackboneEncoder"):
        load_encoder(path)
    torch.save({"g_ema": {}}, tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match="unknown layout"):
        load_encoder(tmp_path / "other.pt")


def test_psp_gradual_style_encoder(tmp_path):
    sd = e4e_encoder_sd(num_ws=8, w_dim=32, input_size=64, **SMALL)
    path, _ = write_e4e(tmp_path, "psp.pt", sd=sd, opts={"encoder_type": "GradualStyleEncoder"}, num_ws=8, w_dim=32)
    E = load_encoder(path)
    assert E.config.style_mode == "independent"
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        codes = E(x) - E.latent_avg
        _c1, c2, c3 = E.features(x)
        p2 = torch.nn.functional.interpolate(c3, size=c2.shape[-2:], mode="bilinear", align_corners=True) + E.latlayer1(
            c2
        )
        torch.testing.assert_close(codes[:, 4], E.styles[4](p2))  # an independent code, not w0 + delta
        torch.testing.assert_close(codes[:, 0], E.styles[0](c3))


def test_own_format_round_trip(tmp_path):
    E = small_encoder()
    E.set_w_avg(torch.randn(32))
    save_encoder(E, tmp_path / "e.safetensors", trained_stage=3)
    E2 = load_encoder(tmp_path / "e.safetensors")
    assert E2.trained_stage == 3 and E2.stage == 3
    x = torch.randn(2, 3, 32, 32)
    E.stage = 3
    with torch.no_grad():
        assert torch.equal(E(x), E2(x))
    E2.stage = "all"
    assert E2.stage == E2.max_stage
