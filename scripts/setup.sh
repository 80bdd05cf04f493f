#!/usr/bin/env bash
# Installs everything arr's demo and tests need; safe to run again (idempotent).
#   system: nginx (targets), curl (client), iproute2/nftables/ethtool/procps (test bed),
#           clang + libbpf (the handoff's BPF programs), bpftool (inspection, layout test)
#   python: a virtualenv in .venv with arr and its dev extras
set -euo pipefail
cd "$(dirname "$0")/.."

bench=0
[ "${1:-}" = "--bench" ] && bench=1

need_apt=()
if [ "$bench" = 1 ]; then
  for tool in haproxy:haproxy; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || need_apt+=("${tool#*:}")
  done
fi
# SETUP_TOOLS: every external command the test bed, the tests and the demo run
# (tests/unit/test_setup_tools.py checks the list against what they call).
for tool in nginx:nginx-light curl:curl wrk:wrk ip:iproute2 nft:nftables ethtool:ethtool nstat:iproute2 \
            ss:iproute2 sysctl:procps pgrep:procps clang:clang llc:llvm bpftool:bpftool gcc:gcc; do
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
  .venv/bin/python -m pip install -q --upgrade pip >/dev/null
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
fastpath=$(ls handoff/_fastpath.*.so 2>/dev/null | head -1 || true)
if [ -z "$fastpath" ] || [ handoff/_fastpath.c -nt "$fastpath" ] || [ setup.py -nt "$fastpath" ]; then
  .venv/bin/python setup.py -q build_ext --inplace >/dev/null
fi
.venv/bin/python -m handoff.build >/dev/null   # compile the BPF programs (only when stale)
echo "setup: ok ($(.venv/bin/python --version), $(nginx -v 2>&1), $(clang --version | head -1))"
