#!/usr/bin/env bash
# The transformers releases butler-zoo claims, besides the newest that .venv resolves: the oldest
# supported release and the GPU image's (docs/compile.md), each in a venv of its own (scripts/venv.sh),
# running the tests of the code paths that depend on transformers: sparse decode, compile, errors, the
# Hub and AutoButler. `make test` runs it after the main suite; `make test-compat` runs it alone.
set -euo pipefail
cd "$(dirname "$0")/.."
TESTS=(tests/test_decode.py tests/test_no_silent_dense.py tests/test_compile.py tests/test_errors.py tests/test_hub.py tests/test_auto.py)
# name | pins. The oldest: transformers 5.6.0 (what SGLang 0.5.12 pins) with the oldest huggingface_hub
# the test stack accepts (olah needs >= 1.27). 5.17.0: the lent GPU image's.
COMPAT=(
  "tf-oldest|transformers==5.6.0 huggingface_hub==1.27.0"
  "tf-gpu-image|transformers==5.17.0"
)
for entry in "${COMPAT[@]}"; do
  name=${entry%%|*}
  pins=${entry#*|}
  # shellcheck disable=SC2086
  py=$(bash scripts/venv.sh "$name" -- -e ".[test]" $pins | tail -1)
  "$py" -c "import torch, transformers, huggingface_hub; print(f'== compat $name: transformers {transformers.__version__}, huggingface_hub {huggingface_hub.__version__}, torch {torch.__version__}')"
  "$py" -m pytest -q -p no:cacheprovider "${TESTS[@]}"
done
