"""Command settings: one dataclass per command, filled from code, a TOML file or the command line.

Each command has one settings object (`CaptionConfig`, `ReportConfig`, `ServeConfig`, `TrainSettings`)
that says what every setting is and what it defaults to; the CLI, `--config FILE` and the Python API all
build that object, and the command takes it whole. Settings are flat, named as the command-line flags are
(`max_new_tokens` for `--max-new-tokens`): a key may name a field of the object or a field of one of its
parts (a field whose type is itself a dataclass, such as `PostProcess`), so a file says `trigger = "ohwx"`
rather than `[postprocess] trigger = "ohwx"` (the table works too).

    values = {**read_config_file("ohwx.toml"), **flags_the_user_gave}
    config = build(CaptionConfig, values, where="ohwx.toml and the command line")
"""

from __future__ import annotations

import dataclasses
import functools
import tomllib
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """The settings in a TOML file, keys as written ("max-new-tokens" and "max_new_tokens" both work).

    ValueError for a file that cannot be read or is not TOML, with the reason in one line."""
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ValueError(f"cannot read --config {path}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ValueError(f"--config {path} is not valid TOML: {exc}") from None


@functools.cache
def parts(cls: type) -> dict[str, type]:
    """The fields of `cls` whose type is a dataclass: its parts, whose own fields are settings too."""
    hints = typing.get_type_hints(cls)
    return {
        f.name: hints[f.name]
        for f in dataclasses.fields(cls)
        if isinstance(hints[f.name], type) and dataclasses.is_dataclass(hints[f.name])
    }


@functools.cache
def _owners(cls: type) -> dict[str, str | None]:
    """Every setting name of `cls` -> the part it belongs to (None: a field of `cls` itself)."""
    owners: dict[str, str | None] = {}
    for part, part_cls in parts(cls).items():
        for f in dataclasses.fields(part_cls):
            owners[f.name] = part
    for f in dataclasses.fields(cls):
        if f.name not in parts(cls):
            if f.name in owners:  # would make a flat key ambiguous: a bug in the settings classes
                raise TypeError(f"{cls.__name__}.{f.name} is also a field of its part {owners[f.name]}")
            owners[f.name] = None
    return owners


def setting_names(cls: type) -> list[str]:
    """Every name a file or a caller may set, sorted (for messages and documentation)."""
    return sorted(_owners(cls))


def defaults(cls: type) -> dict[str, Any]:
    """The default of every setting of `cls` by flat name, parts' included (what --help shows); a setting
    without a default (one the caller must give) is left out."""
    values: dict[str, Any] = {}
    for owner in (cls, *parts(cls).values()):
        for f in dataclasses.fields(owner):
            if f.name in parts(cls):
                continue
            if f.default is not dataclasses.MISSING:
                values[f.name] = f.default
            elif f.default_factory is not dataclasses.MISSING:
                values[f.name] = f.default_factory()
    return values


def build(cls: type[T], values: Mapping[str, Any], *, where: str = "the settings") -> T:
    """An instance of `cls` from flat `values` (see the module docstring); unnamed settings keep their
    defaults. A whole part may be given as an object (`postprocess=PostProcess(...)`) or a table; flat
    keys then change just those fields of it. ValueError names an unknown key and lists the known ones."""
    owners, part_types = _owners(cls), parts(cls)
    top: dict[str, Any] = {}
    nested: dict[str, dict[str, Any]] = {}
    for raw_key, value in values.items():
        key = raw_key.replace("-", "_")
        if key in part_types and (dataclasses.is_dataclass(value) or isinstance(value, Mapping)):
            if isinstance(value, Mapping):
                nested.setdefault(key, {}).update({k.replace("-", "_"): v for k, v in value.items()})
            else:
                top[key] = value
            continue
        if key not in owners:
            known = ", ".join(setting_names(cls))
            raise ValueError(f"unknown setting {raw_key!r} in {where}; known settings: {known}")
        part = owners[key]
        if part is None:
            top[key] = value
        else:
            nested.setdefault(part, {})[key] = value
    for part, fields in nested.items():
        unknown = set(fields) - {f.name for f in dataclasses.fields(part_types[part])}
        if unknown:
            raise ValueError(f"unknown setting {sorted(unknown)[0]!r} for {part} in {where}")
        base = top.get(part)
        top[part] = dataclasses.replace(base, **fields) if base is not None else part_types[part](**fields)
    missing = [
        f.name
        for f in dataclasses.fields(cls)
        if f.name not in top and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise ValueError(f"{', '.join(missing)} must be given (on the command line or in --config)")
    try:
        return cls(**top)
    except TypeError as exc:  # a value of the wrong kind that the dataclass could not take
        raise ValueError(f"bad value in {where}: {exc}") from None


def settings_for(cls: type[T], given: Any, settings: Mapping[str, Any], *, first: str, where: str) -> T:
    """What a command's Python function was called with, as one `cls`: `given` itself when it is one (with
    `settings` applied over it), or else the value of its `first` setting (a folder, a model id)."""
    if isinstance(given, cls):
        if not settings:
            return given
        values = {f.name: getattr(given, f.name) for f in dataclasses.fields(cls)}
    else:
        values = {} if given is None else {first: given}
    return build(cls, {**values, **settings}, where=where)
