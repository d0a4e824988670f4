"""Build a JobConfig from defaults, a TOML file and command-line overrides.

Precedence, lowest to highest: dataclass defaults, ``--config FILE`` (TOML;
a bare name such as ``1B.toml`` that is not a file is looked up in
``train_configs/``), then ``--section.key value`` / ``--section.key=value`` arguments in the order
given. Every key and value is checked against the schema in ``job_config.py``
before a run starts, so a typo fails in milliseconds with a message that names
the key and suggests the fix, instead of being ignored or failing hours later.

The resolved config can be written back as TOML (:func:`save_config`) and
re-loaded to an equal JobConfig, which makes every run reproducible from its
output folder.
"""

import dataclasses
import difflib
import logging
import os
import sys
import typing
from pathlib import Path
from typing import Any

try:  # Python >= 3.11
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

from hydra_titan.config.job_config import (
    ConfigError,
    JobConfig,
    allowed_values,
    check_type,
    field_types,
    section_types,
    type_name,
    validate_config,
)
from hydra_titan.config.toml_writer import to_toml, toml_value

__all__ = [
    "ConfigError",
    "config_to_dict",
    "format_help",
    "load_config",
    "parse_or_exit",
    "save_config",
]

logger = logging.getLogger(__name__)

_TRUE = frozenset({"true", "1"})
_FALSE = frozenset({"false", "0"})
_HELP_FLAGS = frozenset({"--help", "-h"})
_CMDLINE = "on the command line"

# Explicitly set values, section -> field -> typed value, before dataclasses are built.
RawConfig = dict[str, dict[str, Any]]


# ---------------------------------------------------------------------------
# Public entry points
# ---------------------------------------------------------------------------


def load_config(argv: list[str] | None = None) -> JobConfig:
    """Parse ``argv`` (default ``sys.argv[1:]``) into a validated JobConfig.

    ``--help``/``-h`` prints every section and key with its default and exits 0.
    Raises ConfigError for a missing or malformed file, an unknown key, or a
    value of the wrong type or outside its allowed set/range.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    if any(arg in _HELP_FLAGS for arg in args):
        sys.stdout.write(format_help())
        sys.exit(0)
    config_path, overrides = _split_args(args)

    raw: RawConfig = {}
    if config_path is not None:
        config_path = str(resolve_config_path(config_path))
        _merge_toml(raw, _read_toml(config_path), where=f"in {config_path}")
    for name, text in overrides:
        _apply_cli_override(raw, name, text)

    cfg = JobConfig(**{name: cls(**raw.get(name, {})) for name, cls in section_types().items()})
    validate_config(cfg)
    logger.info(
        "config: %s, %d command-line override(s)",
        config_path if config_path is not None else "defaults",
        len(overrides),
    )
    return cfg


def parse_or_exit(argv: list[str] | None = None) -> JobConfig:
    """load_config for ``main()``: a config mistake prints one line and exits 2.

    A traceback for a typo in a flag is noise; exit status 2 is the usual
    "bad command line" code, so launch scripts can tell it from a crash.
    """
    try:
        return load_config(argv)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)


def config_to_dict(cfg: JobConfig) -> dict[str, dict[str, Any]]:
    """The config as plain nested dicts (section -> key -> value), a deep copy."""
    return dataclasses.asdict(cfg)


def save_config(cfg: JobConfig, path: str | os.PathLike) -> Path:
    """Write the resolved config as TOML that ``--config`` loads back equal.

    Written to a temporary file and renamed, so a crash never leaves a
    half-written config next to a checkpoint.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = "# Resolved hydra_titan job config (defaults + file + command line).\n\n"
    text += to_toml(config_to_dict(cfg))
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_help() -> str:
    """Usage text listing every section and key with its type and default."""
    lines = [
        "usage: [--config FILE.toml] [--section.key VALUE | --section.key=VALUE | --bool.flag] ...",
        "",
        "Values are taken from the dataclass defaults, then the TOML file, then the command line.",
        "Lists: comma-separated or a TOML array. Tables: --model.overrides.KEY VALUE (a TOML literal).",
    ]
    for section_name, section_cls in section_types().items():
        lines += ["", f"[{section_name}]"]
        types = field_types(section_cls)
        defaults = section_cls()
        for f in dataclasses.fields(section_cls):
            tp = types[f.name]
            choices = allowed_values(tp)
            kind = "{" + "|".join(choices) + "}" if choices else type_name(tp)
            default = toml_value(getattr(defaults, f.name))
            extra = f" ({f.metadata['bounds'].describe()})" if f.metadata.get("bounds") else ""
            lines.append(f"  --{section_name}.{f.name} {kind} = {default}")
            lines.append(f"      {f.metadata.get('help', '')}{extra}")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------
