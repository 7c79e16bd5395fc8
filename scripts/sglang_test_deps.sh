#!/usr/bin/env bash
# The SGLang stacks for the CPU tests of the SGLang plugin (tests/test_sglang.py), one venv per supported
# release (butler_sglang.SUPPORTED_SGLANG_VERSIONS), .venvs/sglang-0.5.12 and .venvs/sglang-0.5.23, so that
# nothing the project's .venv holds (a newer transformers, the `kernels` package transformers >= 5.25 pulls
# in) leaks into SGLang's processes, nor one release's pins into the other's. scripts/bootstrap.sh
# (make setup) runs it:
#     bash scripts/sglang_test_deps.sh              # both
#     bash scripts/sglang_test_deps.sh 0.5.23       # one
# Each venv: torch first (scripts/venv.sh, TORCH_VERSION), then the project and the pins SGLang shares with
# it, resolved, then SGLang itself and the small modules it imports, --no-deps (its own requirements are GPU
# packages). scripts/venv.sh skips a venv whose arguments did not change.
#
# The pins are what `python -m sglang.launch_server --help`, `sglang.srt.server_args`,
# `sglang.srt.layers.attention.triton_backend`, `sglang.srt.mem_cache.memory_pool`,
# `sglang.srt.model_executor.model_runner`, `sglang.srt.model_executor.pool_configurator`,
# `sglang.srt.models.llama` and `sglang.srt.layers.rotary_embedding` import on a CPU machine (traced with
# shared/gpu-sglang/trace_imports.py): the versions SGLang's metadata pins, else the ones of its release's
# time (`pip download --uploaded-prior-to`: 2026-05-20 for 0.5.12, as the GPU recipe
# shared/gpu-sglang/README.md; 2026-10-31 for 0.5.23, uploaded 2026-10-30).
# numpy==2.2.6: under TRITON_INTERPRET=1 the interpreter turns loaded scalars into 1-element arrays,
# which numpy >= 2.3 refuses to convert with int(); SGLang's create_flashinfer_kv_indices_triton
# loops over such a value.
# No torchvision: there is no CPU build on the registry; the tests use the labelled stand-in in
# tests/sglang_stubs/ instead.
set -euo pipefail
cd "$(dirname "$0")/.."

# SGLang 0.5.12: torch 2.11 pinned by SGLang; the CPU wheel 2.13.0 here (the project's CI torch), triton
# 3.6.0 through the project's test extra.
sglang_0_5_12() {
  local PINS=(
    sglang==0.5.12
    transformers==5.6.0 tokenizers==0.22.2 huggingface_hub==1.33.0 numpy==2.2.6
    fastapi==0.140.0 starlette==1.7.0 uvicorn==0.54.0 python-multipart==0.0.32
    pydantic==2.13.5 pydantic-core==2.46.5 annotated-types==0.8.0 typing-inspection==0.4.4
    orjson==3.11.9 pyzmq==27.1.0 pybase64==1.4.3 msgspec==0.21.1 setproctitle==1.3.7
    partial-json-parser==0.2.1.1.post7 dill==0.4.1 loguru==0.7.3 compressed-tensors==0.15.0.1
    openai==2.6.1 distro==1.9.0 jiter==0.15.0 sniffio==1.3.1 httpx==0.28.1 httpcore==1.0.9
    ipython==9.17.1 traitlets==5.16.1
    aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0
    multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
    sentencepiece==0.2.3 einops==0.8.2
  )
  bash scripts/venv.sh sglang-0.5.12 --no-deps-extra "${PINS[*]}" -- \
    -e ".[test]" transformers==5.6.0 tokenizers==0.22.2 huggingface_hub==1.33.0 numpy==2.2.6
}

# SGLang 0.5.23: torch==2.14.1 and transformers==5.19.0 pinned by SGLang (torch 2.14.1 is a CUDA 13 build,
# ~5.5 GB in the venv with its nvidia-* wheels; it runs on the CPU). torch 2.14.1 requires triton ~= 3.8,
# which the project's test extra (triton==3.6.0) excludes, so this venv takes `-e .` and pytest instead
# of `.[test]`. Metadata pins: openai 2.8.0, compressed-tensors 0.18.0, sentencepiece 0.2.1,
# apache-tvm-ffi 0.1.11 (imported at module level by sglang.kernels since 0.5.23), tokenizers 0.23.2.
# New next to 0.5.12's set: annotated-doc (fastapi >= 0.150), opentelemetry-api (fastapi >= 0.142, imported
# by model_runner's path), pillow (0.5.12's venv gets it through matplotlib in the test extra).
sglang_0_5_23() {
  local PINS=(
    sglang==0.5.23
    transformers==5.19.0 tokenizers==0.23.2 huggingface_hub==1.33.0 numpy==2.2.6
    fastapi==0.165.0 annotated-doc==0.0.7 starlette==1.10.0 uvicorn==0.55.0 python-multipart==0.0.34
    pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5
    orjson==3.13.0 pyzmq==27.2.0 pybase64==1.5.1 msgspec==0.22.0 setproctitle==1.3.8
    partial-json-parser==0.2.1.1.post7 dill==0.4.1 loguru==0.7.3 compressed-tensors==0.18.0
    openai==2.8.0 distro==1.9.0 jiter==0.18.0 sniffio==1.3.1 httpx==0.29.0 httpcore==1.0.9
    ipython==9.18.0 traitlets==5.16.1
    aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0
    multidict==7.2.1 propcache==0.5.4 yarl==1.25.1
    sentencepiece==0.2.1 einops==0.8.2 apache-tvm-ffi==0.1.11 pillow==13.0.0 opentelemetry-api==1.45.2
  )
  TORCH_VERSION=2.14.1 bash scripts/venv.sh sglang-0.5.23 --no-deps-extra "${PINS[*]}" -- \
    -e . "pytest>=8" "pytest-timeout>=2.3" triton==3.8.0 \
    transformers==5.19.0 tokenizers==0.23.2 huggingface_hub==1.33.0 numpy==2.2.6
}

VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(0.5.12 0.5.23)
for v in "${VERSIONS[@]}"; do
  case "$v" in
    0.5.12) sglang_0_5_12 ;;
    0.5.23) sglang_0_5_23 ;;
    *) echo "sglang_test_deps.sh: no recipe for SGLang $v (known: 0.5.12 0.5.23)" >&2; exit 2 ;;
  esac
done
