"""Throughput: model FLOPs per step of the full-size models, and like-for-like step times on this machine.

Part 1 (counted, no GPU): model FLOPs of one training step (forward + backward, no activation-checkpoint
recompute) of every full-size model (benchmarks/model_configs/) at its usual resolution, as ptrain counts them for
`mfu` (ptrain/flops.py: the trainer's own micro-batch on fake tensors, attention included through a FLOP formula
for the CPU flash SDPA kernel), for a LoRA r128 and a full fine-tune; and the step time that implies at 40% MFU
on an H100 (989 dense bf16 TFLOP/s) - an estimate, not a measurement.

Part 2 (measured here, like for like): the GPU suite's CPU mode (`benchmarks/gpu.py --cpu`) on each model's tiny
checkpoint at 9x64x64: ptrain trains from precomputed latents and text embeddings (`--enable_precomputation`;
the precompute pass is a separate process) and a bare PyTorch loop trains the same LoRA on the same precomputed
sample with the same fused AdamW and gradient clipping, and a flow-matching MSE with fresh noise and timestep
every step, float32, one process, one thread; the step time as the suite times it (windows of steps, see
benchmarks/gpu.py), and MFU against this CPU's measured one-thread float32 matmul peak. Target (issue 15):
trainer / bare <= 1.3.

    python benchmarks/throughput.py [--json F] [--markdown F]
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
sys.path.insert(0, str(REPO))

from benchmarks.gpu import timing_text
from benchmarks.memory import CONFIGS, RES, RESULTS  # noqa: E402

#: ptrain and the bare loop each run this many times, alternating; each keeps its fastest (benchmarks/gpu.py --repeat)
REPEAT = 3
H100_BF16_TFLOPS = 989.0  # dense, SXM (../shared/reference/published_numbers.md)
MODELS = {"ltx_video": "ltx-video", "cogvideox": "cogvideox-5b", "hunyuan_video": "hunyuan-video",
          "wan": "wan2.1-14b"}  # fmt: skip

def full_size_flops(variant: str) -> dict:
    """Model FLOPs of one training step (LoRA r128 and full fine-tune) at RES[variant], as ptrain/flops.py counts."""
    from ptrain.config import parse_config
    from ptrain.flops import step_flops
    from ptrain.models.spec import get_spec

    model = json.loads((CONFIGS / variant / "ptrain_variant.json").read_text())["model_name"]
    spec = get_spec(model)
    f, h, w = RES[variant]
    out = {"variant": variant, "frames_hw": [f, h, w]}
    for kind, flags in (("lora", ["--rank", "128", "--lora_alpha", "128"]), ("full", ["--training_type", "full-finetune"])):
        cfg = parse_config(["--model_name", model, "--pretrained_model_name_or_path", str(CONFIGS / variant),
                            "--num_frames", str(f), "--height", str(h), "--width", str(w), *flags])  # fmt: skip
        key, model_flops, _ = step_flops(cfg, spec, CONFIGS / variant, f, h, w)
        out[f"tflop_{kind}"] = model_flops / 1e12
    out["tokens"] = tokens(spec, variant, f, h, w)
    out["h100_s_lora_at_40pct_mfu"] = out["tflop_lora"] * 1e12 / (0.4 * H100_BF16_TFLOPS * 1e12)
    return out


def tokens(spec, variant: str, f: int, h: int, w: int) -> int:
    """Transformer tokens of one sample (from the configs' shape rules)."""
    rules = spec.shape_rules(str(CONFIGS / variant), {})
    return rules.tokens(f, h, w)


def cpu_matmul_peak_tflops(n: int = 2048, repeat: int = 5, threads: int = 1) -> float:
    """float32 matmul TFLOP/s on `threads` threads: the suite's CPU mode runs its processes on one
    (OMP_NUM_THREADS=1, benchmarks/gpu.py child_env)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = min(_timed(lambda: a @ b) for _ in range(repeat))
    finally:
        torch.set_num_threads(before)
    return 2 * n**3 / best / 1e12


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(out: Path) -> dict:
    """The GPU suite's CPU mode on the throughput rows (benchmarks/gpu.py: CPU_ROWS named cpu-*-lora-64)."""
    from benchmarks.gpu import CPU_ROWS

    names = [r.name for r in CPU_ROWS if r.name.endswith("-lora-64")]
    cmd = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--cpu", "--no_checks", "--out", str(out),
           "--deadline_s", "3600", "--repeat", str(REPEAT), *[a for n in names for a in ("--only", n)]]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"benchmarks/gpu.py --cpu failed:\n{p.stderr[-3000:]}")
    return json.loads((out / "gpu.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", default=str(RESULTS / "throughput.json"))
    ap.add_argument("--markdown", default=str(RESULTS / "throughput.md"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    print("counting model FLOPs of the full-size models (fake tensors)...", file=sys.stderr, flush=True)
    flops = [full_size_flops(v) for v in MODELS.values()]
    peak = cpu_matmul_peak_tflops()
    print(f"this CPU's float32 matmul peak: {peak:.3f} TFLOP/s (one thread)", file=sys.stderr)
    with tempfile.TemporaryDirectory() as tmp:
        suite = measure(Path(tmp))
    measured = [r for r in suite["rows"] if r.get("status") == "ok"]
    for r in measured:
        r["mfu_trainer_cpu"] = r["bare"]["model_flops"] / r["trainer"]["step_s"] / (peak * 1e12)
        r["mfu_bare_cpu"] = r["bare"]["model_flops"] / r["bare"]["step_s"] / (peak * 1e12)
    table = render(flops, measured, peak, suite)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"full_size": flops, "cpu_peak_tflops": peak, "measured": measured,
                                           "skipped": [r for r in suite["rows"] if r.get("status") != "ok"]},
                                          indent=1))  # fmt: skip
    Path(args.markdown).write_text(f"Generated by `python benchmarks/throughput.py` in "
                                   f"{time.perf_counter() - t_start:.0f} s (torch {torch.__version__}).\n\n{table}\n")  # fmt: skip
    print(f"\nwrote {args.json} and {args.markdown}", file=sys.stderr)


