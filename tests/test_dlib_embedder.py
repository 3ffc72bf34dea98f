"""The dlib ResNet face embedder: the TF.js reader against the quantization formula, the layer semantics against
an independent NumPy re-computation of face-api's TF.js code, the conversion round trip (bit-exact), gradients,
and, with the real weights and photos from the registries, agreement with dlib's own descriptor and identity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from numpy.lib.stride_tricks import sliding_window_view

from cycle_encoding.checkpoints import face_api as fa
from cycle_encoding.checkpoints.native import read_native, save_native
from cycle_encoding.cli import main
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.networks import dlib_resnet as dr
from tests import assets

# -- a face-api weights file written from face-api's own description (src/faceRecognitionNet/extractParams.ts) --


def _face_api_layers() -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every weight of face-api's face recognition net, in the file's order."""
    out: list[tuple[str, tuple[int, ...]]] = []

    def conv(prefix: str, k: int, cin: int, cout: int) -> None:
        out.extend(
            [
                (f"{prefix}/conv/filters", (k, k, cin, cout)),
                (f"{prefix}/conv/bias", (cout,)),
                (f"{prefix}/scale/weights", (cout,)),
                (f"{prefix}/scale/biases", (cout,)),
            ]
        )

    conv("conv32_down", 7, 3, 32)
    spec = [
        ("conv32_1", 32, 32), ("conv32_2", 32, 32), ("conv32_3", 32, 32),
        ("conv64_down", 32, 64), ("conv64_1", 64, 64), ("conv64_2", 64, 64), ("conv64_3", 64, 64),
        ("conv128_down", 64, 128), ("conv128_1", 128, 128), ("conv128_2", 128, 128),
        ("conv256_down", 128, 256), ("conv256_1", 256, 256), ("conv256_2", 256, 256),
        ("conv256_down_out", 256, 256),
    ]  # fmt: skip
    for name, cin, cout in spec:
        conv(f"{name}/conv1", 3, cin, cout)
        conv(f"{name}/conv2", 3, cout, cout)
    out.append(("fc", (256, 128)))
    return out


def write_face_api_model(folder, seed: int = 0, shards: int = 2) -> tuple:
    """Write a random model in face-api's TF.js layout: most weights uint8-quantized, the conv64 filters plain
    float32 (as in the real file), one uint16; returns (manifest path, {name: float32 values})."""
    rng = np.random.default_rng(seed)
    specs, values, blobs = [], {}, []
    for name, shape in _face_api_layers():
        n = int(np.prod(shape))
        fan_in = np.prod(shape[:-1]) if len(shape) == 4 else 256
        spec = {"name": name, "shape": list(shape), "dtype": "float32"}
        if name.startswith("conv64") and name.endswith("filters"):
            v = (rng.standard_normal(n) * np.sqrt(2 / fan_in)).astype(np.float32)
            blobs.append(v.astype("<f4").tobytes())
        else:
            qd = "uint16" if name == "conv32_1/conv1/scale/weights" else "uint8"
            top = 65535 if qd == "uint16" else 255
            q = rng.integers(0, top + 1, n)
            if name.endswith("filters") or name == "fc":  # He-uniform: activations keep their scale
                lo, span = -np.sqrt(6 / fan_in), 2 * np.sqrt(6 / fan_in)
            elif name.endswith("scale/weights"):
                lo, span = 0.5, 1.0
            else:
                lo, span = -0.2, 0.4
            scale = span / top
            spec["quantization"] = {"dtype": qd, "scale": scale, "min": lo}
            v = (q.astype(np.float64) * scale + lo).astype(np.float32)  # the formula, written out here
            blobs.append(q.astype("<u2" if qd == "uint16" else "u1").tobytes())
        values[name] = v.reshape(shape)
        specs.append(spec)
    data = b"".join(blobs)
    cut = [len(data) * i // shards for i in range(shards + 1)]
    paths = []
    for i in range(shards):
        p = folder / f"face_recognition_model-shard{i + 1}"
        p.write_bytes(data[cut[i] : cut[i + 1]])
        paths.append(p.name)
    manifest = folder / fa.MANIFEST_NAME
    manifest.write_text(json.dumps([{"weights": specs, "paths": paths}]))
    return manifest, values


def tf_conv(x: np.ndarray, f: np.ndarray, stride: int, same: bool) -> np.ndarray:
    """TF conv2d on one image [C, H, W] with an HWIO filter; 'same' = symmetric padding for stride 1, odd k."""
    k = f.shape[0]
    if same:
        x = np.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2)))
    win = sliding_window_view(x, (k, k), axis=(1, 2))[:, ::stride, ::stride]
    return np.einsum("cijhw,hwco->oij", win.astype(np.float64), f.astype(np.float64))


