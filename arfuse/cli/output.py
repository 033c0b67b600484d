"""Where the commands write: results on stdout (rich tables sized to the terminal), progress on stderr.

A table goes to the terminal's width, to ``$COLUMNS`` when that is set (so ``COLUMNS=80 arfuse demo | less``
renders for 80 columns), else - output piped into a log - to a fixed width wide enough not to wrap. Progress
(:func:`status`, :func:`progress`) goes to stderr only, so ``arfuse doctor --json`` and redirected tables stay
clean.
"""
from __future__ import annotations

import os
import sys


def console(log_width: int = 120):
    """A rich Console for stdout (see the module docstring for its width)."""
    from rich.console import Console

    sized = sys.stdout.isatty() or os.environ.get("COLUMNS", "").strip().isdigit()
    return Console(width=None if sized else log_width)


def status(prog: str, message: str) -> None:
    """One progress line on stderr: ``prog: message``."""
    print(f"{prog}: {message}", file=sys.stderr, flush=True)


def progress(total: int, description: str, enabled: bool = True, unit: str = "step"):
    """A tqdm bar on stderr (disabled: a no-op bar with the same methods)."""
    from tqdm import tqdm

    return tqdm(total=total, desc=description, file=sys.stderr, unit=unit, dynamic_ncols=True, disable=not enabled,
                leave=True)


def each_point(bar, label: str, points, fn) -> dict:
    """``{str(point): fn(point)}``, one step of ``bar`` per point, described as ``label`` followed by the point."""
    out = {}
    for point in points:
        bar.set_description(f"{label}{point}")
        out[str(point)] = fn(point)
        bar.update(1)
    return out


def failure(error: BaseException, verbose: bool) -> str:
    """A failed launch in one line: the last line of the failed rank's traceback (all of it with ``arfuse -v``)."""
    text = str(error).strip()
    return text if verbose else (text.splitlines() or [type(error).__name__])[-1]
