"""``arfuse <command>``: each command lives in its own module exposing ``add_arguments(parser)`` and
``run(args) -> int`` (the exit code); modules are imported only when their command runs."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import List, Optional

COMMANDS = {
    "demo": ("arfuse.cli.demo", "run the fused op over a token sweep on all local ranks and check every result"),
    "doctor": ("arfuse.cli.doctor", "explain which backends can run here, and why not"),
    "bench": ("arfuse.cli.bench", "time every backend/variant and the peers side by side"),
    "tune": ("arfuse.cli.tune", "time the capable paths for one shape and write the selection table"),
    "e2e": ("arfuse.cli.e2e", "TTFT / per-token latency of a TP Llama-style model, fused vs unfused"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="arfuse", description="Fused TP allreduce + residual + RMSNorm.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log arfuse's decisions (INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module, helptext) in COMMANDS.items():
        p = sub.add_parser(name, help=helptext, description=helptext)
        p.set_defaults(_module=module)
        importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(name)s: %(message)s")
    if not args.command:
        parser.print_help()
        return 2
    return int(importlib.import_module(args._module).run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
