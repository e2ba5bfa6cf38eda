# One command each: `make html` builds the book, `make test` runs every check.
# Both create the virtual environment and the stand-in data when needed.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
NOTEBOOKS := _build/notebooks

# Data lives in ./data whatever the working directory of the notebook.
export D2L_FACE_DATA ?= $(CURDIR)/data
export PATH := $(BIN):$(PATH)
# The build and the tests run on the generated stand-in unless told otherwise.
export D2L_FACE_SOURCE ?= standin

.PHONY: setup standin pack lib notebooks check test html eval-mxnet eval-pytorch bench clean

setup: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt constraints.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -r requirements.txt -c constraints.txt
	$(BIN)/python -m pip install -q --no-deps -r requirements-nodeps.txt
	$(BIN)/python -m pip install -q --no-deps -e .
	# nbconvert looks for `pandoc` on PATH; the pypandoc_binary wheel ships one.
	# (Not pypandoc.get_pandoc_path(): on a second set-up it finds this link.)
	ln -sf "$$($(BIN)/python -c 'import os, pypandoc; print(os.path.join( \
		os.path.dirname(pypandoc.__file__), "files", "pandoc"))')" $(BIN)/pandoc
	$(BIN)/pandoc --version | head -1
	touch $@

standin: $(STAMP)
	$(BIN)/python -m d2l_face.standin --root "$(D2L_FACE_DATA)/standin"

lib: $(STAMP)
	$(BIN)/d2lbook build lib

notebooks: $(STAMP)
	$(BIN)/python tools/md2ipynb.py $(NOTEBOOKS)

# The tests run in one worker per core (TEST_WORKERS=0 runs them in this
# process). Each notebook goes whole to one worker, and so do a tab's training
# and deployment notebooks together, training first, so that deployment finds
# the network training saved (--dist loadgroup; the groups and the order are
# set in conftest.py, which also gives each worker its share of the cores).
# The stand-in is packed before (`pack`), so that no two notebooks write its
# pack at the same time.
TEST_WORKERS ?= auto

# The library's tests alone (no notebook runs): a couple of minutes.
check: $(STAMP)
	$(BIN)/python -m pytest tests -p no:cacheprovider -n $(TEST_WORKERS)

test: $(STAMP) standin pack notebooks
	$(BIN)/python -m pytest tests $(NOTEBOOKS) --nbval-lax --nbval-current-env \
		--nbval-cell-timeout=1800 -p no:cacheprovider \
		-n $(TEST_WORKERS) --dist loadgroup

# Each framework tab is executed on its own (_build/eval, _build/eval_pytorch),
# the two side by side, then `--tab all` merges them into one page per section
# with switching tabs. d2lbook runs two notebooks of a tab at a time, so every
# kernel computes with one thread; each line of progress names its tab.
html: $(STAMP) standin pack
	$(MAKE) -j2 eval-mxnet eval-pytorch
	$(BIN)/d2lbook build html --tab all

eval-mxnet eval-pytorch: export OMP_NUM_THREADS = 1
eval-mxnet eval-pytorch: $(STAMP) standin pack
	set -o pipefail; $(BIN)/d2lbook build eval --tab $(@:eval-%=%) 2>&1 \
		| sed -u 's/^/[$(@:eval-%=%)] /'

# The stand-in's pack, made once before notebooks that run side by side read it.
pack: $(STAMP) standin
	$(BIN)/python -c "from d2l_face import torch as d2lf; \
		d2lf.pack_face_records(d2lf.get_facerec_dir('faces-casia-ultrasmall'))"

bench: $(STAMP) standin
	$(BIN)/python benchmarks/run_all.py

clean:
	rm -rf _build .pytest_cache .hypothesis
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +
