"""Train a small image classifier on Fashion-MNIST (the domain feature network and the evaluation network).
Design notes: docs/INTERNALS.md, "cycle_encoding.training.classifier_trainer"."""

from __future__ import annotations

import math
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
from ..config import check_at_least, check_one_of, from_mapping, to_dict
from ..data.fashion_mnist import CLASSES, PAD_VALUE, load_split, pad_to_32, to_unit_range
from ..errors import CycleEncodingError
from ..networks.classifier import SMALL_ARCHS, AttributeClassifier, ClassifierConfig
from ..utils import write_json
from .runs import machine_info
from .trainer import Trainer, read_run_config

ARCH_WIDTHS = {"convnet": (32, 64, 128), "vggbn": (16, 32, 64)}
SLICE = 2000  # the test slice whose accuracy the card also gives (the shipped-model test checks it)


@dataclass
class ClassifierTrainConfig:
    """Options of ``cycle-encoding train-classifier``."""

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
    checkpoint_every: int = 500
    out: str = "runs"
    name: str | None = None
    export: str | None = None

    def __post_init__(self) -> None:
        check_one_of(self, arch=SMALL_ARCHS)
        if self.widths is None:
            self.widths = ARCH_WIDTHS[self.arch]
        check_at_least(self, epochs=1, batch_size=1, threads=1, log_every=1, checkpoint_every=1, max_steps=1)
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if not 0 <= self.shift <= 8:
            raise ValueError(f"shift must be between 0 and 8 pixels, got {self.shift}")
        if self.data.partition("@")[0] != "fashion-mnist":
            raise ValueError(f"data must be fashion-mnist (or fashion-mnist@FOLDER of idx files), got {self.data!r}")


