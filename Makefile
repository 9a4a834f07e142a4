# The two entry points of the README: `make demo` and `make test`.
# Each does all set-up on a fresh machine: virtualenv, packages, Kafka jars.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint typecheck kafka-jars clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# With JOBS_BOOTSTRAP_SERVERS set, tests and the demo use that broker: no Java, no jars.
kafka-jars: $(STAMP)
ifeq ($(JOBS_BOOTSTRAP_SERVERS),)
	$(BIN)/jobctl broker --fetch-only
else
	@echo "Using the broker at $(JOBS_BOOTSTRAP_SERVERS): no Kafka jars needed."
endif

demo: kafka-jars
	$(BIN)/jobctl demo

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

test: kafka-jars lint typecheck
	$(BIN)/pytest

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
