"""How a run of ``invert`` uses the machine: ``plan_speed`` chooses the batched pass, the tuning batch, compiling,
and worker processes against threads; ``SpeedPlan`` is its choice with the reason for each part.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.speed"."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..ops import has_compiler

SPEED_OPTIONS = ("batch_passes", "tune_batch", "compile", "workers", "threads")
MAX_TUNE_BATCH = 8
BATCH_PASSES_MAX_RESOLUTION = 64
TUNE_BATCH_MAX_RESOLUTION = 32
COMPILE_MIN_IMAGES = 16
# estimated seconds of one image through encoder -> refine -> tune on one thread, and of a worker's start, by
# resolution (the smallest row at or above G's); the speed-up of t threads over one on one image. Only their ratios
# matter to the plan (measured on the project's 2-core CPU, docs/PERFORMANCE.md)
IMAGE_SECONDS = {32: 8.0, 64: 60.0, 256: 400.0, 1024: 2000.0}
START_SECONDS = 10.0
THREAD_GAIN = {32: 0.3, 64: 0.5, 256: 0.7, 1024: 0.8}  # each thread after the first adds this share of one
# the working memory of inverting, on top of what a process holds once its networks are loaded (``held``; the
# refinement's encoder copies and Ranger state are 5-6 times the encoder's weights), by resolution (bytes): tuning
# 1.7 / 2.9 / 5.7 GB at 64 / 256 / 1024 px
WORKER_BYTES = {32: 1 << 30, 64: 2 << 30, 256: 4 << 30, 1024: 11 << 30}


@dataclass(frozen=True)
class SpeedPlan:
    """What a run uses: the batched pass, images per tuning batch, compiling, processes and threads per process
    (None: torch's default), and why each was chosen."""

    batch_passes: bool = False
    tune_batch: int = 1
    compile: bool = False
    workers: int = 1
    threads: int | None = None
    exact: bool = False
    why: dict[str, str] = field(default_factory=dict)

    def line(self) -> str:
        """One line for the console: each choice and, in brackets, why."""
        cores = (f"{self.workers} worker processes x {self.threads} thread(s)" if self.workers > 1
                 else f"one process, {self.threads or torch.get_num_threads()} thread(s)")  # fmt: skip
        parts = [
            f"{cores} ({self.why.get('workers', '')})",
            f"batched pass {'on' if self.batch_passes else 'off'} ({self.why.get('batch_passes', '')})",
            f"tune batch {self.tune_batch} ({self.why.get('tune_batch', '')})",
            f"compile {'on' if self.compile else 'off'} ({self.why.get('compile', '')})",
        ]
        return ("speed (--exact): " if self.exact else "speed: ") + "; ".join(parts)


def _row(table: Mapping[int, Any], resolution: int) -> Any:
    """The table's row for ``resolution``: the smallest key at or above it (the largest key past the end)."""
    keys = sorted(table)
    return table[next((k for k in keys if k >= resolution), keys[-1])]


def usable_cores() -> int:
    """The cores a run may use: OMP_NUM_THREADS where the user set it, else the CPUs this process may run on."""
    given = os.environ.get("OMP_NUM_THREADS", "").strip()
    if given.isdigit() and int(given) > 0:
        return int(given)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        return os.cpu_count() or 1


def _proc_bytes(path: str, field: str) -> int | None:
    """The ``field:  N kB`` line of a Linux /proc file in bytes, or None where unknown."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def available_memory() -> int | None:
    """Bytes of memory available to new work (Linux's MemAvailable), or None where unknown."""
    return _proc_bytes("/proc/meminfo", "MemAvailable")


def resident_memory() -> int | None:
    """Bytes this process holds in memory now (Linux's VmRSS), or None where unknown."""
    return _proc_bytes("/proc/self/status", "VmRSS")


def _finish_estimate(images: int, workers: int, cores: int, resolution: int) -> float:
    """Estimated seconds until ``images`` images are done by ``workers`` processes of ``cores // workers`` threads,
    the images taken one at a time as processes come free (the started processes lose their start-up time)."""
    threads = max(1, cores // workers)
    per_image = _row(IMAGE_SECONDS, resolution) / (1 + _row(THREAD_GAIN, resolution) * (threads - 1))
    start = START_SECONDS if workers > 1 else 0.0
    return max(math.ceil(images / workers) * per_image, (images * per_image + (workers - 1) * start) / workers)


def plan_speed(
    images: int,
    resolution: int,
    device: torch.device | str,
    precision: str = "fp32",
    *,
    given: Mapping[str, Any] | None = None,
    exact: bool = False,
    cores: int | None = None,
    memory: int | None = None,
    held: int | None = None,
    compiler: bool | None = None,
    single_process: str | None = None,
    resumed: Mapping[str, Any] | None = None,
) -> SpeedPlan:
    """The plan for ``images`` images into a generator of ``resolution`` px on ``device`` in ``precision`` (fp32 or
    bf16, already resolved). ``given``: options the user set (keys of ``SPEED_OPTIONS``), kept as they are; ``exact``:
    the authors' loop; ``cores`` / ``memory`` (bytes available) / ``compiler``: found on this machine when None;
    ``held``: the bytes this process holds with its networks loaded, which every worker will hold too;
    ``single_process``: why the run must stay in one process (e.g. under torchrun), or None; ``resumed``: the options
    a run folder being resumed records (it keeps its batched pass, which changes results in the last bits)."""
    given = {k: v for k, v in (given or {}).items() if v is not None}
    unknown = set(given) - set(SPEED_OPTIONS)
    if unknown:
        raise ValueError(f"unknown speed option(s) {', '.join(sorted(unknown))} (known: {', '.join(SPEED_OPTIONS)})")
    if exact:
        if given:
            raise ValueError(f"--exact is the authors' loop: it takes none of {', '.join(sorted(given))}")
        return SpeedPlan(exact=True, why={k: "--exact" for k in SPEED_OPTIONS})
    why: dict[str, str] = {}
    dev = torch.device(device)
    cpu = dev.type == "cpu"
    cores = max(1, cores or usable_cores()) if cpu else 1
    # processes and threads
    if "workers" in given:
        workers, why["workers"] = max(1, int(given["workers"])), "given"
    elif single_process:
        workers, why["workers"] = 1, single_process
    elif not cpu:
        workers, why["workers"] = 1, f"one {dev.type} device"
    else:
        memory = memory if memory is not None else available_memory()
        work = _row(WORKER_BYTES, resolution)  # this process's own working memory comes first, then the workers'
        cap = cores if memory is None else max(1, min(cores, 1 + (memory - work) // (work + (held or 0))))
        options = range(1, max(1, min(cap, images)) + 1)
        workers = min(options, key=lambda w: (_finish_estimate(images, w, cores, resolution), w))
        if workers > 1:
            why["workers"] = f"{images} images on {cores} cores: processes share nothing"
        elif images <= 1:
            why["workers"] = "one image: its passes use the threads"
        elif cap < 2:
            why["workers"] = "memory for one process only" if cores > 1 else "one core"
        else:
            why["workers"] = f"{images} images at {resolution} px: too few to split evenly"
    if "threads" in given:
        threads, why["threads"] = max(1, int(given["threads"])), "given"
    else:
        threads = max(1, cores // workers) if cpu else None
        why["threads"] = "the cores over the processes" if cpu else "not a CPU"
    per_worker = math.ceil(max(1, images) / workers)
    # the batched pass
    kept = (resumed or {}).get("tune", {}).get("batch_passes")
    if "batch_passes" in given:
        batch_passes, why["batch_passes"] = bool(given["batch_passes"]), "given"
    elif isinstance(kept, bool):
        batch_passes, why["batch_passes"] = kept, "as the run folder being resumed records"
    elif not cpu:
        batch_passes, why["batch_passes"] = False, f"not measured on {dev.type}"
    elif resolution <= BATCH_PASSES_MAX_RESOLUTION:
        batch_passes, why["batch_passes"] = True, f"faster at {resolution} px"
    else:
        batch_passes, why["batch_passes"] = False, f"slower at {resolution} px"
    # compiling
    if "compile" in given:
        comp, why["compile"] = bool(given["compile"]), "given"
    elif not cpu:
        comp, why["compile"] = False, f"not measured on {dev.type}"
    elif precision != "bf16":
        comp, why["compile"] = False, "did not pay in fp32"
    elif per_worker < COMPILE_MIN_IMAGES:
        comp, why["compile"] = False, f"{per_worker} image(s) per process: fewer than {COMPILE_MIN_IMAGES}"
    elif not (has_compiler() if compiler is None else compiler):
        comp, why["compile"] = False, "no C++ compiler"
    else:
        comp, why["compile"] = True, f"{per_worker} images per process"
    # images per tuning batch
    if "tune_batch" in given:
        tune_batch, why["tune_batch"] = max(1, int(given["tune_batch"])), "given"
    elif not cpu:
        tune_batch, why["tune_batch"] = 1, f"not measured on {dev.type}"
    elif comp:
        tune_batch, why["tune_batch"] = 1, "compiled passes are one image's"
    elif resolution > TUNE_BATCH_MAX_RESOLUTION:
        tune_batch, why["tune_batch"] = 1, f"no gain at {resolution} px"
    else:
        share = per_worker if workers == 1 else math.ceil(per_worker / 2)
        tune_batch = max(1, min(MAX_TUNE_BATCH, share))
        why["tune_batch"] = f"{per_worker} image(s) per process at {resolution} px"
    return SpeedPlan(batch_passes, tune_batch, comp, workers, threads, False, why)
