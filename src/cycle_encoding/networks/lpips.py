"""LPIPS (Zhang et al. 2018, v0.1) with AlexNet or VGG16 features, in plain PyTorch (no torchvision).
Design notes: docs/INTERNALS.md, "cycle_encoding.networks.lpips"."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..errors import CycleEncodingError
from ..ops import FixedMeasure, as_rgb

LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
NORMALIZE_EPS = 1e-10
MIN_SIZE = 32

# torchvision AlexNet's convolutions (in, out, kernel, stride, padding), each + ReLU; those in ALEXNET_POOLED + max-pool
ALEXNET_CONVS = ((3, 64, 11, 4, 2), (64, 192, 5, 1, 2), (192, 384, 3, 1, 1), (384, 256, 3, 1, 1), (256, 256, 3, 1, 1))
ALEXNET_POOLED = (0, 1, 4)
# torchvision VGG16's convolution widths, block by block (each block ends in a 2x2 max-pool)
VGG16_BLOCKS: tuple[tuple[int, ...], ...] = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))


class AlexNetFeatures(nn.Module):
    """torchvision AlexNet's ``features`` (keys ``features.{0,3,6,8,10}.{weight,bias}``); taps after ReLUs 1,4,7,9,11."""

    arch = "alexnet"
    taps = (1, 4, 7, 9, 11)
    channels = (64, 192, 384, 256, 256)

    def __init__(self) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for i, (in_c, out_c, k, stride, padding) in enumerate(ALEXNET_CONVS):
            layers += [nn.Conv2d(in_c, out_c, kernel_size=k, stride=stride, padding=padding), nn.ReLU()]
            if i in ALEXNET_POOLED:
                layers.append(nn.MaxPool2d(kernel_size=3, stride=2))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature maps at the taps (the final max-pool is not run)."""
        out = []
        for i, layer in enumerate(self.features):
            if i > self.taps[-1]:
                break
            x = layer(x)
            if i in self.taps:
                out.append(x)
        return out


class VGG16Features(AlexNetFeatures):
    """torchvision VGG16's ``features`` (13 convs at indices 0,2,5,...,28); taps after ReLUs 3, 8, 15, 22, 29."""

    arch = "vgg16"
    taps = (3, 8, 15, 22, 29)
    channels = (64, 128, 256, 512, 512)

    def __init__(self) -> None:
        nn.Module.__init__(self)
        layers: list[nn.Module] = []
        in_c = 3
        for block in VGG16_BLOCKS:
            for width in block:
                layers += [nn.Conv2d(in_c, width, kernel_size=3, padding=1), nn.ReLU()]
                in_c = width
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)


BACKBONES: dict[str, type[AlexNetFeatures]] = {"alexnet": AlexNetFeatures, "vgg16": VGG16Features}
LPIPS_NETS = {"alex": "alexnet", "vgg": "vgg16"}
"""LPIPS's net names (as in the lpips package and its head files) -> backbone architectures."""


def normalize_channels(f: torch.Tensor, eps: float = NORMALIZE_EPS) -> torch.Tensor:
    """f / (||f||_2 over channels + eps), as LPIPS's ``normalize_tensor``, in float32 or wider (a bfloat16 map from
    autocast is converted first). Where the squared norm is 0 (all channels exactly 0) it is raised to the
    smallest normal float before the square root: the value there is unchanged (0 / (~1e-19 + eps) = 0), but the
    square root's gradient at 0 (infinite, times 0: NaN) never reaches the network; elsewhere nothing changes, bit
    for bit. bfloat16 feature maps have such all-zero pixels far more often than float32 ones."""
    if f.dtype in (torch.bfloat16, torch.float16):
        f = f.float()
    sq = torch.sum(f * f, dim=1, keepdim=True).clamp_min(torch.finfo(f.dtype).tiny)
    return f / (torch.sqrt(sq) + eps)


class LPIPS(FixedMeasure):
    """The LPIPS v0.1 distance; ``forward(x, y)`` gives one value per sample, differentiable, weights frozen.

    ``net`` is 'alex' or 'vgg'; ``backbone`` a state dict of the feature stack (``features.*`` keys);
    ``heads`` the linear heads (``lin{k}.model.1.weight``). Both are loaded strictly.
    """

    def __init__(
        self,
        net: str = "alex",
        backbone: Mapping[str, torch.Tensor] | None = None,
        heads: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        super().__init__()
        if net not in LPIPS_NETS:
            raise ValueError(f"unknown LPIPS net {net!r} (alex or vgg)")
        self.net_name = net
        self.net = BACKBONES[LPIPS_NETS[net]]()
        self.register_buffer("shift", torch.tensor(LPIPS_SHIFT).view(1, 3, 1, 1))
        self.register_buffer("scale", torch.tensor(LPIPS_SCALE).view(1, 3, 1, 1))
        self.lins = nn.ModuleList(nn.Conv2d(c, 1, 1, bias=False) for c in self.net.channels)
        if backbone is not None:
            self.net.load_state_dict(dict(backbone), strict=True)
        if heads is not None:
            self.lins.load_state_dict(
                {f"{k}.weight": heads[f"lin{k}.model.1.weight"] for k in range(len(self.lins))}, strict=True
            )
        self.requires_grad_(False)
        self.eval()

    def features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The backbone's tapped feature maps of x in [-1, 1] (after LPIPS's shift and scale)."""
        x = as_rgb(x, "LPIPS")
        if min(x.shape[-2:]) < MIN_SIZE:
            raise CycleEncodingError(f"LPIPS needs images of at least {MIN_SIZE} px, got {x.shape[-2]}x{x.shape[-1]}")
        return self.net((x - self.shift) / self.scale)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """[B, C, H, W] x 2 in [-1, 1] -> [B] distances."""
        if x.shape != y.shape:
            raise CycleEncodingError(f"LPIPS compares images of one shape, got {list(x.shape)} and {list(y.shape)}")
        b = x.shape[0]
        total = x.new_zeros(b)
        for lin, f in zip(self.lins, self.features(torch.cat([x, y.to(x.dtype)]))):
            f = normalize_channels(f)
            d = (f[:b] - f[b:]) ** 2
            total = total + lin(d).mean(dim=(2, 3)).sum(1)
        return total
