"""One generator tuned on many images: PTI's multi-ID mode, resumable from a saved state; into a run folder too.
Design notes: docs/INTERNALS.md, "cycle_encoding.inversion.tune_shared"."""

from __future__ import annotations

import copy
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from ..checkpoints import run_folder as rf
from ..checkpoints.common import atomic_torch_save, torch_load
from ..checkpoints.native import file_sha256, read_native
from ..errors import CycleEncodingError
from ..losses.networks import LossNetworks
from ..networks.stylegan2 import Generator
from .common import cpu_generator, frozen
from .config import PIVOT_STAGES
from .progress import StepBar
from .result import InversionResult
from .run_folder import (
    FolderInverter,
    FolderJob,
    image_state,
    prepare_run_dir,
    record_failure,
    store_delta,
    write_summary,
)
from .tune import TuneConfig, tuning_copy, tuning_loss

STATE_FORMAT = "cycle-encoding-shared-tune-state"


@dataclass
class SharedTuneState:
    """Where a shared tuning stands after ``rounds`` whole rounds (what a checkpoint holds)."""

    rounds: int
    images: list[str]  # what the tuning was started on (names or hashes), in order: a resume must match
    weights: dict[str, torch.Tensor]  # the tuned copy's parameters
    optimizer: dict[str, Any]  # Adam's state_dict
    rng: list[torch.Tensor]  # every image's generator state
    losses: list[list[dict[str, Any]]] = field(default_factory=list)  # per image, its steps' records so far


@dataclass
class SharedTuneResult:
    generator: Generator  # the one tuned copy (eval mode, gradients off)
    losses: list[list[dict[str, Any]]]  # per image, its steps' records
    rounds: int
    updates: int  # Adam steps taken over all images


def pivotal_tune_shared(
    G: Generator,
    pivots: Sequence[torch.Tensor],
    targets: Sequence[torch.Tensor],
    nets: LossNetworks | None = None,
    config: TuneConfig | None = None,
    seeds: Sequence[int] | None = None,
    on_step: Callable[[int, dict[str, Any]], None] | None = None,
    *,
    keys: Sequence[str] | None = None,
    resume: SharedTuneState | None = None,
    save_every: int = 0,
    on_save: Callable[[SharedTuneState], None] | None = None,
) -> SharedTuneResult:
    """Tune one copy of ``G`` on every ``(pivot [1, N, w_dim], target [1, C, R, R])`` pair (see the design notes).

    ``seeds[i]``: the seed of image i's regularizer draws (default: i). ``on_step(i, record)`` sees each step's
    losses. ``keys``: what identifies the images (default: their positions), recorded in the saved states; a
    ``resume`` state must have the same. ``save_every`` > 0: after every that many rounds (and not after the last)
    ``on_save`` gets the state. ``G`` is not changed."""
    c = config or TuneConfig()
    n = len(pivots)
    if n == 0 or len(targets) != n:
        raise CycleEncodingError(f"shared tuning needs one target per pivot, got {n} pivots and {len(targets)} targets")
    nets = nets or LossNetworks()
    seeds = list(range(n)) if seeds is None else list(seeds)
    keys = [str(i) for i in range(n)] if keys is None else [str(k) for k in keys]
    device = G.w_avg.device
    ws = [p.to(device).detach() for p in pivots]
    xs = [x.to(device) for x in targets]
    gens = [cpu_generator(s) for s in seeds]
    tuned, opt = tuning_copy(G, c)
    losses: list[list[dict[str, Any]]] = [[] for _ in range(n)]
    start = 0
    if resume is not None:
        start = _restore(resume, keys, c.steps, tuned, opt, gens)
        losses = [list(r) for r in resume.losses]
    with frozen(G):
        for rnd in range(start, c.steps):
            for i in range(n):
                g = rnd * n + i
                rec: dict[str, Any] = {"stage": "tune", "step": g, "round": rnd}
                regularize = c.locality and g % c.locality_every == 0
                loss = tuning_loss(tuned, G, ws[i], xs[i], nets.perceptual, c, gens[i], regularize, rec)
                assert loss is not None
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                losses[i].append(rec)
                if on_step is not None:
                    on_step(i, rec)
            done = rnd + 1
            if save_every > 0 and on_save is not None and done % save_every == 0 and done < c.steps:
                on_save(_state(done, keys, tuned, opt, gens, losses))
    opt.zero_grad(set_to_none=True)
    tuned.requires_grad_(False).eval()
    return SharedTuneResult(generator=tuned, losses=losses, rounds=c.steps, updates=c.steps * n)


def _state(
    rounds: int, keys: list[str], tuned: Generator, opt: torch.optim.Optimizer, gens: list[torch.Generator],
    losses: list[list[dict[str, Any]]],
) -> SharedTuneState:  # fmt: skip
    weights = {k: p.detach().clone() for k, p in tuned.named_parameters()}
    optim = copy.deepcopy(opt.state_dict())  # a snapshot: the live state dict holds the moments Adam updates
    return SharedTuneState(rounds, list(keys), weights, optim, [g.get_state() for g in gens], [list(r) for r in losses])


