# Set-up and the two everyday jobs. Works on a fresh Linux machine with Python >= 3.10.
VENV ?= .venv
PY := $(VENV)/bin/python
QALIGN := $(VENV)/bin/qalign
# The CPU build of PyTorch; on a GPU machine install your CUDA build of torch first.
TORCH ?= torch==2.13.0
# Clean photos for the demo (degraded copies are made from them).
PRISTINE ?= ../shared/data/pristine

.PHONY: setup demo test bench recipe clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

# Score sample photos (clean and degraded copies) with the built-in offline model.
demo: setup
	$(QALIGN) setup
	$(PY) recipes/demo.py --out runs/demo --pristine $(PRISTINE)
	$(QALIGN) score runs/demo --output runs/demo/scores.csv --format table

test: setup
	$(PY) -m pytest -q

recipe: setup
	bash recipes/qalign-tiny.sh

clean:
	rm -rf runs .pytest_cache
