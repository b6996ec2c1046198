"""The bundle stands alone: no file of it refers to notes outside the bundle."""

from __future__ import annotations

import re

from conftest import BUNDLE_ROOT

OUTSIDE = re.compile(r"\.\./shared|DESIGN\.md")


def test_no_project_file_points_outside_the_bundle():
    files = [p for folder in ("scripts", "configs", "tests", "docs") for p in (BUNDLE_ROOT / folder).rglob("*")]
    files.append(BUNDLE_ROOT / "README.md")
    texts = [
        p
        for p in files
        if p.is_file() and p.suffix in (".py", ".json", ".md", ".sh", ".txt") and p.name != "test_standalone.py"
    ]
    offenders = [str(p.relative_to(BUNDLE_ROOT)) for p in texts if OUTSIDE.search(p.read_text(errors="ignore"))]
    assert not offenders, offenders
