"""The GPU suite: every GPU figure of the README from one command on one GPU, no internet (issue 15, item 1).

For each row (a model, training type, resolution, activation checkpointing (AC), compile, memory cap):
  1. full-size random checkpoints built on the GPU from benchmarks/model_configs/ (the real transformer and VAE
     configs via from_config, bf16, save_pretrained as safetensors; the VAE encoder's last conv scaled by 0.01 so
     random latents stay small). The text encoders are SHORTENED: one layer at the real width, with the tiny
     tokenizer(s) of ptrain.testing.tiny (HunyuanVideo's Llama: two layers, as its pipeline reads
     hidden_states[-3]); the scheduler is the real config. Two synthetic H.264 videos cover
     every row's frames and size. Built once per model, deleted after its last row (disk);
  2. a precompute pass of ptrain (`--enable_precomputation --train_steps 1`, AC, no compile, no memory cap), once
     per model;
  3. the timed ptrain run: `torchrun --standalone --nproc_per_node 1 -m ptrain ... --enable_precomputation
     --precomputation_reuse --log_step_breakdown`, read from its metrics.jsonl;
  4. a bare PyTorch loop (a subprocess of this file) on the same transformer, shapes and precomputed inputs:
     the same LoRA (ptrain.parallelize.make_trainable) or full fine-tune, the same AC (apply_ac) and compile
     (apply_compile) on the plain module, fused AdamW, gradient clipping, flow-matching MSE (noise and sigma drawn
     on the device every step). Its first step is
     uncompiled and counted with FlopCounterMode: model FLOPs (without AC recompute) and hardware FLOPs (with);
  5. the planner's prediction for the same flags (ptrain.planner.plan on the configs, on the CPU, in a
     background process while the GPU works).
Per row it records the device, torch / CUDA versions, peak allocated and reserved (ptrain's peak_memory_gb /
peak_reserved_gb; ptrain resets the peak statistics before step 1, so its peak is the step's; the precompute
pass is a separate process so that VAE encoding is not in it), the step time (WINDOW below: the median over
windows of the window's mean step, after a warm-up window; only a window's last step waits for the device), MFU (model FLOPs) and HFU (with recompute) of trainer and bare loop against the
device's dense bf16 peak (ptrain.metrics, or --peak_tflops), ptrain's own logged `mfu` / `hfu` (model FLOPs
counted at start-up, with compile too), the planner's peak and its error, trainer / bare, and
the compile time (the warm-up window's excess over the median). Every phase has its own subprocess timeout; gpu.json and
gpu.md are rewritten after every row, so a run cut short leaves what it measured.

Before the rows (unless --no_checks), one check in its own process: ring attention's CUDA block kernels and
log-sum-exp merge (ptrain/parallel/ring_check.py: the cp ranks of `--cp_mode ring` run one after another in one
process, since one GPU cannot host two NCCL ranks) at the CogVideoX-5B shape (49x480x720: 48 heads x 64, 226 text
+ 17550 video tokens, cp 2, bf16), without and with a text padding mask, against one full-sequence SDPA: max abs
error of out / dq / dk / dv (and full bf16 SDPA's, for scale, both against float32 SDPA), the kernels that ran,
peak memory and time. It goes to gpu.json's "checks" and a table in gpu.md; --cpu runs it at a tiny shape.

The default set fits about 8 minutes (estimates in --dry_run); the other rows run with --set all or --only:

    python benchmarks/gpu.py --dry_run              # the plan: rows, flags, budgets, estimated minutes (CPU, CI)
    python benchmarks/gpu.py --list                 # row names
    python benchmarks/gpu.py [--only ROW ...] [--set default|all] [--out DIR] [--peak_tflops 989] [--repeat N]
                             [--profile]  # + one untimed window of each ptrain run under torch.profiler
    python benchmarks/gpu.py --cpu --out /tmp/x     # the same path on tiny checkpoints on the CPU (tests)
    python benchmarks/gpu.py --cpu --cpu_dtype bfloat16 --out /tmp/x  # ... in the GPU's dtypes (bf16, autocast)

On a lent GPU machine (the device tool: /work/.library/device/README.md): its image (KINDS.md) lacks diffusers,
tyro, decord, torchdata, imageio-ffmpeg, ftfy, came-pytorch and bitsandbytes, and nothing can be downloaded there.
Once, here, in the repo root, fetch py3.12 wheels of the tested versions (bitsandbytes slimmed to its CUDA 13.0
library; about 49 MiB, under the tool's 64):

    echo /.whl/ >> .git/info/exclude
    python benchmarks/device_wheels.py --dest .whl

then one call of the device tool's `run` with carry [".whl"], timeout_s 560 and the command

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl \
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 \
      && timeout 500 python3 benchmarks/gpu.py --out $OUT --work /tmp/gpu-suite

(gpu.json and gpu.md come back from $OUT; a run cut short leaves the rows done so far. The machine stays warm
for 30 s after a call: a second call prepared beforehand starts at once, without another start-up. On
2026-11-27 a 15-minute lease held a 7-minute and a 4-minute call.) The rows outside the
default set: `--dry_run --set all` prints them packed into further ~8-minute calls (`--only ROW ...`); the
HunyuanVideo and CogVideoX-5B no-AC / full fine-tune rows want nvidia-h200 (their min_gib). Afterwards, here:
copy gpu.json and gpu.md from the run's files_at into benchmarks/results/ (merge the rows of several calls into
one gpu.json and re-render gpu.md with `python -c "import json, benchmarks.gpu as g;
print(g.markdown(json.load(open('benchmarks/results/gpu.json'))), end='')" > benchmarks/results/gpu.md`), record
where and when: `python benchmarks/readme.py --stamp benchmarks/results/gpu.json --kind measured --command
"python benchmarks/gpu.py"`, then set the provenance's machine to the GPU as the rows name it (the stamp records
this machine) and its torch to the rows' torch / CUDA; put the measured peaks beside the planned ones in the memory
table: `python benchmarks/memory.py --render`; regenerate the README: `python benchmarks/readme.py`.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIGS = REPO / "benchmarks" / "model_configs"
RESULTS = REPO / "benchmarks" / "results"
GIB = 2**30
#: The whole default run; the documented call's `timeout 500` leaves 20 s to write the results after it (and a
#: SIGTERM from that timeout still writes what was measured: Suite.terminated).
DEADLINE_S = 480
#: Timing, the same for ptrain and the bare loop: windows of WINDOW steps; the first window is warm-up (compile),
#: the step time is the median over the next WINDOWS windows of the window's mean step. Only a window's last step
#: waits for the device (to time its phases; ptrain's logging step, --logging_steps WINDOW): the steps between
#: run as a real run does, the host queueing work ahead of the device. Tiny CPU steps take ~10 ms: more of them.
WINDOW, WINDOWS = {"gpu": 3, "cpu": 10}, {"gpu": 2, "cpu": 5}


def timing(cpu: bool) -> tuple[int, int]:
    """(steps per window, timed windows) of the mode."""
    mode = "cpu" if cpu else "gpu"
    return WINDOW[mode], WINDOWS[mode]


@dataclass
class Row:
    name: str
    variant: str  # a folder of benchmarks/model_configs/ (or, with --cpu, a tiny model name)
    training_type: str  # lora | full-finetune
    ac: bool
    compile: bool
    frames_hw: tuple[int, int, int]
    extra: list[str] = field(default_factory=list)
    cap_gib: float | None = None  # torch.cuda.set_per_process_memory_fraction, in GiB
    min_gib: float = 0.0  # skipped on a device with less memory
    est_s: int = 60  # estimated wall time of the row itself (timed run + bare loop)
    default: bool = True  # in the default set (the ~8-minute run)
    note: str = ""


#: Per model: estimated seconds to build its checkpoint (+ videos, alongside) and run the precompute pass. Measured
#: on an H200 (2026-11-27, benchmarks/results/gpu.json): LTX-Video 58 s, CogVideoX-5B 72-80 s; the others from the
#: H200 notes (../shared/reference/platform_notes.md): ~25 s start-up per process, ~30 s first compiled step. The
#: rows' est_s: CogVideoX-5B LoRA AC 160 s measured (ptrain 75 + bare 85), LTX-Video ptrain runs 47-62 s.
SETUP_EST_S = {"ltx-video": 60, "cogvideox-5b": 80, "wan2.1-1.3b": 60, "hunyuan-video": 130, "ltx_video": 25,
               "cogvideox": 25, "wan": 25, "hunyuan_video": 30}  # the last four: --cpu (tiny checkpoints)
FP8 = ["--layerwise_upcasting_modules", "transformer"]
ROWS = [
    # CogVideoX-5B first: issue 15's MFU target; LTX-Video's bare loop has yet to finish on a GPU (it failed at
    # its first forward on 2026-11-27, since fixed), so it runs second, where an overrun costs no other row
    Row("cogvideox5b-lora-ac", "cogvideox-5b", "lora", True, True, (49, 480, 720), est_s=160),
    Row("ltx-lora-ac", "ltx-video", "lora", True, True, (49, 512, 768), est_s=105),
    Row("ltx-lora-noac", "ltx-video", "lora", False, True, (49, 512, 768), est_s=95, default=False,
        note="planned 12.8 GiB"),
    # --compile_mode reduce-overhead: each block's forward and backward replay as CUDA graphs (ptrain and the bare
    # loop alike): whether LTX-Video's step is bound by the host's kernel launches (2,688 tokens per step)
    Row("ltx-lora-ac-cudagraphs", "ltx-video", "lora", True, True, (49, 512, 768),
        ["--compile_mode", "reduce-overhead"], est_s=110, default=False,
        note="CUDA graphs per block (--compile_mode reduce-overhead), full AC"),
    Row("ltx-lora-noac-cudagraphs", "ltx-video", "lora", False, True, (49, 512, 768),
        ["--compile_mode", "reduce-overhead"], est_s=100, default=False,
        note="CUDA graphs per block (--compile_mode reduce-overhead), no AC (planned 12.8 GiB without graphs)"),
    Row("cogvideox5b-lora-noac", "cogvideox-5b", "lora", False, True, (49, 480, 720), min_gib=100, est_s=150,
        default=False, note="planned 73.9 GiB: an H200, not an 80 GB card"),
    Row("cogvideox5b-full-ac", "cogvideox-5b", "full-finetune", True, False, (49, 480, 720), min_gib=120,
        est_s=170, default=False, note="float32 masters (FSDP2 mixed precision): planned 86.2 GiB with the fused AdamW (104 measured with "
             "foreach on an H200); no AC does not fit. The bare loop trains bf16 weights (as --full_bf16)"),
    Row("ltx-lora-offload", "ltx-video", "lora", False, False, (49, 512, 768), ["--activation_offload"], est_s=100,
        default=False,
        note="--activation_offload instead of AC (planned 6.1 GiB + 8.0 GiB pinned host; no AC 13.4, full AC 5.8); "
             "the bare loop keeps its activations on the GPU, so trainer / bare is the offload's step-time cost"),
    Row("cogvideox5b-full-bf16-ac", "cogvideox-5b", "full-finetune", True, False, (49, 480, 720), ["--full_bf16"],
        min_gib=60, est_s=170, default=False,
        note="--full_bf16: bf16 weights and moments, stochastic rounding (planned 44.2 GiB; finetrainers publishes "
             "52.9 GB reserved)"),
    Row("cogvideox5b-full-bf16-8bit-ac", "cogvideox-5b", "full-finetune", True, False, (49, 480, 720),
        ["--full_bf16", "--optimizer", "adamw-8bit", "--bf16_rounding", "nearest"], min_gib=60, est_s=170,
        default=False,
        note="--full_bf16 + 8-bit AdamW (planned 34.0 GiB; the goal: <= 40 GB reserved); needs bitsandbytes, "
             "which the device image lacks: benchmarks/device_wheels.py carries it"),
    # --fused_backward_pass: the optimizer steps each block in the backward (ptrain/fused_backward.py); the bare
    # loop steps after the backward, as the rows above, so trainer / bare is the fused pass's step-time cost
    Row("cogvideox5b-full-bf16-fbp-ac", "cogvideox-5b", "full-finetune", True, False, (49, 480, 720),
        ["--full_bf16", "--fused_backward_pass"], min_gib=60, est_s=170, default=False,
        note="--full_bf16 + --fused_backward_pass (planned 38.3 GiB; --full_bf16 alone 44.2)"),
    Row("cogvideox5b-full-bf16-8bit-fbp-ac", "cogvideox-5b", "full-finetune", True, False, (49, 480, 720),
        ["--full_bf16", "--optimizer", "adamw-8bit", "--bf16_rounding", "nearest", "--fused_backward_pass"],
        min_gib=60, est_s=180, default=False,
        note="--full_bf16 + 8-bit AdamW + --fused_backward_pass (planned 28.0 GiB); 8-bit AdamW decides a "
             "non-finite block's skip on the host: a sync per block"),
    # --ac_mode keep_attention: full AC that keeps the attention kernels' outputs (ptrain/parallel/activation.py)
    Row("cogvideox5b-lora-keepattn", "cogvideox-5b", "lora", True, True, (49, 480, 720),
        ["--ac_mode", "keep_attention"], est_s=150, default=False,
        note="full AC keeping the attention outputs: planned 22.9 GiB (full AC 18.6); recomputes 174 TFLOP per "
             "step where full AC recomputes 337 (ptrain's count; model FLOPs 840)"),
    Row("ltx-lora-keepattn", "ltx-video", "lora", True, True, (49, 512, 768), ["--ac_mode", "keep_attention"],
        est_s=100, default=False, note="full AC keeping the attention outputs: planned 6.2 GiB (full AC 5.75); "
        "recomputes 9.4 TFLOP per step where full AC recomputes 11.1: LTX's attention is a small part of its forward"),
    Row("wan1.3b-lora-ac", "wan2.1-1.3b", "lora", True, True, (81, 480, 832), est_s=120, default=False),
    Row("wan1.3b-lora-noac", "wan2.1-1.3b", "lora", False, True, (81, 480, 832), est_s=110, default=False),
    *[Row(f"cogvideox5b-lora-ac-sdpa-{b}", "cogvideox-5b", "lora", True, False, (49, 480, 720),
          ["--attention_backend", b], est_s=120, default=False,
          note=f"SDPA kernel {b} only (ptrain and the bare loop); no compile, to compare kernels cheaply")
      for b in ("flash", "efficient", "cudnn")],
    Row("hunyuan-lora-ac-swap40-24g", "hunyuan-video", "lora", True, False, (49, 512, 768),
        ["--blocks_to_swap", "40"], cap_gib=24, est_s=220, default=False,
        note="24 GiB cap (a 24 GB card), frozen weights of 40 of 60 blocks swapped from host memory (planned 15.3 GiB)"),
    Row("cogvideox5b-lora-ac-swap40-16g", "cogvideox-5b", "lora", True, False, (49, 480, 720),
        ["--blocks_to_swap", "40"], cap_gib=16, est_s=180, default=False,
        note="16 GiB cap (a 16 GB card), frozen weights of 40 of 42 blocks swapped from host memory (planned 9.2 GiB)"),
    Row("hunyuan-lora-ac-fp8-24g", "hunyuan-video", "lora", True, False, (49, 512, 768), FP8, cap_gib=24,
        est_s=200, default=False, note="24 GiB cap, FP8 storage of frozen weights; no AC does not fit 24 GiB"),
]  # fmt: skip
#: The one-process ring attention check (ptrain/parallel/ring_check.py: cp 2 at the CogVideoX-5B shape, bf16, with
#: and without a text mask, against full SDPA), before the rows in every run unless --no_checks: process start-up,
#: CUDA init, two cases (well under 10 s of GPU work on an H100).
CHECK_EST_S = 20  # 16 s measured on an H200
#: --profile: rows of the operator table kept per row (gpu.json, gpu.md).
PROFILE_ROWS = 15
#: --cpu: the same path on the tiny LTX-Video checkpoint (ptrain.testing.tiny), float32 (or --cpu_dtype), gloo.
CPU_ROWS = [
    Row("cpu-ltx-lora-ac", "ltx_video", "lora", True, False, (9, 32, 32), est_s=30),
    Row("cpu-ltx-lora-noac", "ltx_video", "lora", False, False, (9, 32, 32), est_s=30, default=False),
    Row("cpu-ltx-lora-keepattn", "ltx_video", "lora", True, False, (9, 32, 32), ["--ac_mode", "keep_attention"],
        est_s=30, default=False),
    Row("cpu-ltx-lora-ac-swap", "ltx_video", "lora", True, False, (9, 32, 32), ["--blocks_to_swap", "1"], est_s=30,
        default=False),
    # the GPU rows' other flag sets, on the tiny LTX-Video (each row's own path through ptrain and the bare loop)
    Row("cpu-ltx-lora-ac-compile", "ltx_video", "lora", True, True, (9, 32, 32), est_s=90, default=False),
    # the CUDA-graph mode's path (torch skips the graphs on the CPU: the flags and step marks run, inductor compiles)
    Row("cpu-ltx-lora-ac-cudagraphs", "ltx_video", "lora", True, True, (9, 32, 32),
        ["--compile_mode", "reduce-overhead"], est_s=90, default=False),
    Row("cpu-ltx-full-ac", "ltx_video", "full-finetune", True, False, (9, 32, 32), est_s=30, default=False),
    Row("cpu-ltx-full-bf16-ac", "ltx_video", "full-finetune", True, False, (9, 32, 32), ["--full_bf16"], est_s=30,
        default=False),
    Row("cpu-ltx-full-bf16-fbp-ac", "ltx_video", "full-finetune", True, False, (9, 32, 32),
        ["--full_bf16", "--fused_backward_pass"], est_s=30, default=False),
    Row("cpu-ltx-lora-offload", "ltx_video", "lora", False, False, (9, 32, 32), ["--activation_offload"], est_s=30,
        default=False),
    Row("cpu-ltx-lora-ac-fp8", "ltx_video", "lora", True, False, (9, 32, 32), FP8, est_s=30, default=False),
    # benchmarks/throughput.py's like-for-like CPU rows: every tiny model, LoRA, no AC, 9x64x64
    *[Row(f"cpu-{m}-lora-64", m, "lora", False, False, (9, 64, 64), est_s=40, default=False)
      for m in ("ltx_video", "cogvideox", "wan", "hunyuan_video")],
]  # fmt: skip


#: --cpu_dtype: the CPU mode's compute dtype, for this process and the subprocesses it starts (the bare loop reads
#: it to build its model). bfloat16 runs the GPU's dtype path on the CPU: bf16 checkpoints and components, the bare
#: loop under bf16 autocast (a float32 input into the bf16 model crashed the first GPU call's bare loop; in
#: float32 no CPU run could show it).
CPU_DTYPE_ENV = "PTRAIN_BENCH_CPU_DTYPE"


def dtype_name(cpu: bool) -> str:
    """The components' dtype of a mode: bfloat16 on a GPU; float32 on the CPU unless --cpu_dtype bfloat16."""
    return os.environ.get(CPU_DTYPE_ENV, "float32") if cpu else "bfloat16"


