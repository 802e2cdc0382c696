"""Dataclass configs, TOML presets and command-line overrides, validated with clear errors.

A preset is a TOML file in `configs/` (or any path) with one table per stage, e.g. `[sft]`, `[rm]`, `[ppo]`.
`build_config(SFTConfig, "demo", "sft", ["--lr", "3e-5"])` reads `configs/demo.toml`, takes its `[sft]`
table, applies the overrides and checks every field's type.
"""

from __future__ import annotations

import dataclasses
import os
import tomllib
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

from fromfeedback.files import UserError

PROJECT_ROOT = Path(__file__).resolve().parents[2]
PRESET_DIR = PROJECT_ROOT / "configs"

T = TypeVar("T")


def default_data_dir() -> str:
    """`$FROMFEEDBACK_DATA_DIR`, else `../shared/data` next to the project root when it exists."""
    env = os.environ.get("FROMFEEDBACK_DATA_DIR")
    if env:
        return env
    shared = PROJECT_ROOT.parent / "shared" / "data"
    return str(shared) if shared.exists() else "data"


def preset_path(preset: str) -> Path:
    path = Path(preset)
    if path.suffix == ".toml" and path.exists():
        return path
    path = PRESET_DIR / f"{preset}.toml"
    if not path.exists():
        names = sorted(p.stem for p in PRESET_DIR.glob("*.toml"))
        raise UserError(f"unknown preset {preset!r}: choose one of {names} or give a path to a .toml file")
    return path


def load_preset(preset: str) -> dict[str, Any]:
    path = preset_path(preset)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise UserError(f"{path}: invalid TOML: {e}") from None


def parse_overrides(args: list[str]) -> dict[str, str]:
    """`["--lr", "3e-5", "--max-steps=10", "batch_size=4"]` → {"lr": "3e-5", "max_steps": "10", "batch_size": "4"}."""
    overrides: dict[str, str] = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if arg.startswith("--"):
            key, eq, value = arg[2:].partition("=")
            if not eq:
                if i + 1 >= len(args):
                    raise UserError(f"option {arg} needs a value")
                value = args[i + 1]
                i += 1
        elif "=" in arg:
            key, _, value = arg.partition("=")
        else:
            raise UserError(f"unexpected argument {arg!r}: overrides look like --field value or field=value")
        overrides[key.replace("-", "_")] = value
        i += 1
    return overrides


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Checks (and for strings from the command line, parses) one field value against its type hint."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(annotation)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null") and type(None) in options):
            if type(None) in options:
                return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: invalid value {value!r}")
    if origin is typing.Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise UserError(f"{where}: {value!r} is not one of {list(choices)}")
        return value
    if origin in (list, tuple):
        (item_type, *_) = typing.get_args(annotation) or (Any,)
        if isinstance(value, str):
            value = [v for v in value.split(",") if v != ""]
        if not isinstance(value, (list, tuple)):
            raise UserError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, where) for v in value]
    if annotation is Any:
        return value
    if annotation is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "false", "0", "no"):
            return value.lower() in ("true", "1", "yes")
        raise UserError(f"{where}: expected true or false, got {value!r}")
    if annotation is int:
        if isinstance(value, bool):
            raise UserError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected an integer, got {value!r}")
    if annotation is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise UserError(f"{where}: expected a number, got {value!r}")
    if annotation is str:
        if isinstance(value, str):
            return value
        raise UserError(f"{where}: expected a string, got {value!r}")
    raise UserError(f"{where}: unsupported field type {annotation!r}")


def make_config(cls: type[T], values: dict[str, Any], where: str = "config") -> T:
    """Builds dataclass `cls` from `values`, rejecting unknown fields and values of the wrong type."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - fields)
    if unknown:
        raise UserError(f"{where}: unknown field(s) {unknown}; valid fields: {sorted(fields)}")
    kwargs = {name: _coerce(value, hints[name], f"{where}.{name}") for name, value in values.items()}
    config = cls(**kwargs)
    validate = getattr(config, "validate", None)
    if validate is not None:
        validate()
    return config


def build_config(cls: type[T], preset: str | None, section: str, overrides: list[str] | dict[str, Any] | None = None) -> T:
    """The `[section]` table of `preset` (or the dataclass defaults when preset is None), plus overrides."""
    values: dict[str, Any] = {}
    where = section
    if preset is not None:
        values.update(load_preset(preset).get(section, {}))
        where = f"{preset_path(preset).name} [{section}]"
    if isinstance(overrides, list):
        overrides = parse_overrides(overrides)
    values.update(overrides or {})
    return make_config(cls, values, where)


def config_to_dict(config: Any) -> dict[str, Any]:
    return dataclasses.asdict(config)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field (for `--help`), read from the source."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs: dict[str, str] = {}
    body = tree.body[0].body  # type: ignore[attr-defined]
    for node, following in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(following, ast.Expr) and isinstance(following.value, ast.Constant) and isinstance(following.value.value, str):
                docs[node.target.id] = " ".join(following.value.value.split())
    return docs


def describe_fields(cls: type) -> str:
    """One line per field: --name (type, default): doc."""
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not dataclasses.MISSING else "required"
        type_name = getattr(f.type, "__name__", str(f.type))
        lines.append(f"--{f.name.replace('_', '-')} ({type_name}, default {default!r}): {docs.get(f.name, '')}")
    return "\n\n".join(lines)
