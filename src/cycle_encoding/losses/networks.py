"""The networks a run's losses use (``LossNetworks``), built by name from the registries, with the files they were
read from recorded so that the next run (``invert`` after ``train-encoder``) reads the same ones."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .identity import build_identity
from .perceptual import build_perceptual


@dataclass
class LossNetworks:
    """The frozen networks the losses use; None where a term is off. ``names()`` is what logs record."""

    perceptual: nn.Module | None = None
    identity: nn.Module | None = None

    def _kinds(self) -> list[tuple[str, nn.Module | None]]:
        return [("perceptual", self.perceptual), ("identity", self.identity)]

    def names(self) -> dict[str, str]:
        return {k: getattr(net, "name", type(net).__name__) if net else "none" for k, net in self._kinds()}

    def _located(self) -> list[tuple[str, str, Any]]:
        """(kind, registered name, where its file was found) of each network read from a file."""
        found = [(k, net) for k, net in self._kinds() if getattr(net, "located", None) is not None]
        return [(k, str(getattr(net, "registry_name", "")), net.located) for k, net in found]

    def files(self) -> dict[str, dict[str, str]]:
        """The weight files the networks were read from and how each was found (runs record this)."""
        return {kind: {"name": name, **loc.record()} for kind, name, loc in self._located()}

    def file_lines(self) -> list[str]:
        """One line per network read from a file: which file, and how it was found."""
        return [f"{kind} {name}: {loc.describe()}" for kind, name, loc in self._located()]


def recorded_networks(provenance: Mapping[str, Any] | None) -> dict[str, dict[str, str]]:
    """The loss networks an encoder file says it was trained with: ``{'perceptual': {'name', 'file'?}, 'identity':
    ...}`` from its provenance (``network_files`` with the files, else ``networks``' names: the registered name is
    the first word of a recorded display name such as "lpips-alex (backbone alexnet-owt-7be5be79.pth)")."""
    prov = provenance if isinstance(provenance, Mapping) else {}
    names = prov.get("networks") if isinstance(prov.get("networks"), Mapping) else {}
    files = prov.get("network_files") if isinstance(prov.get("network_files"), Mapping) else {}
    out: dict[str, dict[str, str]] = {}
    for kind in ("perceptual", "identity"):
        shown = str(names.get(kind) or "").split()
        f = files.get(kind) if isinstance(files.get(kind), Mapping) else {}
        rec = {"name": str(f.get("name") or (shown[0] if shown else ""))}
        if f.get("file"):
            rec["file"] = str(f["file"])
        if rec["name"]:
            out[kind] = rec
    return out


def build_loss_networks(
    perceptual: str | None,
    lpips_backbone: str | Path | None,
    identity: str | None,
    identity_weights: str | Path | None,
    device: str | torch.device,
    need_perceptual: bool = True,
    need_identity: bool = True,
    recorded: Mapping[str, Mapping[str, str]] | None = None,
    domain: str | None = None,
) -> LossNetworks:
    """Build the networks named (``"none"`` or None: no network). Unneeded ones are not built (no file is read).
    Weight files not given are looked up (``checkpoints.locate``), first the one ``recorded`` for the same network
    (``recorded_networks``); ``domain`` picks the offline alternative a missing-file error suggests."""
    nets = {}
    for kind, name, weights, build, need in (
        ("perceptual", perceptual, lpips_backbone, build_perceptual, need_perceptual),
        ("identity", identity, identity_weights, build_identity, need_identity),
    ):
        if need and name and name != "none":
            rec = (recorded or {}).get(kind) or {}
            net = build(name, device, weights, rec.get("file") if rec.get("name") == name else None, domain)
            nets[kind] = net.requires_grad_(False).eval()
    return LossNetworks(**nets)