def row_dtype(row: Row, cpu: bool) -> str:
    """A row's components' dtype: the mode's, but bfloat16 for --full_bf16 (a bfloat16 fine-tune by definition)."""
    return "bfloat16" if "--full_bf16" in row.extra else dtype_name(cpu)


def model_name(row: Row, cpu: bool) -> str:
    if cpu:
        return row.variant
    return json.loads((CONFIGS / row.variant / "ptrain_variant.json").read_text())["model_name"]


def flag_value(flags: list[str], name: str, default: str) -> str:
    """The value of flag `name` in a row's extra flags (the last one given, as the command line reads it)."""
    return flags[len(flags) - 1 - flags[::-1].index(name) + 1] if name in flags else default


def model_flags(row: Row, cpu: bool) -> list[str]:
    """The flags that fix the step (shared by the trainer's runs, the bare loop and the planner)."""
    f, h, w = row.frames_hw
    flags = ["--model_name", model_name(row, cpu), "--num_frames", str(f), "--height", str(h), "--width", str(w),
             "--batch_size", "1", "--training_type", row.training_type]  # fmt: skip
    if row.training_type == "lora":
        flags += ["--rank", "128" if not cpu else "8", "--lora_alpha", "128" if not cpu else "8"]
    extra = list(row.extra)
    if row.ac:  # --ac_mode in a row's extra flags replaces full (and appears once)
        flags += ["--gradient_checkpointing", "--ac_mode", flag_value(extra, "--ac_mode", "full")]
    while "--ac_mode" in extra:
        del extra[extra.index("--ac_mode") : extra.index("--ac_mode") + 2]
    if row.compile:
        flags.append("--compile")
    while "--compile_mode" in extra and not row.compile:  # the precompute pass (no compile) of a compile-mode row
        del extra[extra.index("--compile_mode") : extra.index("--compile_mode") + 2]
    dtype = row_dtype(row, cpu)
    for part in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        flags += [f"--{part}_dtype", dtype]
    return flags + extra


