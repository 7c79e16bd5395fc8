#!/bin/bash
# Runs ON THE GPU MACHINE from the root of the checkout (the `run` tool's working directory).
# Subcommands (see README.md beside this file for the order of the calls and their carry lists):
#   install DIR       pip-install the carried wheels DIR/*.whl into /tmp/site (shared recipe)
#   install-butler    pip install --no-deps --no-build-isolation --target /tmp/site .  (offline; registers
#                     the sglang.srt.plugins entry point) and check that SGLang sees the plugin
#   check             GPU imports, versions, entry point, backend registration
#   gguf-append NAME  append .carry/NAME/part to /tmp/smollm2-gguf/<gguf>.part (call in order)
#   gguf-finish       rename the assembled GGUF and check its sha256
#   functional | bench [NAMES] | smollm2    run.py (servers, requests, tables, JSON in $OUT)
set -u
HERE=$(cd "$(dirname "$0")" && pwd)
REPO=$(pwd)
OUT=${OUT:-/tmp/sgl-out}; mkdir -p "$OUT"; export OUT
PY=${PY:-python3}
GGUF=SmolLM2-135M-Instruct.Q4_1.gguf

env_setup() {
  export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 PYTHONUNBUFFERED=1
  if ! ldconfig -p | grep -q 'libnuma.so.1'; then
    export LD_LIBRARY_PATH=/tmp/sgl-lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  fi
}

case "${1:-}" in
install)
  t0=$(date +%s.%N)
  D=${2:-.whl}; case $D in /*) SRC=$D;; *) SRC="$REPO/$D";; esac
  mkdir -p /tmp/sgl-lib; cp -f "$SRC"/lib/* /tmp/sgl-lib/ 2>/dev/null || true
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site "$SRC"/*.whl 2>&1 | grep -v -i 'warning: target directory' || true
  echo "installed $(ls "$SRC"/*.whl | wc -l) wheels from $SRC into /tmp/site in $(awk "BEGIN{printf \"%.1f\", $(date +%s.%N) - $t0}") s"
  ;;
install-butler)
  $PY -m pip install -q --no-index --no-deps --no-build-isolation --no-compile --upgrade --target /tmp/site . 2>&1 \
    | grep -v -i -E 'warning: target directory|^\s*$' | tail -5
  env_setup
  (cd /tmp && $PY -c "
from importlib.metadata import entry_points, version
eps = [e for e in entry_points(group='sglang.srt.plugins') if e.name == 'tokenbutler']
print('butler-zoo', version('butler-zoo'), '| entry point:', eps[0].value if eps else 'MISSING')
assert eps, 'the sglang.srt.plugins entry point is not registered'
")
  ;;
check)
  env_setup
  nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version --format=csv
  (cd /tmp && $PY - <<'PY'
import importlib, time
t = time.time()
import torch, triton
print("torch", torch.__version__, "| triton", triton.__version__, "|", torch.cuda.get_device_name(0))
for m in ["transformers", "sgl_kernel", "flashinfer.sampling", "sglang.launch_server", "sglang.srt.model_executor.model_runner",
          "sglang.srt.layers.attention.triton_backend", "butler_kernels", "butler_sglang.backend"]:
    try:
        mod = importlib.import_module(m); print("OK  ", m, getattr(mod, "__version__", ""))
    except Exception as e:
        print("FAIL", m, type(e).__name__, str(e)[:300])
from sglang.srt.plugins import load_plugins
load_plugins()
from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
print("tokenbutler backend registered:", "tokenbutler" in ATTENTION_BACKENDS, "| import time %.1f s" % (time.time() - t))
PY
  ) ;;
gguf-append)
  mkdir -p /tmp/smollm2-gguf
  cat "$REPO/.carry/$2/part" >> /tmp/smollm2-gguf/$GGUF.part
  [ -f "$REPO/.carry/$2/sha256" ] && cp "$REPO/.carry/$2/sha256" /tmp/smollm2-gguf/sha256
  ls -la /tmp/smollm2-gguf ;;
gguf-finish)
  cd /tmp/smollm2-gguf && mv -f $GGUF.part $GGUF && sha256sum -c sha256 && ls -la ;;
functional|smollm2|bench)
  if [ ! -d /tmp/site/sglang ] || [ ! -d /tmp/site/butler_sglang ]; then
    echo "no SGLang/butler-zoo in /tmp/site: the machine was given back; start again from the install calls"; exit 3
  fi
  env_setup
  if [ "$1" = bench ]; then $PY "$HERE/run.py" bench "${2:-dense64,tb}"; else $PY "$HERE/run.py" "$1"; fi ;;
*) echo "usage: $0 install DIR|install-butler|check|gguf-append NAME|gguf-finish|functional|bench [NAMES]|smollm2"; exit 2 ;;
esac
