"""Typed configuration: dataclasses built from plain dicts, rejecting unknown keys."""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, TypeVar

from .errors import InputError

C = TypeVar("C")
_FRACTION = re.compile(r"^\s*\d+(\.\d+)?\s*/\s*\d+(\.\d+)?\s*$")


def did_you_mean(unknown: list[str], known) -> str:
    """" (did you mean 'distill'?)" for misspelt keys close to an accepted one; "" otherwise."""
    import difflib
    guesses = [f"{k!r} -> {m[0]!r}" if len(unknown) > 1 else repr(m[0])
               for k in unknown if (m := difflib.get_close_matches(k, list(known), n=1, cutoff=0.75))]
    return f" (did you mean {', '.join(guesses)}?)" if guesses else ""


def from_dict(cls: type[C], data: dict[str, Any] | None, where: str) -> C:
    """Build dataclass ``cls`` from ``data``; nested dataclass fields are built recursively.

    Unknown keys fail with a message naming ``where`` (e.g. ``params.yaml:distill``), the bad
    keys and the accepted ones; wrong scalar types fail the same way.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise InputError(f"{where}: expected a mapping, found {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]  # C: any dataclass
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise InputError(f"{where}: unknown key(s) {unknown}{did_you_mean(unknown, fields)}; "
                         f"accepted keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{where}.{name}")
    try:
        return cls(**kwargs)
    except (TypeError, InputError) as exc:  # __post_init__ checks: name where they failed
        msg = str(exc)
        if msg.split(":")[0] in fields:     # "eps: expected ..." -> "<where>.eps: expected ..."
            raise InputError(f"{where}.{msg}") from None
        raise InputError(f"{where}: {msg}") from None


def _convert(hint, value, where):
    if dataclasses.is_dataclass(hint) and isinstance(hint, type):
        return from_dict(hint, value, where)
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or origin is types.UnionType:   # Optional[int] and int | None alike
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(arg, value, where)
            except InputError:
                continue
        raise InputError(f"{where}: expected {describe_type(hint)}, found {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise InputError(f"{where}: expected one of {list(args)}, found {value!r}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise InputError(f"{where}: expected a list, found {value!r}")
        inner = args[0] if args else Any
        return origin(_convert(inner, v, f"{where}[{i}]") for i, v in enumerate(value))
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise InputError(f"{where}: expected a mapping, found {value!r}")
        return dict(value)
    if hint is float:
        if isinstance(value, str) and _FRACTION.match(value):
            num, den = value.split("/")
            if float(den) == 0:
                raise InputError(f"{where}: expected a number or a fraction such as 8/255, found {value!r} "
                                 "(division by zero)")
            return float(num) / float(den)  # "8/255": pixel units written as the field writes them
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, found {value!r}")
        return float(value)
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, found {value!r}")
        return value
    if hint is bool:
        if not isinstance(value, bool):
            raise InputError(f"{where}: expected true or false, found {value!r}")
        return value
    if hint is str:
        if not isinstance(value, str):
            raise InputError(f"{where}: expected a string, found {value!r}")
        return value
    return value


_WORDS = {int: "an integer", float: "a number", bool: "true or false", str: "a string", type(None): "null"}


def describe_type(hint) -> str:
    """A type hint in words for a message: ``int | None`` -> "an integer or null"."""
    origin = typing.get_origin(hint)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(describe_type(arg) for arg in typing.get_args(hint))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(hint))
    if origin in (list, tuple):
        return "a list"
    if origin is dict or hint is dict or dataclasses.is_dataclass(hint):
        return "a mapping"
    return _WORDS.get(hint, str(hint))


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)
