"""A tuned generator stored as its bit-exact change from the base generator (XOR of the bit patterns, byte-shuffled,
zlib): the own format's kind ``generator_delta``. Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.delta".
"""

from __future__ import annotations

import copy
import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..assets import resolve_model
from ..errors import CheckpointError, CycleEncodingError
from ..networks.stylegan2 import Generator, GeneratorConfig
from ..utils import resolve_device
from .common import sniff
from .generator import generator_tensors, load_generator
from .inspect import register_inspector
from .native import default_provenance, native_header_of_kind, native_info, read_native, read_native_header, save_native

DELTA_KIND = "generator_delta"
ENCODING = "xor-bits+byte-shuffle+zlib"
ENCODING_VERSION = 1

_INT_OF_WIDTH = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def weights_sha256(G: Generator | dict[str, torch.Tensor]) -> str:
    """sha256 over (name, dtype, shape, bytes) of each tensor in name order: the identity of a generator's weights,
    whatever file it came from."""
    tensors = generator_tensors(G) if isinstance(G, Generator) else G
    h = hashlib.sha256()
    for k in sorted(tensors):
        v = tensors[k].detach().to("cpu").contiguous()
        h.update(f"{k}|{v.dtype}|{list(v.shape)}|".encode())
        h.update(v.view(-1).view(torch.uint8).numpy().tobytes() if v.numel() else b"")
    return h.hexdigest()


def full_copy_bytes(G: Generator) -> int:
    """Bytes of G's tensors in a full copy (the project's generator file, less its small JSON header)."""
    return int(sum(v.numel() * v.element_size() for v in generator_tensors(G).values()))


def _bits(t: torch.Tensor) -> np.ndarray:
    v = t.detach().to("cpu").contiguous().view(-1)
    return v.view(_INT_OF_WIDTH[v.element_size()]).numpy()


def encode_change(base: torch.Tensor, tuned: torch.Tensor, level: int = 1) -> bytes:
    """zlib(byte-shuffle(bits(base) XOR bits(tuned))) for two tensors of one dtype and shape."""
    x = np.bitwise_xor(_bits(base), _bits(tuned))
    width = x.dtype.itemsize
    planes = x.view(np.uint8).reshape(-1, width).T  # [width, n]: byte plane k = byte k of every element
    return zlib.compress(np.ascontiguousarray(planes).tobytes(), level)


def decode_change(base: torch.Tensor, blob: bytes) -> torch.Tensor:
    """The tuned tensor from the base and ``encode_change``'s bytes (bit-exact)."""
    b = _bits(base)
    width = b.dtype.itemsize
    need = b.size * width
    # never expand more than the tensor needs (a small crafted stream can claim gigabytes)
    d = zlib.decompressobj()
    raw = d.decompress(blob, need)
    if len(raw) < need:
        raise ValueError(f"the stored change has {len(raw)} bytes, the tensor needs {need}")
    if not d.eof or d.unconsumed_tail or d.decompress(b"", 1):
        raise ValueError(f"the stored change does not end at the {need} bytes the tensor needs (longer or cut)")
    x = np.frombuffer(raw, dtype=np.uint8).reshape(width, -1).T.copy().view(b.dtype).reshape(-1)
    return torch.from_numpy(np.bitwise_xor(b, x)).view(base.dtype).view(base.shape)


@dataclass
class DeltaInfo:
    path: Path
    file_bytes: int
    full_copy_bytes: int
    changed: int  # tensors stored
    unchanged: int
    tuned_sha256: str

    @property
    def ratio(self) -> float:
        """File size as a fraction of a full copy."""
        return self.file_bytes / max(1, self.full_copy_bytes)


