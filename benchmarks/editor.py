"""How fast the editor opens a run image and renders an edit (the browser editor's slider latency, less the page).

Opens RUN (default: a run made here of two Fashion-MNIST test images, encoder -> 3 tuning steps, shipped models) with
``Editor.open_run``, then times: switching to each image (the tuned generator rebuilt from the base and its stored
change, the pivot read), ``render`` of one and of three directions combined (median of ``--repeats``), and how soon a
cancel ends an inversion (``cancel_latency``). Usage:

    .venv/bin/python benchmarks/editor.py [--run out/demo/run] [--device cpu] [--repeats 20]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from cycle_encoding.editing.editor import Editor, InversionCancelled

EXAMPLES = Path(__file__).resolve().parents[1] / "examples" / "fashion-mnist"


def make_run(root: Path, device: str) -> Path:
    from cycle_encoding.inversion import Inverter

    (root / "pair").mkdir()
    for name in ("test-00000-ankle-boot.png", "test-00010-coat.png"):
        shutil.copy(EXAMPLES / name, root / "pair" / name)
    inv = Inverter("fmnist-generator", "fmnist-encoder", stages=("encoder", "tune"), perceptual="fmnist-features",
                   device=device, tune={"steps": 3})  # fmt: skip
    inv.run(root / "pair", root / "run", log=lambda s: None)
    return root / "run"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", type=Path, default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--components", type=int, default=3)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = args.run or make_run(Path(tmp), args.device)
        t0 = time.perf_counter()
        ed = Editor.open_run(run, device=args.device, components=args.components)
        print(f"Editor.open_run (generator, encoder, {len(ed.directions())} directions, first image): "
              f"{time.perf_counter() - t0:.3f} s")  # fmt: skip
        for name in ed.run_images():
            t0 = time.perf_counter()
            ed.open_image(name)
            print(f"open_image {name} (tuned generator rebuilt: {ed.tuned is not None}): "
                  f"{(time.perf_counter() - t0) * 1000:.1f} ms")  # fmt: skip
        keys = [d.key for d in ed.directions()]
        for chosen in (keys[:1], keys[:3]):
            strengths = {k: 1.0 for k in chosen}
            times = []
            for _ in range(args.repeats):
                t0 = time.perf_counter()
                ed.render(strengths)
                if torch.cuda.is_available():
                    torch.cuda.synchronize()
                times.append(time.perf_counter() - t0)
            print(f"render {len(chosen)} direction(s): median {statistics.median(times) * 1000:.1f} ms "
                  f"over {args.repeats}")  # fmt: skip
        cancel_latency(ed, EXAMPLES / "test-00006-coat.png")


def cancel_latency(ed: Editor, image: Path, repeats: int = 3) -> None:
    """How soon a cancel (the page's Cancel button, a closed page) ends an inversion: the flag is set during the
    6th tuning step of a 3,500-step tuning; the time from then to ``InversionCancelled``, against one step's time."""
    lat, step = [], []
    for _ in range(repeats):
        stop, t = threading.Event(), {}

        def progress(p: Any, stop: threading.Event = stop, t: dict[str, float] = t) -> None:
            if p.stage == "tune" and not p.done:
                t[f"step{p.step}"] = time.perf_counter()
                if p.step == 5:
                    stop.set()
                    t["set"] = time.perf_counter()

        try:
            ed.invert(image, ("encoder", "tune"), progress=progress, cancel=stop, tune={"steps": 3500})
        except InversionCancelled:
            lat.append(time.perf_counter() - t["set"])
            step.append(t["step5"] - t["step4"])
    print(f"cancel: the inversion ended a median {statistics.median(lat) * 1000:.1f} ms after the flag was set "
          f"(one tuning step: {statistics.median(step) * 1000:.1f} ms; {repeats} runs)")  # fmt: skip


if __name__ == "__main__":
    main()
