"""Network weight files found where users keep them (checkpoints/locate.py): the option, the file a run or encoder
recorded, the torch hub cache, the shipped config's folders; the file chosen is printed and recorded; a missing one
is a one-line error naming the file, where it usually lives, the option and an offline network for the domain; and
``invert`` defaults its networks to those the encoder was trained with."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import cycle_encoding as ce
from cycle_encoding.checkpoints.locate import locate_network_file, missing_file_message, torch_hub_checkpoints
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.losses.networks import LossNetworks, recorded_networks
from cycle_encoding.losses.perceptual import build_perceptual
from tests.test_lpips import ALEX_CLASSIFIER, ALEX_CONVS, torchvision_state_dict

ALEX = "alexnet-owt-7be5be79.pth"


@pytest.fixture
def places(tmp_path, monkeypatch):
    """An empty torch hub cache, an empty project cache and an empty working folder."""
    hub_home = tmp_path / "torch_home"
    monkeypatch.setenv("TORCH_HOME", str(hub_home))
    monkeypatch.setenv("CYCLE_ENCODING_CACHE", str(tmp_path / "ce_cache"))
    monkeypatch.delenv("CYCLE_ENCODING_NETWORKS", raising=False)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"hub": hub_home / "hub" / "checkpoints", "cache": tmp_path / "ce_cache", "work": work}


def write_alexnet(path: Path, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(torchvision_state_dict(ALEX_CONVS, ALEX_CLASSIFIER, seed=seed), path)
    return path


def test_torch_hub_cache_follows_torch_home(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    assert torch_hub_checkpoints() == tmp_path / "th" / "hub" / "checkpoints"
    monkeypatch.delenv("TORCH_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert torch_hub_checkpoints() == tmp_path / "xdg" / "torch" / "hub" / "checkpoints"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert torch_hub_checkpoints() == Path.home() / ".cache" / "torch" / "hub" / "checkpoints"


def test_lookup_order_option_recorded_hub_config(places, tmp_path):
    given = write_alexnet(tmp_path / "mine" / "alex.pth")
    recorded = write_alexnet(tmp_path / "rec" / ALEX)
    hub = write_alexnet(places["hub"] / ALEX)
    conf = write_alexnet(places["work"] / "pretrained_models" / ALEX)
    assert locate_network_file("lpips-alex", given, recorded).how == "option"
    assert locate_network_file("lpips-alex", None, recorded).path == recorded
    loc = locate_network_file("lpips-alex", None, tmp_path / "gone" / ALEX)  # a recorded file that is gone
    assert loc.how == "torch hub cache" and loc.path == hub
    hub.unlink()
    loc = locate_network_file("lpips-alex")
    assert loc.how == "config" and loc.path == conf.resolve() and "network_files.json" in loc.describe()
    conf.unlink()
    cached = write_alexnet(places["cache"] / "networks" / ALEX)
    assert locate_network_file("lpips-alex").path == cached.resolve()
    with pytest.raises(CycleEncodingError, match="no such file"):
        locate_network_file("lpips-alex", tmp_path / "typo.pth")  # a file given is never passed over


def test_user_config_replaces_the_shipped_one(places, tmp_path, monkeypatch):
    folder = tmp_path / "weights"
    f = write_alexnet(folder / "my-alexnet.pth")
    cfg = {"lpips-alex": {"file": "my-alexnet.pth", "folders": [str(folder)], "option": "--lpips-backbone"}}
    (tmp_path / "nets.json").write_text(json.dumps(cfg))
    monkeypatch.setenv("CYCLE_ENCODING_NETWORKS", str(tmp_path / "nets.json"))
    assert locate_network_file("lpips-alex").path == f.resolve()


def test_missing_file_error_names_file_place_option_and_a_domain_network(places):
    for domain, offline in (("faces", "dlib-face"), ("fashion-mnist", "fmnist-features")):
        with pytest.raises(CycleEncodingError) as e:
            build_perceptual("lpips-alex", "cpu", domain=domain)
        msg = str(e.value)
        assert "\n" not in msg
        assert ALEX in msg and "hub/checkpoints" in msg and "--lpips-backbone" in msg
        assert f"--perceptual {offline}" in msg
        other = {"dlib-face", "fmnist-features"} - {offline}
        assert not any(f"--perceptual {o}" in msg for o in other)
    msg = missing_file_message("arcface", "faces")
    assert "model_ir_se50.pth" in msg and "pretrained_models" in msg and "--identity-weights" in msg
    assert "--identity dlib-face" in msg


def test_lpips_from_the_hub_cache_is_recorded(places):
    hub = write_alexnet(places["hub"] / ALEX, seed=3)
    dist = build_perceptual("lpips-alex", "cpu")
    assert dist.located.path == hub and dist.located.how == "torch hub cache"
    explicit = build_perceptual("lpips-alex", "cpu", hub)
    x, y = torch.rand(2, 3, 32, 32) * 2 - 1, torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(dist(x, y), explicit(x, y))  # the same network as the file given by hand


def test_recorded_networks_from_provenance():
    prov = {
        "networks": {"perceptual": "lpips-alex (backbone alexnet-owt-7be5be79.pth)", "identity": "none"},
        "network_files": {"perceptual": {"name": "lpips-alex", "file": "/w/alexnet-owt-7be5be79.pth"}},
    }
    rec = recorded_networks(prov)
    assert rec["perceptual"] == {"name": "lpips-alex", "file": "/w/alexnet-owt-7be5be79.pth"}
    assert rec["identity"] == {"name": "none"}
    assert recorded_networks(None) == {}


def test_e4e_opts_record_the_loss_networks(tmp_path):
    """e4e / Cycle Encoding .pt files record their training losses only in opts: LPIPS-alex, and ArcFace on face
    datasets (MoCo on others)."""
    from cycle_encoding.checkpoints.encoder import e4e_loss_networks

    assert e4e_loss_networks({"lpips_lambda": 0.8, "id_lambda": 0.1, "dataset_type": "ffhq_encode"}) == {
        "perceptual": "lpips-alex", "identity": "arcface"}  # fmt: skip
    assert e4e_loss_networks({"lpips_lambda": 0.8, "id_lambda": 0.5, "dataset_type": "cars_encode"})["identity"] == (
        "moco"
    )
    assert e4e_loss_networks({"lpips_lambda": 0.0, "id_lambda": 0})["identity"] == "none"
    assert e4e_loss_networks({}) == {}


def test_readme_invert_with_the_shipped_models_runs_as_written(places, tmp_path, capsys):
    """`cycle-encoding invert IMAGES --generator fmnist-generator --encoder fmnist-encoder --out RUN`: the encoder
    records fmnist-features, so no LPIPS backbone is asked for (steps cut down here to keep the test short)."""
    from cycle_encoding.cli import main

    img = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"
    first = sorted(p for p in img.iterdir() if p.suffix == ".png")[0]
    run = tmp_path / "inv"
    code = main(["invert", str(first), "--generator", "fmnist-generator", "--encoder", "fmnist-encoder",
                 "--stages", "encoder,tune", "--tune-steps", "2", "--out", str(run), "--device", "cpu", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert "perceptual fmnist-features" in err and "[the encoder file]" in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["networks"]["perceptual"].startswith("fmnist-features")
    assert cfg["networks_from"] == {"perceptual": "the encoder file", "identity": "the encoder file"}
    # an LPIPS asked for by name on this grey generator suggests the Fashion-MNIST network, not the face one
    code = main(["invert", str(first), "--generator", "fmnist-generator", "--encoder", "fmnist-encoder",
                 "--stages", "encoder,tune", "--perceptual", "lpips-alex", "--out", str(tmp_path / "x")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "--perceptual fmnist-features" in err and "dlib-face" not in err


def test_invert_prints_and_records_the_chosen_backbone(places, tmp_path, capsys):
    from cycle_encoding.cli import main
    from tests.conftest import make_tiny_generator

    hub = write_alexnet(places["hub"] / ALEX)
    G = make_tiny_generator(resolution=32)  # LPIPS-alex needs 32 px
    ce.save_generator(G, tmp_path / "g.safetensors")
    target = tmp_path / "t.png"
    ce.utils.save_image(G.synthesis(G.mapping(torch.randn(1, G.z_dim)), noise_mode="const")[0].detach(), target)
    run = tmp_path / "run"
    code = main(["invert", str(target), "--generator", str(tmp_path / "g.safetensors"), "--stages", "project,tune",
                 "--project-steps", "2", "--tune-steps", "1", "--out", str(run), "--device", "cpu", "--quiet"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 0, err
    assert f"perceptual lpips-alex: {hub} (found in the torch hub cache)" in err
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["network_files"]["perceptual"] == {"name": "lpips-alex", "file": str(hub), "found": "torch hub cache"}
    assert cfg["networks_from"]["perceptual"] == "default"


def test_an_encoder_records_its_networks_files_and_invert_reuses_them(places, tmp_path):
    """What train-encoder records (``network_files`` in the encoder's provenance) is what invert uses by default,
    even when the file is no longer where the lookup would find it."""
    from cycle_encoding.checkpoints.native import default_provenance
    from cycle_encoding.inversion import Inverter
    from tests.conftest import make_tiny_generator, tiny_encoder

    kept = write_alexnet(tmp_path / "kept" / ALEX, seed=5)
    hub = write_alexnet(places["hub"] / ALEX, seed=6)
    dist = build_perceptual("lpips-alex", "cpu", kept)
    rec = LossNetworks(dist, None).files()
    assert rec == {"perceptual": {"name": "lpips-alex", "file": str(kept), "found": "option"}}
    G = make_tiny_generator(resolution=32)
    prov = default_provenance(networks={"perceptual": dist.name, "identity": "none"}, network_files=rec)
    ce.save_encoder(tiny_encoder(G), tmp_path / "e.safetensors", provenance=prov)
    inv = Inverter(G, str(tmp_path / "e.safetensors"), stages=("encoder", "tune"), device="cpu")
    assert inv.perceptual_name == "lpips-alex" and inv.networks_from["perceptual"] == "the encoder file"
    assert inv.nets.perceptual.located.path == kept and inv.nets.perceptual.located.how == "recorded"
    hub.unlink()
    kept.rename(tmp_path / "moved.pth")  # the recorded file is gone and nothing else holds one: a clear error
    with pytest.raises(CycleEncodingError, match=r"--lpips-backbone.*recorded, gone.*--perceptual dlib-face"):
        Inverter(G, str(tmp_path / "e.safetensors"), stages=("encoder", "tune"), device="cpu")
