"""An inversion over many images into a run folder (its layout and files: ``checkpoints/run_folder.py``): resumable,
shared by processes under per-image locks, splittable by ``torchrun``.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.run_folder"."""

from __future__ import annotations

import datetime as _dt
import json
import shlex
import sys
import time
import traceback
from collections.abc import Callable
from contextlib import AbstractContextManager, ExitStack
from pathlib import Path
from typing import Any, Protocol

import torch

from ..checkpoints import run_folder as rf
from ..checkpoints.delta import save_generator_delta
from ..checkpoints.latents import load_latents, save_latents, save_projected_w
from ..checkpoints.native import default_provenance, file_sha256
from ..distributed import DistInfo
from ..errors import CycleEncodingError
from ..networks.stylegan2 import Generator
from ..utils import save_image
from .config import PIVOT_STAGES, InversionConfig
from .progress import StepBar
from .result import InversionResult

# options that may differ between the runs that fill one folder (they do not change any result)
# (tune_batch: the same results within float rounding; tune_save_every: how often a shared tuning saves its state)
VOLATILE_OPTIONS = ("device", "tune_batch", "tune_save_every")
VOLATILE_STAGE_OPTIONS = ("compile",)  # the same results within float rounding; a run's plan may differ on resuming


class FolderInverter(Protocol):
    """What a run folder needs of an inverter (``inverter.Inverter`` is one)."""

    config: InversionConfig
    dist: DistInfo
    device: torch.device
    progress: str  # bar, lines or none
    G: Generator
    generator_file: str | None
    g_sha256: str

    describe: Callable[[], dict[str, Any]]  # config.json's contents
    network_names: Callable[[], dict[str, str]]
    load_image: Callable[..., torch.Tensor]  # (image, notes=None), as Inverter.load_image
    invert_many: Callable[..., list[InversionResult]]  # (images, indices, names, on_step, on_stage), as Inverter's
    tune_stage: Callable[..., None]  # (results, pivots, indices, on_step, on_stage, **shared), as Inverter's


def fingerprint(desc: dict[str, Any]) -> dict[str, Any]:
    """What must be the same for two runs to fill one folder: options (but the volatile ones), weights, networks."""
    opts = {k: v for k, v in desc["options"].items() if k not in VOLATILE_OPTIONS}
    opts.setdefault("tune_mode", "each")  # a run from before shared tuning tuned each image alone
    for stage in ("refine", "tune"):
        if isinstance(opts.get(stage), dict):
            opts[stage] = {k: v for k, v in opts[stage].items() if k not in VOLATILE_STAGE_OPTIONS}
    enc = desc["encoder"]["weights_sha256"] if desc.get("encoder") else None
    return {"options": opts, "generator": desc["generator"]["weights_sha256"], "encoder": enc,
            "networks": desc["networks"]}  # fmt: skip


