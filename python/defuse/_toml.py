"""A small TOML writer for job configs given as dicts (the standard library reads TOML
but does not write it). Tables, arrays of scalars, strings, integers, floats and
booleans: what a Defuse job file holds."""

from __future__ import annotations

import json
import math
from typing import Any, Mapping


def _scalar(v: Any, where: str) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        if math.isinf(v):
            return "inf" if v > 0 else "-inf"
        return repr(v)
    if isinstance(v, str):
        # a JSON string is a valid TOML basic string
        return json.dumps(v, ensure_ascii=False)
    if hasattr(v, "__fspath__"):
        return json.dumps(str(v), ensure_ascii=False)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x, where) for x in v) + "]"
    if isinstance(v, Mapping):
        inner = ", ".join(f"{_key(k)} = {_scalar(x, f'{where}.{k}')}" for k, x in v.items())
        return "{ " + inner + " }" if inner else "{}"
    raise TypeError(f"{where}: cannot write a {type(v).__name__} to TOML")


def _key(k: Any) -> str:
    k = str(k)
    if k and all(c.isascii() and (c.isalnum() or c in "-_") for c in k):
        return k
    return json.dumps(k)


def dumps(config: Mapping[str, Any]) -> str:
    """`config` as TOML text: top-level scalars first, then one table per nested dict
    (nested dicts below the first level become inline tables)."""
    lines = []
    tables = []
    for k, v in config.items():
        if isinstance(v, Mapping):
            tables.append((k, v))
        elif v is not None:
            lines.append(f"{_key(k)} = {_scalar(v, str(k))}")
    for name, table in tables:
        lines.append("")
        lines.append(f"[{_key(name)}]")
        for k, v in table.items():
            if v is not None:
                lines.append(f"{_key(k)} = {_scalar(v, f'{name}.{k}')}")
    return "\n".join(lines) + "\n"
