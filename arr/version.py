"""What runs: arr's version (from the installed metadata) for ``arr --version``
and the ``arr_build_info`` metric."""

from __future__ import annotations

import platform
from importlib import metadata


def version() -> str:
    try:
        return metadata.version("arr")
    except metadata.PackageNotFoundError:  # a checkout on PYTHONPATH, not installed
        return "0+unknown"


def build() -> tuple[str, str, str]:
    """(arr version, Python version, "compiled" or "python" handoff fast path):
    the labels of ``arr_build_info``."""
    try:
        from handoff.fastpath import COMPILED
    except ImportError:  # pragma: no cover - arr without its handoff package
        COMPILED = False
    return version(), platform.python_version(), "compiled" if COMPILED else "python"


def describe() -> str:
    arr, python, fastpath = build()
    return f"arr {arr} (Python {python}, {'compiled' if fastpath == 'compiled' else 'Python'} handoff fast path)"
