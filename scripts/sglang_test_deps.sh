#!/usr/bin/env bash
# The SGLang stack for the CPU tests of the SGLang plugin (tests/test_sglang.py), in a venv of its own,
# .venvs/sglang-0.5.12, so that nothing the project's .venv holds (a newer transformers, the `kernels`
# package transformers >= 5.25 pulls in) leaks into SGLang's processes. scripts/bootstrap.sh (make setup)
# runs it:
#     bash scripts/sglang_test_deps.sh
# The project and the pins SGLang shares with it are installed resolved (-e . with transformers 5.6.0 ...);
# SGLang itself and the small modules it imports go --no-deps (its own requirements are GPU packages).
#
# The pins are what `python -m sglang.launch_server --help`, `sglang.srt.server_args`,
# `sglang.srt.layers.attention.triton_backend`, `sglang.srt.mem_cache.memory_pool`,
# `sglang.srt.model_executor.model_runner` and `sglang.srt.models.llama` import on a CPU machine
# (traced with shared/gpu-sglang/trace_imports.py), at their versions of SGLang 0.5.12's time where
# the GPU recipe (shared/gpu-sglang/README.md) pins them.
# numpy==2.2.6: under TRITON_INTERPRET=1 the interpreter turns loaded scalars into 1-element arrays,
# which numpy >= 2.3 refuses to convert with int(); SGLang's create_flashinfer_kv_indices_triton
# loops over such a value.
# No torchvision: there is no CPU build on the registry; the tests use the labelled stand-in in
# tests/sglang_stubs/ instead.
set -euo pipefail
cd "$(dirname "$0")/.."
PINS=(
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
