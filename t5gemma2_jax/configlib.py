"""The one config engine: typed fields, dotted overrides, YAML files with a `base:`, one error type.

Every configuration in the package (the model's `T5Gemma2Config`, the data pipeline's
`DataConfig`, the trainer's sections) is a frozen dataclass that validates itself in
`__post_init__` with `require`. This module turns untyped input (YAML, JSON, `key=value` command
lines) into those dataclasses, and every mistake into one `ConfigError` whose message starts with
the dotted key it is about (`train.steps: expected an integer, got 'five'`), with the closest known
key when the key is misspelt.

    build(DataConfig, {"encoder_length": "512"}, "data")     # strings from a command line coerce
    load_yaml("configs/tiny_sft.yaml")                       # `base: tiny.yaml` merged underneath

Kept on the standard library rather than pydantic: the configs are plain frozen dataclasses that
JAX hashes as static arguments, and the error messages (the dotted key first, "did you mean")
would need the same amount of code on top of pydantic's own.
"""

from __future__ import annotations

import collections.abc
import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import yaml

from t5gemma2_jax import storage

BASE_KEY = "base"
# Spellings of "no value" on a command line, for optional fields (`data.eval=none`).
_NONE_WORDS = ("none", "null", "~", "")


class ConfigError(ValueError):
    """A configuration value is invalid. The message starts with the dotted key it is about."""


# ---------------------------------------------------------------------------------------------
# Validation helpers for `__post_init__`.


