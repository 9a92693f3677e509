"""Strict YAML -> typed dataclass loading: the one loader of every config of the project (the run config,
data_pipeline's sections, fleet and job files).

Why it lives here: DESIGN places the strict loader beside the run config (trainer/config.py), and
data_pipeline may use it without learning anything of the model. This module imports only the
standard library and pyyaml, and trainer/__init__.py imports nothing, so `from trainer.config_loading
import ...` in data_pipeline loads no torch, no model, no DeepSpeed and no Ray
(tests/test_config_boundaries.py checks it). A third package holding only this file would add a top
level the project's layout does not have; a copy per package is what this replaced (two loaders that
disagreed on messages and on alias bombs).

Why strict: a mistyped key in a week-long run's config silently falls back to a default. Every unknown
key, wrong type, value out of range or unreadable file is a ConfigError whose message is one line
naming the file, the key, the value (shortened) and what is allowed.

The YAML reader (StrictLoader) is pyyaml's safe loader plus three refusals: a document whose aliases
expand to more than MAX_EXPANDED_NODES nodes (a "billion laughs" file would otherwise expand to
gigabytes the moment anything walks or prints it), recursive aliases, and a key given twice in one
mapping (the second silently won). An empty file is an error too: write `{}` to mean "all defaults".
No value is ever printed longer than one short line (`short`).
"""

from __future__ import annotations

import dataclasses
import math
import reprlib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")

MAX_CONFIG_BYTES = 1 << 20
"""A run config is a few kB; anything above 1 MiB is not one."""
MAX_EXPANDED_NODES = 10_000
"""YAML nodes a document may hold once its aliases are expanded (the shipped configs hold < 300)."""

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxtuple, _REPR.maxdict = 2, 4, 4, 4
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 48, 48, 40


