#!/usr/bin/env bash
# Make an isolated virtual environment .venvs/NAME for tests against other releases than the project's
# .venv resolves (the oldest transformers we claim, the GPU image's, SGLang's pinned stack), so that
# nothing a newer package pulls in leaks into them:
#     bash scripts/venv.sh NAME [--no-deps-extra 'PKG==V ...'] -- PIP_INSTALL_ARGS...
# torch comes first, pinned (TORCH_VERSION, default 2.13.0: the local CPU wheel here; a bare `torch`
# would pull a multi-GB CUDA build), then `pip install PIP_INSTALL_ARGS` (resolved, so pins meet the
# project's own requirements), then the --no-deps extras (packages whose own requirements cannot be met on
# a CPU machine, such as SGLang). Idempotent: a marker holding the arguments skips an unchanged venv.
# Prints the path of the venv's python on its last line.
set -euo pipefail
cd "$(dirname "$0")/.."
NAME=$1; shift
NODEPS=""
if [ "${1:-}" = "--no-deps-extra" ]; then NODEPS=$2; shift 2; fi
[ "${1:-}" = "--" ] && shift
VENV=.venvs/$NAME
TORCH=${TORCH_VERSION:-2.13.0}
MARK="$VENV/.butler-zoo-venv"
WANT="torch==$TORCH | $* | no-deps: $NODEPS"
if [ -f "$MARK" ] && [ "$(cat "$MARK")" = "$WANT" ] && [ -x "$VENV/bin/python" ]; then
  echo "venv $NAME is up to date" >&2
  echo "$VENV/bin/python"
  exit 0
fi
start=$(date +%s)
rm -rf "$VENV"
"${PYTHON:-python3}" -m venv "$VENV"
PY=$VENV/bin/python
pipq() { "$PY" -m pip install -q "$@" 2> >(grep -v "^WARNING: Location" >&2); }
pipq --upgrade pip
pipq "torch==$TORCH"
pipq "$@"
# shellcheck disable=SC2086
[ -z "$NODEPS" ] || pipq --no-deps --no-compile --only-binary=:all: $NODEPS
# Every pinned requirement is what got installed (a resolver may not silently pick another release).
"$PY" - "torch==$TORCH" "$@" $NODEPS <<'PYEOF'
import importlib.metadata as md, re, sys
bad = []
for arg in sys.argv[1:]:
    m = re.fullmatch(r"([A-Za-z0-9_.\-]+)==([^,;\s]+)", arg)
    if m:
        have = md.version(m.group(1))
        if have.split("+")[0] != m.group(2):
            bad.append(f"{m.group(1)}: asked {m.group(2)}, installed {have}")
if bad:
    sys.exit("venv: " + "; ".join(bad))
PYEOF
echo "$WANT" > "$MARK"
echo "venv $NAME: made in $(( $(date +%s) - start )) s" >&2
echo "$VENV/bin/python"
