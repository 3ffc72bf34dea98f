"""The cycle schedule W -> W+ -> W as data: phases that give, for a global step, the training stage and the
weights of the offset (delta) and adversarial losses; presets, rescaling, schedule files.
Design notes: docs/INTERNALS.md, "cycle_encoding.training.schedule"."""

from __future__ import annotations

import bisect
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Any

import yaml

from ..config import read_data_file
from ..errors import CycleEncodingError
from ..utils import atomic_write, text_table

StageValue = int | str
"""A stage as written in a schedule: an integer, ``"max"`` (all offsets) or ``"max-n"``."""

PRESETS = ("paper", "e4e", "w")

_MAX_RE = re.compile(r"^max(?:\s*-\s*(\d+))?$")


class ScheduleError(CycleEncodingError):
    """A schedule (file or data) that cannot be used; the message says which phase and field."""


def _stage_number(value: StageValue, num_offsets: int) -> int:
    """A written stage as a number in ``[0, num_offsets]``: integers are clamped, ``"max"`` is ``num_offsets``,
    ``"max-n"`` is ``num_offsets - n`` (at least 0)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return min(max(value, 0), num_offsets)
    m = _MAX_RE.match(str(value).strip())  # no match for True/False, floats, lists ...
    if m is None:
        raise ScheduleError(f"stage {value!r}: expected an integer, 'max' or 'max-N'")
    return max(num_offsets - int(m.group(1) or 0), 0)


def _check_stage_value(value: Any, where: str) -> StageValue:
    if isinstance(value, int) and not isinstance(value, bool) and value < 0:
        raise ScheduleError(f"{where}: stage {value} is negative")
    try:
        _stage_number(value, 0)
    except ScheduleError as e:
        raise ScheduleError(f"{where}: {e}") from None
    return value.strip().replace(" ", "") if isinstance(value, str) else value


def _check_keys(data: Mapping[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(data) - allowed
    if unknown:
        raise ScheduleError(f"{where}: unknown key(s) {sorted(unknown)} (allowed: {sorted(allowed)})")


def _round_scaled(x: int, num: int, den: int) -> int:
    """round(x * num / den), halves rounded up, in exact integer arithmetic."""
    return (2 * x * num + den) // (2 * den)


Step = int | float | Fraction
"""A step count in a weight rule: whole in presets, fractional (an exact Fraction) after rescaling."""


_FRACTION_RE = re.compile(r"^\s*\d+(\.\d*)?\s*(/\s*\d+)?\s*$")


def _exact(x: Step | str) -> Fraction:
    """An exact rational: ints and Fractions as they are, floats by their shortest decimal form (1333.3 -> 13333/10),
    strings ``"4000/3"`` or ``"12.5"`` as written."""
    if isinstance(x, Fraction):
        return x
    if isinstance(x, float):
        return Fraction(repr(x))
    if isinstance(x, str):
        if not _FRACTION_RE.match(x):
            raise ScheduleError(f"{x!r} is not a number of steps (use e.g. 10000, 12.5 or '4000/3')")
        try:
            return Fraction(x.replace(" ", ""))
        except ZeroDivisionError:
            raise ScheduleError(f"{x!r}: division by zero") from None
    return Fraction(x)


def _plain(x: Fraction) -> int | float | str:
    """For files: an int when whole, a float when the float is exact, else the string ``"num/den"``."""
    if x.denominator == 1:
        return int(x)
    f = float(x)
    return f if Fraction(repr(f)) == x else f"{x.numerator}/{x.denominator}"


@dataclass(frozen=True)
class WeightRule:
    """A loss weight ``value * factor ** n(s)``, n(s) the event points ``since + offset + k * every`` (at most ``times``)
    at or before the global step s, in exact arithmetic (docs/INTERNALS.md)."""

    value: float
    factor: float = 1.0
    every: Step | None = None
    offset: Step = 0
    since: Step = 0
    times: int | None = None

    def __post_init__(self) -> None:
        for name in ("every", "offset", "since"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, _exact(v))
        if not math.isfinite(self.value) or not math.isfinite(self.factor):
            raise ScheduleError(f"weight rule {self.to_data()}: value and factor must be finite numbers")
        if self.every is not None and self.every <= 0:
            raise ScheduleError(f"weight rule {self.to_data()}: 'every' must be positive")
        if self.offset < 0 or self.since < 0:
            raise ScheduleError(f"weight rule {self.to_data()}: 'offset' and 'since' must not be negative")
        if self.times is not None and self.times < 0:
            raise ScheduleError(f"weight rule {self.to_data()}: 'times' must not be negative")

    @property
    def constant(self) -> bool:
        return self.every is None or self.factor == 1.0 or self.times == 0

    @property
    def first_event(self) -> int:
        """The first whole step at which the value is multiplied."""
        return math.ceil(self.since + self.offset)

    def count(self, step: int) -> int:
        """How many multiplications have happened at step ``step`` (the one at ``step`` itself included)."""
        first = self.since + self.offset
        if self.constant or step < first:
            return 0
        n = int((step - first) // self.every) + 1  # type: ignore[operator]
        return n if self.times is None else min(n, self.times)

    def at(self, step: int) -> float:
        """The weight at global step ``step``."""
        return float(self.value * self.factor ** self.count(step))

    def rescaled(self, num: int, den: int) -> WeightRule:
        """The same rule on a time axis scaled by ``num / den``: ``since``, ``offset`` and ``every`` scaled exactly."""
        if self.every is None:
            return self
        r = Fraction(num, den)
        return WeightRule(self.value, self.factor, self.every * r, self.offset * r, self.since * r, self.times)

    def to_data(self) -> float | dict[str, Any]:
        """A plain number for a constant, else a dict (the form schedule files use)."""
        if self.every is None:
            return self.value
        d: dict[str, Any] = {"value": self.value, "factor": self.factor}
        d.update({k: _plain(getattr(self, k)) for k in ("every", "offset", "since")})
        if self.times is not None:
            d["times"] = self.times
        return d

    @classmethod
    def from_data(cls, data: Any, where: str) -> WeightRule:
        """Parse a number or a dict with keys value, factor, every, offset, since, times."""
        if isinstance(data, (int, float)) and not isinstance(data, bool):
            return cls(float(data))
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{where}: expected a number or a rule (value, factor, every, ...), got {data!r}")
        _check_keys(data, {"value", "factor", "every", "offset", "since", "times"}, where)
        if "value" not in data:
            raise ScheduleError(f"{where}: a weight rule needs 'value'")

        def num(key: str, default: Any, integer: bool = False, steps: bool = False) -> Any:
            v = data.get(key, default)
            if v is None:
                return None
            if steps and isinstance(v, str):
                try:
                    return _exact(v)
                except ScheduleError as e:
                    raise ScheduleError(f"'{key}': {e}") from None
            ok = isinstance(v, int) if integer else isinstance(v, (int, float))
            if isinstance(v, bool) or not ok or (isinstance(v, float) and not math.isfinite(v)):
                raise ScheduleError(f"'{key}' must be {'an integer' if integer else 'a number'}, got {v!r}")
            return v

        try:
            return cls(
                value=float(num("value", None)),
                factor=float(num("factor", 1.0)),
                every=num("every", None, steps=True),
                offset=num("offset", 0, steps=True),
                since=num("since", 0, steps=True),
                times=num("times", None, integer=True),
            )
        except ScheduleError as e:
            raise ScheduleError(f"{where}: {e}") from None

    def describe(self, start: int, end: int) -> str:
        """Human-readable: the values over ``[start, end)`` and the rule."""
        a, b = self.at(start), self.at(end - 1)
        if self.constant or a == b:
            return _short(a)
        cap = "" if self.times is None else f", at most {self.times} times"
        every = self.every
        every_s = str(int(every)) if every.denominator == 1 else f"{float(every):.6g}"  # type: ignore[union-attr]
        return f"{_short(a)} -> {_short(b)} (x{_short(self.factor)} every {every_s} from {self.first_event}{cap})"


def _short(v: float) -> str:
    """Short number: 0.1, 0.5, 2e-4, 3.082e-3."""
    if v == 0 or 1e-2 <= abs(v) < 1e5:
        return f"{v:.4g}"
    mant, exp = f"{v:.3e}".split("e")
    mant = mant.rstrip("0").rstrip(".")
    return f"{mant}e{int(exp)}"


@dataclass(frozen=True)
class StageRule:
    """The stage over a phase: ``first`` throughout when ``to`` is None, else a ramp from ``first`` (at the phase
    start) one stage at a time toward ``to`` (reached at the phase end)."""

    first: StageValue
    to: StageValue | None = None

    def ends(self, num_offsets: int) -> tuple[int, int]:
        """The stages at the phase's start and at its end, as numbers."""
        a = _stage_number(self.first, num_offsets)
        return a, a if self.to is None else _stage_number(self.to, num_offsets)

    def at(self, step: int, start: int, end: int, num_offsets: int) -> int:
        a, b = self.ends(num_offsets)
        moved = ((step - start) * abs(b - a)) // (end - start)
        return a + moved if b > a else a - moved

    def to_data(self) -> StageValue | dict[str, StageValue]:
        return self.first if self.to is None else {"from": self.first, "to": self.to}

    @classmethod
    def from_data(cls, data: Any, where: str) -> StageRule:
        if isinstance(data, Mapping):
            unknown = set(data) - {"from", "to"}
            if unknown or "from" not in data or "to" not in data:
                raise ScheduleError(f"{where}: a stage ramp is {{from: STAGE, to: STAGE}}, got {dict(data)!r}")
            return cls(_check_stage_value(data["from"], where), _check_stage_value(data["to"], where))
        return cls(_check_stage_value(data, where))

    def describe(self, start: int, end: int, num_offsets: int) -> str:
        a, b = self.ends(num_offsets)
        n = abs(b - a)
        if n == 0:
            return str(a)
        last = self.at(end - 1, start, end, num_offsets)
        every = (end - start) / n
        every_s = str(int(every)) if every == int(every) else f"{every:.1f}"
        sign = "+1" if b > a else "-1"
        return f"{a} -> {last}, {sign} every {every_s} steps ({b} at {end})"


