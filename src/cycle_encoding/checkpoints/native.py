"""The project's own model format: one ``.safetensors`` file whose metadata holds the kind, architecture and
provenance as JSON. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.native".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from ..errors import CheckpointError
from ..version import __version__
from .common import atomic_write, sniff

FORMAT_NAME = "cycle-encoding"
FORMAT_VERSION = 1
META_KEY = "cycle_encoding"


@dataclass
class NativeFile:
    kind: str
    config: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    provenance: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)


def file_sha256(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()


def default_provenance(**kw: Any) -> dict[str, Any]:
    now = _dt.datetime.now(_dt.timezone.utc).isoformat()
    return {"tool": f"cycle-encoding {__version__}", "created": now, **{k: v for k, v in kw.items() if v is not None}}


def save_native(
    path: str | Path,
    kind: str,
    config: dict[str, Any],
    tensors: dict[str, torch.Tensor],
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write tensors + architecture + provenance atomically to one safetensors file."""
    header = {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "kind": kind,
        "config": config,
        "provenance": provenance or default_provenance(),
        "extra": extra or {},
    }
    # safetensors refuses shared or non-contiguous storage: give it plain contiguous CPU copies
    plain = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    meta = {META_KEY: json.dumps(header, sort_keys=True)}
    return atomic_write(path, lambda tmp: save_file(plain, str(tmp), metadata=meta))


def read_native_header(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if sniff(p) != "safetensors":
        raise CheckpointError(p, "not a safetensors file")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise CheckpointError(p, f"cannot read safetensors file: {e}") from None
    if META_KEY not in meta:
        raise CheckpointError(p, "a safetensors file without cycle-encoding metadata (unknown layout)")
    try:
        header = json.loads(meta[META_KEY])
    except json.JSONDecodeError as e:
        raise CheckpointError(p, f"corrupt cycle-encoding metadata: {e}") from None
    if header.get("format") != FORMAT_NAME:
        raise CheckpointError(p, f"unknown metadata format {header.get('format')!r}")
    if int(header.get("format_version", 0)) > FORMAT_VERSION:
        raise CheckpointError(
            p, f"written by a newer cycle-encoding (format {header['format_version']}); please upgrade"
        )
    return header


def read_native(path: str | Path, kind: str | None = None, what: str | None = None) -> NativeFile:
    """An own-format file's header and tensors; with ``kind``, a file of another kind is an error saying it is not
    ``what`` (e.g. "an encoder"; default "a KIND")."""
    p = Path(path)
    header = read_native_header(p)
    if kind is not None and header["kind"] != kind:
        raise CheckpointError(p, f"a cycle-encoding {header['kind']} file, not {what or 'a ' + kind}")
    try:
        with safe_open(str(p), framework="pt") as f:
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CheckpointError(p, f"cannot read tensors (truncated or corrupt?): {e}") from None
    return NativeFile(
        kind=header["kind"],
        config=header.get("config", {}),
        tensors=tensors,
        provenance=header.get("provenance", {}),
        extra=header.get("extra", {}),
    )


def read_config(cls: Any, data: Any, path: str | Path, what: str) -> Any:
    """``cls.from_dict(data)``: a network's configuration from a file's header; a bad one is the file's error."""
    try:
        return cls.from_dict(data)
    except (TypeError, ValueError) as e:
        raise CheckpointError(path, f"bad {what} configuration in the file: {e}") from None


def stored_parameters(path: str | Path) -> int:
    """How many numbers the tensors of a safetensors file hold, from its header (no tensor is read)."""
    with safe_open(str(path), framework="pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def native_info(header: dict[str, Any], network: str, **fields: Any) -> dict[str, Any]:
    """``cycle-encoding info``'s description of an own-format file from its header, with ``fields``."""
    return {
        "format": FORMAT_NAME,
        "network": network,
        "architecture": header.get("config", {}),
        **fields,
        "provenance": header.get("provenance", {}),
        "holds": [header["kind"]],
    }


def native_header_of_kind(path: str | Path, container: str, kind: str) -> dict[str, Any] | None:
    """The header of an own-format file whose kind is ``kind``; None for any other file (for ``info`` inspectors)."""
    if container != "safetensors":
        return None
    try:
        h = read_native_header(path)
    except CheckpointError:
        return None
    return h if h.get("kind") == kind else None
