"""Build of the compiled accelerator; everything else is in pyproject.toml.

handoff._fastpath is optional at run time (handoff/fastpath.py falls back to
the Python reference), but scripts/setup.sh builds it and the tests require it.
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension("handoff._fastpath", ["handoff/_fastpath.c"],
                             extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])])
