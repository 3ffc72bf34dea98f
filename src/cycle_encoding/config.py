"""Configuration as typed data: dataclasses built from YAML/JSON or dicts, with checked keys and types."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import yaml

from .errors import CycleEncodingError, first_line

T = TypeVar("T")


def check_at_least(config: Any, prefix: str = "", **lowest: float) -> None:
    """One clear line for the first field below its lowest value (``prefix`` + name; a field that is None passes)."""
    for name, low in lowest.items():
        v = getattr(config, name)
        if v is not None and v < low:
            raise ValueError(f"{prefix}{name} must be >= {low}, got {v}")


def check_one_of(config: Any, prefix: str = "", **choices: Sequence[Any]) -> None:
    """One clear line for the first field whose value is not one of its choices."""
    for name, allowed in choices.items():
        v = getattr(config, name)
        if v not in allowed:
            raise ValueError(f"{prefix}{name} must be one of {', '.join(map(str, allowed))}, got {v!r}")


# field type -> (accepted value types, name in messages, conversion); True/False are no numbers here
_SCALARS: dict[type, tuple[tuple[type, ...], str, Any]] = {
    float: ((int, float), "a number", float),
    int: ((int,), "an integer", int),
    bool: ((bool,), "true or false", bool),
    str: ((str, Path), "a string", str),
}


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in [a for a in args if a is not type(None)]:
            try:
                return _convert(value, a, where)
            except CycleEncodingError as e:
                errors.append(str(e))
        raise CycleEncodingError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise CycleEncodingError(f"{where}: {value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise CycleEncodingError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else Any
        seq = [_convert(v, inner, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(seq) if origin is tuple else seq
    if origin in (dict, Mapping):
        if not isinstance(value, Mapping):
            raise CycleEncodingError(f"{where}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return from_mapping(tp, value, where)
    if tp in _SCALARS:
        accepted, what, convert = _SCALARS[tp]
        if not isinstance(value, accepted) or (tp is not bool and isinstance(value, bool)):
            raise CycleEncodingError(f"{where}: expected {what}, got {value!r}")
        return convert(value)
    return value


def from_mapping(cls: type[T], data: Mapping[str, Any] | None, where: str = "config") -> T:
    """Build dataclass ``cls`` from ``data``; unknown keys and wrong types give one clear line."""
    data = dict(data or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise CycleEncodingError(
            f"{where}: unknown option(s) {', '.join(unknown)} (known: {', '.join(sorted(fields))})"
        )
    kwargs = {k: _convert(v, hints[k], f"{where}.{k}") for k, v in data.items()}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise CycleEncodingError(f"{where}: {e}") from None


C = TypeVar("C", bound="ConfigRecord")


class ConfigRecord:
    """``to_dict`` / ``from_dict`` of a dataclass of plain fields (a network's architecture in a file's header):
    tuples are written as lists and read back as tuples; an unknown key is refused (ValueError)."""

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)  # tuples as lists

    @classmethod
    def from_dict(cls: type[C], d: Mapping[str, Any]) -> C:
        unknown = set(d) - {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields: {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, numbers, strings) of a dataclass tree."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, Path):
        return str(obj)
    return obj


def read_data_file(
    path: str | Path, what: str = "configuration file", error: type[CycleEncodingError] = CycleEncodingError
) -> Any:
    """The data of a JSON (``.json``) or YAML file (safe parsing: data only); a missing or unparsable file is one
    line (an ``error``) naming the file."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{p}: no such {what}")
    try:
        text = p.read_text(encoding="utf-8")
        return json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError, UnicodeDecodeError) as e:
        kind = "JSON" if p.suffix.lower() == ".json" else "YAML"
        raise error(f"{p}: not a valid {kind} file: {first_line(e)}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML or JSON mapping of options (see :func:`read_data_file`)."""
    p = Path(path)
    data = read_data_file(p)
    if not isinstance(data, Mapping):
        raise CycleEncodingError(f"{p}: the file must hold a mapping of options")
    return dict(data)
