"""Versioned JSON table files (the selection table, the launch table): read with errors that name the file, the
header checked, entries keyed once, written atomically. ``error`` is the caller's ValueError subclass."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Type


def read(path, error: Type[ValueError]) -> Any:
    """The decoded JSON document at ``path``; ``error`` naming the file if it cannot be read or decoded."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror or e})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise error(f"{path}: not valid JSON ({e})") from None


def entries(data: Any, source: str, fmt: str, version: int, error: Type[ValueError]) -> List[Any]:
    """A document's raw ``entries`` list once its ``format`` and ``version`` are ``fmt`` and ``version``."""
    if not isinstance(data, dict):
        raise error(f"{source}: top level must be a JSON object")
    if data.get("format") != fmt:
        raise error(f"{source}: 'format' must be {fmt!r}, got {data.get('format')!r}")
    if data.get("version") != version:
        raise error(f"{source}: unsupported version {data.get('version')!r} (this arfuse reads {version})")
    raw = data.get("entries")
    if not isinstance(raw, list):
        raise error(f"{source}: 'entries' must be a list")
    return raw


def unique_keys(parsed: Sequence[Any], key: Callable[[Any], tuple], source: str, names: str,
                error: Type[ValueError]) -> None:
    """``error`` if two parsed entries share a key (``names``: the key's fields, for the message)."""
    seen: Dict[tuple, int] = {}
    for i, e in enumerate(parsed):
        k = key(e)
        if k in seen:
            raise error(f"{source}: entries[{i}] repeats the key of entries[{seen[k]}] ({names}) = {k}")
        seen[k] = i


def write(data: Any, path) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a reader never sees half a file). Not collective."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)
    return path
