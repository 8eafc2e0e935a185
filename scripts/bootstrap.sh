#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment at .venv and install tpr into it.
# Idempotent: a second run only checks that the install matches pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for cand in python3.11 python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
      PY=$cand; break
    fi
  done
fi
[[ -n "$PY" ]] || { echo "error: Python 3.11 is required (set PYTHON=/path/to/python3.11)" >&2; exit 1; }

STAMP=.venv/.tpr-installed
WANT=$(cat pyproject.toml scripts/bootstrap.sh | sha256sum | cut -c1-16)
if [[ -x .venv/bin/python && -f $STAMP && "$(cat $STAMP)" == "$WANT" ]]; then
  exit 0
fi

echo "[bootstrap] installing into .venv (first run takes several minutes)" >&2
[[ -x .venv/bin/python ]] || "$PY" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip setuptools wheel
# torch first, with its matching torchvision (timm needs torchvision).
"${PIP[@]}" install "torch==2.14.1" "torchvision==0.29.1"
# DeepSpeed ships as an sdist that imports torch at build time: build it against the torch above.
if ! .venv/bin/python -c 'import deepspeed' >/dev/null 2>&1; then
  DS_BUILD_OPS=0 "${PIP[@]}" install --no-build-isolation "deepspeed==0.19.8"
fi
"${PIP[@]}" install -e ".[dev]"
echo "$WANT" > $STAMP
echo "[bootstrap] done" >&2
