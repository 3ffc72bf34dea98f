"""Checkpoint layouts written by the tests from the published descriptions (../shared/FORMATS.md),
independently of the project's model code: key names and shapes come from the spec, not from a model."""

from __future__ import annotations

import collections
import math
import sys
import types

import torch

ROSINALITY_CHANNELS = {4: 512, 8: 512, 16: 512, 32: 512}


def rosinality_channels(size: int, cm: int) -> dict[int, int]:
    ch = dict(ROSINALITY_CHANNELS)
    ch.update({64: 256 * cm, 128: 128 * cm, 256: 64 * cm, 512: 32 * cm, 1024: 16 * cm})
    return {r: c for r, c in ch.items() if r <= size}


def rosinality_g_ema(
    size: int,
    n_mlp: int = 8,
    cm: int = 2,
    style_dim: int = 512,
    seed: int = 0,
    channel_div: int = 1,
    channels: dict[int, int] | None = None,
    img_channels: int = 3,
) -> dict:
    """A g_ema state dict with exactly the keys and shapes of FORMATS.md, random values. ``channel_div`` > 1 divides
    every resolution's channel count (a narrower network of the same shape, for fast tests); ``channels`` and
    ``img_channels`` replace rosinality's widths and its 3 output channels (its class patched)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return torch.randn(*shape, generator=g) * scale

    k1 = torch.tensor([1.0, 3.0, 3.0, 1.0])
    kernel = torch.outer(k1, k1) / torch.outer(k1, k1).sum() * 4  # rosinality: make_kernel * factor**2
    L = int(math.log2(size))
    ch = {r: max(1, c // channel_div) for r, c in (channels or rosinality_channels(size, cm)).items()}
    sd: dict[str, torch.Tensor] = {}
    for i in range(1, n_mlp + 1):
        sd[f"style.{i}.weight"] = rnd(style_dim, style_dim, scale=100.0)  # randn / lr_mul
        sd[f"style.{i}.bias"] = rnd(style_dim, scale=0.1)
    sd["input.input"] = rnd(1, ch[4], 4, 4)

    def styled(prefix, cin, cout, up):
        sd[f"{prefix}.conv.weight"] = rnd(1, cout, cin, 3, 3)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + rnd(cin, scale=0.1)
        if up:
            sd[f"{prefix}.conv.blur.kernel"] = kernel.clone()
        sd[f"{prefix}.noise.weight"] = rnd(1, scale=0.1)
        sd[f"{prefix}.activate.bias"] = rnd(cout, scale=0.1)

    def to_rgb(prefix, cin, up):
        if up:
            sd[f"{prefix}.upsample.kernel"] = kernel.clone()
        sd[f"{prefix}.conv.weight"] = rnd(1, img_channels, cin, 1, 1)
        sd[f"{prefix}.conv.modulation.weight"] = rnd(cin, style_dim)
        sd[f"{prefix}.conv.modulation.bias"] = 1 + rnd(cin, scale=0.1)
        sd[f"{prefix}.bias"] = rnd(1, img_channels, 1, 1, scale=0.1)

    styled("conv1", ch[4], ch[4], False)
    to_rgb("to_rgb1", ch[4], False)
    cin = ch[4]
    for i in range(3, L + 1):
        cout = ch[2**i]
        k = i - 3
        styled(f"convs.{2 * k}", cin, cout, True)
        styled(f"convs.{2 * k + 1}", cout, cout, False)
        to_rgb(f"to_rgbs.{k}", cout, True)
        cin = cout
    for j in range(2 * (L - 2) + 1):
        r = 2 ** ((j + 5) // 2)
        sd[f"noises.noise_{j}"] = rnd(1, 1, r, r)
    return sd


# --- NVIDIA stylegan2-ada-pytorch pickles -------------------------------------------------------------


class StandInModules:
    """Installs stand-ins for NVIDIA's `torch_utils.persistence` and `dnnlib.util` while writing a pickle,
    and removes them afterwards so that the reader cannot import them."""

    NAMES = ("torch_utils", "torch_utils.persistence", "dnnlib", "dnnlib.util")

    def __enter__(self):
        tu = types.ModuleType("torch_utils")
        pers = types.ModuleType("torch_utils.persistence")
        dn = types.ModuleType("dnnlib")
        du = types.ModuleType("dnnlib.util")

        def _reconstruct_persistent_obj(meta):  # pragma: no cover - never called by the reader
            raise AssertionError("NVIDIA's reconstructor must not be called")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        pers._reconstruct_persistent_obj = _reconstruct_persistent_obj

        class EasyDict(dict):
            pass

        EasyDict.__module__ = "dnnlib.util"
        EasyDict.__qualname__ = "EasyDict"
        du.EasyDict = EasyDict
        tu.persistence = pers
        dn.util = du
        for name, mod in zip(self.NAMES, (tu, pers, dn, du)):
            sys.modules[name] = mod
        self.reconstruct = _reconstruct_persistent_obj
        self.EasyDict = EasyDict
        return self

    def __exit__(self, *exc):
        for name in self.NAMES:
            sys.modules.pop(name, None)

    def persistent(self, class_name, params=None, buffers=None, modules=None, init_kwargs=None):
        """An object that pickles exactly as NVIDIA's persistent classes do."""
        state = {
            "training": False,
            "_parameters": collections.OrderedDict(
                (k, torch.nn.Parameter(v, requires_grad=False)) for k, v in (params or {}).items()
            ),
            "_buffers": collections.OrderedDict(buffers or {}),
            "_non_persistent_buffers_set": set(),
            "_modules": collections.OrderedDict(modules or {}),
            "_init_args": (),
            "_init_kwargs": self.EasyDict(init_kwargs or {}),
        }
        meta = {
            "type": "class",
            "version": 6,
            "module_src": "import os\nos.system('echo this source must never run')\n",
            "class_name": class_name,
            "state": state,
        }
        rec = self.reconstruct

        class Persistent:
            def __reduce__(self):
                return (rec, (meta,))

        return Persistent()