def run_flags(row: Row, cpu: bool, ckpt: Path, data: Path, cache: Path, out: Path, steps: int | None = None,
              profile: bool = False) -> list[str]:  # fmt: skip
    """ptrain's flags for a row: the timed run (`steps` None: a warm-up window and the timed windows, logging at
    the end of each; `profile`: then up to 3 more steps under torch.profiler, --profile_from_step), or a run of
    `steps` steps (the precompute pass)."""
    window, windows = timing(cpu)
    steps, every = (window * (1 + windows), window) if steps is None else (steps, 1)
    if profile:
        profiled = min(window, 3)  # 3 steps tell enough; a trace of more grows large (77 MB for 10 on the CPU)
        extra = ["--profile_from_step", str(steps + 1), "--profile_num_steps", str(profiled)]
        steps += profiled
    else:
        extra = []
    return [*model_flags(row, cpu), *extra, "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
            "--output_dir", str(out), "--train_steps", str(steps), "--logging_steps", str(every),
            "--enable_precomputation",
            "--precomputation_dir", str(cache), "--precomputation_reuse", "--log_step_breakdown",
            "--report_to", "none", "--checkpointing_steps", "0", "--resume_from_checkpoint", "none",
            "--dataloader_num_workers", "0" if cpu else "2", "--seed", "0",
            # the suite measures the step: the VAE settings are given, so the start-up runs no planner (auto would)
            "--enable_tiling", "off", "--enable_slicing", "off"]  # fmt: skip


def select(rows: list[Row], only: list[str] | None, which: str) -> list[Row]:
    names = [r.name for r in rows]
    for name in only or []:
        if name not in names:
            sys.exit(f"--only {name}: no such row; rows: {', '.join(names)}")
    if only:  # in the order given: models run in the order of their first row (the first row runs first)
        by_name = {r.name: r for r in rows}
        return [by_name[name] for name in dict.fromkeys(only)]
    return [r for r in rows if which == "all" or r.default]


def estimate_s(rows: list[Row]) -> int:
    """Set-up per model (once) plus every row's own estimate, plus ~10 s of imports and the planner's wait and the
    ring attention check (CHECK_EST_S)."""
    setup = sum(SETUP_EST_S[v] for v in dict.fromkeys(r.variant for r in rows))
    return 10 + CHECK_EST_S + setup + sum(r.est_s for r in rows)


def budget_s(row: Row) -> int:
    """A row's own time limit (timed run + bare loop): twice its estimate."""
    return 2 * row.est_s


def dry_run(rows: list[Row], all_rows: list[Row], cpu: bool) -> None:
    print(f"GPU suite plan ({'CPU mode, tiny checkpoints' if cpu else 'one GPU'}); deadline {DEADLINE_S} s:")
    for r in [*rows, *(r for r in all_rows if r not in rows)]:  # the rows to run in their order, then the rest
        mark = "run " if r in rows else "skip"
        cap = f", cap {r.cap_gib:g} GiB" if r.cap_gib else ""
        need = f", needs >= {r.min_gib:g} GiB" if r.min_gib else ""
        print(f"  [{mark}] {r.name}: estimated {r.est_s} s, budget {budget_s(r)} s{cap}{need}"
              f"{f' ({r.note})' if r.note else ''}")  # fmt: skip
        print(f"         ptrain {' '.join(model_flags(r, cpu))}")
    shape = "tiny shape, CPU" if cpu else "CogVideoX-5B 49x480x720, cp 2, bf16"
    print(f"  check ring-attention (one process, {shape}; --no_checks skips it): estimated {CHECK_EST_S} s")
    setups = ", ".join(f"{v} {SETUP_EST_S[v]} s" for v in dict.fromkeys(r.variant for r in rows))
    total = estimate_s(rows)
    print(f"set-up per model (checkpoint build, videos, precompute pass): {setups}")
    print(f"estimated total: {total} s = {total / 60:.1f} min for {len(rows)} rows "
          f"({'within' if total <= DEADLINE_S else 'OVER'} the {DEADLINE_S / 60:.0f}-minute limit)")  # fmt: skip
    rest = [r for r in all_rows if r not in rows]
    if rest:
        print(f"the other rows, in calls of at most {DEADLINE_S / 60:.0f} minutes each (by estimate):")
        for group in split_calls(rest):
            only = " ".join(f"--only {r.name}" for r in group)
            print(f"  {estimate_s(group)} s: python benchmarks/gpu.py {'--cpu ' if cpu else ''}{only}")


def split_calls(rows: list[Row]) -> list[list[Row]]:
    """Rows packed into runs that each fit DEADLINE_S by estimate, one model's rows together where they fit."""
    calls: list[list[Row]] = []
    for variant in dict.fromkeys(r.variant for r in rows):
        for row in (r for r in rows if r.variant == variant):
            fitting = [c for c in calls if estimate_s([*c, row]) <= DEADLINE_S]
            home = next((c for c in fitting if any(r.variant == variant for r in c)), fitting[0] if fitting else None)
            if home is None:
                calls.append([row])
            else:
                home.append(row)
    return calls


# --------------------------------------------------------------------------------------------------------
# Checkpoints and videos
# --------------------------------------------------------------------------------------------------------


def _text_encoder(cls, real: dict, tiny_config: dict, dtype, device):
    """The real text encoder config cut to one layer (a Llama to two: HunyuanVideo's pipeline reads
    hidden_states[-3]), with the tiny tokenizer's vocabulary and special ids."""
    config = dict(real)
    for key in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "decoder_start_token_id"):
        if key in tiny_config:
            config[key] = tiny_config[key]
    for key in ("num_layers", "num_hidden_layers", "num_decoder_layers"):
        if key in config:
            config[key] = 2 if config.get("model_type") == "llama" else 1
    config_cls = cls.config_class
    config = config_cls.from_dict({k: v for k, v in config.items() if k not in ("architectures", "_name_or_path")})
    with torch_device(device), default_dtype(dtype):
        return cls(config).eval()


def torch_device(device):
    import torch

    return torch.device(device)


class default_dtype:
    def __init__(self, dtype):
        self.dtype = dtype

    def __enter__(self):
        import torch

        self.old = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)

    def __exit__(self, *exc):
        import torch

        torch.set_default_dtype(self.old)


