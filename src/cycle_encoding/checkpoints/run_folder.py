"""The run folder of ``cycle-encoding invert``: its layout, the primitives that write it (atomically) and the one
reader of it (``InversionRun``). Design notes: docs/INTERNALS.md, "cycle_encoding.checkpoints.run_folder".
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import shutil
import unicodedata
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..assets import resolve_model
from ..data.images import read_image
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from ..utils import atomic_write, read_json, write_json
from .delta import load_generator_delta, weights_sha256
from .generator import load_generator
from .native import default_provenance, read_native, save_native

try:
    import fcntl
except ImportError:  # pragma: no cover - not on Linux or macOS
    fcntl = None  # type: ignore[assignment]

RUN_FORMAT = "cycle-encoding-inversion-run"
RUN_VERSION = 1
CONFIG, SUMMARY, IMAGES, EDITS = "config.json", "summary.json", "images", "edits"
TARGET, PIVOTS, LOSSES, TIMINGS = "target.png", "pivots.safetensors", "losses.jsonl", "timings.json"
DELTA, PROJECTED_W, RESULT, DONE = "generator_delta.safetensors", "projected_w.npz", "result.json", "done"
PIVOTED, SHARED, SHARED_STATE = "pivoted", "shared.json", "shared_tune.pt"  # shared tuning's marks and state
# what a run owns at its top: no command writes over these (``check_output``)
RUN_OWNED = (CONFIG, SUMMARY, IMAGES, EDITS, DELTA, SHARED, SHARED_STATE, "latents.pt", "latents.npy", "latents.txt")
NAME_BYTES = 100  # the longest image folder name (UTF-8 bytes): NAME_sweep.gif, .NAME.lock and temporaries fit 255


def recon_file(stage: str) -> str:
    return f"recon_{stage}.png"


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a tensor's float32 bytes (the run's ``recon_sha256``)."""
    v = t.detach().to("cpu").float().contiguous()
    return hashlib.sha256(v.view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()


def inside(path: str | Path, root: str | Path) -> bool:
    """Whether ``path`` (symbolic links followed) lies inside the folder ``root``."""
    try:
        p, r = Path(path).resolve(), Path(root).resolve()
    except (OSError, RuntimeError):
        return False
    return p == r or r in p.parents


@contextmanager
def lock(path: Path) -> Iterator[bool]:
    """Hold an advisory lock (``flock``) on ``path``, a folder or a lock file (made when missing, removed on release),
    for the ``with`` block: True when taken, False when another process holds it. The system releases it when its
    process ends, killed or not. Where there is no ``flock`` (Windows) every lock counts as taken."""
    if fcntl is None:  # pragma: no cover
        yield True
        return
    folder = path.is_dir()
    while True:
        fd = os.open(path, os.O_RDONLY if folder else os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                yield False
                return
            try:  # the holder before us may have removed the file after we opened it: lock the one at the path
                same = os.path.samestat(os.fstat(fd), os.stat(path))
            except FileNotFoundError:
                same = False
            if not same:
                continue
            try:
                yield True
            finally:
                if not folder:
                    path.unlink(missing_ok=True)  # removed while still held: no one can lock it and think it theirs
            return
        finally:
            os.close(fd)


def remove_temporaries(folder: Path, pattern: str = ".*.tmp") -> None:
    """Remove what processes killed while writing left in ``folder``: temporary files (``.NAME.*.tmp``) and the
    temporary folders that no live process holds (``lock``)."""
    for stray in folder.glob(pattern):
        if stray.is_dir() and not stray.is_symlink():
            with lock(stray) as free:
                if free:
                    shutil.rmtree(stray, ignore_errors=True)
        else:
            stray.unlink(missing_ok=True)


def check_output(path: str | Path, option: str, inputs: Iterable[Any] = (), allowed: Iterable[Path] = ()) -> None:
    """Before any work: refuse to write ``path`` over one of the command's ``inputs`` or over what a run owns
    (``RUN_OWNED``) but for what the command itself writes (``allowed``); one clear error naming ``option``."""
    p = Path(path).resolve()
    for f in inputs:
        if f is not None and Path(f).exists() and p.exists() and p.samefile(f):
            raise CycleEncodingError(f"{option} {path}: refused: it is the input {f}; write the output elsewhere")
    if any(a == p or a in p.parents for a in (Path(a).resolve() for a in allowed)):
        return
    for run in p.parents:  # a run folder: one with the run's config.json and images/
        if (run / CONFIG).is_file() and (run / IMAGES).is_dir() and p.relative_to(run).parts[0] in RUN_OWNED:
            raise CycleEncodingError(f"{option} {path}: refused: a file of the inversion run {run}, whose files no "
                                     "command writes over; write it elsewhere")  # fmt: skip


# -- writing one image's folder ------------------------------------------------------------------------------------


def _unsafe(c: str) -> bool:
    return unicodedata.category(c)[0] == "C" or c in ("/", os.sep)


def folder_name(name: str) -> str:
    """The folder of the image named ``name`` under ``images/``: the name itself when it is safe (at most NAME_BYTES
    bytes, no control character, no path separator), else its start made safe, ``-`` and 12 hex digits of its
    sha256, so that no two names share a folder (``result.json`` keeps the name as ``original_name``)."""
    raw = name.encode("utf-8", "surrogatepass")
    if name not in ("", ".", "..") and len(raw) <= NAME_BYTES and not any(map(_unsafe, name)):
        return name
    head = "".join("_" if _unsafe(c) else c for c in name).encode()[:60].decode("utf-8", "ignore")
    return f"{head}-{hashlib.sha256(raw).hexdigest()[:12]}"


def image_folder(run_dir: Path, name: str) -> Path:
    return Path(run_dir) / IMAGES / folder_name(name)


def start_image(folder: Path) -> None:
    """Make ``folder`` ready for an image being (re)inverted: unfinished (no ``done``) until ``finish_image``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / DONE).unlink(missing_ok=True)
    remove_temporaries(folder)


def write_pivots(folder: Path, pivots: dict[str, torch.Tensor], num_ws: int, w_dim: int, image: str) -> None:
    """Each stage's ``[N, w_dim]`` pivot, in stage order."""
    save_native(folder / PIVOTS, "pivots", {"num_ws": num_ws, "w_dim": w_dim, "stages": list(pivots)}, pivots,
                default_provenance(made_by="cycle-encoding invert", image=image))  # fmt: skip


def write_losses(folder: Path, records: list[dict[str, Any]]) -> None:
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(folder / LOSSES, lambda t: t.write_text(text))


def finish_image(folder: Path, record: dict[str, Any], timings: dict[str, float], rank: int, mark: str = DONE) -> None:
    """``timings.json`` and ``result.json``, then ``done`` last: the image is finished (``mark`` PIVOTED: its stages
    before a shared tuning are)."""
    write_json(folder / TIMINGS, timings)
    write_json(folder / RESULT, record)
    stamp = json.dumps({"finished": _dt.datetime.now(_dt.timezone.utc).isoformat(), "rank": rank})
    atomic_write(folder / mark, lambda t: t.write_text(stamp + "\n"))


# -- reading -----------------------------------------------------------------------------------------------------


def recorded_file(f: str, run_dir: Path) -> Path:
    """A file a run recorded: as given, else relative to the run folder or its parent, else the shipped model of
    that name (``fmnist-generator``, ...: runs record the name they were given); else ``Path(f)`` as it is."""
    for cand in (Path(f), run_dir / f, run_dir.parent / f):
        if cand.is_file():
            return cand
    try:
        return resolve_model(f)
    except CycleEncodingError:  # a shipped name whose file this install lacks: the caller reports it as missing
        return Path(f)


@dataclass
class RunImage:
    """One finished image of a run."""

    name: str
    folder: Path
    result: dict[str, Any]
    pivots: dict[str, torch.Tensor]  # stage -> [N, w_dim]

    @property
    def stages(self) -> list[str]:
        return list(self.result.get("stages") or [*self.pivots, *(["tune"] if self.tuned else [])])

    @property
    def tuned(self) -> bool:
        return "tune" in (self.result.get("stages") or []) or "tune" in self.result.get("metrics", {})

    @property
    def pivot_stage(self) -> str:
        """The stage whose pivot the edits move: the one pivotal tuning started from, else the last pivot stage."""
        t = self.result.get("tune") or {}
        if t.get("pivot_stage") in self.pivots:
            return str(t["pivot_stage"])
        order = [s for s in self.stages if s in self.pivots] or list(self.pivots)
        return order[-1]

    @property
    def pivot(self) -> torch.Tensor:
        """``[1, N, w_dim]``."""
        return self.pivots[self.pivot_stage][None]

    @property
    def recon_stage(self) -> str:
        """The stage whose reconstruction an edit of strength 0 reproduces."""
        return "tune" if self.tuned else self.pivot_stage

    @property
    def recon_sha256(self) -> str | None:
        return (self.result.get("recon_sha256") or {}).get(self.recon_stage)

    @property
    def label(self) -> str:
        """The image's name as shown: the name it was inverted under (``original_name`` where its folder's name had
        to be made safe), control characters escaped."""
        n = self.result.get("original_name")
        n = n if isinstance(n, str) and n else self.name
        return "".join(c.encode("unicode_escape").decode() if unicodedata.category(c)[0] == "C" else c for c in n)

    def checked(self, p: Path, root: Path | None = None, image: bool = False) -> Path | None:
        """``p`` when it is a file inside the image's folder (or ``root``), None when there is none; a file that leads
        outside it (a symbolic link), or with ``image`` one that does not decode, is refused by name."""
        if not p.is_file():
            return None
        if not inside(p, root or self.folder):
            raise CycleEncodingError(f"{p}: refused: it leads outside the run folder")
        if image:
            read_image(p)  # a cut or corrupt file: one CycleEncodingError naming it
        return p

    @property
    def delta_path(self) -> Path | None:
        """The stored change that renders this image (None: none stored): the file its record names
        (``result.json``'s ``delta.file``, relative to the image's folder, anywhere inside the run folder, so one
        change can serve several images), else the image's own ``generator_delta.safetensors``."""
        rel = (self.result.get("delta") or {}).get("file")
        return self.checked(self.folder / (rel if isinstance(rel, str) and rel else DELTA), self.folder.parent.parent)

    @property
    def target_path(self) -> Path:
        return self.folder / TARGET

    def recon_path(self, stage: str) -> Path:
        return self.folder / recon_file(stage)

    def losses(self) -> list[dict[str, Any]]:
        p = self.folder / LOSSES
        if not p.is_file() or not inside(p, self.folder):
            return []
        out = []
        for line in p.read_text().splitlines():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a blank or cut line
                continue
        return out


class InversionRun:
    """A run folder of ``cycle-encoding invert`` (layout: docs/INTERNALS.md). Only images with ``done`` are listed."""

    def __init__(self, run_dir: str | Path) -> None:
        self.dir = Path(run_dir)
        cfg_path = self.dir / CONFIG
        if not self.dir.is_dir():
            raise CycleEncodingError(f"no such run folder: {self.dir}" if not self.dir.exists() else
                                     f"{self.dir}: a file, not a run folder")  # fmt: skip
        if not cfg_path.is_file():
            raise CycleEncodingError(f"{self.dir}: not an inversion run folder (no config.json)")
        self.config: dict[str, Any] = read_json(cfg_path)
        if self.config.get("format") != RUN_FORMAT:
            raise CycleEncodingError(f"{self.dir}: config.json is not an inversion run's ({self.config.get('format')})")
        summary = self.dir / SUMMARY
        self.summary: dict[str, Any] = read_json(summary) if summary.is_file() else {}
        self._last_generator: tuple[tuple[str, int, int], Generator] | None = None

    @property
    def stages(self) -> list[str]:
        return list((self.config.get("options") or {}).get("stages") or [])

    @property
    def command(self) -> str:
        return str(self.config.get("command", ""))

    @property
    def networks(self) -> dict[str, str]:
        return dict(self.config.get("networks") or {})

    def image_names(self) -> list[str]:
        return sorted(p.parent.name for p in (self.dir / IMAGES).glob(f"*/{DONE}") if p.is_file())

    def find_images(self, given: Iterable[str] | None = None) -> list[str]:
        """The folders of the finished images ``given`` (each an image's name or its folder's; None: all), in order
        without repeats; an unknown one is refused, listing the finished images."""
        finished = self.image_names()
        if given is None:
            return finished
        names = {g: g if g in finished else folder_name(g) for g in given}
        if unknown := [g for g, n in names.items() if n not in finished]:
            shown = ", ".join(finished[:8]) + (", ..." if len(finished) > 8 else "")
            raise CycleEncodingError(
                f"{self.dir}: no finished image named {unknown[0]!r} (finished: {shown or 'none'})"
            )
        return list(dict.fromkeys(names.values()))  # in order, each folder once (a name and its folder's name too)

    def image(self, name: str) -> RunImage:
        folder = image_folder(self.dir, name)
        if Path(name).name != name or name in ("", ".", "..") or not inside(folder, self.dir / IMAGES):
            raise CycleEncodingError(f"{name!r}: refused: not an image folder inside {self.dir / IMAGES}")
        if not (folder / DONE).is_file():
            raise CycleEncodingError(f"{folder}: not finished (no 'done')")
        for f in (RESULT, PIVOTS):
            if (folder / f).exists() and not inside(folder / f, folder):
                raise CycleEncodingError(f"{folder / f}: refused: it leads outside the run folder")
        result = read_json(folder / RESULT)
        if not isinstance(result, dict):
            raise CycleEncodingError(f"{folder / RESULT}: not a JSON object")
        nf = read_native(folder / PIVOTS, kind="pivots", what="the run's pivots")
        order = nf.config.get("stages") or list(nf.tensors)
        pivots = {k: nf.tensors[k].float() for k in order if k in nf.tensors}
        if not pivots:
            raise CycleEncodingError(f"{folder}: no pivots stored")
        return RunImage(name, folder, result, pivots)

    def load_images(self) -> tuple[list[RunImage], list[dict[str, str]]]:
        """Every finished image that can be read, and the others as ``{"name", "reason"}`` (a corrupt
        ``result.json`` or pivots file, a folder that leads outside the run): one bad folder does not stop the rest."""
        good: list[RunImage] = []
        bad: list[dict[str, str]] = []
        for n in self.image_names():
            try:
                good.append(self.image(n))
            except CycleEncodingError as e:
                bad.append({"name": n, "reason": str(e)})
        return good, bad

    def generator_file(self) -> Path | None:
        """The base generator's file as the run recorded it (as given, else relative to the run folder)."""
        f = (self.config.get("generator") or {}).get("file")
        return recorded_file(f, self.dir) if f else None

    def encoder_file(self) -> Path | None:
        f = (self.config.get("encoder") or {}).get("file")
        return recorded_file(f, self.dir) if f else None

    def load_generator(
        self, generator: Generator | str | Path | None = None, device: str | torch.device = "cpu"
    ) -> Generator:
        """The base generator: the one given, else the file the run recorded; its weights must be the run's."""
        if isinstance(generator, Generator):
            G = generator
        else:
            path = resolve_model(generator) if generator is not None else self.generator_file()
            if path is None:
                raise CycleEncodingError(
                    f"{self.dir}: the run does not record its generator file (it was given as a network): pass "
                    "--generator FILE"
                )
            if not path.is_file():
                raise CycleEncodingError(f"the run's generator {path} is not there: pass --generator FILE")
            G = load_generator(path, device=device)
        want = (self.config.get("generator") or {}).get("weights_sha256")
        if want and weights_sha256(G) != want:
            raise CycleEncodingError(
                f"the generator given is not the one {self.dir} was inverted with (weights sha256 differs)"
            )
        return G.to(device).eval().requires_grad_(False)

    def generator_for(self, image: RunImage, base: Generator, allow_base: bool = False) -> tuple[Generator, str]:
        """(the generator that renders ``image``'s pivot, 'tuned' or 'base'): the base rebuilt with the change the
        image's record names (``RunImage.delta_path``), the last one rebuilt kept for a shared run's next image."""
        if not image.tuned:
            return base, "base"
        delta = image.delta_path
        if delta is None:
            if allow_base:
                return base, "base (the run tuned the generator but did not store it)"
            raise CycleEncodingError(
                f"{image.folder}: the run tuned the generator but did not store it (run invert without --no-delta), "
                "so the edits cannot use it; allow the base generator explicitly to go on"
            )
        key = (str(delta.resolve()), delta.stat().st_mtime_ns, id(base))
        if self._last_generator is None or self._last_generator[0] != key:
            self._last_generator = (key, load_generator_delta(delta, base).to(base.w_avg.device).eval())
        return self._last_generator[1], "tuned"

    def stage_files(self, stage: str | None = None) -> tuple[str, dict[str, Path], dict[str, Path]]:
        """(the stage, each finished image's reconstruction after it, each one's target as inverted), by image name.
        ``stage`` None: ``tune`` when the run tuned, else its last stage."""
        stages = self.stages
        if stage is None:
            stage = "tune" if "tune" in stages else (stages[-1] if stages else "tune")
        if stages and stage not in stages:
            raise CycleEncodingError(f"{self.dir}: the run has no stage {stage!r} (its stages: {', '.join(stages)})")
        folders = {name: image_folder(self.dir, name) for name in self.image_names()}
        recons = {n: f / recon_file(stage) for n, f in folders.items() if (f / recon_file(stage)).is_file()}
        return stage, recons, {n: f / TARGET for n, f in folders.items() if (f / TARGET).is_file()}

    def edit_folders(self) -> list[Path]:
        return sorted(p.parent for p in (self.dir / EDITS).glob("*/edit.json") if p.is_file())
