"""A small strict validator for TOML and JSON documents.

Profiles, the agent's config, manifests and wire messages are all checked with it, so a typo
in a key is an error naming the file and the field (with the closest known key), never a
silently applied default. Standard library only: the protocol module runs on devices.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .errors import SchemaError

Check = Callable[[Any], "str | None"]


@dataclass(frozen=True)
class Field:
    """One key of a table: its type, whether it is required, and optional constraints."""

    types: type | tuple[type, ...]
    required: bool = True
    default: Any = None
    choices: tuple[Any, ...] | None = None
    check: Check | None = None
    table: "Mapping[str, Field] | None" = None
    items: "Field | None" = None
    open_table: bool = False  # a free-form table (for example delegate options)
    doc: str = ""


def _type_name(types: type | tuple[type, ...]) -> str:
    names = {bool: "a boolean", int: "an integer", float: "a number", str: "a string",
             list: "a list", dict: "a table"}
    if isinstance(types, tuple):
        return " or ".join(names.get(t, t.__name__) for t in types)
    return names.get(types, types.__name__)


def _is_instance(value: Any, types: type | tuple[type, ...]) -> bool:
    wanted = types if isinstance(types, tuple) else (types,)
    if isinstance(value, bool) and bool not in wanted:
        return False  # True is an int in Python, never in a config file
    if float in wanted and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, wanted)


def validate(doc: Any, schema: Mapping[str, Field], source: str, prefix: str = "") -> dict[str, Any]:
    """Return ``doc`` with defaults filled in, or raise :class:`SchemaError` naming the field."""
    if not isinstance(doc, Mapping):
        raise SchemaError(source, prefix, f"expected a table, got {type(doc).__name__}")
    for key in doc:
        if key not in schema:
            close = difflib.get_close_matches(str(key), list(schema), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else f" (known keys: {', '.join(sorted(schema))})"
            raise SchemaError(source, _join(prefix, str(key)), f"unknown key{hint}")
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        path = _join(prefix, key)
        if key not in doc:
            if spec.required:
                raise SchemaError(source, path, "required key is missing")
            out[key] = _copy_default(spec.default)
            continue
        out[key] = _validate_value(doc[key], spec, source, path)
    return out


def _validate_value(value: Any, spec: Field, source: str, path: str) -> Any:
    if not _is_instance(value, spec.types):
        raise SchemaError(source, path, f"expected {_type_name(spec.types)}, got {value!r}")
    if spec.choices is not None and value not in spec.choices:
        options = ", ".join(repr(c) for c in spec.choices)
        raise SchemaError(source, path, f"{value!r} is not one of {options}")
    if spec.table is not None and isinstance(value, Mapping):
        value = validate(value, spec.table, source, path)
    elif isinstance(value, Mapping):
        value = dict(value)
    if spec.items is not None and isinstance(value, list):
        value = [_validate_value(v, spec.items, source, f"{path}[{i}]") for i, v in enumerate(value)]
    if spec.check is not None:
        problem = spec.check(value)
        if problem:
            raise SchemaError(source, path, problem)
    return value


def _copy_default(default: Any) -> Any:
    if isinstance(default, (list, dict)):
        return type(default)(default)
    return default


def _join(prefix: str, key: str) -> str:
    return f"{prefix}.{key}" if prefix else key


# Reusable checks -------------------------------------------------------------------------

def positive(value: float) -> str | None:
    return None if value > 0 else f"must be greater than 0, got {value}"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"must be 0 or more, got {value}"


def non_empty(value: Any) -> str | None:
    return None if value else "must not be empty"


def one_of_each(value: list[Any]) -> str | None:
    seen = [v for i, v in enumerate(value) if v in value[:i]]
    return f"lists {seen[0]!r} twice" if seen else None


__all__ = ["Field", "validate", "positive", "non_negative", "non_empty", "one_of_each"]
