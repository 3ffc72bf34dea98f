"""InterFaceGAN training: the normal of a linear classifier recovers a known hyperplane (W and W+, labels and scores),
labelled image folders (CSV or sub-folders) encoded by an encoder, generated samples scored by a classifier (a
callable or a file in the project's format), and the classifier file format."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cycle_encoding.editing import (
    AttributeClassifier,
    ClassifierConfig,
    as_scorer,
    encode_labelled_folder,
    interfacegan_direction,
    load_classifier,
    read_labels_csv,
    sample_and_score,
    sample_mapping,
    save_classifier,
    train_boundary,
)
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.utils import save_image
from tests.conftest import make_tiny_generator, tiny_encoder

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def G():
    return make_tiny_generator(seed=4)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.flatten() * b.flatten()).sum() / (a.norm() * b.norm()))


@pytest.mark.parametrize("method", ["svm", "logistic", "svc"])
def test_trained_direction_recovers_a_known_hyperplane(G, method):
    codes = sample_mapping(G, 3000, seed=1)  # real W codes: anisotropic, not centred
    normal = unit(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(7)))
    proj = codes @ normal
    labels = (proj > proj.median()).long()
    res = train_boundary(codes, labels, method=method, seed=0)
    d = res.direction.vectors[0]
    assert abs(float(d.norm()) - 1) < 1e-5
    assert cosine(d, normal) > 0.95, cosine(d, normal)
    assert res.val_accuracy is not None and res.val_accuracy > 0.95
    assert res.n_positive + res.n_negative == 3000


def test_continuous_scores_keep_the_ends_as_interfacegan_does(G):
    codes = sample_mapping(G, 4000, seed=2)
    normal = unit(torch.randn(G.w_dim, generator=torch.Generator().manual_seed(8)))
    scores = codes @ normal + 0.02 * torch.randn(4000, generator=torch.Generator().manual_seed(9))
    res = train_boundary(codes, scores, select_ratio=0.25)
    assert res.n_positive == res.n_negative == 1000
    assert cosine(res.direction.vectors[0], normal) > 0.95
    with pytest.raises(CycleEncodingError, match="select_ratio"):
        train_boundary(codes[:50], scores[:50], select_ratio=0.02)


def test_w_plus_space_gives_a_per_layer_direction(G):
    n = 2000
    g = torch.Generator().manual_seed(3)
    codes = torch.randn(n, G.num_ws, G.w_dim, generator=g)
    normal = unit(torch.randn(G.num_ws, G.w_dim, generator=g))
    labels = ((codes * normal).sum(dim=(1, 2)) > 0).long()
    res = train_boundary(codes, labels, space="w+", val_fraction=0.2)
    d = res.direction
    assert d.per_layer and list(d.vectors.shape) == [1, G.num_ws, G.w_dim]
    assert cosine(d.vectors[0], normal) > 0.9
    # in W the codes are averaged over layers: the direction is [1, w_dim]
    assert list(train_boundary(codes, labels, space="w").direction.vectors.shape) == [1, G.w_dim]


def test_one_class_and_mismatched_inputs_are_errors(G):
    codes = sample_mapping(G, 20, seed=0)
    with pytest.raises(CycleEncodingError, match="both classes"):
        train_boundary(codes, torch.ones(20))
    with pytest.raises(CycleEncodingError, match="20 codes but 19 labels"):
        train_boundary(codes, torch.ones(19))


# ---------------------------------------------------------------------------------------------------------------
# Labelled folders


def read_labels_variants(tmp_path):
    (tmp_path / "a.csv").write_text("file,smile,age\nx.png,yes,0.3\ny.png,no,0.9\n")
    assert read_labels_csv(tmp_path / "a.csv") == {"x.png": 1.0, "y.png": 0.0}
    assert read_labels_csv(tmp_path / "a.csv", column="age") == {"x.png": 0.3, "y.png": 0.9}
    (tmp_path / "b.tsv").write_text("x\t1\ny\t0\n")
    assert read_labels_csv(tmp_path / "b.tsv") == {"x": 1.0, "y": 0.0}


def test_label_files(tmp_path):
    read_labels_variants(tmp_path)
    (tmp_path / "c.csv").write_text("file,label\nx.png,maybe\n")
    with pytest.raises(CycleEncodingError, match="row 2"):
        read_labels_csv(tmp_path / "c.csv")
    (tmp_path / "d.csv").write_text("x.png,maybe\n")
    with pytest.raises(CycleEncodingError, match="no label rows"):
        read_labels_csv(tmp_path / "d.csv")


def test_labelled_folder_by_subfolders_and_by_csv_agree(tmp_path, G):
    E = tiny_encoder(G, widths=(8, 8, 16, 16))
    with torch.no_grad():
        imgs = G(torch.randn(6, G.z_dim, generator=torch.Generator().manual_seed(0)))
    brightness = imgs.mean(dim=(1, 2, 3))
    labels = (brightness > brightness.median()).float()
    root = tmp_path / "by_folder"
    flat = tmp_path / "flat"
    rows = ["name,label"]
    for i in range(6):
        sub = "smiling" if labels[i] else "neutral"
        save_image(imgs[i], root / sub / f"im{i}.png")
        save_image(imgs[i], flat / f"im{i}.png")
        rows.append(f"im{i},{int(labels[i])}")
    (tmp_path / "labels.csv").write_text("\n".join(rows) + "\n")

    with pytest.raises(CycleEncodingError, match="--positive"):
        encode_labelled_folder(E, root)
    codes_a, y_a, notes = encode_labelled_folder(E, root, positive="smiling")
    assert notes["positive"] == "smiling" and codes_a.shape == (6, G.num_ws, G.w_dim)
    codes_b, y_b, _ = encode_labelled_folder(E, flat, labels=tmp_path / "labels.csv")
    # the same image gets the same code and label either way; codes are E(image) as read back from the PNG
    from cycle_encoding.data.images import read_image

    for i in range(6):
        x = read_image(flat / f"im{i}.png")[None]
        with torch.no_grad():
            want = E(x)
        j = [k for k in range(6) if torch.allclose(codes_b[k], want[0], atol=1e-5)]
        assert len(j) == 1 and y_b[j[0]] == labels[i]
        ja = [k for k in range(6) if torch.allclose(codes_a[k], want[0], atol=1e-5)]
        assert len(ja) == 1 and y_a[ja[0]] == labels[i]
    res = train_boundary(codes_b, y_b, space="w+", C=1e4, val_fraction=0)
    assert res.train_accuracy == 1.0  # 6 points in N * 32 dimensions are separable
    (tmp_path / "missing.csv").write_text("nothere.png,1\n")
    with pytest.raises(CycleEncodingError, match="not found"):
        encode_labelled_folder(E, flat, labels=tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------------------------------
# Generated samples and classifiers


def brightness(images: torch.Tensor) -> torch.Tensor:
    return images.mean(dim=(1, 2, 3))


def test_generated_samples_scored_by_a_callable_give_a_working_direction(G):
    codes, scores = sample_and_score(G, brightness, 600, batch=200, seed=0)
    assert codes.shape == (600, G.w_dim) and scores.shape == (600,)
    with torch.no_grad():
        ws = codes[:5, None, :].expand(-1, G.num_ws, -1)  # the codes are W codes, one per image
        torch.testing.assert_close(scores[:5], brightness(G.synthesis(ws)), rtol=1e-5, atol=1e-6)
    res = train_boundary(codes, scores, select_ratio=0.2)
    ds = res.direction
    # new samples: editing along the direction makes them brighter, against it darker
    with torch.no_grad():
        ws = G.mapping(torch.randn(50, G.z_dim, generator=torch.Generator().manual_seed(123)))
        base = brightness(G.synthesis(ws))
        up = brightness(G.synthesis(ds.apply(ws, 0, 2.0)))
        down = brightness(G.synthesis(ds.apply(ws, 0, -2.0)))
    assert float((up - base).mean()) > 0 and float((down - base).mean()) < 0
    assert float(((up - base) > 0).float().mean()) > 0.8


def test_classifier_file_round_trip_and_scorer(tmp_path):
    torch.manual_seed(0)
    clf = AttributeClassifier(ClassifierConfig(outputs=("smile", "age"), input_size=16, widths=(8, 16)))
    save_classifier(clf, tmp_path / "clf.safetensors")
    back = load_classifier(tmp_path / "clf.safetensors")
    x = torch.rand(3, 3, 24, 24) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(back(x), clf(x), rtol=0, atol=0)
        torch.testing.assert_close(as_scorer(tmp_path / "clf.safetensors", "age")(x), clf(x)[:, 1], rtol=0, atol=0)
        torch.testing.assert_close(as_scorer(back, 0)(x), clf(x)[:, 0], rtol=0, atol=0)
    with pytest.raises(CycleEncodingError, match="no output 'hair'"):
        as_scorer(back, "hair")(x)
    assert as_scorer(brightness)(x).shape == (3,)
    # a wrong file: strict key and shape checks name the key
    other = AttributeClassifier(ClassifierConfig(outputs=("a",), input_size=16, widths=(8, 8)))
    from cycle_encoding.checkpoints.native import save_native

    save_native(tmp_path / "bad.safetensors", "classifier", clf.config.to_dict(), dict(other.state_dict()))
    with pytest.raises(CheckpointError, match="shape"):
        load_classifier(tmp_path / "bad.safetensors")


def test_a_direction_from_a_w_plus_normal_edits_all_layers(G):
    v = torch.randn(1, G.num_ws, G.w_dim)
    ds = interfacegan_direction(v)
    ws = torch.zeros(1, G.num_ws, G.w_dim)
    torch.testing.assert_close(ds.apply(ws, 0, 1.0), v)
    assert np.isclose(float(ds.vectors.norm()), float(v.norm()))


def test_pair_attribute_scores_the_logit_difference_and_labels_two_classes(G):
    torch.manual_seed(1)
    clf = AttributeClassifier(ClassifierConfig(outputs=("shirt", "coat", "bag"), input_size=16, widths=(8, 16)))
    x = torch.rand(64, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        logits = clf(x)
    diff = as_scorer(clf, "coat vs shirt")(x)
    torch.testing.assert_close(diff, logits[:, 1] - logits[:, 0])
    labels = as_scorer(clf, "coat vs shirt", labels=True)(x)
    top = logits.argmax(1)
    assert torch.equal(labels[top == 1], torch.ones(int((top == 1).sum())))
    assert torch.equal(labels[top == 0], torch.zeros(int((top == 0).sum())))
    assert bool(torch.isnan(labels[top == 2]).all())
    with pytest.raises(CycleEncodingError, match="pair attribute"):
        as_scorer(clf, "coat", labels=True)
    with pytest.raises(CycleEncodingError, match="no output 'hat'"):
        as_scorer(clf, "hat vs coat")(x)


def test_samples_without_a_label_are_left_out(G):
    def half(images: torch.Tensor) -> torch.Tensor:
        b = brightness(images)
        return torch.where(b > b.median(), torch.ones_like(b), torch.full_like(b, float("nan")))

    codes, scores = sample_and_score(G, half, 40, batch=40, seed=0)
    assert codes.shape[0] == scores.shape[0] and 0 < codes.shape[0] < 40
    assert bool((scores == 1).all())


def test_brightness_is_a_builtin_measure():
    x = torch.tensor([-1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 2, 2).expand(2, 1, 2, 2)
    score = as_scorer("brightness")
    torch.testing.assert_close(score(x), torch.full((2,), 0.5))
    assert "no network" in score.name
    with pytest.raises(CycleEncodingError, match="measure"):
        as_scorer("brightness", "Coat")


def test_shipped_names_resolve_to_their_files(tmp_path, monkeypatch):
    from cycle_encoding.assets import resolve_model, shipped_model_path

    assert resolve_model("fmnist-eval") == shipped_model_path("fmnist-eval")
    clf = load_classifier("fmnist-eval")
    assert "fmnist-eval.safetensors" in clf.name
    # an existing file of that name wins; an unknown name stays a path (the loader then says it is missing)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "fmnist-eval").write_bytes(b"x")
    assert resolve_model("fmnist-eval") == tmp_path.joinpath("fmnist-eval").relative_to(tmp_path)
    assert str(resolve_model("no-such-model")) == "no-such-model"
