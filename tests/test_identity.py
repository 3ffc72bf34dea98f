"""Identity networks: ArcFace IR-SE-50 (model_ir_se50.pth layout) and MoCo v2 ResNet-50 files written by the test in
the published layouts load strictly, wrong ones name the key; the forward passes equal functional re-computations;
the e4e crop/pool/normalize behaviour holds; the registry builds the dlib face network lazily."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cycle_encoding.checkpoints.inspect import inspect_file
from cycle_encoding.checkpoints.perception import load_arcface, read_arcface, read_moco
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.losses import (
    ArcFaceEmbedder,
    FeatureMapDistance,
    IdentitySimilarity,
    build_identity,
    build_perceptual,
    identity_names,
    register_identity,
    unregister_identity,
)
from cycle_encoding.networks.irse import IRSEBody, irse_unit_specs
from tests.conftest import StandInFaceEmbedder

# ---------------------------------------------------------------------------------------------------------------
# Published layouts, written out from FORMATS.md / torchvision (not from the project's modules)


def _bn(sd: dict, prefix: str, c: int, g: torch.Generator, tracked: bool = True) -> None:
    sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
    if tracked:
        sd[f"{prefix}.num_batches_tracked"] = torch.tensor(1000)


def _conv(o: int, i: int, k: int, g: torch.Generator, gain: float = 1.0) -> torch.Tensor:
    return torch.randn(o, i, k, k, generator=g) * gain * (2.0 / (i * k * k)) ** 0.5


def arcface_state_dict(seed: int = 0, tracked: bool = True) -> dict[str, torch.Tensor]:
    """``model_ir_se50.pth``: Backbone(112, 50, 'ir_se') of TreB1eN's ArcFace (FORMATS.md)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"input_layer.0.weight": _conv(64, 3, 3, g)}
    _bn(sd, "input_layer.1", 64, g, tracked)
    sd["input_layer.2.weight"] = torch.full((64,), 0.25)
    i, in_c = 0, 64
    for n_units, d in zip([3, 4, 14, 3], [64, 128, 256, 512]):
        for u in range(n_units):
            cin = in_c if u == 0 else d
            p = f"body.{i}.res_layer"
            _bn(sd, f"{p}.0", cin, g, tracked)
            sd[f"{p}.1.weight"] = _conv(d, cin, 3, g)
            sd[f"{p}.2.weight"] = torch.full((d,), 0.25)
            sd[f"{p}.3.weight"] = _conv(d, d, 3, g, 0.3)
            _bn(sd, f"{p}.4", d, g, tracked)
            sd[f"{p}.5.fc1.weight"] = _conv(d // 16, d, 1, g)
            sd[f"{p}.5.fc2.weight"] = _conv(d, d // 16, 1, g)
            if u == 0 and cin != d:
                sd[f"body.{i}.shortcut_layer.0.weight"] = _conv(d, cin, 1, g)
                _bn(sd, f"body.{i}.shortcut_layer.1", d, g, tracked)
            i += 1
        in_c = d
    _bn(sd, "output_layer.0", 512, g, tracked)
    sd["output_layer.3.weight"] = torch.randn(512, 512 * 7 * 7, generator=g) / (512 * 49) ** 0.5
    sd["output_layer.3.bias"] = 0.1 * torch.randn(512, generator=g)
    _bn(sd, "output_layer.4", 512, g, tracked)
    return sd


def resnet50_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """torchvision ResNet-50 keys and shapes (without fc)."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {"conv1.weight": _conv(64, 3, 7, g)}
    _bn(sd, "bn1", 64, g)
    in_c = 64
    for layer, (n_units, planes) in enumerate(zip([3, 4, 6, 3], [64, 128, 256, 512]), start=1):
        for u in range(n_units):
            p = f"layer{layer}.{u}"
            cin = in_c if u == 0 else planes * 4
            sd[f"{p}.conv1.weight"] = _conv(planes, cin, 1, g)
            _bn(sd, f"{p}.bn1", planes, g)
            sd[f"{p}.conv2.weight"] = _conv(planes, planes, 3, g)
            _bn(sd, f"{p}.bn2", planes, g)
            sd[f"{p}.conv3.weight"] = _conv(planes * 4, planes, 1, g, 0.3)
            _bn(sd, f"{p}.bn3", planes * 4, g)
            if u == 0:
                sd[f"{p}.downsample.0.weight"] = _conv(planes * 4, cin, 1, g)
                _bn(sd, f"{p}.downsample.1", planes * 4, g)
        in_c = planes * 4
    return sd


def shapes_only(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same keys and shapes stored as expanded views of one number: small files for the layout checks."""
    return {k: torch.zeros((), dtype=v.dtype).expand(v.shape) for k, v in sd.items()}


def moco_checkpoint(seed: int = 0) -> dict:
    """A MoCo v2 checkpoint: {'epoch', 'arch', 'state_dict': {'module.encoder_q.*' incl. the MLP head fc.0/fc.2}}."""
    sd = {f"module.encoder_q.{k}": v for k, v in resnet50_state_dict(seed).items()}
    sd["module.encoder_q.fc.0.weight"] = torch.zeros(2048, 2048)
    sd["module.encoder_q.fc.0.bias"] = torch.zeros(2048)
    sd["module.encoder_q.fc.2.weight"] = torch.zeros(128, 2048)
    sd["module.encoder_q.fc.2.bias"] = torch.zeros(128)
    return {"epoch": 800, "arch": "resnet50", "state_dict": sd}


# ---------------------------------------------------------------------------------------------------------------
# Functional forwards written from the published architectures


def _f_bn(x, sd, p):
    return F.batch_norm(
        x, sd[f"{p}.running_mean"], sd[f"{p}.running_var"], sd[f"{p}.weight"], sd[f"{p}.bias"], False, 0.0, 1e-5
    )


def functional_arcface(sd, x):
    """IR-SE-50 by hand: input layer, 24 units (res + shortcut), output layer, L2 normalization."""
    x = F.prelu(
        _f_bn(F.conv2d(x, sd["input_layer.0.weight"], padding=1), sd, "input_layer.1"), sd["input_layer.2.weight"]
    )
    strided = {0, 3, 7, 21}
    for i in range(24):
        s = 2 if i in strided else 1
        p = f"body.{i}.res_layer"
        r = _f_bn(x, sd, f"{p}.0")
        r = F.prelu(F.conv2d(r, sd[f"{p}.1.weight"], padding=1), sd[f"{p}.2.weight"])
        r = _f_bn(F.conv2d(r, sd[f"{p}.3.weight"], stride=s, padding=1), sd, f"{p}.4")
        se = torch.sigmoid(
            F.conv2d(F.relu(F.conv2d(r.mean((2, 3), keepdim=True), sd[f"{p}.5.fc1.weight"])), sd[f"{p}.5.fc2.weight"])
        )
        r = r * se
        if f"body.{i}.shortcut_layer.0.weight" in sd:
            sc = _f_bn(F.conv2d(x, sd[f"body.{i}.shortcut_layer.0.weight"], stride=s), sd, f"body.{i}.shortcut_layer.1")
        else:
            sc = x[:, :, ::s, ::s]  # MaxPool2d(1, stride) is a subsampling
        x = r + sc
    x = _f_bn(x, sd, "output_layer.0").flatten(1)
    x = _f_bn(F.linear(x, sd["output_layer.3.weight"], sd["output_layer.3.bias"]), sd, "output_layer.4")
    return x / x.norm(dim=1, keepdim=True)


def functional_resnet50_pooled(sd, x):
    x = F.relu(_f_bn(F.conv2d(x, sd["conv1.weight"], stride=2, padding=3), sd, "bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for layer, n_units in enumerate([3, 4, 6, 3], start=1):
        for u in range(n_units):
            p = f"layer{layer}.{u}"
            s = 2 if (u == 0 and layer > 1) else 1
            y = F.relu(_f_bn(F.conv2d(x, sd[f"{p}.conv1.weight"]), sd, f"{p}.bn1"))
            y = F.relu(_f_bn(F.conv2d(y, sd[f"{p}.conv2.weight"], stride=s, padding=1), sd, f"{p}.bn2"))
            y = _f_bn(F.conv2d(y, sd[f"{p}.conv3.weight"]), sd, f"{p}.bn3")
            idt = _f_bn(F.conv2d(x, sd[f"{p}.downsample.0.weight"], stride=s), sd, f"{p}.downsample.1") if u == 0 else x
            x = F.relu(y + idt)
    return x.mean((2, 3))


# ---------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def arcface_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("arcface") / "model_ir_se50.pth"
    torch.save(arcface_state_dict(), p)
    return p


def test_irse_specs_and_taps():
    specs = irse_unit_specs(50)
    assert len(specs) == 24
    assert [i for i, s in enumerate(specs) if s[2] == 2] == [0, 3, 7, 21]
    assert specs[0] == (64, 64, 2) and specs[3] == (64, 128, 2) and specs[23] == (512, 512, 1)
    body = IRSEBody(specs)
    assert body.block_last_units == [2, 6, 20, 23]
    small = IRSEBody(irse_unit_specs(widths=(16, 32, 48, 64), units=(1, 2, 2, 1)))
    assert small.block_last_units == [0, 2, 4, 5]
    feats = small.forward_taps(torch.randn(1, 16, 32, 32), [2, 4, 5])
    assert [tuple(f.shape[1:]) for f in feats] == [(32, 8, 8), (48, 4, 4), (64, 2, 2)]


def test_arcface_file_loads_strict_and_matches_the_architecture(arcface_file):
    cfg, _ = read_arcface(arcface_file)
    assert cfg == {"input_size": 112, "num_layers": 50, "mode": "ir_se", "affine": True}
    model = load_arcface(arcface_file)
    raw = torch.load(arcface_file, weights_only=True)
    assert set(model.state_dict()) == set(raw)
    # shortcut convolutions exist exactly in units 3, 7, 21 (the others are parameter-free max-pools)
    assert sorted({k.split(".")[1] for k in raw if "shortcut_layer" in k}, key=int) == ["3", "7", "21"]
    x = torch.rand(1, 3, 112, 112, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        got, want = model(x), functional_arcface(raw, x)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert torch.allclose(got.norm(dim=1), torch.ones(1), atol=1e-5)
    info = inspect_file(arcface_file)
    assert info["format"] == "arcface" and info["architecture"]["num_layers"] == 50


def test_arcface_old_file_and_wrong_files(tmp_path):
    old = shapes_only(arcface_state_dict(tracked=False))  # old files lack num_batches_tracked
    torch.save(old, tmp_path / "old.pth")
    assert read_arcface(tmp_path / "old.pth")[0]["mode"] == "ir_se"
    bad = dict(old)
    bad["body.5.res_layer.5.fc1.weight"] = torch.zeros(4, 128, 1, 1)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(
        CheckpointError,
        match=r"body\.5\.res_layer\.5\.fc1\.weight has shape \[4, 128, 1, 1\], expected \[8, 128, 1, 1\]",
    ):
        read_arcface(tmp_path / "shape.pth")
    bad = dict(old)
    bad["body.12.res_layer.3.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(bad, tmp_path / "shape2.pth")
    with pytest.raises(
        CheckpointError,
        match=r"body\.12\.res_layer\.3\.weight has shape \[256, 256, 1, 1\], expected \[256, 256, 3, 3\]",
    ):
        read_arcface(tmp_path / "shape2.pth")
    bad = dict(old)
    del bad["body.7.shortcut_layer.0.weight"]
    torch.save(bad, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key body\.7\.shortcut_layer\.0\.weight"):
        read_arcface(tmp_path / "missing.pth")
    bad = {**old, "body.2.shortcut_layer.0.weight": torch.zeros(64, 64, 1, 1)}
    torch.save(bad, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key body\.2\.shortcut_layer\.0\.weight"):
        read_arcface(tmp_path / "extra.pth")


class TinyFaceBackbone(nn.Module):
    """Stands in for IR-SE-50 behind ArcFaceEmbedder (same input_size and output contract), to keep the test fast."""

    input_size = 112

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 4, stride=4)
        self.fc = nn.Linear(8 * 28 * 28, 512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-2:] == (112, 112)
        return F.normalize(self.fc(torch.tanh(self.conv(x)).flatten(1)), dim=1)


def test_arcface_identity_crop_pool_normalize(tmp_path):
    p = tmp_path / "model_ir_se50.pth"
    torch.save(shapes_only(arcface_state_dict()), p)
    sim = build_identity("arcface", "cpu", p)
    assert sim.name == "arcface-ir-se50 (model_ir_se50.pth)" and isinstance(sim.embedder, ArcFaceEmbedder)
    emb = ArcFaceEmbedder(TinyFaceBackbone())
    g = torch.Generator().manual_seed(5)
    x = (torch.rand(1, 3, 256, 256, generator=g) * 2 - 1).requires_grad_(True)
    e = emb.embed(x)
    assert e.shape == (1, 512) and abs(float(e.detach().norm()) - 1) < 1e-5
    # what the embedding depends on is exactly the crop [35:223, 32:220] of the 256 image
    (grad,) = torch.autograd.grad((e * torch.randn(1, 512, generator=g)).sum(), x)
    rows = grad.abs().sum(dim=(0, 1, 3)).nonzero().flatten()
    cols = grad.abs().sum(dim=(0, 1, 2)).nonzero().flatten()
    assert (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1) == (35, 223, 32, 220)
    with torch.no_grad():
        # the crop is average-pooled to 112: 188 -> 112 adaptive bins, written out with their bounds
        crop = x[0, :, 35:223, 32:220]
        starts = [(i * 188) // 112 for i in range(112)]
        ends = [-((-(i + 1) * 188) // 112) for i in range(112)]
        pooled = torch.stack(
            [
                torch.stack([crop[:, a:b, c:d].mean((1, 2)) for c, d in zip(starts, ends)], -1)
                for a, b in zip(starts, ends)
            ],
            -2,
        )
        torch.testing.assert_close(emb.crop(x)[0], pooled)
        # a larger image is pooled to 256 first: a 512 image embeds as its 2x2 average
        big = F.interpolate(x.detach(), scale_factor=2, mode="nearest") + 0.05 * torch.randn(
            1, 3, 512, 512, generator=g
        )
        torch.testing.assert_close(emb.embed(big), emb.embed(F.avg_pool2d(big, 2)), rtol=1e-4, atol=1e-5)
        # grey images are repeated to three channels
        torch.testing.assert_close(emb.embed(x[:, :1]), emb.embed(x[:, :1].expand(-1, 3, -1, -1)))


def test_moco_reader_and_similarity(tmp_path):
    ckpt = moco_checkpoint()
    p = tmp_path / "moco_v2_800ep_pretrain.pth.tar"
    torch.save(ckpt, p)
    sd = read_moco(p)
    assert "fc.0.weight" not in sd and "conv1.weight" in sd and len(sd) == len(resnet50_state_dict())
    sim = build_identity("moco", "cpu", p)
    assert sim.name == "moco-v2-resnet50 (moco_v2_800ep_pretrain.pth.tar)"
    g = torch.Generator().manual_seed(6)
    x = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    raw = resnet50_state_dict()
    with torch.no_grad():
        e = sim.embed(x)
        # e4e: F.interpolate(x, size=224) (nearest), ResNet-50 pooled features, L2-normalized
        want = F.normalize(functional_resnet50_pooled(raw, F.interpolate(x, size=224)), dim=1)
    assert e.shape == (1, 2048)
    torch.testing.assert_close(e, want, rtol=1e-4, atol=1e-5)
    info = inspect_file(p)
    assert info["format"] == "moco"


def test_moco_wrong_files_name_the_key(tmp_path):
    ckpt = moco_checkpoint()
    ckpt["state_dict"] = shapes_only(ckpt["state_dict"])
    ckpt["state_dict"]["module.encoder_q.layer3.2.conv2.weight"] = torch.zeros(256, 256, 1, 1)
    torch.save(ckpt, tmp_path / "bad.pth")
    with pytest.raises(
        CheckpointError, match=r"layer3\.2\.conv2\.weight has shape \[256, 256, 1, 1\], expected \[256, 256, 3, 3\]"
    ):
        read_moco(tmp_path / "bad.pth")
    ckpt = {"state_dict": shapes_only(moco_checkpoint()["state_dict"])}
    del ckpt["state_dict"]["module.encoder_q.layer4.0.downsample.1.running_var"]
    torch.save(ckpt, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key layer4\.0\.downsample\.1\.running_var"):
        read_moco(tmp_path / "missing.pth")
    torch.save({"state_dict": {"encoder.conv1.weight": torch.zeros(1)}}, tmp_path / "other.pth")
    with pytest.raises(CheckpointError, match=r"no module\.encoder_q\.\* keys"):
        read_moco(tmp_path / "other.pth")


def test_identity_needs_its_file():
    assert {"arcface", "moco", "dlib-face"} <= set(identity_names())
    with pytest.raises(CycleEncodingError, match=r"model_ir_se50\.pth.*--identity-weights"):
        build_identity("arcface", "cpu")
    with pytest.raises(CycleEncodingError, match=r"moco_v2_800ep_pretrain"):
        build_identity("moco", "cpu")


# ---------------------------------------------------------------------------------------------------------------
# dlib-face through the registries, with a stand-in of the embedder's interface


def test_dlib_face_names_use_the_embedder(stand_in_dlib):
    sim = build_identity("dlib-face", "cpu")
    assert sim.name == "dlib-resnet-face"
    ref = StandInFaceEmbedder()
    g = torch.Generator().manual_seed(7)
    x = (torch.rand(3, 3, 32, 32, generator=g) * 2 - 1).requires_grad_(True)
    y = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    s = sim(x, y)
    torch.testing.assert_close(s, F.cosine_similarity(ref.embed(x), ref.embed(y)), rtol=1e-5, atol=1e-6)
    (1 - s).sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0

    dist = build_perceptual("dlib-face", "cpu")
    assert dist.name == "dlib-face (feature maps of dlib-resnet-face)"
    assert isinstance(dist, FeatureMapDistance)
    with torch.no_grad():
        want = torch.zeros(3)
        for fx, fy in zip(ref.features(x), ref.features(y)):
            nx = fx / (fx.norm(dim=1, keepdim=True) + 1e-10)
            ny = fy / (fy.norm(dim=1, keepdim=True) + 1e-10)
            want += ((nx - ny) ** 2).sum(1).mean((1, 2))
        torch.testing.assert_close(dist(x, y), want, rtol=1e-5, atol=1e-6)
        assert torch.equal(dist(y, y), torch.zeros(3))
    with pytest.raises(CycleEncodingError, match="takes no weights file"):
        build_identity("dlib-face", "cpu", "some.pth")


def test_identity_registry_accepts_new_names():
    register_identity("test-mean", lambda device, weights: IdentitySimilarity(_MeanEmbedder()), "test only")
    try:
        sim = build_identity("test-mean", "cpu")
        assert sim.name == "mean-colour" and "test-mean" in identity_names()
        with pytest.raises(ValueError, match="already registered"):
            register_identity("test-mean", lambda device, weights: None)
    finally:
        unregister_identity("test-mean")
    with pytest.raises(CycleEncodingError, match="unknown identity network 'test-mean'"):
        build_identity("test-mean", "cpu")


class _MeanEmbedder(nn.Module):
    name = "mean-colour"

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean((2, 3))
