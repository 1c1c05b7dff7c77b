# make demo: set up .venv if needed, then train and evaluate a detector on the embedded demo data.
# make seg-demo: the same for semantic segmentation.
# make test: set up .venv if needed, then run the test suite.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test demo seg-demo clean-venv

setup:
	bash tools/setup_env.sh

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) tools/demo.py

seg-demo: setup
	$(PYTHON) tools/seg_demo.py

clean-venv:
	rm -rf $(VENV)
