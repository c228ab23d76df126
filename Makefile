# Every target works on a fresh machine: it creates .venv and installs the project into it first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
# The entrypoint of every docker and podman container the agent starts (docs/ISOLATION.md): a
# static binary, since it runs inside any image. Needs a C compiler and a static libc (Debian's
# gcc and libc6-dev; tests/services.sh installs them). Defined before `install`, whose
# prerequisites make reads where the rule stands (below it, `make install` built no helper).
HELPER := agents/helper/fairgpu-exec
RUNTIME_STAMP := $(VENV)/.runtime-stamp

.PHONY: install helper lint fmt test test-gpu test-services test-fast test-faults test-dashboards demo bench bench-sim bench-soak clean

# The demo needs only the runtime dependencies; tests, lint and benchmarks need the dev extra.
$(RUNTIME_STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip uv
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e .
	touch $(RUNTIME_STAMP)

$(STAMP): $(RUNTIME_STAMP)
	$(BIN)/uv pip install -q --compile-bytecode --python $(BIN)/python -e '.[dev]'
	touch $(STAMP)

install: $(STAMP) $(HELPER)

$(HELPER): agents/helper/fairgpu-exec.c
	$(CC) -static -O2 -s -Wall -Wextra -Werror -o $@.$$$$.tmp $< && mv -f $@.$$$$.tmp $@

helper: $(HELPER)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# PostgreSQL and promtool, installed and started when missing (tests/services.sh).
test-services:
	bash tests/services.sh

# Three passes (tests/harness/serial.py): tests that share nothing in TEST_WORKERS processes
# (pytest-xdist); then the fault tests (their own servers, agents and PostgreSQL, timed
# failovers) FAULT_WORKERS at a time, away from the CPU-bound first pass; then those marked
# serial (host-wide effects) alone. Every pass always runs; any failing fails the target.
TEST_WORKERS ?= 4
FAULT_WORKERS ?= 3
test: lint test-services helper
	status=0; \
	$(BIN)/pytest -q -ra -n $(TEST_WORKERS) --dist worksteal -m 'not serial and not faults' || status=1; \
	$(BIN)/pytest -q -ra -n $(FAULT_WORKERS) --dist worksteal -m faults || status=1; \
	$(BIN)/pytest -q -ra -m serial || status=1; \
	exit $$status

# On a GPU node, as root: the NVML backend and the task sandbox's GPU fence against the real
# driver (tests/gpu; about 20 s). Needs PyTorch with CUDA (FAIRGPU_TEST_CUDA_PYTHON names the
# interpreter that has it), for the tasks' CUDA probes; fails, never skips, without a GPU.
test-gpu: $(STAMP)
	FAIRGPU_REAL_GPU=1 $(BIN)/pytest -v -rA tests/gpu tests/agents/test_isolation.py tests/agents/test_cgroups.py

# Slow (about a minute): Debian's Prometheus scrapes a live server and agents running a small
# workload, and every Grafana panel's query must return data (tests/deploy/dashboards_live.py).
test-dashboards: $(STAMP)
	$(BIN)/pytest -q -ra -p no:cacheprovider tests/deploy/dashboards_live.py

# Slow (about ten minutes): the fault and abuse suite in full: real servers, agents and a private
# PostgreSQL killed and cut off, schemathesis with 40 examples per operation and role, a
# two-minute soak. `make test` runs the quick variants (tests/faults, tests/security).
test-faults: $(STAMP)
	$(BIN)/pytest -q -ra -p no:cacheprovider tests/faults tests/security tests/faults/full_suite.py

test-fast: $(STAMP)
	$(BIN)/pytest -q -x -m 'not slow'

demo: $(RUNTIME_STAMP)
	$(BIN)/fairgpu demo

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache

# Each benchmark prints JSON lines on stdout (issue figures: docs/SCHEDULING.md, SIMULATION.md).
# bench-sim needs the Philly trace: make bench-sim TRACE_DIR=../shared/traces
TRACE_DIR ?= ../shared/traces
bench: $(STAMP)
	$(BIN)/fairgpu bench core
	$(BIN)/fairgpu bench latency
	$(BIN)/fairgpu bench api

bench-sim: $(STAMP)
	$(BIN)/fairgpu simulate --trace $(TRACE_DIR)/philly_sep_oct.csv \
		--quotas $(TRACE_DIR)/philly_vc_quotas.csv --time-scale 6 --out out/simulation

bench-soak: $(STAMP)
	$(BIN)/fairgpu bench soak --duration 10m