# Reading sources
# ---------------------------------------------------------------------------


def _split_args(args: list[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """Split argv into the --config path and (dotted name, text or None) pairs.

    A flag not followed by a value (end of argv, or another ``--`` flag) gets
    None, which is legal only for booleans (``--compile.enable``).
    """
    config_path: str | None = None
    overrides: list[tuple[str, str | None]] = []
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or arg == "--":
            raise ConfigError(f"unexpected argument {arg!r} {_CMDLINE}; options look like --section.key value")
        name, sep, text = arg[2:].partition("=")
        value: str | None = text if sep else None
        if value is None and i + 1 < len(args) and not args[i + 1].startswith("--"):
            value = args[i + 1]
            i += 1
        i += 1
        if name == "config":
            if value is None:
                raise ConfigError("--config needs a path to a TOML file (or a name in train_configs/)")
            if config_path is not None:
                raise ConfigError(f"--config given twice ({config_path} and {value})")
            config_path = value
        else:
            overrides.append((name, value))
    return config_path, overrides


def config_dirs() -> list[Path]:
    """Where a bare config name is looked up: ./train_configs, then the checkout's train_configs."""
    dirs: list[Path] = []
    for folder in (Path.cwd() / "train_configs", Path(__file__).resolve().parents[2] / "train_configs"):
        if folder.is_dir() and all(folder.resolve() != d.resolve() for d in dirs):
            dirs.append(folder)
    return dirs


def resolve_config_path(path: str) -> Path:
    """`path` itself when it is a file; else a bare name (`1B.toml`, or `1B`) found in `config_dirs()`.

    Neither: a ConfigError that lists the configs there are.
    """
    file = Path(path)
    if file.is_file():
        return file
    dirs = config_dirs()
    if len(file.parts) == 1:  # a name, not a path
        for candidate in (d / name for d in dirs for name in (path, f"{path}.toml")):
            if candidate.is_file():
                return candidate
    names = sorted({p.name for d in dirs for p in d.glob("*.toml")})
    where = " or ".join(map(str, dirs)) or "train_configs/ (none found)"
    raise ConfigError(f"config file not found: {path} (neither a file nor a name in {where}); "
                      f"available configs: {', '.join(names) or 'none'}")


def _read_toml(path: str) -> dict[str, Any]:
    """Parse a TOML file; a missing or malformed file is a ConfigError naming it."""
    file = resolve_config_path(path)
    try:
        with file.open("rb") as fh:
            return tomllib.load(fh)
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(f"invalid TOML in {path}: {err}") from None


def _merge_toml(raw: RawConfig, data: dict[str, Any], where: str) -> None:
    """Check a parsed TOML document against the schema and merge it into raw."""
    sections = section_types()
    for section_name, table in data.items():
        if section_name not in sections:
            first_key = next(iter(table), None) if isinstance(table, dict) else None
            full_key = section_name if first_key is None else f"{section_name}.{first_key}"
            raise ConfigError(_unknown_section_message(section_name, full_key, where))
        if not isinstance(table, dict):
            raise ConfigError(f"{section_name} {where}: expected a [{section_name}] table, got {table!r}")
        types = field_types(sections[section_name])
        for key, value in table.items():
            full_key = f"{section_name}.{key}"
            if key not in types:
                raise ConfigError(_unknown_key_message(section_name, key, where))
            raw.setdefault(section_name, {})[key] = _coerce(full_key, value, types[key], where)


def _apply_cli_override(raw: RawConfig, name: str, text: str | None) -> None:
    """Apply one ``--section.key[.subkey...] value`` argument to raw."""
    section_name, _, rest = name.partition(".")
    key, _, subkey = rest.partition(".")
    sections = section_types()
    if not key:
        raise ConfigError(_bare_name_message(name))
    if section_name not in sections:
        raise ConfigError(_unknown_section_message(section_name, name, _CMDLINE))
    section_cls = sections[section_name]
    types = field_types(section_cls)
    if key not in types:
        raise ConfigError(_unknown_key_message(section_name, key, _CMDLINE))
    full_key = f"{section_name}.{key}"
    tp = types[key]
    is_table = typing.get_origin(tp) is dict
    if subkey and not is_table:
        raise ConfigError(f"--{name}: {full_key} is a {type_name(tp)}, not a table; did you mean --{full_key}?")
    if text is None:
        if tp is not bool:
            raise ConfigError(f"--{name} needs a value")
        text = "true"
    section = raw.setdefault(section_name, {})
    if subkey:
        current = section.get(key, getattr(section_cls(), key))
        section[key] = _set_dotted(name, current, subkey.split("."), _parse_literal(text))
    else:
        section[key] = _coerce(full_key, _parse_text(full_key, text, tp), tp, _CMDLINE)


def _set_dotted(name: str, table: dict[str, Any], path: list[str], value: Any) -> dict[str, Any]:
    """Copy of ``table`` with ``value`` stored at the dotted ``path``."""
    result = dict(table)
    head, *tail = path
    if not tail:
        result[head] = value
        return result
    child = result.get(head, {})
    if not isinstance(child, dict):
        raise ConfigError(f"--{name}: {head!r} already holds {child!r}, not a table")
    result[head] = _set_dotted(name, child, tail, value)
    return result


# ---------------------------------------------------------------------------
# Values
# ---------------------------------------------------------------------------


def _coerce(key: str, value: Any, tp: Any, where: str) -> Any:
    """Normalise a typed value to the field type, or raise naming key and source.

    Widens int to float for float fields (``lr = 1``) so a saved config
    re-loads equal, and accepts TOML booleans for "true"/"false" choice fields.
    """
    choices = allowed_values(tp)
    if choices is not None and isinstance(value, bool) and str(value).lower() in choices:
        value = str(value).lower()
    elif tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    elif typing.get_origin(tp) is list and isinstance(value, list):
        (item_tp,) = typing.get_args(tp)
        value = [_coerce(key, item, item_tp, where) for item in value]
    try:
        check_type(key, value, tp)
    except ConfigError as err:
        raise ConfigError(f"{err} ({where})") from None
    return value


def _parse_text(key: str, text: str, tp: Any) -> Any:
    """Parse command-line text into a value of field type ``tp``."""
    origin = typing.get_origin(tp)
    if tp is bool:
        lowered = text.strip().lower()
        if lowered in _TRUE | _FALSE:
            return lowered in _TRUE
        raise ConfigError(f"{key}: expected true/false/1/0, got {text!r} ({_CMDLINE})")
    if tp in (int, float):
        try:
            return tp(text)
        except ValueError:
            expected = "an integer" if tp is int else "a number"
            raise ConfigError(f"{key}: expected {expected}, got {text!r} ({_CMDLINE})") from None
    if origin is list:
        if text.strip().startswith("["):
            return _parse_literal(text)
        (item_tp,) = typing.get_args(tp)
        return [_parse_text(key, part.strip(), item_tp) for part in text.split(",") if part.strip()]
    if origin is dict:
        if not text.strip():
            return {}
        if text.strip().startswith("{"):
            return _parse_literal(text)
        hint = f"a TOML inline table like {{a = 1}}, or use --{key}.NAME VALUE"
        raise ConfigError(f"{key}: expected {hint} ({_CMDLINE})")
    if tp is Any:
        return _parse_literal(text)
    return text  # str and Literal[str, ...]


def _parse_literal(text: str) -> Any:
    """A TOML value literal (``0.5``, ``true``, ``[1, 2]``, ``{a = 1}``), else the raw string."""
    if "\n" in text or "\r" in text:
        return text
    try:
        parsed = tomllib.loads(f"v = {text}")
    except tomllib.TOMLDecodeError:
        return text
    return parsed["v"] if list(parsed) == ["v"] else text


# ---------------------------------------------------------------------------
# Error messages
# ---------------------------------------------------------------------------


def _unknown_section_message(section: str, full_key: str, where: str) -> str:
    names = list(section_types())
    close = difflib.get_close_matches(section, names, n=1)
    hint = f"did you mean '{close[0]}'?" if close else f"valid sections: {', '.join(names)}"
    context = f" (in '{full_key}')" if full_key != section else ""
    return f"unknown section '{section}'{context} {where}; {hint}"


def _unknown_key_message(section: str, key: str, where: str) -> str:
    sections = section_types()
    keys = list(field_types(sections[section]))
    close = difflib.get_close_matches(key, keys, n=1)
    elsewhere = [name for name, cls in sections.items() if key in field_types(cls)]
    if close:
        hint = f"did you mean '{section}.{close[0]}'?"
    elif elsewhere:
        hint = f"did you mean '{elsewhere[0]}.{key}'?"
    else:
        hint = f"valid keys of [{section}]: {', '.join(keys)}"
    return f"unknown key '{section}.{key}' {where}; {hint}"


def _bare_name_message(name: str) -> str:
    owners = [f"{section}.{name}" for section, cls in section_types().items() if name in field_types(cls)]
    hint = f"; did you mean --{owners[0]}?" if owners else ""
    return f"unknown option '--{name}' {_CMDLINE}: options are --section.key{hint}"
