"""The one registry shape of the loss networks (perceptual distances, identity similarities): a network chosen by
name is made by ``factory(device, weights_file_or_None)``, registered with a one-line description."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

import torch
from torch import nn

from ..checkpoints.locate import locate_network_file, network_entry
from ..errors import CycleEncodingError
from ..utils import resolve_device

N = TypeVar("N", bound=nn.Module)


class NetworkRegistry(Generic[N]):
    """Names -> (factory, description); ``build`` makes the network on a device and tags it with ``registry_name``
    and ``located`` (which weights file was used and how it was found; None for a network without a file)."""

    def __init__(self, what: str) -> None:
        self.what = what  # e.g. "perceptual distance", in messages
        self.entries: dict[str, tuple[Callable[[torch.device, Path | None], N], str]] = {}

    def register(
        self, name: str, factory: Callable[[torch.device, Path | None], N], description: str = "", replace: bool = False
    ) -> None:
        """Make ``build(name, ...)`` call ``factory(device, weights)``. ``replace`` allows re-registering."""
        if name in self.entries and not replace:
            raise ValueError(f"the {self.what} name {name!r} is already registered")
        self.entries[name] = (factory, description)

    def unregister(self, name: str) -> None:
        """Remove a registered name (tests and plugins that register temporarily)."""
        self.entries.pop(name, None)

    def names(self) -> dict[str, str]:
        """Registered names -> one-line descriptions."""
        return {k: d for k, (_, d) in self.entries.items()}

    def build(
        self,
        name: str,
        device: str | torch.device = "cpu",
        weights: str | Path | None = None,
        recorded: str | Path | None = None,
        domain: str | None = None,
    ) -> N:
        """The network registered as ``name`` on ``device``; for a name the shipped network list knows, a ``weights``
        file not given is looked up (``checkpoints.locate``, the order in docs/TRAINING.md, "Network files"): first the one
        ``recorded`` by a run or encoder; not found, the error names ``domain``'s offline network."""
        if name not in self.entries:
            raise CycleEncodingError(f"unknown {self.what} {name!r} (known: {', '.join(sorted(self.entries))})")
        dev = resolve_device(device)
        located = locate_network_file(name, weights, recorded, domain) if network_entry(name) else None
        path = located.path if located is not None else Path(weights) if weights is not None else None
        net = self.entries[name][0](dev, path)
        net.registry_name = name  # type: ignore[assignment]
        net.located = located  # type: ignore[assignment]
        return net.to(dev)
