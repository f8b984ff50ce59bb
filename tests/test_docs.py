"""The README and the docs pages: their code runs, their links resolve, their code fits the page."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted((ROOT / "docs" / "pages").glob("*.md"))
FENCE = re.compile(r"^( *)```")
LINK = re.compile(r"\]\(([^)\s]+)\)")
WIDEST_CODE_LINE = 80
"""Characters of code a docs page shows at 1280 px before the line is cut off (about 82 in Material)."""


def code_block(path: Path, heading: str) -> str:
    """The first fenced python block after ``heading`` in ``path``."""
    text = path.read_text(encoding="utf-8")
    after = text[text.index(f"\n{heading}\n") :]
    match = re.search(r"```python\n(.*?)```", after, re.S)
    assert match is not None, f"no python block after {heading!r} in {path.name}"
    return match.group(1)


@pytest.mark.timeout(60)
@pytest.mark.parametrize(
    ("path", "heading"),
    [(ROOT / "README.md", "## Quick start"), (ROOT / "docs" / "pages" / "index.md", "## A minimal example")],
)
def test_the_first_example_a_reader_sees_runs(path: Path, heading: str) -> None:
    done = subprocess.run(
        [sys.executable, "-c", code_block(path, heading)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert "WHAT IS FLYTE?" in done.stdout


@pytest.mark.parametrize("path", [ROOT / "README.md", *PAGES], ids=lambda p: p.name)
def test_relative_links_point_to_files_that_exist(path: Path) -> None:
    for target in LINK.findall(path.read_text(encoding="utf-8")):
        if target.startswith(("http://", "https://", "mailto:", "#")):
            continue
        assert (path.parent / target.split("#")[0]).exists(), f"{path.name} links to missing {target}"


@pytest.mark.parametrize("path", PAGES, ids=lambda p: p.name)
def test_code_blocks_fit_the_page(path: Path) -> None:
    inside = False
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        fence = FENCE.match(line)
        if fence:
            inside, indent = not inside, len(fence.group(1))
            continue
        if inside:
            assert len(line[indent:].rstrip()) <= WIDEST_CODE_LINE, f"{path.name}:{number} is cut off on the page"
