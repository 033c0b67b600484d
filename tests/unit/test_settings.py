"""The ``ARFUSE_*`` settings (arfuse/core/settings.py): one parser with one meaning of on and off, every setting
the package reads is in the table, the table is the README's list, and nothing but the parser reads them (the
kernels excepted: their code is fingerprinted for the GPU evidence, so their two settings stay parsed there, with
the same words)."""
from __future__ import annotations

import logging
import re
from pathlib import Path

import pytest

import arfuse
from arfuse.core import settings

PACKAGE = Path(arfuse.__file__).resolve().parent
README = PACKAGE.parent / "README.md"
READ_IN_KERNELS = {"ARFUSE_FAST_LAUNCH", "ARFUSE_LAUNCH_FILE"}  # arfuse/kernels/: unchanged, fingerprinted


@pytest.mark.parametrize("word, expected", [
    ("1", True), ("true", True), (" YES ", True), ("On", True),
    ("0", False), ("false", False), ("No", False), ("OFF ", False),
])
def test_switch_words_mean_the_same_for_every_switch(word, expected):
    for name, s in settings.SETTINGS.items():
        if s.kind == "switch":
            assert settings.switch(name, {name: word}) is expected, (name, word)


def test_unset_empty_and_unknown_words_mean_the_default_and_unknown_ones_are_logged(caplog):
    with caplog.at_level(logging.WARNING, logger="arfuse"):
        assert settings.switch("ARFUSE_FAST_PATH", {}) is True
        assert settings.switch("ARFUSE_FAST_PATH", {"ARFUSE_FAST_PATH": ""}) is True
        assert settings.switch("ARFUSE_STRICT", {"ARFUSE_STRICT": "2"}) is False
        assert settings.switch("ARFUSE_FAST_PATH", {"ARFUSE_FAST_PATH": "nope"}) is True
    assert "ARFUSE_STRICT='2'" in caplog.text and "ARFUSE_FAST_PATH='nope'" in caplog.text


def test_numbers_and_text():
    assert settings.number("ARFUSE_VOTE_TIMEOUT_S", {}) == 300.0
    assert settings.number("ARFUSE_TIMEOUT_S", {"ARFUSE_TIMEOUT_S": " 2.5"}) == 2.5
    with pytest.raises(ValueError, match="ARFUSE_TIMEOUT_S must be a number, got 'soon'"):
        settings.number("ARFUSE_TIMEOUT_S", {"ARFUSE_TIMEOUT_S": "soon"})
    assert settings.text("ARFUSE_HOSTNAME", {"ARFUSE_HOSTNAME": ""}) is None
    assert settings.text("ARFUSE_TUNE_FILE", {"ARFUSE_TUNE_FILE": "/t.json"}) == "/t.json"
    with pytest.raises(KeyError):
        settings.switch("ARFUSE_NOT_A_SETTING")


def _sources():
    return [(p, p.read_text()) for p in sorted(PACKAGE.rglob("*.py"))]


def test_every_setting_the_package_names_is_in_the_table_and_only_the_parser_reads_them():
    named = {m for _, text in _sources() for m in re.findall(r"ARFUSE_[A-Z0-9_]+", text)}
    assert named == set(settings.SETTINGS)
    readers = []
    for path, text in _sources():
        rel = path.relative_to(PACKAGE).as_posix()
        if rel == "core/settings.py":
            continue
        for line in text.splitlines():
            if re.search(r"os\.environ\b.*ARFUSE_|getenv\(", line) and not rel.startswith("kernels/"):
                readers.append(f"{rel}: {line.strip()}")
    assert not readers, readers


def test_the_kernels_parse_their_switch_with_the_same_words():
    text = (PACKAGE / "kernels" / "_launch.py").read_text()
    assert '"ARFUSE_FAST_LAUNCH", "1").strip().lower() not in ("0", "false", "no", "off")' in text
    assert settings.FALSE_WORDS == ("0", "false", "no", "off")


def test_the_readme_lists_every_setting():
    assert settings.readme_lines() in README.read_text()
