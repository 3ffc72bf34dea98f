"""Inversion options that follow the authors' and PTI's runs: the projector's own perceptual network and PTI's 600
w samples, the identity network chosen for the domain, and which optimizer state the refinement used."""

from __future__ import annotations

import pytest
import torch

from cycle_encoding.data.datasets import TensorDataset
from cycle_encoding.inversion import Inverter, ProjectConfig
from cycle_encoding.networks.encoder import Encoder4Editing, EncoderConfig
from tests.conftest import make_tiny_generator


@pytest.fixture(scope="module")
def G1():
    return make_tiny_generator(resolution=32, img_channels=1)


def test_projector_defaults_to_ptis_samples_and_takes_its_own_perceptual_network(G1):
    assert ProjectConfig().w_avg_samples == 600
    inv = Inverter(G1, None, stages=("project",), perceptual="none", identity="none",
                   project={"perceptual": "fmnist-features", "steps": 2})  # fmt: skip
    assert inv.nets.perceptual is None  # the run's network: none
    assert "fmnist-features" in inv.project_nets.perceptual.name
    assert "fmnist-features" in inv.describe()["project"]["perceptual"]
    res = inv.invert(torch.zeros(1, 32, 32))
    assert res.pivots["project"].shape == (1, G1.num_ws, G1.w_dim)


def test_identity_auto_follows_the_refinements_training_images(G1):
    torch.manual_seed(0)
    E = Encoder4Editing(EncoderConfig(num_ws=G1.num_ws, w_dim=G1.w_dim, input_size=32, in_channels=1,
                                      widths=(8, 16, 16, 32), units=(1, 1, 1, 1)))  # fmt: skip
    E.set_w_avg(G1.w_avg)
    imgs = TensorDataset(torch.zeros(8, 1, 32, 32), name="zeros")
    inv = Inverter(G1, E, stages=("refine",), perceptual="none", train_data="fashion-mnist", train_images=imgs,
                   refine={"optimizer_state": "fresh", "steps": 1})  # fmt: skip
    d = inv.describe()
    assert "fmnist-features" in d["networks"]["identity"] and d["identity_choice"].startswith("auto: fmnist-features")
    assert d["refine"]["optimizer_state"] == "fresh" and d["refine"]["noise"] == "random"
    other = Inverter(G1, E, stages=("refine",), perceptual="none", train_data="my_shoes/", train_images=imgs,
                     refine={"optimizer_state": "fresh", "steps": 1})  # fmt: skip
    assert other.describe()["networks"]["identity"] == "none"
    assert "no identity network is known for the images 'my_shoes/'" in other.identity_note