def load_tensors(data: str, split: str, limit: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """All images of a Fashion-MNIST split as one ``[N, 1, 32, 32]`` float32 tensor in [-1, 1] (the first ``limit``
    if given) and the int64 labels ``[N]``."""
    images, labels = load_split(split, data.partition("@")[2] or None)
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


class ClassifierTrainer(Trainer):
    """Builds the classifier, its optimizer and the data from a config (or a run folder to resume) and runs the loop
    (``trainer.Trainer``); :meth:`finish` tests and exports once all steps are done."""

    desc = "train-classifier"
    checkpoint_format = "cycle-encoding-train-classifier"
    checkpoint_kind = "cycle-encoding train-classifier"
    saves_images = False
    checkpoint_attrs = ("train_seconds", "command")  # command: the one that started the run (the card's reproduction)

    def __init__(
        self,
        cfg: ClassifierTrainConfig,
        resume: str | Path | None = None,
        command: str | None = None,
        progress: Callable[[str], None] | None = print,
        progress_mode: str = "none",
    ) -> None:
        self.say = progress or (lambda _m: None)
        self.progress = progress_mode  # the step bar (--progress); the record lines go to ``progress``
        self.command = command
        # the order of the seeding, the draws and the model's construction is the one the shipped models were made in
        torch.set_num_threads(cfg.threads)
        self._start(cfg, quiet=False, device="cpu", tensorboard=False)  # record lines, a bar by --progress
        if self.dist.world_size > 1:
            raise CycleEncodingError("train-classifier runs in one process: start it without torchrun")
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.x, self.y = load_tensors(cfg.data, "train", cfg.limit)
        self.xt, self.yt = load_tensors(cfg.data, "test", cfg.test_limit)
        arch = ClassifierConfig(arch=cfg.arch, outputs=CLASSES, input_size=32, in_channels=1, widths=tuple(cfg.widths))
        self.model = AttributeClassifier(arch)
        self.n_params = sum(p.numel() for p in self.model.parameters())  # BatchNorm statistics are buffers
        self.steps_per_epoch = (len(self.x) + cfg.batch_size - 1) // cfg.batch_size
        total = self.steps_per_epoch * cfg.epochs
        self.max_steps = total if cfg.max_steps is None else min(total, cfg.max_steps)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / self.max_steps))
        )
        # where the sampler stands: the epoch, its shuffled order (drawn at its first step), the next batch's offset
        self.epoch, self.perm, self.offset = 0, None, 0
        self.epoch_at = 0.0  # the epoch (fraction) of the last step's batch
        self.sums = [0.0, 0.0, 0]  # loss and correct predictions summed over the images since the last record, count
        self.train_seconds = 0.0  # time spent in training steps, over all resumed parts
        self.step = 0
        self.model.train()
        self._open_run(resume)
        cfg = self.cfg
        again = f"resumed at step {self.step}; " if self.step else ""
        self.say(f"{self.run_dir}: {again}{cfg.arch} {list(cfg.widths)}, {self.n_params:,} parameters; "
                 f"{len(self.x):,} training images, {self.max_steps} steps ({cfg.epochs} epoch(s) of "
                 f"{self.steps_per_epoch}), {cfg.threads} thread(s)")  # fmt: skip

    # -- set-up ---------------------------------------------------------------------------------------------
    def run_label(self) -> str:
        return self.cfg.name or f"classifier-{self.cfg.arch}-seed{self.cfg.seed}"

    def resolved(self) -> dict[str, Any]:
        return {"parameters": self.n_params, "train_images": len(self.x), "test_images": len(self.xt),
                "steps": self.max_steps, "steps_per_epoch": self.steps_per_epoch, "command": self.command}  # fmt: skip

    # -- checkpoints ------------------------------------------------------------------------------------------
    def checkpoint_state(self) -> dict[str, Any]:
        return {
            "sampler": {"epoch": self.epoch, "perm": self.perm, "offset": self.offset},
            "since_record": list(self.sums),
        }

    def stateful(self) -> dict[str, Any]:
        return {"classifier": self.model, "optimizer": self.opt, "lr_schedule": self.sched}

    def network_configs(self) -> dict[str, dict[str, Any]]:
        return {"classifier_config": self.model.config.to_dict()}

    def restore_checkpoint(self, ck: dict[str, Any], rank_state: dict[str, Any]) -> None:
        sampler = ck["sampler"]
        self.epoch, self.perm, self.offset = int(sampler["epoch"]), sampler["perm"], int(sampler["offset"])
        loss, correct, n = ck["since_record"]
        self.sums = [float(loss), float(correct), int(n)]

    # -- one step -----------------------------------------------------------------------------------------------
    def next_batch(self) -> torch.Tensor:
        """The indices of the next batch: a new shuffled order (from ``gen``) at the start of each epoch."""
        n = len(self.x)
        if self.perm is not None and self.offset >= n:
            self.epoch, self.perm, self.offset = self.epoch + 1, None, 0
        if self.perm is None:
            self.perm = torch.randperm(n, generator=self.gen)
        idx = self.perm[self.offset : self.offset + self.cfg.batch_size]
        self.epoch_at = self.epoch + self.offset / n
        self.offset += self.cfg.batch_size
        return idx

    def train_step(self) -> dict[str, float]:
        t0 = time.perf_counter()
        cfg = self.cfg
        idx = self.next_batch()
        xb = augment(self.x[idx], self.gen, cfg.shift, cfg.flip)
        logits = self.model(xb)
        loss = F.cross_entropy(logits, self.y[idx])
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        self.sched.step()
        self.step += 1
        self.sums[0] += float(loss.detach()) * len(idx)
        self.sums[1] += float((logits.argmax(1) == self.y[idx]).sum())
        self.sums[2] += len(idx)
        self.train_seconds += time.perf_counter() - t0
        return {}

    # -- the loop's hooks ---------------------------------------------------------------------------------------
    def train_record(self, logs: dict[str, Any], sec_per_step: float) -> dict[str, Any]:
        """Loss and training accuracy: means over the images since the last ``log_every`` record; ``time``: seconds
        of training so far."""
        loss, correct, n = self.sums
        rec = {"kind": "train", "step": self.step, "epoch": self.epoch_at, "loss": loss / n, "accuracy": correct / n,
               "lr": self.sched.get_last_lr()[0], "time": round(self.train_seconds, 2)}  # fmt: skip
        if self.step % self.cfg.log_every == 0:  # a stop in between (run(until=...)) leaves the next record whole
            self.sums = [0.0, 0.0, 0]
        return rec

    def _log(self, record: dict[str, Any]) -> None:
        super()._log(record)
        if record["kind"] == "train":
            self.say(f"step {record['step']}/{self.max_steps}  epoch {record['epoch']:.2f}  loss {record['loss']:.4f}  "
                     f"train acc {record['accuracy']:.4f}  {record['time']:.0f}s")  # fmt: skip

    def on_start(self) -> None:
        self._log({"kind": "start", "step": 0, "config": to_dict(self.cfg), "command": self.command,
                   "parameters": self.n_params, "train_images": len(self.x), "test_images": len(self.xt),
                   "machine": machine_info()})  # fmt: skip

    def digest_modules(self) -> tuple[torch.nn.Module, ...]:
        return (self.model,)

    def end_fields(self) -> dict[str, Any]:
        return {"train_seconds": self.train_seconds}

    # -- test and export ----------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        """Test, write ``classifier.safetensors`` and ``metrics.json`` (and the export with its card). Returns
        ``{"run_dir", "file", "metrics", "provenance", "model"}`` (plus ``"exported"`` and ``"card"`` with ``export``).
        """
        cfg = self.cfg
        if self.step < self.max_steps:
            raise CycleEncodingError(
                f"{self.run_dir}: trained {self.step} of {self.max_steps} steps; resume it to finish"
            )
        metrics = evaluate_classifier(self.model, self.xt, self.yt)
        self._log({"kind": "test", "step": self.step, **metrics})
        self.say(f"test accuracy {metrics['accuracy']:.4f} on {metrics['images']:,} test images; "
                 f"trained in {self.train_seconds:.0f}s")  # fmt: skip
        provenance = default_provenance(
            command=self.command,
            data=f"{cfg.data}:train ({len(self.x):,} images, 32x32 padded, 1 channel, [-1, 1])",
            test_data=f"{cfg.data}:test ({len(self.xt):,} images)",
            epochs=cfg.epochs,
            steps=self.step,
            batch_size=cfg.batch_size,
            seed=cfg.seed,
            optimizer=f"Adam lr {cfg.lr} cosine to 0; shift {cfg.shift}px, flip {cfg.flip}",
            wall_time_s=round(self.train_seconds, 1),
            machine=machine_info(),
            parameters=self.n_params,
            test_accuracy=metrics["accuracy"],
            **{f"test_accuracy_first_{SLICE}": metrics[f"accuracy_first_{SLICE}"]},
        )
        file = save_classifier(self.model, self.run_dir / "classifier.safetensors", provenance)
        write_json(self.run_dir / "metrics.json", metrics)
        result = {"run_dir": self.run_dir, "file": file, "metrics": metrics, "provenance": provenance,
                  "model": self.model.eval()}  # fmt: skip
        if cfg.export:
            dest = Path(cfg.export)
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file, dest)
            result["exported"] = dest
            result["card"] = write_model_card(dest, metrics)
            self.say(f"exported {dest} and {result['card']}")
        return result


def train_classifier(
    cfg: ClassifierTrainConfig,
    command: str | None = None,
    progress: Callable[[str], None] | None = print,
    resume: str | Path | None = None,
    progress_mode: str = "none",
) -> dict[str, Any]:
    """Train (or go on with the run in ``resume``), test, export ; what
    :meth:`ClassifierTrainer.finish` returns. ``progress_mode``: the step bar, as ``--progress``."""
    trainer = ClassifierTrainer(cfg, resume=resume, command=command, progress=progress, progress_mode=progress_mode)
    try:
        trainer.run()
        return trainer.finish()
    finally:
        trainer.close()


def resume_classifier_config(run_dir: str | Path, overrides: dict[str, Any] | None = None) -> ClassifierTrainConfig:
    """The configuration a run was started with (``config.json``); only these ``overrides`` may change (the
    learning-rate schedule spans all steps, so the step count may not)."""
    allowed = ("log_every", "checkpoint_every", "threads", "export")
    data = read_run_config(run_dir, "train-classifier", overrides, allowed)
    return from_mapping(ClassifierTrainConfig, data, "train-classifier")


def write_model_card(model_file: str | Path, metrics: dict[str, Any]) -> Path:
    """Write the Markdown model card of a classifier file from its header's provenance and ``metrics``: the command,
    data, epochs/steps, wall time and machine, parameter count, test accuracy, per-class accuracy, the confusion
    matrix and the file's sha256 (the line ``- sha256: `HEX``` that ``assets.card_sha256`` reads)."""
    p = Path(model_file)
    h = read_native_header(p)  # a missing or foreign file: its one-line CheckpointError
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
    out = p.with_name(f"{p.stem}-card.md")
    out.write_text("\n".join(lines), encoding="utf-8")
    return out