def save_generator_delta(
    base: Generator,
    tuned: Generator,
    path: str | Path,
    base_file: str | None = None,
    provenance: dict[str, Any] | None = None,
    extra: dict[str, Any] | None = None,
    level: int = 1,
    base_sha256: str | None = None,
) -> DeltaInfo:
    """Write ``tuned`` as its change from ``base``; ``base_file``: the name a wrong base is
    refused with; ``base_sha256``: the base's hash when the caller knows it."""
    if base.config != tuned.config:
        raise ValueError("the tuned generator's architecture differs from the base's")
    bt, tt = generator_tensors(base), generator_tensors(tuned)
    blobs: dict[str, torch.Tensor] = {}
    meta: dict[str, Any] = {}
    unchanged: list[str] = []
    for k in sorted(bt):
        a, b = bt[k].detach().cpu(), tt[k].detach().cpu()
        if a.dtype != b.dtype or a.shape != b.shape:
            raise ValueError(f"tensor {k}: {a.dtype}{list(a.shape)} in the base, {b.dtype}{list(b.shape)} tuned")
        if torch.equal(a.view(-1).view(torch.uint8), b.view(-1).view(torch.uint8)):
            unchanged.append(k)
            continue
        blob = encode_change(a, b, level)
        blobs[k] = torch.frombuffer(bytearray(blob), dtype=torch.uint8)
        meta[k] = {"dtype": str(a.dtype).replace("torch.", ""), "shape": list(a.shape), "stored_bytes": len(blob)}
    tuned_hash, full = weights_sha256(tt), full_copy_bytes(base)
    header_extra = {
        "encoding": ENCODING,
        "encoding_version": ENCODING_VERSION,
        "tensors": meta,
        "unchanged": unchanged,
        "base": {
            "weights_sha256": base_sha256 or weights_sha256(bt),
            "file": base_file,
            "source": getattr(base, "provenance", {}).get("source_file"),
        },
        "tuned_weights_sha256": tuned_hash,
        "full_copy_bytes": full,
        **(extra or {}),
    }
    p = save_native(path, DELTA_KIND, base.config.to_dict(), blobs, provenance or default_provenance(), header_extra)
    return DeltaInfo(Path(p), Path(p).stat().st_size, full, len(blobs), len(unchanged), tuned_hash)


def load_generator_delta(path: str | Path, base: Generator | str | Path) -> Generator:
    """Rebuild the tuned generator from its base (a Generator or a generator file) and the delta file; a base of
    other weights is refused, and the rebuilt generator's hash is checked."""
    p = Path(path)
    nf = read_native(p, kind=DELTA_KIND)
    ex = nf.extra
    if ex.get("encoding") != ENCODING or int(ex.get("encoding_version", 0)) > ENCODING_VERSION:
        raise CheckpointError(
            p, f"unknown delta encoding {ex.get('encoding')!r} (version {ex.get('encoding_version')})"
        )
    if isinstance(base, (str, Path)):
        base = load_generator(base)
    want = ex.get("base", {})
    try:
        cfg = GeneratorConfig.from_dict(nf.config)
    except (TypeError, ValueError) as e:
        raise CheckpointError(p, f"bad generator configuration in the delta: {e}") from None
    named = want.get("file") or want.get("source") or "its base generator"
    if cfg != base.config:
        raise CheckpointError(p, f"made from {named}, whose architecture differs from the generator given")
    bt = generator_tensors(base)
    have = weights_sha256(bt)
    if have != want.get("weights_sha256"):
        raise CheckpointError(
            p,
            f"made from {named} (weights sha256 {str(want.get('weights_sha256'))[:12]}...), but the base generator "
            f"given has other weights ({have[:12]}...): give the generator the delta was made from",
        )
    out = copy.deepcopy(base)
    dst = generator_tensors(out)  # state-dict tensors share the parameters' storage: copy_ writes into ``out``
    declared = ex.get("tensors") or {}
    for k, blob in nf.tensors.items():
        if k not in bt:
            raise CheckpointError(p, f"the delta changes tensor {k}, which the generator does not have")
        spec = declared.get(k) if isinstance(declared, dict) else None
        bdt = str(bt[k].dtype).replace("torch.", "")
        if not isinstance(spec, dict) or spec.get("shape") != list(bt[k].shape) or spec.get("dtype") != bdt:
            raise CheckpointError(
                p, f"tensor {k}: the header declares {spec!r:.80}, the generator's is {bdt}{list(bt[k].shape)}"
            )
        try:
            dst[k].copy_(decode_change(bt[k].detach().cpu(), blob.numpy().tobytes()))
        except (zlib.error, ValueError) as e:
            raise CheckpointError(p, f"tensor {k}: corrupt stored change ({e})") from None
    if weights_sha256(out) != ex.get("tuned_weights_sha256"):
        raise CheckpointError(p, "the rebuilt generator's weights do not match the stored hash (corrupt file?)")
    out.provenance = {"source_file": str(p), "source_format": DELTA_KIND, "base": named}  # type: ignore[assignment]
    return out.eval().requires_grad_(False)


