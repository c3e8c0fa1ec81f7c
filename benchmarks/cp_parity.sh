#!/usr/bin/env bash
# Issue 7 acceptance on CPU: for every model, per-step losses (fp32, 3 steps) of
#   --dp_shards 2 --cp_degree 2 --cp_mode ring|ulysses   (4 processes)
# against
#   --dp_shards 2 --cp_degree 1                           (2 processes)
# on tiny checkpoints and synthetic videos. Usage: bash benchmarks/cp_parity.sh [WORK_DIR]  (~5 min on 2 cores)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh >/dev/null
. .venv/bin/activate
W=${1:-cp_parity_out}
mkdir -p "$W"
export OMP_NUM_THREADS=1
python -m ptrain.testing.tiny --videos --output_dir "$W/data" >/dev/null
for M in ltx_video cogvideox hunyuan_video wan; do
  python -m ptrain.testing.tiny --model_name $M --output_dir "$W/ckpt-$M" >/dev/null
  COMMON=(--model_name $M --pretrained_model_name_or_path "$W/ckpt-$M" --data_root "$W/data" --train_steps 3
          --batch_size 1 --height 32 --width 32 --num_frames 9 --transformer_dtype float32 --vae_dtype float32
          --text_encoder_dtype float32 --text_encoder_2_dtype float32 --report_to none --dataloader_num_workers 0
          --seed 3 --resume_from_checkpoint none)
  torchrun --standalone --nproc_per_node 2 -m ptrain "${COMMON[@]}" --dp_shards 2 --cp_degree 1 \
    --output_dir "$W/$M-ref" > "$W/$M-ref.log" 2>&1
  for MODE in ring ulysses; do
    torchrun --standalone --nproc_per_node 4 -m ptrain "${COMMON[@]}" --dp_shards 2 --cp_degree 2 --cp_mode $MODE \
      --output_dir "$W/$M-$MODE" > "$W/$M-$MODE.log" 2>&1
  done
  python - "$W" $M <<'PY'
import json, sys
w, m = sys.argv[1:]
def losses(k):
    return [json.loads(line)["loss"] for line in open(f"{w}/{m}-{k}/metrics.jsonl")]
ref = losses("ref")
for k in ("ring", "ulysses"):
    x = losses(k)
    rel = max(abs(a - b) / abs(b) for a, b in zip(x, ref))
    print(f"{m:14s} cp2 {k:8s} {' '.join(f'{v:.6f}' for v in x)}  vs cp1 {' '.join(f'{v:.6f}' for v in ref)}"
          f"  max rel diff {rel:.1e}  {'OK' if rel <= 1e-4 else 'FAIL'}")
PY
done
