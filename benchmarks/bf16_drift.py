"""Drift of --full_bf16 (bfloat16 weights and moments, no float32 masters) against float32 master weights.

A tiny LTX-Video transformer (ptrain.testing.tiny; its weights rounded to bfloat16 first, so every run starts
from the same values) is fully fine-tuned for --steps steps on synthetic videos, one process on the CPU, with
bfloat16 compute in every run, precomputed inputs, a constant learning rate, AdamW, the same seed and data:

  * float32 masters: ptrain's default full fine-tune (float32 weights, gradients and moments);
  * --full_bf16 with stochastic rounding (the default) and with round-to-nearest.

Per run: the final loss (mean of the last 20 steps), and how far its weight update W_T - W_0 is from the float32
masters' update: relative error ||dW - dW_ref|| / ||dW_ref||, cosine similarity, and the update's norm relative to
the reference's (with round-to-nearest, updates smaller than half a bfloat16 unit are lost: the ratio falls).

    python benchmarks/bf16_drift.py [--steps 200] [--lr 1e-5 1e-4]     # writes benchmarks/results/bf16_drift.*
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
VARIANTS = {"float32 masters": [], "full_bf16, stochastic": ["--full_bf16"],
            "full_bf16, nearest": ["--full_bf16", "--bf16_rounding", "nearest"]}  # fmt: skip


def prepare(work: Path) -> tuple[Path, Path]:
    """A tiny LTX-Video checkpoint with bfloat16-representable transformer weights, and synthetic videos."""
    from safetensors.torch import load_file, save_file

    from ptrain.testing.tiny import write_synthetic_videos, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(work / "ckpt", "ltx_video", seed=0)
    for f in (ckpt / "transformer").glob("*.safetensors"):
        save_file({k: v.to(torch.bfloat16).to(v.dtype).contiguous() for k, v in load_file(f).items()}, f)
    return ckpt, write_synthetic_videos(work / "data", num_videos=8, seed=0)


def train(ckpt: Path, data: Path, out: Path, steps: int, lr: float, extra: list[str]) -> None:
    cmd = [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
           "--output_dir", str(out), "--training_type", "full-finetune", "--transformer_dtype", "bfloat16",
           "--vae_dtype", "float32", "--text_encoder_dtype", "float32", "--height", "32", "--width", "32",
           "--num_frames", "9", "--train_steps", str(steps), "--lr", str(lr), "--lr_scheduler", "constant",
           "--checkpointing_steps", "0", "--enable_precomputation", "--precomputation_dir", str(out.parent / "cache"),
           "--precomputation_reuse", "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0", *extra]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    if p.returncode != 0:
        raise RuntimeError(f"ptrain failed ({' '.join(extra) or 'float32 masters'}):\n{p.stderr[-3000:]}")


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update({k: v.double() for k, v in load_file(f).items()})
    return out


def compare(w0: dict, ref: dict, run: dict) -> dict:
    d_ref = torch.cat([(ref[k] - w0[k]).flatten() for k in sorted(w0)])
    d_run = torch.cat([(run[k] - w0[k]).flatten() for k in sorted(w0)])
    return {"rel_error": float((d_run - d_ref).norm() / d_ref.norm()),
            "cosine": float(torch.nn.functional.cosine_similarity(d_run, d_ref, dim=0)),
            "update_norm_ratio": float(d_run.norm() / d_ref.norm())}  # fmt: skip


def measure(work: Path, steps: int, lr: float, variants=VARIANTS) -> dict:
    """Train every variant from the same start; their final loss and update compared with float32 masters'."""
    ckpt, data = (work / "ckpt", work / "data") if (work / "ckpt").is_dir() else prepare(work)
    w0 = weights(ckpt / "transformer")
    res = {}
    for name, extra in variants.items():
        out = work / f"run-{lr:g}-{name.replace(' ', '').replace(',', '-')}"
        train(ckpt, data, out, steps, lr, extra)
        losses = [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
        res[name] = {"final_loss": sum(losses[-20:]) / len(losses[-20:]), "weights": weights(out / "transformer")}
    ref = res["float32 masters"]["weights"]
    for r in res.values():
        r.update(compare(w0, ref, r.pop("weights")))
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--lr", type=float, nargs="+", default=[1e-5, 1e-4])
    args = ap.parse_args()
    t0 = time.perf_counter()
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for lr in args.lr:
            rows[f"{lr:g}"] = measure(Path(tmp), args.steps, lr)
            print(f"lr {lr:g}: " + json.dumps(rows[f"{lr:g}"]), file=sys.stderr, flush=True)
    lines = [f"Generated by `python benchmarks/bf16_drift.py --steps {args.steps}` in {time.perf_counter() - t0:.0f} s "
             f"(torch {torch.__version__}, CPU, one process): tiny LTX-Video, full fine-tune, {args.steps} steps, "
             "AdamW, constant learning rate, bfloat16 compute; the weight update W_T - W_0 compared with the float32 "
             "masters' run.", "",
             "| lr | weights | final loss (last 20 steps) | update error vs float32 masters | cosine | update norm / "
             "float32 masters' |", "|---|---|---|---|---|---|"]  # fmt: skip
    for lr, res in rows.items():
        for name, r in res.items():
            lines.append(f"| {lr} | {name} | {r['final_loss']:.4f} | {r['rel_error']:.3f} | {r['cosine']:.3f} "
                         f"| {r['update_norm_ratio']:.2f} |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "bf16_drift.json").write_text(json.dumps({"steps": args.steps, "rows": rows}, indent=1) + "\n")
    (RESULTS / "bf16_drift.md").write_text(table + "\n")


if __name__ == "__main__":
    main()
