"""Throughput: FLOPs per step of the full-size models, and measured step times, tokens/s and MFU on this machine.

Part 1 (counted, no GPU): FLOPs of one transformer forward+backward of every full-size model
(benchmarks/model_configs/) at its usual resolution, counted with torch.utils.flop_counter.FlopCounterMode on
fake tensors, and the step time it implies at 40% MFU on an H100 (989 dense bf16 TFLOP/s) — an estimate, not
a measurement.

Part 2 (measured here): for each model's tiny checkpoint (ptrain.testing.tiny) and synthetic videos,
  * ptrain itself: `python -m ptrain` for a few steps on 1 process; median step time, data time, tokens/s;
  * a bare PyTorch loop on the same transformer and batch (latents and text embeddings computed once):
    forward / backward / optimizer time split, FLOPs per step (FlopCounterMode) and MFU against this CPU's
    measured float32 matmul peak;
  * the trainer's overhead: its step time over the bare loop's (the trainer also decodes video, runs the VAE
    and the text encoder every step, as ptrain does without precomputed conditioning).
Communication time is 0 here (one process); eager only unless --compile (inductor on CPU costs minutes).

    python benchmarks/throughput.py [--steps 6] [--compile] [--json F] [--markdown F]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.memory import CONFIGS, RES, RESULTS  # noqa: E402

H100_BF16_TFLOPS = 989.0  # dense, SXM (../shared/reference/published_numbers.md)
MODELS = {"ltx_video": "ltx-video", "cogvideox": "cogvideox-5b", "hunyuan_video": "hunyuan-video",
          "wan": "wan2.1-14b"}  # fmt: skip
#: Part 2's trainer decodes and encodes every step (precomputation off), as the README's throughput section says.
TINY = ["--height", "64", "--width", "64", "--num_frames", "9", "--transformer_dtype", "float32",
        "--vae_dtype", "float32", "--text_encoder_dtype", "float32", "--text_encoder_2_dtype", "float32",
        "--report_to", "none", "--dataloader_num_workers", "1", "--batch_size", "1",
        "--enable_precomputation", "off"]  # fmt: skip


def full_size_flops(variant: str) -> dict:
    """Forward+backward FLOPs of the full transformer (full fine-tune) at RES[variant], counted on fake tensors."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.utils.flop_counter import FlopCounterMode

    from ptrain.models.spec import Components, get_spec
    from ptrain.planner import _meta_model

    model = json.loads((CONFIGS / variant / "ptrain_variant.json").read_text())["model_name"]
    spec = get_spec(model)
    f, h, w = RES[variant]
    transformer = _meta_model(spec.transformer_cls, CONFIGS / variant, "transformer", dtype=torch.bfloat16)
    vae = _meta_model(spec.component_classes["vae"], CONFIGS / variant, "vae", dtype=torch.bfloat16)
    scheduler = spec.component_classes["scheduler"]()  # outside fake mode (it reads tensor values)
    with FakeTensorMode(allow_non_fake_inputs=True):
        transformer, vae = transformer.to_empty(device="cpu"), vae.to_empty(device="cpu")
        extra = {k: None for k in spec.component_classes if k not in
                 ("transformer", "vae", "scheduler", "text_encoder", "tokenizer")}  # fmt: skip
        comps = Components(transformer, vae, None, None, scheduler, extra)
        spec.bind(comps)
        with torch.no_grad():
            shape = vae.encode(torch.zeros(1, 3, f, h, w, dtype=torch.bfloat16)).latent_dist.mean.shape
        latents = torch.randn(shape, dtype=torch.bfloat16)
        cond = spec.simulated_conditioning(transformer.config, 1, spec.default_max_sequence_length, "cpu",
                                           torch.bfloat16)  # fmt: skip
        counter = FlopCounterMode(display=False)
        with counter:
            spec.forward(transformer, latents, torch.full((1,), 500.0), cond).float().sum().backward()
    flops = counter.get_total_flops()
    tokens = spec.tokens_per_sample(tuple(shape), comps)
    return {"variant": variant, "frames_hw": [f, h, w], "tokens": tokens, "tflop_per_step": flops / 1e12,
            "h100_s_at_40pct_mfu": flops / (0.4 * H100_BF16_TFLOPS * 1e12)}  # fmt: skip


def cpu_matmul_peak_tflops(n: int = 2048, repeat: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeat))
    return 2 * n**3 / best / 1e12


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bare_loop(model: str, ckpt: Path, steps: int, compile_: bool) -> dict:
    """The same transformer and batch as the trainer, in a plain forward/backward/AdamW loop."""
    from torch.utils.flop_counter import FlopCounterMode

    from ptrain.models.spec import get_spec

    spec = get_spec(model)
    comps = spec.load_components(str(ckpt), {k: torch.float32 for k in
                                 ("transformer", "vae", "text_encoder", "text_encoder_2")}, torch.device("cpu"), {})  # fmt: skip
    spec.bind(comps)
    t = comps.transformer.train()
    params = [p for p in t.parameters()]
    opt = torch.optim.AdamW(params, lr=1e-5)
    if compile_:
        for blocks in spec.blocks(t):
            for block in blocks:
                block.compile()
    g = torch.Generator().manual_seed(0)
    video = torch.rand(1, 3, 9, 64, 64, generator=g) * 2 - 1
    latents = spec.encode_video(comps, video, [torch.Generator().manual_seed(1)])
    cond = spec.encode_text(comps, ["a red ball bounces"], spec.max_sequence_length(comps))
    ts = torch.full((1,), 500.0)
    counter = FlopCounterMode(display=False)
    with counter:
        spec.forward(t, latents, ts, cond).float().pow(2).mean().backward()
    opt.zero_grad(set_to_none=True)
    rows = []
    for _ in range(steps + 1):
        out = {}
        t0 = time.perf_counter()
        pred = spec.forward(t, latents, ts, cond)
        loss = (pred.float() - latents).pow(2).mean()
        out["forward"] = time.perf_counter() - t0
        out["backward"] = _timed(loss.backward)
        out["optimizer"] = _timed(lambda: (opt.step(), opt.zero_grad(set_to_none=True)))
        rows.append(out)
    rows = rows[1:]  # the first step warms up
    split = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    return {"split_s": split, "step_s": sum(split.values()), "flops_per_step": counter.get_total_flops(),
            "tokens": spec.tokens_per_sample(tuple(latents.shape), comps)}  # fmt: skip