RULE_KEYS = (("stage", StageRule), ("delta", WeightRule), ("adversarial", WeightRule))  # a phase's rules, in order


@dataclass(frozen=True)
class Phase:
    """Steps ``[start, end)`` with a stage rule and the two weight rules."""

    name: str
    start: int
    end: int
    stage: StageRule
    delta: WeightRule
    adversarial: WeightRule

    def stage_at(self, step: int, num_offsets: int) -> int:
        return self.stage.at(step, self.start, self.end, num_offsets)

    def to_data(self) -> dict[str, Any]:
        rules = {k: getattr(self, k).to_data() for k, _ in RULE_KEYS}
        return {"name": self.name, "start": self.start, "end": self.end, **rules}


@dataclass(frozen=True)
class ScheduleState:
    """What the schedule says for one global step."""

    step: int
    phase: str
    phase_index: int
    stage: int
    num_offsets: int
    delta_weight: float
    adversarial_weight: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def num_offsets_for(num_ws: int) -> int:
    """Number of offsets D_1..D_{N-1} of an encoder for a generator with ``num_ws`` style inputs."""
    if isinstance(num_ws, bool) or not isinstance(num_ws, int) or num_ws < 1:
        raise ScheduleError(f"num_ws must be a positive integer (18 for a 1024 generator), got {num_ws!r}")
    return num_ws - 1


