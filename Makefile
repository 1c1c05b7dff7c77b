# make demo: set up .venv if needed, then train and evaluate a detector on the embedded demo data.
# make seg-demo: the same for semantic segmentation.
# make test: set up .venv if needed, then run the test suite.
# make lint: set up .venv if needed, then check the Python sources with ruff (configured in pyproject.toml).
# make asan: build the kernels with AddressSanitizer in a scratch copy and run the op tests under it.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test lint asan demo seg-demo clean-venv

setup:
	bash tools/setup_env.sh

test: setup
	$(PYTHON) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check .

asan: setup
	bash tools/asan_check.sh

demo: setup
	$(PYTHON) demo/detection_demo.py

seg-demo: setup
	$(PYTHON) demo/segmentation_demo.py

clean-venv:
	rm -rf $(VENV)
