# Two commands on a fresh machine:  `make app` opens paralab, `make test` runs the tests.
# Both create .venv and install what is needed the first time.

PYTHON ?= python3
VENV   ?= .venv
# Pinned. Where pip finds a CPU build of this version (a local index, or
# TORCH_INDEX=https://download.pytorch.org/whl/cpu) that is what comes; from PyPI on Linux
# it is the CUDA build: several GB of torch + nvidia-* wheels, which also runs on the CPU.
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: app test setup clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install --upgrade pip
	$(VENV)/bin/python -m pip install "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(VENV)/bin/python -m pip install -e '.[test]'
	touch $@

setup: $(VENV)/.installed

# The system libraries Qt's X11 platform needs are checked first: if any is missing this
# prints the one apt-get line that installs them, instead of Qt's misleading abort.
app: setup
	$(VENV)/bin/python -m paralab.gui.syscheck
	$(VENV)/bin/paralab

test: setup
	QT_QPA_PLATFORM=offscreen $(VENV)/bin/python -m pytest -q

clean:
	rm -rf $(VENV) build *.egg-info
