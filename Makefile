# make demo: set up .venv if needed, then train and evaluate on the embedded demo data.
# make test: set up .venv if needed, then run the test suite.
VENV ?= .venv
PYTHON := $(VENV)/bin/python

.PHONY: setup test demo clean-venv

setup:
	bash tools/setup_env.sh

test: setup
	$(PYTHON) -m pytest -q tests

demo: setup
	$(PYTHON) tools/demo.py

clean-venv:
	rm -rf $(VENV)