def trainer_run(model: str, ckpt: Path, data: Path, out: Path, steps: int, compile_: bool) -> dict:
    cmd = [sys.executable, "-m", "ptrain", "--model_name", model, "--pretrained_model_name_or_path", str(ckpt),
           "--data_root", str(data), "--output_dir", str(out), "--train_steps", str(steps + 1), *TINY,
           "--resume_from_checkpoint", "none", "--checkpointing_steps", "0"]  # fmt: skip
    if compile_:
        cmd.append("--compile")
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        raise RuntimeError(f"ptrain failed for {model}:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"step_s": statistics.median(r["step_time_s"] for r in rows),
            "data_s": statistics.median(r["data_time_s"] for r in rows),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in rows)}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--compile", action="store_true", help="also torch.compile the blocks (inductor; slow on CPU)")
    ap.add_argument("--json", default=str(RESULTS / "throughput.json"))
    ap.add_argument("--markdown", default=str(RESULTS / "throughput.md"))
    args = ap.parse_args()
    t_start = time.perf_counter()
    print("counting FLOPs of the full-size models (fake tensors)...", file=sys.stderr, flush=True)
    flops = [full_size_flops(v) for v in MODELS.values()]
    peak = cpu_matmul_peak_tflops()
    print(f"this CPU's float32 matmul peak: {peak:.3f} TFLOP/s ({torch.get_num_threads()} threads)", file=sys.stderr)
    measured = []
    with tempfile.TemporaryDirectory() as tmp:
        from ptrain.testing.tiny import write_synthetic_videos, write_tiny_checkpoint

        data = write_synthetic_videos(Path(tmp) / "data", num_videos=8)
        for model in MODELS:
            ckpt = write_tiny_checkpoint(Path(tmp) / model, model)
            for compiled in [False, True] if args.compile else [False]:
                bare = bare_loop(model, ckpt, args.steps, compiled)
                trainer = trainer_run(model, ckpt, data, Path(tmp) / f"run-{model}-{compiled}", args.steps, compiled)
                row = {"model": model, "compile": compiled, "bare": bare, "trainer": trainer,
                       "mfu_bare": bare["flops_per_step"] / bare["step_s"] / (peak * 1e12),
                       "trainer_over_bare": trainer["step_s"] / bare["step_s"]}  # fmt: skip
                measured.append(row)
                print(f"  {model}{' compiled' if compiled else ''}: trainer {trainer['step_s'] * 1e3:.0f} ms/step, "
                      f"bare loop {bare['step_s'] * 1e3:.0f} ms", file=sys.stderr, flush=True)  # fmt: skip
    lines = ["Full-size models, one transformer forward+backward at batch 1 (FLOPs counted on fake tensors; the time "
             "is an estimate at 40% MFU on an H100, not a measurement):", "",
             "| model | F x H x W | tokens | TFLOP per step | s per step at 40% H100 MFU |", "|---|---|---|---|---|"]  # fmt: skip
    for r in flops:
        f, h, w = r["frames_hw"]
        lines.append(f"| {r['variant']} | {f}x{h}x{w} | {r['tokens']:,} | {r['tflop_per_step']:.0f} "
                     f"| {r['h100_s_at_40pct_mfu']:.2f} |")  # fmt: skip
    lines += ["", f"Measured on this machine's CPU ({torch.get_num_threads()} threads, float32 matmul peak "
              f"{peak:.3f} TFLOP/s), tiny checkpoints, 9x64x64, batch 1, median of {args.steps} steps after one "
              "warm-up:", "",
              "| model | compile | trainer ms/step (data ms) | trainer tokens/s | bare loop ms: fwd / bwd / opt "
              "| bare GFLOP/step | bare MFU | trainer / bare |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in measured:
        b, t = r["bare"], r["trainer"]
        s = b["split_s"]
        lines.append(f"| {r['model']} | {'yes' if r['compile'] else 'no'} | {t['step_s'] * 1e3:.0f} "
                     f"({t['data_s'] * 1e3:.0f}) | {t['tokens_per_s']:.0f} | {s['forward'] * 1e3:.0f} / "
                     f"{s['backward'] * 1e3:.0f} / {s['optimizer'] * 1e3:.0f} | {b['flops_per_step'] / 1e9:.2f} "
                     f"| {r['mfu_bare'] * 100:.1f}% | {r['trainer_over_bare']:.1f}x |")  # fmt: skip
    table = "\n".join(lines)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"full_size": flops, "cpu_peak_tflops": peak, "measured": measured},
                                          indent=1))  # fmt: skip
    Path(args.markdown).write_text(f"Generated by `python benchmarks/throughput.py` in "
                                   f"{time.perf_counter() - t_start:.0f} s (torch {torch.__version__}).\n\n{table}\n")  # fmt: skip
    print(f"\nwrote {args.json} and {args.markdown}", file=sys.stderr)


if __name__ == "__main__":
    main()