@dataclass(frozen=True)
class Schedule:
    """Contiguous phases from step 0 to ``total_steps``."""

    phases: tuple[Phase, ...]
    name: str = "custom"
    source: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        where = self.source or f"schedule {self.name!r}"
        if not self.phases:
            raise ScheduleError(f"{where}: no phases")
        expect = 0
        for i, p in enumerate(self.phases):
            if p.start != expect:
                raise ScheduleError(
                    f"{where}: phase {i} ({p.name!r}) starts at {p.start} but the phase before ends at {expect}"
                    " (phases must be contiguous from step 0)"
                )
            if p.end <= p.start:
                raise ScheduleError(f"{where}: phase {i} ({p.name!r}) ends at {p.end}, not after its start {p.start}")
            expect = p.end

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end

    def phase_index(self, step: int) -> int:
        """The index of the phase holding global step ``step``."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ScheduleError(f"step must be a non-negative integer, got {step!r}")
        if step >= self.total_steps:
            raise ScheduleError(
                f"step {step} is past the end of schedule {self.name!r} ({self.total_steps} steps; steps are 0-based)"
            )
        return bisect.bisect_right([p.end for p in self.phases], step)

    def at(self, step: int, num_ws: int = 18) -> ScheduleState:
        """Stage and weights at global step ``step`` for a generator with ``num_ws`` style inputs."""
        k = num_offsets_for(num_ws)
        i = self.phase_index(step)
        p = self.phases[i]
        return ScheduleState(
            step=step,
            phase=p.name,
            phase_index=i,
            stage=p.stage_at(step, k),
            num_offsets=k,
            delta_weight=p.delta.at(step),
            adversarial_weight=p.adversarial.at(step),
        )

    def stage_changes(self, num_ws: int = 18) -> list[tuple[int, int]]:
        """``[(step, stage), ...]``: the first step and the stage of every run of equal stages, step 0 first."""
        k = num_offsets_for(num_ws)
        out: list[tuple[int, int]] = []
        for p in self.phases:
            a, b = p.stage.ends(k)
            n = abs(b - a)
            steps = [p.start] + [p.start + -(-(j * (p.end - p.start)) // n) for j in range(1, n)] if n else [p.start]
            for s in steps:
                st = p.stage_at(s, k)
                if not out or out[-1][1] != st:
                    out.append((s, st))
        return out

    def rescaled(self, total_steps: int) -> Schedule:
        """The same schedule over ``total_steps`` steps, all step counts scaled by ``total_steps / self.total_steps``
        and rounded (docs/INTERNALS.md); phases that become empty are dropped."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ScheduleError(f"total steps must be a positive integer, got {total_steps!r}")
        num, den = total_steps, self.total_steps
        phases = []
        for p in self.phases:
            start, end = _round_scaled(p.start, num, den), _round_scaled(p.end, num, den)
            if end <= start:
                continue
            phases.append(
                Phase(p.name, start, end, p.stage, p.delta.rescaled(num, den), p.adversarial.rescaled(num, den))
            )
        # rounding is monotone, so the kept phases are still contiguous from 0 to total_steps
        name = self.name if total_steps == self.total_steps else f"{self.name}@{total_steps}"
        return Schedule(tuple(phases), name=name)

    def table(self, num_ws: int = 18) -> list[dict[str, Any]]:
        """One dict per phase: the phase's data plus the resolved stages and weights at its first and last step,
        and readable descriptions."""
        k = num_offsets_for(num_ws)
        rows = []
        for p in self.phases:
            row = {**p.to_data(), "stage_first": p.stage_at(p.start, k), "stage_last": p.stage_at(p.end - 1, k)}
            for w in ("delta", "adversarial"):
                row.update({f"{w}_first": getattr(p, w).at(p.start), f"{w}_last": getattr(p, w).at(p.end - 1)})
            row["stage_text"] = p.stage.describe(p.start, p.end, k)
            rows.append({**row, "delta_text": p.delta.describe(p.start, p.end),
                         "adversarial_text": p.adversarial.describe(p.start, p.end)})  # fmt: skip
        return rows

    def format_table(self, num_ws: int = 18) -> str:
        """The phase table as aligned text."""
        rows = self.table(num_ws)
        head = ["phase", "steps", "stage", "delta weight", "adversarial weight"]
        body = [
            [r["name"], f"{r['start']}-{r['end']}", r["stage_text"], r["delta_text"], r["adversarial_text"]]
            for r in rows
        ]
        title = f"schedule {self.name!r}: {self.total_steps} steps, {num_offsets_for(num_ws)} offsets (num_ws {num_ws})"
        return "\n".join([title, *text_table(head, body)])

    def to_dict(self) -> dict[str, Any]:
        """The schedule as plain data (what :func:`save_schedule` writes)."""
        return {"name": self.name, "total_steps": self.total_steps, "phases": [p.to_data() for p in self.phases]}

    @classmethod
    def from_dict(cls, data: Any, source: str | None = None) -> Schedule:
        """Parse and check the data of a schedule file; errors name the file, the phase and the field."""
        where = source or "schedule"
        if not isinstance(data, Mapping):
            raise ScheduleError(f"{where}: expected a mapping with 'phases', got {type(data).__name__}")
        _check_keys(data, {"name", "phases", "total_steps", "description"}, where)
        raw = data.get("phases")
        if not isinstance(raw, Sequence) or isinstance(raw, (str, bytes)) or not raw:
            raise ScheduleError(f"{where}: 'phases' must be a non-empty list")
        phases: list[Phase] = []
        for i, ph in enumerate(raw):
            if not isinstance(ph, Mapping):
                raise ScheduleError(f"{where}: phase {i}: expected a mapping, got {ph!r}")
            name = str(ph.get("name", f"phase {i}"))
            pw = f"{where}: phase {i} ({name!r})"
            _check_keys(ph, {"name", "start", "end", "stage", "delta", "adversarial"}, pw)
            for key in ("end", *(k for k, _ in RULE_KEYS)):
                if key not in ph:
                    raise ScheduleError(f"{pw}: missing '{key}'")
            start = ph.get("start", phases[-1].end if phases else 0)
            end = ph["end"]
            for key, v in (("start", start), ("end", end)):
                if isinstance(v, bool) or not isinstance(v, int):
                    raise ScheduleError(f"{pw}: '{key}' must be an integer step, got {v!r}")
            rules = [rule.from_data(ph[k], f"{pw}: {k}") for k, rule in RULE_KEYS]
            phases.append(Phase(name, start, end, *rules))  # type: ignore[arg-type]
        sched = cls(tuple(phases), name=str(data.get("name", "custom")), source=source)
        total = data.get("total_steps")
        if total is not None and total != sched.total_steps:
            raise ScheduleError(
                f"{where}: total_steps is {total} but the last phase ends at {sched.total_steps}"
                " (drop total_steps, or use --total-steps to rescale)"
            )
        return sched


