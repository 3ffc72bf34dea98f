"""LPIPS: torchvision-layout backbones load strictly, heads come from the lpips package, the distance equals an
independent computation of the formula (functional backbone + numpy), and LPIPS without a backbone is a clear error."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cycle_encoding.checkpoints.inspect import inspect_file
from cycle_encoding.checkpoints.perception import (
    load_lpips,
    lpips_heads_path,
    read_lpips_heads,
    read_torchvision_backbone,
)
from cycle_encoding.errors import CheckpointError, CycleEncodingError
from cycle_encoding.losses import build_perceptual, perceptual_names

# torchvision's AlexNet and VGG16 layouts, written out from torchvision's definitions:
# (index in `features`, out channels, in channels, kernel) for each conv, and the classifier's linear layers.
ALEX_CONVS = [(0, 64, 3, 11), (3, 192, 64, 5), (6, 384, 192, 3), (8, 256, 384, 3), (10, 256, 256, 3)]
ALEX_CLASSIFIER = [(1, 4096, 256 * 6 * 6), (4, 4096, 4096), (6, 1000, 4096)]
VGG_CONVS = [
    (0, 64, 3, 3), (2, 64, 64, 3), (5, 128, 64, 3), (7, 128, 128, 3), (10, 256, 128, 3), (12, 256, 256, 3),
    (14, 256, 256, 3), (17, 512, 256, 3), (19, 512, 512, 3), (21, 512, 512, 3), (24, 512, 512, 3),
    (26, 512, 512, 3), (28, 512, 512, 3),
]  # fmt: skip
VGG_CLASSIFIER = [(0, 4096, 512 * 7 * 7), (3, 4096, 4096), (6, 1000, 4096)]
HEAD_CHANNELS = {"alex": [64, 192, 384, 256, 256], "vgg": [64, 128, 256, 512, 512]}


def torchvision_state_dict(convs, classifier=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with torchvision's key names and shapes. The classifier's (unused) weights are stored as
    expanded views of one number, so the file stays small while the shapes are torchvision's."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    for i, o, c, k in convs:
        sd[f"features.{i}.weight"] = torch.randn(o, c, k, k, generator=g) * (2.0 / (c * k * k)) ** 0.5
        sd[f"features.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    for i, o, c in classifier or []:
        sd[f"classifier.{i}.weight"] = torch.zeros(1, 1).expand(o, c)
        sd[f"classifier.{i}.bias"] = torch.zeros(1).expand(o)
    return sd


@pytest.fixture(scope="module")
def alex_file(tmp_path_factory):
    p = tmp_path_factory.mktemp("lpips") / "alexnet-owt-test.pth"
    torch.save(torchvision_state_dict(ALEX_CONVS, ALEX_CLASSIFIER), p)
    return p


def functional_features(sd, convs, x, pools_before):
    """The ReLU outputs that end each LPIPS stage, by F.conv2d on the raw state dict.
    ``pools_before``: conv indices preceded by a max-pool, with the pool's (kernel, stride)."""
    taps = []
    for i, _, _, k in convs:
        if i in pools_before:
            x = F.max_pool2d(x, *pools_before[i])
        stride = 4 if (k == 11) else 1
        x = F.relu(
            F.conv2d(
                x, sd[f"features.{i}.weight"], sd[f"features.{i}.bias"], stride=stride, padding=k // 2 if k != 11 else 2
            )
        )
        taps.append((i, x))
    return taps


ALEX_POOLS = {3: (3, 2), 6: (3, 2)}
ALEX_TAP_CONVS = [0, 3, 6, 8, 10]
VGG_POOLS = {5: (2, 2), 10: (2, 2), 17: (2, 2), 24: (2, 2)}
VGG_TAP_CONVS = [2, 7, 14, 21, 28]  # the last conv of each stage


