"""One typed-record loader: a JSON/YAML mapping -> a dataclass, or one error line naming the key.

Used by every on-disk record the package reads (index part records, snapshots, legacy
manifests). Field types understood: bool, int, float, str, dict, Optional[X], list[X] and
nested dataclasses. Unknown keys are refused when `strict` (a typo must not be ignored) and
tolerated otherwise (a newer writer may add fields an older reader does not know).
"""

from __future__ import annotations

import dataclasses
import json
import typing
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", str(tp))


def _leaf(value: Any, tp: Any) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if tp is str:
        return isinstance(value, str)
    if tp is dict:
        return isinstance(value, dict)
    if tp is Any:
        return True
    raise AssertionError(f"unhandled record field type {tp}")


def build_record(cls: type[T], data: Any, error: Callable[[str], Exception], prefix: str = "",
                 strict: bool = False) -> T:
    """Check `data` against dataclass `cls` field by field; raise error("key 'a.b' ...") on the first problem.

    error: turns the message into the caller's exception type (ConfigError, IndexError_, ...).
    Fields with a default may be missing; fields without one are required.
    """
    if not isinstance(data, dict):
        raise error(f"key '{prefix.rstrip('.') or '<root>'}' must be an object, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    if strict:
        for k in data:
            if k not in fields:
                raise error(f"unknown key '{prefix}{k}' (known: {', '.join(sorted(fields))})")
    kwargs = {}
    for name, f in fields.items():
        key = f"{prefix}{name}"
        if name not in data:
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                raise error(f"missing key '{key}'")
            continue
        kwargs[name] = _value(data[name], hints[name], key, error, strict)
    return cls(**kwargs)


def _value(value: Any, tp: Any, key: str, error: Callable[[str], Exception], strict: bool) -> Any:
    origin = typing.get_origin(tp)
    if origin is typing.Union:  # Optional[X]
        if value is None:
            return None
        (inner,) = [a for a in typing.get_args(tp) if a is not type(None)]
        return _value(value, inner, key, error, strict)
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            raise error(f"key '{key}' must be a list, got {type(value).__name__}")
        return [_value(v, item_tp, f"{key}[{i}]", error, strict) for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        return build_record(tp, value, error, key + ".", strict)
    if not _leaf(value, tp):
        raise error(f"key '{key}' must be {_type_name(tp)}, got {type(value).__name__} {value!r:.80}")
    return float(value) if tp is float else value


def parse_json_record(cls: type[T], text: str | bytes, source: str, error: Callable[[str], Exception],
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
        raise err(f"key 'schema_version' is {data.get('schema_version')!r}, this reader understands {schema_version}")
    data = {k: v for k, v in data.items() if k != "schema_version"}
    return build_record(cls, data, err)


def record_json(obj: Any, schema_version: int | None = None, indent: int | None = None) -> bytes:
    """Dataclass -> JSON bytes (schema_version first when given)."""
    data = dataclasses.asdict(obj)
    if schema_version is not None:
        data = {"schema_version": schema_version, **data}
    return json.dumps(data, indent=indent, separators=None if indent else (",", ":")).encode()
