"""Data path throughput: decoding, the loader against what the GPU suite consumes, and ptrain's default step
against a diffusers-example-style loop (issue 15, item 6). Everything runs on this machine's CPU.

1. Decode (one process, one thread): CPU seconds per sample of four decode paths, for the GPU suite's shapes and
   a tiny one, from a real-world-ish 1280x720 H.264 clip of 97 frames (ptrain.testing.tiny.write_textured_video:
   a scene under a fine panning texture, about 6 Mbit/s; `--clips` adds the smooth 854x480 synthetic clip):
     before   - ptrain before this change: full-size frames (frame 0 decoded once more to check its channels),
                converted to float at the source size, resized as float;
     full+u8  - full-size frames resized as uint8, float at the training size (load_clip without the scan's size);
     reduced  - the decoder scales to the covering size (load_clip with the scan's size), float out;
     worker   - reduced, uint8 out: what a loader worker does (the training step converts on the device).
2. Loader: samples/s of one rank's StatefulDataLoader (the `worker` path) with 0, 1, 2 workers at the largest
   suite shape, and per GPU-suite row (benchmarks/gpu.py ROWS) the samples/s its step consumes at batch 1: the
   step time measured by the suite (results/gpu.json), else measured by hand on an H200 (results/gpu_h200.json),
   else estimated at 40% H100 MFU (results/throughput.json, or counted here for a model it lacks). The loader's
   rate with W workers on a node is projected as W / (decode seconds per sample of one worker): one core each,
   linear (this machine has only 2 cores, so scaling beyond 2 workers is not measured).
3. Default step: the tiny CogVideoX checkpoint at 9x64x96 on three textured videos (1280x720, 640x272, 176x144),
   one process, one thread, float32: ptrain with its defaults (precomputation auto), ptrain with
   --enable_precomputation off (decoding and encoding every step, 2 loader workers), and a loop written like
   diffusers' CogVideoX LoRA example (every video encoded by the VAE once before training; per step a latent
   drawn from its distribution, the prompt encoded by T5, v-prediction loss weighted 1 / (1 - alpha_bar), AdamW,
   gradient clipping; LoRA r64 on to_q/to_k/to_v/to_out.0 through peft). Step time as ptrain logs it: the mean
   over windows of 10 steps, the median window after the first; ptrain and the example run twice each,
   alternating, and the faster run of each counts (a shared machine); also the median CPU time per step, which
   other work on the machine inflates less (ptrain's: over Trainer.train_step + log_step, timed by a wrapper).

    python benchmarks/data_throughput.py                   # all three (about 3 minutes on 2 cores; clips cached)
    python benchmarks/data_throughput.py --parts decode loader

Writes results/data_throughput.{json,md}; then stamp and regenerate the README (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))
RESULTS = HERE / "results"
WORK = Path("/tmp/ptrain-bench-data")
#: Loader workers a 16-core node with one GPU (the GPU suite's machine) gives its one rank: one core each, two
#: cores left to the training process (its Python thread and the device's launch / copy work).
NODE_CORES, NODE_WORKERS = 16, 14
#: Decode shapes beyond the GPU suite's (frames, height, width)
TINY_SHAPE = (9, 64, 96)
COMPARE_VIDEOS = ((1280, 720, 72), (640, 272, 120), (176, 144, 60))  # width, height, frames (24 fps)


def clips(names: list[str]) -> dict[str, Path]:
    """The decode / loader clips, written once: name -> dataset folder (CogVideoX layout, 2 clips of 97 frames)."""
    import dataclasses

    from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_textured_video, write_video

    out = {}
    for name, (w, h, textured) in {"textured-1280x720": (1280, 720, True), "smooth-854x480": (854, 480, False)}.items():
        if name not in names:
            continue
        root = WORK / name
        if not (root / "videos.txt").is_file():
            (root / "videos").mkdir(parents=True, exist_ok=True)
            specs = synthetic_video_specs(2, 0, [(w, h)])
            for k, spec in enumerate(specs):
                if textured:
                    write_textured_video(root / spec.path, w, h, 97, 24, seed=k)
                else:
                    write_video(root / spec.path, render_frames(dataclasses.replace(spec, num_frames=97)), 24)
            (root / "prompts.txt").write_text("".join(s.caption + "\n" for s in specs))
            (root / "videos.txt").write_text("".join(s.path + "\n" for s in specs))
        out[name] = root
    return out


def decode_before(path: Path, frames: int, height: int, width: int) -> torch.Tensor:
    """ptrain's decode before issue 15 item 6, as it was: (C, F, H, W) float in [-1, 1]."""
    import decord

    from ptrain.data.video import FrameSampling, resize_crop

    vr = decord.VideoReader(str(path), ctx=decord.cpu(0), num_threads=1)
    vr[0]  # the old reader decoded frame 0 to check for decord's 4-channel widths
    frames_ = vr.get_batch(FrameSampling(frames).indices(len(vr))).asnumpy()
    x = torch.from_numpy(frames_).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    return resize_crop(x, height, width).clamp(-1.0, 1.0).permute(1, 0, 2, 3).contiguous()


