"""Verification records for tests: evidence for chosen paths on the code here now (or on other code), installed in
place of the shipped record."""
from __future__ import annotations

import contextlib
from typing import Iterable, Iterator, Tuple

from arfuse.backends import base, verification


def entry(path: str, features: Iterable[str], kind: str = "virtual_ranks", stale: bool = False, ok: bool = True,
          date: str = "2026-12-07", world_sizes=(1, 2, 4, 8), **extra) -> dict:
    """An evidence entry for ``path`` (``backend`` or ``backend/variant``) on the current code (``stale``: on
    other code), at ``world_sizes``, with the Triton installed here; ``extra``: more fields (``dtypes``, ``any_world_size``, ...)."""
    name, _, variant = path.partition("/")
    sources = verification.fingerprint(base.get(name).verified_sources(variant or "default"))[0]
    return dict(dict(kind=kind, date=date, device="test", torch="x", triton=verification.triton_version(),
                     world_sizes=list(world_sizes),
                     commit="0" * 40, sources="sha256:other" if stale else sources, features=sorted(features),
                     cases=1, ok=ok, refused={}, results="tests"), **extra)


@contextlib.contextmanager
def installed(monkeypatch, tmp_path, *entries: Tuple[str, dict]) -> Iterator[dict]:
    """A record holding ``entries`` ((path, entry) pairs) in place of the shipped one."""
    record = {"format": 1, "paths": {}, "components": {}}
    for path, e in entries:
        record["paths"].setdefault(path, []).append(e)
    file = tmp_path / "verified.json"
    verification.save(record, file)
    monkeypatch.setattr(verification, "RECORD_PATH", file)
    yield record