def _paper() -> Schedule:
    delta_up = WeightRule(2e-4, factor=1.2, every=10_000, offset=5, since=500_000, times=15)
    adv_down = WeightRule(0.1, factor=0.5, every=10_000, offset=5, since=500_000)
    d0, a0 = WeightRule(2e-4), WeightRule(0.1)
    return Schedule(
        (
            Phase("W", 0, 20_000, StageRule(0), d0, a0),
            Phase("W -> W+", 20_000, 52_000, StageRule(1, "max"), d0, a0),
            Phase("W+", 52_000, 500_000, StageRule("max"), d0, a0),
            Phase("W+, weights ramp", 500_000, 650_000, StageRule("max"), delta_up, adv_down),
            Phase("W+ -> W", 650_000, 714_000, StageRule("max-1", 0), delta_up, adv_down),
            Phase("W", 714_000, 750_000, StageRule(0), delta_up, adv_down),
        ),
        name="paper",
    )


def _e4e() -> Schedule:
    return Schedule(_paper().phases[:3], name="e4e")  # e4e's progressive schedule: the paper's first three phases


def _w() -> Schedule:
    return Schedule((Phase("W", 0, 500_000, StageRule(0), WeightRule(2e-4), WeightRule(0.1)),), name="w")


def preset_schedule(name: str, total_steps: int | None = None) -> Schedule:
    """A preset by name (``paper``, ``e4e``, ``w``), rescaled to ``total_steps`` when given."""
    builders = {"paper": _paper, "e4e": _e4e, "w": _w}
    if name not in builders:
        raise ScheduleError(f"unknown schedule preset {name!r} (presets: {', '.join(PRESETS)})")
    s = builders[name]()
    return s if total_steps is None else s.rescaled(total_steps)


def load_schedule(path: str | Path) -> Schedule:
    """Read a schedule from a YAML (``.yaml``/``.yml``) or JSON file (safe parsing: data only)."""
    return Schedule.from_dict(read_data_file(path, "schedule file", ScheduleError), source=str(path))


def save_schedule(schedule: Schedule, path: str | Path) -> Path:
    """Write a schedule as JSON (``.json``) or YAML (anything else), atomically."""
    p = Path(path)
    data = schedule.to_dict()
    if p.suffix.lower() == ".json":
        text = json.dumps(data, indent=2) + "\n"
    else:
        text = yaml.safe_dump(data, sort_keys=False, default_flow_style=None)
    return atomic_write(p, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def get_schedule(
    preset: str | None = "paper", path: str | Path | None = None, total_steps: int | None = None
) -> Schedule:
    """The schedule from a file when ``path`` is given, else the preset; rescaled to ``total_steps`` when given."""
    s = load_schedule(path) if path is not None else preset_schedule(preset or "paper")
    return s if total_steps is None else s.rescaled(total_steps)