def time_decode(data: dict[str, Path], shapes: list[tuple[int, int, int]], reps: int) -> list[dict]:
    from ptrain.data.video import load_clip, probe

    torch.set_num_threads(1)
    rows = []
    for name, root in data.items():
        path = min((root / "videos").glob("*.mp4"))
        info = probe(path)
        paths = {"before": lambda f, h, w, p=path: decode_before(p, f, h, w),
                 "full+u8": lambda f, h, w, p=path, i=info: load_clip(p, f, h, w, source=i, scale_in_decoder=False),
                 "reduced": lambda f, h, w, p=path, i=info: load_clip(p, f, h, w, source=i),
                 "worker": lambda f, h, w, p=path, i=info: load_clip(p, f, h, w, source=i, as_uint8=True)}  # fmt: skip
        for f, h, w in shapes:
            row = {"clip": name, "shape": f"{f}x{h}x{w}"}
            for label, fn in paths.items():
                fn(f, h, w)  # warm-up
                times = []
                for _ in range(reps):
                    t0 = time.process_time()  # CPU seconds of this (one-thread) process: other load does not count
                    fn(f, h, w)
                    times.append(time.process_time() - t0)
                row[label] = min(times)
            rows.append(row)
            print(f"  decode {name} {row['shape']}: " + ", ".join(f"{k} {row[k]:.3f} s" for k in paths),
                  file=sys.stderr)  # fmt: skip
    return rows


def loader_rate(root: Path, workers: int, shape: tuple[int, int, int], samples: int) -> dict:
    from ptrain.config import DataArgs
    from ptrain.data import build_dataloader, scan_dataset
    from ptrain.data.video import FrameSampling

    f, h, w = shape
    args = DataArgs(data_root=root, num_frames=f, height=h, width=w, dataloader_num_workers=workers,
                    enable_precomputation="off")  # fmt: skip
    sampling = FrameSampling.from_args(args)
    loader, _ = build_dataloader(scan_dataset(args, sampling), args, sampling, 0, 1, 1, 1, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker processes, first decode)
    t0 = time.perf_counter()
    for _ in range(samples):
        next(it)
    wall = time.perf_counter() - t0
    del loader, it
    return {"workers": workers, "shape": f"{f}x{h}x{w}", "samples": samples, "samples_per_s": samples / wall}


