"""Helpers for arfuse's reliability tests: fault injection (:mod:`arfuse.testing.faults`) and the figures each
reliability test records.

Figures are one JSON object per test, written under ``ARFUSE_RESULTS_DIR`` when it is set (nothing otherwise),
named ``reliability_<test>.json`` (the fuzzing test's is ``fuzz_summary.json``); ``bench/reliability_summary.py``
adds them up for the README. Counted keys (:data:`COUNTS`) are summed across files; ``worst_error`` is the largest
relative error against the float64 reference of any checked output.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, Optional

from arfuse.core import settings

RESULTS_ENV = "ARFUSE_RESULTS_DIR"
PREFIX = "reliability_"
COUNTS = ("cases", "replays", "faults_injected", "faults_survived", "hangs", "wrong_results")


def save_figures(test: str, figures: Dict[str, Any], details: Optional[Any] = None,
                 filename: Optional[str] = None) -> Optional[Path]:
    """Write ``{"test": test, **figures, "details": details}`` to ``$ARFUSE_RESULTS_DIR/reliability_<test>.json``
    (or ``filename``).

    ``figures`` must hold every key of :data:`COUNTS` (ints) and ``worst_error`` (a float or None). Returns the
    path written, or None when the variable is unset.
    """
    missing = [k for k in COUNTS + ("worst_error",) if k not in figures]
    if missing:
        raise ValueError(f"save_figures: figures lack {missing}")
    return save_results(filename or f"{PREFIX}{test}.json", {"test": test, **figures, "details": details})


def save_results(filename: str, payload: Any) -> Optional[Path]:
    """Write ``payload`` as JSON to ``$ARFUSE_RESULTS_DIR/filename``; returns the path, or None when the variable
    is unset."""
    out_dir = settings.text(RESULTS_ENV)
    if not out_dir:
        return None
    path = Path(out_dir) / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=1, default=str))
    return path
