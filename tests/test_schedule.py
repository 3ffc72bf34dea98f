"""The cycle schedule: presets against METHOD.md's table, rescaling, fewer layers, files, the CLI."""

from __future__ import annotations

import itertools
import json
import math

import pytest

from cycle_encoding.cli import main
from cycle_encoding.training.schedule import (
    Schedule,
    ScheduleError,
    load_schedule,
    preset_schedule,
    save_schedule,
)

PAPER = preset_schedule("paper")


def test_paper_w_to_w_plus_boundaries():
    at = PAPER.at
    assert PAPER.total_steps == 750_000
    assert at(0).stage == 0
    assert at(19_999).stage == 0
    assert at(20_000).stage == 1
    for i in range(1, 18):  # delta i becomes active at 20k + 2k * (i - 1)
        s = 20_000 + 2_000 * (i - 1)
        assert at(s).stage == i, s
        assert at(s - 1).stage == i - 1, s - 1
    assert at(21_999).stage == 1 and at(22_000).stage == 2
    assert at(51_999).stage == 16
    assert at(52_000).stage == 17
    assert at(499_999).stage == 17 and at(500_000).stage == 17
    assert at(52_000).num_offsets == 17


def test_paper_delta_weight():
    at = PAPER.at
    for s in (0, 20_000, 52_000, 499_999, 500_000, 500_004):
        assert at(s).delta_weight == pytest.approx(2e-4, rel=1e-12)
    for k in range(15):
        s = 500_005 + 10_000 * k
        assert at(s).delta_weight == pytest.approx(2e-4 * 1.2 ** (k + 1), rel=1e-12), s
        assert at(s - 1).delta_weight == pytest.approx(2e-4 * 1.2**k, rel=1e-12), s - 1
    top = 2e-4 * 1.2**15
    assert top == pytest.approx(3.08e-3, rel=1e-3)
    assert at(640_004).delta_weight == pytest.approx(2e-4 * 1.2**14, rel=1e-12)
    for s in (640_005, 645_000, 650_000, 650_005, 660_005, 700_000, 714_000, 749_999):
        assert at(s).delta_weight == pytest.approx(top, rel=1e-12), s


def test_paper_w_plus_to_w_boundaries():
    at = PAPER.at
    assert at(649_999).stage == 17
    assert at(650_000).stage == 16
    for j in range(17):  # one delta removed every 4k from the finest down
        assert at(650_000 + 4_000 * j).stage == 16 - j
        if j:
            assert at(650_000 + 4_000 * j - 1).stage == 17 - j
    assert at(713_999).stage == 1
    assert at(714_000).stage == 0
    assert at(749_999).stage == 0


def test_paper_adversarial_weight_halves_through_the_second_phase():
    at = PAPER.at
    for s in (0, 300_000, 499_999, 500_000, 500_004):
        assert at(s).adversarial_weight == 0.1
    events = [s for s in range(500_000, 750_000) if s % 10_000 == 5]
    assert len(events) == 25
    for n, s in enumerate(events, start=1):
        assert at(s).adversarial_weight == pytest.approx(at(s - 1).adversarial_weight / 2, rel=1e-12), s
        assert at(s).adversarial_weight == pytest.approx(0.1 * 0.5**n, rel=1e-12), s
        nxt = min(s + 9_999, 749_999)
        assert at(nxt).adversarial_weight == at(s).adversarial_weight  # constant between the events
    # the whole second phase, step by step, against the formula
    for s in range(500_000, 750_000, 7):
        n = 0 if s < 500_005 else (s - 500_005) // 10_000 + 1
        assert at(s).adversarial_weight == pytest.approx(0.1 * 0.5**n, rel=1e-12), s


def test_paper_stage_changes_list():
    ch = PAPER.stage_changes(18)
    expect = [(0, 0)] + [(20_000 + 2_000 * (i - 1), i) for i in range(1, 18)]
    expect += [(650_000 + 4_000 * j, 16 - j) for j in range(17)]
    assert ch == expect


@pytest.mark.parametrize("num_ws", [2, 4, 8, 14, 18])
def test_fewer_layers_keep_the_ramp_steps(num_ws):
    k = num_ws - 1
    s = PAPER
    assert s.at(19_999, num_ws).stage == 0
    assert s.at(20_000, num_ws).stage == 1
    assert s.at(52_000, num_ws).stage == k
    assert s.at(650_000, num_ws).stage == k - 1
    assert s.at(714_000, num_ws).stage == 0
    ch = dict((stage, step) for step, stage in s.stage_changes(num_ws)[: k + 1])
    # up ramp: stage i from 20000 + ceil((i - 1) * 32000 / (k - 1)), the layers spread evenly over 20k..52k
    for i in range(1, k + 1):
        expect = 20_000 + (math.ceil((i - 1) * 32_000 / (k - 1)) if k > 1 else 0)
        if i == k:
            expect = 52_000 if k > 1 else 20_000
        assert ch[i] == expect, (num_ws, i)
        assert s.at(expect, num_ws).stage == i
        if expect > 20_000:
            assert s.at(expect - 1, num_ws).stage == i - 1
    # down ramp: k - 1 .. 1 spread over 650k..714k, each stage held (714000 - 650000) / (k - 1) steps (+-1)
    if k > 1:
        down = [(st, step) for step, st in s.stage_changes(num_ws) if step >= 650_000]
        assert [st for st, _ in down] == list(range(k - 1, -1, -1))
        lengths = [b[1] - a[1] for a, b in itertools.pairwise(down)]
        assert all(abs(n - 64_000 / (k - 1)) <= 1 for n in lengths), lengths


