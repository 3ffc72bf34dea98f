"""Training curves from runs' ``log.jsonl`` and a plateau verdict per curve (``cycle-encoding curves``).
Design notes: docs/INTERNALS.md, "cycle_encoding.report.curves"."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CycleEncodingError
from ..training.plateau import plateau_flags
from ..training.schedule import ScheduleError, load_schedule
from ..utils import text_table
from .plots import figure_png, log_scale_if_wide, panel_figure

# measure -> (panel title, higher is better)
CURVE_MEASURES: dict[str, dict[str, tuple[str, bool]]] = {
    "generator": {
        "fd": ("classifier Frechet distance to the reference", False),
        "min_class_share": ("smallest class share of the samples", True),
    },
    "encoder": {
        "weighted": ("validation loss (weighted sum)", False),
        "l2": ("validation L2", False),
        "perceptual": ("validation perceptual", False),
        "identity": ("validation identity", False),
    },
}
DEFAULT_MEASURES = {"generator": ("fd", "min_class_share"), "encoder": ("weighted", "l2", "perceptual")}
RECORD_KIND = {"generator": "metric", "encoder": "val"}
PANEL_INCHES = (4.8, 3.4)  # width, height of one panel


@dataclass
class RunCurves:
    """One run's evaluations: per measure ``[(step, value, stage or None), ...]`` in step order."""

    label: str
    log: Path
    kind: str  # "generator" or "encoder"
    series: dict[str, list[tuple[int, float, int | None]]]
    kimg: dict[int, float] = field(default_factory=dict)  # generator runs: step -> kimg
    stage_changes: list[tuple[int, int]] = field(default_factory=list)  # (x, new stage), after the first stage
    stage_changes_from: str = ""  # "schedule.json" or "train records"
    stop: dict[str, Any] | None = None  # the run's ``stop`` record (an early stop by the trainer's rule), if any
    resumes: list[dict[str, Any]] = field(default_factory=list)  # resumes that changed settings: step, changed


def _read_records(log: Path) -> list[dict[str, Any]]:
    try:
        lines = log.read_text(encoding="utf-8").splitlines()
    except OSError as e:
        raise CycleEncodingError(f"{log}: cannot read: {e.strerror or e}") from None
    recs: list[dict[str, Any]] = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines) - 1:  # being written now
                continue
            raise CycleEncodingError(f"{log}: line {i + 1} is not JSON (not a training run's log.jsonl?)") from None
        if not isinstance(rec, dict) or "kind" not in rec:
            raise CycleEncodingError(f"{log}: line {i + 1} has no 'kind' (not a training run's log.jsonl?)")
        recs.append(rec)
    return recs