def build_full_checkpoint(variant: str, dest: Path, dev: str = "cuda") -> Path:
    """A full-size random checkpoint of `variant` (see the module docstring), built on the GPU in bf16."""
    import torch

    from ptrain.models.registry import get_spec
    from ptrain.testing.tiny import build_tiny_pipeline, build_tokenizer

    name = json.loads((CONFIGS / variant / "ptrain_variant.json").read_text())["model_name"]
    spec, src = get_spec(name), CONFIGS / variant
    tiny = build_tiny_pipeline(name)
    parts = dict(tiny.components)
    bf16 = torch.bfloat16
    with torch.device(dev), default_dtype(bf16):
        for part in ("transformer", "vae"):
            cls = spec.component_classes[part]
            parts[part] = cls.from_config(cls.load_config(src, subfolder=part)).eval()
    convs = [m for m in parts["vae"].encoder.modules() if isinstance(m, (torch.nn.Conv2d, torch.nn.Conv3d))]
    with torch.no_grad():
        for p in convs[-1].parameters():
            p.mul_(0.01)
    for part in ("text_encoder", "text_encoder_2"):
        if part in parts and (src / part / "config.json").is_file():
            real = json.loads((src / part / "config.json").read_text())
            parts[part] = _text_encoder(type(parts[part]), real, parts[part].config.to_dict(), bf16, dev)
    if name == "cogvideox":  # the tokenizer's length is the transformer's max_text_seq_length (226)
        parts["tokenizer"] = build_tokenizer(model_max_length=int(parts["transformer"].config.max_text_seq_length))
    sched = parts["scheduler"]
    parts["scheduler"] = type(sched).from_config(type(sched).load_config(src, subfolder="scheduler"))
    type(tiny)(**parts).save_pretrained(dest, safe_serialization=True)
    return dest


def write_videos(dest: Path, frames: int, height: int, width: int) -> Path:
    """Two synthetic H.264 videos of at least `frames` frames at (at least) height x width."""
    from ptrain.testing import tiny

    specs = tiny.synthetic_video_specs(2, seed=0, sizes=[(width, height), (width + 32, height + 32)])
    dest.joinpath("videos").mkdir(parents=True, exist_ok=True)
    specs = [dataclasses.replace(s, num_frames=frames + 4, fps=24) for s in specs]
    for s in specs:
        tiny.write_video(dest / s.path, tiny.render_frames(s), s.fps)
    (dest / "prompts.txt").write_text("".join(s.caption + "\n" for s in specs))
    (dest / "videos.txt").write_text("".join(s.path + "\n" for s in specs))
    return dest


# --------------------------------------------------------------------------------------------------------
# Subprocesses: every phase in its own process, with its own timeout
# --------------------------------------------------------------------------------------------------------


def child_env(cpu: bool, cap_gib: float | None = None) -> dict:
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT", "MASTER_ADDR")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""
        env["OMP_NUM_THREADS"] = "1"
    else:  # ptrain's allocator default, in the environment of every GPU child: the bare loop measures like ptrain,
        # and a capped worker (apply_cap starts CUDA before ptrain could set it) gets it before CUDA starts
        from ptrain.parallel.dims import default_allocator_conf

        default_allocator_conf(env)
    if cap_gib:
        env["PTRAIN_BENCH_CAP_GIB"] = str(cap_gib)
    return env


#: The process groups started by spawn() and still running: a SIGTERM of the suite (the device call's `timeout`)
#: kills them, so that no run keeps the GPU after the suite has written what it measured.
CHILDREN: set[subprocess.Popen] = set()


def spawn(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    """Start `cmd` in its own process group, stdout+stderr to `log` (the child keeps the file open)."""
    # A SIGTERM is held back (Suite.terminated) until the child is in CHILDREN: one handled in between would leave
    # it running on the GPU. (Not by the signal mask: the child would inherit SIGTERM blocked.)
    SPAWNING.busy = True
    try:
        with open(log, "w") as f:
            p = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        CHILDREN.add(p)
    finally:
        SPAWNING.busy = False
    if SPAWNING.pending is not None:
        pending, SPAWNING.pending = SPAWNING.pending, None
        pending()
    return p


class SPAWNING:
    """spawn() is starting a child (`busy`); `pending`: the SIGTERM handling held back meanwhile."""

    busy = False
    pending = None


def write_whole(path: Path, text: str) -> None:
    """Write under a temporary name, then rename: a reader (or a SIGTERM mid-write) never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def kill_children() -> None:
    import signal

    for p in list(CHILDREN):  # the whole group, whether or not its leader has exited (torchrun's worker)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(p.pid, signal.SIGKILL)
        CHILDREN.discard(p)


def run_proc(cmd: list[str], env: dict, timeout: float, log: Path) -> tuple[int, float]:
    """Run `cmd` in its own process group with stdout+stderr to `log`; on timeout kill that group. (rc, seconds);
    rc 124 on timeout."""
    import signal

    t0 = time.perf_counter()
    p = spawn(cmd, env, log)
    try:
        rc = p.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        rc = 124
        for _ in range(300):  # the group's other processes (torchrun's worker) too: the next row needs their memory
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
    CHILDREN.discard(p)
    return rc, time.perf_counter() - t0


def log_tail(log: Path, n: int = 1500) -> str:
    text = log.read_text(errors="replace") if log.is_file() else ""
    tb = text.rfind("Traceback (most recent call last)")
    return (text[tb:] if tb >= 0 else text)[-n:]


def ptrain_cmd(flags: list[str], cap_gib: float | None) -> list[str]:
    """torchrun -m ptrain; under a memory cap the worker is this file, which sets the cap and calls ptrain."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
    if cap_gib:
        return [*cmd, str(Path(__file__).resolve()), "--_capped_ptrain", *flags]
    return [*cmd, "-m", "ptrain", *flags]


def apply_cap() -> None:
    """torch.cuda.set_per_process_memory_fraction from $PTRAIN_BENCH_CAP_GIB (rows with a memory cap)."""
    cap = os.environ.get("PTRAIN_BENCH_CAP_GIB")
    if cap:
        import torch

        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, float(cap) * GIB / total), 0)


def read_metrics(out: Path) -> list[dict]:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def summarize_trainer(rows: list[dict], compiled: bool, window: int) -> dict:
    """Median step time over the timed windows (one logged row each: ptrain's step_time_s is the mean over the
    steps since the last logging step), compile time, the logging steps' phases, peaks, ptrain's own mfu."""
    timed = rows[1:] or rows[-1:]
    med = statistics.median(r["step_time_s"] for r in timed)
    first = rows[0]["step_time_s"]  # the warm-up window's mean step
    out = {"step_s": med, "first_window_step_s": first, "compile_s": (first - med) * window if compiled else None,
           "steps_timed": len(timed) * window, "loss_last": rows[-1]["loss"],
           "peak_allocated_gib": rows[-1]["peak_memory_gb"], "peak_reserved_gib": rows[-1]["peak_reserved_gb"]}  # fmt: skip
    for k in ("forward_s", "backward_s", "optimizer_s", "data_time_s"):
        if k in timed[0]:
            out[k] = statistics.median(r[k] for r in timed)
    out["mfu_logged"] = rows[-1].get("mfu")
    out["hfu_logged"] = rows[-1].get("hfu")
    out["tflops_per_step_logged"] = rows[-1].get("tflops_per_step")
    return out


# --------------------------------------------------------------------------------------------------------
# The bare loop (a subprocess: python benchmarks/gpu.py --_bare JOB.json)
# --------------------------------------------------------------------------------------------------------


