#!/usr/bin/env bash
# Create ./.venv with ptrain and its dependencies (idempotent). Needs only python3 >= 3.11.
# torch is installed first and pinned to 2.13.0 (a CPU wheel is on this kind of machine's disk;
# on a CUDA machine pip takes the CUDA build of the same version).
#
#   bash launch/setup.sh [--wheelhouse DIR] [--system-torch]
#
# --wheelhouse DIR: install from DIR only (`pip install --no-index --find-links DIR`; made by launch/wheelhouse.sh).
# --system-torch: the venv sees the system's packages (--system-site-packages) and keeps the image's torch: torch
#   is never installed or replaced (ptrain accepts torch >= 2.11).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
WHEELHOUSE="" SYSTEM_TORCH=0
while [ $# -gt 0 ]; do
  case "$1" in
    --wheelhouse) WHEELHOUSE=${2:?--wheelhouse needs a folder}; shift 2 ;;
    --system-torch) SYSTEM_TORCH=1; shift ;;
    *) echo "launch/setup.sh: unknown option $1 (use --wheelhouse DIR, --system-torch)" >&2; exit 2 ;;
  esac
done
if [ -n "$WHEELHOUSE" ] && [ ! -d "$WHEELHOUSE" ]; then
  echo "launch/setup.sh: --wheelhouse $WHEELHOUSE: no such folder (make it with bash launch/wheelhouse.sh DIR)" >&2
  exit 2
fi
PIP_SOURCE=() EXTRAS="[test]"
if [ -n "$WHEELHOUSE" ]; then PIP_SOURCE=(--no-index --find-links "$WHEELHOUSE"); EXTRAS=""; fi
if [ ! -x .venv/bin/python ]; then
  if [ "$SYSTEM_TORCH" = 1 ]; then "$PY" -m venv --system-site-packages .venv; else "$PY" -m venv .venv; fi
fi
if [ "$SYSTEM_TORCH" = 1 ] && ! .venv/bin/python -c "import torch" 2>/dev/null; then
  echo "launch/setup.sh: --system-torch: the system python has no torch" >&2
  exit 2
fi
stamp=.venv/.ptrain-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  [ -n "$WHEELHOUSE" ] || .venv/bin/python -m pip install -q --upgrade pip
  [ "$SYSTEM_TORCH" = 1 ] || .venv/bin/python -m pip install -q "${PIP_SOURCE[@]}" "torch==2.13.0"
  .venv/bin/python -m pip install -q "${PIP_SOURCE[@]}" -e ".$EXTRAS"
  touch "$stamp"
fi