def suite_step_times() -> list[dict]:
    """Per GPU-suite row: shape, step seconds and where that figure comes from."""
    from benchmarks.gpu import ROWS

    measured = {}
    if (RESULTS / "gpu.json").is_file():
        for r in json.loads((RESULTS / "gpu.json").read_text())["rows"]:
            if r.get("trainer"):
                measured[r["row"]] = r["trainer"]["step_s"]
    h200 = {}
    for r in json.loads((RESULTS / "gpu_h200.json").read_text())["rows"]:
        h200[(r["variant"], r["training_type"], r["compile"])] = float(str(r["step_s"]).split("-")[0])
    estimate = {r["variant"]: r["h100_s_at_40pct_mfu"] for r in json.loads((RESULTS / "throughput.json").read_text())
                ["full_size"]}  # fmt: skip
    out = []
    for row in ROWS:
        est = estimate.get(row.variant)
        if est is None:
            from benchmarks.throughput import full_size_flops

            est = estimate[row.variant] = full_size_flops(row.variant)["h100_s_at_40pct_mfu"]
        if row.name in measured:
            step, src = measured[row.name], "measured by the GPU suite (gpu.json)"
        elif (row.variant, row.training_type, row.compile) in h200:
            step, src = h200[(row.variant, row.training_type, row.compile)], "measured on an H200 (gpu_h200.json)"
        else:
            step, src = est, "estimate at 40% H100 MFU"
        out.append({"row": row.name, "shape": "x".join(map(str, row.frames_hw)), "step_s": step, "source": src,
                    "estimate_s": est})  # fmt: skip
    return out


def tiny_cogvideox() -> tuple[Path, Path]:
    from ptrain.testing.tiny import synthetic_video_specs, write_textured_video, write_tiny_checkpoint

    ckpt, data = WORK / "tiny-cogvideox", WORK / "compare-data"
    if not (ckpt / "model_index.json").is_file():
        write_tiny_checkpoint(ckpt, model_name="cogvideox", seed=0)
    if not (data / "videos.txt").is_file():
        (data / "videos").mkdir(parents=True, exist_ok=True)
        specs = synthetic_video_specs(len(COMPARE_VIDEOS), 0, [(w, h) for w, h, _ in COMPARE_VIDEOS])
        for k, (spec, (w, h, n)) in enumerate(zip(specs, COMPARE_VIDEOS, strict=True)):
            write_textured_video(data / spec.path, w, h, n, 24, seed=k)
        (data / "prompts.txt").write_text("".join(s.caption + "\n" for s in specs))
        (data / "videos.txt").write_text("".join(s.path + "\n" for s in specs))
    return ckpt, data


#: `python -m ptrain`, with the CPU seconds of every step (Trainer.train_step + log_step, the loop's work) written
#: to $PTRAIN_BENCH_CPU: measurement only, the run is ptrain's own.
CPU_TIMED_PTRAIN = """
import json, os, sys, time
import ptrain.trainer as T
from ptrain.__main__ import main
cpu = []
def timed(name):
    orig = getattr(T.Trainer, name)
    def run(self, *a, **k):
        c = time.process_time()
        out = orig(self, *a, **k)
        if name == "train_step":
            cpu.append(0.0)
        cpu[-1] += time.process_time() - c
        return out
    setattr(T.Trainer, name, run)
timed("train_step"); timed("log_step")
rc = main(sys.argv[1:])
json.dump(cpu, open(os.environ["PTRAIN_BENCH_CPU"], "w"))
sys.exit(rc)
"""


def ptrain_step(ckpt: Path, data: Path, out: Path, steps: int, *extra: str) -> dict:
    """ptrain (one process, OMP_NUM_THREADS=1) on the tiny CogVideoX: median step time of the logged windows after
    the first, median CPU seconds per step after the first 10, and the start-up lines that say what it chose."""
    f, h, w = TINY_SHAPE
    cmd = [sys.executable, "-c", CPU_TIMED_PTRAIN, "--model_name", "cogvideox",
           "--pretrained_model_name_or_path", str(ckpt),
           "--data_root", str(data), "--output_dir", str(out), "--num_frames", str(f), "--height", str(h),
           "--width", str(w), "--train_steps", str(steps), "--logging_steps", "10", "--transformer_dtype", "float32",
           "--vae_dtype", "float32", "--text_encoder_dtype", "float32", "--report_to", "none",
           "--checkpointing_steps", "0", "--resume_from_checkpoint", "none", *extra]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "PTRAIN_BENCH_CPU": str(out) + ".cpu.json"}  # fmt: skip
    shutil.rmtree(out, ignore_errors=True)  # a cold start: precomputation (if chosen) is part of the run
    t0 = time.perf_counter()
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, check=False)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"ptrain failed:\n{p.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    said = [line.split("INFO ", 1)[1] for line in p.stderr.splitlines()
            if "INFO precomputation:" in line or "INFO data:" in line]  # fmt: skip
    cpu = json.loads(Path(env["PTRAIN_BENCH_CPU"]).read_text())[10:]
    return {"step_s": statistics.median(r["step_time_s"] for r in rows[1:]), "cpu_step_s": statistics.median(cpu),
            "wall_s": wall, "log": said}  # fmt: skip


