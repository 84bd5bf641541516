# The README's two commands are `make demo` and `make test`; both set up .venv on first use.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-stamp

.PHONY: setup demo test test-fast bench clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

# Main job on the embedded default: local Ray, generated COCO-format data, local MLflow store.
demo: $(STAMP)
	$(BIN)/python -m mike_ray.sweep sweeps/demo.yaml

# The test suite (what .ci/run calls), with the fifteen slowest tests at the end. Two processes: every
# test on the session's Ray instance in one, the rest beside it (tests/conftest.py groups them).
test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup --durations=15

# The edit loop: everything but the multi-process Ray end-to-end tests (marker `slow`).
test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --dist loadgroup -m "not slow" --durations=10

bench: $(STAMP)
	$(BIN)/python benchmarks/data_prep.py

clean:
	rm -rf outputs .pytest_cache
