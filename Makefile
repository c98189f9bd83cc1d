# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
# Both create the virtual environment (.venv) when it is missing.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.graft-installed

.PHONY: demo test lint bench clean

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	# torch/torchvision are pinned in pyproject.toml; pip takes them from the local disk
	# where the machine has them (a global constraints file may cap their versions).
	$(PY) -m pip install --quiet -e '.[dev,demo]'
	@touch $(STAMP)

demo: $(STAMP)
	@bash scripts/demo.sh

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_speed.py --json runs/bench_speed.json

lint: $(STAMP)
	$(VENV)/bin/ruff check graft tests scripts benchmarks

clean:
	rm -rf runs .pytest_cache .ruff_cache
