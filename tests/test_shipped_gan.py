"""The shipped Fashion-MNIST generator and Cycle encoder: the files load by name, match their cards' sha256 and the
figures the cards give (recomputed here on fewer images), and belong together."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from cycle_encoding.assets import card_sha256, shipped_model_card, shipped_model_path
from cycle_encoding.checkpoints.native import file_sha256, read_native_header

DEBIAN = Path("/usr/share/datasets/fashion-mnist")
needs_debian = pytest.mark.skipif(
    not (DEBIAN / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="Debian package dataset-fashion-mnist not installed (apt-get install dataset-fashion-mnist)",
)
NAMES = ["fmnist-generator", "fmnist-encoder", "fmnist-encoder-e4e", "fmnist-encoder-w"]
BASELINES = ["fmnist-encoder-e4e", "fmnist-encoder-w"]  # the encoders docs/RESULTS.md compares the Cycle encoder with


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", NAMES)
def test_shipped_file_matches_its_card(name: str) -> None:
    path = shipped_model_path(name)
    card = shipped_model_card(name)
    assert file_sha256(path) == card_sha256(card)
    text = card.read_text()
    assert "## Reproduce" in text and "cycle-encoding train-" in text
    assert f"- file: `{path.name}`, {path.stat().st_size:,} bytes" in text


def test_all_shipped_models_stay_under_40_mb() -> None:
    from cycle_encoding.assets import MODELS_DIR

    total = sum(p.stat().st_size for p in MODELS_DIR.glob("*.safetensors"))
    assert total < 40_000_000


def test_shipped_encoder_refines_with_its_training_runs_optimizer_state() -> None:
    """The companion file matches the card's sha256, fits the encoder by name and shape, and is what the refinement
    restores by default."""
    from cycle_encoding.checkpoints.optimizer import companion_path
    from cycle_encoding.inversion import load_encoder_source

    side = companion_path(shipped_model_path("fmnist-encoder"))
    card = shipped_model_card("fmnist-encoder").read_text()
    m = re.search(rf"`{re.escape(side.name)}` \(([0-9,]+) bytes, sha256 `([0-9a-f]{{64}})`\)", card)
    assert m, "the card names the optimizer state file"
    assert int(m.group(1).replace(",", "")) == side.stat().st_size and file_sha256(side) == m.group(2)
    src = load_encoder_source("fmnist-encoder")
    st = src.optimizer_state
    assert st is not None and src.optimizer_settings["lr"] == 1e-4
    names = {n for n, _ in src.encoder.named_parameters()}
    assert set(st.state) == names  # every parameter had gradients at some point of the cycle
    prov = read_native_header(shipped_model_path("fmnist-encoder"))["provenance"]
    assert max(s["step"] for s in st.state.values()) == prov["step"]  # the state of the run's last step
    assert all(torch.isfinite(s["exp_avg_sq"]).all() and (s["exp_avg_sq"] >= 0).all() for s in st.state.values())


def test_generator_and_encoder_load_by_name_and_belong_together() -> None:
    from cycle_encoding.checkpoints.encoder import load_encoder
    from cycle_encoding.checkpoints.generator import load_generator

    G = load_generator("fmnist-generator")
    E = load_encoder("fmnist-encoder")
    assert (G.resolution, G.img_channels, G.num_ws) == (32, 1, 8)
    assert (E.config.num_ws, E.config.w_dim, E.config.in_channels) == (G.num_ws, G.w_dim, 1)
    assert E.trained_stage == 0  # the cycle ends in W
    prov = read_native_header(shipped_model_path("fmnist-encoder"))["provenance"]
    assert prov["generator_sha256"] == file_sha256(shipped_model_path("fmnist-generator"))
    assert prov["schedule"] and f"`{prov['schedule']}`" in shipped_model_card("fmnist-encoder").read_text()
    n = sum(p.numel() for p in G.parameters())
    assert f"- parameters: {n:,}" in shipped_model_card("fmnist-generator").read_text()


@needs_debian
def test_generator_samples_look_like_fashion_mnist() -> None:
    """The classifier FD of 2,000 samples to 2,000 test images is near the card's (10,000 each), far below that of
    noise-like images, and the evaluation network finds most of the ten classes among the samples."""
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.editing import load_classifier
    from cycle_encoding.metrics import classifier_frechet_distance
    from cycle_encoding.training.classifier_trainer import load_tensors

    card = shipped_model_card("fmnist-generator").read_text()
    m = re.search(r"not the Inception FID\): \*\*([0-9.]+)\*\*", card)
    assert m, "the card gives the classifier FD"
    card_fd = float(m.group(1))
    G = load_generator("fmnist-generator")
    clf = load_classifier("fmnist-eval")
    with torch.no_grad():
        z = torch.randn(2000, G.z_dim, generator=torch.Generator().manual_seed(0))
        fake = torch.cat([G(z[i : i + 500], noise_mode="const").clamp(-1, 1) for i in range(0, 2000, 500)])
    test = load_tensors("fashion-mnist", "test", limit=2000)[0]
    fd = classifier_frechet_distance(fake, test, clf)["fd"]
    blur = torch.nn.functional.avg_pool2d(torch.rand(2000, 1, 32, 32, generator=torch.Generator().manual_seed(1)), 5,
                                          1, 2) * 2 - 1  # fmt: skip
    fd_noise = classifier_frechet_distance(blur, test, clf)["fd"]
    assert 0.5 * card_fd < fd < 1.5 * card_fd + 1.0
    assert fd < fd_noise / 3
    with torch.no_grad():
        classes = clf(fake).argmax(1).unique().numel()
    assert classes >= 8


@needs_debian
def test_encoder_reconstructs_unseen_test_images_as_its_card_says() -> None:
    from cycle_encoding.checkpoints.encoder import load_encoder
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.inversion import encoder_pivot
    from cycle_encoding.inversion.common import render
    from cycle_encoding.metrics import mse
    from cycle_encoding.training.classifier_trainer import load_tensors

    card = shipped_model_card("fmnist-encoder").read_text()
    G, E = load_generator("fmnist-generator"), load_encoder("fmnist-encoder")
    x = load_tensors("fashion-mnist", "test", limit=200)[0]
    mean_image = x.mean(0, keepdim=True).expand_as(x)
    got = {}
    for offsets, row in (("trained", r"trained \(stage \d+\)"), ("all", r"all \(stage \d+\)")):
        m = re.search(rf"^\| {row} \| ([0-9.]+) \|", card, re.MULTILINE)
        assert m, f"the card gives the MSE with the {offsets} offsets"
        with torch.no_grad():
            y = render(G, encoder_pivot(E, x, offsets)).clamp(-1, 1)
        got[offsets] = float(mse(y, x).mean())
        assert got[offsets] < 1.3 * float(m.group(1)), offsets
    # the encoder's own output (its trained stage) is far better than predicting the average image; with all offsets
    # switched back on it is much worse (PyTorch 1.6's zero_grad, the authors', moves the switched-off heads on)
    assert got["trained"] < 0.5 * float(mse(mean_image, x).mean())
    assert got["trained"] < got["all"]


@needs_debian
@pytest.mark.parametrize("name", BASELINES)
def test_baseline_encoders_reconstruct_as_their_cards_say(name: str) -> None:
    """The comparison encoders load by name in float32 (whatever their stored type), trained on the shipped generator,
    and reconstruct unseen test images as their cards say; no optimizer state ships with them."""
    from cycle_encoding.checkpoints.encoder import load_encoder
    from cycle_encoding.checkpoints.generator import load_generator
    from cycle_encoding.checkpoints.optimizer import companion_path
    from cycle_encoding.inversion import encoder_pivot
    from cycle_encoding.inversion.common import render
    from cycle_encoding.metrics import mse
    from cycle_encoding.training.classifier_trainer import load_tensors

    card = shipped_model_card(name).read_text()
    E = load_encoder(name)
    assert all(p.dtype == torch.float32 for p in E.parameters())
    assert E.provenance["generator_sha256"] == file_sha256(shipped_model_path("fmnist-generator"))
    assert not companion_path(shipped_model_path(name)).exists()
    m = re.search(r"^\| trained \(stage (\d+)\) \| ([0-9.]+) \|", card, re.MULTILINE)
    assert m and int(m.group(1)) == E.trained_stage
    x = load_tensors("fashion-mnist", "test", limit=200)[0]
    with torch.no_grad():
        got = float(
            mse(render(load_generator("fmnist-generator"), encoder_pivot(E, x, "trained")).clamp(-1, 1), x).mean()
        )
    assert 0.7 * float(m.group(2)) < got < 1.3 * float(m.group(2))


def test_cards_tell_a_runs_stops_and_resumes_and_count_only_the_time_it_ran(tmp_path: Path) -> None:
    """ship_models.py's reading of a run's log: a plateau stop, a resume that changed settings (its command goes on
    the card), and the wall time without the pause between them."""
    import importlib.util
    import json
    import sys

    spec = importlib.util.spec_from_file_location(
        "ship_models", Path(__file__).parents[1] / "scripts" / "ship_models.py"
    )
    sm = importlib.util.module_from_spec(spec)
    sys.modules["ship_models"] = sm
    spec.loader.exec_module(sm)
    log = [
        {"kind": "start", "step": 0, "time": 1000.0},
        {"kind": "train", "step": 100, "time": 1100.0},
        {"kind": "stop", "step": 200, "time": 1200.0, "reason": "no gain"},
        {"kind": "end", "step": 200, "time": 1201.0},
        {"kind": "resume", "step": 200, "time": 5000.0, "changed": {"max_steps": [600, 400], "val_patience": [4, 0]}},
        {"kind": "train", "step": 300, "time": 5100.0},
        {"kind": "resume", "step": 300, "time": 9000.0, "changed": {}},  # after a crash, the same settings
        {"kind": "end", "step": 400, "time": 9050.0},
    ]
    assert sm.running_seconds(log) == pytest.approx(201 + 100 + 50)
    (tmp_path / "schedule.json").write_text(json.dumps({"phases": [{"name": "W", "start": 0, "end": 600}]}))
    note = sm.schedule_note(tmp_path, log)
    assert note == (": W 0-600; stopped at step 200 because no gain; resumed at step 200 with --max-steps 400 "
                    "--val-patience 0; ended at step 400")  # fmt: skip
    assert sm.schedule_note(tmp_path, log[:4]) == ": W 0-600; stopped at step 200 because no gain"
    assert sm.schedule_note(tmp_path, [log[0], log[-1]]) == ": W 0-600"
