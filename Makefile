# One command each: `make demo`, `make test`, `make bench`. Each creates .venv if needed and
# reinstalls only when pyproject.toml changes, so running them again is quick.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
BENCH_STAMP := $(VENV)/.installed-bench
# test worker processes: the CPUs this shell may use, at most 4 (each learning test is mostly one thread)
TEST_WORKERS ?= $(shell $(PYTHON) -c 'import os; print(max(1, min(4, len(os.sched_getaffinity(0)))))')

.PHONY: demo test bench lint install clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch==2.13.0 first (the CPU wheel on this machine); the package's own range then installs nothing more.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev,llm,ray,atari]'
	touch $(STAMP)

# Peers (stable-baselines3) are installed for benchmarks only.
$(BENCH_STAMP): $(STAMP)
	$(PIP) install -q -e '.[dev,llm,ray,atari,bench]'
	touch $(BENCH_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/policylab train ppo --env CartPole-v1 --steps 100k --seed 1

# The suite in one worker process per usable core (whole files per worker: their module fixtures are made
# once), then the few tests that need the other cores idle.
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile -m 'not alone'
	$(PY) -m pytest -q -m alone

lint: $(STAMP)
	$(VENV)/bin/ruff check policylab tests benchmarks
	$(VENV)/bin/ruff format --check policylab tests benchmarks
	$(VENV)/bin/mypy policylab

bench: $(BENCH_STAMP)
	$(PY) benchmarks/ppo_cartpole.py --seeds 3

clean:
	rm -rf $(VENV) runs
