"""Finding the perception networks' weight files (LPIPS' ImageNet backbones, ArcFace, MoCo) where users keep them, in
the order docs/TRAINING.md, "Network files" gives; a missing one is an error naming it, where it usually lives, the
option and an offline network."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch

from ..errors import CycleEncodingError
from ..paths import cache_dir
from ..utils import read_json

CONFIG_ENV = "CYCLE_ENCODING_NETWORKS"
SHIPPED_CONFIG = Path(__file__).resolve().parents[1] / "assets" / "network_files.json"

# the distances / identity networks that need no download, by domain (for the suggestion of a missing file)
OFFLINE = {
    "faces": {"perceptual": "dlib-face", "identity": "dlib-face"},
    "fashion-mnist": {"perceptual": "fmnist-features", "identity": "fmnist-features"},
}


def torch_hub_checkpoints() -> Path:
    """torch's download cache for model weights: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


@lru_cache(maxsize=4)
def _read_config(path: str) -> dict[str, Any]:
    data = read_json(Path(path))
    if not isinstance(data, dict):
        raise CycleEncodingError(f"{path}: the network files config must be a JSON object")
    return data


def network_files_config() -> tuple[Path, dict[str, Any]]:
    """(the config file in use, its contents): ``$CYCLE_ENCODING_NETWORKS`` when set, else the shipped one."""
    path = Path(os.environ.get(CONFIG_ENV) or SHIPPED_CONFIG)
    return path, _read_config(str(path))


def network_entry(network: str) -> dict[str, Any]:
    """The config's entry for ``network`` (``lpips-alex``, ``lpips-vgg``, ``arcface``, ``moco``); {} if none."""
    _, cfg = network_files_config()
    entry = cfg.get(network)
    return dict(entry) if isinstance(entry, dict) else {}


def _folders(entry: dict[str, Any]) -> list[Path]:
    hub, cache = str(torch_hub_checkpoints()), str(cache_dir(create=False))
    return [
        Path(str(f).replace("{torch_hub}", hub).replace("{cache}", cache)).expanduser()
        for f in entry.get("folders") or []
    ]


@dataclass
class Located:
    """A network's weight file and how it was found: ``how`` is 'option', 'recorded', 'torch hub cache' or
    'config' (the file named by ``config``)."""

    network: str
    path: Path
    how: str
    config: str | None = None

    def describe(self) -> str:
        where = {
            "option": "given",
            "recorded": "recorded by the run / encoder",
            "torch hub cache": "found in the torch hub cache",
            "config": f"found by {Path(self.config).name if self.config else 'the config'}",
        }.get(self.how, self.how)
        return f"{self.path} ({where})"

    def record(self) -> dict[str, str]:
        return {"file": str(self.path), "found": self.how}


def offline_alternative(kind: str, domain: str | None) -> str:
    """The offline choice for ``kind`` ('perceptual' or 'identity') in ``domain`` (None: both domains' named)."""
    opt = "--perceptual" if kind == "perceptual" else "--identity"
    if domain in OFFLINE:
        name = OFFLINE[domain][kind]
        label = {"faces": "face", "fashion-mnist": "Fashion-MNIST"}[domain]
        return f"offline, {opt} {name} is the {label} network that exists here"
    names = " (faces) or ".join(OFFLINE[d][kind] for d in ("faces", "fashion-mnist"))
    return f"offline, use {opt} {names} (Fashion-MNIST)"


def missing_file_message(network: str, domain: str | None = None, tried: list[str] | None = None) -> str:
    """The one-line error for a network whose file was not found: the file, where it usually lives, the option,
    and an offline alternative for the domain."""
    e = network_entry(network)
    fname = e.get("file", f"{network}.pth")
    kind = "perceptual" if network.startswith("lpips") else "identity"
    looked = f"; looked in {', '.join(tried)}" if tried else ""
    return (
        f"{network} needs {fname} ({e.get('what', 'its weights')}), which no package ships and nothing downloads: it "
        f"usually lives in {e.get('usually', 'a folder of your choice')}; pass {e.get('option', '--weights')} FILE or "
        f"put it there{looked}; {offline_alternative(kind, domain)}"
    )


def locate_network_file(
    network: str,
    given: str | Path | None = None,
    recorded: str | Path | None = None,
    domain: str | None = None,
) -> Located:
    """The weight file of ``network`` (search order: docs/TRAINING.md, "Network files"), else a one-line error."""
    if given is not None:
        p = Path(given).expanduser()
        if not p.is_file():
            raise CycleEncodingError(f"{p}: no such file (the weights given for {network})")
        return Located(network, p, "option")
    entry = network_entry(network)
    tried: list[str] = []
    if recorded is not None:
        p = Path(recorded).expanduser()
        if p.is_file():
            return Located(network, p, "recorded")
        tried.append(f"{p} (recorded, gone)")
    fname = entry.get("file")
    if fname:
        hub = torch_hub_checkpoints() / fname
        if hub.is_file():
            return Located(network, hub, "torch hub cache")
        tried.append(str(hub.parent))
        cfg_path, _ = network_files_config()
        for folder in _folders(entry):
            cand = folder / fname
            if cand.is_file():
                return Located(network, cand.resolve(), "config", config=str(cfg_path))
            tried.append(str(folder))
    raise CycleEncodingError(missing_file_message(network, domain, tried))