def nvidia_from_rosinality(G, stand_in: StandInModules, c_dim: int = 0):
    """The generator ``G`` (this project's, rosinality layout) laid out as NVIDIA's G_ema, using the
    mapping table of FORMATS.md in reverse."""
    sd = {k: v.detach().clone() for k, v in G.state_dict().items()}
    cfg = G.config
    P = stand_in.persistent
    n_mlp = cfg.n_mlp

    def fc(w, b):
        return P("training.networks.FullyConnectedLayer", params={"weight": w, "bias": b})

    mapping = P(
        "training.networks.MappingNetwork",
        modules={f"fc{i}": fc(sd[f"style.{i + 1}.weight"], sd[f"style.{i + 1}.bias"]) for i in range(n_mlp)},
        buffers={"w_avg": G.w_avg.detach().clone()},
        init_kwargs={"z_dim": cfg.style_dim, "w_dim": cfg.style_dim, "num_layers": n_mlp},
    )
    rf = torch.tensor([1.0, 3.0, 3.0, 1.0]) / 8
    noise_j = 0

    def layer(src):
        nonlocal noise_j
        nc = sd[f"noises.noise_{noise_j}"][0, 0]
        noise_j += 1
        return P(
            "training.networks.SynthesisLayer",
            params={
                "weight": sd[f"{src}.conv.weight"][0],
                "noise_strength": sd[f"{src}.noise.weight"].reshape(()),
                "bias": sd[f"{src}.activate.bias"],
            },
            buffers={"resample_filter": rf.clone(), "noise_const": nc.clone()},
            modules={"affine": fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"])},
        )

    def torgb(src):
        return P(
            "training.networks.ToRGBLayer",
            params={"weight": sd[f"{src}.conv.weight"][0], "bias": sd[f"{src}.bias"].reshape(-1)},
            modules={"affine": fc(sd[f"{src}.conv.modulation.weight"], sd[f"{src}.conv.modulation.bias"])},
        )

    blocks = {}
    b4_conv1 = layer("conv1")
    blocks["b4"] = P(
        "training.networks.SynthesisBlock",
        params={"const": sd["input.input"][0]},
        buffers={"resample_filter": rf.clone()},
        modules={"conv1": b4_conv1, "torgb": torgb("to_rgb1")},
    )
    for k in range(cfg.log_size - 2):
        r = 8 * 2**k
        conv0 = layer(f"convs.{2 * k}")
        conv1 = layer(f"convs.{2 * k + 1}")
        blocks[f"b{r}"] = P(
            "training.networks.SynthesisBlock",
            buffers={"resample_filter": rf.clone()},
            modules={"conv0": conv0, "conv1": conv1, "torgb": torgb(f"to_rgbs.{k}")},
        )
    synthesis = P(
        "training.networks.SynthesisNetwork",
        modules=blocks,
        init_kwargs={"w_dim": cfg.style_dim, "img_resolution": cfg.resolution, "img_channels": cfg.img_channels},
    )
    init = {
        "z_dim": cfg.style_dim,
        "c_dim": c_dim,
        "w_dim": cfg.style_dim,
        "img_resolution": cfg.resolution,
        "img_channels": cfg.img_channels,
        "mapping_kwargs": stand_in.EasyDict(num_layers=n_mlp),
        "synthesis_kwargs": stand_in.EasyDict(
            channel_base=cfg.channel_base, channel_max=cfg.channel_max, num_fp16_res=4, conv_clamp=256
        ),
    }
    return P("training.networks.Generator", modules={"synthesis": synthesis, "mapping": mapping}, init_kwargs=init)


# --- e4e / pSp encoder (FORMATS.md: "e4e / pSp / ReStyle / Cycle Encoding encoder checkpoints") -----------


def _bn(sd: dict, prefix: str, c: int, g: torch.Generator) -> None:
    sd[f"{prefix}.weight"] = 1 + 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.bias"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_mean"] = 0.1 * torch.randn(c, generator=g)
    sd[f"{prefix}.running_var"] = 1 + 0.1 * torch.rand(c, generator=g)
    sd[f"{prefix}.num_batches_tracked"] = torch.tensor(100)