def require(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def require_choice(value: Any, key: str, choices: Iterable[str]) -> None:
    choices = tuple(choices)
    require(value in choices, key, f"{value!r} not in {choices}")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def require_int(obj: Any, where: str, *names: str, minimum: int = 1) -> None:
    for name in names:
        value = getattr(obj, name)
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        require(is_int(value) and value >= minimum, f"{where}.{name}", f"must be {what}, got {value!r}")


def unknown_key(key: str, known: Iterable, where: str = "") -> ConfigError:
    """`where.key: unknown key (did you mean 'where.close'?); known keys in where: [...]`."""
    known = sorted(map(str, known))
    full = f"{where}.{key}" if where else str(key)
    close = difflib.get_close_matches(str(key), known, n=1)
    hint = f" (did you mean {(where + '.' if where else '') + close[0]!r}?)" if close else ""
    what = f"known keys in {where}" if where else "known sections"
    return ConfigError(f"{full}: unknown key{hint}; {what}: {known}")


# ---------------------------------------------------------------------------------------------
# Coercion of one value to a field's annotation.


def _type_name(t) -> str:
    return getattr(t, "__name__", str(t))


def coerce(value: Any, hint: Any, key: str) -> Any:
    """`value` checked against the annotation `hint`, converted where that is unambiguous: numbers
    and bools from command-line strings, lists to tuples, mappings to nested dataclasses."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if type(None) in args and (value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS)):
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return coerce(value, a, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(_type_name(a) for a in args)}, got {value!r}")
    if hint is Any:
        return value
    if isinstance(value, str) and hint in (bool, int, float):
        value = parse_value(value)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected a bool (true/false), got {value!r} ({type(value).__name__})")
    if hint is int:
        if is_int(value):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{key}: expected an integer, got {value!r} ({type(value).__name__})")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)  # YAML 1.1 reads "1e-4" as a string
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a number, got {value!r} ({type(value).__name__})")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r} ({type(value).__name__}); quote it")
    if dataclasses.is_dataclass(hint):
        if isinstance(value, hint):
            return value
        if isinstance(value, Mapping):
            return build(hint, value, key)
        raise ConfigError(f"{key}: must be a mapping of {hint.__name__} fields, got {value!r}")
    if origin in (tuple, list, collections.abc.Sequence) or hint in (tuple, list):
        if isinstance(value, (Mapping, str)):
            return value  # compact forms the dataclass parses itself (data.ul2_denoisers)
        if isinstance(value, (list, tuple)):
            if len(args) == 2 and args[1] is Ellipsis and args[0] in (str, int, float, bool):
                return tuple(coerce(v, args[0], f"{key}[{i}]") for i, v in enumerate(value))
            return tuple(value)
        raise ConfigError(f"{key}: expected a list, got {value!r} ({type(value).__name__})")
    if origin in (dict, collections.abc.Mapping) or hint in (dict,):
        if isinstance(value, Mapping):
            return dict(value)
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a mapping, got {value!r} ({type(value).__name__})")
    return value  # other annotations: left to the dataclass' own validation


def field_hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_overrides(base: Any, raw: Mapping[str, Any], where: str) -> dict:
    """Keys and types of a partial override of the dataclass instance `base` (nested mappings for
    nested dataclass fields), coerced; nothing is built."""
    names = {f.name for f in dataclasses.fields(base)}
    hints = field_hints(type(base))
    out = {}
    for key, value in raw.items():
        full = f"{where}.{key}"
        if key not in names:
            raise unknown_key(key, names, where)
        current = getattr(base, key)
        if dataclasses.is_dataclass(current):
            if not isinstance(value, Mapping):
                raise ConfigError(f"{full}: must be a mapping of {type(current).__name__} fields, got {value!r}")
            out[key] = check_overrides(current, value, full)
        else:
            out[key] = coerce(value, hints[key], full)
    return out


def build(cls, raw: Mapping[str, Any], where: str):
    """`cls(**raw)` with every key checked and every value coerced to its field's type."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    hints = field_hints(cls)
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise unknown_key(key, names, where)
        kwargs[key] = coerce(value, hints[key], f"{where}.{key}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


def with_overrides(obj: Any, overrides: Mapping[str, Any], where: str):
    """A copy of the dataclass `obj` with `{"field": value}` (or `{"where.field": value}`) applied;
    string values are read like command-line values."""
    prefix = where + "."
    raw = {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in overrides.items()}
    coerced = check_overrides(obj, raw, where)
    try:
        return dataclasses.replace(obj, **coerced)
    except TypeError as e:
        raise ConfigError(f"{where}: {e}") from None


# ---------------------------------------------------------------------------------------------
# Command lines and files.


def parse_value(text: str) -> Any:
    """A command-line value read as YAML (`200`, `1e-4`, `true`, `[a, b]`, `{k: v}`, `null`)."""
    if not text.strip():
        return ""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def parse_override(item: str) -> tuple[str, Any]:
    """`"train.steps=200"` -> `("train.steps", 200)`."""
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(f"override {item!r}: expected dotted.key=value (e.g. train.steps=200)")
    return key, parse_value(text)


def set_dotted(tree: dict, key: str, value: Any, sections: Sequence[str] | None = None) -> None:
    """`tree[a][b][c] = value` for `key = "a.b.c"`, creating mappings on the way."""
    parts = key.split(".")
    if sections is not None and parts[0] not in sections:
        raise unknown_key(parts[0], sections)
    node = tree
    for i, part in enumerate(parts[:-1]):
        nxt = node.get(part)
        if nxt is None:
            nxt = node[part] = {}
        if not isinstance(nxt, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section; cannot set {key}")
        node = nxt
    node[parts[-1]] = value


def deep_merge(base: Mapping, overlay: Mapping) -> dict:
    """`overlay` on top of `base`: mappings merge key by key, anything else is replaced."""
    out = dict(base)
    for key, value in overlay.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def load_yaml(path: str | Path, _chain: tuple[Path, ...] = ()) -> dict:
    """A YAML mapping; a top-level `base: other.yaml` (relative to this file) is loaded first and
    this file's keys merged over it, so a variant states only what it changes. `path` may be a
    `gs://` URL."""
    p = storage.as_path(path)
    if not p.is_file():
        what = f"{_chain[-1]}: base" if _chain else "--config"
        raise ConfigError(f"{what}: no such file {str(p)!r}")
    here = p if storage.is_url(p) else p.resolve()
    if here in _chain:
        raise ConfigError(f"{p}: base: cycle {' -> '.join(map(str, _chain + (here,)))}")
    try:
        raw = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{p}: the top level must be a mapping")
    base = raw.pop(BASE_KEY, None)
    if base is None:
        return raw
    if not isinstance(base, str):
        raise ConfigError(f"{p}: base: expected a file name, got {base!r}")
    return deep_merge(load_yaml(p.parent / base, _chain + (here,)), raw)


def plain(x: Any) -> Any:
    """Tuples -> lists and dataclasses -> dicts, recursively (for YAML and JSON)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        x = dataclasses.asdict(x)
    if isinstance(x, Mapping):
        return {str(k): plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [plain(v) for v in x]
    return x