def example_step(ckpt: Path, data: Path, steps: int, warmup: int = 5) -> dict:
    """The diffusers-example-style loop (module docstring, part 3) on the same checkpoint and videos."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXTransformer3DModel
    from peft import LoraConfig
    from transformers import AutoTokenizer, T5EncoderModel

    from ptrain.data.video import load_clip

    torch.set_num_threads(1)
    torch.manual_seed(0)
    transformer = CogVideoXTransformer3DModel.from_pretrained(ckpt / "transformer")
    vae = AutoencoderKLCogVideoX.from_pretrained(ckpt / "vae")
    text_encoder, tokenizer = T5EncoderModel.from_pretrained(ckpt / "text_encoder"), AutoTokenizer.from_pretrained(
        ckpt / "tokenizer")  # fmt: skip
    scheduler = CogVideoXDDIMScheduler.from_pretrained(ckpt / "scheduler")
    for m in (transformer, vae, text_encoder):
        m.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=64, lora_alpha=64, init_lora_weights=True,
                                       target_modules=["to_k", "to_q", "to_v", "to_out.0"]))  # fmt: skip
    params = [p for p in transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    prompts = (data / "prompts.txt").read_text().splitlines()
    videos = (data / "videos.txt").read_text().splitlines()
    f, h, w = TINY_SHAPE
    t0 = time.perf_counter()
    with torch.no_grad():  # the example encodes every video once, before training
        dists = [vae.encode(load_clip(data / v, f, h, w)[None]).latent_dist for v in videos]
    encode_s = time.perf_counter() - t0
    seq = transformer.config.max_text_seq_length

    def step(i: int) -> None:
        k = i % len(videos)
        latents = (dists[k].sample() * vae.config.scaling_factor).permute(0, 2, 1, 3, 4)
        with torch.no_grad():
            ids = tokenizer([prompts[k]], padding="max_length", max_length=seq, truncation=True,
                            add_special_tokens=True, return_tensors="pt").input_ids  # fmt: skip
            prompt_embeds = text_encoder(ids)[0]
        noise = torch.randn_like(latents)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (1,))
        noisy = scheduler.add_noise(latents, noise, t)
        out = transformer(hidden_states=noisy, encoder_hidden_states=prompt_embeds, timestep=t, return_dict=False)[0]
        pred = scheduler.get_velocity(out, noisy, t)
        weight = (1 / (1 - scheduler.alphas_cumprod[t])).view(-1, 1, 1, 1, 1)
        loss = torch.mean((weight * (pred - latents) ** 2).reshape(1, -1), dim=1).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad()

    for i in range(warmup):
        step(i)
    windows, cpu = [], []  # as ptrain logs step_time_s: the mean over each window of 10 steps; the median counts
    for k in range(steps // 10):
        t1 = time.perf_counter()
        for i in range(10):
            c1 = time.process_time()
            step(10 * k + i)
            cpu.append(time.process_time() - c1)
        windows.append((time.perf_counter() - t1) / 10)
    return {"step_s": statistics.median(windows), "cpu_step_s": statistics.median(cpu), "encode_once_s": encode_s}


def compare(steps: int) -> dict:
    ckpt, data = tiny_cogvideox()
    out: dict = {"videos": [f"{w}x{h}, {n} frames" for w, h, n in COMPARE_VIDEOS]}
    # Each twice, alternating (the machine is shared: the faster run of each counts).
    examples, defaults = [], []
    for _ in range(2):
        examples.append(example_step(ckpt, data, steps))
        defaults.append(ptrain_step(ckpt, data, WORK / "run-default", steps))
    out["ptrain_default"] = min(defaults, key=lambda r: r["step_s"])
    out["example"] = min(examples, key=lambda r: r["step_s"])
    for r in (out["ptrain_default"], out["example"]):
        r["cpu_step_s"] = min(x["cpu_step_s"] for x in (defaults if r is out["ptrain_default"] else examples))
    print(f"  ptrain default: {out['ptrain_default']['step_s'] * 1e3:.1f} ms/step, CPU "
          f"{out['ptrain_default']['cpu_step_s'] * 1e3:.1f} ms/step", file=sys.stderr)  # fmt: skip
    out["ptrain_off"] = ptrain_step(ckpt, data, WORK / "run-off", 40, "--enable_precomputation", "off")
    print(f"  ptrain --enable_precomputation off: {out['ptrain_off']['step_s'] * 1e3:.1f} ms/step", file=sys.stderr)
    print(f"  example-style loop: {out['example']['step_s'] * 1e3:.1f} ms/step, CPU "
          f"{out['example']['cpu_step_s'] * 1e3:.1f} ms/step", file=sys.stderr)  # fmt: skip
    return out


def _chose(log: list[str]) -> str:
    """The decision and the worker count from ptrain's start-up lines (paths left out)."""
    decision = next((m.split(" in /", 1)[0].split(" -> ", 1)[0] for m in log if m.startswith("precomputation: o")), "")
    workers = next((m.rsplit("; ", 1)[-1] for m in log if m.startswith("data: ")), "")
    return f"{decision}{')' if decision.count('(') > decision.count(')') else ''}; {workers}"


