# Two commands on a fresh machine:  `make app` opens paralab, `make test` runs the tests.
# Both create .venv and install what is needed the first time.

PYTHON ?= python3
VENV   ?= .venv
# Pinned so that a machine without a GPU gets the CPU build it holds (an unpinned torch
# pulls several GB of CUDA packages). On a GPU workstation this same pin is the CUDA build.
TORCH  ?= torch==2.13.0

.PHONY: app test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install "$(TORCH)"
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

app: setup
	$(VENV)/bin/paralab

test: setup
	QT_QPA_PLATFORM=offscreen $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