def _restore(
    st: SharedTuneState, keys: list[str], steps: int, tuned: Generator, opt: torch.optim.Optimizer,
    gens: list[torch.Generator],
) -> int:  # fmt: skip
    """Put a saved state into the tuned copy, its Adam and the images' generators; the rounds already done."""
    if st.images != keys:
        raise CycleEncodingError(
            f"the saved shared tuning was started on {len(st.images)} other image(s) than these {len(keys)}"
        )
    if not 0 <= st.rounds <= steps or len(st.rng) != len(gens):
        raise CycleEncodingError(f"the saved shared tuning does not fit ({st.rounds} rounds of {steps})")
    with torch.no_grad():
        params = dict(tuned.named_parameters())
        if set(params) != set(st.weights):
            raise CycleEncodingError("the saved shared tuning is of another generator (its weights differ in names)")
        for k, p in params.items():
            p.copy_(st.weights[k])
    opt.load_state_dict(st.optimizer)
    for g, s in zip(gens, st.rng):
        g.set_state(s)
    return st.rounds


def save_state(path: str | Path, st: SharedTuneState) -> Path:
    """``st`` as a torch file (tensors and plain containers only: it loads with ``weights_only=True``), atomically."""
    doc = {"format": STATE_FORMAT, "version": 1, **{f.name: getattr(st, f.name) for f in fields(st)}}
    return atomic_torch_save(doc, path)


def load_state(path: str | Path) -> SharedTuneState:
    doc = torch_load(path)
    if not isinstance(doc, dict) or doc.get("format") != STATE_FORMAT:
        raise CycleEncodingError(f"{path}: not a saved shared tuning")
    return SharedTuneState(**{f.name: doc[f.name] for f in fields(SharedTuneState)})


# -- into a run folder ---------------------------------------------------------------------------------------------


def invert_shared(
    inverter: FolderInverter,
    out: Path,
    images: Any,
    files: list[Path],
    names: list[str],
    say: Callable[[str], None],
    warn: Callable[[str], None],
    debug: bool = False,
) -> dict[str, Any]:
    """Invert ``files`` into ``out`` with ONE generator tuned on all of them, in three resumable steps (the design
    notes); returns the summary (``write_summary``)."""
    if inverter.dist.world_size > 1:
        raise CycleEncodingError("shared tuning tunes one generator in one process: run it without torchrun")

    def fail(e: BaseException, i: int, head: str, failed: list[dict[str, str]]) -> None:
        record_failure(e, names[i], files[i], head, failed, warn, debug)

    prepare_run_dir(inverter, out, images)
    with rf.lock(out / ".shared.lock") as free:
        if not free:
            raise CycleEncodingError(f"{out}: another process is inverting into it (shared tuning): let it finish")
        todo = [i for i, (n, f) in enumerate(zip(names, files)) if image_state(out, n, f) != "done"]
        if not todo:
            say(f"all {len(names)} image(s) already done in {out} (one generator shared by them)")
            return write_summary(inverter, out, names, list(names), [{"rank": 0, "done": [], "failed": []}])
        recorded = rf.read_json(out / rf.SHARED)["images"] if (out / rf.SHARED).is_file() else None
        failed: list[dict[str, str]] = []
        if recorded is not None:  # a tuned run: only its own images can be finished
            for i in [i for i in todo if _key(names[i], files[i]) not in recorded]:
                fail(CycleEncodingError(
                    f"new or changed since {out}'s one generator was tuned on {len(recorded)} image(s): tuning again "
                    "would change every finished image's generator; invert it into another --out, or all the "
                    "images into a new one"), i, names[i], failed)  # fmt: skip
                todo.remove(i)
        jobs: dict[int, tuple[FolderJob, InversionResult | None]] = {}
        for k, i in enumerate(todo):  # 1. the stages before tuning, image by image
            head = f"[{k + 1}/{len(todo)}] {names[i]}"
            if image_state(out, names[i], files[i], rf.PIVOTED) == "done":
                continue
            try:
                job = FolderJob(inverter, files[i], names[i], i, rf.image_folder(out, names[i]), head, say, warn)
                (job.folder / rf.PIVOTED).unlink(missing_ok=True)
                res = inverter.invert_many([job.x], [i], [names[i]], on_step=lambda _, r, j=job: j.bar.step(r),
                                           on_stage=lambda _, st, r, j=job: j.on_stage(st, r), pivots_only=True)[0]  # fmt: skip
                job.finish(res, mark=rf.PIVOTED)
                jobs[i] = (job, res)
            except Exception as e:  # one bad image must not stop the others
                fail(e, i, head, failed)
        members = [i for i, (n, f) in enumerate(zip(names, files)) if image_state(out, n, f, rf.PIVOTED) == "done"]
        if recorded is not None:
            members = [i for i in members if _key(names[i], files[i]) in recorded]
            if len(members) != len(recorded):
                raise CycleEncodingError(f"{out}: {len(recorded) - len(members)} of the images its shared generator "
                                         f"was tuned on ({rf.SHARED}) are missing: restore them to finish the run")  # fmt: skip
        done = []
        if members and any(i in todo for i in members):
            done = _tune_shared(inverter, out, members, jobs, names, files, say, warn, fail, failed)
    gone = {*done, *(f["name"] for f in failed)}
    before = [n for n in names if n not in gone]
    return write_summary(inverter, out, names, before, [{"rank": 0, "done": done, "failed": failed}])


