"""The running robustkit's version, from the installed distribution's metadata (pyproject.toml).

A module of its own, standard library only, so every layer can name the version without
importing the package root (which re-exports the public API)."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("robustkit")
    INSTALLED = True
except PackageNotFoundError:  # pragma: no cover - a source tree on PYTHONPATH, not installed
    __version__ = "0.1.0+source"
    INSTALLED = False
