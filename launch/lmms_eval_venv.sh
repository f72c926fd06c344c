#!/usr/bin/env bash
# Builds a virtualenv with lmms-eval 0.7.3 and llava-jax (its `llava_jax` model), beside the project's:
#
#   launch/lmms_eval_venv.sh VENV        (then: VENV/bin/lmms-eval --model llava_jax ...)
#
# lmms-eval cannot share the project's venv: it needs torchvision, whose PyPI wheels are CUDA builds that do not
# load with the CPU torch pinned here (and that transformers imports once present), and it needs protobuf < 7
# (through wandb) and filelock < 4 (its evaluator imports filelock._api). So: the project's pins as constraints
# (torch stays the CPU build), lmms-eval on top, its torchvision removed (lmms-eval's image tasks do not need it),
# llava-jax installed without dependencies.
set -euo pipefail
VENV=${1:?usage: $0 VENV}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PYTHON=${PYTHON:-python3}
"$PYTHON" -m venv "$VENV"
# PyAV is left to lmms-eval, which pins its own (video decoding is not what this venv is for).
grep -v '^\s*#' "$ROOT/requirements.txt" | sed 's/#.*//' | grep -v '^\s*$' | grep -v '^av==' > "$VENV/constraints.txt"
"$VENV/bin/pip" install -q --no-compile -c "$VENV/constraints.txt" -r "$VENV/constraints.txt" lmms-eval==0.7.3 \
  "filelock<4"
"$VENV/bin/pip" uninstall -q -y torchvision
"$VENV/bin/pip" install -q --no-compile --no-deps -e "$ROOT"
