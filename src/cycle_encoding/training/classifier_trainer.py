"""Train a small image classifier on Fashion-MNIST (the domain feature network and the evaluation network).

The loop: Adam (betas 0.9, 0.999) with a cosine learning-rate decay to zero over all steps, cross-entropy, batch 128,
light augmentation (each image shifted by up to ``shift`` pixels in x and y, the uncovered border filled with the
background value -1, and flipped left-right with probability 1/2 when ``flip``), images 32x32 (the generator's
resolution: 28x28 padded with 2 pixels of background), one channel. Shuffling, augmentation and the initialization
all come from ``seed``; with the same thread count on the same machine the weights come out bit-identical.

A run folder ``OUT/NNNNN-NAME`` receives ``log.jsonl`` (one record per logged step, then the test metrics),
``classifier.safetensors`` (the project's format, kind ``classifier``; its provenance holds the command, data,
epochs and steps, wall time, machine, and the test accuracy) and ``metrics.json``. ``export`` also copies the file
to a given path and writes its model card ``NAME-card.md`` beside it (see :func:`write_model_card`).
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..assets import SHIPPED_MODELS
from ..checkpoints.classifier import save_classifier
from ..checkpoints.native import default_provenance, file_sha256, read_native_header
from ..config import to_dict
from ..data.fashion_mnist import CLASSES, PAD_VALUE, load_split, pad_to_32, to_unit_range
from ..errors import CycleEncodingError
from ..networks.classifier import SMALL_ARCHS, AttributeClassifier, ClassifierConfig, parameter_count
from .runs import RunLog, next_run_dir

DEFAULT_WIDTHS = {"convnet": (32, 64, 128), "vggbn": (16, 32, 64)}
SLICE = 2000  # the test slice whose accuracy the card also gives (the shipped-model test checks it)


@dataclass
class ClassifierTrainConfig:
    """Options of ``cycle-encoding train-classifier`` (see the module doc)."""

    data: str = "fashion-mnist"
    arch: str = "convnet"
    widths: tuple[int, ...] | None = None
    seed: int = 0
    epochs: int = 4
    batch_size: int = 128
    lr: float = 2e-3
    shift: int = 2
    flip: bool = True
    threads: int = 1
    limit: int | None = None
    test_limit: int | None = None
    max_steps: int | None = None
    log_every: int = 50
    out: str = "runs"
    name: str | None = None
    export: str | None = None

    def __post_init__(self) -> None:
        if self.arch not in SMALL_ARCHS:
            raise ValueError(f"arch must be one of {', '.join(SMALL_ARCHS)}, got {self.arch!r}")
        if self.widths is None:
            self.widths = DEFAULT_WIDTHS[self.arch]
        if self.epochs < 1 or self.batch_size < 1 or self.threads < 1 or self.lr <= 0:
            raise ValueError("epochs, batch_size and threads must be >= 1 and lr > 0")
        if not 0 <= self.shift <= 8:
            raise ValueError(f"shift must be between 0 and 8 pixels, got {self.shift}")
        name, _, _ = self.data.partition("@")
        if name != "fashion-mnist":
            raise ValueError(f"data must be fashion-mnist (or fashion-mnist@FOLDER of idx files), got {self.data!r}")


def _root(data: str) -> str | None:
    return data.partition("@")[2] or None


def load_tensors(data: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a Fashion-MNIST split as one ``[N, 1, 32, 32]`` float32 tensor in [-1, 1] (the first ``limit``
    if given) and the int64 labels ``[N]``."""
    images, labels = load_split(split, _root(data))
    n = len(labels) if limit is None else min(int(limit), len(labels))
    x = pad_to_32(to_unit_range(images[:n])[:, None])
    y = torch.from_numpy(labels[:n].astype("int64"))
    return x, y


def augment(x: torch.Tensor, gen: torch.Generator, shift: int, flip: bool) -> torch.Tensor:
    """Each image shifted by an integer (dy, dx) uniform in [-shift, shift] (border filled with the background -1)
    and, if ``flip``, mirrored left-right with probability 1/2."""
    b, _, h, w = x.shape
    if shift > 0:
        xp = F.pad(x, (shift, shift, shift, shift), value=PAD_VALUE)
        d = torch.randint(0, 2 * shift + 1, (2, b), generator=gen)
        rows = (d[0][:, None] + torch.arange(h))[:, None, :, None]  # [B, 1, H, 1]
        cols = (d[1][:, None] + torch.arange(w))[:, None, None, :]  # [B, 1, 1, W]
        x = xp[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]
    if flip:
        m = torch.rand(b, generator=gen) < 0.5
        x = torch.where(m[:, None, None, None], x.flip(-1), x)
    return x


