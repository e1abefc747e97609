# adm-megatron developer targets.
#   make install    .venv (Python 3.11) with the CI pins and the package in editable mode
#   make test       the fast suite (everything not marked slow)
#   make test-slow  the slow tests only
#   make demo       the toy teacher distilled with ADM on CPU, before / after samples (outputs/demo)
#   make lint       byte-compile the package, tests and tools (a cheap syntax check)

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.adm-megatron-installed
TORCH_VERSION ?= 2.13.0
# 1 where an NVIDIA GPU is visible: keep / get a CUDA torch instead of the pinned CPU wheel
CUDA ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
PYTEST_TIMEOUT ?= 600
PYTEST_ARGS ?=

DEMO_ITERATIONS ?= 300
DEMO_OUT ?= outputs/demo

.PHONY: install test test-slow demo lint clean distclean

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# re-run when the dependencies change; pip skips what is already installed
$(STAMP): setup.py requirements-ci.txt | $(PY)
ifeq ($(CUDA),1)
	grep -v '^torch==' requirements-ci.txt > $(VENV)/requirements-cuda.txt
	$(PIP) install "torch>=2.4" -r $(VENV)/requirements-cuda.txt
else
	$(PIP) install torch==$(TORCH_VERSION)
	$(PIP) install -r requirements-ci.txt
endif
	$(PIP) install -e '.[dev]'
	touch $(STAMP)

test: install
	$(PY) -m pytest -m "not slow" --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS)

# pytest exits 5 when it collects nothing: no slow test yet is not a failure
test-slow: install
	$(PY) -m pytest -m slow --timeout=3600 $(PYTEST_ARGS) || [ $$? -eq 5 ]

# the committed toy teacher (assets/toy_teacher) distilled with ADM into a 2-step generator (a short
# examples/cogvideox/toy_adm.yaml run), then before / after samples and figures (tools/eval_toy.py)
demo: install
	$(PY) -m adm_megatron.cli train --config examples/cogvideox/toy_adm.yaml \
		train.max_iterations=$(DEMO_ITERATIONS) logging.wandb_mode=offline logging.progress=true \
		output_dir=$(DEMO_OUT)
	$(PY) tools/eval_toy.py --generator $(DEMO_OUT)/generator --steps 2 --per-class 32 --threads 2 \
		--out $(DEMO_OUT)/eval

lint: install
	$(PY) -m compileall -q adm_megatron tests $(wildcard tools)

clean:
	rm -rf build *.egg-info .pytest_cache outputs

distclean: clean
	rm -rf $(VENV)
