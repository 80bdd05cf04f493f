# The two commands of the README: `make demo` and `make test`.
# Both install what they need first (scripts/setup.sh, idempotent).
VENV := .venv
PY := $(VENV)/bin/python
DEMO_ARGS ?=

.PHONY: setup pythons bpf demo bench bench-quick test test-unit test-net clean-netns

setup:
	@bash scripts/setup.sh

# The other supported Pythons: .venv-3.12 and .venv-3.13 (pyenv's interpreters), which
# tests/net/test_python_versions_net.py runs the unit suite and a nat cluster with. Not
# fatal here: when one cannot be made, setup says why and that test fails saying so.
pythons: setup
	-@bash scripts/setup.sh --pythons

bpf: setup
	$(PY) -m handoff.build

demo: setup
	$(PY) -m arr demo $(DEMO_ARGS)

# The benchmark harness (manual; --quick is the CI smoke). Extra tools: haproxy, wrk, matplotlib, rich, py-spy.
bench: setup
	@bash scripts/setup.sh --bench
	$(PY) -m benchmarks $(BENCH_ARGS)

bench-quick: setup
	@bash scripts/setup.sh --bench
	$(PY) -m benchmarks --quick $(BENCH_ARGS)

test: setup pythons
	$(PY) -m pytest -q -ra

test-unit: setup
	$(PY) -m pytest -q -ra tests/unit

test-net: setup pythons
	$(PY) -m pytest -q -ra -m net tests/net

# Remove namespaces left by a crashed run (only the test bed's own prefix).
clean-netns: setup
	$(PY) -c "from arr.testbed import cleanup_stale; print(cleanup_stale())"
