# The two entry points of the README: `make demo` and `make test`.
# Each does all set-up on a fresh machine: virtualenv, packages, Kafka jars.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

CHROMIUM ?= chromium

.PHONY: demo test lint typecheck kafka-jars chromium quix compile console-screenshot clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	touch $(STAMP)

# With JOBS_BOOTSTRAP_SERVERS set, tests and the demo use that broker, and with
# JOBS_TEST_BROKER=docker the tests start Kafka in a container: no Java, no jars.
kafka-jars: $(STAMP)
ifneq ($(JOBS_BOOTSTRAP_SERVERS),)
	@echo "Using the broker at $(JOBS_BOOTSTRAP_SERVERS): no Kafka jars needed."
else ifeq ($(JOBS_TEST_BROKER),docker)
	@echo "JOBS_TEST_BROKER=docker: the tests start Kafka in a container; no Kafka jars needed."
else
	$(BIN)/jobctl broker --fetch-only
endif

demo: kafka-jars compile
	$(BIN)/jobctl demo

# The hot modules compiled with mypyc into worker/_compiled/, rebuilt when a source changes;
# the worker uses the build only while it matches the sources (worker/compiled.py). Without
# a C compiler this says so and the worker runs from source. JOBS_COMPILED=0 skips it.
COMPILED := worker/_compiled/manifest.json
compile: $(COMPILED)
$(COMPILED): $(STAMP) $(wildcard worker/core/*.py worker/engine/*.py) worker/compiled.py worker/devtools/compile.py
	$(BIN)/python -W ignore::RuntimeWarning -m worker.devtools.compile

# The console's browser tests drive Debian's Chromium (never Playwright's download). Install
# it with apt-get when it is missing and we may (root, or sudo without a password); when we
# cannot, say so in one line and go on: those tests are then skipped, the build goes on.
chromium:
	@if command -v $(CHROMIUM) >/dev/null 2>&1; then exit 0; fi; \
	if [ "$$(id -u)" = 0 ]; then sudo=""; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then sudo="sudo -n"; \
	else echo "chromium is missing and installing it needs root: the browser tests will be skipped"; exit 0; fi; \
	if ! command -v apt-get >/dev/null 2>&1; then \
	  echo "chromium is missing and there is no apt-get here: the browser tests will be skipped"; exit 0; fi; \
	export DEBIAN_FRONTEND=noninteractive; \
	if $$sudo apt-get install -y -qq chromium >/dev/null 2>&1 || \
	  { $$sudo apt-get update -qq >/dev/null 2>&1 && $$sudo apt-get install -y -qq chromium >/dev/null 2>&1; }; \
	then echo "installed chromium (apt-get) for the browser tests"; \
	else echo "apt-get could not install chromium: the browser tests will be skipped"; fi

# docs/console.png, the README's picture of the console: a broker, a worker, some runs.
console-screenshot: kafka-jars chromium
	$(BIN)/python -m tests.test_console_browser docs/console.png

lint: $(STAMP)
	$(BIN)/ruff format --check .
	$(BIN)/ruff check .

typecheck: $(STAMP)
	$(BIN)/mypy

# The bench's Quix Streams reference (`jobctl bench --quix`) runs in a virtualenv of its own,
# made once in the cache beside Kafka's jars; its test needs it.
quix: $(STAMP)
	$(BIN)/python -c "from worker.devtools.quixref import quix_python; quix_python(print)"

# The suite runs in TEST_WORKERS processes (pytest-xdist), a test file to each at a time and a
# broker of its own to each process; TEST_WORKERS=0 runs it in this one process.
TEST_WORKERS ?= 2
test: kafka-jars chromium quix compile lint typecheck
	$(BIN)/pytest -n $(TEST_WORKERS) --dist loadfile

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache worker/_compiled