def face_api_conv_layer(x, w, prefix, stride, same, relu):
    """face-api convLayer: conv + bias, then scale layer (x * weights + biases), optional ReLU."""
    out = tf_conv(x, w[f"{prefix}/conv/filters"], stride, same) + w[f"{prefix}/conv/bias"][:, None, None]
    out = out * w[f"{prefix}/scale/weights"][:, None, None] + w[f"{prefix}/scale/biases"][:, None, None]
    return np.maximum(out, 0) if relu else out


def face_api_residual_down(x, w, prefix):
    """face-api residualDown (src/faceRecognitionNet/residualLayer.ts), in NumPy."""
    out = face_api_conv_layer(x, w, f"{prefix}/conv1", 2, False, True)
    out = face_api_conv_layer(out, w, f"{prefix}/conv2", 1, True, False)
    c, h, wd = x.shape
    pooled = x[:, : h // 2 * 2, : wd // 2 * 2].reshape(c, h // 2, 2, wd // 2, 2).mean(axis=(2, 4))
    if pooled.shape[1:] != out.shape[1:]:  # isAdjustShape: one zero row and column at the bottom/right
        out = np.pad(out, ((0, 0), (0, 1), (0, 1)))
    if pooled.shape[0] != out.shape[0]:  # isPad: zero channels appended to the shortcut
        pooled = np.concatenate([pooled, np.zeros_like(pooled)], axis=0)
    return np.maximum(out + pooled, 0)


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    folder = tmp_path_factory.mktemp("face_api")
    manifest, values = write_face_api_model(folder)
    return manifest, values


# -- tests without downloaded files --------------------------------------------------------------------------


def test_tfjs_reader_applies_the_quantization_formula(synthetic):
    manifest, values = synthetic
    got = fa.read_tfjs_weights(manifest)
    assert set(got) == set(values)
    for name, v in values.items():
        assert got[name].dtype == np.float32 and got[name].shape == v.shape
        assert np.array_equal(got[name], v), name


def test_tfjs_reader_refuses_truncated_and_oversized_shards(synthetic, tmp_path):
    manifest, _ = synthetic
    spec = json.loads(manifest.read_text())
    data = b"".join((manifest.parent / p).read_bytes() for p in spec[0]["paths"])
    (tmp_path / "w.bin").write_bytes(data[:-10])
    spec[0]["paths"] = ["w.bin"]
    (tmp_path / "m.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError, match="end early"):
        fa.read_tfjs_weights(tmp_path / "m.json")
    (tmp_path / "w.bin").write_bytes(data + b"\0" * 4)
    with pytest.raises(CheckpointError, match="left over"):
        fa.read_tfjs_weights(tmp_path / "m.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="manifest"):
        fa.read_tfjs_weights(tmp_path / "bad.json")


def test_layers_match_face_api_semantics(synthetic):
    """Stem, a plain residual unit, the shape-adjusting down units and fc against NumPy versions of face-api."""
    manifest, w = synthetic
    emb = fa.load_dlib_face_embedder("cpu", path=manifest)
    net = emb.net.double()
    rng = np.random.default_rng(1)
    with torch.no_grad():
        x = rng.standard_normal((3, 23, 23))
        got = net.stem(torch.from_numpy(x)[None])[0].numpy()
        assert np.allclose(got, face_api_conv_layer(x, w, "conv32_down", 2, False, False), atol=1e-9)

        x = np.maximum(rng.standard_normal((32, 9, 9)), 0)
        want = face_api_conv_layer(x, w, "conv32_2/conv1", 1, True, True)
        want = np.maximum(face_api_conv_layer(want, w, "conv32_2/conv2", 1, True, False) + x, 0)
        assert np.allclose(net.stages[0][1](torch.from_numpy(x)[None])[0].numpy(), want, atol=1e-9)

        # 8x8 -> conv 3x3 (valid, stride 2) 3x3 vs pool 4x4: the zero row/column case; 32 -> 64 channels
        for hw, stage, prefix in ((8, 1, "conv64_down"), (4, 4, "conv256_down_out"), (17, 2, "conv128_down")):
            cin = {1: 32, 2: 64, 4: 256}[stage]
            x = np.maximum(rng.standard_normal((cin, hw, hw)), 0)
            got = net.stages[stage][0](torch.from_numpy(x)[None])[0].numpy()
            assert np.allclose(got, face_api_residual_down(x, w, prefix), atol=1e-9), prefix

        f = rng.standard_normal((2, 256))
        assert np.allclose(net.fc(torch.from_numpy(f)).numpy(), f @ w["fc"].astype(np.float64), atol=1e-9)


def test_feature_shapes_and_embedding_from_last_map(synthetic):
    manifest, _ = synthetic
    emb = fa.load_dlib_face_embedder("cpu", path=manifest, layout="chip")
    x = torch.rand(2, 3, 150, 150) * 2 - 1
    with torch.no_grad():
        feats = emb.features(x)
        assert [tuple(f.shape[1:]) for f in feats] == [
            (32, 35, 35),
            (64, 17, 17),
            (128, 8, 8),
            (256, 4, 4),
            (256, 2, 2),
        ]
        e = emb.embed(x)
        assert e.shape == (2, 128) and emb.name == "dlib-resnet-face"
        assert torch.allclose(e, emb.net.fc(feats[-1].mean(dim=(2, 3))), atol=1e-6)
        assert torch.allclose(e, emb.embed_chips(x), atol=1e-6)
        # the input normalization is dlib's: (pixel - mean) / 256
        px = (x + 1) * 127.5
        want = (px - torch.tensor(dr.MEAN_RGB).view(1, 3, 1, 1)) / 256
        assert torch.allclose(emb.normalize_chips(x), want, atol=1e-6)
        # any size and grey images go through embed; embed_chips insists on 150x150 chips
        assert emb.embed(torch.zeros(1, 1, 97, 61)).shape == (1, 128)
        assert emb.embed(torch.zeros(1, 3, 256, 256), layout="ffhq").shape == (1, 128)
    with pytest.raises(CycleEncodingError, match="embed_chips expects"):
        emb.embed_chips(torch.zeros(1, 3, 128, 128))
    with pytest.raises(CycleEncodingError, match="channels"):
        emb.embed(torch.zeros(1, 4, 150, 150))
    with pytest.raises(CycleEncodingError, match="layout"):
        emb.embed(x, layout="nope")


def test_ffhq_layout_crops_the_chip_box():
    x = torch.arange(256.0).view(1, 1, 1, 256).expand(1, 3, 256, 256) / 128 - 1  # value = column index
    chip = dr.crop_resize(x, dr.FFHQ_CHIP_BOX, 150)
    assert chip.shape == (1, 3, 150, 150)
    cols = (chip[0, 0, 0] + 1) * 128  # sampled column positions in the 256 image
    left, right = dr.FFHQ_CHIP_BOX[0] * 256, dr.FFHQ_CHIP_BOX[2] * 256
    step = (right - left) / 150
    assert cols[0].item() == pytest.approx(left + step / 2 - 0.5, abs=1.0)
    assert cols[-1].item() == pytest.approx(right - step / 2 - 0.5, abs=1.0)


def test_conversion_round_trip_is_bit_exact(synthetic, tmp_path):
    manifest, values = synthetic
    out = fa.convert_face_api_weights(manifest, tmp_path / "emb.safetensors")
    nf = read_native(out)
    assert nf.kind == "face_embedder" and nf.config["architecture"] == "dlib-resnet-face"
    assert nf.provenance["source_sha256"][fa.MANIFEST_NAME]
    sd = fa.tfjs_to_state_dict(fa.read_tfjs_weights(manifest))
    assert set(nf.tensors) == set(sd)
    for k, v in sd.items():
        assert nf.tensors[k].dtype == torch.float32 and torch.equal(nf.tensors[k], v), k
    # the stored values are the quantization formula's, in face-api's layout transposed to torch's
    assert torch.equal(
        nf.tensors["stem.conv.weight"], torch.from_numpy(values["conv32_down/conv/filters"]).permute(3, 2, 0, 1)
    )
    assert torch.equal(nf.tensors["fc.weight"], torch.from_numpy(values["fc"]).T)
    a = fa.load_dlib_face_embedder("cpu", path=out)
    b = fa.load_dlib_face_embedder("cpu", path=manifest)
    x = torch.rand(1, 3, 150, 150) * 2 - 1
    with torch.no_grad():
        assert torch.equal(a.embed_chips(x), b.embed_chips(x))
    # and once more through save_native: the same bytes come back
    save_native(tmp_path / "again.safetensors", "face_embedder", nf.config, nf.tensors, nf.provenance)
    again = read_native(tmp_path / "again.safetensors")
    assert all(torch.equal(again.tensors[k], v) for k, v in nf.tensors.items())


def test_wrong_files_get_clear_errors(synthetic, tmp_path):
    manifest, _ = synthetic
    sd = fa.tfjs_to_state_dict(fa.read_tfjs_weights(manifest))
    save_native(tmp_path / "g.safetensors", "generator", {}, {"x": torch.zeros(1)})
    with pytest.raises(CheckpointError, match="not a face embedder"):
        fa.load_dlib_face_embedder(path=tmp_path / "g.safetensors")
    bad = dict(sd)
    bad["stages.2.1.conv2.conv.weight"] = torch.zeros(128, 128, 1, 1)
    save_native(tmp_path / "b.safetensors", "face_embedder", {"architecture": "dlib-resnet-face"}, bad)
    with pytest.raises(CheckpointError, match=r"stages\.2\.1\.conv2\.conv\.weight"):
        fa.load_dlib_face_embedder(path=tmp_path / "b.safetensors")
    spec = json.loads(manifest.read_text())
    spec[0]["weights"] = [w for w in spec[0]["weights"] if w["name"] != "fc"]
    (manifest.parent / "nofc.json").write_text(json.dumps(spec))
    with pytest.raises(CheckpointError):
        fa.load_dlib_face_embedder(path=manifest.parent / "nofc.json")


def test_missing_weights_say_how_to_fetch(tmp_path, monkeypatch):
    monkeypatch.setenv("CYCLE_ENCODING_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(CycleEncodingError, match=r"fetch_assets\.sh"):
        fa.load_dlib_face_embedder("cpu")


def test_converts_from_cached_npm_files_once(synthetic, tmp_path, monkeypatch):
    manifest, _ = synthetic
    monkeypatch.setenv("CYCLE_ENCODING_CACHE", str(tmp_path))
    model = tmp_path / "face-api" / "model"
    model.mkdir(parents=True)
    spec = json.loads(manifest.read_text())
    for p in spec[0]["paths"]:
        (model / p).write_bytes((manifest.parent / p).read_bytes())
    (model / fa.MANIFEST_NAME).write_text(manifest.read_text())
    emb = fa.load_dlib_face_embedder("cpu")
    converted = tmp_path / "models" / fa.NATIVE_NAME
    assert converted.is_file() and read_native(converted).kind == "face_embedder"
    assert all(not p.requires_grad for p in emb.parameters()) and not emb.training
    for p in spec[0]["paths"]:
        (model / p).unlink()  # from now on the converted file alone suffices
    emb2 = fa.load_dlib_face_embedder("cpu")
    x = torch.rand(1, 3, 150, 150) * 2 - 1
    with torch.no_grad():
        assert torch.equal(emb.embed_chips(x), emb2.embed_chips(x))


def test_gradients_flow_to_the_input(synthetic):
    """Differentiable: the analytic directional derivative equals a central finite difference (float64)."""
    manifest, _ = synthetic
    emb = fa.load_dlib_face_embedder("cpu", path=manifest).double()
    torch.manual_seed(0)
    x = (torch.rand(1, 3, 96, 96, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    target = torch.randn(1, 128, dtype=torch.float64)

    def loss(inp: torch.Tensor) -> torch.Tensor:
        e = emb.embed(inp)  # the FFHQ crop + resize + network
        return (
            1
            - torch.nn.functional.cosine_similarity(e, target).sum()
            + sum(f.square().mean() for f in emb.features(inp))
        )

    (g,) = torch.autograd.grad(loss(x), x)
    assert torch.isfinite(g).all() and g.abs().sum() > 0
    v = torch.randn_like(x)
    eps = 1e-7  # small enough that no ReLU/max-pool kink is crossed (upsampled inputs have near-ties)
    with torch.no_grad():
        fd = (loss(x + eps * v) - loss(x - eps * v)) / (2 * eps)
    assert (g * v).sum().item() == pytest.approx(fd.item(), rel=1e-5)
    assert all(p.grad is None for p in emb.parameters())


def test_info_describes_the_converted_file(synthetic, tmp_path, capsys):
    manifest, _ = synthetic
    out = fa.convert_face_api_weights(manifest, tmp_path / "emb.safetensors")
    assert main(["info", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dlib-resnet-face" in printed and "5,614,592" in printed


# -- with the real weights and photos (fetched into the cache by scripts/fetch_assets.sh) ---------------------


def test_real_weights_read_and_round_trip(tmp_path):
    manifest, _ = assets.assets(assets.FACE_API_MODEL)
    w = fa.read_tfjs_weights(manifest)
    assert sum(v.size for v in w.values()) == 5_614_592  # dlib_face_recognition_resnet_model_v1's weights
    out = fa.convert_face_api_weights(manifest, tmp_path / "emb.safetensors")
    sd = fa.tfjs_to_state_dict(w)
    nf = read_native(out)
    assert all(torch.equal(nf.tensors[k], v) for k, v in sd.items())


def _reference_faces(limit_per_photo: int = 2):
    """(photo, faces) for the four face-recognition photos and two demo photos (largest faces)."""
    photos = assets.assets(assets.TEST_IMAGES[:4]) + assets.assets(assets.DEMO_PHOTOS[2:4])
    out = []
    for p in photos:
        img, faces = assets.detect(p)
        out += [(img, f) for f in faces[:limit_per_photo] if f.box[2] - f.box[0] >= 150]
    return out


def test_port_agrees_with_dlib_descriptor():
    """Same chips through dlib's own network (full precision) and the port (uint8-quantized weights)."""
    dlib = assets.require_dlib()
    rec = dlib.face_recognition_model_v1(str(assets.asset(assets.DLIB_RECOGNITION)))
    sp = assets.predictor68()
    emb = assets.load_embedder()
    from cycle_encoding.data.face_chips import extract_face_chips

    cos_chip, cos_torch_chip = [], []
    for img, f in _reference_faces():
        shape = sp(img, dlib.rectangle(*f.box))
        chip = dlib.get_face_chip(img, shape, size=150, padding=0.25)
        ref = np.array(rec.compute_face_descriptor(chip))
        ref_photo = np.array(rec.compute_face_descriptor(img, shape, 0, 0.25))
        with torch.no_grad():
            ours = emb.embed_chips(assets.to_tensor(chip)[None])[0].numpy()
            ours_t = emb.embed_chips(extract_face_chips(assets.to_tensor(img), [f.landmarks]))[0].numpy()
        cos_chip.append(ours @ ref / np.linalg.norm(ours) / np.linalg.norm(ref))
        cos_torch_chip.append(ours_t @ ref_photo / np.linalg.norm(ours_t) / np.linalg.norm(ref_photo))
    assert len(cos_chip) >= 6
    assert min(cos_chip) >= 0.999, cos_chip
    assert min(cos_torch_chip) >= 0.999, cos_torch_chip


def test_ffhq_layout_agrees_with_dlib_better_than_resizing():
    """embed() on 256 FFHQ-aligned faces (fixed chip box) vs dlib's descriptor of the original photo."""
    dlib = assets.require_dlib()
    rec = dlib.face_recognition_model_v1(str(assets.asset(assets.DLIB_RECOGNITION)))
    sp = assets.predictor68()
    emb = assets.load_embedder()
    from cycle_encoding.data.align import align_face

    refs, aligned = [], []
    for img, f in _reference_faces():
        refs.append(np.array(rec.compute_face_descriptor(img, sp(img, dlib.rectangle(*f.box)), 0, 0.25)))
        aligned.append(assets.to_tensor(np.asarray(align_face(img, f.landmarks, size=256).image)))
    x, ref = torch.stack(aligned), np.stack(refs)
    with torch.no_grad():
        box = emb.embed(x).numpy()
        whole = emb.embed(x, layout="chip").numpy()

    def cos(a):
        return (a * ref).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(ref, axis=1)

    assert cos(box).mean() >= 0.99 and cos(box).min() >= 0.98, cos(box)
    assert cos(box).mean() > cos(whole).mean() + 0.05


def test_same_person_closer_than_other_person():
    """obama, obama2, obama3 vs biden, FFHQ-aligned at 256: every same-person cosine beats every other-person one,
    and dlib's Euclidean threshold 0.6 separates them."""
    emb = assets.load_embedder()
    from cycle_encoding.data.align import align_face

    photos = assets.assets(assets.TEST_IMAGES[:4])  # obama, obama2, obama3, biden
    crops = []
    for p in photos:
        img, faces = assets.detect(p)
        assert faces, f"no face found in {p.name}"
        crops.append(assets.to_tensor(np.asarray(align_face(img, faces[0].landmarks, size=256).image)))
    with torch.no_grad():
        e = emb.embed(torch.stack(crops))
    en = torch.nn.functional.normalize(e, dim=1)
    cos = en @ en.T
    same = [cos[i, j].item() for i in range(3) for j in range(i + 1, 3)]
    other = [cos[i, 3].item() for i in range(3)]
    assert min(same) > max(other), (same, other)
    dist = torch.cdist(e, e)
    assert max(dist[i, j].item() for i in range(3) for j in range(i + 1, 3)) < 0.6
    assert min(dist[i, 3].item() for i in range(3)) > 0.6


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")
def test_embedder_and_chips_on_cuda_match_cpu(synthetic):
    from cycle_encoding.data.face_chips import extract_face_chip, face_chip_details

    manifest, _ = synthetic
    cpu = fa.load_dlib_face_embedder("cpu", path=manifest)
    gpu = fa.load_dlib_face_embedder("cuda", path=manifest)
    x = torch.rand(2, 3, 256, 256) * 2 - 1
    with torch.no_grad():
        a, b = gpu.embed(x.cuda()).cpu(), cpu.embed(x)  # cuDNN may use TF32: compare directions and norms
        assert torch.nn.functional.cosine_similarity(a, b).min() > 0.9999
        assert torch.allclose(a.norm(dim=1), b.norm(dim=1), rtol=1e-2)
    lm = np.array([[80.0, 100.0], [100.0, 100.0], [150.0, 100.0], [170.0, 100.0], [125.0, 160.0]])
    d = face_chip_details(lm)
    img = torch.round(torch.rand(3, 256, 256) * 255) / 127.5 - 1
    assert torch.allclose(extract_face_chip(img.cuda(), d).cpu(), extract_face_chip(img, d), atol=1e-5)
