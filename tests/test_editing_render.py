"""``cycle-encoding edit`` and ``directions`` on real inversion runs of a tiny generator: strength 0 renders the
reconstruction exactly, each image's tuned generator is used (the base one for runs that did not tune), edits equal
an independent rendering, LEC against a hand computation, and the direction commands write files that load."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cycle_encoding.checkpoints.encoder import save_encoder
from cycle_encoding.checkpoints.generator import save_generator
from cycle_encoding.checkpoints.run_folder import InversionRun, tensor_sha256
from cycle_encoding.cli import main
from cycle_encoding.editing import (
    AttributeClassifier,
    ClassifierConfig,
    interfacegan_direction,
    load_directions,
    save_classifier,
    save_interfacegan,
)
from cycle_encoding.editing.render import EditRequest, render_run_edits
from cycle_encoding.errors import CycleEncodingError
from cycle_encoding.inversion import Inverter, load_generator_delta
from cycle_encoding.utils import save_image, to_uint8
from tests.conftest import make_tiny_generator, stand_in_perceptual, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


def make_run(root: Path, stages=("encoder", "tune"), n_images: int = 3, save_delta: bool = True) -> dict:
    """A tiny generator and encoder saved as files, a folder of its images, and an inversion run of them."""
    root.mkdir(parents=True, exist_ok=True)
    G = make_tiny_generator(seed=1)
    save_generator(G, root / "G.safetensors")
    save_encoder(tiny_encoder(G, widths=(8, 8, 16, 16)), root / "E.safetensors")
    with torch.no_grad():
        imgs = G(torch.randn(n_images, G.z_dim, generator=torch.Generator().manual_seed(5)))
    for i in range(n_images):
        save_image(imgs[i], root / "images" / f"im{i}.png")
    inv = Inverter(
        str(root / "G.safetensors"), str(root / "E.safetensors"), stages=stages, perceptual="none",
        perceptual_net=stand_in_perceptual(), device="cpu",
        tune={"steps": 4, "lr": 0.01, "locality": False}, project={"steps": 5}, save_delta=save_delta,
    )  # fmt: skip
    inv.run(root / "images", root / "run", log=lambda s: None)
    return {"root": root, "run": root / "run", "G": root / "G.safetensors", "E": root / "E.safetensors"}


@pytest.fixture(scope="module")
def tuned_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("tuned"))


@pytest.fixture(scope="module")
def untuned_run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("untuned"), stages=("encoder",), n_images=2)


def png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def test_strength_zero_is_the_reconstruction_and_the_tuned_generator_is_used(tuned_run, tmp_path):
    run = InversionRun(tuned_run["run"])
    G = run.load_generator()
    v = torch.nn.functional.normalize(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(3)), dim=0)
    save_interfacegan(interfacegan_direction(v), tmp_path / "age.pt")
    rc = main(["edit", str(tuned_run["run"]), "--direction", str(tmp_path / "age.pt"), "--strengths", "-2,0,1.5",
               "--layers", "1-3", "--quiet"])  # fmt: skip
    assert rc == 0
    out = tuned_run["run"] / "edits" / "age_l1-3"
    doc = json.loads((out / "edit.json").read_text())
    assert doc["strengths"] == [-2.0, 0.0, 1.5] and doc["layers"] == [1, 2, 3]
    for rec in doc["images"]:
        im = run.image(rec["name"])
        assert rec["generator"] == "tuned"
        assert rec["strength0_is_reconstruction"] is True and rec["reconstruction_hash_matches"] is True
        # strength 0 gives the stored reconstruction pixel for pixel
        np.testing.assert_array_equal(png(out / rec["files"][1]), png(im.recon_path("tune")))
        # the tuned generator, not the base, renders: the base's image of the pivot differs
        assert not np.array_equal(png(out / rec["files"][1]), png(im.recon_path("encoder")))
        # an edit, rendered independently: the base + the stored change, the pivot moved on layers 1-3
        Gt = load_generator_delta(im.delta_path, G)
        ws = im.pivot.clone()
        ws[:, 1:4] += 1.5 * v
        with torch.no_grad():
            want = to_uint8(Gt.synthesis(ws, noise_mode="const"))[0]
        np.testing.assert_array_equal(png(out / rec["files"][2]), want)
        assert (out / rec["strip"]).is_file()
        # the strip: input and three edits in a row
        with Image.open(out / rec["strip"]) as s:
            assert s.width > 3.5 * s.height - 60


def test_untuned_runs_edit_with_the_base_generator(untuned_run):
    run = InversionRun(untuned_run["run"])
    G = run.load_generator()
    ds = interfacegan_direction(torch.randn(G.w_dim))
    doc = render_run_edits(run, EditRequest(ds, 0, [0.0, 1.0], tag="x"), log=lambda s: None)
    for rec in doc["images"]:
        im = run.image(rec["name"])
        assert rec["generator"] == "base" and rec["strength0_is_reconstruction"] is True
        with torch.no_grad():
            y = G.synthesis(im.pivot, noise_mode="const")
        assert tensor_sha256(y) == im.result["recon_sha256"]["encoder"]
        np.testing.assert_array_equal(png(run.dir / "edits" / "x" / rec["files"][0]), png(im.recon_path("encoder")))


def test_runs_that_did_not_store_their_tuned_generators(tmp_path):
    info = make_run(tmp_path, n_images=1, save_delta=False)
    run = InversionRun(info["run"])
    ds = interfacegan_direction(torch.randn(32))
    with pytest.raises(CycleEncodingError, match="did not store it"):
        render_run_edits(run, EditRequest(ds, 0, [0.0]), log=lambda s: None)
    doc = render_run_edits(run, EditRequest(ds, 0, [0.0]), allow_base=True, log=lambda s: None)
    assert doc["images"][0]["generator"].startswith("base")
    assert doc["images"][0]["strength0_is_reconstruction"] is False  # the base G cannot give the tuned image


def test_a_generator_that_is_not_the_runs_is_refused(tuned_run, tmp_path):
    other = make_tiny_generator(seed=9)
    save_generator(other, tmp_path / "other.safetensors")
    rc = main(
        ["edit", str(tuned_run["run"]), "--direction", "sefa", "--generator", str(tmp_path / "other.safetensors")]
    )
    assert rc == 2


def test_lec_of_the_run_matches_a_hand_computation(tuned_run):
    from cycle_encoding.checkpoints.encoder import load_encoder

    run = InversionRun(tuned_run["run"])
    G = run.load_generator()
    ds = interfacegan_direction(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(4)))
    doc = render_run_edits(run, EditRequest(ds, 0, [-1.0, 0.0, 2.0], tag="lec"), encoder="run", log=lambda s: None)
    E = load_encoder(tuned_run["E"])
    E.stage = E.max_stage  # the run's offsets: all
    for rec in doc["images"]:
        im = run.image(rec["name"])
        Gt = load_generator_delta(im.delta_path, G)
        for a, got in zip([-1.0, 0.0, 2.0], rec["lec"]):
            w = im.pivot
            with torch.no_grad():
                back = E(Gt.synthesis(w + a * ds.vectors[0], noise_mode="const")) - a * ds.vectors[0]
            assert abs(got - float((w - back).norm())) < 1e-4 * max(1.0, got)
    lec = doc["measures"]["lec"]["per_strength"]
    assert [r["strength"] for r in lec] == [-1.0, 0.0, 2.0] and lec[0]["lec"]["n"] == 3


def test_edit_success_and_preservation_through_the_command(tuned_run, tmp_path):
    torch.manual_seed(0)
    clf = AttributeClassifier(ClassifierConfig(outputs=("bright", "other"), input_size=16, widths=(4,)))
    save_classifier(clf, tmp_path / "clf.safetensors")
    rc = main(["edit", str(tuned_run["run"]), "--direction", "sefa", "--strengths", "-1,0,1", "--classifier",
               str(tmp_path / "clf.safetensors"), "--attribute", "bright", "--preservation", "mse", "--quiet",
               "--name", "measured"])  # fmt: skip
    assert rc == 0
    out = tuned_run["run"] / "edits" / "measured"
    doc = json.loads((out / "edit.json").read_text())
    ms = doc["measures"]
    zero = ms["edit_success"]["per_strength"][1]
    assert zero["score_change"]["mean"] == 0.0  # strength 0 is the reconstruction: no change
    assert ms["preservation"]["per_strength"][1]["value"]["mean"] == 0.0
    # preservation at strength 1 is the MSE between the two PNG-stored images, up to 8-bit rounding
    rec = doc["images"][0]
    a = png(out / rec["files"][2]).astype(np.float64) / 127.5 - 1
    b = png(out / rec["files"][1]).astype(np.float64) / 127.5 - 1
    assert abs(rec["preservation"][2] - float(((a - b) ** 2).mean())) < 0.01
    # re-running with fewer strengths leaves no stale image behind
    assert main(["edit", str(tuned_run["run"]), "--direction", "sefa", "--strengths", "0", "--name", "measured",
                 "--quiet"]) == 0  # fmt: skip
    assert sorted(p.name for p in (out / rec["name"]).iterdir()) == ["00_s+0.png"]


def test_direction_commands_write_loadable_files(tuned_run, tmp_path):
    root = tuned_run["root"]
    assert main(["directions", "sefa", "--generator", str(root / "G.safetensors"), "--out",
                 str(tmp_path / "s.safetensors"), "--layers", "0-2", "--components", "3"]) == 0  # fmt: skip
    s = load_directions(tmp_path / "s.safetensors")
    assert s.method == "sefa" and len(s) == 3 and s.layers == (0, 1, 2)
    assert main(["directions", "ganspace", "--generator", str(root / "G.safetensors"), "--out",
                 str(tmp_path / "pca.pt"), "--samples", "3000", "--components", "5"]) == 0  # fmt: skip
    raw = torch.load(tmp_path / "pca.pt", weights_only=True)
    assert list(raw["comp"].shape) == [5, 1, 32]
    # train from the run's pivots labelled by a CSV of image names
    run = InversionRun(tuned_run["run"])
    names = run.image_names()
    (tmp_path / "labels.csv").write_text("name,label\n" + "".join(f"{n},{i % 2}\n" for i, n in enumerate(names)))
    assert main(["directions", "train", "--codes", str(tuned_run["run"]), "--labels", str(tmp_path / "labels.csv"),
                 "--out", str(tmp_path / "d.pt"), "--val-fraction", "0"]) == 0  # fmt: skip
    d = torch.load(tmp_path / "d.pt", weights_only=True)
    assert list(d.shape) == [1, 32] and abs(float(d.norm()) - 1) < 1e-5
    # train from generated samples scored by a classifier file
    torch.manual_seed(0)
    save_classifier(AttributeClassifier(ClassifierConfig(input_size=16, widths=(4,))), tmp_path / "c.safetensors")
    assert main(["directions", "train", "--generator", str(root / "G.safetensors"), "--classifier",
                 str(tmp_path / "c.safetensors"), "--samples", "200", "--select-ratio", "0.2", "--out",
                 str(tmp_path / "g.npy")]) == 0  # fmt: skip
    assert np.load(tmp_path / "g.npy").shape == (1, 32)
    # from an image folder with sub-folders per label, encoded by the run's encoder
    for i, n in enumerate(names):
        (tmp_path / "faces" / ("yes" if i % 2 else "no")).mkdir(parents=True, exist_ok=True)
        (tmp_path / "faces" / ("yes" if i % 2 else "no") / f"{n}.png").write_bytes(
            run.image(n).target_path.read_bytes()
        )
    assert main(["directions", "train", "--images", str(tmp_path / "faces"), "--encoder", str(tuned_run["E"]),
                 "--out", str(tmp_path / "f.safetensors"), "--val-fraction", "0"]) == 0  # fmt: skip
    assert load_directions(tmp_path / "f.safetensors").meta["positives"] == 1
    assert main(["directions", "show", str(tmp_path / "f.safetensors")]) == 0
    assert main(["directions", "train", "--out", str(tmp_path / "x.pt")]) == 2  # no source: one clear line
