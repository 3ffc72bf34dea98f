"""The editing direction files users own, each written here in its project's exact layout (layouts read from
e4e's editings/, PTI's editings/, InterFaceGAN's boundaries/ and rosinality's closed_form_factorization.py), read by
``load_directions`` and applied as that project applies it; wrong shapes and keys give one line naming the file."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from cycle_encoding.editing import load_directions
from cycle_encoding.editing.directions import ganspace_named_edits, named_edit_for
from cycle_encoding.editing.render import plan_edit
from cycle_encoding.errors import CycleEncodingError
from tests.layouts import rosinality_g_ema

W = 512  # the field's files are all 512-wide; tensors this small cost nothing


def codes(n_ws: int, batch: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, n_ws, W, generator=torch.Generator().manual_seed(seed))


def unit(*shape: int, seed: int = 1) -> torch.Tensor:
    v = torch.randn(*shape, generator=torch.Generator().manual_seed(seed))
    return v / v.norm(dim=-1, keepdim=True)


def saved_on_gpu(t: torch.Tensor, path: Path) -> Path:
    """``torch.save`` of a tensor whose storage was on 'cuda:0' (as e4e's pose.pt), written without a GPU: the
    pickled location string is rewritten (protocol 2 has no frame lengths)."""
    buf = io.BytesIO()
    torch.save(t, buf)
    zin = zipfile.ZipFile(io.BytesIO(buf.getvalue()))
    pkl = next(n for n in zin.namelist() if n.endswith("data.pkl"))
    data = zin.read(pkl)
    assert data.count(b"X\x03\x00\x00\x00cpu") == 1
    data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for n in zin.namelist():
            z.writestr(zin.getinfo(n), data if n == pkl else zin.read(n))
    return path


def one_line_naming(e: pytest.ExceptionInfo, path: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg, msg
    return msg


# ---------------------------------------------------------------------------------------------------------------
# InterFaceGAN directions: e4e's and PTI's .pt, InterFaceGAN's .npy


def test_e4e_interfacegan_pt_applies_as_e4e(tmp_path):
    """e4e editings/interfacegan_directions/{age,smile}.pt: a raw [1, 512] float tensor; e4e's edit is
    latent + factor * direction on every layer."""
    v = unit(1, W)
    torch.save(v, tmp_path / "age.pt")
    ds = load_directions(tmp_path / "age.pt")
    assert (ds.method, len(ds), ds.per_layer) == ("interfacegan", 1, False)
    ws = codes(18)
    for f in (-3.0, 2.0):
        torch.testing.assert_close(ds.apply(ws, 0, f), ws + f * v, rtol=0, atol=1e-6)


def test_e4e_pose_is_w_plus_and_was_saved_on_a_gpu(tmp_path):
    """e4e's pose.pt is [1, 18, 512] with its storage on cuda:0: it loads on a CPU-only machine, edits per layer, and
    refuses codes of another depth by a line naming the file."""
    v = unit(1, 18, W)
    path = saved_on_gpu(v, tmp_path / "pose.pt")
    with pytest.raises(RuntimeError, match="CUDA"):  # what a plain torch.load does here
        torch.load(path, weights_only=True)
    ds = load_directions(path)
    assert ds.per_layer and ds.num_ws == 18
    ws = codes(18)
    torch.testing.assert_close(ds.apply(ws, 0, 1.5), ws + 1.5 * v, rtol=0, atol=1e-6)
    with pytest.raises(CycleEncodingError) as e:
        ds.apply(codes(14), 0, 1.0)  # a 256-px generator's codes
    assert "18 layers" in one_line_naming(e, path)


def test_pti_direction_files_apply_as_pti(tmp_path):
    """PTI's editings/interfacegan_directions/{age,rotation,smile}.pt: [1, 512] tensors; PTI renders
    latent + (factor / 2) * direction."""
    v = unit(1, W, seed=4)
    torch.save(v, tmp_path / "rotation.pt")
    ds = load_directions(tmp_path / "rotation.pt")
    ws = codes(18, batch=1)
    for factor in (-5, 4):
        torch.testing.assert_close(ds.apply(ws, 0, factor / 2), ws + (factor / 2) * v, rtol=0, atol=1e-6)


def test_interfacegan_npy_boundary(tmp_path):
    """InterFaceGAN's boundaries/stylegan_ffhq_smile_w_boundary.npy: np.save of a float64 [1, 512] unit normal."""
    v = unit(1, W, seed=5).double().numpy()
    np.save(tmp_path / "stylegan_ffhq_smile_w_boundary.npy", v)
    ds = load_directions(tmp_path / "stylegan_ffhq_smile_w_boundary.npy")
    ws = codes(14)
    want = ws + 2.0 * torch.from_numpy(v).float()
    torch.testing.assert_close(ds.apply(ws, 0, 2.0), want, rtol=0, atol=1e-6)
    np.save(tmp_path / "bad.npy", np.zeros((2, 3, 4, 5)))
    with pytest.raises(CycleEncodingError) as e:
        load_directions(tmp_path / "bad.npy")
    assert "[2, 3, 4, 5]" in one_line_naming(e, tmp_path / "bad.npy")


# ---------------------------------------------------------------------------------------------------------------
# GANSpace: e4e's ffhq_pca.pt and its named edits


def e4e_pca_file(path: Path, k: int = 80, seed: int = 7) -> dict[str, torch.Tensor]:
    """A PCA dict in the layout of e4e's editings/ganspace_pca/ffhq_pca.pt: mean [1, 512], comp [K, 1, 512]
    (orthonormal rows), std [K] (decreasing)."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(W, k, generator=g))
    pca = {
        "mean": torch.randn(1, W, generator=g),
        "comp": q.t().contiguous()[:, None, :],
        "std": torch.linspace(3.0, 0.5, k),
    }
    torch.save(pca, path)
    return pca


def e4e_ganspace_edit(latent: torch.Tensor, pca: dict, edit: tuple[int, int, int, float]) -> torch.Tensor:
    """e4e's editings/ganspace.py, restated: the coordinate of layer 0's code along the component, in std units,
    is moved to `strength` on layers start..end-1."""
    idx, start, end, strength = edit
    centered = latent - pca["mean"]
    coord = torch.sum(centered[0].reshape(-1) * pca["comp"][idx].reshape(-1)) / pca["std"][idx]
    delta = (strength - coord) * pca["comp"][idx] * pca["std"][idx]
    out = latent.clone()
    out[start:end] += delta.repeat(end - start, 1)
    return out


def test_shipped_named_edits_table():
    table = ganspace_named_edits()
    assert {"eye_openness", "smile", "trimmed_beard", "white_hair", "lipstick"} <= set(table)
    eye = table["eye_openness"]
    assert eye.as_tuple() == (54, 7, 8, 20.0) and eye.layers == [7]
    assert table["white_hair"].layers == [7, 8, 9]
    assert all(0 <= e.start < e.end <= 18 and 0 <= e.component < 80 for e in table.values())


@pytest.mark.parametrize("name", ["eye_openness", "smile", "trimmed_beard", "white_hair", "lipstick"])
def test_ffhq_pca_named_edits_match_e4e(tmp_path, name):
    pca = e4e_pca_file(tmp_path / "ffhq_pca.pt")
    ds = load_directions(tmp_path / "ffhq_pca.pt")
    assert ds.method == "ganspace" and len(ds) == 80
    req = plan_edit(ds, name)
    edit = ganspace_named_edits()[name]
    assert req.mode == "set" and list(req.strengths) == [edit.strength] and req.tag == name
    ws = codes(18, batch=2)
    got = ds.apply(ws, req.component, req.strengths[0], req.layers, req.mode)
    for b in range(ws.shape[0]):
        want = e4e_ganspace_edit(ws[b], pca, edit.as_tuple())
        torch.testing.assert_close(got[b], want, rtol=0, atol=1e-4)
    # PTI varies the strength of a named edit: the strength given replaces the table's
    req = plan_edit(ds, name, strengths=[5.0])
    got = ds.apply(ws, req.component, 5.0, req.layers, req.mode)
    want = e4e_ganspace_edit(ws[0], pca, (edit.component, edit.start, edit.end, 5.0))
    torch.testing.assert_close(got[0], want, rtol=0, atol=1e-4)


def test_named_edits_need_a_large_enough_pca(tmp_path):
    e4e_pca_file(tmp_path / "small_pca.pt", k=20)
    ds = load_directions(tmp_path / "small_pca.pt")
    with pytest.raises(CycleEncodingError, match="component 54"):
        named_edit_for(ds, "eye_openness")
    torch.save(unit(1, W), tmp_path / "smile.pt")
    with pytest.raises(CycleEncodingError, match="GANSpace PCA file"):
        plan_edit(load_directions(tmp_path / "smile.pt"), "eye_openness")
    with pytest.raises(CycleEncodingError, match="eye_openness"):  # the error lists the named edits
        load_directions(tmp_path / "small_pca.pt").index("no_such_edit")


def test_bad_ganspace_dicts_are_one_line_naming_the_file(tmp_path):
    p = tmp_path / "pca.pt"
    torch.save({"comp": torch.zeros(3, 1, W), "std": torch.ones(3)}, p)
    with pytest.raises(CycleEncodingError) as e:
        load_directions(p)
    assert "'mean'" in one_line_naming(e, p)
    torch.save({"mean": torch.zeros(1, W), "comp": torch.zeros(3, 1, W), "std": torch.ones(4)}, p)
    with pytest.raises(CycleEncodingError) as e:
        load_directions(p)
    assert "4 values for 3 components" in one_line_naming(e, p)
    torch.save({"mean": torch.zeros(1, W), "comp": torch.zeros(3, 2, W), "std": torch.ones(3)}, p)
    with pytest.raises(CycleEncodingError) as e:
        load_directions(p)
    assert "[3, 2, 512]" in one_line_naming(e, p)


# ---------------------------------------------------------------------------------------------------------------
# rosinality's closed_form_factorization.py output (factor.pt)


def test_rosinality_factor_file_applies_as_apply_factor(tmp_path):
    """factor.pt as closed_form_factorization.py writes it: the g_ema modulation weights whose key holds
    'modulation' and 'weight' but not 'to_rgbs' (so to_rgb1's is in), stacked, and torch.svd's V [512, 512], whose
    columns are the directions; apply_factor.py adds degree * eigvec[:, index] to every layer's code."""
    sd = rosinality_g_ema(16, n_mlp=2, cm=1, seed=3)
    modulate = {k: v for k, v in sd.items() if "modulation" in k and "to_rgbs" not in k and "weight" in k}
    assert "to_rgb1.conv.modulation.weight" in modulate
    eigvec = torch.svd(torch.cat(list(modulate.values()), 0)).V
    torch.save({"ckpt": "stylegan2-ffhq-config-f.pt", "eigvec": eigvec}, tmp_path / "factor.pt")
    ds = load_directions(tmp_path / "factor.pt")
    assert ds.method == "sefa" and len(ds) == W and ds.layers is None
    ws = codes(6)
    for index, degree in ((0, 5.0), (3, -2.0)):
        torch.testing.assert_close(ds.apply(ws, index, degree), ws + degree * eigvec[:, index], rtol=0, atol=1e-5)
    torch.save({"ckpt": "g.pt", "eigvec": torch.zeros(2, W, W)}, tmp_path / "bad_factor.pt")
    with pytest.raises(CycleEncodingError) as e:
        load_directions(tmp_path / "bad_factor.pt")
    assert "eigvec" in one_line_naming(e, tmp_path / "bad_factor.pt")


def test_unknown_files_are_one_line_naming_the_file(tmp_path):
    p = tmp_path / "latent.pt"
    torch.save({"latents": torch.zeros(1, 18, W)}, p)
    with pytest.raises(CycleEncodingError) as e:
        load_directions(p)
    assert "no direction layout" in one_line_naming(e, p)
    with pytest.raises(CycleEncodingError) as e:
        load_directions(tmp_path / "missing.pt")
    one_line_naming(e, tmp_path / "missing.pt")
    (tmp_path / "notes.pt").write_text("not a torch file")
    with pytest.raises(CycleEncodingError) as e:
        load_directions(tmp_path / "notes.pt")
    one_line_naming(e, tmp_path / "notes.pt")
