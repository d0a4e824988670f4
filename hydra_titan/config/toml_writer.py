"""A small TOML writer: only what a JobConfig holds (the standard library reads TOML, not writes it).

``save_config`` uses it to write the resolved config of a run, which ``--config``
loads back to an equal JobConfig.
"""

import datetime
import math
import re
from typing import Any

from hydra_titan.config.job_config import ConfigError

__all__ = ["to_toml", "toml_value"]

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def to_toml(data: dict[str, dict[str, Any]]) -> str:
    """Serialise section -> key -> value as TOML; tables become inline tables."""
    out: list[str] = []
    for section, values in data.items():
        out.append(f"[{_toml_key(section)}]")
        out.extend(f"{_toml_key(key)} = {toml_value(value)}" for key, value in values.items())
        out.append("")
    return "\n".join(out)


def _toml_key(key: Any) -> str:
    if not isinstance(key, str):
        raise ConfigError(f"cannot write a non-string TOML key: {key!r}")
    return key if _BARE_KEY.fullmatch(key) else _toml_string(key)


def _toml_string(text: str) -> str:
    chars = (
        _ESCAPES.get(c) or (f"\\u{ord(c):04x}" if ord(c) < 0x20 or ord(c) == 0x7F else c) for c in text
    )
    return '"' + "".join(chars) + '"'


def toml_value(value: Any) -> str:
    """One value as a TOML literal (also used to print defaults in ``--help``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    if isinstance(value, dict):
        if not value:
            return "{}"
        return "{ " + ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    raise ConfigError(f"cannot write {value!r} ({type(value).__name__}) as TOML")
