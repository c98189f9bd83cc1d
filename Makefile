# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) when it is missing.
# pyproject.toml states the versions graft supports (ranges); constraints.txt, the lock,
# pins the exact ones installed here and in CI. Python 3.11 or 3.12.
PYTHON ?= $(shell command -v python3.11 || command -v python3.12 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graft-installed
LOCK   := constraints.txt

.PHONY: demo test lint bench check-install lock clean

$(STAMP): pyproject.toml $(LOCK)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# pip takes torch/torchvision from the local disk where the machine has them (a global
	# constraints file may cap their versions).
	$(PY) -m pip install --quiet --constraint $(LOCK) -e '.[dev,demo]'
	@touch $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py --sizes demo small --json runs/bench_speed.json

lint: $(STAMP)
	$(VENV)/bin/ruff check graft tests scripts benchmarks

# The wheel, installed with pip into a fresh environment at the LOWER bounds of
# pyproject.toml (no lock), then graft --help, a tiny train, predict and serve from there.
check-install: $(STAMP)
	@PYTHON=$(PYTHON) bash scripts/check_install.sh

# Resolve .[dev,demo,track] again, keeping every pin of constraints.txt that still fits;
# to move a package, change or delete its line first.
lock: $(STAMP)
	$(PY) -m pip install --quiet --dry-run --ignore-installed --report $(VENV)/lock.json \
		--constraint $(LOCK) '.[dev,demo,track]'
	$(PY) scripts/constraints.py lock $(VENV)/lock.json > $(VENV)/lock.txt
	mv $(VENV)/lock.txt $(LOCK)

clean:
	rm -rf runs .pytest_cache .ruff_cache
