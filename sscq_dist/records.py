"""One typed-record loader: a JSON/YAML mapping -> a dataclass, or one error line naming the key.

Used by the config loader and every on-disk record the package reads (index part records,
snapshots), so every such error reads the same: "<where> key 'a.b': <problem>". Field types understood: bool, int, float, str, dict, Any, Optional[X], list[X]
and nested dataclasses. Unknown keys are refused when `strict` (a typo must not be ignored)
and tolerated otherwise (a newer writer may add fields an older reader does not know).

Each dataclass gets its field checkers built once (`_checkers`): a snapshot of a 100k-shard
version holds 100k nested records, so per-value type introspection would dominate its read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")
Error = Callable[[str], Exception]
# checker(value, key, error, strict) -> the checked (and, for float, converted) value
Checker = Callable[[Any, str, Error, bool], Any]

_LEAF = {bool: (bool,), int: (int,), float: (int, float), str: (str,), dict: (dict,)}
_EXPECTED = {bool: "true/false", int: "an integer", float: "a number", str: "a string", dict: "a mapping"}


def _leaf_checker(tp: Any) -> Checker:
    if tp is Any:
        return lambda v, key, error, strict: v
    if tp not in _LEAF:
        raise AssertionError(f"unhandled record field type {tp}")
    ok_types, expected = _LEAF[tp], _EXPECTED[tp]
    no_bool = tp is not bool

    def check(v, key, error, strict):
        if not isinstance(v, ok_types) or (no_bool and isinstance(v, bool)):
            raise error(f"key '{key}': expected {expected}, got {type(v).__name__} {v!r:.80}")
        return float(v) if tp is float else v
    return check


def _checker(tp: Any) -> Checker:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        inner_check = _checker(inner)
        return lambda v, key, error, strict: None if v is None else inner_check(v, key, error, strict)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        item_check = _checker(item_tp)

        def check_list(v, key, error, strict):
            if not isinstance(v, list):
                raise error(f"key '{key}': expected a list, got {type(v).__name__}")
            return [item_check(x, f"{key}[{i}]", error, strict) for i, x in enumerate(v)]
        return check_list
    if dataclasses.is_dataclass(tp):
        return lambda v, key, error, strict: build_record(tp, v, error, key + ".", strict)
    return _leaf_checker(tp)


@functools.lru_cache(maxsize=None)
def _checkers(cls: type) -> tuple[tuple[str, Checker, bool], ...]:
    """(name, checker, required) per init field of a dataclass, built once per class."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if f.init:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            out.append((f.name, _checker(hints[f.name]), required))
    return tuple(out)


def build_record(cls: type[T], data: Any, error: Error, prefix: str = "", strict: bool = False) -> T:
    """Check `data` against dataclass `cls` field by field; raise error("key 'a.b': ...") on the first problem.

    error: turns the message into the caller's exception type (ConfigError, IndexError_, ...).
    Fields with a default may be missing; fields without one are required.
    """
    if not isinstance(data, dict):
        raise error(f"key '{prefix.rstrip('.') or '<root>'}': expected a mapping, got {type(data).__name__} {data!r:.80}")
    fields = _checkers(cls)
    if strict:
        names = {n for n, _, _ in fields}
        for k in data:
            if k not in names:
                raise error(f"key '{prefix}{k}': unknown key (known: {', '.join(sorted(names))})")
    kwargs = {}
    for name, check, required in fields:
        if name in data:
            kwargs[name] = check(data[name], prefix + name, error, strict)
        elif required:
            raise error(f"key '{prefix}{name}': missing")
    return cls(**kwargs)


def parse_json_record(cls: type[T], text: str | bytes, source: str, error: Error,
                      schema_version: int | None = None) -> T:
    """JSON text -> dataclass; every error is one line starting with `source`."""
    def err(msg: str) -> Exception:
        return error(f"{source}: {msg}")

    try:
        data = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        raise err(f"not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise err("expected a JSON object at the top level")
    if schema_version is not None and data.get("schema_version") != schema_version:
        raise err(f"key 'schema_version': {data.get('schema_version')!r}, this reader understands {schema_version}")
    data.pop("schema_version", None)
    return build_record(cls, data, err)


_SCALARS = (str, int, float, bool, type(None))


def to_plain(obj: Any) -> Any:
    """Dataclass (nested, in lists) -> plain dicts and lists; far cheaper than dataclasses.asdict."""
    tp = type(obj)
    if tp in _SCALARS or tp is dict:
        return obj
    if tp is list:
        return [to_plain(x) for x in obj]
    if "__dataclass_fields__" in tp.__dict__ or dataclasses.is_dataclass(tp):
        return {name: to_plain(getattr(obj, name)) for name, _, _ in _checkers(tp)}
    return obj


def record_json(obj: Any, schema_version: int | None = None, indent: int | None = None) -> bytes:
    """Dataclass -> JSON bytes (schema_version first when given)."""
    data = to_plain(obj)
    if schema_version is not None:
        data = {"schema_version": schema_version, **data}
    return json.dumps(data, indent=indent, separators=None if indent else (",", ":")).encode()
