"""The package version: one place, read by pyproject.toml and compiled into
the extension by _build.py (the import refuses an extension built for another)."""

__version__ = "0.1.0"