def test_e4e_and_w_presets():
    e = preset_schedule("e4e")
    assert e.total_steps == 500_000
    for i in range(1, 18):
        assert e.at(20_000 + 2_000 * (i - 1)).stage == i
        assert e.at(20_000 + 2_000 * (i - 1) - 1).stage == i - 1
    for s in (0, 20_000, 52_000, 300_000, 499_999):
        st = e.at(s)
        assert (st.delta_weight, st.adversarial_weight) == (2e-4, 0.1)
    assert e.at(499_999).stage == 17
    w = preset_schedule("w")
    assert {w.at(s).stage for s in range(0, w.total_steps, 997)} == {0}
    with pytest.raises(ScheduleError, match="unknown schedule preset"):
        preset_schedule("nope")


@pytest.mark.parametrize("total", [75_000, 100_000, 7_500, 1_234_567])
def test_rescaled_paper_keeps_the_proportions(total):
    r = total / PAPER.total_steps
    s = preset_schedule("paper", total_steps=total)
    assert s.total_steps == total
    # every stage change moves to the scaled step (phase bounds rounded to whole steps, a ramp's steps rounded up
    # inside them: within 2 steps), same stages in the same order
    orig, new = PAPER.stage_changes(18), s.stage_changes(18)
    assert [st for _, st in orig] == [st for _, st in new]
    for (a, _), (b, _) in zip(orig, new):
        assert abs(b - a * r) < 2.0, (a, b)
    # every x1.2 / halving event lands on the first whole step at or after its scaled time
    for k in range(25):
        t = math.ceil((500_005 + 10_000 * k) * r)
        before, after = s.at(t - 1), s.at(t)
        assert after.adversarial_weight == pytest.approx(before.adversarial_weight / 2, rel=1e-12), t
        assert after.adversarial_weight == pytest.approx(0.1 * 0.5 ** (k + 1), rel=1e-12)
        assert after.delta_weight == pytest.approx(2e-4 * 1.2 ** min(k + 1, 15), rel=1e-12)
    last = s.at(total - 1)
    assert last.stage == 0
    assert last.adversarial_weight == pytest.approx(0.1 * 0.5**25, rel=1e-12)
    assert last.delta_weight == pytest.approx(2e-4 * 1.2**15, rel=1e-12)


def test_rescaled_e4e_and_tiny_totals():
    e = preset_schedule("e4e", total_steps=5_000)
    assert e.at(199).stage == 0 and e.at(200).stage == 1 and e.at(520).stage == 17
    assert e.at(219).stage == 1 and e.at(220).stage == 2
    tiny = preset_schedule("paper", total_steps=10)  # empty phases are dropped, the rest stays contiguous
    assert tiny.total_steps == 10
    assert tiny.phases[0].start == 0
    assert all(a.end == b.start for a, b in zip(tiny.phases, tiny.phases[1:]))
    # 20000 -> 0.27 and 714000 -> 9.52 round to 0 and 10: the first W phase and the last W phase vanish
    assert [p.name for p in tiny.phases] == ["W -> W+", "W+", "W+, weights ramp", "W+ -> W"]
    assert [tiny.at(i).stage for i in range(10)] == [1] + [17] * 8 + [16]
    with pytest.raises(ScheduleError):
        PAPER.rescaled(0)


