#!/usr/bin/env bash
# Wheels of ptrain's dependencies except torch, for a GPU node without network (install there with
# `bash launch/setup.sh --wheelhouse DIR --system-torch`). Needs python3 >= 3.11 with pip, and network here.
#
#   bash launch/wheelhouse.sh DIR [--python-version 3.12] [--platform manylinux_2_28_x86_64] \
#       [--exclude-from FILE] [--extras wandb] [--print]
#
# --exclude-from: the target image's `pip list --format=freeze`; packages it has at a version ptrain accepts are
# left out. --print shows the pip commands without running them. See launch/wheelhouse.py.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PYTHON:-python3}
exec "$PY" launch/wheelhouse.py "$@"
