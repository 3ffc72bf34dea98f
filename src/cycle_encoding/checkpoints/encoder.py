"""Loading and saving encoders: e4e / pSp / Cycle Encoding ``.pt`` checkpoints (architecture read off the tensors)
and the own format. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.encoder".
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from itertools import groupby
from pathlib import Path
from typing import Any

import torch

from ..assets import resolve_model
from ..errors import CheckpointError
from ..networks.encoder import Encoder4Editing, EncoderConfig
from ..utils import resolve_device
from . import e4e
from .common import check_declared_architecture, check_state_dict, count_parameters, sniff, torch_load
from .generator import is_generator_buffer
from .native import default_provenance, native_header_of_kind, read_config, read_native, read_native_header, save_native
from .rosinality import infer_generator_config

_UNIT = re.compile(r"^body\.(\d+)\.res_layer\.1\.weight$")
_STYLE = re.compile(r"^styles\.(\d+)\.linear\.weight$")
_HEAD_CONV = re.compile(r"^styles\.0\.convs\.(\d+)\.weight$")

# the ``format`` of a ``train-encoder`` run's checkpoint.pt (written by training/encoder_trainer.py)
TRAINING_CHECKPOINT_FORMAT = "cycle-encoding-train"

ENCODER_TYPES = {"Encoder4Editing": "delta", "GradualStyleEncoder": "independent"}


def infer_encoder_config(
    sd: Mapping[str, torch.Tensor], source: str | Path, opts: Mapping[str, Any] | None = None
) -> EncoderConfig:
    """The architecture of an encoder state dict (keys without the ``encoder.`` prefix)."""
    opts = opts or {}
    if "input_layer.0.weight" not in sd or "styles.0.linear.weight" not in sd:
        raise CheckpointError(source, "not an e4e/pSp encoder: missing input_layer.0.weight or styles.0.linear.weight")
    enc_type = str(opts.get("encoder_type", "Encoder4Editing"))
    if enc_type not in ENCODER_TYPES:
        raise CheckpointError(
            source, f"encoder_type {enc_type!r} is not supported (supported: {', '.join(ENCODER_TYPES)})"
        )
    units = sorted(int(m.group(1)) for k in sd if (m := _UNIT.match(k)))
    if not units or units != list(range(len(units))):
        raise CheckpointError(source, "the encoder body's units are missing or not numbered 0..n")
    depths = [int(sd[f"body.{i}.res_layer.1.weight"].shape[0]) for i in units]
    blocks = [(d, len(list(run))) for d, run in groupby(depths)]  # consecutive units of one width: a block
    widths, counts = [d for d, _ in blocks], [n for _, n in blocks]
    if len(widths) != 4:
        raise CheckpointError(source, f"the encoder body has {len(widths)} blocks of widths {widths}, expected 4")
    in_channels = int(sd["input_layer.0.weight"].shape[1])
    mode = "ir_se" if "body.0.res_layer.5.fc1.weight" in sd else "ir"
    w_dim = int(sd["styles.0.linear.weight"].shape[0])
    heads = sorted({int(m.group(1)) for k in sd if (m := _STYLE.match(k))})
    n_convs0 = len({int(m.group(1)) for k in sd if (m := _HEAD_CONV.match(k))})
    input_size = 16 * 2**n_convs0
    num_ws = len(heads)
    style_mode = ENCODER_TYPES[enc_type]
    size = opts.get("stylegan_size") or opts.get("output_size")
    if size:
        num_ws = 2 * round(math.log2(float(size))) - 2
    try:
        return EncoderConfig(
            num_ws=num_ws,
            w_dim=w_dim,
            input_size=input_size,
            in_channels=in_channels,
            widths=tuple(widths),
            units=tuple(counts),
            mode=mode,  # type: ignore[arg-type]
            max_stage=len(heads) - 1 if style_mode == "delta" else None,
            style_mode=style_mode,  # type: ignore[arg-type]
        )
    except ValueError as e:
        raise CheckpointError(source, f"the encoder's shapes fit no architecture: {e}") from None


def build_encoder(
    config: EncoderConfig,
    sd: Mapping[str, torch.Tensor],
    source: str | Path,
    latent_avg: torch.Tensor | None,
) -> Encoder4Editing:
    # the declared architecture must fit the tensors' shapes before the encoder is allocated
    check_declared_architecture(
        lambda: Encoder4Editing(config), sd, source, "encoder",
        counts={"num_ws": config.num_ws, "units": sum(config.units)}, derived=lambda k: k == "latent_avg",
    )  # fmt: skip
    E = Encoder4Editing(config)
    E.load_state_dict({"latent_avg": E.latent_avg, **sd})
    if latent_avg is not None:
        la = latent_avg.float()
        if la.shape[-1] != config.w_dim:
            raise CheckpointError(source, f"latent_avg has width {la.shape[-1]}, the encoder's codes {config.w_dim}")
        E.set_w_avg(la.reshape(-1, config.w_dim)[: config.num_ws] if la.ndim == 2 else la)
    return E


def encoder_from_training_checkpoint(obj: dict[str, Any], path: Path, device: torch.device) -> Encoder4Editing:
    """The encoder of a training checkpoint (``checkpoint.pt``), at the stage the run was in."""
    E = Encoder4Editing(EncoderConfig.from_dict(obj["encoder_config"]))
    E.load_state_dict(obj["encoder"])
    E.trained_stage = int(obj.get("trained_stage", E.max_stage))
    E.stage = E.trained_stage
    cfg = obj.get("config") or {}
    E.provenance = {  # type: ignore[assignment]
        "source_file": str(path), "source_format": TRAINING_CHECKPOINT_FORMAT, "step": obj.get("step"),
        "networks": {"perceptual": cfg.get("perceptual", "none") if cfg.get("perceptual_lambda", 1) else "none",
                     "identity": cfg.get("identity", "none") if cfg.get("identity_lambda", 1) else "none"},
        "network_files": obj.get("network_files") or {
            k: {"file": cfg[w]} for k, w in (("perceptual", "lpips_backbone"), ("identity", "identity_weights"))
            if cfg.get(w)},
    }  # fmt: skip
    return E.to(device).eval()


def e4e_loss_networks(opts: Mapping[str, Any]) -> dict[str, str]:
    """The loss networks an e4e / pSp / Cycle Encoding run was trained with, read from its ``opts``: LPIPS with
    AlexNet when ``lpips_lambda`` > 0 (e4e's and pSp's LPIPS is ``net_type='alex'``); for ``id_lambda`` > 0 ArcFace
    on face datasets (``dataset_type`` naming ffhq or celeba), else MoCo (e4e's rule). {} when ``opts`` does not say."""
    out: dict[str, str] = {}
    try:
        if "lpips_lambda" in opts:
            out["perceptual"] = "lpips-alex" if float(opts["lpips_lambda"]) > 0 else "none"
        if "id_lambda" in opts:
            faces = any(k in str(opts.get("dataset_type", "ffhq")).lower() for k in ("ffhq", "celeb"))
            out["identity"] = ("arcface" if faces else "moco") if float(opts["id_lambda"]) > 0 else "none"
    except (TypeError, ValueError):
        return {}
    return out


def load_encoder(path: str | Path, device: str | torch.device = "cpu") -> Encoder4Editing:
    """Load an encoder (e4e / pSp / Cycle Encoding ``.pt`` or the project's ``.safetensors``) in eval mode, at the
    stage its training ended in where the file records it, else all offsets (as the authors' inference does)."""
    p = resolve_model(path)
    kind = sniff(p)
    prov: dict[str, Any]
    if kind == "safetensors":
        nf = read_native(p, kind="encoder", what="an encoder")
        config = read_config(EncoderConfig, nf.config, p, "encoder")
        E = build_encoder(config, nf.tensors, p, None)
        E.trained_stage = nf.extra.get("trained_stage")
        prov = {**nf.provenance, "source_format": "cycle-encoding"}
    elif kind in ("torch-zip", "torch-legacy"):
        obj = torch_load(p)
        if isinstance(obj, Mapping) and obj.get("format") == TRAINING_CHECKPOINT_FORMAT:
            return encoder_from_training_checkpoint(obj, p, resolve_device(device))
        if not e4e.is_e4e_checkpoint(obj):
            raise CheckpointError(
                p, "unknown layout: not an e4e/pSp/Cycle Encoding checkpoint (no state_dict with encoder.*)"
            )
        sd = e4e.split_prefix(obj["state_dict"], "encoder")
        if not sd:
            raise CheckpointError(p, "an e4e/pSp checkpoint without encoder.* keys: it holds no encoder")
        opts = e4e.e4e_opts(obj)
        config = infer_encoder_config(sd, p, opts)
        la = obj.get("latent_avg")
        E = build_encoder(config, sd, p, la if isinstance(la, torch.Tensor) else None)
        prov = {"source_file": str(p), "source_format": "e4e", "encoder_type": opts.get("encoder_type", "?")}
        nets = e4e_loss_networks(opts)
        if nets:
            prov["networks"] = nets
        if not isinstance(la, torch.Tensor):
            prov["warning"] = "no latent_avg in the file: codes are not offset until set_w_avg() is called"
    else:
        raise CheckpointError(p, f"a {kind} file is not an encoder checkpoint")
    if E.trained_stage is not None:
        E.stage = E.trained_stage
    E.provenance = prov  # type: ignore[assignment]
    return E.to(resolve_device(device)).eval()


def init_encoder_weights(E: Encoder4Editing, path: str | Path) -> str:
    """Initialize from an ArcFace IR-SE file (input layer and body where shapes fit) or a whole encoder file."""
    p = resolve_model(path)  # a shipped encoder's name (fmnist-encoder) works as a file does
    kind = sniff(p)
    obj = torch_load(p) if kind in ("torch-zip", "torch-legacy") else None
    if isinstance(obj, dict) and "input_layer.0.weight" in obj and "output_layer.3.weight" in obj:
        own = E.state_dict()
        taken = {k: v for k, v in obj.items() if k.startswith(("input_layer.", "body.")) and k in own}
        bad = [k for k, v in taken.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise CheckpointError(
                p,
                f"ArcFace key {bad[0]} has shape {list(taken[bad[0]].shape)}, the encoder's body "
                f"{list(own[bad[0]].shape)}: initialise an IR-SE-50 body (widths 64-512, units 3,4,14,3) only",
            )
        E.load_state_dict(taken, strict=False)
        return f"body from ArcFace {p.name} ({len(taken)} tensors)"
    other = load_encoder(p)
    if other.config.num_ws != E.config.num_ws:
        raise CheckpointError(
            p, f"the encoder has {other.config.num_ws} heads but the generator has {E.config.num_ws} style layers"
        )
    sd = other.state_dict()
    sd["latent_avg"] = E.latent_avg
    check_state_dict(E, sd, p, "encoder (init)")
    E.load_state_dict(sd)
    return f"all weights from encoder {p.name}"


def save_encoder(
    E: Encoder4Editing, path: str | Path, provenance: dict[str, Any] | None = None, trained_stage: int | None = None
) -> Path:
    """Write ``E`` in the project's format; ``trained_stage`` (default ``E.trained_stage``) is recorded."""
    stage = E.trained_stage if trained_stage is None else trained_stage
    prov = provenance or default_provenance(**getattr(E, "provenance", {}))
    return save_native(path, "encoder", E.config.to_dict(), dict(E.state_dict()), prov, extra={"trained_stage": stage})


def inspect_encoder_file(path: Path, container: str) -> dict[str, Any] | None:
    """``info`` for e4e-family checkpoints (encoder and decoder) and own-format encoders."""
    if container == "safetensors":
        h = native_header_of_kind(path, container, "encoder")
        if h is None:
            return None
        E = load_encoder(path)
        return {
            "format": "cycle-encoding",
            "network": "e4e encoder (Encoder4Editing)",
            "architecture": E.config.to_dict(),
            "parameters": sum(p.numel() for p in E.parameters()),
            "trained_stage": E.trained_stage,
            "provenance": h.get("provenance", {}),
        }
    if container not in ("torch-zip", "torch-legacy"):
        return None
    obj = torch_load(path)
    if not e4e.is_e4e_checkpoint(obj):
        return None
    out: dict[str, Any] = {"format": "e4e / pSp / Cycle Encoding checkpoint"}
    sd = obj["state_dict"]
    opts = e4e.e4e_opts(obj)
    enc = e4e.split_prefix(sd, "encoder")
    if enc:
        cfg = infer_encoder_config(enc, path, opts)
        out["encoder"] = {
            "type": opts.get("encoder_type", "Encoder4Editing"),
            "architecture": cfg.to_dict(),
            "parameters": count_parameters(enc, lambda k: "running_" in k or "num_batches" in k),
        }
    dec = e4e.split_prefix(sd, "decoder")
    if dec:
        gcfg = infer_generator_config(dec, path)
        out["generator"] = {
            "architecture": {**gcfg.to_dict(), "num_ws": gcfg.num_ws},
            "parameters": count_parameters(dec, is_generator_buffer),
        }
    out["training_stage"] = "not stored in e4e-family files (inference turns all offsets on)"
    out["holds"] = [e4e.describe_state_dict(sd), *(k for k in obj if k != "state_dict")]
    if opts:
        out["opts"] = {k: opts[k] for k in sorted(opts) if isinstance(opts[k], (int, float, str, bool))}
    return out


def encoder_provenance_unloaded(path: str | Path) -> dict[str, Any] | None:
    """An encoder file's provenance read without its weights ({} for e4e-family ``.pt`` files, which record none);
    None when only loading it tells (a ``train-encoder`` checkpoint, a legacy ``.pt``, a file that does not read)."""
    p = resolve_model(path)
    try:
        kind = sniff(p)
        if kind == "safetensors":
            header = read_native_header(p)
            return dict(header.get("provenance") or {}) if header.get("kind") == "encoder" else None
        if kind == "torch-zip":
            return {} if e4e.is_e4e_checkpoint(torch_load(p, mmap=True)) else None
    except (CheckpointError, OSError):
        return None  # loading the file gives the error
    return None
