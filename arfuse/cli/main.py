"""``arfuse <command>``: each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); every command module is imported to build the parser, so they import their
heavy dependencies inside their functions.

A mistake on the command line is one line on stderr and exit code 2 (:mod:`arfuse.cli.args`).
"""
from __future__ import annotations

import importlib
import logging
import sys
from typing import List, Optional

from arfuse.cli.args import Parser, UsageError, fail

COMMANDS = {
    "demo": ("arfuse.cli.demo", "run the fused op over a token sweep on all local ranks and check every result"),
    "doctor": ("arfuse.cli.doctor", "explain which backends can run here, and why not"),
    "bench": ("arfuse.cli.bench", "time every backend/variant and the peers side by side"),
    "tune": ("arfuse.cli.tune", "time the capable paths for one shape and write the selection table"),
    "e2e": ("arfuse.cli.e2e", "TTFT / per-token latency of a TP Llama-style model, fused vs unfused"),
}


def version() -> str:
    """arfuse's version: ``arfuse.__version__``, the one source pyproject.toml reads too."""
    import arfuse

    return arfuse.__version__


def build_parser() -> Parser:
    parser = Parser(prog="arfuse", description="Fused TP allreduce + residual + RMSNorm.")
    parser.add_argument("--version", action="version", version=f"arfuse {version()}")
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="log arfuse's decisions (INFO) and print a failed rank's whole traceback (default: "
                             "warnings and the traceback's last line); before the command")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if not args.command:
        fail("arfuse", f"a command is required: one of {', '.join(COMMANDS)}")
    if unknown:  # named against the command they were given to, whose --help lists what it takes
        fail(f"arfuse {args.command}", f"unrecognized arguments: {' '.join(unknown)}")
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    try:
        return int(importlib.import_module(args._module).run(args) or 0)
    except UsageError as e:
        fail(f"arfuse {args.command}", str(e))


if __name__ == "__main__":
    sys.exit(main())