def _key(name: str, file: Path) -> str:
    """How a shared tuning names an image: its name and its input file's sha256."""
    return f"{name}:{file_sha256(file) if Path(file).is_file() else None}"


def _tune_shared(
    inverter: FolderInverter,
    out: Path,
    members: list[int],
    jobs: dict[int, tuple[FolderJob, InversionResult | None]],
    names: list[str],
    files: list[Path],
    say: Callable[[str], None],
    warn: Callable[[str], None],
    fail: Callable[[BaseException, int, str, list[dict[str, str]]], None],
    failed: list[dict[str, str]],
) -> list[str]:
    """(2) and (3) of ``invert_shared`` on the pivoted images ``members``: the names of those done."""
    cfg = inverter.config
    fjobs: list[FolderJob] = []
    results: list[InversionResult] = []
    for m, i in enumerate(members):
        head = f"[{m + 1}/{len(members)}] {names[i]}"
        job, res = jobs.get(i, (None, None))
        if job is None or res is None:  # pivoted by an earlier process: read back
            job = FolderJob(inverter, files[i], names[i], i, rf.image_folder(out, names[i]), head, say, warn)
            res = _read_back(job)
        job.head = head
        fjobs.append(job)
        results.append(res)
    keys = [_key(j.name, j.file) for j in fjobs]
    state_path = out / rf.SHARED_STATE
    resume = load_state(state_path) if state_path.is_file() else None
    if resume is not None and resume.images != keys:
        raise CycleEncodingError(
            f"{state_path}: the shared tuning was started on {len(resume.images)} other image(s) than these "
            f"{len(keys)}: restore them, or delete {state_path.name} to tune from the start"
        )
    say(f"shared tuning: one generator on {len(keys)} image(s), {cfg.tune.steps} rounds of one step each"
        + (f"; going on after round {resume.rounds} ({state_path.name})" if resume is not None else ""))  # fmt: skip
    bar = StepBar(inverter.progress, f"shared ({len(keys)} images)", {"tune": cfg.tune.steps})

    def on_stage(k: int, stage: str, res: InversionResult) -> None:
        bar.close()
        fjobs[k].on_stage(stage, res)

    inverter.tune_stage(results, [r.pivot.to(inverter.device) for r in results], [j.index for j in fjobs],
                        lambda k, rec: bar.step(rec) if k == 0 else None, on_stage, keys=keys, resume=resume,
                        save_every=cfg.tune_save_every, on_save=lambda st: save_state(state_path, st))  # fmt: skip
    shared = _store_shared(inverter, out, results[0], keys)
    done = []
    for job, res in zip(fjobs, results):
        try:
            job.finish(res, shared)
            done.append(job.name)
        except Exception as e:
            fail(e, job.index, job.head, failed)
    state_path.unlink(missing_ok=True)
    return done


def _read_back(job: FolderJob) -> InversionResult:
    """An image's stages before tuning as an earlier process left them: its pivots, metrics, timings and losses."""
    prior = rf.read_json(job.folder / rf.RESULT)
    nf = read_native(job.folder / rf.PIVOTS)
    res = InversionResult(job.name, job.x.cpu(), base_generator=job.inverter.G, refine=prior.get("refine"))
    res.pivots = {s: nf.tensors[s].float()[None] for s in nf.config["stages"] if s in PIVOT_STAGES}
    res.metrics = {s: m for s, m in prior["metrics"].items() if s in PIVOT_STAGES}
    res.timings = {s: t for s, t in prior["timings"].items() if s in PIVOT_STAGES}
    lines = (job.folder / rf.LOSSES).read_text().splitlines() if (job.folder / rf.LOSSES).is_file() else []
    res.losses = [r for r in map(json.loads, lines) if r.get("stage") != "tune"]
    job.prior, job.target_written = prior, True
    return res


def _store_shared(inverter: FolderInverter, out: Path, res: InversionResult, keys: list[str]) -> dict[str, Any] | None:
    """The shared generator stored once as its change from the base (unless ``save_delta`` is off) and
    ``shared.json``; returns what each image's record says of the change (its ``delta``)."""
    cfg, info = inverter.config, dict((res.tune or {}).get("shared") or {})
    doc: dict[str, Any] = {"images": keys, "rounds": info.get("rounds"), "updates": info.get("updates")}
    rec = None
    if cfg.save_delta and res.generator is not None:
        prov = {"made_by": "cycle-encoding invert --tune shared"}
        stored = store_delta(inverter, res.generator, out / rf.DELTA, {"shared": doc}, prov)
        rec = {"file": f"../../{rf.DELTA}", "shared": True, "images": len(keys),
               "file_sha256": file_sha256(out / rf.DELTA), **stored}  # fmt: skip
        doc["delta"] = {**rec, "file": rf.DELTA}
    rf.write_json(out / rf.SHARED, doc)
    return rec
