"""Loading a StyleGAN2 generator from any file users bring (docs/FORMATS.md, "Generators"), and writing it in the
project's formats. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.generator".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..assets import resolve_model
from ..errors import CheckpointError
from ..networks.stylegan2 import Generator, GeneratorConfig
from ..utils import resolve_device
from . import e4e, nvidia, rosinality
from .common import check_declared_architecture, sniff, torch_load
from .native import NativeFile, default_provenance, file_sha256, read_config, read_native, save_native

W_AVG_SAMPLES = 10_000


@dataclass
class GeneratorWeights:
    """A generator as read from a file, before it is built: architecture, weights, w_avg."""

    config: GeneratorConfig
    state_dict: dict[str, torch.Tensor]
    w_avg: torch.Tensor | None
    format: str
    holds: list[str] = field(default_factory=list)
    provenance: dict[str, Any] = field(default_factory=dict)


def _is_rosinality_sd(obj: Any) -> bool:
    return isinstance(obj, Mapping) and "style.1.weight" in obj and "conv1.conv.weight" in obj


def _tensor_dict(obj: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def describe_torch_object(obj: Any) -> list[str]:
    """A short list of what a torch checkpoint dict holds (for messages and ``info``)."""
    if not isinstance(obj, Mapping):
        return [type(obj).__name__]
    out = []
    for k, v in obj.items():
        if isinstance(v, torch.Tensor):
            out.append(f"{k} {list(v.shape)}")
        elif isinstance(v, Mapping):
            out.append(f"{k} ({len(v)} entries)")
        else:
            out.append(f"{k} ({type(v).__name__})")
    return out


def _from_torch_object(obj: Any, path: Path) -> GeneratorWeights:
    if isinstance(obj, Mapping) and "g_ema" in obj and _is_rosinality_sd(obj["g_ema"]):
        sd = _tensor_dict(obj["g_ema"])
        fmt = "rosinality" if "latent_avg" in obj else "rosinality-training"
        w_avg = obj.get("latent_avg")
        holds = describe_torch_object(obj)
    elif e4e.is_e4e_checkpoint(obj):
        sd = e4e.split_prefix(obj["state_dict"], "decoder")
        if not sd:
            raise CheckpointError(path, "an e4e/pSp checkpoint without decoder.* keys: it holds no generator")
        fmt = "e4e"
        w_avg = e4e.latent_avg_vector(obj.get("latent_avg"))
        holds = [e4e.describe_state_dict(obj["state_dict"])]
        holds += [h for h in describe_torch_object(obj) if not h.startswith("state_dict")]
    elif _is_rosinality_sd(obj):
        sd = _tensor_dict(obj)
        fmt = "rosinality-state-dict"
        w_avg = None
        holds = [f"a bare generator state dict ({len(sd)} tensors)"]
    else:
        keys = list(obj.keys())[:8] if isinstance(obj, Mapping) else []
        raise CheckpointError(
            path,
            "unknown layout: not a rosinality, e4e/pSp or cycle-encoding generator"
            + (f" (top-level keys: {', '.join(map(str, keys))})" if keys else f" (holds a {type(obj).__name__})"),
        )
    config = rosinality.infer_generator_config(sd, path)
    if w_avg is not None:
        w_avg = torch.as_tensor(w_avg).float().reshape(-1)
    return GeneratorWeights(config, sd, w_avg, fmt, holds)


def read_generator_weights(path: str | Path) -> GeneratorWeights:
    """Read a generator's architecture and weights from any supported file (nothing is built yet)."""
    p = Path(path)
    kind = sniff(p)
    if kind == "safetensors":
        nf: NativeFile = read_native(p, kind="generator")
        config = read_config(GeneratorConfig, nf.config, p, "generator")
        t = dict(nf.tensors)
        w_avg = t.pop("latent_avg", None)
        return GeneratorWeights(config, t, w_avg, "cycle-encoding", ["generator", "latent_avg"], nf.provenance)
    if kind == "pickle":
        pk = nvidia.read_nvidia_pickle(p)
        name = "G_ema" if "G_ema" in pk.networks else ("G" if "G" in pk.networks else None)
        if name is None:
            raise CheckpointError(p, f"an NVIDIA pickle without G_ema or G (holds {', '.join(pk.networks)})")
        config, sd, w_avg = nvidia.nvidia_generator_to_rosinality(pk.networks[name], p)
        holds = [f"{k} ({v.class_name})" for k, v in pk.networks.items()] + list(pk.other)
        return GeneratorWeights(config, sd, w_avg, f"nvidia-pkl ({name})", holds)
    return _from_torch_object(torch_load(p), p)


