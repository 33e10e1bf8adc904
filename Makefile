# llava: local chat with images.  `make help` lists the targets.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
LLAMA_CPP_VERSION := 0.3.36
STAMP := $(VENV)/.installed
PYTEST_ARGS ?= -n auto  # tests run in parallel, one worker per CPU
# What the tests drive besides Python (tests/conftest.py: SYSTEM_TOOLS), and what building
# llama-cpp-python needs (scripts/install-llama-cpp.sh), as Debian/Ubuntu packages.
TEST_PACKAGES := tmux
BUILD_PACKAGES := cmake build-essential python3-venv

.PHONY: help install test test-fast lint fmt doctor bench bench-quick docs clean

help:
	@echo "make install   create $(VENV), build llama-cpp-python (flags: scripts/llama-cmake-args.sh), install llava editable"
	@echo "make test      install if needed, then run the test suite (what CI runs)"
	@echo "make test-fast the tests not marked slow (no CLI subprocess, no tmux): the edit loop"
	@echo "make lint      ruff, mypy --strict, and docs/cli.md up to date"
	@echo "make fmt       format with ruff"
	@echo "make docs      regenerate docs/cli.md from the commands' --help (make lint checks it)"
	@echo "make doctor    install if needed, then run llava doctor (offline self-test)"
	@echo "make bench     llava against llama.cpp's own llama-mtmd-cli and llama-cpp-python's stock handler (~9 min; the first run builds llama.cpp's binaries, ~15 min more; bench-quick: a small pair)"
	@echo "make clean     remove $(VENV) and caches"
	@echo "system packages (Debian/Ubuntu): $(BUILD_PACKAGES) to build; $(TEST_PACKAGES) for the tests"

install: $(STAMP)

$(STAMP): pyproject.toml scripts/install-llama-cpp.sh scripts/llama-cmake-args.sh
	@echo "system packages used (Debian/Ubuntu): $(BUILD_PACKAGES) to build llama.cpp;" \
		"$(TEST_PACKAGES) for the tests (without it, those tests skip)"
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	scripts/install-llama-cpp.sh $(VENV) $(LLAMA_CPP_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m 'not slow' $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check llava_cli tests benchmarks
	$(BIN)/ruff format --check llava_cli tests benchmarks
	$(BIN)/mypy
	$(BIN)/python scripts/cli-reference.py --check

docs: $(STAMP)
	$(BIN)/python scripts/cli-reference.py

fmt: $(STAMP)
	$(BIN)/ruff format llava_cli tests benchmarks
	$(BIN)/ruff check --fix llava_cli tests benchmarks

bench: $(STAMP)
	$(BIN)/python benchmarks/run.py

bench-quick: $(STAMP)
	$(BIN)/python benchmarks/run.py --quick

doctor: $(STAMP)
	$(BIN)/llava doctor

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache build *.egg-info
