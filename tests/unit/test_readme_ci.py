"""CI runs what the README tells a newcomer to run, and nothing that would hide a missing step: ``.ci/run`` is a
fresh virtual environment plus exactly the README's install-and-demo and test commands."""
from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SETUP = ("set -euo pipefail", 'cd "$(dirname "$0")/.."', "python3 -m venv .venv", "source .venv/bin/activate")


def readme_commands():
    """The one-line ``bash`` blocks of the README's quick start (install + demo, then the tests)."""
    text = (ROOT / "README.md").read_text()
    quick = text.split("## Quick start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```bash\n(.*?)```", quick, re.S)
    return [line.strip() for block in blocks for line in block.splitlines() if line.strip()]


def ci_commands():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    return [line for line in lines if line and not line.startswith("#") and line not in SETUP]


def test_readme_quick_start_has_the_two_commands():
    commands = readme_commands()
    assert commands == ["pip install torch==2.13.0 && pip install -e . && arfuse demo",
                        "pip install -e '.[test]' && python -m pytest -q"], commands


def test_ci_runs_exactly_the_readme_commands():
    assert ci_commands() == readme_commands()


def test_ci_starts_from_a_fresh_virtual_environment():
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()]
    assert lines.index("python3 -m venv .venv") < lines.index("source .venv/bin/activate") < \
        lines.index(readme_commands()[0])