def build_generator(weights: GeneratorWeights, source: str | Path, device: str | torch.device = "cpu") -> Generator:
    # the architecture (declared by own-format files, inferred from shapes otherwise) must fit the tensors' shapes
    # before the network is allocated: a small file must not make the loader build a huge network
    check_declared_architecture(
        lambda: Generator(weights.config), weights.state_dict, source, "generator",
        counts={"n_mlp": weights.config.n_mlp}, derived=lambda k: k.endswith(".kernel"),
    )  # fmt: skip
    G = Generator(weights.config)
    # resampling kernels are fixed buffers derived from the architecture; some layouts do not store them
    G.load_state_dict({**{k: v for k, v in G.state_dict().items() if k.endswith(".kernel")}, **weights.state_dict})
    G = G.to(device)
    if weights.w_avg is not None:
        if weights.w_avg.numel() != G.w_dim:
            raise CheckpointError(
                source,
                f"latent_avg has {weights.w_avg.numel()} values, expected {G.w_dim} (the style dimension)",
            )
        G.w_avg.copy_(weights.w_avg.to(G.w_avg))
    else:
        G.compute_w_avg(W_AVG_SAMPLES)
    return G.eval().requires_grad_(False)


def load_generator(path: str | Path, device: str | torch.device = "cpu") -> Generator:
    """Load a StyleGAN2 generator from any supported file (architecture inferred from the tensors), in eval mode with
    gradients off; ``G.provenance`` says where it came from."""
    device = resolve_device(device)
    p = resolve_model(path)
    w = read_generator_weights(p)
    G = build_generator(w, p, device)
    G.provenance = {"source_file": str(p), "source_format": w.format, **w.provenance}  # type: ignore[assignment]
    return G


def open_generator_arg(generator: str | Path | Generator, device: torch.device) -> tuple[Generator, str | None]:
    """A generator given as a network (moved to ``device``, eval mode, gradients off) or as a file (loaded): the
    generator and the file it came from (None for a network)."""
    if isinstance(generator, Generator):
        return generator.to(device).eval().requires_grad_(False), None
    return load_generator(generator, device=device), str(generator)


def is_generator_buffer(key: str) -> bool:
    """Whether a generator state-dict key is a fixed buffer (noise map, resampling kernel), not a parameter."""
    return key.startswith("noises.") or key.endswith(".kernel")


def generator_tensors(G: Generator) -> dict[str, torch.Tensor]:
    """Every tensor that defines G's output: its state dict (weights, noise maps, kernels) and ``w_avg``."""
    return {**G.state_dict(), "latent_avg": G.w_avg}


def save_generator(G: Generator, path: str | Path, provenance: dict[str, Any] | None = None) -> Path:
    """Write ``G`` in the project's own format (safetensors + architecture and provenance JSON)."""
    prov = default_provenance(**getattr(G, "provenance", {})) if provenance is None else provenance
    return save_native(path, "generator", G.config.to_dict(), generator_tensors(G), prov)


def convert_generator(src: str | Path, dst: str | Path, to: str = "native", generator: Generator | None = None) -> Path:
    """Convert a generator file to the project's format (``native``) or rosinality's ``.pt`` (``rosinality``);
    ``generator``: ``src`` already read (e.g. a stored change rebuilt on its base), its provenance kept."""
    G = load_generator(src) if generator is None else generator
    if to == "native":
        prov = default_provenance(
            base=(getattr(G, "provenance", None) or {}).get("base"),
            source_file=Path(src).name,
            source_format=G.provenance["source_format"],
            source_sha256=file_sha256(resolve_model(src)),
        )
        return save_generator(G, dst, prov)
    if to == "rosinality":
        return rosinality.export_rosinality(G, dst)
    raise ValueError(f"unknown target format {to!r} (native or rosinality)")
