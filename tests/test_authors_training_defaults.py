"""Encoder training as the authors ran it: PyTorch 1.6's zero_grad (a switched-off head keeps moving under Ranger's
momentum), random generator noise, the identity network of the domain, and the switch for their latent
discriminator's raw-offset input; each recorded in the run's config."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

from cycle_encoding.losses.identity import identity_default
from cycle_encoding.optim import Ranger, zero_grad
from cycle_encoding.training.encoder_trainer import EncoderTrainer
from tests.test_encoder_training import config, setup  # noqa: F401 (the fixture)


def two_heads_after(mode: str) -> tuple[nn.Linear, nn.Linear, dict, torch.Tensor]:
    """Two heads trained one step together, then head b is switched off (not in the loss) for 3 steps."""
    torch.manual_seed(0)
    a, b = nn.Linear(4, 3), nn.Linear(4, 3)
    opt = Ranger([*a.parameters(), *b.parameters()], lr=1e-2)
    x = torch.randn(8, 4)
    zero_grad(opt, mode)
    (a(x).square().mean() + b(x).square().mean()).backward()
    opt.step()
    w_b = b.weight.detach().clone()
    m_b = opt.state[b.weight]["exp_avg"].clone()
    for _ in range(3):
        zero_grad(opt, mode)
        a(x).square().mean().backward()
        opt.step()
    return a, b, {"w": w_b, "m": m_b, "state": opt.state[b.weight]}, x


def test_zero_grad_as_pytorch_16_keeps_switched_off_heads_moving():
    _, b, before, _ = two_heads_after("zero")
    st = before["state"]
    assert st["step"] == 4 and torch.equal(b.weight.grad, torch.zeros_like(b.weight))
    # the moments decay as with a zero gradient: m = b1^3 m (the centralized zero gradient adds nothing)
    torch.testing.assert_close(st["exp_avg"], before["m"] * 0.95**3)
    assert not torch.equal(b.weight.detach(), before["w"])  # still moving under momentum
    _, b2, before2, _ = two_heads_after("none")
    assert before2["state"]["step"] == 1 and b2.weight.grad is None
    assert torch.equal(b2.weight.detach(), before2["w"])  # frozen
    with pytest.raises(ValueError, match="zero_grad mode"):
        zero_grad(Ranger(b.parameters()), "off")


def test_zero_grad_gives_zero_gradients_to_parameters_with_state_after_a_restore():
    """After a resume no gradient tensors exist; a parameter with optimizer state gets a zero one, as it would have
    had in the uninterrupted PyTorch 1.6 run; one never stepped stays without."""
    lin, other = nn.Linear(2, 2), nn.Linear(2, 2)
    opt = Ranger([*lin.parameters(), *other.parameters()])
    lin(torch.randn(3, 2)).sum().backward()
    opt.step()
    fresh = Ranger([*lin.parameters(), *other.parameters()])
    fresh.load_state_dict(opt.state_dict())
    lin.weight.grad = lin.bias.grad = None
    zero_grad(fresh, "zero")
    assert torch.equal(lin.weight.grad, torch.zeros(2, 2)) and other.weight.grad is None


def test_identity_default_is_the_domains_network():
    assert identity_default("fashion-mnist")[0] == "fmnist-features"
    assert identity_default("fashion-mnist:train@/data/fm")[0] == "fmnist-features"
    assert identity_default("faces/", "model_ir_se50.pth")[0] == "arcface"
    name, why = identity_default("my_cars/")
    assert name == "none" and "no identity network is known for the images 'my_cars/'" in why
    assert "--identity arcface" in why


def test_run_config_records_the_authors_choices_and_raw_offset_feeds_d_codes_without_w_avg(setup):  # noqa: F811
    t = EncoderTrainer(config(setup, identity="auto", d_fake_codes="raw-offset", max_steps=1), quiet=True)
    cfg = json.loads((t.run_dir / "config.json").read_text())
    res = cfg["_resolved"]
    assert cfg["noise_mode"] == "random" and cfg["zero_grad"] == "zero" and cfg["d_fake_codes"] == "raw-offset"
    assert res["noise_mode"] == "random" and res["zero_grad"].startswith("PyTorch 1.6")
    assert res["networks"]["identity"] == "none" and "no identity network is known" in res["identity_choice"]
    seen = {}
    real_d_step = t._d_step

    def spy(real, fake):
        seen["fake"] = fake.clone()
        return real_d_step(real, fake)

    t._d_step = spy  # type: ignore[method-assign]
    # the batch the step will take, and the encoder's codes of it computed here (stage 0 at step 0: code w_0)
    pos = t.sampler.state_dict()
    x = t.sampler.next_batch()
    t.sampler.load_state_dict(pos)
    E2 = copy.deepcopy(t.E).train()
    E2.stage = 0
    with torch.no_grad():
        ws = E2(x)
    t.train_step()
    t.close()
    # the pool is empty at the first step, so D sees the codes themselves: raw offsets, the codes minus w_avg
    torch.testing.assert_close(seen["fake"], ws[:, 0] - E2.latent_avg[0])


def test_random_noise_changes_the_reconstruction_and_const_does_not(setup):  # noqa: F811
    t = EncoderTrainer(config(setup, max_steps=1), quiet=True)
    ws = t.G.w_avg.expand(2, t.G.num_ws, -1)
    with torch.no_grad():
        r1, r2 = t.render(ws), t.render(ws)
    assert not torch.equal(r1, r2)
    t.close()
    c = EncoderTrainer(config(setup, max_steps=1, noise_mode="const"), quiet=True)
    with torch.no_grad():
        assert torch.equal(c.render(ws), c.render(ws))
    c.close()


def test_cli_options_reach_the_config(setup, capsys):  # noqa: F811
    from cycle_encoding.cli import main

    rc = main(
        [
            "train-encoder",
            "--generator",
            str(setup / "g.safetensors"),
            "--data",
            str(setup / "data"),
            "--dry-run",
            "--zero-grad",
            "none",
            "--noise",
            "const",
            "--d-fake-codes",
            "raw-offset",
            "--perceptual",
            "none",
        ]
    )  # fmt: skip  (the dry run opens the loss networks: no LPIPS backbone here)
    assert rc == 0
    text = capsys.readouterr().out
    cfg = json.loads(text[: text.index("\n}\n") + 2])
    assert (cfg["zero_grad"], cfg["noise_mode"], cfg["d_fake_codes"], cfg["identity"]) == (
        "none", "const", "raw-offset", "auto",
    )  # fmt: skip
    assert main(["train-encoder", "--generator", str(setup / "g.safetensors"), "--data", str(setup / "data"),
                 "--dry-run", "--zero-grad", "off"]) == 2  # fmt: skip
    assert "zero_grad: 'off' is not one of 'zero', 'none'" in capsys.readouterr().err
