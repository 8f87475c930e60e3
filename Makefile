# Two commands for a fresh machine: `make demo` and `make test`.
# Both build .venv on first use (re-installing only when a requirements file changes).

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
DEMO_OUT ?= outputs/demo

.PHONY: setup test test-all demo bench mutate clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@echo "Installing dependencies into $(VENV) (first run only; about 7 GB with the CUDA build of torch) ..."
	@free_kb=$$(df -Pk . | awk 'NR==2 {print $$4}'); \
	if [ -n "$$free_kb" ] && [ "$$free_kb" -lt 8000000 ]; then \
	  echo "make: warning: $$((free_kb / 1024)) MB free on the disk holding $(VENV); the install needs about 7 GB" >&2; fi
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade pip
	@$(PY) -m pip install -q --disable-pip-version-check -r requirements.txt
	@$(PY) -m pip install -q --disable-pip-version-check --no-deps -r requirements-nodeps.txt
	@touch $@

# `make test`: everything but the tests marked slow (multi-process DDP, kill-and-resume, end-to-end demo and
# benchmark dry runs, subprocess CLIs), a few minutes on 2 cores; `make test-all`: the whole suite (what CI runs).
test: $(STAMP)
	@$(PY) -m pytest -q -m "not slow"

test-all: $(STAMP)
	@$(PY) -m pytest -q

demo: $(STAMP)
	@$(PY) -m evaluation.demo --out $(DEMO_OUT)

bench: $(STAMP)
	@for f in benchmarks/bench_*.py; do echo "== $$f"; $(PY) -m benchmarks.$$(basename $$f .py); done

# Mutation testing of the core modules (quantiser, projection, diffusion, intensity, DRR, generation; see
# [tool.mutmut] in pyproject.toml): each mutant runs only the tests that execute its function. Slow (hours on
# 2 cores); not part of `make test`. One module: make mutate MUTANTS='ddpm.projection.*'
MUTANTS ?=
mutate: $(STAMP)
	@rm -rf mutants
	@OMP_NUM_THREADS=1 $(PY) -m mutmut run $(MUTANTS)
	@$(PY) -m benchmarks.mutation_score

clean:
	rm -rf $(VENV) .pytest_cache outputs mutants