def load_bare_model(row: Row, cpu: bool, ckpt: str):
    """The transformer as ptrain trains it (same LoRA / full fine-tune), on a plain module; FP8 storage through
    diffusers' layerwise casting (ptrain does it through FSDP2's mixed precision)."""
    import torch

    from ptrain.config import parse_config
    from ptrain.models.registry import get_spec
    from ptrain.models.spec import Components
    from ptrain.parallelize import make_trainable, seed_everything

    cfg = parse_config([*model_flags(row, cpu), "--pretrained_model_name_or_path", ckpt])
    spec = get_spec(cfg.model.model_name)
    dtype = getattr(torch, row_dtype(row, cpu))
    kw = {"torch_dtype": dtype, "use_safetensors": True}
    t = spec.transformer_cls.from_pretrained(ckpt, subfolder="transformer", **kw)
    vae = spec.component_classes["vae"].from_pretrained(ckpt, subfolder="vae", **kw)  # CPU: latents only
    sched = spec.component_classes["scheduler"].from_pretrained(ckpt, subfolder="scheduler")
    extra = {k: None for k in spec.component_classes
             if k not in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")}  # fmt: skip
    comps = Components(t, vae, None, None, sched, extra)
    spec = spec.bind(comps)
    if cfg.model.layerwise_upcasting_modules:
        storage = getattr(torch, cfg.model.layerwise_upcasting_storage_dtype)
        pattern = tuple(cfg.model.layerwise_upcasting_skip_modules_pattern)
        t.enable_layerwise_casting(storage_dtype=storage, compute_dtype=dtype, skip_modules_pattern=pattern)
    seed_everything(0)
    make_trainable(t, cfg, spec)
    return t, comps, spec


def bare_inputs(spec, comps, cache: str, device):
    """The first precomputed sample of ptrain's cache: a latent drawn from its distribution, its text states."""
    import torch
    from safetensors.torch import load_file

    from ptrain.models.spec import Conditioning

    files = sorted(p for p in Path(cache).rglob("*.safetensors") if p.name != "empty_caption.safetensors")
    if not files:
        raise FileNotFoundError(f"no precomputed sample under {cache}: did the precompute pass run?")
    item = load_file(files[0])
    latents = spec.latents_from_dist(comps, item["latent_dist"][None], [torch.Generator().manual_seed(0)])
    cond = Conditioning({k[5:]: v[None].to(device) for k, v in item.items() if k.startswith("text.")})
    return latents.to(device), cond


def count_step_flops(step, blocks_wrapped: list) -> dict:
    """One uncompiled step under FlopCounterMode: forward, backward (with AC recompute) and the forward FLOPs of
    the checkpointed blocks (what the backward recomputes)."""
    from torch.utils.flop_counter import FlopCounterMode

    import ptrain.flops  # noqa: F401  (the CPU flash SDPA kernel's FLOP formula, as ptrain counts it)

    fwd, bwd = FlopCounterMode(display=False), FlopCounterMode(display=False)
    in_blocks = [0]

    def total() -> int:
        return sum(fwd.flop_counts["Global"].values())

    def pre(module, args):
        module._bench_start = total()

    def post(module, args, output):
        in_blocks[0] += total() - module._bench_start

    hooks = [b.register_forward_pre_hook(pre) for b in blocks_wrapped]
    hooks += [b.register_forward_hook(post) for b in blocks_wrapped]
    with fwd:
        loss = step("forward")
    for h in hooks:
        h.remove()
    with bwd:
        step("backward", loss)
    step("optimizer")
    f, b = fwd.get_total_flops(), bwd.get_total_flops()
    return {"forward_flops": f, "backward_flops": b, "recompute_flops": in_blocks[0], "hw_flops": f + b,
            "model_flops": f + b - in_blocks[0]}  # fmt: skip


def bare_loop(job: dict) -> dict:
    import torch

    from ptrain.attention import kernel_context
    from ptrain.metrics import peak_memory_gb
    from ptrain.parallel.activation import apply_ac
    from ptrain.parallel.compile import apply_compile
    from ptrain.parallel.swap import apply_block_swap

    row, cpu = Row(**job["row"]), job["cpu"]
    device = torch.device("cpu" if cpu else "cuda")
    # the SDPA kernel ptrain was held to (--attention_backend in the row's flags), held here too
    backend = flag_value(row.extra, "--attention_backend", "auto")
    kernels = kernel_context(backend)
    # bf16 compute as ptrain's one-process path runs it (ptrain/parallel/fsdp.py: autocast over the float32 LoRA
    # weights on the bf16 base), and as an accelerate-style loop with mixed_precision bf16 does
    dtype = getattr(torch, row_dtype(row, cpu))  # the transformer's (load_bare_model)
    amp = (contextlib.nullcontext if dtype == torch.float32
           else functools.partial(torch.autocast, device.type, dtype=torch.bfloat16))  # fmt: skip
    apply_cap()
    t, comps, spec = load_bare_model(row, cpu, job["ckpt"])
    blocks = spec.blocks(t)
    swap_n = int(flag_value(row.extra, "--blocks_to_swap", "0"))
    if swap_n:  # as ptrain swaps (ptrain/parallel/swap.py): AC without early stop, then the swap, then the rest
        apply_ac(blocks, "full", early_stop=False)
        host = apply_block_swap(blocks, swap_n, device).host_params
        for p in [*t.parameters(), *t.buffers()]:
            if id(p) not in host:
                p.data = p.data.to(device)
    else:
        t.to(device)
    latents, cond = bare_inputs(spec, comps, job["cache"], device)
    wrapped = [b for bl in blocks for b in bl]
    if row.ac and not swap_n:
        apply_ac(blocks, flag_value(row.extra, "--ac_mode", "full"))
        wrapped = [b for bl in blocks for b in bl]
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True)
    torch.manual_seed(1)

    def step(phase: str, loss=None):
        if phase == "forward":  # flow matching: fresh noise and a uniform sigma per step, drawn on the device
            noise = torch.randn_like(latents)
            sigma = torch.rand((latents.shape[0],), device=device)
            s = sigma.view(-1, *[1] * (latents.dim() - 1))
            noisy = ((1 - s) * latents + s * noise).to(dtype)  # the model's dtype (bf16 on a GPU), as ptrain feeds it
            with kernels(), amp():
                return (spec.forward(t, noisy, sigma * 1000, cond).float() - (noise - latents)).pow(2).mean()
        if phase == "backward":
            with kernels():
                return loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    flops = count_step_flops(step, wrapped if row.ac else [])
    mode = flag_value(row.extra, "--compile_mode", "default")
    if row.compile:
        apply_compile(blocks, mode=mode)
    if row.compile and mode in ("reduce-overhead", "max-autotune"):  # as ptrain marks each step (CUDA graphs)
        step = functools.partial(_cudagraph_step, step)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the uncompiled FLOP-counting step's cached blocks are not the timed steps'
        torch.cuda.reset_peak_memory_stats()
    window, windows = timing(cpu)
    times = [timed_window(step, device, window) for _ in range(1 + windows)]
    alloc, reserved = peak_memory_gb(device)
    timed = times[1:]
    med = {k: statistics.median(x[k] for x in timed) for k in timed[0]}
    first = times[0]["step_s"]
    return {**flops, "step_s": med["step_s"], "forward_s": med["forward_s"], "backward_s": med["backward_s"],
            "optimizer_s": med["optimizer_s"], "first_window_step_s": first, "steps_timed": windows * window,
            "compile_s": (first - med["step_s"]) * window if row.compile else None, "peak_allocated_gib": alloc,
            "peak_reserved_gib": reserved, "tokens": spec.tokens_per_sample(tuple(latents.shape), comps),
            **device_info(device)}  # fmt: skip


def _cudagraph_step(step, phase: str, loss=None):
    """The bare loop's step under CUDA-graph compile modes: each forward starts a step of the CUDA-graph trees."""
    import torch

    if phase == "forward":
        torch.compiler.cudagraph_mark_step_begin()
    return step(phase, loss)


def timed_window(step, device, window: int) -> dict:
    """`window` steps as ptrain times them: the mean step over the window, and the phases of its last step, the
    only one that waits for the device (around each phase); the others queue work without waiting."""
    import torch

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    sync()
    start = time.perf_counter()
    for _ in range(window - 1):
        step("backward", step("forward"))
        step("optimizer")
    sync()
    t0 = time.perf_counter()
    loss = step("forward")
    sync()
    t1 = time.perf_counter()
    step("backward", loss)
    sync()
    t2 = time.perf_counter()
    step("optimizer")
    sync()
    t3 = time.perf_counter()
    return {"step_s": (t3 - start) / window, "forward_s": t1 - t0, "backward_s": t2 - t1, "optimizer_s": t3 - t2}


def device_info(device) -> dict:
    import torch

    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        name, mem = props.name, props.total_memory / GIB
    else:
        import platform

        name, mem = f"CPU ({platform.machine()}, {os.cpu_count()} cores)", None
    return {"device": name, "device_memory_gib": mem, "torch": torch.__version__, "cuda": torch.version.cuda}


# --------------------------------------------------------------------------------------------------------
# The planner (a background subprocess on the CPU: python benchmarks/gpu.py --_plan JOB.json)
# --------------------------------------------------------------------------------------------------------


def plan_all(job: dict) -> None:
    """ptrain.planner.plan for every row's flags, one world; out file rewritten after every row."""
    from ptrain.planner import plan

    os.nice(10)
    out, done = Path(job["out"]), {}
    for name, flags, model_dir in job["rows"]:
        t0 = time.perf_counter()
        try:
            res = plan(flags, 1, model_dir, vae_phases=False)  # the step's peak is compared
            done[name] = {"peak_gib": res["peak_bytes"] / GIB, "layout": res["layout"],
                          "seconds": round(time.perf_counter() - t0, 1)}  # fmt: skip
        except Exception as e:  # noqa: BLE001 - recorded per row, the other rows still plan
            done[name] = {"error": f"{type(e).__name__}: {e}"[:500]}
        write_whole(out, json.dumps(done, indent=1))


# --------------------------------------------------------------------------------------------------------
# The suite
# --------------------------------------------------------------------------------------------------------