@torch.no_grad()
def evaluate_classifier(
    model: AttributeClassifier, x: torch.Tensor, y: torch.Tensor, batch_size: int = 500
) -> dict[str, Any]:
    """Accuracy, per-class accuracy and confusion matrix (rows: true class, columns: predicted) on ``(x, y)``, plus
    the accuracy on the first ``SLICE`` images (what the shipped-model test re-measures)."""
    was_training = model.training
    model.eval()
    preds = torch.cat([model(x[i : i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])
    model.train(was_training)
    k = len(model.outputs)
    conf = torch.bincount(y * k + preds, minlength=k * k).view(k, k)
    per_class = (conf.diag().float() / conf.sum(1).clamp(min=1).float()).tolist()
    correct = preds == y
    return {
        "images": len(y),
        "accuracy": float(correct.float().mean()),
        f"accuracy_first_{SLICE}": float(correct[:SLICE].float().mean()),
        "per_class_accuracy": {model.outputs[i]: per_class[i] for i in range(k)},
        "confusion": conf.tolist(),
    }


def machine_info() -> dict[str, Any]:
    """Where a run ran: platform, processor, CPU count, torch version, threads used."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }


def train_classifier(
    cfg: ClassifierTrainConfig, command: str | None = None, progress: Callable[[str], None] | None = print
) -> dict[str, Any]:
    """Train, test, export (see the module doc). Returns ``{"run_dir", "file", "metrics", "provenance", "model"}``
    (plus ``"exported"`` and ``"card"`` with ``export``)."""
    say = progress or (lambda _m: None)
    torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    x, y = load_tensors(cfg.data, "train", cfg.limit)
    xt, yt = load_tensors(cfg.data, "test", cfg.test_limit)
    model = AttributeClassifier(
        ClassifierConfig(arch=cfg.arch, outputs=CLASSES, input_size=32, in_channels=1, widths=tuple(cfg.widths or ()))
    )
    n_params = parameter_count(model)
    steps_per_epoch = (len(x) + cfg.batch_size - 1) // cfg.batch_size
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / total)))

    run_dir = next_run_dir(cfg.out, cfg.name or f"classifier-{cfg.arch}-seed{cfg.seed}")
    run_dir.mkdir(parents=True)
    log = RunLog(run_dir, enabled=True, tensorboard=False)
    log.write({"kind": "start", "step": 0, "config": to_dict(cfg), "command": command, "parameters": n_params,
               "train_images": len(x), "test_images": len(xt), "machine": machine_info()})  # fmt: skip
    say(f"{run_dir}: {cfg.arch} {list(cfg.widths or ())}, {n_params:,} parameters; {len(x):,} training images, "
        f"{total} steps ({cfg.epochs} epoch(s) of {steps_per_epoch}), {cfg.threads} thread(s)")  # fmt: skip

    t0 = time.perf_counter()
    step, epoch, run_loss, run_acc, run_n = 0, 0, 0.0, 0.0, 0
    model.train()
    while step < total:
        perm = torch.randperm(len(x), generator=gen)
        for i in range(0, len(x), cfg.batch_size):
            if step >= total:
                break
            idx = perm[i : i + cfg.batch_size]
            xb = augment(x[idx], gen, cfg.shift, cfg.flip)
            logits = model(xb)
            loss = F.cross_entropy(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            run_loss += float(loss.detach()) * len(idx)
            run_acc += float((logits.argmax(1) == y[idx]).sum())
            run_n += len(idx)
            if step % cfg.log_every == 0 or step == total:
                rec = {"kind": "train", "step": step, "epoch": epoch + i / len(x), "loss": run_loss / run_n,
                       "accuracy": run_acc / run_n, "lr": sched.get_last_lr()[0],
                       "time": round(time.perf_counter() - t0, 2)}  # fmt: skip
                log.write(rec)
                say(f"step {step}/{total}  epoch {rec['epoch']:.2f}  loss {rec['loss']:.4f}  "
                    f"train acc {rec['accuracy']:.4f}  {rec['time']:.0f}s")  # fmt: skip
                run_loss, run_acc, run_n = 0.0, 0.0, 0
        epoch += 1
    wall = time.perf_counter() - t0

    metrics = evaluate_classifier(model, xt, yt)
    log.write({"kind": "test", "step": step, **metrics})
    log.close()
    say(f"test accuracy {metrics['accuracy']:.4f} on {metrics['images']:,} test images; trained in {wall:.0f}s")
    provenance = default_provenance(
        command=command,
        data=f"{cfg.data}:train ({len(x):,} images, 32x32 padded, 1 channel, [-1, 1])",
        test_data=f"{cfg.data}:test ({len(xt):,} images)",
        epochs=cfg.epochs,
        steps=step,
        batch_size=cfg.batch_size,
        seed=cfg.seed,
        optimizer=f"Adam lr {cfg.lr} cosine to 0; shift {cfg.shift}px, flip {cfg.flip}",
        wall_time_s=round(wall, 1),
        machine=machine_info(),
        parameters=n_params,
        test_accuracy=metrics["accuracy"],
        **{f"test_accuracy_first_{SLICE}": metrics[f"accuracy_first_{SLICE}"]},
    )
    file = save_classifier(model, run_dir / "classifier.safetensors", provenance)
    (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
    result = {"run_dir": run_dir, "file": file, "metrics": metrics, "provenance": provenance, "model": model.eval()}
    if cfg.export:
        dest = Path(cfg.export)
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(file, dest)
        result["exported"] = dest
        result["card"] = write_model_card(dest, metrics)
        say(f"exported {dest} and {result['card']}")
    return result


def card_path(model_file: str | Path) -> Path:
    """``DIR/NAME-card.md`` for ``DIR/NAME.safetensors``."""
    p = Path(model_file)
    return p.with_name(f"{p.stem}-card.md")


def write_model_card(model_file: str | Path, metrics: dict[str, Any]) -> Path:
    """Write the Markdown model card of a classifier file from its header's provenance and ``metrics``: the command,
    data, epochs/steps, wall time and machine, parameter count, test accuracy, per-class accuracy, the confusion
    matrix and the file's sha256 (the line ``- sha256: `HEX``` that ``assets.card_sha256`` reads)."""
    p = Path(model_file)
    if not p.is_file():
        raise CycleEncodingError(f"{p}: no such model file")
    h = read_native_header(p)
    pv, cfg = h.get("provenance", {}), h.get("config", {})
    m = pv.get("machine", {})
    classes = list(metrics["per_class_accuracy"])
    lines = [
        f"# {p.stem}",
        "",
        f"A `{cfg.get('arch')}` classifier (widths {cfg.get('widths')}, input {cfg.get('input_size')}x"
        f"{cfg.get('input_size')}, {cfg.get('in_channels')} channel) of the 10 Fashion-MNIST classes, in the project's "
        "format (safetensors, kind `classifier`; nothing in the file runs). Load it with "
        "`cycle_encoding.editing.classifier.load_classifier`.",
        "",
        *([f"Role: {SHIPPED_MODELS[p.stem]}.", ""] if p.stem in SHIPPED_MODELS else []),
        "## Reproduce",
        "",
        "```",
        str(pv.get("command")),
        "```",
        "",
        "(Run from the repository root, with the Debian package `dataset-fashion-mnist` installed. The weights come",
        "out the same with the same thread count on the same machine; the header's time stamps and wall time differ,",
        "so the sha256 of a retrained file does too.)",
        "",
        "## Facts",
        "",
        f"- file: `{p.name}`, {p.stat().st_size:,} bytes",
        f"- sha256: `{file_sha256(p)}`",
        f"- parameters: {pv.get('parameters'):,}",
        f"- data: {pv.get('data')}; tested on {pv.get('test_data')}",
        f"- training: {pv.get('epochs')} epochs, {pv.get('steps')} steps of batch {pv.get('batch_size')}, "
        f"seed {pv.get('seed')}; {pv.get('optimizer')}",
        f"- wall time: {pv.get('wall_time_s')} s on {m.get('platform')} ({m.get('processor')}, "
        f"{m.get('cpu_count')} CPUs, {m.get('torch_threads')} torch thread(s)), torch {m.get('torch')}, "
        f"Python {m.get('python')}",
        f"- written by: {pv.get('tool')} at {pv.get('created')}",
        "",
        "## Test metrics",
        "",
        f"- test accuracy: {metrics['accuracy']:.4f} ({metrics['images']:,} test images)",
        f"- test accuracy, first {SLICE:,} test images: {metrics[f'accuracy_first_{SLICE}']:.4f}",
        "",
        "| class | accuracy |",
        "|---|---|",
        *[f"| {c} | {metrics['per_class_accuracy'][c]:.4f} |" for c in classes],
        "",
        "Confusion matrix (rows: true class, columns: predicted class, in the order above):",
        "",
        "```",
        *[" ".join(f"{v:5d}" for v in row) for row in metrics["confusion"]],
        "```",
        "",
    ]
    out = card_path(p)
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
