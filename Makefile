# edge-agent: two commands set up everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: venv test demo lint train evaluate bench clean

venv: $(STAMP)

# torch first, pinned to the CPU build kept on disk: a bare `torch` would pull a CUDA build of GBs.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[deploy,demo,openvino,test]'
	touch $(STAMP)

test: venv
	$(PY) -m pytest $(PYTEST_ARGS)

demo: venv
	$(PY) -m deploy.demo

# ruff on everything; mypy --strict (pydantic plugin; settings in pyproject.toml) on agent/ and deploy/
lint: venv
	$(VENV)/bin/ruff check agent deploy models tests bench
	$(VENV)/bin/mypy

train: venv
	$(PY) models/ct-abdomen-seg/train.py
	$(PY) models/mr-brain-cls/train.py

evaluate: venv
	$(VENV)/bin/edge-deploy evaluate models/ct-abdomen-seg --n 6 --seed 9001
	$(VENV)/bin/edge-deploy evaluate models/mr-brain-cls --n 400 --seed 9001

bench: venv
	$(PY) bench/ingest.py
	$(PY) bench/e2e.py

clean:
	rm -rf var build dist *.egg-info .pytest_cache
