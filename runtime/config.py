"""Strict config parsing: plain dataclasses filled from TOML tables, every mistake named.

``build(Cls, table, "train")`` returns ``Cls(**table)`` after checking that each key is a field
(else: the unknown key, the valid ones and the closest match) and each value has the field's type
(else: the key, the expected type and the value given). Nested dataclass fields take nested tables.
``apply_overrides`` folds ``section.key=value`` strings from the command line into the tables.
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import types
import typing
from typing import Any


class ConfigError(ValueError):
    """A job spec or override is malformed; the message names the key and the fix."""

    user_error = True  # the CLI prints the message in one line and exits 2 (runtime/cli.py)


def is_user_error(e: BaseException, on_driver: bool = True) -> bool:
    """An error whose message names the bad input and the fix, printed as one line with exit code 2: its class
    says so (``user_error = True``: ConfigError, PlanError, CorruptCheckpointError ...), or, ``on_driver``, a
    ValueError or FileNotFoundError (a job's ``validate``, a missing file)."""
    if getattr(e, "user_error", False) is True:
        return True
    return on_driver and isinstance(e, (ValueError, FileNotFoundError))


def build(cls: type, table: dict[str, Any], where: str = "") -> Any:
    if not isinstance(table, dict):
        raise ConfigError(f"[{where}] must be a table of keys, got {type(table).__name__} {table!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for key, value in table.items():
        name = f"{where}.{key}" if where else key
        if key not in fields:
            raise ConfigError(unknown_key_message(name, key, list(fields)))
        kwargs[key] = coerce(hints[key], value, name)
    try:
        obj = cls(**kwargs)
    except TypeError as e:  # a required field is missing
        raise ConfigError(f"[{where or 'spec'}] {e}") from None
    check = getattr(obj, "check", None)
    if callable(check):
        try:
            check()
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return obj


def unknown_key_message(name: str, key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    return f"unknown key '{name}'.{hint} Valid keys here: {', '.join(sorted(valid))}"


def coerce(tp: Any, value: Any, name: str) -> Any:
    """Check ``value`` against the annotation ``tp``; ints widen to floats, nothing else converts."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return build(tp, value, name)
    if origin in (typing.Union, types.UnionType):
        errors = []
        for arm in typing.get_args(tp):
            if arm is type(None) and value is None:
                return None
            try:
                return coerce(arm, value, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"'{name}' = {value!r} matches none of {tp}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"'{name}' must be a list, got {type(value).__name__} {value!r}")
        (arm, *_) = typing.get_args(tp) or (Any,)
        return type(value)(coerce(arm, v, f"{name}[{i}]") for i, v in enumerate(value))
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"'{name}' must be a table, got {type(value).__name__} {value!r}")
        return value
    if tp is Any:
        return value
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is bool and not isinstance(value, bool):
        raise ConfigError(f"'{name}' must be true or false, got {value!r}")
    if isinstance(tp, type) and (not isinstance(value, tp) or (tp is int and isinstance(value, bool))):
        raise ConfigError(f"'{name}' must be {tp.__name__}, got {type(value).__name__} {value!r}")
    return value


def parse_override(text: str) -> tuple[list[str], Any]:
    """``'train.steps=20'`` -> (['train', 'steps'], 20). Values use TOML syntax; bare words are strings."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.steps=20)")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"override {text!r} has an empty key part")
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word: treat as a string
    return path, value


def apply_overrides(table: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    for text in overrides:
        path, value = parse_override(text)
        node = table
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: '{part}' is a value, not a section")
        node[path[-1]] = value
    return table
