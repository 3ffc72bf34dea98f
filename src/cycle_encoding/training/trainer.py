"""The skeleton every resumable training loop fills: rank handling, the run folder, the checkpoint and its exact resume,
the JSONL log and the progress bar. Design notes: docs/INTERNALS.md, "cycle_encoding.training.trainer"."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from .. import distributed as dd
from ..checkpoints.common import atomic_torch_save, torch_load
from ..config import to_dict
from ..errors import CheckpointError, CycleEncodingError
from ..ops import autocast
from ..optim import zero_grad
from ..progress import Progress
from ..utils import read_json, resolve_device, write_json
from .runs import RunLog, next_run_dir, rng_state, set_rng_state


class Trainer:
    """A resumable training loop over ``cfg.max_steps`` (what a subclass fills in: docs/INTERNALS.md)."""

    desc: ClassVar[str] = "train"  # the progress bar's label
    progress: str = "auto"  # --progress: auto, bar, lines (a status line a minute in a log) or none
    checkpoint_format: ClassVar[str]
    checkpoint_version: ClassVar[int] = 1
    checkpoint_kind: ClassVar[str] = "cycle-encoding training"  # in "not a ... checkpoint"
    scalar_kinds: ClassVar[tuple[str, ...]] = ("train",)
    saves_images: ClassVar[bool] = True  # an images/ folder, and save_grid() every image_every steps
    # attributes the checkpoint holds under their own names, put back as they are (an older checkpoint without one
    # leaves the value __init__ gave)
    checkpoint_attrs: ClassVar[tuple[str, ...]] = ()

    cfg: Any
    step: int
    max_steps: int  # the configured end
    gen: torch.Generator  # the run's random draws: its state per rank is in the checkpoint
    log: RunLog
    run_dir: Path
    _discriminator: Callable[[torch.Tensor], torch.Tensor]  # D's pass (compiled or as it is): ``discriminate``

    # -- set-up ---------------------------------------------------------------------------------------------
    def _start(self, cfg: Any, quiet: bool, device: str | None = None, tensorboard: bool | None = None) -> None:
        """Rank handling: join the process group (under torchrun) and pick this rank's device (``device``, else
        ``cfg.device``). ``quiet``: no progress bar and no TensorBoard; ``tensorboard`` overrides the latter."""
        self.cfg = cfg
        self.quiet = quiet
        self.tensorboard = not quiet if tensorboard is None else tensorboard
        base_device = resolve_device(device if device is not None else cfg.device)
        self.dist = dd.init_distributed(base_device)
        self.device = dd.rank_device(base_device, self.dist)

    def _open_run(self, resume: str | Path | None) -> None:
        """A new run folder (rank 0 writes it), or the one to resume with its checkpoint loaded; then the log."""
        self.run_dir = self._setup_run_dir(resume)
        self._resumed_config: dict[str, Any] | None = None  # a resumed run's settings as its checkpoint saved them
        if resume is not None:
            self._load_checkpoint(self.run_dir / "checkpoint.pt")
        self.log = RunLog(self.run_dir, self.dist.is_main, tensorboard=self.tensorboard, scalar_kinds=self.scalar_kinds)

    def run_label(self) -> str:
        raise NotImplementedError

    def resolved(self) -> dict[str, Any]:
        """What the options resolve to, written into ``config.json`` as ``_resolved``."""
        raise NotImplementedError

    def write_run_files(self, run: Path) -> None:
        """Files a new run folder holds beside ``config.json`` (none by default)."""

    def _setup_run_dir(self, resume: str | Path | None) -> Path:
        if resume is not None:
            run = Path(resume)
            if not (run / "checkpoint.pt").is_file():
                raise CycleEncodingError(f"{run}: no checkpoint.pt to resume from")
            return run
        run = None
        if self.dist.is_main:
            run = next_run_dir(self.cfg.out, self.run_label())
            run.mkdir(parents=True)
            if self.saves_images:
                (run / "images").mkdir()
            cfg = to_dict(self.cfg)
            cfg["_resolved"] = self.resolved()
            write_json(run / "config.json", cfg)
            self.write_run_files(run)
        run = dd.broadcast_object(run, self.dist)
        assert run is not None
        return Path(run)

    # -- checkpoints ------------------------------------------------------------------------------------------
    def rank_state(self) -> dict[str, Any]:
        """What differs between ranks (random states, pools): gathered from every rank into the checkpoint."""
        return {"rng": rng_state(self.gen)}

    def stateful(self) -> dict[str, Any]:
        """The networks, optimizers, schedules, sampler ... by checkpoint key: objects with ``state_dict()`` and
        ``load_state_dict()``, saved and put back as they are."""
        return {}

    def checkpoint_state(self) -> dict[str, Any]:
        """Anything else the checkpoint holds (beyond the step, ``stateful()``, ``checkpoint_attrs``, the ranks' states,
        the configuration)."""
        return {}

    def network_configs(self) -> dict[str, dict[str, Any]]:
        """The networks' configurations (``{"encoder_config": {...}}``): the checkpoint holds them, and resuming
        refuses a checkpoint whose differ from this run's."""
        return {}

    def restore_checkpoint(self, ck: dict[str, Any], rank_state: dict[str, Any]) -> None:
        """Put back what ``checkpoint_state`` and ``rank_state`` saved beyond the random state."""

    def save_checkpoint(self) -> Path | None:
        """Write ``checkpoint.pt`` atomically (rank 0; every rank's state gathered into it)."""
        ranks = dd.gather_objects(self.rank_state(), self.dist)
        if not self.dist.is_main:
            return None
        ckpt = {
            "format": self.checkpoint_format,
            "version": self.checkpoint_version,
            "step": self.step,
            **self.network_configs(),
            **{key: obj.state_dict() for key, obj in self.stateful().items()},
            **{key: getattr(self, key) for key in self.checkpoint_attrs},
            **self.checkpoint_state(),
            "ranks": ranks,
            "config": to_dict(self.cfg),
        }
        return atomic_torch_save(ckpt, self.run_dir / "checkpoint.pt")

    def _load_checkpoint(self, path: Path) -> None:
        ck = torch_load(path)  # on the CPU: random states must stay there; modules copy to their device
        if not isinstance(ck, dict) or ck.get("format") != self.checkpoint_format:
            raise CheckpointError(path, f"not a {self.checkpoint_kind} checkpoint")
        for key, want in self.network_configs().items():
            if ck.get(key) != want:
                name = key.removesuffix("_config")
                raise CheckpointError(path, f"the checkpoint's {name} does not match the run's configuration")
        ranks = ck["ranks"]
        if len(ranks) != self.dist.world_size:
            raise CheckpointError(
                path, f"saved by {len(ranks)} process(es); resume with the same number (now {self.dist.world_size})"
            )
        for key, obj in self.stateful().items():
            obj.load_state_dict(ck[key])
        for key in self.checkpoint_attrs:
            if key in ck:
                setattr(self, key, ck[key])
        set_rng_state(ranks[self.dist.rank]["rng"], self.gen)
        self.restore_checkpoint(ck, ranks[self.dist.rank])
        self.step = int(ck["step"])
        self._resumed_config = ck.get("config") or {}

    # -- the loop -----------------------------------------------------------------------------------------------
    def train_step(self) -> dict[str, float]:
        raise NotImplementedError

    def save_grid(self) -> Path | None:
        raise NotImplementedError

    def digest_modules(self) -> tuple[nn.Module, ...]:
        raise NotImplementedError

    def on_start(self) -> None:
        """Rank 0, at step 0: the start record and anything else written before the first step."""

    def log_fields(self) -> dict[str, Any]:
        """Fields of a ``train`` record between ``step`` and ``time``."""
        return {}

    def train_record(self, logs: dict[str, Any], sec_per_step: float) -> dict[str, Any]:
        """The ``train`` record of this step (every ``log_every`` steps and at the end), from the step's losses."""
        return {"kind": "train", "step": self.step, **self.log_fields(), "time": time.time(),
                "sec_per_step": sec_per_step, **logs}  # fmt: skip

    def postfix(self, logs: dict[str, Any]) -> dict[str, Any]:
        """What the progress bar shows of a step's losses."""
        return {}

    def after_log(self, last: bool) -> None:
        """After each step's logging, before its pictures and checkpoint (e.g. validation)."""

    def on_checkpoint(self) -> None:
        """After each checkpoint (e.g. an export)."""

    def end_fields(self) -> dict[str, Any]:
        """Fields of the ``end`` record between ``time`` and ``ranks_in_sync``."""
        return {}

    def on_end(self) -> None:
        """After the ``end`` record (e.g. the final export)."""

    def optimizer_step(
        self, opt: torch.optim.Optimizer, loss: torch.Tensor, module: nn.Module, zero: str = "none"
    ) -> None:
        """Clear the gradients (``optim.zero_grad`` mode ``zero``), back-propagate ``loss``, average, step ``opt``."""
        zero_grad(opt, zero)
        loss.backward()
        dd.average_gradients(module.parameters(), self.dist)
        opt.step()

    def discriminate(self, x: torch.Tensor) -> torch.Tensor:
        """The discriminator's scores of ``x``, float32 (under bfloat16 autocast in ``bf16`` runs)."""
        with autocast(x.device, self.cfg.precision):
            return self._discriminator(x).float()

    def _log(self, record: dict[str, Any]) -> None:
        self.log.write(record)

    def message(self, line: str) -> None:
        """A line for the person watching (rank 0, not when quiet), above the progress bar while there is one."""
        if not self.dist.is_main or self.quiet:
            return
        bar = getattr(self, "_bar", None)
        if bar is not None:
            bar.say(line)
        else:
            print(line, flush=True)

    def request_stop(self, reason: str) -> None:
        """End the run after this step as if it were the last (pictures, checkpoint, ``stop`` record); every rank
        must ask at the same step (decide on rank 0 and share it)."""
        self._stop_reason = reason

    def weights_digest(self) -> str:
        """sha256 over the networks' state dicts (to check that processes hold identical networks)."""
        h = hashlib.sha256()
        for m in self.digest_modules():
            for k, v in m.state_dict().items():
                h.update(k.encode())
                h.update(v.detach().cpu().contiguous().numpy().tobytes())
        return h.hexdigest()

    def run(self, until: int | None = None) -> dict[str, Any]:
        """Train from the current step to ``until`` (default: the configured end); checkpoints on the way."""
        cfg = self.cfg
        end = min(self.max_steps if until is None else until, self.max_steps)
        if self.step == 0 and self.dist.is_main:
            self.on_start()
        elif self.dist.is_main and self._resumed_config is not None:
            # what the log cannot show otherwise: where the run went on, and the settings the resume changed
            now = to_dict(self.cfg)
            changed = {k: [self._resumed_config.get(k), v] for k, v in now.items() if self._resumed_config.get(k) != v}
            self._log({"kind": "resume", "step": self.step, "time": time.time(), "changed": changed})
            self._resumed_config = None
        mode = "none" if not self.dist.is_main or self.quiet else self.progress
        bar = Progress(end, self.desc, "step", mode, heartbeat=60, initial=self.step)
        self._bar = bar
        self._stop_reason: str | None = None
        t_last = time.perf_counter()
        steps_since = 0
        while self.step < end:
            logs = self.train_step()
            steps_since += 1
            bar.update(1)
            last = self.step == end
            if self.step % cfg.log_every == 0 or last:
                now = time.perf_counter()
                rec = self.train_record(logs, (now - t_last) / steps_since)
                t_last, steps_since = now, 0
                self._log(rec)
                bar.postfix(**self.postfix(logs))
            self.after_log(last)
            if self._stop_reason is not None and not last:
                last = True
                self._log({"kind": "stop", "step": self.step, "time": time.time(), "reason": self._stop_reason})
                self.message(f"stopping at step {self.step}: {self._stop_reason}")
            if self.saves_images and self.dist.is_main and (self.step % cfg.image_every == 0 or last):
                self.save_grid()
            if self.step % cfg.checkpoint_every == 0 or last:
                self.save_checkpoint()
                self.on_checkpoint()
            if self._stop_reason is not None:
                break
        bar.close()
        self._bar = None
        digests = dd.gather_objects(self.weights_digest(), self.dist)
        summary = {"kind": "end", "step": self.step, "time": time.time(), **self.end_fields(),
                   "ranks_in_sync": len(set(digests)) == 1, "weights_sha256": digests}  # fmt: skip
        self._log(summary)
        self.on_end()
        self.log.flush()
        dd.barrier(self.dist)
        return summary

    def close(self) -> None:
        self.log.close()
        dd.shutdown(self.dist)


def read_run_config(
    run_dir: str | Path, command: str, overrides: dict[str, Any] | None = None, allowed: tuple[str, ...] = ()
) -> dict[str, Any]:
    """The options a run was started with (its ``config.json`` without ``_resolved``), with ``overrides`` of the
    ``allowed`` options (what may change when resuming) put in; any other override is a one-line error."""
    p = Path(run_dir) / "config.json"
    if not Path(run_dir).is_dir():
        raise CycleEncodingError(f"no such run folder: {run_dir}" if not Path(run_dir).exists() else
                                 f"{run_dir}: a file, not a {command} run folder")  # fmt: skip
    if not p.is_file():
        raise CycleEncodingError(f"{run_dir}: not a {command} run folder (no config.json)")
    data = read_json(p)
    data.pop("_resolved", None)
    for k, v in (overrides or {}).items():
        if k not in allowed:
            raise CycleEncodingError(f"--{k.replace('_', '-')} cannot change when resuming (only {', '.join(allowed)})")
        data[k] = v
    return data
