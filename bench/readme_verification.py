"""Rewrite the verification table in README.md from the record and the code here now
(``arfuse.backends.verification.table``). Usage: python bench/readme_verification.py"""
import re
import sys
from pathlib import Path

from arfuse.backends import verification

README = Path(__file__).resolve().parents[1] / "README.md"


def main() -> int:
    text = README.read_text()
    head = "| path | verified now | evidence on this code | stale evidence (code changed since) |"
    pattern = re.escape(head) + r"\n(?:\|.*\n)*"
    if not re.search(pattern, text):
        print("readme_verification: README.md has no verification table", file=sys.stderr)
        return 1
    README.write_text(re.sub(pattern, lambda m: verification.table() + "\n", text, count=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