class Suite:
    def __init__(self, args, rows: list[Row]):
        self.args, self.rows, self.cpu = args, rows, args.cpu
        self.t0 = time.perf_counter()
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.work = Path(args.work or tempfile.mkdtemp(prefix="ptrain-gpu-suite-"))
        self.work.mkdir(parents=True, exist_ok=True)
        self.records: list[dict] = []
        self.checks: list[dict] = []
        self.device = gpu_name_and_memory() if not self.cpu else (None, None)
        self.planner: subprocess.Popen | None = None

    def left(self) -> float:
        return self.args.deadline_s - (time.perf_counter() - self.t0)

    def say(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:6.1f} s] {msg}", flush=True)

    def ckpt_dir(self, variant: str) -> Path:
        return self.work / "ckpt" / variant

    def start_planner(self) -> None:
        """The planner for every row, on the CPU, while the GPU works (no CUDA in that process)."""
        rows = [(r.name, model_flags(r, self.cpu), str(self.ckpt_dir(r.variant) if self.cpu else CONFIGS / r.variant))
                for r in self.rows]  # fmt: skip
        job = self.work / "plan_job.json"
        job.write_text(json.dumps({"rows": rows, "out": str(self.work / "plans.json")}))
        env = child_env(True)  # no CUDA; few threads, niced: it must not slow the timed runs' host side
        env["OMP_NUM_THREADS"] = "1" if self.cpu else "2"
        self.planner = spawn([sys.executable, str(Path(__file__).resolve()), "--_plan", str(job)], env,
                             self.work / "plan.log")  # fmt: skip

    def plans(self) -> dict:
        path = self.work / "plans.json"
        try:
            return json.loads(path.read_text()) if path.is_file() else {}
        except json.JSONDecodeError:  # being rewritten: the next write picks it up
            return {}

    def setup(self, variant: str, rows: list[Row]) -> tuple[Path, Path, Path]:
        """Checkpoint (a subprocess on the GPU; tiny on the CPU), videos, the precompute pass of the first row."""
        ckpt, data, cache = self.ckpt_dir(variant), self.work / "data" / variant, self.work / "cache" / variant
        frames = max(r.frames_hw[0] for r in rows)
        h, w = max(r.frames_hw[1] for r in rows), max(r.frames_hw[2] for r in rows)
        build = None
        if not ckpt.is_dir():
            if self.cpu:
                from ptrain.testing.tiny import write_tiny_checkpoint

                write_tiny_checkpoint(ckpt, variant)
            else:
                cmd = [sys.executable, str(Path(__file__).resolve()), "--_build", variant, str(ckpt)]
                build = spawn(cmd, child_env(False), self.work / f"build-{variant}.log")
        write_videos(data, frames, h, w)  # on the CPU while the GPU builds the checkpoint
        if build is not None:
            rc = build.wait(timeout=max(self.left(), 1))
            if rc != 0:
                raise RuntimeError(f"building {variant} failed:\n{log_tail(self.work / f'build-{variant}.log')}")
        first = rows[0]
        pre = dataclasses.replace(first, compile=False, ac=True)  # only the cache matters: a small, quick step
        flags = run_flags(pre, self.cpu, ckpt, data, cache, self.work / f"pre-{variant}", 1)
        flags.remove("--precomputation_reuse")
        log = self.work / f"pre-{variant}.log"
        # without the row's memory cap: the cache is the same, and the cap is about the training step
        rc, secs = run_proc(ptrain_cmd(flags, None), child_env(self.cpu), min(self.left(), 4 * SETUP_EST_S[variant]),
                            log)  # fmt: skip
        if rc != 0:
            raise RuntimeError(f"precompute pass of {variant} failed (rc {rc}, {secs:.0f} s):\n{log_tail(log)}")
        what = "tiny checkpoint" if self.cpu else "full-size checkpoint (text encoders SHORTENED to one layer)"
        self.say(f"{variant}: {what}, videos and precompute pass ready")
        return ckpt, data, cache

    def trainer(self, row: Row, ckpt: Path, data: Path, cache: Path, limit: float) -> dict:
        out = self.work / f"run-{row.name}"
        shutil.rmtree(out, ignore_errors=True)
        flags = run_flags(row, self.cpu, ckpt, data, cache, out, profile=self.args.profile)
        if self.args.peak_tflops:
            flags += ["--peak_tflops", str(self.args.peak_tflops)]
        log = self.work / f"run-{row.name}.log"
        rc, secs = run_proc(ptrain_cmd(flags, row.cap_gib), child_env(self.cpu, row.cap_gib), limit, log)
        metrics = read_metrics(out)
        window, windows = timing(self.cpu)
        if self.args.profile:  # the profiled window is not timed
            metrics = metrics[: 1 + windows]
        if rc != 0 or len(metrics) < 2:
            raise RuntimeError(f"ptrain run failed (rc {rc}, {secs:.0f} s, {len(metrics)} windows logged):\n"
                               f"{log_tail(log)}")  # fmt: skip
        res = summarize_trainer(metrics, row.compile, window)
        res["wall_s"] = secs
        text = log.read_text(errors="replace")
        res["cache_reused"] = "precomputation: reusing" in text
        # ptrain's own warnings (a fallback such as --full_bf16's eager optimizer update changes what is measured)
        warned = [line.split(" WARNING ", 1)[1].strip() for line in text.splitlines() if "] WARNING " in line]
        res["warnings"] = list(dict.fromkeys(warned))[:8]
        ops = out / "profile" / "ops_rank0.txt"
        if ops.is_file():  # --profile: torch's operator table of the extra window, its top rows
            res["profile_ops"] = ops.read_text().splitlines()[: 4 + PROFILE_ROWS]
        summary = out / "profile" / "summary_rank0.json"
        if summary.is_file():  # and its kernel time per step: against the unprofiled step, how busy the device is
            prof = json.loads(summary.read_text())
            dev = prof.get("device_s_per_step")
            prof["device_busy_vs_timed_step"] = dev / res["step_s"] if dev is not None else None
            res["profile_summary"] = prof
        return res

    def bare(self, row: Row, ckpt: Path, cache: Path, limit: float) -> dict:
        job, result = self.work / f"bare-{row.name}.json", self.work / f"bare-{row.name}.out.json"
        job.write_text(json.dumps({"row": asdict(row), "cpu": self.cpu, "ckpt": str(ckpt), "cache": str(cache),
                                   "out": str(result)}))  # fmt: skip
        log = self.work / f"bare-{row.name}.log"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--_bare", str(job)]
        rc, secs = run_proc(cmd, child_env(self.cpu, row.cap_gib), limit, log)
        if rc != 0 or not result.is_file():
            raise RuntimeError(f"bare loop failed (rc {rc}, {secs:.0f} s):\n{log_tail(log)}")
        return {**json.loads(result.read_text()), "wall_s": secs}

    def run_row(self, row: Row, ckpt: Path, data: Path, cache: Path) -> dict:
        """The timed ptrain run (at most 60% of the row's budget), then the bare loop (the rest); with --repeat N,
        N such pairs, alternating, each side keeping its fastest run (a noisy shared machine slows runs, never
        speeds them up). Record() keywords: status, trainer, bare; a failed bare loop keeps ptrain's figures."""
        repeat = self.args.repeat
        end = time.perf_counter() + min(budget_s(row) * repeat, self.left())
        best: dict[str, dict] = {}
        for i in range(repeat):
            share = (end - time.perf_counter()) / (repeat - i)
            mine = (0.7 if self.args.profile else 0.6) * share  # the profiled window and its trace's export too
            self.say(f"{row.name}: timed ptrain run{f' {i + 1}/{repeat}' if repeat > 1 else ''} (limit {mine:.0f} s)")
            runs = {"trainer": self.trainer(row, ckpt, data, cache, mine)}
            self.say(f"{row.name}: ptrain {runs['trainer']['step_s']:.4f} s/step; bare loop")
            try:
                runs["bare"] = self.bare(row, ckpt, cache, end - time.perf_counter() - share * (repeat - i - 1))
            except RuntimeError as e:
                best.setdefault("trainer", runs["trainer"])
                return {**best, "status": f"failed: {e}; ptrain's figures are kept (no bare loop to compare)"}
            self.say(f"{row.name}: bare {runs['bare']['step_s']:.4f} s/step")
            for who, res in runs.items():
                seen = best.get(who, {}).get("runs_step_s", []) + [res["step_s"]]
                if who not in best or res["step_s"] < best[who]["step_s"]:
                    best[who] = res
                best[who]["runs_step_s"] = seen
        return best

    def run(self) -> None:
        if self.cpu:
            for variant in dict.fromkeys(r.variant for r in self.rows):
                from ptrain.testing.tiny import write_tiny_checkpoint

                write_tiny_checkpoint(self.ckpt_dir(variant), variant)
        self.start_planner()
        if not self.args.no_checks:
            self.run_ring_check()
        for variant in dict.fromkeys(r.variant for r in self.rows):
            rows = [r for r in self.rows if r.variant == variant]
            runnable = [r for r in rows if self.fits(r)]
            if not runnable:
                continue
            try:
                ckpt, data, cache = self.setup(variant, runnable)
            except Exception as e:  # noqa: BLE001 - the rows say why, the other models still run
                for r in runnable:
                    self.record(r, status=f"failed in set-up: {e}")
                continue
            for row in runnable:
                if self.left() < row.est_s:
                    self.record(
                        row, status=f"not run: {self.left():.0f} s left of the deadline, estimate {row.est_s} s"
                    )
                    continue
                try:
                    self.record(row, **self.run_row(row, ckpt, data, cache))
                except Exception as e:  # noqa: BLE001
                    self.record(row, status=f"failed: {e}")
            if not self.cpu:
                shutil.rmtree(ckpt, ignore_errors=True)  # disk: Hunyuan alone is 26 GB
        self.finish_planner()

    def run_ring_check(self) -> None:
        """ptrain/parallel/ring_check.py's suite_check in its own process (CUDA, or the tiny CPU shape): the ring
        attention block kernels and merge, every cp rank in one process, against full SDPA."""
        rec = {"check": "ring-attention"}
        if self.left() < CHECK_EST_S:
            rec["status"] = f"not run: {self.left():.0f} s left of the deadline, estimate {CHECK_EST_S} s"
        else:
            out, log = self.work / "ring_check.json", self.work / "ring_check.log"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--_ring_check", str(out)]
            cmd += ["--cpu"] if self.cpu else []
            rc, secs = run_proc(cmd, child_env(self.cpu), min(self.left(), 4 * CHECK_EST_S), log)
            if rc != 0 or not out.is_file():
                rec["status"] = f"failed (rc {rc}, {secs:.0f} s):\n{log_tail(log)}"
            else:
                rec.update(json.loads(out.read_text()), wall_s=secs)
                rec["status"] = "ok" if rec["ok"] else "failed: the ring's error exceeds the bound (see cases)"
        self.checks = [rec]
        self.say(f"ring-attention check: {rec['status']}")
        self.write()

    def fits(self, row: Row) -> bool:
        _, mem = self.device
        if mem is not None and row.min_gib > mem:
            self.record(row, status=f"skipped: needs >= {row.min_gib:g} GiB, this device has {mem:.0f} GiB")
            return False
        if self.left() < SETUP_EST_S[row.variant] + row.est_s:
            self.record(row, status=f"not run: {self.left():.0f} s left of the {self.args.deadline_s} s deadline")
            return False
        return True

    def finish_planner(self) -> None:
        if self.planner is not None:
            try:
                self.planner.wait(timeout=max(self.left(), 5))
            except subprocess.TimeoutExpired:
                import signal

                os.killpg(self.planner.pid, signal.SIGKILL)
                self.planner.wait()
        for rec in self.records:
            self.add_plan(rec)
        self.write()

    def add_plan(self, rec: dict) -> None:
        p = self.plans().get(rec["row"])
        if p is None:
            return
        rec["planner"] = p
        peak = (rec.get("trainer") or {}).get("peak_allocated_gib")
        if "peak_gib" in p and peak:  # on the CPU ptrain's "peak" is the process's resident set: no comparison
            rec["planner_error_pct"] = None if self.cpu else 100 * (p["peak_gib"] - peak) / peak

    def record(self, row: Row, status: str = "ok", trainer: dict | None = None, bare: dict | None = None) -> None:
        rec = {"row": row.name, "variant": row.variant, "training_type": row.training_type, "ac": row.ac,
               "ac_mode": flag_value(row.extra, "--ac_mode", "full") if row.ac else None,
               "compile": row.compile, "frames_hw": list(row.frames_hw), "cap_gib": row.cap_gib,
               "flags": model_flags(row, self.cpu), "note": row.note, "status": status}  # fmt: skip
        if trainer and bare:
            rec.update(derived(trainer, bare, self.args.peak_tflops))
            rec.update(trainer=trainer, bare=bare)
        elif trainer:  # the bare loop failed: ptrain's own figures (its logged mfu / hfu), no ratio
            rec.update(device=self.device[0] or "CPU", trainer=trainer)
        self.add_plan(rec)
        self.records = [r for r in self.records if r["row"] != row.name] + [rec]
        self.say(f"{row.name}: {status}")
        self.write()

    def terminated(self, signum, frame) -> None:
        """SIGTERM (an outer `timeout`): kill the running children, keep the planner's figures it has, write the
        results so far, exit 124 as `timeout` would."""
        if SPAWNING.busy:  # run as spawn() returns, with the new child known
            SPAWNING.pending = functools.partial(self.terminated, signum, frame)
            return
        # os._exit, not sys.exit, and whatever the write does: the signal can land inside code that swallows
        # exceptions (a logging lock's release at fork printed "Exception ignored ... SystemExit: 124" and the
        # suite ran on, in CI), and an error raised here would surface in the interrupted row, which catches it
        try:
            kill_children()
            for rec in self.records:
                self.add_plan(rec)
            self.write()
            self.say(f"terminated (signal {signum}): wrote {self.out / 'gpu.json'} with the rows done so far")
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(124)

    def write(self) -> None:
        data = {"about": "benchmarks/gpu.py: full-size random checkpoints (text encoders SHORTENED: one layer at the real "
                "width, HunyuanVideo's Llama two) "
                "on one GPU; ptrain (precomputed inputs) against a bare PyTorch loop and the planner",
                "mode": "cpu (tiny checkpoints)" if self.cpu else "gpu", "dtype": dtype_name(self.cpu), "window_steps": timing(self.cpu)[0], "timed_windows": timing(self.cpu)[1],
                "peak_note": PEAK_NOTE, "flops_note": FLOPS_NOTE, "elapsed_s": round(time.perf_counter() - self.t0, 1),
                "date": time.strftime("%Y-%m-%d"), "rows": self.records, "checks": self.checks}  # fmt: skip
        write_whole(self.out / "gpu.json", json.dumps(data, indent=1) + "\n")
        write_whole(self.out / "gpu.md", markdown(data))


