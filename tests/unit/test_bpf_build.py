"""Which BPF object is current (handoff/build.py): decided by the sources'
content, rebuilt in place only in a checkout, else into the cache."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from handoff import build


@pytest.fixture
def package(tmp_path, monkeypatch) -> Path:
    """A copy of the sources laid out as an installed package (no pyproject.toml beside it)."""
    site = tmp_path / "site-packages"
    sources = site / "handoff" / "bpf"
    shutil.copytree(build.SOURCE_DIR, sources, ignore=shutil.ignore_patterns("build"))
    monkeypatch.setattr(build, "SOURCE_DIR", sources)
    monkeypatch.setattr(build, "BUILD_DIR", sources / "build")
    monkeypatch.setenv("ARR_BPF_CACHE", str(tmp_path / "cache"))
    return sources


def test_the_digest_covers_every_program_and_header(package):
    before = build.sources_digest(package)
    names = {p.name for p in build.source_files(package)}
    assert {"router.bpf.c", "target.bpf.c", "arr_handoff.h", "arr_maps.h"} <= names
    (package / "arr_rewrite.h").write_text((package / "arr_rewrite.h").read_text() + "\n")
    assert build.sources_digest(package) != before


def test_shipped_objects_are_used_when_their_manifest_matches(package, tmp_path):
    build.build_all(package / "build", package)
    assert not build.in_checkout()
    assert build.object_path("router") == package / "build" / "router.bpf.o"
    assert not (tmp_path / "cache").exists()


def test_stale_objects_of_a_package_are_rebuilt_in_the_cache(package, tmp_path):
    build.build_all(package / "build", package)
    shipped = (package / "build" / "target.bpf.o").read_bytes()
    (package / "arr_consts.h").write_text((package / "arr_consts.h").read_text() + "\n/* edited */\n")
    rebuilt = build.object_path("target")
    digest = build.sources_digest(package)
    assert rebuilt == tmp_path / "cache" / digest[:16] / "target.bpf.o"
    assert rebuilt.is_file() and (package / "build" / "target.bpf.o").read_bytes() == shipped
    # Asked again: the cache is current, nothing is compiled twice.
    mtime = rebuilt.stat().st_mtime_ns
    assert build.object_path("target") == rebuilt and rebuilt.stat().st_mtime_ns == mtime


def test_a_package_without_objects_builds_into_the_cache(package, tmp_path):
    path = build.object_path("router")
    assert path.parent.parent == tmp_path / "cache"
    assert not (package / "build").exists()


def test_this_checkout_rebuilds_in_place():
    assert build.in_checkout()
    assert build.object_path("router").parent == build.BUILD_DIR


def test_an_unknown_program_is_named():
    with pytest.raises(ValueError, match="no BPF program 'nope'"):
        build.object_path("nope")
