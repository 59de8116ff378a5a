"""Build frozen config dataclasses from plain dicts, with one-line errors.

Hydra composes YAML into a `DictConfig`; `build(cls, data, path)` turns its resolved container into
a typed dataclass, checking unknown keys, types and `Literal` choices, and naming the full key in
every error (`trainer.max_steps`). Code past the entry points only ever sees these dataclasses.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

from orchestrator.errors import ConfigError


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return getattr(tp, "__name__", str(tp))


def _fail(path: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(
        f"config key '{path}' must be {expected}, got {value!r} ({type(value).__name__}); "
        f"fix the override or the YAML in conf/"
    )


def _coerce(tp: Any, value: Any, path: str) -> Any:
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, path)
            except ConfigError as e:
                if dataclasses.is_dataclass(arg) and isinstance(value, dict):
                    raise  # a mapping for that dataclass: what is wrong inside it is the news
                errors.append(e)
        arms = [a for a in args if a is not type(None)]
        if len(arms) == 1 and dataclasses.is_dataclass(arms[0]) and isinstance(value, dict):
            raise errors[0]  # Optional[SomeConfig] given a mapping: the error inside it is the one to show
        expected = " or ".join(_type_name(a) for a in args if a is not type(None))
        if type(None) in args:
            expected += " or null"
        raise _fail(path, value, expected)
    if origin is Literal:
        choices = get_args(tp)
        if value in choices and not (isinstance(value, bool) and not any(isinstance(c, bool) for c in choices)):
            return value
        raise ConfigError(
            f"config key '{path}' must be one of {', '.join(repr(c) for c in choices)}, got {value!r}"
        )
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise _fail(path, value, "a mapping")
        return build(tp, value, path)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _fail(path, value, "a list")
        (item_tp, *_) = get_args(tp) or (Any,)
        return tuple(_coerce(item_tp, v, f"{path}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise _fail(path, value, "a mapping")
        _, val_tp = get_args(tp) or (Any, Any)
        return {str(k): _coerce(val_tp, v, f"{path}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _fail(path, value, "true or false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise _fail(path, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _fail(path, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        raise _fail(path, value, "a string")
    raise TypeError(f"unsupported config field type {tp!r} at {path}")


def build(cls: type, data: dict, path: str = "") -> Any:
    """Build dataclass `cls` from `data`; unknown keys, wrong types and bad choices are ConfigErrors."""
    if data is None:
        data = {}
    select = cls.__dict__.get("select_class")  # a base class that picks its subclass from the data (model.family)
    if select is not None:
        try:
            cls = select.__get__(None, cls)(data)
        except ValueError as e:
            raise ConfigError(f"config '{path or '<root>'}' is invalid: {e}") from None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{path}." if path else ""
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown config key '{prefix}{unknown[0]}'; valid keys under "
            f"'{path or '<root>'}': {', '.join(sorted(fields))}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name in data:
            kwargs[name] = _coerce(hints[name], data[name], prefix + name)
        elif field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
            raise ConfigError(f"config key '{prefix}{name}' is missing; set it in conf/ or with {prefix}{name}=...")
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config '{path or '<root>'}' is invalid: {e}") from None


def to_dict(obj: Any) -> Any:
    """A dataclass tree as plain JSON-able containers (tuples become lists)."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj
