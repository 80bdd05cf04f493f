"""The benchmark harness of arr: ``python -m benchmarks [--quick]`` (see benchmarks/README.md).

``main(argv)`` is the entry point (``arr bench`` calls it).
"""

from benchmarks.run import main

__all__ = ["main"]