PEAK_NOTE = ("ptrain resets the CUDA peak statistics before step 1 (it logs the load, precompute and start-up peaks "
             "before, each its own, and keeps validation's out of the steps'); "
             "the precompute pass is a separate process. The bare loop resets them before its timed steps.")  # fmt: skip
FLOPS_NOTE = ("FLOPs counted with FlopCounterMode on the bare loop's first (uncompiled) step: model FLOPs without "
              "the AC recompute (MFU), hardware FLOPs with it (HFU). ptrain logs its own `mfu` / `hfu` (mfu_logged, "
              "hfu_logged) from FLOPs counted at start-up on fake tensors (ptrain/flops.py), also under --compile. "
              "On CUDA, torch's flash-attention backward formula includes the kernel's recompute of the scores; "
              "ptrain's count (and the CPU kernel's) does not.")  # fmt: skip


def derived(trainer: dict, bare: dict, peak_override: float | None) -> dict:
    from ptrain.metrics import PEAK_TFLOPS

    peak = peak_override or next((v for k, v in PEAK_TFLOPS.items() if k in (bare.get("device") or "")), None)
    out = {"device": bare.get("device"), "torch": bare.get("torch"), "cuda": bare.get("cuda"),
           "trainer_over_bare": trainer["step_s"] / bare["step_s"], "peak_tflops": peak,
           "model_tflop_per_step": bare["model_flops"] / 1e12, "hw_tflop_per_step": bare["hw_flops"] / 1e12}  # fmt: skip
    for who, res in (("trainer", trainer), ("bare", bare)):
        out[f"mfu_{who}"] = bare["model_flops"] / res["step_s"] / (peak * 1e12) if peak else None
        out[f"hfu_{who}"] = bare["hw_flops"] / res["step_s"] / (peak * 1e12) if peak else None
    return out


def timing_text(data: dict) -> str:
    w, n = data["window_steps"], data["timed_windows"]
    return (f"step time: median over {n} windows of {w} steps (each window's mean step) after a warm-up window; "
            f"only a window's last step waits for the device, to time its phases (fwd / bwd / opt)")


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def markdown(data: dict) -> str:
    rows = data["rows"]
    dev = next((r["device"] for r in rows if r.get("device")), "no row measured")
    ver = next((f"torch {r['torch']}, CUDA {r['cuda']}" for r in rows if r.get("torch")), "")
    head = (
        f"`python benchmarks/gpu.py` ({data['mode']}) on {dev}; {ver}; {data['date']}; {data['elapsed_s']:.0f} s. "
        f"{data.get('dtype') or ('float32' if data['mode'].startswith('cpu') else 'bf16')}, batch 1, precomputed inputs, text encoders "
        f"shortened (one layer; HunyuanVideo's Llama two); {timing_text(data)}."
    )
    cols = (
        "| row | AC | compile | peak alloc / reserved GiB | planned GiB (error) | ptrain s/step (fwd / bwd / opt) "
        "| bare s/step | ptrain / bare | model TFLOP/step | MFU / HFU (ptrain) | compile s | status |"
    )
    lines = [head, "", cols, "|---" * 12 + "|"]  # fmt: skip
    for r in rows:
        t, p = r.get("trainer"), r.get("planner") or {}
        plan = f"{p['peak_gib']:.2f}" if "peak_gib" in p else ("error" if "error" in p else "-")
        if r.get("planner_error_pct") is not None:
            plan += f" ({r['planner_error_pct']:+.0f}%)"
        cells = ["-"] * 7
        if t:
            b = r.get("bare")
            split = " / ".join(f"{t[k]:.3f}" for k in ("forward_s", "backward_s", "optimizer_s") if k in t)
            cells = [f"{t['peak_allocated_gib']:.2f} / {t['peak_reserved_gib']:.2f}", plan, f"{t['step_s']:.3f} ({split})"]
            if b:
                cells += [f"{b['step_s']:.3f}", f"{r['trainer_over_bare']:.2f}", f"{r['model_tflop_per_step']:.3g}",
                          f"{_pct(r['mfu_trainer'])} / {_pct(r['hfu_trainer'])}"]  # fmt: skip
            else:  # no bare loop: ptrain's own FLOP count and mfu / hfu (ptrain/flops.py)
                tf = t.get("tflops_per_step_logged")
                cells += ["-", "-", f"{tf:.3g} (ptrain's)" if tf else "-",
                          f"{_pct(t.get('mfu_logged'))} / {_pct(t.get('hfu_logged'))} (logged)"]
        else:
            cells[1] = plan
        comp = f"{t['compile_s']:.0f}" if t and r["compile"] else "-"
        ac = ("yes" if r.get("ac_mode", "full") == "full" else r["ac_mode"]) if r["ac"] else "no"
        lines.append(f"| {r['row']} | {ac} | {'yes' if r['compile'] else 'no'} | "
                     + " | ".join(cells) + f" | {comp} | {r['status'].splitlines()[0][:120]} |")  # fmt: skip
    calls = [f"Runs: {data['calls']}"] if data.get("calls") else []  # results merged from several calls
    lines += ["", data["peak_note"], data["flops_note"], *calls, *checks_markdown(data.get("checks") or [])]
    lines += profiles_markdown(rows)
    for r in rows:  # a fallback ptrain warned of changes what its row measured: said beside the figures
        warned = (r.get("trainer") or {}).get("warnings")
        if warned:
            lines += ["", f"ptrain's warnings in `{r['row']}`:", "", *(f"- {w[:300]}" for w in warned)]
    return "\n".join(lines) + "\n"


