"""IR-SE backbones: the ArcFace IR-SE-50 face-recognition network and the body it shares with the e4e encoder.
Design notes: docs/INTERNALS.md, "cycle_encoding.networks.irse"."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

UnitSpec = tuple[int, int, int]
"""One bottleneck unit: (in_channels, depth, stride)."""

UNITS_PER_BLOCK: dict[int, tuple[int, ...]] = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}
"""Units per block of the published IR / IR-SE depths."""

DEFAULT_WIDTHS: tuple[int, ...] = (64, 128, 256, 512)


class SEModule(nn.Module):
    """Squeeze-and-excitation: x * sigmoid(fc2(relu(fc1(avgpool(x))))), with 1x1 convolutions without bias."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, hidden, kernel_size=1, padding=0, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(hidden, channels, kernel_size=1, padding=0, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIR(nn.Module):
    """One IR unit (``mode='ir'``) or IR-SE unit (``mode='ir_se'``): res_layer(x) + shortcut(x)."""

    def __init__(self, in_channels: int, depth: int, stride: int, mode: str = "ir_se") -> None:
        super().__init__()
        if mode not in ("ir", "ir_se"):
            raise ValueError(f"unknown IR mode {mode!r} (ir or ir_se)")
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(
                nn.Conv2d(in_channels, depth, (1, 1), stride, bias=False), nn.BatchNorm2d(depth)
            )
        layers: list[nn.Module] = [
            nn.BatchNorm2d(in_channels),
            nn.Conv2d(in_channels, depth, (3, 3), (1, 1), 1, bias=False),
            nn.PReLU(depth),
            nn.Conv2d(depth, depth, (3, 3), stride, 1, bias=False),
            nn.BatchNorm2d(depth),
        ]
        if mode == "ir_se":
            layers.append(SEModule(depth, 16))
        self.res_layer = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


def irse_unit_specs(
    num_layers: int = 50, widths: Sequence[int] = DEFAULT_WIDTHS, units: Sequence[int] | None = None
) -> list[UnitSpec]:
    """The (in_channels, depth, stride) list of the body's units; ``units`` (per block) overrides the published
    count for ``num_layers``. IR-SE-50: ``[(64, 64, 2), (64, 64, 1), (64, 64, 1), (64, 128, 2), ...]`` (24 units)."""
    if units is None:
        if num_layers not in UNITS_PER_BLOCK:
            raise ValueError(f"num_layers must be one of {sorted(UNITS_PER_BLOCK)}, got {num_layers}")
        units = UNITS_PER_BLOCK[num_layers]
    if len(units) != len(widths):
        raise ValueError(f"{len(units)} blocks of units but {len(widths)} widths")
    if any(n < 1 for n in units) or any(w < 1 for w in widths):
        raise ValueError(f"units per block and widths must be positive (got {list(units)}, {list(widths)})")
    specs: list[UnitSpec] = []
    in_c = widths[0]
    for n, depth in zip(units, widths):
        specs.append((in_c, depth, 2))
        specs += [(depth, depth, 1)] * (n - 1)
        in_c = depth
    return specs


def make_input_layer(in_channels: int = 3, width: int = 64) -> nn.Sequential:
    """``[conv3x3(in_channels -> width, no bias), BN(width), PReLU(width)]`` (keys ``0.weight``, ``1.*``, ``2.weight``)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, width, (3, 3), 1, 1, bias=False), nn.BatchNorm2d(width), nn.PReLU(width)
    )


class IRSEBody(nn.Sequential):
    """The flat sequence of bottleneck units (keys ``{i}.res_layer.*``, ``{i}.shortcut_layer.*``)."""

    def __init__(self, specs: Sequence[UnitSpec], mode: str = "ir_se") -> None:
        super().__init__(*[BottleneckIR(i, d, s, mode) for i, d, s in specs])
        self.specs: list[UnitSpec] = [tuple(s) for s in specs]  # type: ignore[misc]

    @property
    def block_last_units(self) -> list[int]:
        """Index of the last unit of each block (IR-SE-50: [2, 6, 20, 23]): e4e taps the last three."""
        out = [i - 1 for i, (_, _, s) in enumerate(self.specs) if s != 1 and i > 0]
        return [*out, len(self.specs) - 1]

    def forward_taps(self, x: torch.Tensor, taps: Sequence[int]) -> list[torch.Tensor]:
        """Run units up to ``max(taps)`` and return the feature maps after the units in ``taps`` (in that order)."""
        want = set(taps)
        got: dict[int, torch.Tensor] = {}
        for i, unit in enumerate(self):
            if i > max(want):
                break
            x = unit(x)
            if i in want:
                got[i] = x
        return [got[i] for i in taps]


class ArcFaceBackbone(nn.Module):
    """TreB1eN's ``Backbone(input_size, num_layers, mode)``: the ArcFace face-recognition network.

    Input: a face crop of ``input_size`` (112 or 224) in [-1, 1]; output: an L2-normalized 512-d embedding.
    Keys: ``input_layer.*``, ``body.{0..23}.*``, ``output_layer.{0: BN2d(512), 3: Linear(512*s*s, 512), 4: BN1d(512)}``
    (s = 7 at 112, 14 at 224; index 1 is dropout and 2 flatten).
    """

    def __init__(self, input_size: int = 112, num_layers: int = 50, mode: str = "ir_se", affine: bool = True) -> None:
        super().__init__()
        if input_size not in (112, 224):
            raise ValueError(f"input_size must be 112 or 224, got {input_size}")
        self.input_size = input_size
        self.num_layers = num_layers
        self.mode = mode
        self.input_layer = make_input_layer(3, 64)
        self.body = IRSEBody(irse_unit_specs(num_layers), mode)
        s = input_size // 16
        self.output_layer = nn.Sequential(
            nn.BatchNorm2d(512),
            nn.Dropout(0.4),
            nn.Flatten(),
            nn.Linear(512 * s * s, 512),
            nn.BatchNorm1d(512, affine=affine),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 3, input_size, input_size] in [-1, 1] -> [B, 512], unit L2 norm."""
        x = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(x, p=2, dim=1)
