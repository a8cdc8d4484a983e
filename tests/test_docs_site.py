"""The documentation site builds with mkdocs in strict mode: a broken link, a missing anchor or a
page left out of the navigation fails here, not in a reader's browser."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_docs_site_builds_strictly_with_every_page_in_the_navigation(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    pages = {p.stem for p in (ROOT / "docs").glob("*.md")}
    built = {p.parent.name if p.parent != tmp_path / "site" else "index" for p in (tmp_path / "site").rglob("index.html")}
    assert pages <= built | {"index"}, pages - built


def test_a_broken_link_fails_the_build(tmp_path):
    """The check itself works: the same configuration on a copy with one bad link fails."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(ROOT / "docs", copy / "docs")
    shutil.copy(ROOT / "mkdocs.yml", copy / "mkdocs.yml")
    page = copy / "docs" / "ablations.md"
    page.write_text(page.read_text() + "\nSee [nowhere](no-such-page.md).\n")
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=copy, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode != 0 and "no-such-page.md" in result.stdout + result.stderr
