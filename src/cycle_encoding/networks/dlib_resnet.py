"""dlib's ResNet face embedder (``dlib_face_recognition_resnet_model_v1``) in PyTorch: the identity network that runs
offline here. Design notes: docs/INTERNALS.md, "cycle_encoding.networks.dlib_resnet"."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import CycleEncodingError
from ..ops import as_rgb, resize

NAME = "dlib-resnet-face"
CHIP_SIZE = 150
CHIP_PADDING = 0.25
MEAN_RGB = (122.782, 117.001, 104.298)
INPUT_SCALE = 256.0
DESCRIPTOR_DIM = 128


FFHQ_CHIP_BOX = (0.1502, 0.2569, 0.8498, 0.9565)
"""Where dlib's 150x150 chip (padding 0.25) lies, on average, in an FFHQ-aligned image: (left, top, right, bottom) as
fractions of its width/height (the measurement: docs/FACES.md, Face networks)."""

LAYOUTS = ("ffhq", "chip")

_STAGES: tuple[tuple[int, int, int], ...] = ((32, 3, 0), (64, 3, 1), (128, 2, 1), (256, 2, 1), (256, 0, 1))
"""Per stage: (channels, number of plain units, 1 if a down-sampling unit comes first)."""


class ConvAffine(nn.Module):
    """A convolution with bias followed by dlib's per-channel ``affine`` layer (``y * weight + bias``)."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, padding: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding, bias=True)
        self.affine_weight = nn.Parameter(torch.ones(cout))
        self.affine_bias = nn.Parameter(torch.zeros(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y * self.affine_weight.view(1, -1, 1, 1) + self.affine_bias.view(1, -1, 1, 1)


class ResidualUnit(nn.Module):
    """dlib's ``ares`` / ``ares_down`` unit: two 3x3 conv+affine layers and a shortcut, ReLU after the sum."""

    def __init__(self, cin: int, cout: int, down: bool) -> None:
        super().__init__()
        self.down = down
        self.conv1 = ConvAffine(cin, cout, 3, 2 if down else 1, 0 if down else 1)
        self.conv2 = ConvAffine(cout, cout, 3, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(F.relu(self.conv1(x)))
        skip = F.avg_pool2d(x, 2, 2) if self.down else x
        return F.relu(_add_prev(out, skip))


def _add_prev(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """dlib's ``add_prev``: the sum of two maps of possibly different sizes; each is zero-padded (channels at the
    end, rows/columns at the bottom/right) to the larger of the two."""
    c, h, w = (max(a.shape[i], b.shape[i]) for i in (1, 2, 3))

    def grow(t: torch.Tensor) -> torch.Tensor:
        if tuple(t.shape[1:]) == (c, h, w):
            return t
        return F.pad(t, (0, w - t.shape[3], 0, h - t.shape[2], 0, c - t.shape[1]))

    return grow(a) + grow(b)


class DlibResNet(nn.Module):
    """The bare network: normalized 150x150 chips ``(p - mean) / 256`` -> 128-d descriptors (see the design notes)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvAffine(3, 32, 7, 2, 0)
        stages = []
        cin = 32
        for channels, plain, down in _STAGES:
            units = [ResidualUnit(cin, channels, True)] if down else []
            units += [ResidualUnit(channels, channels, False) for _ in range(plain)]
            stages.append(nn.Sequential(*units))
            cin = channels
        self.stages = nn.ModuleList(stages)
        self.fc = nn.Linear(256, DESCRIPTOR_DIM, bias=False)

    def stage_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The feature map after each of the five residual stages."""
        x = F.max_pool2d(F.relu(self.stem(x)), 3, 2)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.stage_outputs(x)[-1].mean(dim=(2, 3)))


class DlibFaceEmbedder(nn.Module):
    """The face embedder as the rest of the project uses it: images in [-1, 1] in, descriptors out.

    ``name`` is ``"dlib-resnet-face"``; ``embed``/``embed_chips`` give ``[B, 128]`` descriptors (not normalized);
    ``features`` gives the five stage outputs for a perceptual distance. ``layout`` sets how ``embed`` and
    ``features`` turn an image of any size into a chip: ``"ffhq"`` (FFHQ-aligned faces: crop :data:`FFHQ_CHIP_BOX`)
    or ``"chip"`` (the image is a chip already: resize it to 150). Differentiable with respect to the input.
    """

    name = NAME

    def __init__(self, net: DlibResNet | None = None, layout: str = "ffhq") -> None:
        super().__init__()
        if layout not in LAYOUTS:
            raise CycleEncodingError(f"unknown face layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        self.net = net if net is not None else DlibResNet()
        self.layout = layout
        self.register_buffer("mean", torch.tensor(MEAN_RGB).view(1, 3, 1, 1), persistent=False)

    # -- input handling ------------------------------------------------------------------------------------------
    def normalize_chips(self, chips: torch.Tensor) -> torch.Tensor:
        """[-1, 1] RGB chips -> the network's input ``(255 * (x + 1) / 2 - mean) / 256``."""
        chips = as_rgb(chips, "the dlib face embedder")
        return ((chips + 1) * 127.5 - self.mean.to(chips.dtype)) / INPUT_SCALE

    def to_chips(self, x: torch.Tensor, layout: str | None = None) -> torch.Tensor:
        """Images [B, C, H, W] in [-1, 1] (C = 1 or 3, any size) -> 150x150 chips in [-1, 1], differentiably."""
        layout = layout or self.layout
        if layout not in LAYOUTS:
            raise CycleEncodingError(f"unknown face layout {layout!r}: use one of {', '.join(LAYOUTS)}")
        x = as_rgb(x, "the dlib face embedder")
        if layout == "chip":
            return resize(x, CHIP_SIZE)
        return crop_resize(x, FFHQ_CHIP_BOX, CHIP_SIZE)

    # -- the interface -------------------------------------------------------------------------------------------
    def embed_chips(self, chips: torch.Tensor) -> torch.Tensor:
        """dlib 150x150 face chips [B, 3, 150, 150] in [-1, 1] -> descriptors [B, 128] (dlib's numbers)."""
        if chips.dim() != 4 or tuple(chips.shape[-2:]) != (CHIP_SIZE, CHIP_SIZE):
            raise CycleEncodingError(
                f"embed_chips expects [B, 3, {CHIP_SIZE}, {CHIP_SIZE}] chips, got {list(chips.shape)} "
                "(use embed() for images of other sizes)"
            )
        return self.net(self.normalize_chips(chips))

    def embed(self, x: torch.Tensor, layout: str | None = None) -> torch.Tensor:
        """Face images [B, C, H, W] in [-1, 1], any size -> descriptors [B, 128] (chip made as ``layout`` says)."""
        return self.net(self.normalize_chips(self.to_chips(x, layout)))

    def features(self, x: torch.Tensor, layout: str | None = None) -> list[torch.Tensor]:
        """The feature maps after each residual stage (32@35, 64@17, 128@8, 256@4, 256@2 for a 150 chip)."""
        return self.net.stage_outputs(self.normalize_chips(self.to_chips(x, layout)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.embed(x)


def crop_resize(x: torch.Tensor, box: tuple[float, float, float, float], size: int) -> torch.Tensor:
    """Cut the box (left, top, right, bottom as fractions of the width/height) out of ``x`` and resize it to
    ``size`` x ``size``: resize the whole image (antialiased bilinear) so that the box is ``size`` pixels wide,
    then take the ``size``-pixel square nearest the box (its corners move by less than half a chip pixel)."""
    _, _, h, w = x.shape
    l, t, r, b = box
    sx, sy = size / ((r - l) * w), size / ((b - t) * h)
    nw, nh = max(size, round(w * sx)), max(size, round(h * sy))
    y = resize(x, (nh, nw))
    x0 = min(max(round(l * nw), 0), nw - size)
    y0 = min(max(round(t * nh), 0), nh - size)
    return y[:, :, y0 : y0 + size, x0 : x0 + size]
