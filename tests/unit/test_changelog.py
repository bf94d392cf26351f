"""CHANGELOG.md stays a changelog people read (Keep a Changelog 1.1.0): only its headings, a
section per version in descending order with an ISO date, the newest released one equal to
``chronoq.__version__`` (the package's version, which ``chronoq --version`` prints), and no entry
longer than two lines of 100 characters. The checker is also run on broken samples, so it is
shown to fail where it should."""

from __future__ import annotations

import datetime
import itertools
import re
import tomllib

import pytest

import chronoq
from chronoq.cli import parser
from tests.conftest import ROOT

MAX_LINES, MAX_WIDTH = 2, 100
KINDS = ("Added", "Changed", "Deprecated", "Removed", "Fixed", "Security")
VERSION = re.compile(r"## \[(\d+)\.(\d+)\.(\d+)\] - (\d{4}-\d{2}-\d{2})")


def dotted(version: tuple[int, int, int]) -> str:
    return ".".join(map(str, version))


def changelog_problems(text: str, version: str) -> list[str]:
    """What keeps ``text`` from being a Keep a Changelog file whose newest release is ``version``."""
    problems: list[str] = []
    releases: list[tuple[tuple[int, int, int], datetime.date]] = []
    entry: list[str] = []

    def end_entry() -> None:
        if len(entry) > MAX_LINES:
            problems.append(f"entry of {len(entry)} lines (at most {MAX_LINES}): {entry[0][:60]}")
        entry.clear()

    lines = text.splitlines()
    if not lines or lines[0] != "# Changelog":
        problems.append("the first line is not '# Changelog'")
    for number, line in enumerate(lines[1:], start=2):
        if len(line) > MAX_WIDTH:
            problems.append(f"line {number} has {len(line)} characters (at most {MAX_WIDTH})")
        if line.startswith("  ") and entry:
            entry.append(line)
            continue
        end_entry()
        if line.startswith("- "):
            entry.append(line)
        elif line.startswith("#"):
            match = VERSION.fullmatch(line)
            if match:
                try:
                    date = datetime.date.fromisoformat(match[4])
                except ValueError:
                    problems.append(f"line {number}: {match[4]} is not a date")
                    continue
                releases.append(((int(match[1]), int(match[2]), int(match[3])), date))
            elif line == "## [Unreleased]":
                if releases:
                    problems.append(f"line {number}: [Unreleased] comes after a release")
            elif not (line.startswith("### ") and line[4:] in KINDS):
                problems.append(f"line {number}: {line!r} is not a Keep a Changelog heading")
    end_entry()
    if not releases:
        return [*problems, "no released version"]
    if dotted(releases[0][0]) != version:
        problems.append(f"the newest release is {dotted(releases[0][0])}, chronoq.__version__ is {version}")
    for (newer, newer_date), (older, older_date) in itertools.pairwise(releases):
        if not (newer > older and newer_date >= older_date):
            problems.append(f"{dotted(newer)} ({newer_date}) is not after {dotted(older)} ({older_date})")
    return problems


def test_the_changelog_is_keep_a_changelog_and_its_newest_release_is_the_version() -> None:
    assert changelog_problems((ROOT / "CHANGELOG.md").read_text(), chronoq.__version__) == []


GOOD = """# Changelog

## [Unreleased]

## [0.2.0] - 2026-12-01

### Added

- One line.
- Two lines,
  the second indented.

## [0.1.0] - 2026-11-21

### Fixed

- Something.
"""


@pytest.mark.parametrize(
    ("text", "version", "problem"),
    [
        (GOOD, "0.2.0", None),
        (GOOD, "0.3.0", "the newest release is 0.2.0, chronoq.__version__ is 0.3.0"),
        (GOOD.replace("- One line.", "- One\n  line\n  too many."), "0.2.0", "entry of 3 lines"),
        (GOOD.replace("- One line.", "- " + "x" * 99), "0.2.0", "line 9 has 101 characters"),
        (GOOD.replace("### Fixed", "### Fixes"), "0.2.0", "'### Fixes' is not a Keep a Changelog heading"),
        (GOOD.replace("[0.1.0]", "[0.3.0]"), "0.2.0", "0.2.0 (2026-12-01) is not after 0.3.0"),
        (GOOD.replace("2026-11-21", "2026-12-02"), "0.2.0", "0.2.0 (2026-12-01) is not after 0.1.0 (2026-12-02)"),
        (GOOD.replace("2026-11-21", "2026-13-01"), "0.2.0", "2026-13-01 is not a date"),
        (GOOD.replace("[0.1.0] - 2026-11-21", "0.1.0 (2026-11-21)"), "0.2.0", "is not a Keep a Changelog heading"),
    ],
    ids=[
        "good",
        "other-version",
        "three-lines",
        "wide-line",
        "other-heading",
        "ascending",
        "older-date",
        "no-date",
        "unbracketed",
    ],
)
def test_the_check_fails_where_it_should(text: str, version: str, problem: str | None) -> None:
    problems = changelog_problems(text, version)
    if problem is None:
        assert problems == []
    else:
        assert len(problems) == 1 and problem in problems[0], problems


def test_the_package_version_is_chronoq_version(capsys: pytest.CaptureFixture[str]) -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "version" not in project["project"] and "version" in project["project"]["dynamic"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "chronoq.__version__"}
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["--version"])
    assert exited.value.code == 0
    assert capsys.readouterr().out == f"chronoq {chronoq.__version__}\n"
