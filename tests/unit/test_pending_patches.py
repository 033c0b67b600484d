"""Patches waiting in ``bench/pending/`` for a GPU run (they change code whose verification evidence would go
stale) must keep applying to the tree, and each must be explained in ``bench/NOTES.md``."""
import pathlib
import shutil
import subprocess

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
PATCHES = sorted((REPO / "bench" / "pending").glob("*.patch"))


def test_every_pending_patch_is_explained_in_the_notes():
    notes = (REPO / "bench" / "NOTES.md").read_text()
    assert PATCHES, "bench/pending/ holds no patch: drop this test with the folder"
    for patch in PATCHES:
        assert f"bench/pending/{patch.name}" in notes, f"{patch.name} is not explained in bench/NOTES.md"


@pytest.mark.skipif(shutil.which("git") is None or not (REPO / ".git").exists(), reason="needs a git checkout")
@pytest.mark.parametrize("patch", PATCHES, ids=lambda p: p.name)
def test_pending_patch_still_applies(patch):
    out = subprocess.run(["git", "apply", "--check", str(patch)], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, f"{patch.name} no longer applies (refresh it): {out.stderr.strip()}"
