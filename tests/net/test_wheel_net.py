"""arr as a user installs it: a wheel, in a clean virtualenv, with no compiler.

The wheel is built from this checkout (pip wheel; setup.py compiles the BPF
objects and the C accelerator into it), installed into a new virtualenv with
only that virtualenv's bin/ on PATH (so no gcc or clang could be used), and
the router and agents of a nat cluster run from that install, again without
a compiler on PATH and with an empty BPF cache that must stay empty: the
shipped objects are the ones loaded (handoff/build.py).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest

from arr.testbed.router import ArrInstall, handoff_cluster

pytestmark = pytest.mark.net

MiB = 1 << 20
PROJECT_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(out), str(PROJECT_ROOT)],
                   check=True, capture_output=True, text=True, timeout=600)
    (built,) = out.glob("arr-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A clean virtualenv with the wheel installed; its python."""
    root = tmp_path_factory.mktemp("venv")
    venv.create(root, with_pip=True, clear=True)
    python = root / "bin" / "python"
    # Only the virtualenv on PATH: an install that needed a compiler fails here.
    env = {"PATH": str(root / "bin"), "HOME": str(root), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    result = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return python


def test_the_wheel_carries_the_compiled_parts_and_no_test_dependencies(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    for member in ("handoff/bpf/build/router.bpf.o", "handoff/bpf/build/target.bpf.o",
                   "handoff/bpf/build/sources.sha256", "handoff/bpf/router.bpf.c", "handoff/bpf/arr_maps.h",
                   "arr/py.typed", "handoff/py.typed"):
        assert member in names
    assert any(n.startswith("handoff/_fastpath.") and n.endswith(".so") for n in names)
    assert any(n.endswith("licenses/LICENSE") for n in names)
    metadata = next(zipfile.ZipFile(wheel).read(n).decode() for n in names if n.endswith("METADATA"))
    requires = [line for line in metadata.splitlines() if line.startswith("Requires-Dist:")]
    runtime = [line for line in requires if "extra ==" not in line]
    assert not any("scapy" in line for line in runtime), runtime
    assert "License-Expression: Apache-2.0 AND (GPL-2.0-only OR Apache-2.0)" in metadata


def test_the_installed_package_finds_its_shipped_objects(installed, tmp_path):
    cache = tmp_path / "cache"
    code = ("import handoff.build as b, handoff.fastpath as f; "
            "print(b.object_path('router')); print(b.object_path('target')); print(f.COMPILED)")
    result = subprocess.run([str(installed), "-c", code], env={"PATH": str(installed.parent),
                            "ARR_BPF_CACHE": str(cache)}, capture_output=True, text=True, timeout=60,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    router_obj, target_obj, compiled = result.stdout.split()
    site = str(installed.parent.parent)
    assert router_obj.startswith(site) and target_obj.startswith(site)
    assert compiled == "True"
    assert not cache.exists()


def test_an_edited_source_is_compiled_into_the_cache_not_into_site_packages(installed, tmp_path):
    """A package whose sources no longer match its objects rebuilds them in
    the cache (here with clang on PATH) and leaves site-packages alone."""
    cache = tmp_path / "cache"
    code = ("import handoff.build as b\n"
            "header = b.SOURCE_DIR / 'arr_consts.h'\n"
            "original = header.read_text()\n"
            "shipped = (b.BUILD_DIR / 'router.bpf.o').read_bytes()\n"
            "header.write_text(original + '\\n/* edited */\\n')\n"
            "try:\n"
            "    print(b.object_path('router'))\n"
            "    print((b.BUILD_DIR / 'router.bpf.o').read_bytes() == shipped)\n"
            "finally:\n"
            "    header.write_text(original)\n"
            "print(b.object_path('router'))\n")
    env = {"PATH": f"{installed.parent}:/usr/bin:/bin", "ARR_BPF_CACHE": str(cache)}
    result = subprocess.run([str(installed), "-c", code], env=env, capture_output=True, text=True, timeout=120,
                            cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    rebuilt, shipped_untouched, restored = result.stdout.split()
    assert rebuilt.startswith(str(cache)) and Path(rebuilt).is_file()
    assert shipped_untouched == "True"
    assert not restored.startswith(str(cache))  # the original sources match the shipped objects again


def test_a_nat_handoff_runs_from_the_wheel_without_a_compiler(cluster, installed, tmp_path):
    c = cluster(targets=2, files={"4m": 4 * MiB})
    info = c.files["4m"]
    cache = tmp_path / "bpf-cache"
    install = ArrInstall(python=str(installed), env=(("ARR_BPF_CACHE", str(cache)),
                                                      ("HOME", str(tmp_path))))
    with handoff_cluster(c, install=install) as (router, agents):
        router.wait_healthy()
        for _ in range(4):
            body = c.exec(c.client, ["curl", "-sS", "--noproxy", "*", "--max-time", "30",
                                     router.url + info.url_path], check=True, text=False).stdout
            assert hashlib.sha256(body).hexdigest() == info.sha256
        assert router.metric_sum("arr_handoffs_total", result="ok") == 4
        assert router.metric_sum("arr_handoff_fallbacks_total") == 0
        assert router.metric_sum("arr_requests_total", decision="handoff") == 4
    assert not cache.exists(), "the installed arr compiled its BPF objects instead of using the shipped ones"
    assert "Traceback" not in router.log_tail() and "Traceback" not in agents[0].log_tail()