def setting_resumes(recs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A run log's resumes that changed settings (trained on past a plateau stop, say), in order."""
    return [r for r in recs if r.get("kind") == "resume" and r.get("changed")]


def _resumed(recs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    """The records of ``kind`` as the run's final history: a step written again replaces the records from it on."""
    out: list[dict[str, Any]] = []
    for r in recs:
        if r.get("kind") != kind or not isinstance(r.get("step"), int):
            continue
        while out and out[-1]["step"] >= r["step"]:
            out.pop()
        out.append(r)
    return out


def _schedule_changes(run_dir: Path, last_step: int) -> list[tuple[int, int]] | None:
    sched_path, cfg_path = run_dir / "schedule.json", run_dir / "config.json"
    if not (sched_path.is_file() and cfg_path.is_file()):
        return None
    try:
        enc = json.loads(cfg_path.read_text(encoding="utf-8"))["_resolved"]["encoder"]
        num_ws, max_stage = int(enc["num_ws"]), int(enc.get("max_stage", enc["num_ws"] - 1))
        sched = load_schedule(sched_path)
    except (OSError, ValueError, KeyError, TypeError, ScheduleError):
        return None
    out: list[tuple[int, int]] = []
    for step, stage in sched.stage_changes(num_ws):
        stage = min(stage, max_stage)  # the trainer's clamp (a W-only encoder stays at stage 0)
        if (not out or out[-1][1] != stage) and step <= last_step:
            out.append((step, stage))
    return out[1:]


def _record_changes(recs: list[dict[str, Any]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    prev: tuple[int, int] | None = None  # (step, stage) of the record before
    rows = sorted(((r["step"], r["stage"]) for r in recs if isinstance(r.get("stage"), int)), key=lambda t: t[0])
    for step, stage in rows:
        if prev is not None and stage != prev[1]:
            out.append((prev[0], stage))  # the change lies in (prev step, step]: drawn at the last step known before
        prev = (step, stage)
    return out


def read_run(path: str | Path, label: str | None = None) -> RunCurves:
    """A run's curves from its folder or its ``log.jsonl``."""
    p = Path(path)
    log = p / "log.jsonl" if p.is_dir() else p
    if not log.is_file():
        raise CycleEncodingError(f"{p}: no log.jsonl (give a training run folder or its log.jsonl)")
    recs = _read_records(log)
    logged = {r["kind"] for r in recs}
    kinds = [kind for kind, record in RECORD_KIND.items() if record in logged]
    if len(kinds) > 1:
        raise CycleEncodingError(f"{log}: has both 'metric' and 'val' records; cannot tell the kind of run")
    if not kinds:
        raise CycleEncodingError(
            f"{log}: no 'metric' records (train-generator --metric-every) and no 'val' records (train-encoder): "
            "nothing to draw"
        )
    kind = kinds[0]
    evals = _resumed(recs, RECORD_KIND[kind])
    series: dict[str, list[tuple[int, float, int | None]]] = {}
    for r in evals:
        stage = r.get("stage") if kind == "encoder" else None
        for m in CURVE_MEASURES[kind]:
            v = r.get(m)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                series.setdefault(m, []).append((int(r["step"]), float(v), stage))
    run = RunCurves(label or (log.parent.name if log.name == "log.jsonl" else log.stem), log, kind, series)
    stops = _resumed(recs, "stop")
    run.stop = {"step": stops[-1]["step"], "reason": stops[-1].get("reason")} if stops else None
    run.resumes = [{"step": r["step"], "changed": r["changed"]} for r in setting_resumes(recs)]
    if kind == "generator":
        run.kimg = {int(r["step"]): float(r["kimg"]) for r in evals if isinstance(r.get("kimg"), (int, float))}
    else:
        trains = _resumed(recs, "train")
        last = max([r["step"] for r in evals] + [r["step"] for r in trains])
        changes = _schedule_changes(log.parent, last)
        if changes is not None:
            run.stage_changes, run.stage_changes_from = changes, "schedule.json"
        else:
            run.stage_changes, run.stage_changes_from = _record_changes(trains + evals), "train records"
    return run


def phases(points: list[tuple[int, float, int | None]]) -> list[tuple[int, int]]:
    """``[(a, b), ...]``: index ranges ``points[a:b]`` of consecutive evaluations at the same stage."""
    out: list[tuple[int, int]] = []
    start = 0
    for i in range(1, len(points) + 1):
        if i == len(points) or points[i][2] != points[start][2]:
            out.append((start, i))
            start = i
    return out


def verdict_rows(run: RunCurves, measures: list[str], patience: int, min_improvement: float) -> list[dict[str, Any]]:
    """Per phase and measure: the number of evaluations, the best value and its step, the last value, the rule's
    verdict ("plateau at step S": S is the first evaluation of the final stretch where the rule holds)."""
    rows: list[dict[str, Any]] = []
    for m in measures:
        points = run.series.get(m, [])
        higher = CURVE_MEASURES[run.kind][m][1]
        for ph, (a, b) in enumerate(phases(points)):
            pts = points[a:b]
            steps = [s for s, _, _ in pts]
            vals = [v for _, v, _ in pts]
            finite = [i for i, v in enumerate(vals) if math.isfinite(v)]
            ib = (max if higher else min)(finite, key=lambda i: vals[i]) if finite else None
            flags = plateau_flags(vals, patience, min_improvement, higher)
            first = next((i for i, f in enumerate(flags) if f), None)
            held = bool(flags) and flags[-1]
            streak = len(flags) - 1
            while held and streak > 0 and flags[streak - 1]:
                streak -= 1
            if len(vals) <= patience:
                verdict = f"too few evaluations ({len(vals)}, the rule needs {patience + 1})"
            elif held:
                verdict = f"plateau at step {steps[streak]}"
            elif first is not None:
                verdict = f"still improving (had levelled at step {steps[first]})"
            else:
                verdict = "still improving"
            rows.append({
                "run": run.label, "kind": run.kind, "measure": m, "higher_is_better": higher,
                "phase": ph if run.kind == "encoder" else None, "stage": pts[0][2],
                "first_step": steps[0], "last_step": steps[-1], "evaluations": len(vals),
                "best": vals[ib] if ib is not None else None, "best_step": steps[ib] if ib is not None else None,
                "best_kimg": run.kimg.get(steps[ib]) if ib is not None and run.kimg else None,
                "last": vals[-1], "plateau": held, "plateau_step": steps[streak] if held else None,
                "first_plateau_step": steps[first] if first is not None else None, "verdict": verdict,
            })  # fmt: skip
    order = {m: i for i, m in enumerate(measures)}
    return sorted(rows, key=lambda r: (r["phase"] or 0, order[r["measure"]]))  # by phase, then measure


def format_table(rows: list[dict[str, Any]]) -> str:
    """The verdict rows as an aligned text table."""
    head = ["run", "phase", "measure", "evals", "best", "at step", "last", "verdict"]
    body = []
    for r in rows:
        phase = "all"
        if r["phase"] is not None:
            phase = f"{r['phase']}: stage {r['stage']}, steps {r['first_step']}-{r['last_step']}"
        best, last = ("-" if v is None else f"{v:.4g}" for v in (r["best"], r["last"]))
        body.append([r["run"], phase, r["measure"], str(r["evaluations"]), best,
                     "-" if r["best_step"] is None else str(r["best_step"]), last, r["verdict"]])  # fmt: skip
    return "\n".join(text_table(head, body, rule=True))


def curves_figure(runs: list[RunCurves], measures: list[str], rows: list[dict[str, Any]], patience: int,
                  min_improvement: float, dpi: int = 100) -> Any:  # fmt: skip
    """A matplotlib Figure: one panel per measure, the runs overlaid; each encoder run's stage changes as dashed
    vertical lines of its colour; a ring where a phase's curve reached its plateau."""
    from matplotlib.lines import Line2D  # lazy: matplotlib, optional and slow to import

    fig, axes = panel_figure(len(measures), PANEL_INCHES, dpi)
    colors = [f"C{i % 10}" for i in range(len(runs))]
    kind = runs[0].kind
    for ax, m in zip(axes, measures):
        allv: list[float] = []
        for run, c in zip(runs, colors):
            pts = run.series.get(m, [])
            if not pts:
                continue
            allv += [v for _, v, _ in pts]
            for j, (a, b) in enumerate(phases(pts)):  # one segment per phase: the rule does not look across
                seg = pts[a:b]
                ax.plot([t[0] for t in seg], [t[1] for t in seg], color=c, lw=1.4, marker="o", ms=3,
                        label=run.label if j == 0 else None)  # fmt: skip
            for x, _stage in run.stage_changes:
                ax.axvline(x, color=c, ls="--", lw=0.8, alpha=0.6)
            at = {s: v for s, v, _ in pts}
            for r in rows:
                if r["run"] == run.label and r["measure"] == m and r["plateau"]:
                    ax.plot([r["plateau_step"]], [at[r["plateau_step"]]], ls="none", marker="o", ms=10, mfc="none",
                            mec=c, mew=1.5)  # fmt: skip
        log_scale_if_wide(ax, allv)
        title, higher = CURVE_MEASURES[kind][m]
        ax.set_title(f"{title} ({'higher' if higher else 'lower'} is better)", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    handles = [Line2D([], [], color=c, lw=1.4, marker="o", ms=3, label=run.label) for run, c in zip(runs, colors)]
    handles.append(Line2D([], [], ls="none", marker="o", ms=8, mfc="none", mec="black", label="plateau reached"))
    if kind == "encoder":
        handles.append(Line2D([], [], color="black", ls="--", lw=0.8, label="stage change"))
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=8)
    evals = f"{patience} evaluation{'s' if patience != 1 else ''}"
    within = " (within each constant-stage phase)" if kind == "encoder" else ""
    fig.suptitle(f"plateau rule: {evals} in a row without a {100 * min_improvement:g}% improvement on the best{within}",
                 fontsize=10)  # fmt: skip
    return fig


def _run_summary(run: RunCurves) -> dict[str, Any]:
    return {
        "label": run.label,
        "log": str(run.log),
        "kind": run.kind,
        "evaluations": {m: len(v) for m, v in run.series.items()},
        "stage_changes": [list(c) for c in run.stage_changes],
        "stage_changes_from": run.stage_changes_from or None,
        "stop": run.stop,
        "resumes": run.resumes,
    }


def curves_report(paths: list[str | Path], out: str | Path | None = None, labels: list[str] | None = None,
                  measures: list[str] | None = None, patience: int = 3, min_improvement: float = 0.02,
                  dpi: int = 100) -> dict[str, Any]:  # fmt: skip
    """Read the runs, judge every curve, draw the figure to ``out`` (PNG) when given; returns a JSON-able dict:
    the options, the runs (with their stage changes) and the verdict rows."""
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise CycleEncodingError(f"patience must be an integer >= 1, got {patience!r}")
    if not (math.isfinite(min_improvement) and min_improvement >= 0):
        raise CycleEncodingError(f"min_improvement must be a finite number >= 0, got {min_improvement!r}")
    if dpi < 10:
        raise CycleEncodingError(f"dpi must be >= 10, got {dpi}")
    if not paths:
        raise CycleEncodingError("give at least one run")
    if out is not None and Path(out).suffix.lower() != ".png":
        raise CycleEncodingError(f"{out}: the figure is written as PNG: give a .png file name")
    if labels is not None and len(labels) != len(paths):
        raise CycleEncodingError(f"{len(labels)} labels for {len(paths)} runs")
    runs = [read_run(p, None if labels is None else labels[i]) for i, p in enumerate(paths)]
    if len({r.kind for r in runs}) > 1:
        raise CycleEncodingError("both generator and encoder runs given: draw them in separate figures")
    kind = runs[0].kind
    names = [r.label for r in runs]
    twice = next((n for n in names if names.count(n) > 1), None)
    if twice is not None:
        raise CycleEncodingError(f"two runs labelled {twice!r}: give --labels")
    chosen = list(measures or DEFAULT_MEASURES[kind])
    for m in chosen:
        if m not in CURVE_MEASURES[kind]:
            raise CycleEncodingError(f"measure {m!r} is not one of a {kind} run's: {', '.join(CURVE_MEASURES[kind])}")
        if not any(r.series.get(m) for r in runs):
            raise CycleEncodingError(f"no run logged {m!r}")
    rows = [row for r in runs for row in verdict_rows(r, chosen, patience, min_improvement)]
    if out is not None:
        png = figure_png(curves_figure(runs, chosen, rows, patience, min_improvement, dpi))
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_bytes(png)
    return {
        "patience": patience,
        "min_improvement": min_improvement,
        "kind": kind,
        "measures": chosen,
        "figure": None if out is None else str(out),
        "runs": [_run_summary(r) for r in runs],
        "rows": rows,
    }
