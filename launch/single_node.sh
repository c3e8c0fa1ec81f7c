#!/usr/bin/env bash
# One machine, all its GPUs (or NPROC processes on CPU): torchrun --standalone -m ptrain ARGS.
#
#   bash launch/single_node.sh --config configs/cogvideox/lora.toml --pretrained_model_name_or_path CKPT \
#       --data_root DATA --output_dir OUT [--dp_shards 8 ...]
#
# Environment: NPROC (default: number of visible GPUs, else 1), PYTHON (default: this checkout's .venv/bin/python
# if present),
# MAX_RESTARTS (default 0; with >0 a crashed worker restarts the group, which resumes from the latest
# checkpoint: --resume_from_checkpoint defaults to auto), PTRAIN_LAUNCH_DRY=1 prints the command only.
set -euo pipefail
# Relative paths in the arguments are the caller's: no cd; ptrain is found in this checkout.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
if [ -z "${NPROC:-}" ]; then
  NPROC=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC:-0}" -gt 0 ] || NPROC=1
fi
CMD=("$PYTHON" -m torch.distributed.run --standalone --nproc_per_node "$NPROC" --max_restarts "${MAX_RESTARTS:-0}"
     -m ptrain "$@")
if [ "${PTRAIN_LAUNCH_DRY:-0}" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