def render(flops: list[dict], measured: list[dict], peak: float, suite: dict) -> str:
    lines = ["Full-size models, model FLOPs of one training step at batch 1 (forward + backward, attention included, "
             "no AC recompute; counted on fake tensors by ptrain/flops.py, as ptrain's `mfu`; the time is an estimate "
             "at 40% MFU on an H100, not a measurement):", "",
             "| model | F x H x W | tokens | TFLOP per step, LoRA r128 | TFLOP per step, full fine-tune "
             "| s per LoRA step at 40% H100 MFU |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in flops:
        f, h, w = r["frames_hw"]
        lines.append(f"| {r['variant']} | {f}x{h}x{w} | {r['tokens']:,} | {r['tflop_lora']:.0f} | {r['tflop_full']:.0f} "
                     f"| {r['h100_s_lora_at_40pct_mfu']:.2f} |")  # fmt: skip
    lines += ["", f"Measured on this machine's CPU (one thread, float32 matmul peak {peak:.3f} "
              f"TFLOP/s), like for like: tiny checkpoints, LoRA, 9x64x64, batch 1, float32, precomputed inputs, one "
              f"process, fused AdamW; {timing_text(suite)}; the fastest of {REPEAT} alternating runs of each "
              "(`benchmarks/gpu.py --cpu`). Target: trainer / bare <= 1.3.", "",
              "| model | ptrain ms/step (fwd / bwd / opt) | bare loop ms/step (fwd / bwd / opt) | trainer / bare "
              "| model GFLOP/step | MFU ptrain / bare |", "|---|---|---|---|---|---|"]  # fmt: skip
    for r in measured:
        t, b = r["trainer"], r["bare"]

        def split(x, keys):
            return " / ".join(f"{x[k] * 1e3:.1f}" if x.get(k) is not None else "-" for k in keys)

        lines.append(f"| {r['variant']} | {t['step_s'] * 1e3:.1f} ({split(t, ('forward_s', 'backward_s', 'optimizer_s'))}) "
                     f"| {b['step_s'] * 1e3:.1f} ({split(b, ('forward_s', 'backward_s', 'optimizer_s'))}) "
                     f"| {r['trainer_over_bare']:.2f} | {b['model_flops'] / 1e9:.2f} "
                     f"| {r['mfu_trainer_cpu'] * 100:.1f}% / {r['mfu_bare_cpu'] * 100:.1f}% |")  # fmt: skip
    return "\n".join(lines)


if __name__ == "__main__":
    main()