def short(value: Any, limit: int = 60) -> str:
    """repr of `value` on one line of at most `limit` characters; bounded work for any value."""
    text = " ".join(_REPR.repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class ConfigError(ValueError):
    """A config file or value is wrong; the message (one line) names the file and the key."""


class ConfigValueError(ConfigError):
    """A value outside what its key allows. `key` is relative to the section that raised it; the loader
    prefixes the section path (model.depth_nf) and the file."""

    def __init__(self, key: str, value: Any, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key} = {short(value)}: {allowed}")


def require(ok: bool, key: str, value: Any, allowed: str) -> None:
    """Raise ConfigValueError(key, value, allowed) unless ok."""
    if not ok:
        raise ConfigValueError(key, value, allowed)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_int(section: Any, name: str, minimum: int = 1, maximum: int | None = None) -> None:
    """section.name is an integer in [minimum, maximum]."""
    value = getattr(section, name)
    allowed = (f"an integer from {minimum} to {maximum}" if maximum is not None
               else "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
    require(isinstance(value, int) and not isinstance(value, bool) and value >= minimum
            and (maximum is None or value <= maximum), name, value, f"must be {allowed}")


def check_float(section: Any, name: str, minimum: float | None = None, maximum: float | None = None,
                strict_minimum: bool = False, optional: bool = False) -> None:
    """section.name is a finite number within the bounds (strict_minimum: > minimum)."""
    value = getattr(section, name)
    if optional and value is None:
        return
    parts = ["a finite number"]
    if minimum is not None and maximum is not None and not strict_minimum:
        parts.append(f"in [{minimum:g}, {maximum:g}]")
    else:
        if minimum is not None:
            parts.append(f"{'>' if strict_minimum else '>='} {minimum:g}")
        if maximum is not None:
            parts.append(f"<= {maximum:g}")
    ok = _is_number(value) and math.isfinite(value)
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    require(ok, name, value, "must be " + " ".join(parts) + (" (or null)" if optional else ""))


def check_choice(section: Any, name: str, options: tuple) -> None:
    value = getattr(section, name)
    require(value in options, name, value, f"must be one of {', '.join(map(str, options))}")


def check_name(section: Any, name: str) -> None:
    """A non-empty single-line string (paths, names)."""
    value = getattr(section, name)
    require(isinstance(value, str) and value.strip() != "" and "\n" not in value and "\0" not in value,
            name, value, "must be a non-empty single-line string")


class StrictLoader(yaml.SafeLoader):
    """pyyaml's safe loader that refuses alias bombs, recursive aliases and duplicate keys (see module doc)."""

    def compose_document(self):
        node = super().compose_document()
        _check_expanded_size(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                if key_node.value in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {short(key_node.value)} appears twice in one mapping (lines "
                        f"{seen[key_node.value] + 1} and {key_node.start_mark.line + 1})", key_node.start_mark)
                seen[key_node.value] = key_node.start_mark.line
        return super().construct_mapping(node, deep)


def _check_expanded_size(root) -> None:
    """Count the nodes of the document as if every alias were written out; refuse cycles and > MAX."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise yaml.composer.ComposerError(None, None, "recursive alias (an anchor used inside itself)",
                                              node.start_mark)
        active.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        active.discard(key)
        if total > MAX_EXPANDED_NODES:
            raise yaml.composer.ComposerError(
                None, None, f"aliases expand this document to more than {MAX_EXPANDED_NODES} values "
                "(an alias bomb?); write the values out", node.start_mark)
        sizes[key] = total
        return total

    if root is not None:
        size(root)


def _yaml_problem(error: yaml.YAMLError) -> str:
    """A YAML error on one line: what and where (pyyaml's own text spans several lines)."""
    problem = getattr(error, "problem", None) or getattr(error, "context", None) or str(error)
    mark = getattr(error, "problem_mark", None) or getattr(error, "context_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    text = " ".join(str(problem).split())
    return (text if len(text) <= 160 else text[:157] + "...") + where


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _convert(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(tp)
        if value is None and type(None) in options:
            return None
        others = [option for option in options if option is not type(None)]
        if len(others) == 1:  # X | None: X's own error names the key that is wrong inside it
            return _convert(value, others[0], where)
        for option in options:
            if option is type(None):
                continue
            try:
                return _convert(value, option, where)
            except ConfigError:
                pass
        raise ConfigError(f"{where}: expected {_type_name(tp)}, got {short(value)}")
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short(value)}")
        args = typing.get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(f"{where}: expected {len(args)} values, got {len(value)}")
            return tuple(_convert(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
        item = args[0] if args else Any
        converted = [_convert(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
        return tuple(converted) if origin is tuple else converted
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {short(value)}")
        key_type, value_type = typing.get_args(tp) or (Any, Any)
        return {_convert(k, key_type, where): _convert(v, value_type, f"{where}.{k}") for k, v in value.items()}
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {short(value)}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {short(value)}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {short(value)}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {short(value)}")
        return value
    raise ConfigError(f"{where}: unsupported config type {_type_name(tp)}")


def from_dict(cls: type[T], data: Any, where: str = "") -> T:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and wrong types."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'top level'}: expected a mapping for {cls.__name__}, got {short(data)}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    prefix = f"{where}." if where else ""
    unknown = sorted(set(map(str, data)) - set(fields))
    if unknown:
        known = ", ".join(sorted(fields))
        raise ConfigError(f"unknown key '{prefix}{unknown[0]}' (known keys of {where or 'the top level'}: {known})")
    missing = [name for name, f in fields.items() if name not in data and f.default is dataclasses.MISSING
               and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]} is required ({_type_name(hints[missing[0]])})")
    kwargs = {name: _convert(value, hints[name], f"{prefix}{name}") for name, value in data.items()}
    try:
        instance = cls(**kwargs)
    except ConfigError as error:
        key = getattr(error, "key", None)
        if key is None:
            raise
        raise ConfigValueError(f"{prefix}{key}", error.value, error.allowed) from error
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{where or 'top level'}: {' '.join(str(error).split())}") from error
    return instance


def parse_yaml(text: str, where: str) -> Any:
    """YAML text read with StrictLoader (e.g. the config stored in a checkpoint); errors name `where`."""
    try:
        return yaml.load(text, Loader=StrictLoader)  # noqa: S506 - StrictLoader is a SafeLoader
    except yaml.YAMLError as error:
        raise ConfigError(f"{where}: not valid YAML: {_yaml_problem(error)}") from error
    except RecursionError as error:
        raise ConfigError(f"{where}: not valid YAML: nested too deeply") from error


def read_yaml(path: str | Path) -> Any:
    """The data of a YAML config file, read with StrictLoader; errors are one-line ConfigErrors naming it."""
    path = Path(path)
    try:
        size = path.stat().st_size
        if size > MAX_CONFIG_BYTES:
            raise ConfigError(f"{path}: {size} bytes, more than a config file may hold ({MAX_CONFIG_BYTES})")
        text = path.read_text()
    except OSError as error:
        raise ConfigError(f"cannot read config file {path}: {error.strerror}") from error
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path}: not a text file ({error.reason} at byte {error.start})") from error
    data = parse_yaml(text, str(path))
    if data is None:
        raise ConfigError(f"{path}: the file is empty (write {{}} to use every default)")
    return data


def set_key(data: dict, dotted: str, value: Any) -> None:
    """data["a"]["b"] = value for dotted "a.b" (missing sections are created): command-line overrides go
    through the same checks as the file."""
    *sections, last = dotted.split(".")
    for name in sections:
        section = data.get(name)
        if section is None:
            section = data[name] = {}
        if not isinstance(section, dict):
            raise ConfigError(f"{name}: expected a mapping, got {short(section)}")
        data = section
    data[last] = value


def load_yaml_config(cls: type[T], path: str | Path, overrides: dict[str, Any] | None = None,
                     section: str | None = None) -> T:
    """Read a YAML file into dataclass `cls`, with `overrides` ({"train.max_steps": 5}) applied first;
    every error is one line that names the file. `section`: read only that top-level section of the file
    (data_pipeline used on its own reads e.g. the `data:` section of a run's file); keys are then named
    from there (data.batch_size)."""
    path = Path(path)
    data = read_yaml(path)
    try:
        if overrides:
            if not isinstance(data, dict):
                raise ConfigError(f"top level: expected a mapping for {cls.__name__}, got {short(data)}")
            for key, value in overrides.items():
                set_key(data, key, value)
        if section is None:
            return from_dict(cls, data)
        if not isinstance(data, dict) or section not in data:
            raise ConfigError(f"no section '{section}'")
        return from_dict(cls, data[section], section)
    except ConfigValueError as error:
        raise ConfigValueError(f"{path}: {error.key}", error.value, error.allowed) from error
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from error


def to_dict(config: Any) -> dict:
    """The plain-data form of a config dataclass (for YAML dumps and checkpoint hashes)."""
    return dataclasses.asdict(config)
