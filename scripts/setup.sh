#!/usr/bin/env bash
# Installs everything arr's demo and tests need; safe to run again (idempotent).
#   system: nginx (targets), curl (client), iproute2/nftables/ethtool/procps (test bed),
#           clang + libbpf (the handoff's BPF programs), bpftool (inspection, layout test)
#   python: a virtualenv in .venv with arr and its dev extras
#   --bench:   also what the benchmark harness runs (haproxy, py-spy, matplotlib, rich)
#   --pythons: also .venv-3.12 and .venv-3.13, from pyenv's interpreters, each with arr
#              (editable, dev extras) and its own build of the C accelerator; what
#              tests/net/test_python_versions_net.py runs the unit suite and a nat handoff with
set -euo pipefail
cd "$(dirname "$0")/.."

bench=0
pythons=0
for arg in "$@"; do
  case "$arg" in
    --bench) bench=1 ;;
    --pythons) pythons=1 ;;
    *) echo "setup: unknown option $arg (known: --bench, --pythons)" >&2; exit 2 ;;
  esac
done

need_apt=()
if [ "$bench" = 1 ]; then
  for tool in haproxy:haproxy; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
  done
fi
# SETUP_TOOLS: every external command the test bed, the tests and the demo run
# (tests/unit/test_setup_tools.py checks the list against what they call).
for tool in nginx:nginx-light curl:curl wrk:wrk ip:iproute2 nft:nftables ethtool:ethtool nstat:iproute2 \
            ss:iproute2 sysctl:procps pgrep:procps setpriv:util-linux clang:clang llc:llvm bpftool:bpftool \
            gcc:gcc; do
  command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
done
[ -f /usr/include/bpf/bpf_helpers.h ] || need_apt+=(libbpf-dev)
if [ ${#need_apt[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: missing ${need_apt[*]}; run as root (or install them) first" >&2
    exit 1
  fi
  echo "setup: installing ${need_apt[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi

PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the project's metadata changed since the last install.
stamp=.venv/.arr-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip 'setuptools>=77' >/dev/null
  .venv/bin/python -m pip install -q -e '.[dev]'
  touch "$stamp"
fi
if [ "$bench" = 1 ] && ! .venv/bin/python -c "import matplotlib, rich" 2>/dev/null; then
  .venv/bin/python -m pip install -q -e '.[dev,bench]'
fi
# py-spy (a wheel with its binary): the benchmark's profile of the arr-nat router.
if [ "$bench" = 1 ] && [ ! -x .venv/bin/py-spy ]; then
  .venv/bin/python -m pip install -q py-spy
fi
# The compiled accelerator (handoff/_fastpath.c, see handoff/fastpath.py), in place, when stale.
# One per interpreter: its file name carries the ABI tag (_fastpath.cpython-311-x86_64-linux-gnu.so).
build_fastpath() {  # VENV_DIR ABI_TAG (sys.implementation.cache_tag, e.g. cpython-311)
  local fastpath
  fastpath=$(ls handoff/_fastpath."$2"-*.so 2>/dev/null | head -1 || true)
  if [ -z "$fastpath" ] || [ handoff/_fastpath.c -nt "$fastpath" ] || [ setup.py -nt "$fastpath" ]; then
    # setup.py reads pyproject.toml with the venv's own setuptools, which must be one the
    # build allows (build-system.requires): the one a new venv gets from ensurepip is older.
    "$1"/bin/python -m pip install -q 'setuptools>=77' >/dev/null
    "$1"/bin/python setup.py -q build_ext --inplace >/dev/null
  fi
}
build_fastpath .venv "$(.venv/bin/python -c 'import sys; print(sys.implementation.cache_tag)')"

# --pythons: the other supported interpreters. Debian bookworm packages neither 3.12
# nor 3.13, so they come from pyenv (PYENV_ROOT, `pyenv root`, else ~/.pyenv): the newest
# installed 3.12.x and 3.13.x. A missing one is reported, and the others still set up;
# the exit status is then 1 (tests/net/test_python_versions_net.py fails and says so).
missing_pythons=()
find_python() {  # MINOR (3.12) -> the newest pyenv interpreter of that minor version, or nothing
  local root
  root=${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}
  ls -d "$root"/versions/"$1".* 2>/dev/null | grep -E "/$1\.[0-9]+\$" | sort -V | tail -1 \
    | while read -r dir; do if [ -x "$dir/bin/python$1" ]; then echo "$dir/bin/python$1"; fi; done || true
}
setup_python() {  # MINOR
  local minor=$1 venv=.venv-$1 python stamp
  python=$(find_python "$minor")
  if [ -z "$python" ]; then
    echo "setup: no Python $minor found under ${PYENV_ROOT:-$(pyenv root 2>/dev/null || echo "$HOME/.pyenv")}/versions;" \
         "install it (e.g. \`pyenv install $minor\`) and run \`bash scripts/setup.sh --pythons\` again" >&2
    missing_pythons+=("$minor")
    return 0
  fi
  # A venv of another interpreter (a newer patch release, a removed one) is made again.
  if [ ! -x "$venv/bin/python" ] || ! grep -qxF "home = $(dirname "$python")" "$venv/pyvenv.cfg" 2>/dev/null \
     || ! "$venv/bin/python" -c '' 2>/dev/null; then
    rm -rf "$venv"
    "$python" -m venv "$venv"
  fi
  stamp=$venv/.arr-installed
  if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ setup.py -nt "$stamp" ]; then
    # pip's notes (an editable install's warning) only when it fails.
    if ! out=$({ "$venv"/bin/python -m pip install -q --upgrade pip 'setuptools>=77' \
                 && "$venv"/bin/python -m pip install -q -e '.[dev]'; } 2>&1); then
      echo "$out" >&2
      echo "setup: installing arr into $venv failed" >&2
      exit 1
    fi
    touch "$stamp"
  fi
  build_fastpath "$venv" "$("$venv"/bin/python -c 'import sys; print(sys.implementation.cache_tag)')"
  echo "setup: $venv ok ($("$venv"/bin/python --version))"
}
if [ "$pythons" = 1 ]; then
  setup_python 3.12
  setup_python 3.13
fi

.venv/bin/python -m handoff.build >/dev/null   # compile the BPF programs (only when stale)
echo "setup: ok ($(.venv/bin/python --version), $(nginx -v 2>&1), $(clang --version | head -1))"
if [ ${#missing_pythons[@]} -gt 0 ]; then
  echo "setup: FAILED: Python ${missing_pythons[*]} missing (see above)" >&2
  exit 1
fi
