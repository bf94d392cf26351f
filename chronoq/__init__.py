"""The ``chronoq`` command: the entry point above ``scheduler`` and ``workers`` (the only code
that may import both). ``python -m chronoq`` is the same command."""