def test_steps_outside_the_schedule():
    with pytest.raises(ScheduleError, match="past the end"):
        PAPER.at(750_000)
    with pytest.raises(ScheduleError, match="non-negative"):
        PAPER.at(-1)
    with pytest.raises(ScheduleError, match="num_ws"):
        PAPER.at(0, num_ws=0)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_schedule_file_round_trip(tmp_path, suffix):
    for sched in (PAPER, preset_schedule("paper", total_steps=100_000), preset_schedule("e4e")):
        path = save_schedule(sched, tmp_path / f"s{suffix}")
        back = load_schedule(path)
        assert back == sched
        for step in [*range(0, sched.total_steps, max(1, sched.total_steps // 997)), sched.total_steps - 1]:
            for num_ws in (8, 18):
                assert back.at(step, num_ws) == sched.at(step, num_ws)


def test_user_schedule_file(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text(
        """
name: mine
phases:
  - name: warmup
    end: 100
    stage: 0
    delta: 0.001
    adversarial: 0
  - name: grow
    end: 400
    stage: {from: 0, to: max}
    delta: {value: 0.001, factor: 2, every: 50, since: 100, times: 3}
    adversarial: 0.05
  - name: all
    end: 500
    stage: max-0
    delta: {value: 0.001, factor: 2, every: 50, since: 100, times: 3}
    adversarial: {value: 0.05, factor: 0.1, every: 10, offset: 5, since: 400}
"""
    )
    s = load_schedule(path)
    assert s.name == "mine" and s.total_steps == 500
    # ramp 0 -> 3 over [100, 400) with num_ws 4: one stage every 100 steps
    assert [s.at(x, 4).stage for x in (99, 100, 199, 200, 300, 399, 400)] == [0, 0, 0, 1, 2, 2, 3]
    for x in range(500):
        n = 0 if x < 100 else min((x - 100) // 50 + 1, 3)
        assert s.at(x, 4).delta_weight == pytest.approx(0.001 * 2**n)
        m = 0 if x < 405 else (x - 405) // 10 + 1
        expect = 0.0 if x < 100 else (0.05 if x < 400 else 0.05 * 0.1**m)
        assert s.at(x, 4).adversarial_weight == pytest.approx(expect)


@pytest.mark.parametrize(
    "text, match",
    [
        ("phases: []", "non-empty"),
        ("phases: [{end: 10, stage: 0, delta: 0}]", "missing 'adversarial'"),
        ("phases: [{end: 10, stage: maxx, delta: 0, adversarial: 0}]", "stage 'maxx'"),
        ("phases: [{end: 10, stage: -1, delta: 0, adversarial: 0}]", "negative"),
        ("phases: [{end: 10, stage: 0, delta: 0, adversarial: 0, extra: 1}]", "unknown key"),
        ("phases: [{start: 5, end: 10, stage: 0, delta: 0, adversarial: 0}]", "contiguous"),
        ("phases: [{end: 10, stage: 0, delta: {value: 1, every: 0}, adversarial: 0}]", "positive"),
        ("phases: [{end: 10, stage: 0, delta: {factor: 2}, adversarial: 0}]", "needs 'value'"),
        ("phases: [{end: 10, stage: {from: 0}, delta: 0, adversarial: 0}]", "ramp"),
        ("total_steps: 20\nphases: [{end: 10, stage: 0, delta: 0, adversarial: 0}]", "total_steps is 20"),
        ("phases: [{end: 10, stage: 0, delta: 0, adversarial: 0}", "not a valid YAML"),
        ("- 1\n- 2", "expected a mapping"),
    ],
)
def test_bad_schedule_files(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ScheduleError, match=match) as e:
        load_schedule(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_schedule_from_dict_names_the_phase():
    data = PAPER.to_dict()
    data["phases"][1]["delta"] = "lots"
    with pytest.raises(ScheduleError, match=r"phase 1 \('W -> W\+'\): delta"):
        Schedule.from_dict(data)


def test_cli_at_json(capsys):
    steps = [19_999, 20_000, 52_000, 640_005, 650_000, 714_000]
    assert main(["schedule", "--preset", "paper", "--at", ",".join(map(str, steps)), "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["step"] for r in rows] == steps
    assert [r["stage"] for r in rows] == [0, 1, 17, 17, 16, 0]
    assert rows[3]["delta_weight"] == pytest.approx(2e-4 * 1.2**15)
    assert rows[3]["adversarial_weight"] == pytest.approx(0.1 * 0.5**15)


def test_cli_table_rescale_file_and_errors(tmp_path, capsys):
    assert main(["schedule", "--total-steps", "75000", "--num-ws", "8"]) == 0
    out = capsys.readouterr().out
    assert "75000 steps, 7 offsets" in out and "W+ -> W" in out and "65000-71400" in out
    assert main(["schedule", "--preset", "e4e", "--json"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [(r["start"], r["end"]) for r in rows] == [(0, 20_000), (20_000, 52_000), (52_000, 500_000)]
    assert rows[1]["stage_first"] == 1 and rows[1]["stage_last"] == 16
    f = tmp_path / "s.json"
    assert main(["schedule", "--total-steps", "7500", "--save", str(f)]) == 0
    capsys.readouterr()
    assert main(["schedule", "--schedule", str(f), "--at", "5200", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["stage"] == 17 and row["phase"] == "W+, weights ramp"
    assert main(["schedule", "--at", "750000"]) == 2
    assert "past the end" in capsys.readouterr().err
    assert main(["schedule", "--schedule", str(tmp_path / "missing.yaml")]) == 2
    assert "no such schedule file" in capsys.readouterr().err
