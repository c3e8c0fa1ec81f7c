#!/usr/bin/env bash
# Several machines: run this same command on every node; torchrun's c10d rendezvous forms the group.
#
#   NNODES=4 MASTER_ADDR=node0 bash launch/multi_node.sh --config configs/hunyuan_video/full.toml \
#       --pretrained_model_name_or_path CKPT --data_root DATA --output_dir /shared/OUT --dp_degree 4 --dp_shards 8
#
# Environment:
#   NNODES            number of nodes (required), or MIN:MAX for elastic membership
#   MASTER_ADDR       host of the rendezvous (any one node; required)   MASTER_PORT  default 29500
#   NPROC_PER_NODE    processes per node (default: visible GPUs, else 1)
#   RUN_ID            rendezvous id shared by the nodes of one job (default: ptrain-$MASTER_ADDR)
#   MAX_RESTARTS      torchrun restarts of the whole group after a failure (default 3); a restarted group resumes
#                     from the latest complete checkpoint in --output_dir (--resume_from_checkpoint auto), so
#                     --output_dir must be on storage every node sees
#   PTRAIN_LAUNCH_DRY=1  print the command only
# Set NCCL variables (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) for your network before calling; see launch/slurm.sbatch.
set -euo pipefail
# Relative paths in the arguments are the caller's: no cd; ptrain is found in this checkout.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"
: "${NNODES:?set NNODES (number of nodes)}" "${MASTER_ADDR:?set MASTER_ADDR (rendezvous host)}"
PYTHON=${PYTHON:-$([ -x "$REPO/.venv/bin/python" ] && echo "$REPO/.venv/bin/python" || echo python3)}
if [ -z "${NPROC_PER_NODE:-}" ]; then
  NPROC_PER_NODE=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  [ "${NPROC_PER_NODE:-0}" -gt 0 ] || NPROC_PER_NODE=1
fi
export TORCH_NCCL_ASYNC_ERROR_HANDLING=${TORCH_NCCL_ASYNC_ERROR_HANDLING:-1}  # a hung collective fails the job
CMD=("$PYTHON" -m torch.distributed.run --nnodes "$NNODES" --nproc_per_node "$NPROC_PER_NODE"
     --rdzv_backend c10d --rdzv_endpoint "$MASTER_ADDR:${MASTER_PORT:-29500}" --rdzv_id "${RUN_ID:-ptrain-$MASTER_ADDR}"
     --max_restarts "${MAX_RESTARTS:-3}" -m ptrain "$@")
if [ "${PTRAIN_LAUNCH_DRY:-0}" = 1 ]; then printf '%q ' "${CMD[@]}"; echo; exit 0; fi
exec "${CMD[@]}"
