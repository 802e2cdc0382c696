"""Field checks for the JSON formats: every failure names the file, the line and the field."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fromfeedback.files import UserError

_TYPE_NAMES = {str: "a string", int: "an integer", float: "a number", bool: "true/false", dict: "an object", list: "a list"}


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], path: str | Path, line: int, *, optional: bool = False) -> Any:
    """Returns obj[name] after checking its type; `name` may be dotted ("info.post") to reach into objects."""
    value: Any = obj
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            if optional:
                return None
            raise UserError(f"{path}:{line}: missing field '{name}'")
        value = value[part]
    if value is None and optional:
        return None
    kinds = kind if isinstance(kind, tuple) else (kind,)
    # bool is an int in Python; a JSON true is never a valid integer here.
    if isinstance(value, bool) and bool not in kinds:
        ok = False
    elif float in kinds and isinstance(value, int):
        ok = True
    else:
        ok = isinstance(value, kinds)
    if not ok:
        expected = " or ".join(_TYPE_NAMES.get(k, k.__name__) for k in kinds)
        raise UserError(f"{path}:{line}: field '{name}' must be {expected}, got {type(value).__name__} {str(value)[:40]!r}")
    return value


def check(condition: bool, path: str | Path, line: int, name: str, message: str) -> None:
    if not condition:
        raise UserError(f"{path}:{line}: field '{name}' {message}")