def markdown(res: dict) -> str:
    cpu = res["machine"]
    lines = [(f"Measured by `python benchmarks/data_throughput.py` on this machine's CPU ({cpu}), one thread per "
             "process unless said."), ""]  # fmt: skip
    if res.get("decode"):
        lines += [("Decode, CPU seconds per sample (one process, one thread; frames spread over a 97-frame clip, "
                  "centre crop): before = full-size float conversion and resize (ptrain before issue 15 item 6); "
                  "full+u8 = full-size decode, uint8 resize; reduced = the decoder scales to the covering size; "
                  "worker = reduced with uint8 out (a loader worker's work; the step converts on the device). "
                  f"CPU seconds, minimum of {res['settings']['reps']} runs."), "",
                  "| clip | F x H x W | before s | full+u8 s | reduced s | worker s | before / worker |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        lines += [f"| {r['clip']} | {r['shape']} | {r['before']:.3f} | {r['full+u8']:.3f} | {r['reduced']:.3f} "
                  f"| {r['worker']:.3f} | {r['before'] / r['worker']:.1f}x |" for r in res["decode"]]  # fmt: skip
    if res.get("loader"):
        lo = res["loader"]
        lines += ["", f"One rank's loader on the textured 1280x720 clips at {lo['rows'][0]['shape']} (worker path), "
                  "samples/s: "
                  + ", ".join(f"{r['samples_per_s']:.2f} with {r['workers']} workers" for r in lo["rows"])
                  + f" (2 cores, shared: {lo['scaling_note']}).", "",
                  (f"Against the GPU suite (benchmarks/gpu.py rows, batch 1): projected loader rate with "
                  f"{NODE_WORKERS} workers on a {NODE_CORES}-core node with one GPU = {NODE_WORKERS} / (worker "
                  "CPU s per sample of the textured clip at the row's shape), one core per worker (an "
                  "extrapolation: not measured beyond 2 workers)."), "",
                  ("| row | F x H x W | s/step (source) | samples/s consumed | loader samples/s, 14 workers "
                  "| loader / consumed | at 40% H100 MFU (estimate): s/step, loader / consumed |"),
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in lo["suite"]:
            lines.append(f"| {r['row']} | {r['shape']} | {r['step_s']:.2f} ({r['source']}) | {1 / r['step_s']:.2f} "
                         f"| {r['loader_per_s']:.1f} | {r['loader_per_s'] * r['step_s']:.1f}x "
                         f"| {r['estimate_s']:.3f}, {r['loader_per_s'] * r['estimate_s']:.1f}x |")  # fmt: skip
    if res.get("compare"):
        c = res["compare"]
        d, off, ex = c["ptrain_default"], c["ptrain_off"], c["example"]
        lines += ["", (f"Default step, tiny CogVideoX at {'x'.join(map(str, TINY_SHAPE))}, 3 textured videos "
                  f"({'; '.join(c['videos'])}), one process, one thread, float32, batch 1, LoRA r64:"), "",
                  "| run | ms per step (wall) | CPU ms per step | one-time work | what it chose |",
                  "|---|---|---|---|---|",
                  (f"| ptrain, defaults | {d['step_s'] * 1e3:.1f} | {d['cpu_step_s'] * 1e3:.1f} | whole run "
                  f"{d['wall_s']:.0f} s | {_chose(d['log'])} |"),
                  (f"| ptrain, --enable_precomputation off | {off['step_s'] * 1e3:.1f} | - | whole run "
                  f"{off['wall_s']:.0f} s | {_chose(off['log'])} |"),
                  (f"| diffusers-example-style loop | {ex['step_s'] * 1e3:.1f} | {ex['cpu_step_s'] * 1e3:.1f} | VAE "
                  f"encode of the 3 videos {ex['encode_once_s']:.1f} s | - |"), "",
                  (f"ptrain's default step / the example's: {d['step_s'] / ex['step_s']:.2f} (wall), "
                  f"{d['cpu_step_s'] / ex['cpu_step_s']:.2f} (median CPU time per step, which other work on the "
                  "machine inflates less: ptrain's over Trainer.train_step + log_step, after 10 steps).")]  # fmt: skip
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--parts", nargs="+", choices=["decode", "loader", "compare"],
                    default=["decode", "loader", "compare"])  # fmt: skip
    ap.add_argument("--clips", nargs="+", default=["textured-1280x720"],
                    choices=["textured-1280x720", "smooth-854x480"])  # fmt: skip
    ap.add_argument("--reps", type=int, default=2, help="timed decodes per clip, shape and path (the minimum is kept)")
    ap.add_argument("--samples", type=int, default=6, help="timed samples per worker count")
    ap.add_argument("--steps", type=int, default=200, help="training steps of the default-step comparison")
    ap.add_argument("--json", default=str(RESULTS / "data_throughput.json"))
    ap.add_argument("--markdown", default=str(RESULTS / "data_throughput.md"))
    args = ap.parse_args()
    from benchmarks.gpu import ROWS

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor() or platform.machine())  # fmt: skip
    res: dict = {"machine": f"{cpu}, {os.cpu_count()} cores", "settings": vars(args)}
    suite_shapes = list(dict.fromkeys(tuple(r.frames_hw) for r in ROWS))
    data = clips(args.clips) if {"decode", "loader"} & set(args.parts) else {}
    if "decode" in args.parts:
        res["decode"] = time_decode(data, [*suite_shapes, TINY_SHAPE], args.reps)
    if "loader" in args.parts:
        big = max(suite_shapes, key=lambda s: s[0] * s[1] * s[2])
        rows = [loader_rate(data["textured-1280x720"], w, big, args.samples) for w in (0, 1, 2)]
        per = {(r["clip"], r["shape"]): r["worker"] for r in res.get("decode") or time_decode(
            {"textured-1280x720": data["textured-1280x720"]}, suite_shapes, 1)}  # fmt: skip
        suite = suite_step_times()
        for r in suite:
            r["loader_per_s"] = NODE_WORKERS / per[("textured-1280x720", r["shape"])]  # worker path, one core each
        scaling = rows[2]["samples_per_s"] / rows[0]["samples_per_s"]
        res["loader"] = {"rows": rows, "suite": suite,
                         "scaling_note": f"2 workers give {scaling:.2f}x the rate of none"}  # fmt: skip
    if "compare" in args.parts:
        res["compare"] = compare(args.steps)
    table = markdown(res)
    print(table)
    Path(args.json).write_text(json.dumps(res, indent=1, default=str) + "\n")
    Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
