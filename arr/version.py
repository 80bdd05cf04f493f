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


def describe() -> str:
    from handoff.fastpath import COMPILED

    return (f"arr {version()} (Python {platform.python_version()}, "
            f"{'compiled' if COMPILED else 'Python'} handoff fast path)")
