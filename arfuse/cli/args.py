"""What every ``arfuse`` command shares on its command line: the parser, the usage error, and the argument types.

A mistake on the command line is one line on stderr, ``arfuse <command>: error: <the flag>: <what is wrong>``,
and exit code 2, before any rank is spawned: :class:`Parser` does it for what argparse checks, and
:class:`UsageError` (raised by a command's ``run``, caught by :func:`arfuse.cli.main.main`) for the checks that
need torch or the registered backends. Nothing here imports torch: ``arfuse --help`` imports every command.
"""
from __future__ import annotations

import argparse
import sys
from typing import Iterable, NoReturn, Sequence, Tuple

# Canonical dtype names (what the help shows) and the short spellings every command also accepts.
DTYPES = ("bfloat16", "float16", "float32")
DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "half": "float16", "fp32": "float32", "float": "float32"}
DTYPE_HELP = "bfloat16, float16 or float32 (bf16, fp16, fp32 also accepted)"


class UsageError(Exception):
    """A command-line mistake found after parsing; ``main`` prints it as one line and exits 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (no usage block), exit code 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog, message)


def fail(prog: str, message: str) -> NoReturn:
    """Print ``prog: error: message`` (one line) and exit 2."""
    line = " ".join(str(message).split())
    print(f"{prog}: error: {line} (see {prog} --help)", file=sys.stderr)
    raise SystemExit(2)


def positive_int(text: str) -> int:
    """An int >= 1 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An int >= 0 (argparse type)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 0, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def positive_float(text: str) -> float:
    """A finite float > 0 (argparse type), e.g. a timeout in seconds."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (0 < value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be finite and > 0, got {text}")
    return value


def int_list(text: str) -> Tuple[int, ...]:
    """``"1,2,4"`` -> (1, 2, 4) in the given order, duplicates dropped; every value an int >= 1 (argparse type)."""
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}")
    return tuple(dict.fromkeys(values))


def sorted_int_list(text: str) -> Tuple[int, ...]:
    """As :func:`int_list`, sorted ascending."""
    return tuple(sorted(int_list(text)))


def name_list(text: str) -> Tuple[str, ...]:
    """``"a, b,a"`` -> ("a", "b") (argparse type); at least one name."""
    values = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def dtype(text: str) -> str:
    """A dtype name or alias -> its canonical name (argparse type)."""
    name = DTYPE_ALIASES.get(text.strip().lower(), text.strip().lower())
    if name not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; choose from {DTYPE_HELP}")
    return name


def dtype_list(text: str) -> Tuple[str, ...]:
    """``"bf16,float32"`` -> ("bfloat16", "float32") (argparse type)."""
    return tuple(dict.fromkeys(dtype(n) for n in name_list(text)))


def add_hidden_alias(parser: argparse.ArgumentParser, dest: str, type_) -> None:
    """Accept ``--hidden-size`` as an undocumented spelling of ``--hidden`` (both store into ``dest``)."""
    parser.add_argument("--hidden-size", dest=dest, type=type_, default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def check_choices(flag: str, given: Iterable[str], choices: Sequence[str], also: Sequence[str] = ()) -> None:
    """UsageError naming ``flag`` and the valid ``choices`` unless every value of ``given`` is one of them (or
    of ``also``: accepted, not listed)."""
    bad = [g for g in given if g not in choices and g not in also]
    if bad:
        raise UsageError(f"{flag}: unknown {', '.join(map(repr, bad))}; choose from {', '.join(choices)}")


def backend_requests(listed_only: bool = True) -> Tuple[str, ...]:
    """What ``backend=`` accepts: ``auto``, every registered backend and its ``name/variant`` forms (imports
    arfuse). ``listed_only``: leave out the ``name/default`` spellings (accepted, but noise in a list)."""
    from arfuse.backends import base
    from arfuse.select import policy

    out = [policy.AUTO]
    for backend in base.registered():
        out.append(backend.name)
        out += [f"{backend.name}/{v}" for v in backend.variants if not (listed_only and v == "default")]
    return tuple(out)


def check_backends(flag: str, given: Iterable[str], extra: Sequence[str] = ()) -> None:
    """UsageError unless every value of ``given`` is a backend request (see :func:`backend_requests`) or one of
    ``extra`` (e.g. ``unfused``)."""
    check_choices(flag, given, tuple(extra) + backend_requests(), also=backend_requests(listed_only=False))


def check_writable(flag: str, path) -> None:
    """UsageError unless ``path`` (an output file, None: not asked for) can be written: its folder exists or can be
    created, and is writable. Checked before measuring, so a long run does not end in an unwritable path."""
    import os
    from pathlib import Path

    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise UsageError(f"{flag} {path}: is a folder, not a file")
    folder = target.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir() or not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: cannot write there ({folder} is not a writable folder)")


def cuda_device_count() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def resolve_device(requested: str) -> str:
    """``auto`` -> cuda when a GPU is visible, else cpu; ``cuda`` without a GPU is a UsageError."""
    count = cuda_device_count()
    if requested in (None, "auto"):
        return "cuda" if count else "cpu"
    if requested == "cuda" and not count:
        raise UsageError("--device cuda: no CUDA device is visible (choose --device cpu)")
    return requested


def check_ranks(flag: str, ranks: int, device: str) -> None:
    """On CUDA every rank needs its own GPU."""
    count = cuda_device_count() if device == "cuda" else 0
    if device == "cuda" and ranks > count:
        raise UsageError(f"{flag} {ranks}: needs {ranks} GPUs (one per rank), found {count}")