def reference_lpips(sd, convs, pools, tap_convs, heads, x, y) -> np.ndarray:
    """LPIPS v0.1 written from the paper's formula: numpy in float64 after a functional backbone."""
    shift = torch.tensor([-0.030, -0.088, -0.188]).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450]).view(1, 3, 1, 1)
    with torch.no_grad():
        fx = dict(functional_features(sd, convs, (x - shift) / scale, pools))
        fy = dict(functional_features(sd, convs, (y - shift) / scale, pools))
    total = np.zeros(x.shape[0])
    for k, i in enumerate(tap_convs):
        a, b = fx[i].double().numpy(), fy[i].double().numpy()
        a = a / (np.sqrt((a**2).sum(axis=1, keepdims=True)) + 1e-10)
        b = b / (np.sqrt((b**2).sum(axis=1, keepdims=True)) + 1e-10)
        w = heads[f"lin{k}.model.1.weight"].double().numpy().reshape(1, -1, 1, 1)
        total += (w * (a - b) ** 2).sum(axis=1).mean(axis=(1, 2))
    return total


def test_heads_come_from_the_lpips_package():
    for net, chans in HEAD_CHANNELS.items():
        path = lpips_heads_path(net)
        assert path.name == f"{net}.pth" and path.parent.name == "v0.1" and path.is_file()
        raw = torch.load(path, map_location="cpu", weights_only=True)
        heads = read_lpips_heads(net)
        assert list(heads) == [f"lin{k}.model.1.weight" for k in range(5)]
        assert [v.shape[1] for v in heads.values()] == chans
        for k, v in heads.items():
            assert torch.equal(v, raw[k].float())
            assert (v >= 0).all()  # the published heads are non-negative (LPIPS clamps them in training)


def test_torchvision_layout_loads_strict(alex_file, tmp_path):
    arch, feats = read_torchvision_backbone(alex_file)
    assert arch == "alexnet" and sorted(feats) == sorted(
        f"features.{i}.{p}" for i, *_ in ALEX_CONVS for p in ("weight", "bias")
    )
    # features only, both as features.* keys and as model.features.state_dict() keys
    sd = torchvision_state_dict(ALEX_CONVS)
    p1, p2 = tmp_path / "f1.pth", tmp_path / "f2.pth"
    torch.save(sd, p1)
    torch.save({k.removeprefix("features."): v for k, v in sd.items()}, p2)
    for p in (p1, p2):
        a, f = read_torchvision_backbone(p, "alexnet")
        assert a == "alexnet" and all(torch.equal(f[k], sd[k]) for k in sd)
    # VGG16, full model with the classifier
    p3 = tmp_path / "vgg16-test.pth"
    torch.save(torchvision_state_dict(VGG_CONVS, VGG_CLASSIFIER), p3)
    assert read_torchvision_backbone(p3)[0] == "vgg16"
    with pytest.raises(CheckpointError, match="vgg16 state dict, but alexnet"):
        read_torchvision_backbone(p3, "alexnet")


def test_wrong_backbone_files_name_the_key(tmp_path):
    sd = torchvision_state_dict(ALEX_CONVS)
    bad = dict(sd)
    bad["features.3.weight"] = torch.zeros(192, 64, 3, 3)
    torch.save(bad, tmp_path / "shape.pth")
    with pytest.raises(
        CheckpointError, match=r"features\.3\.weight has shape \[192, 64, 3, 3\], expected \[192, 64, 5, 5\]"
    ):
        read_torchvision_backbone(tmp_path / "shape.pth")
    missing = dict(sd)
    del missing["features.6.bias"]
    torch.save(missing, tmp_path / "missing.pth")
    with pytest.raises(CheckpointError, match=r"missing key features\.6\.bias"):
        read_torchvision_backbone(tmp_path / "missing.pth")
    extra = {**sd, "features.99.weight": torch.zeros(1)}
    torch.save(extra, tmp_path / "extra.pth")
    with pytest.raises(CheckpointError, match=r"unexpected key features\.99\.weight"):
        read_torchvision_backbone(tmp_path / "extra.pth")


