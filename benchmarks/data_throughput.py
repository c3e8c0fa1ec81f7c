"""Data loading throughput: decode (decord) + frame sampling + resize/crop through ptrain's own loader.

For each worker count, the samples/s and frames/s one data-parallel rank's StatefulDataLoader delivers, next to
the rate at which training consumes samples (batch 1 per rank at the step times of `results/throughput.json`:
full-size models at 40% H100 MFU, an estimate). A loader faster than that keeps the GPU fed.

    python benchmarks/data_throughput.py                         # synthetic H.264 clips, written once
    python benchmarks/data_throughput.py --data_root MY_CLIPS    # your own data (any format ptrain reads)

Writes results/data_throughput.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
# (model, s per step) when results/throughput.json is missing (same 40% H100 MFU estimates as throughput.py)
FALLBACK_STEP_S = {"ltx-video": 0.07, "cogvideox-5b": 1.28, "hunyuan-video": 2.09, "wan2.1-14b": 13.72}


def synthetic(root: Path, n: int, width: int, height: int, frames: int) -> Path:
    """n H.264 clips of width x height, `frames` frames at 24 fps, in the CogVideoX layout (written once)."""
    import dataclasses

    from ptrain.testing.tiny import render_frames, synthetic_video_specs, write_video

    specs = synthetic_video_specs(n, 0, [(width, height)])
    if (root / "videos.txt").is_file() and len((root / "videos.txt").read_text().splitlines()) == n:
        return root
    t0 = time.perf_counter()
    (root / "videos").mkdir(parents=True, exist_ok=True)
    for spec in specs:
        write_video(root / spec.path, render_frames(dataclasses.replace(spec, num_frames=frames)), 24)
    (root / "prompts.txt").write_text("".join(s.caption + "\n" for s in specs))
    (root / "videos.txt").write_text("".join(s.path + "\n" for s in specs))
    print(f"wrote {n} H.264 clips {width}x{height}, {frames} frames, to {root} in {time.perf_counter() - t0:.0f} s",
          file=sys.stderr)  # fmt: skip
    return root


def measure(data_root: Path, workers: int, num_frames: int, height: int, width: int, samples: int) -> dict:
    from ptrain.config import DataArgs
    from ptrain.data import build_dataloader, scan_dataset
    from ptrain.data.video import FrameSampling

    args = DataArgs(data_root=data_root, num_frames=num_frames, height=height, width=width,
                    dataloader_num_workers=workers)  # fmt: skip
    sampling = FrameSampling.from_args(args)
    usable = scan_dataset(args, sampling)
    loader, _ = build_dataloader(usable, args, sampling, 0, 1, 1, 1, seed=0)
    it = iter(loader)
    next(it)  # start-up (worker processes, first decode)
    times = []
    t_all = time.perf_counter()
    for _ in range(samples):
        t0 = time.perf_counter()
        batch = next(it)
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    f = batch["video"].shape[2]
    del loader, it
    return {"workers": workers, "samples": samples, "wall_s": round(wall, 2), "samples_per_s": samples / wall,
            "frames_per_s": samples * f / wall, "median_wait_ms": statistics.median(times) * 1e3}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data_root", type=Path, default=None, help="default: synthetic clips in /tmp")
    ap.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--num_frames", type=int, default=49)
    ap.add_argument("--height", type=int, default=480)
    ap.add_argument("--width", type=int, default=720)
    ap.add_argument("--samples", type=int, default=12, help="timed samples per worker count")
    ap.add_argument("--json", default=str(RESULTS / "data_throughput.json"))
    ap.add_argument("--markdown", default=str(RESULTS / "data_throughput.md"))
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    data = args.data_root or synthetic(Path("/tmp/ptrain-bench-clips"), 12, 854, 480, 97)
    rows = []
    for w in args.workers:
        r = measure(data, w, args.num_frames, args.height, args.width, args.samples)
        print(f"  workers {w}: {r['samples_per_s']:.2f} samples/s, {r['frames_per_s']:.0f} frames/s", file=sys.stderr)
        rows.append(r)
    step_s = FALLBACK_STEP_S
    tp = RESULTS / "throughput.json"
    if tp.is_file():
        try:
            step_s = {r["variant"]: r["h100_s_at_40pct_mfu"] for r in json.loads(tp.read_text())["full_size"]}
        except (KeyError, TypeError, json.JSONDecodeError):
            pass
    cpu = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    src = "synthetic 854x480 H.264 clips, 97 frames at 24 fps" if args.data_root is None else str(args.data_root)
    lines = [
        f"Measured by `python benchmarks/data_throughput.py` on this machine's CPU ({cpu}): decode + "
        f"{args.num_frames} frames spread over the clip + resize/centre crop to {args.height}x{args.width}, one "
        f"rank's loader, batch 1, {args.samples} samples after one warm-up; data: {src}.",
        "",
        "| loader workers | samples/s | frames/s | median wait per batch ms |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['workers']} | {r['samples_per_s']:.2f} | {r['frames_per_s']:.0f} | {r['median_wait_ms']:.0f} |"
              for r in rows]  # fmt: skip
    best = max(r["samples_per_s"] for r in rows)
    lines += [
        "",
        "Training consumption per rank at batch 1 (step times: full-size models at 40% H100 MFU, an estimate from "
        "`results/throughput.json`):",
        "",
        "| model | s per step | samples/s consumed | best loader here / consumed |",
        "|---|---|---|---|",
    ]
    lines += [f"| {m} | {s:.2f} | {1 / s:.2f} | {best * s:.1f}x |" for m, s in step_s.items()]
    table = "\n".join(lines)
    print(table)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"settings": vars(args) | {"data_root": str(data)}, "rows": rows,
                                           "step_s": step_s}, indent=1, default=str))  # fmt: skip
    Path(args.markdown).write_text(table + "\n")


if __name__ == "__main__":
    main()
