#!/usr/bin/env bash
# Create ./.venv with ptrain and its dependencies (idempotent). Needs only python3 >= 3.11.
# torch is installed first and pinned to 2.13.0 (a CPU wheel is on this kind of machine's disk;
# on a CUDA machine pip takes the CUDA build of the same version).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.ptrain-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q "torch==2.13.0"
  .venv/bin/python -m pip install -q -e ".[test]"
  touch "$stamp"
fi
