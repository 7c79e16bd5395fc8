# The two commands of the README:
#   make demo   set up .venv and show the method: dense vs TokenButler decode on a 3.4K-token context
#   make test   set up .venv and run the whole test suite, then the transformers-dependent tests on the
#               oldest supported transformers and the GPU image's, each in its own venv
.PHONY: setup demo test test-fast test-compat

setup:
	bash scripts/bootstrap.sh

demo: setup
	.venv/bin/butler-zoo demo

test: setup
	@.venv/bin/python -c "import torch, transformers, huggingface_hub; print(f'== main .venv: transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}')"
	.venv/bin/python -m pytest -q
	bash scripts/test_compat.sh

# The oldest supported transformers and the GPU image's, each in its own venv (scripts/test_compat.sh).
test-compat:
	bash scripts/test_compat.sh

test-fast: setup
	.venv/bin/python -m pytest -q -m "not slow"
