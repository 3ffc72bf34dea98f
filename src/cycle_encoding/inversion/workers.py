"""Worker processes that fill one run folder beside the process that started them (a speed plan of several workers).
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.workers"."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from ..ops import keep_freed_memory
from ..utils import set_max_pixels
from .run_folder import fill_folder, line_sinks

RECORD_PREFIX = "cycle-encoding-worker-record: "
# the inverter's class is handed in by the worker's code (this module cannot import the inverter, which imports it)
WORKER_CODE = (
    "from cycle_encoding.inversion.inverter import Inverter; from cycle_encoding.inversion.workers import worker_main; "
    "worker_main(Inverter)"
)


def start_workers(task: dict[str, Any], count: int, threads: int) -> list[subprocess.Popen]:
    """Start ``count`` workers on ``task`` (``inverter.worker_main`` reads it), each with ``threads`` threads."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    procs = []
    for k in range(count):
        p = subprocess.Popen([sys.executable, "-c", WORKER_CODE], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             env=env, text=True)  # fmt: skip
        assert p.stdin is not None
        p.stdin.write(json.dumps({**task, "worker": k + 2, "threads": threads}))
        p.stdin.close()
        procs.append(p)
    return procs


def finish_workers(procs: list[subprocess.Popen], warn: Any) -> list[dict[str, Any]]:
    """Wait for the workers; their records (one that died says so and has done nothing it could report)."""
    records = []
    for k, p in enumerate(procs):
        assert p.stdout is not None
        text = p.stdout.read()
        rc = p.wait()
        lines = [ln for ln in text.splitlines() if ln.startswith(RECORD_PREFIX)]
        if rc == 0 and lines:
            records.append(json.loads(lines[-1][len(RECORD_PREFIX) :]))
            continue
        warn(f"worker {k + 2} ended with status {rc} before reporting: its unfinished images were left to the others")
        records.append({"worker": k + 2, "done": [], "failed": [], "busy": [], "skipped": []})
    return records


def stop_workers(procs: list[subprocess.Popen]) -> None:
    """End the workers still running (the parent stops early: an error or an interrupt)."""
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=30)
        except subprocess.TimeoutExpired:
            p.kill()


def merge_records(own: dict[str, Any], others: list[dict[str, Any]]) -> dict[str, Any]:
    """The parent's record without what its workers did: the images it found locked or finished by them."""
    theirs = {n for r in others for n in r["done"]} | {f["name"] for r in others for f in r["failed"]}
    return {**own, "busy": [b for b in own["busy"] if b["name"] not in theirs],
            "skipped": [n for n in own["skipped"] if n not in theirs]}  # fmt: skip


def worker_main(inverter_class: Any) -> None:
    """A worker process: its task from standard input, an ``inverter_class`` built from the task's files and
    options, the images it gets inverted (``fill_folder``), its record printed last."""
    task = json.loads(sys.stdin.read())
    if os.environ.get("CYCLE_ENCODING_MALLOC", "keep") != "system":  # as the command line does
        keep_freed_memory()
    set_max_pixels(task["max_pixels"])
    torch.set_num_threads(task["threads"])
    # the parent's substitute Ranger state for the refinement, when it estimated one (not estimated again here)
    substitute = torch.load(task["substitute"], weights_only=True) if task.get("substitute") else None
    inv = inverter_class(task["generator"], task["encoder"], task["options"], device=task["device"], progress="none",
                         refine_substitute=substitute)  # fmt: skip
    say, warn, per_image = line_sinks(task["verbose"])
    rec = fill_folder(inv, Path(task["out"]), [Path(f) for f in task["images"]], task["names"], task["todo"],
                      f"[worker {task['worker']}] ", say, warn, per_image, task["debug"], siblings=True)  # fmt: skip
    print(RECORD_PREFIX + json.dumps({"worker": task["worker"], **rec}), flush=True)
