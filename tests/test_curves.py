"""The plateau rule (``training/plateau.py``) on hand-made sequences and against a direct reading of its definition,
its use by the generator trainer, and ``cycle-encoding curves`` on small ``log.jsonl`` files written here in the
trainers' formats (values, verdicts, stage changes and the figure's size checked against hand computations)."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from cycle_encoding.cli import main
from cycle_encoding.report.curves import curves_figure, curves_report, read_run, verdict_rows
from cycle_encoding.training.generator_trainer import GeneratorTrainer
from cycle_encoding.training.plateau import plateau, plateau_flags, plateau_holds


# -- the rule ----------------------------------------------------------------------------------------------------------
def test_a_plateau_is_found_where_the_last_k_values_miss_the_best_before_them():
    # i=3: best before the window 10, 8 improves; i=4: best 8, 6 improves; i=5: best 6, window 5.9, 5.95, 5.99 all
    # above 6 - 2% of 6 = 5.88: the rule holds first at index 5
    v = [10, 8, 6, 5.9, 5.95, 5.99]
    assert plateau_flags(v, 3, 0.02) == [False] * 5 + [True]
    assert plateau(v, 3, 0.02) == 5
    assert plateau_holds(v, 3, 0.02)
    assert plateau(v[:5], 3, 0.02) is None  # one evaluation earlier: 6 still improved on 8


def test_a_steadily_improving_series_never_plateaus():
    v = [100 * 0.9**i for i in range(40)]  # 10% better at every evaluation, more than the 2% margin
    assert plateau(v, 1, 0.02) is None and plateau(v, 5, 0.02) is None
    assert plateau(v, 1, 0.11) == 1  # a margin above the series' 10% steps: no step counts


def test_patience_and_margin_edges():
    assert plateau([5.0, 5.0, 5.0], 0, 0.02) is None  # patience 0: never
    assert plateau([5.0, 5.0, 5.0], 3, 0.02) is None  # no more values than the patience: cannot tell
    assert plateau([5.0, 5.0, 5.0, 5.0], 3, 0.02) == 3
    # margin 0: a repeat of the best counts as keeping up (the trainer's rule); any worse value does not
    assert plateau([1.0, 1.0, 1.0], 1, 0.0) is None
    assert plateau([1.0, 1.0, 1.5], 1, 0.0) == 2
    # an improvement of exactly the margin counts, a hair less does not
    assert plateau([1.0, 0.75], 1, 0.25) is None
    assert plateau([1.0, 0.7500001], 1, 0.25) == 1
    # higher is better (a class share): 0.031 and 0.0305 miss 0.03 + 5% = 0.0315
    assert plateau([0.01, 0.03, 0.031, 0.0305], 2, 0.05, higher_is_better=True) == 3
    assert plateau([0.01, 0.03, 0.032, 0.0305], 2, 0.05, higher_is_better=True) is None
    # a diverged run (NaN) is no improvement
    assert plateau([1.0, math.nan, math.nan], 2, 0.02) == 2
    # the rule can hold and then fail again when a later value beats the best before its window by the margin
    v = [1.0, 0.95, 0.85]
    assert plateau_flags(v, 1, 0.1) == [False, True, False]
    assert plateau(v, 1, 0.1) == 1 and not plateau_holds(v, 1, 0.1)
    for bad in ((-1, 0.02), (1.5, 0.02), (True, 0.02), (2, -0.1), (2, math.inf)):
        with pytest.raises(ValueError):
            plateau([1.0, 2.0, 3.0], *bad)


def test_the_rule_equals_its_definition_and_the_trainers_former_formula_on_random_curves():
    rng = random.Random(0)
    for _ in range(300):
        n, k, m = rng.randint(0, 12), rng.randint(1, 4), rng.choice([0.0, 0.01, 0.05, 0.2])
        v = [rng.choice([rng.uniform(0.5, 2.0), 1.0]) for _ in range(n)]
        want = []
        for i in range(n):
            if i < k:
                want.append(False)
                continue
            best = min(v[: i - k + 1])
            # the trainer's formula before the rule moved to training/plateau.py (positive finite values)
            want.append(all(f > best * (1 - m) for f in v[i - k + 1 : i + 1]))
        assert plateau_flags(v, k, m) == want
        up = [-x for x in v]  # higher is better is lower is better mirrored
        assert plateau_flags(up, k, m, higher_is_better=True) == want


def test_the_generator_trainer_stops_by_this_rule():
    def reached(fds, k, m):
        fake = SimpleNamespace(cfg=SimpleNamespace(metric_patience=k, metric_min_improvement=m),
                               metric_history=[{"step": i, "fd": f} for i, f in enumerate(fds)])  # fmt: skip
        return GeneratorTrainer.plateau_reached(fake)

    assert reached([10, 8, 6, 5.9, 5.95, 5.99], 3, 0.02)
    assert not reached([10, 8, 6, 5.9, 5.95], 3, 0.02)
    assert not reached([5.0, 5.0, 5.0, 5.0], 0, 0.02)


# -- logs in the trainers' formats -------------------------------------------------------------------------------------
def _write(path: Path, recs: list[dict], tail: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + tail, encoding="utf-8")
    return path


def _metric(step: int, fd: float, share: float) -> dict:
    counts = {"T-shirt/top": 1000, "Trouser": int(share * 10000)}
    return {"kind": "metric", "step": step, "kimg": step * 32 / 1000, "time": 1.0e9 + step, "fd": fd,
            "fd_name": "classifier Frechet distance (not the Inception FID)", "reference": "fashion-mnist:test",
            "reference_images": 10000, "samples": 10000, "min_class_share": share, "class_counts": counts,
            "seconds": 3.0}  # fmt: skip


def _train_g(step: int) -> dict:
    return {"kind": "train", "step": step, "kimg": step * 32 / 1000, "time": 1.0e9 + step, "sec_per_step": 0.5,
            "d_loss": 1.2, "d_real": 0.6, "d_fake": 0.6, "real_score": 0.1, "fake_score": -0.1, "g_loss": 0.9}  # fmt: skip


FDS = [20.0, 12.0, 9.0, 8.9, 8.95, 8.85]  # steps 1000..6000
SHARES = [0.0, 0.02, 0.04, 0.05, 0.06, 0.061]


def generator_log(root: Path) -> Path:
    """A generator run resumed from its step-3000 checkpoint after writing a metric at step 4000: the second
    step-4000 record is the one that counts; its last line is cut short (being written)."""
    recs: list[dict] = [{"kind": "start", "step": 0, "time": 1.0e9, "world_size": 1, "train_images": 60000}]
    for i in range(4):
        recs += [_train_g(1000 * (i + 1)), _metric(1000 * (i + 1), FDS[i] if i < 3 else 99.0, SHARES[i])]
    for i in range(3, 6):
        recs += [_train_g(1000 * (i + 1)), _metric(1000 * (i + 1), FDS[i], SHARES[i])]
    recs.append({"kind": "stop", "step": 6000, "time": 1.0e9 + 6001, "reason": "the FD has not improved"})
    return _write(root / "00000-fmnist" / "log.jsonl", recs, tail='{"kind": "train", "step": 61')


def test_generator_curves_table_json_and_figure(tmp_path, capsys):
    log = generator_log(tmp_path)
    run = read_run(log.parent)
    assert [s for s, _, _ in run.series["fd"]] == [1000, 2000, 3000, 4000, 5000, 6000]
    assert [v for _, v, _ in run.series["fd"]] == FDS
    out = tmp_path / "fig" / "g.png"
    assert main(["curves", str(log.parent), "--out", str(out), "--json", "--patience", "3", "--dpi", "40"]) == 0
    rep = json.loads(capsys.readouterr().out)
    fd, share = rep["rows"]
    # FD: at 6000 the last three (8.9, 8.95, 8.85) miss the best before them (9.0) by less than 2% (8.82)
    assert fd["measure"] == "fd" and fd["plateau"] and fd["plateau_step"] == 6000 and fd["first_plateau_step"] == 6000
    assert (fd["best"], fd["best_step"], fd["best_kimg"], fd["last"]) == (8.85, 6000, 192.0, 8.85)
    assert fd["verdict"] == "plateau at step 6000" and fd["evaluations"] == 6
    # the smallest class share still grows by more than 2% of its best within every window of three
    assert share["measure"] == "min_class_share" and share["higher_is_better"]
    assert not share["plateau"] and share["verdict"] == "still improving"
    assert (share["best"], share["best_step"]) == (0.061, 6000)
    # two panels side by side, 4.8 x 3.4 inches each at 40 dpi
    assert Image.open(out).size == (round(2 * 4.8 * 40), round(3.4 * 40))
    assert main(["curves", str(log.parent), "--patience", "4"]) == 0
    table = capsys.readouterr().out
    assert "still improving" in table and "plateau at" not in table  # four in a row: 6 improved on 12
    row = next(line for line in table.splitlines() if " fd " in line)
    assert "8.85" in row and "6000" in row
    assert "00000-fmnist: stopped early at step 6000: the FD has not improved" in table
    assert "resumed" not in table and rep["runs"][0]["resumes"] == []
    # resumed past the stop with the rule off: the summary says so (a resume that changed nothing is not listed);
    # the resumed run's log drops the half record the killed one left, so the file stays readable
    from cycle_encoding.training.runs import RunLog

    resumed = RunLog(log.parent, enabled=True, tensorboard=False)
    resumed.write({"kind": "resume", "step": 6000, "time": 2.0e9, "changed": {"max_steps": [6000, 9000]}})
    resumed.write({"kind": "resume", "step": 7000, "time": 2.1e9, "changed": {}})
    assert log.read_text().count('"step": 61') == 0 and log.read_text().endswith("}\n")
    assert main(["curves", str(log.parent), "--patience", "4"]) == 0
    assert "00000-fmnist: resumed at step 6000 with max_steps 6000 -> 9000\n" in capsys.readouterr().out


STAGE_OF = {0: 0, 100: 1, 160: 2, 400: 0}  # the schedule below for 3 style inputs (2 offsets)
SCHEDULE = {"name": "test", "total_steps": 600, "phases": [
    {"name": "W", "start": 0, "end": 100, "stage": 0, "delta": 0.0002, "adversarial": 0.1},
    {"name": "W -> W+", "start": 100, "end": 160, "stage": {"from": 1, "to": "max"}, "delta": 0.0002, "adversarial": 0.1},
    {"name": "W+", "start": 160, "end": 400, "stage": "max", "delta": 0.0002, "adversarial": 0.1},
    {"name": "W", "start": 400, "end": 600, "stage": 0, "delta": 0.0002, "adversarial": 0.1},
]}  # fmt: skip
VAL = {50: 1.0, 100: 0.8, 150: 0.9, 200: 0.7, 250: 0.6, 300: 0.59, 350: 0.595, 400: 0.591, 450: 0.9, 500: 0.8,
       550: 0.7, 600: 0.65}  # fmt: skip


def stage_after(steps_done: int) -> int:
    """The stage of the encoder after ``steps_done`` steps: that of the last step trained (0-based steps_done - 1)."""
    return STAGE_OF[max(start for start in STAGE_OF if start <= steps_done - 1)]


def encoder_log(root: Path, name: str, scale: float = 1.0, schedule: bool = True) -> Path:
    run = root / name
    recs: list[dict] = [{"kind": "start", "step": 0, "time": 1.0e9, "train_images": 100, "val_images": 16}]
    for s in range(50, 601, 50):
        st = stage_after(s)
        recs.append({"kind": "train", "step": s, "time": 1.0e9 + s, "sec_per_step": 0.1, "l2": 0.2, "loss": 1.0,
                     "stage": st, "delta_weight": 0.0002, "adversarial_weight": 0.1})  # fmt: skip
        v = VAL[s] * scale
        recs.append({"kind": "val", "step": s, "time": 1.0e9 + s, "stage": st, "l2": v / 5, "perceptual": v / 2,
                     "identity": v / 10, "weighted": v})  # fmt: skip
    recs.append({"kind": "end", "step": 600, "time": 1.0e9 + 700, "trained_stage": 0, "ranks_in_sync": True})
    if schedule:
        (run / "schedule.json").parent.mkdir(parents=True, exist_ok=True)
        (run / "schedule.json").write_text(json.dumps(SCHEDULE), encoding="utf-8")
        config = {"total_steps": 600, "_resolved": {"encoder": {"num_ws": 3, "max_stage": 2}}}
        (run / "config.json").write_text(json.dumps(config), encoding="utf-8")
    return _write(run / "log.jsonl", recs)


def test_encoder_curves_per_phase_verdicts_and_stage_changes(tmp_path, capsys):
    a = encoder_log(tmp_path, "00000-cycle").parent
    b = encoder_log(tmp_path, "00001-plain", scale=1.1, schedule=False).parent
    rep = curves_report([a, b], tmp_path / "e.png", labels=["Cycle", "other"], patience=2, min_improvement=0.05, dpi=30)
    runs = {r["label"]: r for r in rep["runs"]}
    # from the schedule: the first step trained at the new stage; from the train records: the last logged step before
    assert runs["Cycle"]["stage_changes"] == [[100, 1], [160, 2], [400, 0]]
    assert runs["Cycle"]["stage_changes_from"] == "schedule.json"
    assert runs["other"]["stage_changes"] == [[100, 1], [150, 2], [400, 0]]
    assert runs["other"]["stage_changes_from"] == "train records"
    cyc = [r for r in rep["rows"] if r["run"] == "Cycle" and r["measure"] == "weighted"]
    assert [(r["stage"], r["first_step"], r["last_step"], r["evaluations"]) for r in cyc] == [
        (0, 50, 100, 2), (1, 150, 150, 1), (2, 200, 400, 5), (0, 450, 600, 4)]  # fmt: skip
    # stage 0 (two values) and the ramp's single value: too few for patience 2
    assert cyc[0]["verdict"].startswith("too few") and cyc[1]["verdict"].startswith("too few")
    # W+: at 350 the window 0.59, 0.595 misses 0.6 - 5% = 0.57 -> plateau from step 350; best 0.59 at 300
    assert cyc[2]["plateau"] and cyc[2]["plateau_step"] == 350 and cyc[2]["verdict"] == "plateau at step 350"
    assert (cyc[2]["best"], cyc[2]["best_step"], cyc[2]["last"]) == (0.59, 300, 0.591)
    # the final W phase: 0.8, 0.7 then 0.7, 0.65 each beat the best before them by more than 5%
    assert cyc[3]["verdict"] == "still improving" and (cyc[3]["best"], cyc[3]["best_step"]) == (0.65, 600)
    other = [r for r in rep["rows"] if r["run"] == "other" and r["measure"] == "l2"]
    assert other[2]["best"] == pytest.approx(0.59 * 1.1 / 5) and other[2]["plateau_step"] == 350
    assert [r["measure"] for r in rep["rows"][:3]] == ["weighted", "l2", "perceptual"]  # the default measures
    assert Image.open(tmp_path / "e.png").size == (round(3 * 4.8 * 30), round(3.4 * 30))

    # four measures: two rows of panels (at most three a row)
    rep4 = curves_report([a], tmp_path / "e4.png", measures=["weighted", "l2", "perceptual", "identity"], dpi=30)
    assert Image.open(tmp_path / "e4.png").size == (round(3 * 4.8 * 30), round(2 * 3.4 * 30))
    assert {r["measure"] for r in rep4["rows"]} == {"weighted", "l2", "perceptual", "identity"}

    # the figure: a panel per measure; per panel, a dashed line at each stage change of each run, a segment per
    # phase (so no line joins two stages), a ring at each plateau
    runs_read = [read_run(a, "Cycle"), read_run(b, "other")]
    rows = [row for r in runs_read for row in verdict_rows(r, ["weighted", "l2"], 2, 0.05)]
    fig = curves_figure(runs_read, ["weighted", "l2"], rows, 2, 0.05, dpi=30)
    assert len(fig.axes) == 2
    ax = fig.axes[0]
    vlines = sorted(float(ln.get_xdata()[0]) for ln in ax.lines if ln.get_linestyle() == "--")
    assert vlines == [100, 100, 150, 160, 400, 400]
    rings = [ln for ln in ax.lines if ln.get_markerfacecolor() == "none"]
    assert sorted(float(ln.get_xdata()[0]) for ln in rings) == [350, 350]
    segments = [ln for ln in ax.lines if ln.get_linestyle() == "-"]
    assert len(segments) == 2 * 4  # four phases per run
    assert all(len({stage_after(int(x)) for x in ln.get_xdata()}) == 1 for ln in segments)

    assert main(["curves", str(a), "--patience", "2", "--min-improvement", "0.05"]) == 0
    table = capsys.readouterr().out
    assert "2: stage 2, steps 200-400" in table and "plateau at step 350" in table
    assert "stage changes at steps 100 (stage 1), 160 (stage 2), 400 (stage 0) (from schedule.json)" in table


def test_curves_errors_are_one_line(tmp_path, capsys):
    g = generator_log(tmp_path).parent
    e = encoder_log(tmp_path, "enc").parent
    empty = _write(tmp_path / "empty" / "log.jsonl", [{"kind": "start", "step": 0}, _train_g(50)]).parent
    cases = [
        ([str(g), str(e)], "both generator and encoder"),
        ([str(e), "--measures", "fd"], "not one of a encoder run's"),
        ([str(empty)], "nothing to draw"),
        ([str(tmp_path / "nowhere")], "no log.jsonl"),
        ([str(g), "--patience", "0"], "patience must be"),
        ([str(g), "--out", str(tmp_path / "x.jpg")], "give a .png"),
        ([str(g), str(g)], "two runs labelled"),
        ([str(g), "--labels", "a,b"], "2 labels for 1 runs"),
    ]
    for argv, msg in cases:
        assert main(["curves", *argv]) == 2
        err = capsys.readouterr().err
        assert msg in err and len(err.strip().splitlines()) == 1
    bad = tmp_path / "bad" / "log.jsonl"
    _write(bad, [{"kind": "start", "step": 0}], tail="not json\n" + json.dumps(_metric(1, 2.0, 0.1)) + "\n")
    assert main(["curves", str(bad)]) == 2
    assert "line 2 is not JSON" in capsys.readouterr().err
