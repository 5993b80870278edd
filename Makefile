# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: on this machine pip takes them from local files.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,viz]'
	command -v dot >/dev/null || (apt-get update -q && apt-get install -y -q graphviz) || \
		echo "graphviz's dot is missing: pictures need it (apt-get install graphviz)"
	touch $(STAMP)

demo: setup
	$(PY) -m pipecomp demo

test: setup
	$(PY) -m pytest -q -p no:cacheprovider

bench: setup
	$(PY) benchmarks/bench_compiler.py

clean:
	rm -rf $(VENV) out