def irse_body_sd(widths=(64, 128, 256, 512), units=(3, 4, 14, 3), in_channels=3, seed=0, se=True) -> dict:
    """input_layer.* and body.* of an IR-SE backbone with the published key names."""
    g = torch.Generator().manual_seed(seed)
    sd: dict[str, torch.Tensor] = {}
    sd["input_layer.0.weight"] = 0.1 * torch.randn(widths[0], in_channels, 3, 3, generator=g)
    _bn(sd, "input_layer.1", widths[0], g)
    sd["input_layer.2.weight"] = torch.full((widths[0],), 0.25)
    i = 0
    cin = widths[0]
    for n, d in zip(units, widths):
        for _ in range(n):
            p = f"body.{i}"
            _bn(sd, f"{p}.res_layer.0", cin, g)
            sd[f"{p}.res_layer.1.weight"] = 0.05 * torch.randn(d, cin, 3, 3, generator=g)
            sd[f"{p}.res_layer.2.weight"] = torch.full((d,), 0.25)
            sd[f"{p}.res_layer.3.weight"] = 0.05 * torch.randn(d, d, 3, 3, generator=g)
            _bn(sd, f"{p}.res_layer.4", d, g)
            if se:
                sd[f"{p}.res_layer.5.fc1.weight"] = 0.1 * torch.randn(max(1, d // 16), d, 1, 1, generator=g)
                sd[f"{p}.res_layer.5.fc2.weight"] = 0.1 * torch.randn(d, max(1, d // 16), 1, 1, generator=g)
            if cin != d:
                sd[f"{p}.shortcut_layer.0.weight"] = 0.1 * torch.randn(d, cin, 1, 1, generator=g)
                _bn(sd, f"{p}.shortcut_layer.1", d, g)
            cin = d
            i += 1
    return sd


def e4e_encoder_sd(
    num_ws: int = 18,
    w_dim: int = 512,
    widths=(64, 128, 256, 512),
    units=(3, 4, 14, 3),
    input_size: int = 256,
    in_channels: int = 3,
    seed: int = 0,
) -> dict:
    """The encoder.* keys of an e4e checkpoint (without the prefix): body, map2style heads, lateral layers.

    Heads 0-2 have log2(input/16) convs, 3-6 log2(input/8), 7+ log2(input/4) (FORMATS.md: 4, 5, 6 at 256)."""
    g = torch.Generator().manual_seed(seed + 1)
    sd = irse_body_sd(widths, units, in_channels, seed)
    c3 = widths[3]
    for i in range(num_ws):
        spatial = input_size // (16 if i < 3 else 8 if i < 7 else 4)
        n = int(math.log2(spatial))
        cin = c3
        for j in range(n):
            sd[f"styles.{i}.convs.{2 * j}.weight"] = 0.05 * torch.randn(w_dim, cin, 3, 3, generator=g)
            sd[f"styles.{i}.convs.{2 * j}.bias"] = 0.01 * torch.randn(w_dim, generator=g)
            cin = w_dim
        sd[f"styles.{i}.linear.weight"] = torch.randn(w_dim, w_dim, generator=g)
        sd[f"styles.{i}.linear.bias"] = torch.zeros(w_dim)
    sd["latlayer1.weight"] = 0.1 * torch.randn(c3, widths[2], 1, 1, generator=g)
    sd["latlayer1.bias"] = torch.zeros(c3)
    sd["latlayer2.weight"] = 0.1 * torch.randn(c3, widths[1], 1, 1, generator=g)
    sd["latlayer2.bias"] = torch.zeros(c3)
    return sd


def e4e_module_order(sd: dict) -> dict:
    """``sd`` (encoder keys without prefix) reordered as e4e's ``Encoder4Editing.state_dict()`` lists them: its
    module definition order, input_layer, body (per unit: shortcut_layer, then res_layer, as ``bottleneck_IR_SE``
    defines them), styles, latlayer1, latlayer2; within a module the order of ``sd``."""

    def rank(item: tuple[int, str]) -> tuple:
        pos, k = item
        parts = k.split(".")
        if parts[0] == "input_layer":
            return (0, pos)
        if parts[0] == "body":
            return (1, int(parts[1]), 0 if parts[2] == "shortcut_layer" else 1, pos)
        if parts[0] == "styles":
            return (2, int(parts[1]), pos)
        return (3 if parts[0] == "latlayer1" else 4, pos)

    return {k: sd[k] for _, k in sorted(enumerate(sd), key=rank)}
