"""What pyproject.toml cannot say: the compiled parts of a build.

* handoff._fastpath, the compiled accelerator. It is optional at run time
  (handoff/fastpath.py falls back to the Python reference), but
  scripts/setup.sh builds it and the tests require it.
* The BPF objects, compiled with clang when a wheel is built (build_py) and
  shipped in it under handoff/bpf/build/ with the hash of their sources, so
  that an installed arr needs no compiler (handoff/build.py decides at run
  time whether the shipped objects are current).
"""
import importlib.util
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent


def _bpf_build_module():
    # handoff/build.py stands alone (standard library only); loaded by path
    # because the package is not installed while it is being built.
    spec = importlib.util.spec_from_file_location("_arr_bpf_build", HERE / "handoff" / "build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class BuildPyWithBpf(build_py):
    """The usual build_py, then the BPF objects into the build tree."""

    def run(self):
        super().run()
        if not self.dry_run:
            bpf = _bpf_build_module()
            bpf.build_all(Path(self.build_lib) / "handoff" / "bpf" / "build", HERE / "handoff" / "bpf")


setup(
    cmdclass={"build_py": BuildPyWithBpf},
    ext_modules=[Extension("handoff._fastpath", ["handoff/_fastpath.c"],
                           extra_compile_args=["-O2", "-Wall", "-Wextra", "-Wno-unused-parameter"])],
)