@pytest.mark.parametrize("size", [(64, 64), (48, 40)])
def test_lpips_alex_equals_the_formula(alex_file, size):
    model = load_lpips("alex", alex_file)
    sd = torch.load(alex_file, weights_only=True)
    heads = torch.load(lpips_heads_path("alex"), map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, *size, generator=g) * 2 - 1
    y = (x + 0.3 * torch.randn(3, 3, *size, generator=g)).clamp(-1, 1)
    got = model(x, y).double().numpy()
    want = reference_lpips(sd, ALEX_CONVS, ALEX_POOLS, ALEX_TAP_CONVS, heads, x, y)
    assert got.shape == (3,) and (want > 0).all()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert torch.equal(model(x, x), torch.zeros(3))


def test_lpips_vgg_equals_the_formula_at_32px(tmp_path):
    p = tmp_path / "vgg16-test.pth"
    torch.save(torchvision_state_dict(VGG_CONVS, VGG_CLASSIFIER, seed=3), p)
    dist = build_perceptual("lpips-vgg", "cpu", p)
    assert dist.name == "lpips-vgg (backbone vgg16-test.pth)"
    sd = torch.load(p, weights_only=True)
    heads = torch.load(lpips_heads_path("vgg"), map_location="cpu", weights_only=True)
    g = torch.Generator().manual_seed(2)
    x, y = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1, torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    want = reference_lpips(sd, VGG_CONVS, VGG_POOLS, VGG_TAP_CONVS, heads, x, y)
    np.testing.assert_allclose(dist(x, y).double().numpy(), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(CycleEncodingError, match="at least 32 px"):
        dist(x[:, :, :31], y[:, :, :31])


def test_lpips_is_differentiable_and_batched(alex_file):
    dist = build_perceptual("lpips-alex", "cpu", alex_file).double()
    assert not any(p.requires_grad for p in dist.parameters())
    dist.train()  # a loss network stays in eval mode
    assert not dist.training
    g = torch.Generator().manual_seed(4)
    x = (torch.rand(2, 3, 40, 40, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    y = torch.rand(2, 3, 40, 40, generator=g, dtype=torch.float64) * 2 - 1
    d = dist(x, y)
    (grad,) = torch.autograd.grad(d.sum(), x)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0
    # directional derivative against central differences
    v = torch.randn(x.shape, generator=g, dtype=torch.float64)
    eps = 1e-5
    with torch.no_grad():
        fd = (dist(x + eps * v, y).sum() - dist(x - eps * v, y).sum()) / (2 * eps)
    assert float((grad * v).sum()) == pytest.approx(float(fd), rel=1e-4)
    # batched: each sample's value is what it gets alone; grey images count as RGB
    with torch.no_grad():
        alone = torch.stack([dist(x[i : i + 1], y[i : i + 1])[0] for i in range(2)])
        torch.testing.assert_close(dist(x, y), alone)
        torch.testing.assert_close(
            dist(x[:, :1], y[:, :1]), dist(x[:, :1].expand(-1, 3, -1, -1), y[:, :1].expand(-1, 3, -1, -1))
        )


def test_lpips_without_backbone_is_a_clear_error():
    assert {"lpips-alex", "lpips-vgg", "dlib-face"} <= set(perceptual_names())
    with pytest.raises(CycleEncodingError) as e:
        build_perceptual("lpips-alex", "cpu", None)
    msg = str(e.value)
    assert "alexnet-owt-7be5be79.pth" in msg and "--lpips-backbone" in msg and "\n" not in msg
    with pytest.raises(CycleEncodingError, match=r"vgg16-397923af\.pth"):
        build_perceptual("lpips-vgg", "cpu")
    with pytest.raises(CycleEncodingError, match=r"unknown perceptual distance 'lpips-squeeze'.*lpips-alex"):
        build_perceptual("lpips-squeeze", "cpu")


def test_info_describes_backbone_and_heads(alex_file):
    info = inspect_file(alex_file)
    assert info["format"] == "torchvision" and info["architecture"]["arch"] == "alexnet"
    heads = inspect_file(lpips_heads_path("alex"))
    assert heads["format"] == "lpips-heads" and heads["architecture"]["channels"] == HEAD_CHANNELS["alex"]
