# The two commands a new user types: `make demo` (the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.zoolib-installed

.PHONY: env demo test clean

env: $(STAMP)

# The environment: a virtualenv with the package installed editable and its
# pinned dependencies; the last line checks that torch and torchvision match.
$(STAMP): pyproject.toml
	$(PYTHON) -c "import sys; assert sys.version_info >= (3, 11), 'zoolib needs Python 3.11+'"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[test]'
	$(BIN)/python -c "import fastai.vision.all, timm, torch, torchvision; print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'timm', timm.__version__)"
	touch $@

demo: $(STAMP)
	$(BIN)/python -m zoolib.pipeline demo --workspace build/demo-workspace --reports reports/demo

test: $(STAMP)
	$(BIN)/python -m pytest

clean:
	rm -rf build reports/demo reports/interactive
