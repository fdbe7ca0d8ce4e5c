# The two commands of the README: `make test` and `make demo`. Each creates .venv when it is
# missing and installs the project with its dev extra into it.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo bench chaos lint typecheck pytest install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check src tests benchmarks contrib

typecheck: install
	$(BIN)/mypy

# The whole suite on the chosen backend (DTASK_ETCD_BACKEND=auto|docker|process); when that
# was Docker, the Manager tests run once more on etcd processes.
pytest: install
	$(BIN)/pytest
	@if [ "$$($(BIN)/python -c 'from distributedtask.testing.etcd import select_backend; print(select_backend())')" = docker ]; then \
		echo "== Manager tests again on the process backend"; \
		DTASK_ETCD_BACKEND=process $(BIN)/pytest -m manager; \
	fi

test: lint typecheck pytest

demo: install
	$(BIN)/dtask demo

# The benchmarks: every figure a ratio against a baseline measured in the same run.
bench: install
	$(BIN)/python -m pip install -q --disable-pip-version-check -e '.[bench]'
	$(BIN)/python -m benchmarks

# The long chaos run, by hand: a three-member etcd, three nodes, faults for 10 minutes.
chaos: install
	$(BIN)/python -m tests.faults.chaos --duration $${DURATION:-600} $${SEED:+--seed $$SEED}

clean:
	rm -rf $(VENV) build dist
