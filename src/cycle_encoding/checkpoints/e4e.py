"""e4e / pSp / ReStyle / Cycle Encoding checkpoints ``{'state_dict', 'opts', 'latent_avg', ...}``: the state dict's
networks split by prefix (``encoder.*`` for the encoder reader, ``decoder.*``: a rosinality generator)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any

import torch


def is_e4e_checkpoint(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and isinstance(obj.get("state_dict"), Mapping)
        and any(k.startswith(("encoder.", "decoder.")) for k in obj["state_dict"])
    )


def e4e_opts(obj: Mapping[str, Any]) -> dict[str, Any]:
    """The checkpoint's training options (``opts``: a dict, or the argparse Namespace pSp saved) as a dict."""
    opts = obj.get("opts") or {}
    return dict(opts) if isinstance(opts, Mapping) else vars(opts)


def split_prefix(sd: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The entries of ``sd`` under ``prefix.`` with the prefix removed."""
    p = prefix.rstrip(".") + "."
    return {k[len(p) :]: v for k, v in sd.items() if k.startswith(p)}


def describe_state_dict(sd: Mapping[str, Any]) -> str:
    """What the state dict holds by top-level prefix, e.g. ``state_dict: encoder.* (483), decoder.* (370)``."""
    return "state_dict: " + ", ".join(f"{k}.* ({n})" for k, n in Counter(k.split(".", 1)[0] for k in sd).items())


def latent_avg_vector(t: torch.Tensor | None) -> torch.Tensor | None:
    """e4e stores latent_avg as [N, 512] (rows repeated) or [512]: give the 512-d vector."""
    if t is None or not isinstance(t, torch.Tensor):
        return None
    rows = t.reshape(-1, t.shape[-1]).float()
    return rows[0].clone() if bool((rows == rows[0]).all()) else rows.mean(0)
