"""The README is a door (the pitch, the quickstart, the map, links into docs/): every file it links
exists, and it stays short. mkdocs build --strict checks the links inside docs/; nothing else
checks the README's."""

from __future__ import annotations

import re

from tests.conftest import ROOT

LINK = re.compile(r"\]\(([^)#\s]+)(?:#[^)]*)?\)")


def test_every_file_the_readme_links_exists() -> None:
    targets = {target for target in LINK.findall((ROOT / "README.md").read_text()) if "://" not in target}
    assert {"docs/architecture.md", "docs/running.md"} <= targets
    missing = sorted(target for target in targets if not (ROOT / target).exists())
    assert missing == [], "README.md links files that do not exist"


def test_the_readme_stays_a_door() -> None:
    lines = (ROOT / "README.md").read_text().count("\n")
    assert lines <= 250, f"README.md has {lines} lines: move the manual's part into a page of docs/"
