# Two commands on a fresh machine: `make demo` and `make test`.
# Each creates its virtual environment when missing. torch is installed first, from the pinned CPU
# wheel, so that pip never pulls a CUDA build on a CPU machine.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV ?= .venv
VENV_OPTIMUM ?= .venv-optimum
PYTEST_ARGS ?= -n 2 --dist loadfile -q

export HF_HUB_OFFLINE ?= 1
export HF_DATASETS_OFFLINE ?= 1
export HF_EVALUATE_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: demo test test-optimum test-all install clean

$(VENV)/.installed: pyproject.toml constraints/main.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -c constraints/main.txt -e ".[onnx,dev]"
	touch $@

# The second environment: transformers 4.57.x with Optimum's ONNX exporter.
$(VENV_OPTIMUM)/.installed: pyproject.toml constraints/optimum.txt
	test -x $(VENV_OPTIMUM)/bin/python || $(PYTHON) -m venv $(VENV_OPTIMUM)
	$(VENV_OPTIMUM)/bin/python -m pip install -q --upgrade pip
	$(VENV_OPTIMUM)/bin/python -m pip install -q $(TORCH)
	$(VENV_OPTIMUM)/bin/python -m pip install -q -c constraints/optimum.txt -e ".[optimum,dev]"
	touch $@

install: $(VENV)/.installed

## Train a small teacher on a task made in code, distil it, evaluate both, export the student to int8 ONNX.
demo: $(VENV)/.installed
	$(VENV)/bin/python scripts/distill_classification.py --recipe recipes/demo_synthetic.yaml --output_dir runs/demo

## The test suite in the main environment (newest transformers 5.x).
test: $(VENV)/.installed
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS) tests

## The same suite in the Optimum environment (transformers 4.57.x).
test-optimum: $(VENV_OPTIMUM)/.installed
	$(VENV_OPTIMUM)/bin/python -m pytest $(PYTEST_ARGS) tests

test-all: test test-optimum

clean:
	rm -rf $(VENV) $(VENV_OPTIMUM) runs