def inspect_generator_delta(path: Path, container: str) -> dict[str, Any] | None:
    h = native_header_of_kind(path, container, DELTA_KIND)
    if h is None:
        return None
    ex = h.get("extra", {})
    full = int(ex.get("full_copy_bytes", 0))
    size = path.stat().st_size
    return native_info(
        h,
        "tuned StyleGAN2 generator, stored as its change from a base generator",
        encoding=ex.get("encoding"),
        base=ex.get("base", {}),
        changed_tensors=len(ex.get("tensors", {})),
        unchanged_tensors=len(ex.get("unchanged", [])),
        size_vs_full_copy=f"{size:,} bytes vs {full:,} ({size / max(1, full):.1%})",
    )


register_inspector(inspect_generator_delta)


def is_generator_delta(path: str | Path) -> bool:
    """Whether ``path`` is a stored change (the own format's kind ``generator_delta``)."""
    p = Path(path)
    try:
        return p.is_file() and sniff(p) == "safetensors" and read_native_header(p).get("kind") == DELTA_KIND
    except (CheckpointError, OSError, ValueError):
        return False


def recorded_base(path: str | Path) -> Path | None:
    """The base generator file a stored change records, where it can be found: beside the change or in the folders
    above it (an inversion run keeps its changes in ``RUN/images/NAME/``, and its ``config.json`` records the base
    as it was given), else a shipped model of that name; None when none is there."""
    p = Path(path).resolve()
    base = (read_native_header(p).get("extra") or {}).get("base") or {}
    names = [n for n in (base.get("file"), base.get("source")) if n]
    folders = list(p.parents)[:4]
    for folder in folders:  # the run's own record first: it holds the path as given, not only the name
        cfg = folder / "config.json"
        if cfg.is_file():
            try:
                f = (json.loads(cfg.read_text()).get("generator") or {}).get("file")
            except (OSError, ValueError, AttributeError):
                f = None
            if f:
                names.insert(0, f)
                folders.append(folder.parent)
            break
    for n in names:
        for cand in [Path(n), *(d / n for d in folders)]:
            if cand.is_file():
                return cand
    for n in names:
        try:
            found = resolve_model(n)
        except CycleEncodingError:
            continue
        if found.is_file():
            return found
    return None


def open_generator(
    path: str | Path, base: Generator | str | Path | None = None, device: str | torch.device = "cpu"
) -> Generator:
    """Any generator file ``load_generator`` reads, or a stored change rebuilt on its base: ``base`` when given,
    else the base file the change records (``recorded_base``)."""
    if not is_generator_delta(path):
        if base is not None:
            raise CheckpointError(path, "a full generator, not a stored change: --base is only for changes")
        return load_generator(path, device=device)
    if base is None:
        base = recorded_base(path)
        if base is None:
            want = (read_native_header(path).get("extra") or {}).get("base") or {}
            raise CheckpointError(
                path,
                f"a tuned generator stored as its change from {want.get('file') or 'a base generator'}, which is not "
                "beside it: give the base generator with --base FILE",
            )
    return load_generator_delta(path, base).to(resolve_device(device))
