# The two commands of the README:
#   make demo   set up .venv and run the main job (sparse vs dense generation with the shipped predictor)
#   make test   set up .venv and run the whole test suite
.PHONY: setup demo test test-fast
PROMPT ?= Explain in two sentences why the sky is blue.

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/butler-zoo generate "$(PROMPT)" --compare-dense --max-new-tokens 48

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
