"""The ``chronoq`` command: the entry point above ``scheduler`` and ``workers`` (the only code
that may import both). ``python -m chronoq`` is the same command.

``__version__`` is the package's version (pyproject.toml reads it) and the newest released
section of CHANGELOG.md (tests/unit/test_changelog.py checks that they agree)."""

__version__ = "0.3.0"
