"""Every name the package uses is defined: pyflakes over ``arfuse/`` and ``bench/`` finds nothing but the
deliberate re-exports and registration imports. Code that only runs on a GPU (a symmetric-memory workspace, a
device-side launcher) cannot be executed in CI, so this is what catches a name used there and defined nowhere."""
from pathlib import Path

import pytest

api = pytest.importorskip("pyflakes.api")
reporter_mod = pytest.importorskip("pyflakes.reporter")

ROOT = Path(__file__).resolve().parents[2]
ALLOWED = ("imported but unused",)  # registration imports and re-exports, marked noqa in the source


class _Collect:
    def __init__(self):
        self.problems = []

    def unexpectedError(self, filename, msg):
        self.problems.append(f"{filename}: {msg}")

    def syntaxError(self, filename, msg, lineno, offset, text):
        self.problems.append(f"{filename}:{lineno}: {msg}")

    def flake(self, message):
        text = str(message)
        if not any(a in text for a in ALLOWED):
            self.problems.append(text)


@pytest.mark.parametrize("folder", ["arfuse", "bench"])
def test_no_undefined_or_shadowed_names(folder):
    collect = _Collect()
    for path in sorted((ROOT / folder).rglob("*.py")):
        api.checkPath(str(path), collect)
    assert not collect.problems, "\n".join(collect.problems)
