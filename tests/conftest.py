"""Shared fixtures and helpers. Tests are small and CPU-only; networks are tiny unless a test says otherwise.

- ``make_tiny_generator`` / ``tiny_generator``: a small StyleGAN2 with every parameter mattering;
- ``tiny_encoder(G)``: a small e4e encoder for it; ``own_images(G, n, seed)``: images G itself makes;
- ``StandInFeatures`` / ``stand_in_perceptual()``: a fixed random conv net standing in for LPIPS's backbone;
- ``StandInFaceEmbedder`` / ``stand_in_dlib``: the dlib face embedder's interface, put where
  the losses call ``load_dlib_face_embedder``, so that ``dlib-face`` builds without the weights;
- ``one_thread``: tiny networks run fastest (and steadiest on a shared machine) on one thread; a module asks for it
  with ``pytestmark = pytest.mark.usefixtures("one_thread")``.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from torch import nn

from cycle_encoding.losses.perceptual import FeatureMapDistance
from cycle_encoding.networks.encoder import Encoder4Editing, EncoderConfig
from cycle_encoding.networks.stylegan2 import Generator, GeneratorConfig

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
# invert's speed plan sees one core unless the environment says otherwise: an in-process `invert` starts no worker
# processes (fresh interpreters, which could not build the stand-in networks the tests register in this one)
os.environ.setdefault("OMP_NUM_THREADS", "1")


def tiny_generator_config(resolution: int = 16, img_channels: int = 3, **kw) -> GeneratorConfig:
    """A small StyleGAN2 for tests: 32-d styles, 2 mapping layers, at most 32 channels."""
    args = dict(
        resolution=resolution,
        style_dim=32,
        n_mlp=2,
        channel_base=32 * 16,
        channel_max=32,
        img_channels=img_channels,
    )
    args.update(kw)
    return GeneratorConfig(**args)


def make_tiny_generator(seed: int = 0, **kw) -> Generator:
    torch.manual_seed(seed)
    G = Generator(tiny_generator_config(**kw))
    # random non-zero noise strengths and biases so every parameter matters in comparisons
    with torch.no_grad():
        for name, p in G.named_parameters():
            if name.endswith("noise.weight") or name.endswith("activate.bias") or name.endswith("to_rgb1.bias"):
                p.normal_(0, 0.1)
    G.compute_w_avg(2000)
    return G.eval()


@pytest.fixture
def tiny_generator() -> Generator:
    return make_tiny_generator()


def tiny_encoder(G: Generator, seed: int = 0, widths: tuple[int, ...] = (8, 16, 16, 32)) -> Encoder4Editing:
    """A small e4e encoder for ``G`` (16x16 input, one unit per stage), offset by G's average code, eval mode."""
    torch.manual_seed(seed)
    E = Encoder4Editing(EncoderConfig(num_ws=G.num_ws, w_dim=G.w_dim, input_size=16, widths=widths, units=(1, 1, 1, 1)))
    E.set_w_avg(G.w_avg)
    return E.eval()


def own_images(G: Generator, n: int, seed: int) -> torch.Tensor:
    """``n`` images G makes (truncation 0.8), so that an inversion into G can succeed."""
    with torch.no_grad():
        z = torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed))
        return G(z, truncation=0.8).clamp(-1, 1)


class StandInFeatures(nn.Module):
    """A small fixed random conv net with ``features(x)``: a stand-in for LPIPS's backbone in tests."""

    name = "stand-in features"

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.c1 = nn.Conv2d(channels, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        with torch.no_grad():
            for m in (self.c1, self.c2):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * 0.3)
                m.bias.zero_()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]


def stand_in_perceptual() -> FeatureMapDistance:
    return FeatureMapDistance(StandInFeatures(), name="stand-in perceptual")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for the module's tests (restored after)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StandInFaceEmbedder(nn.Module):
    """Same interface as networks.dlib_resnet's embedder: name, embed(x) -> [B, 128], features(x) -> maps."""

    name = "dlib-resnet-face"

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = nn.Linear(16, 128, bias=False)

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        a = torch.relu(self.c1(x))
        return [a, torch.relu(self.c2(a))]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x)[-1].mean((2, 3)))


@pytest.fixture
def stand_in_dlib(monkeypatch):
    """The losses' ``load_dlib_face_embedder`` (``checkpoints.face_api``'s) replaced by one giving a StandInFaceEmbedder."""
    from cycle_encoding.losses import perceptual

    load = lambda device="cpu": StandInFaceEmbedder().to(device)  # noqa: E731
    monkeypatch.setattr(perceptual, "load_dlib_face_embedder", load)
    return load


@pytest.fixture(autouse=True, scope="session")
def _no_network_files_of_this_machine(tmp_path_factory):
    """Tests never see the weight files this machine happens to hold: an empty torch hub cache (TORCH_HOME) and the
    shipped network-files config (no $CYCLE_ENCODING_NETWORKS), so "not found" paths behave the same everywhere."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TORCH_HOME", str(tmp_path_factory.mktemp("torch_home")))
    mp.delenv("CYCLE_ENCODING_NETWORKS", raising=False)
    yield
    mp.undo()


def write_inversion_files(root: Path) -> Path:
    """A run's inputs under ``root``: ``g.safetensors`` (a 16-px tiny generator), ``e.safetensors`` (a tiny encoder
    whose record names its 8 training images in ``train/``) and 4 of the generator's own images in ``targets/``."""
    import cycle_encoding as ce
    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.utils import save_image

    G = make_tiny_generator(resolution=16)
    ce.save_generator(G, root / "g.safetensors")
    for i, im in enumerate(own_images(G, 8, seed=1)):
        save_image(im, root / "train" / f"t{i}.png")
    E = tiny_encoder(G)
    ce.save_encoder(E, root / "e.safetensors", provenance=default_provenance(data=str(root / "train")), trained_stage=0)
    for i, im in enumerate(own_images(G, 4, seed=9)):
        save_image(im, root / "targets" / f"img{i}.png")
    return root
