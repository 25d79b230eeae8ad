# xapid: two commands on a fresh machine (Python 3.11 and the package registries only).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Tests mostly wait on timers (HA detection, fencing): more workers than cores keeps make test short.
TEST_WORKERS ?= 4

.PHONY: run test lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

## run: start the daemon in the foreground at http://127.0.0.1:8080/ with state in ./var
run: $(STAMP)
	@echo "xapid: serving http://127.0.0.1:8080/ ; the root password is in ./var/root-password"
	@echo "xapid: pool console at http://127.0.0.1:8080/console (log in as root with that password)"
	$(BIN)/xapid serve --state-dir ./var --listen 127.0.0.1:8080

## lint: ruff over the whole tree
lint: $(STAMP)
	$(BIN)/ruff check .

## test: lint, then unit and integration tests against real daemons
test: $(STAMP) lint
	$(BIN)/python -m pytest -q -p no:cacheprovider -n $(TEST_WORKERS) --dist loadfile tests

.PHONY: bench bench-smoke

## bench: the benchmark (about 9 minutes on 2 cores; the corosync figures need root): table on stdout, median figures in bench/results.json
bench: $(STAMP)
	$(BIN)/python -m bench.run --out bench/results.json

## bench-smoke: the benchmark harness in its tiny mode (seconds); make test runs it as a test
bench-smoke: $(STAMP)
	$(BIN)/python -m bench.run --smoke --out build/bench-smoke.json

clean:
	rm -rf $(VENV) build *.egg-info