def profiles_markdown(rows: list[dict]) -> list[str]:
    """--profile: each row's top operators (ptrain's run, one window after the timed ones, torch.profiler)."""
    out = []
    for r in rows:
        ops = (r.get("trainer") or {}).get("profile_ops")
        if ops:
            out += ["", f"Top operators of `{r['row']}` (ptrain, one profiled window after the timed ones):", "",
                    "```", *ops, "```"]  # fmt: skip
        prof = (r.get("trainer") or {}).get("profile_summary")
        if prof:
            line = (f"Per step of that window: {1000 * prof['wall_s_per_step']:.1f} ms under the profiler, "
                    f"{prof['kernel_launches_per_step']} kernel launches, {prof['aten_ops_per_step']} aten operators")
            if prof.get("device_s_per_step") is not None:
                line += (f"; the device busy {1000 * prof['device_s_per_step']:.1f} ms: "
                         f"{100 * prof['device_busy_vs_timed_step']:.0f}% of the timed (unprofiled) step, "
                         f"{100 * prof['device_busy']:.0f}% of the profiled one (a low share: the host bounds the step)")
            out += ["", line + "."]
    return out


def _gib(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def checks_markdown(checks: list[dict]) -> list[str]:
    """The one-process checks' table (ring attention): max abs errors of the ring and of full SDPA in the same dtype
    against the reference, kernels, peak memory, time."""
    if not checks:
        return []
    title = ("One-process checks (`ptrain/parallel/ring_check.py`: every cp rank's ring loop in one process; errors "
             "against one full-sequence SDPA in float32 on a GPU, float64 on the CPU):")  # fmt: skip
    cols = ("| check | case | kernels | max abs err out / dq / dk / dv: ring | same: full SDPA | ring peak GiB "
            "(full SDPA) | math kernel's scores per block GiB | ring fwd+bwd s (full SDPA) | status |")  # fmt: skip
    lines = ["", title, "", cols, "|---" * 9 + "|"]
    for c in checks:
        status = c["status"].splitlines()[0][:120]
        if not c.get("cases"):
            lines.append(f"| {c['check']} | - | - | - | - | - | - | - | {status} |")
        for case in c.get("cases", []):
            sh = case["shape"]
            name = (f"{sh['heads']} heads x {sh['head_dim']}, {sh['text']} text + {sh['video']} video, cp "
                    f"{sh['cp']}, {sh['dtype']}{', text mask' if sh['text_mask'] else ''}; {c.get('device')}")  # fmt: skip
            errs = [" / ".join(f"{case[k][n]['max_abs_err']:.2g}" for n in ("out", "dq", "dk", "dv"))
                    for k in ("ring_err", "sdpa_err")]  # fmt: skip
            kernels = ", ".join(k.removeprefix("_scaled_dot_product_") for k in case["kernels"])
            lines.append(f"| {c['check']} | {name} | {kernels} | {errs[0]} | {errs[1]} | {_gib(case['ring_peak_gib'])} "
                         f"({_gib(case['sdpa_peak_gib'])}) | {case['math_scores_gib_per_block']:.2f} | "
                         f"{case['ring_fwd_bwd_s']:.3f} ({case['sdpa_fwd_bwd_s']:.3f}) | "
                         f"{'ok' if case['ok'] else 'FAILED'}; {status} |")  # fmt: skip
    return lines


def gpu_name_and_memory() -> tuple[str | None, float | None]:
    """(name, GiB) of GPU 0 from nvidia-smi, without a CUDA context in this process; (None, None) if unknown."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.splitlines()[0]  # fmt: skip
        name, mib = out.rsplit(",", 1)
        return name.strip(), float(mib) / 1024
    except (OSError, subprocess.SubprocessError, IndexError, ValueError):
        return None, None


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", action="append",
                    help="run this row (repeatable, in the order given; a model's rows run together); see --list")
    ap.add_argument("--set", dest="which", choices=("default", "all"), default="default",
                    help="default: the rows that fit about 8 minutes; all: every row")  # fmt: skip
    ap.add_argument("--list", action="store_true", help="print the row names and exit")
    ap.add_argument("--dry_run", action="store_true", help="print the plan (rows, flags, budgets, minutes) and exit")
    ap.add_argument("--cpu", action="store_true", help="tiny checkpoints on the CPU (gloo, float32): the test mode")
    ap.add_argument("--cpu_dtype", choices=("float32", "bfloat16"), default="float32",
                    help="--cpu: the components' dtype; bfloat16 runs the GPU's dtype path (bf16 model, autocast)")
    ap.add_argument("--out", default=str(RESULTS), help="where gpu.json and gpu.md go (default benchmarks/results)")
    ap.add_argument("--work", help="scratch folder for checkpoints, videos, caches, runs (default: a temp dir)")
    ap.add_argument("--peak_tflops", type=float, help="dense peak of the device (default: ptrain.metrics' table)")
    ap.add_argument("--deadline_s", type=int, default=DEADLINE_S, help="rows not started past this are skipped")
    ap.add_argument("--no_checks", action="store_true", help="skip the one-process ring attention check")
    ap.add_argument("--profile", action="store_true",
                    help="one more window of each ptrain run under torch.profiler (not timed): its top operators "
                         "by device time go to gpu.json and gpu.md")  # fmt: skip
    ap.add_argument("--repeat", type=int, default=1,
                    help="run ptrain and the bare loop N times each, alternating, and keep each one's fastest run "
                         "(noisy shared machines; benchmarks/throughput.py uses 3 on the CPU)")  # fmt: skip
    args = ap.parse_args(argv)
    if args.cpu_dtype != "float32" and not args.cpu:
        ap.error("--cpu_dtype is for --cpu (a GPU run is bf16)")
    os.environ[CPU_DTYPE_ENV] = args.cpu_dtype  # read by model_flags here and in the subprocesses
    all_rows = CPU_ROWS if args.cpu else ROWS
    if args.list:
        for r in all_rows:
            print(f"{r.name}{'' if r.default else '  (--set all)'}")
        return
    rows = select(all_rows, args.only, args.which)
    if args.dry_run:
        return dry_run(rows, all_rows, args.cpu)
    if not args.cpu and gpu_name_and_memory()[0] is None:
        sys.exit("no NVIDIA GPU found (nvidia-smi): run with --cpu for the tiny CPU mode, or --dry_run")
    suite = Suite(args, rows)
    suite.say(f"GPU suite: {len(rows)} rows; work folder {suite.work}; results to {suite.out}")
    import signal

    signal.signal(signal.SIGTERM, suite.terminated)
    suite.run()
    suite.say(f"wrote {suite.out / 'gpu.json'} and {suite.out / 'gpu.md'}")
    if not args.work:
        shutil.rmtree(suite.work, ignore_errors=True)


def _entry() -> None:
    """Internal modes of the subprocesses this file starts, else the command line."""
    mode = sys.argv[1] if len(sys.argv) > 1 else ""
    if mode == "--_capped_ptrain":  # torchrun worker under a memory cap
        apply_cap()
        from ptrain.__main__ import main as ptrain_main

        sys.exit(ptrain_main(sys.argv[2:]))
    if mode == "--_bare":
        job = json.loads(Path(sys.argv[2]).read_text())
        Path(job["out"]).write_text(json.dumps(bare_loop(job), indent=1))
    elif mode == "--_plan":
        plan_all(json.loads(Path(sys.argv[2]).read_text()))
    elif mode == "--_ring_check":  # python benchmarks/gpu.py --_ring_check OUT.json [--cpu]
        from ptrain.parallel.ring_check import suite_check

        Path(sys.argv[2]).write_text(json.dumps(suite_check("--cpu" in sys.argv[3:]), indent=1))
    elif mode == "--_build":
        build_full_checkpoint(sys.argv[2], Path(sys.argv[3]))
    else:
        main()


if __name__ == "__main__":
    _entry()
