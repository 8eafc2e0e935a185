#!/usr/bin/env bash
# The GPU check (issue #20): bash bench/gpu_check.sh [--dry-run] [gpu_check.py options]
# One table of tpr's GPU paths (CUDA-only tests, evaluation, bf16 ZeRO-2 training, NCCL gather);
# see bench/gpu_check.py and bench/README.md. --dry-run: the same rows on the CPU, tiny preset.
#
# Python: $PYTHON, else the repository's .venv, else python3 (a GPU machine's image, where the
# .venv does not travel). On a real run, modules the rows need that this Python lacks are
# installed first at pyproject.toml's versions (pip; torch never: its CUDA build is the machine's).
set -u
cd "$(dirname "$0")/.." || exit 2
PY=${PYTHON:-}
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi
dry=0
for arg in "$@"; do
    [ "$arg" = "--dry-run" ] && dry=1
done
if [ "$dry" = 0 ]; then
    missing=$("$PY" bench/gpu_check.py --missing) || exit 2
    if [ -n "$missing" ]; then
        echo "[gpu_check] $PY lacks: $missing; installing them (pip)" >&2
        # shellcheck disable=SC2086 # one word per requirement
        "$PY" -m pip install --quiet --retries 0 --timeout 20 $missing >&2 ||
            echo "[gpu_check] pip install failed (offline?): the env row names what is missing" >&2
    fi
fi
exec "$PY" bench/gpu_check.py "$@"
