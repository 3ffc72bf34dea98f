"""Editing directions: edits of codes by layer range, the published file layouts (InterFaceGAN tensors and .npy
boundaries, GANSpace's {'mean', 'comp', 'std'}, rosinality's SeFa eigvec), GANSpace's PCA and SeFa's closed form
checked against numpy, and the map from style inputs to the modulation layers that read them."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from cycle_encoding.editing import (
    DirectionSet,
    ganspace_pca,
    interfacegan_direction,
    load_directions,
    parse_layers,
    parse_strengths,
    sample_mapping,
    save_any,
    save_directions,
    save_ganspace,
    save_interfacegan,
    sefa_directions,
    style_consumers,
)
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from tests.conftest import make_tiny_generator

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def G():
    return make_tiny_generator(seed=3)


def random_codes(G, n: int = 4, seed: int = 0) -> torch.Tensor:
    with torch.no_grad():
        ws = G.mapping(torch.randn(n, G.z_dim, generator=torch.Generator().manual_seed(seed)))
    return ws + 0.1 * torch.randn(ws.shape, generator=torch.Generator().manual_seed(seed + 1))  # W+ codes


# ---------------------------------------------------------------------------------------------------------------
# Edits


def test_w_direction_edits_only_the_chosen_layers(G):
    ws = random_codes(G)
    v = torch.randn(G.w_dim)
    ds = interfacegan_direction(v)
    out = ds.apply(ws, 0, 2.5, layers=[2, 3, 4])
    want = ws.clone()
    want[:, 2:5] += 2.5 * v
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    # all layers by default
    torch.testing.assert_close(ds.apply(ws, 0, -1.0), ws - v, rtol=0, atol=1e-6)


def test_strength_zero_returns_the_codes_bit_for_bit(G):
    ws = random_codes(G)
    ds = interfacegan_direction(torch.randn(G.w_dim))
    out = ds.apply(ws, 0, 0.0, layers=[1, 2])
    assert torch.equal(out, ws) and out.data_ptr() != ws.data_ptr()


def test_w_plus_direction_and_layer_mask(G):
    ws = random_codes(G)
    v = torch.randn(1, G.num_ws, G.w_dim)
    ds = interfacegan_direction(v)
    assert ds.per_layer and ds.num_ws == G.num_ws
    out = ds.apply(ws, 0, 1.5, layers=[0, 5])
    want = ws.clone()
    want[:, [0, 5]] += 1.5 * v[0, [0, 5]]
    torch.testing.assert_close(out, want, rtol=0, atol=1e-6)
    other = torch.zeros(2, G.num_ws + 1, G.w_dim)
    with pytest.raises(CycleEncodingError, match="layers"):
        ds.apply(other, 0, 1.0)


def test_bad_widths_layers_and_components_are_clear_errors(G):
    ws = random_codes(G)
    ds = interfacegan_direction(torch.randn(G.w_dim + 1))
    with pytest.raises(CycleEncodingError, match="width"):
        ds.apply(ws, 0, 1.0)
    ds = interfacegan_direction(torch.randn(G.w_dim))
    with pytest.raises(CycleEncodingError, match=f"layers 0-{G.num_ws - 1}"):
        ds.apply(ws, 0, 1.0, layers=[G.num_ws])
    with pytest.raises(CycleEncodingError, match="component 3"):
        ds.apply(ws, 3, 1.0)


def test_parse_layers_and_strengths():
    assert parse_layers("2-4") == [2, 3, 4]
    assert parse_layers("0,3") == [0, 3]
    assert parse_layers("all") is None and parse_layers(None) is None
    assert parse_strengths("-3,-1.5,0,1.5,3") == [-3.0, -1.5, 0.0, 1.5, 3.0]
    with pytest.raises(CycleEncodingError):
        parse_strengths("1,a")


# ---------------------------------------------------------------------------------------------------------------
# InterFaceGAN files


def test_interfacegan_raw_tensor_files_load_and_edit(tmp_path, G):
    ws = random_codes(G)
    v = torch.randn(1, G.w_dim)
    torch.save(v, tmp_path / "age.pt")  # e4e / PTI layout: a raw [1, w_dim] tensor
    ds = load_directions(tmp_path / "age.pt")
    assert ds.method == "interfacegan" and len(ds) == 1 and not ds.per_layer
    torch.testing.assert_close(ds.apply(ws, 0, 3.0), ws + 3.0 * v[0], rtol=0, atol=1e-6)

    vp = torch.randn(1, G.num_ws, G.w_dim)
    torch.save(vp, tmp_path / "wplus.pt")
    ds = load_directions(tmp_path / "wplus.pt")
    assert ds.per_layer
    torch.testing.assert_close(ds.apply(ws, 0, -2.0), ws - 2.0 * vp, rtol=0, atol=1e-6)

    # InterFaceGAN's own boundary files: numpy [1, w_dim]
    np.save(tmp_path / "smile_boundary.npy", v.numpy().astype(np.float64))
    ds = load_directions(tmp_path / "smile_boundary.npy")
    torch.testing.assert_close(ds.vectors, v, rtol=0, atol=1e-6)


def test_interfacegan_writer_gives_the_published_layout(tmp_path, G):
    v = torch.nn.functional.normalize(torch.randn(G.w_dim), dim=0)
    save_interfacegan(interfacegan_direction(v), tmp_path / "d.pt")
    raw = torch.load(tmp_path / "d.pt", weights_only=True)  # what other tools do
    assert isinstance(raw, torch.Tensor) and list(raw.shape) == [1, G.w_dim] and raw.dtype == torch.float32
    torch.testing.assert_close(raw[0], v)
    save_interfacegan(interfacegan_direction(v), tmp_path / "d.npy")
    arr = np.load(tmp_path / "d.npy", allow_pickle=False)
    assert arr.shape == (1, G.w_dim)
    np.testing.assert_allclose(arr[0], v.numpy())


def test_unreadable_direction_files_are_refused_by_name(tmp_path):
    torch.save({"weights": torch.zeros(3)}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="no direction layout"):
        load_directions(tmp_path / "x.pt")
    np.save(tmp_path / "o.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CheckpointError, match="object arrays"):
        load_directions(tmp_path / "o.npy")
    torch.save(torch.zeros(2, 3, 4, 5), tmp_path / "t.pt")
    with pytest.raises(CheckpointError, match="no direction layout"):
        load_directions(tmp_path / "t.pt")
    torch.save({"mean": torch.zeros(1, 4), "comp": torch.zeros(2, 1, 5), "std": torch.ones(2)}, tmp_path / "g.pt")
    with pytest.raises(CheckpointError, match="'mean' has 4 values"):
        load_directions(tmp_path / "g.pt")


# ---------------------------------------------------------------------------------------------------------------
# GANSpace


@pytest.fixture(scope="module")
def pca(G):
    return ganspace_pca(G, n_samples=20_000, seed=5, batch=5000)


def test_ganspace_components_are_orthonormal_and_ordered(pca, G):
    comp = pca.vectors.double()
    torch.testing.assert_close(comp @ comp.t(), torch.eye(G.w_dim, dtype=torch.float64), atol=1e-5, rtol=0)
    std = pca.scales
    assert bool((std[:-1] >= std[1:]).all()) and float(std[-1]) > 0
    # the variance of fresh samples along each component follows the stored std (ordered, within sampling error)
    fresh = sample_mapping(G, 20_000, seed=99).double()
    proj = (fresh - pca.mean.double()) @ comp.t()
    var = proj.var(dim=0)
    torch.testing.assert_close(var.sqrt(), std.double(), rtol=0.05, atol=1e-6)


def test_ganspace_matches_numpy_svd(pca, G):
    x = sample_mapping(G, 20_000, seed=5, batch=5000).double().numpy()
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    np.testing.assert_allclose(pca.mean.numpy(), x.mean(0), atol=1e-5)
    np.testing.assert_allclose(pca.scales.double().numpy(), s / math.sqrt(len(x) - 1), rtol=1e-4)
    k = 8  # leading components, well separated
    cos = np.abs(np.sum(vt[:k] * pca.vectors[:k].double().numpy(), axis=1))
    assert cos.min() > 0.9999, cos


def test_ganspace_published_layout_gives_the_same_edit(tmp_path, pca, G):
    ws = random_codes(G)
    k, a, layers = 2, 1.7, [1, 2, 3]
    fresh = pca.apply(ws, k, a, layers)
    # by the published formula: w_i += a * std_k * comp_k on the chosen layers
    want = ws.clone()
    want[:, layers] += a * pca.scales[k] * pca.vectors[k]
    torch.testing.assert_close(fresh, want, rtol=0, atol=1e-5)
    # a file in GANSpace's exact layout, written by hand as e4e's ffhq_pca.pt is
    torch.save(
        {"mean": pca.mean.reshape(1, -1).clone(), "comp": pca.vectors[:, None, :].clone(), "std": pca.scales.clone()},
        tmp_path / "by_hand_pca.pt",
    )
    read = load_directions(tmp_path / "by_hand_pca.pt")
    assert read.method == "ganspace" and len(read) == G.w_dim
    torch.testing.assert_close(read.apply(ws, k, a, layers), fresh, rtol=0, atol=0)
    # our writer gives the same layout, readable by plain torch.load
    save_ganspace(pca, tmp_path / "ours.pt")
    raw = torch.load(tmp_path / "ours.pt", weights_only=True)
    assert sorted(raw) == ["comp", "mean", "std"]
    assert list(raw["mean"].shape) == [1, G.w_dim]
    assert list(raw["comp"].shape) == [G.w_dim, 1, G.w_dim]
    assert list(raw["std"].shape) == [G.w_dim]
    torch.testing.assert_close(load_directions(tmp_path / "ours.pt").apply(ws, k, a, layers), fresh, rtol=0, atol=0)


def test_ganspace_set_mode_is_e4e_formula(pca, G):
    ws = random_codes(G)
    k, a, layers = 1, 2.0, [4, 5]
    out = pca.apply(ws, k, a, layers, mode="set")
    comp, std = pca.vectors[k], pca.scales[k]
    coord = ((ws[:, 0] - pca.mean) * comp).sum(1) / std  # e4e: the coordinate of layer 0's code
    want = ws.clone()
    want[:, layers] += ((a - coord) * std)[:, None, None] * comp
    torch.testing.assert_close(out, want, rtol=0, atol=1e-5)
    # after a 'set' edit the edited layers sit at coordinate a (when layer 0 is among them)
    out0 = pca.apply(ws, k, a, [0, 1], mode="set")
    torch.testing.assert_close(
        ((out0[:, 0] - pca.mean) * comp).sum(1) / std, torch.full((ws.shape[0],), a), atol=1e-4, rtol=0
    )


# ---------------------------------------------------------------------------------------------------------------
# SeFa


def test_style_consumers_match_what_synthesis_feeds(G):
    """Hooks on every modulation layer record its input: it must be ws[:, i] exactly for the listed i."""
    consumers = style_consumers(G, include_torgb=True)
    seen: dict[str, torch.Tensor] = {}
    hooks = []
    for name, module in G.named_modules():
        if name.endswith("modulation"):
            hooks.append(module.register_forward_hook(lambda m, inp, out, name=name: seen.__setitem__(name, inp[0])))
    ws = random_codes(G, n=2)
    with torch.no_grad():
        G.synthesis(ws)
    for h in hooks:
        h.remove()
    listed = {name for layer in consumers for name, _ in layer}
    assert listed == set(seen), set(seen) ^ listed
    for i, layer in enumerate(consumers):
        for name, _ in layer:
            assert torch.equal(seen[name], ws[:, i]), (name, i)


def test_sefa_directions_are_the_top_eigenvectors(G):
    layers = [0, 1, 2, 3]
    ds = sefa_directions(G, layers=layers, components=6)
    sd = G.state_dict()
    names = ["conv1.conv.modulation.weight"] + [f"convs.{j}.conv.modulation.weight" for j in range(3)]
    scale = 1 / math.sqrt(G.w_dim)
    A = np.concatenate([sd[n].double().numpy() * scale for n in names], 0)
    A = A / np.linalg.norm(A, axis=1, keepdims=True)  # SeFa's row normalization
    evals, evecs = np.linalg.eigh(A.T @ A)
    order = np.argsort(evals)[::-1][:6]
    np.testing.assert_allclose(ds.values.double().numpy(), evals[order], rtol=1e-4)
    cos = np.abs(np.sum(evecs[:, order].T * ds.vectors.double().numpy(), axis=1))
    assert cos.min() > 0.9999, cos
    assert ds.layers == tuple(layers)
    # the first direction changes the styles most: ||A v0|| >= ||A n|| for random unit n
    v0 = ds.vectors[0].double().numpy()
    rnd = np.random.default_rng(0).standard_normal((200, G.w_dim))
    rnd /= np.linalg.norm(rnd, axis=1, keepdims=True)
    assert np.linalg.norm(A @ v0) >= np.linalg.norm(A @ rnd.T, axis=0).max()
    # its edits go to the layers it was computed from unless told otherwise
    ws = random_codes(G)
    out = ds.apply(ws, 0, 1.0)
    changed = (out - ws).abs().sum(dim=(0, 2)) > 0
    assert changed.nonzero().flatten().tolist() == layers


def test_sefa_unnormalized_is_svd_of_stacked_weights(G):
    ds = sefa_directions(G, components=3, normalize=False)
    sd = G.state_dict()
    keys = [k for k in sd if k.endswith("modulation.weight") and "to_rgb" not in k]
    W = torch.cat([sd[k] for k in keys]).double()
    v = torch.linalg.svd(W, full_matrices=False).Vh[:3]
    cos = (v * ds.vectors.double()).sum(1).abs()
    assert float(cos.min()) > 0.9999


def test_rosinality_eigvec_file_and_native_round_trip(tmp_path, G):
    ds = sefa_directions(G, layers=[1, 2], components=4)
    torch.save({"ckpt": "g.pt", "eigvec": ds.vectors.t().contiguous()}, tmp_path / "factor.pt")
    read = load_directions(tmp_path / "factor.pt")
    assert read.method == "sefa" and len(read) == 4
    torch.testing.assert_close(read.vectors, ds.vectors)
    save_directions(ds, tmp_path / "sefa.safetensors")
    back = load_directions(tmp_path / "sefa.safetensors")
    assert back.layers == ds.layers and back.names == ds.names and back.method == "sefa"
    torch.testing.assert_close(back.vectors, ds.vectors, rtol=0, atol=0)
    torch.testing.assert_close(back.values, ds.values, rtol=0, atol=0)
    with pytest.raises(CycleEncodingError, match="safetensors"):
        save_any(ds, tmp_path / "sefa.pt")


def test_direction_set_validates_its_parts():
    with pytest.raises(ValueError, match="scales"):
        DirectionSet("ganspace", torch.zeros(3, 4), scales=torch.ones(2))
    with pytest.raises(ValueError, match="method"):
        DirectionSet("nope", torch.zeros(1, 4))


def test_info_describes_direction_and_classifier_files(tmp_path, G, capsys):
    from cycle_encoding.cli import main
    from cycle_encoding.editing import AttributeClassifier, ClassifierConfig, save_classifier

    save_directions(sefa_directions(G, layers=[0, 1, 2], components=3), tmp_path / "d.safetensors")
    save_classifier(AttributeClassifier(ClassifierConfig(input_size=16, widths=(4,))), tmp_path / "c.safetensors")
    assert main(["info", str(tmp_path / "d.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "editing directions" in out and "sefa" in out
    assert main(["info", str(tmp_path / "c.safetensors")]) == 0
    assert "attribute classifier" in capsys.readouterr().out
