#!/usr/bin/env bash
# The quick-start demo, on CPU: write a tiny random LTX-Video checkpoint and 16 synthetic H.264 videos,
# train a LoRA with 2 processes on FSDP2 (gloo), then load the LoRA into diffusers' LTXPipeline.
# Everything goes to ./demo_out (override with DEMO_OUT=...). Extra arguments go to ptrain.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash launch/setup.sh
PY=.venv/bin/python
OUT=${DEMO_OUT:-demo_out}
rm -rf "$OUT/run"
$PY -m ptrain.testing.tiny --model_name ltx_video --output_dir "$OUT/tiny-ltx-video" >/dev/null
$PY -m ptrain.testing.tiny --videos --num_videos 16 --output_dir "$OUT/data" >/dev/null
echo "== wrote $OUT/tiny-ltx-video (diffusers layout) and $OUT/data (16 mp4 + prompts.txt/videos.txt)"
OMP_NUM_THREADS=1 $PY -m torch.distributed.run --standalone --nproc_per_node 2 -m ptrain \
  --config configs/demo_ltx_video_lora.toml \
  --pretrained_model_name_or_path "$OUT/tiny-ltx-video" --data_root "$OUT/data" --output_dir "$OUT/run" "$@"
$PY - "$OUT" <<'PYEOF'
import json, sys
from pathlib import Path
import torch
from diffusers import LTXPipeline
out = Path(sys.argv[1])
rows = [json.loads(l) for l in (out / "run/metrics.jsonl").read_text().splitlines()]
k = max(1, len(rows) // 4)
first, last = (sum(r["loss"] for r in part) / len(part) for part in (rows[:k], rows[-k:]))
print(f"== metrics.jsonl: {len(rows)} steps; mean loss of the first {k} steps {first:.4f}, of the last {k} {last:.4f}")
pipe = LTXPipeline.from_pretrained(out / "tiny-ltx-video", dtype=torch.float32)
pipe.set_progress_bar_config(disable=True)
pipe.load_lora_weights(out / "run")
cfg = next(iter(pipe.transformer.peft_config.values()))
video = pipe(prompt="a red square moving left", height=32, width=32, num_frames=9, num_inference_steps=4,
             output_type="pt", generator=torch.Generator().manual_seed(0)).frames
print(f"== LTXPipeline loaded the LoRA (r={cfg.r}, lora_alpha={cfg.lora_alpha}) and sampled a video {tuple(video.shape)}")
print(f"== outputs: {out}/run/pytorch_lora_weights.safetensors, metrics.jsonl, logs/ (tensorboard --logdir {out}/run/logs)")
PYEOF