def differences(a: Any, b: Any, path: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out: list[str] = []
        for k in sorted(set(a) | set(b)):
            out += differences(a.get(k), b.get(k), f"{path}.{k}" if path else str(k))
        return out
    return [] if a == b else [path or "(all)"]


def image_state(out: Path, name: str, file: Path, mark: str = rf.DONE) -> str:
    """``"done"`` (finished from this very input file), ``"changed"`` (finished from a file of other content: to do
    again) or ``"todo"``. Images finished before input hashes were recorded count as done. ``mark``: the file that
    says finished (``rf.PIVOTED``: the stages before a shared tuning)."""
    folder = rf.image_folder(out, name)
    if not (folder / mark).is_file():
        return "todo"
    try:
        want = json.loads((folder / rf.RESULT).read_text()).get("input_sha256")
    except (OSError, ValueError, AttributeError):
        return "done"  # a finished image with an unreadable record is reported by `edit` / `report`, not redone
    if not want:
        return "done"
    try:
        return "done" if file_sha256(file) == want else "changed"
    except OSError:
        return "done"


def image_lock_path(out: Path, name: str) -> Path:
    return out / rf.IMAGES / f".{rf.folder_name(name)}.lock"


def image_lock(out: Path, name: str) -> AbstractContextManager[bool]:
    """The image's lock, held for a ``with`` block: True when taken, False when another process holds it; its file is
    removed on release."""
    return rf.lock(image_lock_path(out, name))


def prepare_run_dir(inverter: FolderInverter, out: Path, images: Any) -> None:
    """Write ``config.json`` for a new run, or check that the run already in ``out`` had the same fingerprint; remove
    stray temporary files."""
    desc = inverter.describe()
    cfg_path = out / rf.CONFIG
    if cfg_path.is_file():
        try:
            old = json.loads(cfg_path.read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise CycleEncodingError(f"{cfg_path}: unreadable ({e}); use another --out") from None
        if old.get("format") != rf.RUN_FORMAT:
            raise CycleEncodingError(f"{out}: not an inversion run folder (config.json of another kind)")
        a, b = fingerprint(old), fingerprint(desc)
        if a != b:
            diff = differences(a, b)
            raise CycleEncodingError(
                f"{out} holds a run with other options or networks (differs in: {', '.join(diff[:6])}): "
                "re-run with the same ones, or use another --out"
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        doc = {
            "format": rf.RUN_FORMAT,
            "version": rf.RUN_VERSION,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "command": shlex.join(sys.argv),  # quoted: it can be pasted back into a shell
            "argv": list(sys.argv),
            "images": [str(p) for p in images] if isinstance(images, (list, tuple)) else str(images),
            "world_size": inverter.dist.world_size,
            **desc,
        }
        rf.write_json(cfg_path, doc)
    rf.remove_temporaries(out)
    (out / rf.IMAGES).mkdir(exist_ok=True)


def stage_line(head: str, stage: str, m: dict[str, float], seconds: float, extra: str = "") -> str:
    """``head: stage mse M perc P, extra (S s)``: an image's line after a stage (perc when measured)."""
    perc = f" perc {m['perceptual']:.4f}" if "perceptual" in m else ""
    return f"{head}: {stage} mse {m['mse']:.4f}{perc}{extra} ({seconds:.1f} s)"


def store_delta(
    inverter: FolderInverter, tuned: Generator, path: Path, extra: dict[str, Any], provenance: dict[str, Any]
) -> dict[str, Any]:
    """``tuned`` written to ``path`` as its change from ``inverter.G``; returns what a record says of the change."""
    d = save_generator_delta(
        inverter.G, tuned, path,
        base_file=Path(inverter.generator_file).name if inverter.generator_file else None,
        provenance=default_provenance(**provenance),
        extra=extra, level=inverter.config.delta_level, base_sha256=inverter.g_sha256,
    )  # fmt: skip
    return {"file_bytes": d.file_bytes, "full_copy_bytes": d.full_copy_bytes, "ratio": round(d.ratio, 4),
            "changed_tensors": d.changed, "tuned_weights_sha256": d.tuned_sha256}  # fmt: skip


class FolderJob:
    """One image on its way into its folder ``images/<name>/``: the target loaded, the folder made ready, its progress
    bar and the files written after each stage (``on_stage``). A warning about the target (smaller than G's images)
    goes to ``warn`` (else ``say``) and into ``result.json``."""

    def __init__(
        self,
        inverter: FolderInverter,
        file: Path,
        name: str,
        index: int,
        folder: Path,
        head: str,
        say: Callable[[str], None],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.inverter, self.file, self.name, self.index = inverter, file, name, index
        self.folder, self.head, self.say = folder, head, say
        cfg = inverter.config
        self.input_sha256 = file_sha256(file) if Path(file).is_file() else None
        self.notes: dict[str, Any] = {}
        # an unreadable image (or one without a face) fails here, before its folder exists
        self.x = inverter.load_image(file, self.notes)
        if "warning" in self.notes:  # the warning shows even without verbose
            (warn or say)(f"{head}: WARNING: {self.notes['warning']}")
        rf.start_image(folder)  # redone (its input changed): unfinished until written again
        self.t_start = time.perf_counter()
        self.totals = {"refine": cfg.refine.steps, "project": cfg.project.steps, "tune": cfg.tune.steps}
        self.bar = StepBar(inverter.progress, head, self.totals)
        self.target_written = False
        self.prior: dict[str, Any] = {}  # result.json of the stages before a shared tuning, when read back

    def on_stage(self, stage: str, res: InversionResult) -> None:
        inverter, folder = self.inverter, self.folder
        self.bar.close()
        if not self.target_written:
            save_image(res.target[0], folder / rf.TARGET)
            self.target_written = True
        piv = {s: p[0] for s, p in res.pivots.items()}
        if stage == "tune" and res.tune is not None:  # tuning keeps its pivot: recorded for completeness
            piv["tune"] = piv[res.tune["pivot_stage"]]
        rf.write_pivots(folder, piv, inverter.G.num_ws, inverter.G.w_dim, self.name)
        save_image(res.recons[stage][0], folder / rf.recon_file(stage))
        rf.write_losses(folder, res.losses)
        m = res.metrics[stage]
        extra = ""
        if stage == "tune" and res.tune is not None:
            extra = f", {res.tune['updates']} steps" + (" (early stop)" if res.tune["stopped_early"] else "")
            if res.tune.get("batch"):
                extra += f", tuned in a batch of {res.tune['batch']}"
            if res.tune.get("shared"):
                extra += f", one generator shared by {res.tune['shared']['images']} images"
        if stage == "refine" and res.refine is not None:
            extra = f", target L_S {res.refine['target_l_s_first']:.4f} -> {res.refine['target_l_s']:.4f}"
        self.say(stage_line(self.head, stage, m, res.timings[stage], extra))
        self.bar.mark()

    def finish(self, res: InversionResult, shared: dict[str, Any] | None = None, mark: str = rf.DONE) -> dict[str, Any]:
        """Write the image's remaining files, ``done`` (``mark``) last; returns what ``result.json`` holds.
        ``shared``: the record of a shared tuning's one stored change, which this image's record refers to."""
        inverter, folder, name, cfg = self.inverter, self.folder, self.name, self.inverter.config
        self.bar.close()
        record: dict[str, Any] = {
            "name": folder.name,
            **({"original_name": name} if name != folder.name else {}),
            "file": str(self.file),
            "input_sha256": self.input_sha256,
            "index": self.index,
            "rank": inverter.dist.rank,
            "stages": list(cfg.stages),
            "metrics": res.metrics,
            "recon_sha256": {
                **self.prior.get("recon_sha256", {}),
                **{s: rf.tensor_sha256(y) for s, y in res.recons.items()},
            },
            "networks": inverter.network_names(),
            "device": str(inverter.device),
            "threads": torch.get_num_threads(),  # CPU renders depend on it in their last bits (edit's check)
            **self.notes,
        }
        if res.refine is not None:
            record["refine"] = res.refine
        if res.tune is not None:
            record["tune"] = res.tune
        if res.generator is not None and shared is not None:
            record["delta"] = shared
        elif res.generator is not None and cfg.save_delta:
            t0 = time.perf_counter()
            extra = {"image": name, "pivot_stage": res.tune["pivot_stage"] if res.tune else None}
            prov = {"made_by": "cycle-encoding invert", "image": name}
            record["delta"] = store_delta(inverter, res.generator, folder / rf.DELTA, extra, prov)
            res.timings["save_delta"] = time.perf_counter() - t0
        pivot_stage = list(res.pivots)[-1]
        save_projected_w(folder / rf.PROJECTED_W, res.pivot[0])
        record["projected_w"] = {"file": rf.PROJECTED_W, "stage": pivot_stage}
        # shared tuning: the image's stages, its share of the tuning included (it waited for the others' pivots)
        res.timings["total"] = (sum(res.timings.get(s, 0.0) for s in cfg.stages) if (res.tune or {}).get("shared")
                                else time.perf_counter() - self.t_start)  # fmt: skip
        record["timings"] = res.timings
        rf.finish_image(folder, record, res.timings, inverter.dist.rank, mark)
        return record


def invert_group_into_folders(
    inverter: FolderInverter,
    items: list[tuple[Path, str, int, Path, str]],
    head: str,
    say: Callable[[str], None],
    warn: Callable[[str], None] | None = None,
) -> list[dict[str, Any] | Exception]:
    """Invert images ``(file, name, index, folder, head)`` into their folders, their tuning in one batch
    (``Inverter.invert_many``): per image the record ``result.json`` holds, or the exception that stopped it (an image
    that cannot be read fails alone; a failure in the batched tuning fails the batch). ``head`` names a batch of
    several on the tuning's progress bar (one image's bar is its own head)."""
    out: list[dict[str, Any] | Exception] = []
    jobs: list[FolderJob] = []
    slots: list[int] = []
    for k, (file, name, index, folder, img_head) in enumerate(items):
        try:
            jobs.append(FolderJob(inverter, file, name, index, folder, img_head, say, warn))
            slots.append(k)
            out.append(RuntimeError("not run"))
        except Exception as e:
            out.append(e)
    if not jobs:
        return out
    stages = inverter.config.stages
    last_pivot = [s for s in stages if s in PIVOT_STAGES][-1]
    totals = {"tune": inverter.config.tune.steps}
    tune_bar = StepBar(inverter.progress, f"{head} ({len(jobs)} images)" if len(jobs) > 1 else jobs[0].head, totals)
    last_step = -1

    def on_step(k: int, rec: dict[str, Any]) -> None:
        nonlocal last_step
        if rec.get("stage") != "tune":
            jobs[k].bar.step(rec)
        elif rec["step"] > last_step:  # one bar for the batch: a step is done when its first record comes
            last_step = rec["step"]
            tune_bar.step(rec)

    def on_stage(k: int, stage: str, res: InversionResult) -> None:
        if stage == "tune":
            tune_bar.close()
        jobs[k].on_stage(stage, res)
        if stage == last_pivot and k == len(jobs) - 1:
            tune_bar.mark()  # the batch's tuning starts now

    try:
        results = inverter.invert_many([j.x for j in jobs], [j.index for j in jobs], [j.name for j in jobs],
                                       on_step=on_step, on_stage=on_stage)  # fmt: skip
    except Exception as e:
        tune_bar.close()
        for k in slots:
            out[k] = e
        return out
    for k, job, res in zip(slots, jobs, results):
        try:
            out[k] = job.finish(res)
        except Exception as e:
            out[k] = e
    return out


def recorded_options(out: Path) -> dict[str, Any]:
    """The options recorded in the run folder's ``config.json`` ({} for a new or unreadable folder)."""
    try:
        opts = json.loads((out / rf.CONFIG).read_text()).get("options")
    except (OSError, ValueError, AttributeError):
        return {}
    return opts if isinstance(opts, dict) else {}


def record_failure(
    e: BaseException,
    name: str,
    file: Path,
    head: str,
    failed: list[dict[str, str]],
    warn: Callable[[str], None],
    debug: bool,
) -> None:
    """An image that failed: into ``failed`` (name, file, reason) and one line to ``warn`` (the trace with ``debug``)."""
    if debug:
        traceback.print_exception(e)
    reason = str(e) if isinstance(e, CycleEncodingError) else f"{type(e).__name__}: {e}"
    failed.append({"name": name, "file": str(file), "reason": reason})
    warn(f"{head}: FAILED: {reason}")


def line_sinks(verbose: bool | str, log: Callable[[str], None] | None = None) -> tuple[Callable[[str], None], ...]:
    """Where an inversion's lines go, ``(say, warn, per_image)``: warnings and failures to ``log`` (default: stderr);
    each image's stages to it too when ``verbose`` is True, each finished image's result when it is ``"images"``."""
    warn = log or (lambda s: print(s, file=sys.stderr, flush=True))
    return (warn if verbose is True else (lambda s: None)), warn, (warn if verbose == "images" else (lambda s: None))


def fill_folder(
    inverter: FolderInverter,
    out: Path,
    files: list[Path],
    names: list[str],
    mine: list[int],
    prefix: str,
    say: Callable[[str], None],
    warn: Callable[[str], None],
    per_image: Callable[[str], None],
    debug: bool = False,
    siblings: bool = False,
) -> dict[str, list]:
    """Invert the images ``mine`` (indices into ``files`` / ``names``) into ``out``, ``config.tune_batch`` at a time,
    each under its lock: ``{"done", "failed", "busy", "skipped"}`` (busy: locked by another process; skipped:
    finished by another process meanwhile). ``siblings``: other processes of this run fill the folder too (worker
    processes): meeting their images is expected and not said."""
    done: list[str] = []
    failed: list[dict[str, str]] = []
    busy: list[dict[str, str]] = []
    late: list[str] = []
    quiet = (lambda s: None) if siblings else None
    size = inverter.config.tune_batch if "tune" in inverter.config.stages else 1
    for start in range(0, len(mine), size):
        group = list(enumerate(mine))[start : start + size]
        with ExitStack() as locks:
            claimed: list[tuple[int, int, str]] = []  # (position, image index, head)
            for k, i in group:
                head = f"{prefix}[{k + 1}/{len(mine)}] {names[i]}"
                try:
                    if not locks.enter_context(image_lock(out, names[i])):
                        busy.append({"name": names[i], "file": str(files[i])})
                        (quiet or warn)(f"{head}: being inverted by another process: left to it")
                        continue
                    if image_state(out, names[i], files[i]) == "done":
                        late.append(names[i])
                        (quiet or say)(f"{head}: finished by another process meanwhile: skipped")
                        continue
                except Exception as e:  # one bad image must not stop the batch
                    record_failure(e, names[i], files[i], head, failed, warn, debug)
                    continue
                claimed.append((k, i, head))
            if not claimed:
                continue
            first, last = claimed[0][0] + 1, claimed[-1][0] + 1
            items = [(files[i], names[i], i, rf.image_folder(out, names[i]), head) for _, i, head in claimed]
            recs = invert_group_into_folders(inverter, items, f"{prefix}[{first}-{last}/{len(mine)}]", say, warn)
        for (_k, i, head), rec in zip(claimed, recs):
            if isinstance(rec, Exception):
                record_failure(rec, names[i], files[i], head, failed, warn, debug)
                continue
            done.append(names[i])
            last_stage = rec["stages"][-1]
            per_image(stage_line(head, last_stage, rec["metrics"][last_stage], rec["timings"]["total"]))
    return {"done": done, "failed": failed, "busy": busy, "skipped": late}


def write_summary(
    inverter: FolderInverter, out: Path, names: list[str], skipped: list[str], ranks: list[dict]
) -> dict[str, Any]:
    """Gather the finished images' ``result.json`` into ``summary.json`` (rank 0 only)."""
    done = [n for r in ranks for n in r["done"]]
    failed = [f for r in ranks for f in r["failed"]]
    busy = [b for r in ranks for b in r.get("busy", [])]
    skipped = [*skipped, *(n for r in ranks for n in r.get("skipped", []))]
    folders = [rf.image_folder(out, n) for n in names]
    records = [rf.read_json(f / rf.RESULT) for f in folders if (f / rf.DONE).is_file() and (f / rf.RESULT).is_file()]
    per_stage: dict[str, dict[str, Any]] = {}
    for s in inverter.config.stages:
        rows = [r for r in records if s in r.get("metrics", {})]
        if not rows:
            continue
        entry = {"images": len(rows), "seconds_per_image": sum(r["timings"][s] for r in rows) / len(rows)}
        for m in ("mse", "psnr", "perceptual"):
            vals = [r["metrics"][s][m] for r in rows if m in r["metrics"][s]]
            if vals:
                entry[m] = sum(vals) / len(vals)
        per_stage[s] = entry
    deltas = [r["delta"] for r in records if "delta" in r]
    summary: dict[str, Any] = {
        "run_dir": str(out),
        "images": len(names),
        "finished": len(records),
        "complete": len(records) == len(names),
        "done": done,
        "skipped": skipped,
        "failed": failed,
        "busy": busy,
        "stages": list(inverter.config.stages),
        "networks": inverter.network_names(),
        "world_size": inverter.dist.world_size,
        "ranks": ranks,
        "per_stage": per_stage,
    }
    if renamed := {n: rf.folder_name(n) for n in names if rf.folder_name(n) != n}:
        summary["folders"] = renamed  # names whose folder's name had to be made safe (``folder_name``)
    if deltas:
        stored = {d.get("file", id(d)): d["file_bytes"] for d in deltas}  # a shared tuning's one change counted once
        mean = sum(stored.values()) / len(deltas)
        full = deltas[0]["full_copy_bytes"]
        summary["generator_delta"] = {"mean_bytes_per_image": mean, "full_copy_bytes": full,
                                      "ratio": mean / max(1, full)}  # fmt: skip
    if (out / rf.SHARED).is_file():  # shared tuning: its one generator (the images by name, sha256 in shared.json)
        shared = rf.read_json(out / rf.SHARED)
        summary["shared_generator"] = {**shared, "images": len(shared["images"]), "record": rf.SHARED}
    with_w = [r["name"] for r in records if (rf.image_folder(out, r["name"]) / rf.PROJECTED_W).is_file()]
    if with_w:  # the stacked codes, as e4e's inference writes them, with the names in order
        ws = torch.cat([load_latents(rf.image_folder(out, n) / rf.PROJECTED_W) for n in with_w])
        files = save_latents(out, ws, with_w)
        summary["latents"] = {"files": [f.name for f in files], "images": len(with_w), "shape": list(ws.shape)}
    rf.write_json(out / rf.SUMMARY, summary)
    return summary
