"""Chaos test: SIGKILL a real 2-rank training run at a random moment, re-run it, and check the exports are identical.

ptrain promises that a run killed at ANY moment (start-up, a step, an async checkpoint write, rotation,
validation, the final export) and started again with the same command (`--resume_from_checkpoint auto`, the
default) ends with exactly the weights an uninterrupted run exports. This harness checks that promise, without
mocks, on a tiny LTX-Video checkpoint and a synthetic dataset written by ptrain's own fixtures
(`ptrain.testing.tiny`):

1. Reference: one uninterrupted run per variant (lora / full fine-tune); its wall time T and the sha256 of every
   exported weight file (`*.safetensors` under OUT, outside checkpoints/ and validation/; EMA ones included).
2. Each trial: a fresh OUT; the same command in its own session, output to a log file; at a kill time drawn
   uniformly in (0, T) from `random.Random(--seed)`, every process of the run (torchrun, both ranks, their data
   loader workers, async checkpoint threads) is frozen with SIGSTOP and then SIGKILLed, like a machine losing
   power. torchrun starts each rank in a session of its own (start_new_session=True), so killing torchrun's
   process group alone would leave the ranks running: the harness walks the process tree instead.
   Then the same command is re-run until it exits 0 (at most 3 re-runs; every non-zero exit is a failure).
3. Checks: the export hashes equal the reference; the first re-run logs "resuming from ... at step K" with K the
   newest checkpoint the killed run left (and no resume line if it left none); metrics.jsonl holds steps 1..8,
   each exactly once. The phase the kill landed in is read, best effort, from the killed run's log.

    python benchmarks/chaos.py --trials 20 --seed 0            # both variants, ~45 min on 2 CPU cores
    python benchmarks/chaos.py --trials 2 --variant lora       # quick check

Writes the table (rewritten after every trial, so partial results survive) to --out; exits 1 if any trial
is not identical or fails.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STEPS = 8
ARGS = (
    "--model_name ltx_video --dp_shards 2 --train_steps 8 --checkpointing_steps 2 --checkpointing_limit 2 "
    "--async_checkpoint --export_every_checkpoint --validation_prompts 'a red ball' --validation_steps 4 "
    "--validation_num_inference_steps 2 --height 32 --width 32 --num_frames 9 --seed 5 --batch_size 1 "
    "--gradient_accumulation_steps 2 --lr_scheduler cosine --lr_warmup_steps 2 --ema_decay 0.9 --export_ema "
    "--report_to none"
)
VARIANT_ARGS = {"lora": ["--training_type", "lora"], "full": ["--training_type", "full-finetune", "--lr", "1e-5"]}
ENV = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
ENV["OMP_NUM_THREADS"] = "1"


def command(ckpt: Path, data: Path, out: Path, variant: str) -> list[str]:
    import shlex

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ptrain",
            "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--output_dir", str(out),
            *shlex.split(ARGS), *VARIANT_ARGS[variant]]  # fmt: skip


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO, env=ENV, start_new_session=True)


def descendants(root: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        try:
            ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(d.name))
        except (ValueError, OSError, IndexError):
            continue
    found, todo = set(), [root]
    while todo:
        for c in children.get(todo.pop(), []):
            if c not in found:
                found.add(c)
                todo.append(c)
    return found


def kill_tree(proc: subprocess.Popen) -> None:
    """Freeze the whole tree (SIGSTOP until no new process appears), then SIGKILL all of it at once."""
    stopped: set[int] = set()
    while True:
        pids = {proc.pid} | descendants(proc.pid)
        if pids <= stopped:
            break
        for pid in pids - stopped:
            try:
                os.killpg(os.getpgid(pid), signal.SIGSTOP)
                os.kill(pid, signal.SIGSTOP)
            except ProcessLookupError:
                pass
        stopped |= pids
    for pid in stopped:
        try:
            os.killpg(os.getpgid(pid), signal.SIGKILL)
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    deadline = time.time() + 30  # orphans are reaped by init: wait until none is left
    while any(Path(f"/proc/{p}").exists() and "Z" not in _state(p) for p in stopped) and time.time() < deadline:
        time.sleep(0.1)


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return "Z"


def run_to_end(cmd: list[str], log: Path, timeout: float) -> tuple[int, float]:
    t0, proc = time.time(), launch(cmd, log)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        rc = -999
    return rc, time.time() - t0


def export_hashes(out: Path) -> dict[str, str]:
    files = [
        p
        for p in sorted(out.rglob("*.safetensors"))
        if p.relative_to(out).parts[0] not in ("checkpoints", "validation")
    ]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def newest_checkpoint(out: Path) -> int | None:
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if (p / "ptrain_checkpoint.json").is_file()]
    return max(steps, default=None)


def left_on_disk(out: Path) -> str:
    ck = sorted(p.name for p in (out / "checkpoints").glob("*")) if (out / "checkpoints").is_dir() else []
    staged = sorted(p.name for p in out.glob(".*")) if out.is_dir() else []
    return " ".join(ck + staged) or "-"


def phase(log: str) -> str:
    """Best effort: where the kill landed, from the progress bar and rank 0's INFO lines."""
    step, started, done, vals = 0, False, False, set()
    for seg in re.split(r"[\r\n]", log):
        if m := re.search(r"train:.*?\|\s*(\d+)/\d+ \[", seg):
            step = max(step, int(m.group(1)))
        started |= " INFO data: " in seg
        done |= " INFO done: " in seg
        if m := re.search(r"INFO validation: .*step-(\d+)", seg):
            vals.add(int(m.group(1)))
    if done:
        return "exit after 'done'"
    if not started:
        return "start-up"
    if step == 0:
        return "before step 1"
    if step % 4 == 0 and step not in vals:
        return f"validation @{step}"
    if step == STEPS:
        return "final ckpt/export"
    if step % 2 == 0:
        return f"ckpt-{step} save / step {step + 1}"
    return f"training step {step + 1}"


def tail(path: Path, n: int = 15) -> str:
    lines = [s for s in re.split(r"[\r\n]", path.read_text(errors="replace")) if s.strip()]
    return "\n".join(lines[-n:])


def trial(cmd, out: Path, kill_at: float, ref: dict, T: float) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = out.parent / f"{out.name}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    r = {"kill_at": kill_at, "failures": [], "reruns": 0}
    proc = launch(cmd, logs / "killed.log")
    try:
        rc = proc.wait(timeout=kill_at)
        r["phase"] = "not interrupted"
        if rc != 0:
            r["failures"].append(f"uninterrupted run exited {rc}:\n{tail(logs / 'killed.log')}")
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        r["phase"] = phase((logs / "killed.log").read_text(errors="replace"))
    r["left"] = left_on_disk(out)
    expect = newest_checkpoint(out)
    for i in range(1, 4):
        r["reruns"] = i
        log = logs / f"rerun{i}.log"
        rc, _ = run_to_end(cmd, log, timeout=10 * T + 120)
        text = log.read_text(errors="replace")
        if i == 1:
            m = re.search(r"resuming from (\S+) at step (\d+)", text)
            r["resumed"] = int(m.group(2)) if m else None
            if r["resumed"] != expect:
                r["failures"].append(f"re-run 1 resumed from {r['resumed']}, expected {expect} (left: {r['left']})")
        if rc == 0:
            break
        r["failures"].append(f"re-run {i} exited {rc}:\n{tail(log)}")
    metrics = out / "metrics.jsonl"
    steps = (
        [json.loads(x).get("step") for x in metrics.read_text().splitlines() if x.strip()] if metrics.exists() else []
    )
    if steps != list(range(1, STEPS + 1)):
        r["failures"].append(f"metrics.jsonl steps {steps}, expected 1..{STEPS} once each")
    got = export_hashes(out)
    r["identical"] = rc == 0 and got == ref
    if not r["identical"]:
        diff = sorted(k for k in set(got) | set(ref) if got.get(k) != ref.get(k))
        r["failures"].append(f"exports differ from the reference: {diff}")
    return r


def write_report(path: Path, header: str, results: dict, refs: dict) -> str:
    lines = [header, ""]
    for variant, rows in results.items():
        T, hashes = refs[variant]
        lines += [f"## {variant}", "", f"Reference: {T:.1f} s uninterrupted; exports:", ""]
        lines += [f"- `{k}` sha256 `{v[:16]}…`" for k, v in hashes.items()]
        lines += ["", "| trial | kill time s | phase | left on disk after kill | resumed from step | re-runs | identical |",
                  "|---|---|---|---|---|---|---|"]  # fmt: skip
        for i, r in enumerate(rows, 1):
            ok = "yes" if r["identical"] and not r["failures"] else ("yes, but FAILED" if r["identical"] else "**no**")
            lines.append(f"| {i} | {r['kill_at']:.2f} | {r['phase']} | {r['left']} | "
                         f"{r['resumed'] if r['resumed'] is not None else '-'} | {r['reruns']} | {ok} |")  # fmt: skip
        lines += ["", summary(variant, rows), ""]
        for i, r in enumerate(rows, 1):
            for f in r["failures"]:
                lines += [f"Trial {i} FAILURE:", "```", f, "```", ""]
    text = "\n".join(lines)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n")
    return text


def summary(variant: str, rows: list) -> str:
    ident = sum(r["identical"] for r in rows)
    intr = sum(r["phase"] != "not interrupted" for r in rows)
    failed = sum(bool(r["failures"]) for r in rows)
    resumed = sum(r["resumed"] is not None for r in rows)
    return (f"**{variant}: {ident}/{len(rows)} identical** ({intr} interrupted, {len(rows) - intr} not interrupted; "
            f"{resumed} resumed from a checkpoint; {failed} with failures)")  # fmt: skip


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--variant", choices=["lora", "full", "both"], default="both")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--work_dir", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "chaos.md")
    a = ap.parse_args()
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="ptrain-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    print(f"seed {a.seed}, work dir {work}", flush=True)
    import torch

    ckpt, data = work / "ckpt", work / "data"
    for extra, d in (([], ckpt), (["--videos", "--num_videos", "6"], data)):
        if not d.exists():
            subprocess.run([sys.executable, "-m", "ptrain.testing.tiny", "--output_dir", str(d), *extra],
                           check=True, cwd=REPO, env=ENV, capture_output=True)  # fmt: skip
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        "?",
    )
    argv = " ".join(sys.argv[1:])
    header = (f"# Chaos test: SIGKILL at a random moment, resume, compare exports\n\n"
              f"`python benchmarks/chaos.py {argv}`{' ' if argv else ''}(seed {a.seed}) on {os.cpu_count()} CPUs "
              f"({cpu}), torch {torch.__version__}, {datetime.date.today()}. Training command (lora; full adds "
              f"`--training_type full-finetune --lr 1e-5`):\n\n"
              f"`python -m torch.distributed.run --standalone --nproc_per_node=2 -m ptrain "
              f"--pretrained_model_name_or_path CKPT --data_root DATA --output_dir OUT {ARGS} --training_type lora`")  # fmt: skip
    variants = ["lora", "full"] if a.variant == "both" else [a.variant]
    results: dict[str, list] = {}
    refs: dict[str, tuple] = {}
    bad = 0
    for variant in variants:
        ref_out = work / variant / "reference"
        shutil.rmtree(ref_out, ignore_errors=True)
        ref_out.mkdir(parents=True)
        rc, T = run_to_end(command(ckpt, data, ref_out, variant), work / variant / "reference.log", 1800)
        if rc != 0:
            print(f"{variant}: reference run exited {rc}:\n{tail(work / variant / 'reference.log')}")
            return 2
        refs[variant] = (T, export_hashes(ref_out))
        print(f"{variant}: reference {T:.1f} s, exports {list(refs[variant][1])}", flush=True)
        results[variant] = []
        for i in range(1, a.trials + 1):
            kill_at = rng.uniform(0, T)
            out = work / variant / f"trial-{i:02d}"
            r = trial(command(ckpt, data, out, variant), out, kill_at, refs[variant][1], T)
            results[variant].append(r)
            bad += bool(r["failures"]) or not r["identical"]
            print(f"{variant} trial {i}: kill at {kill_at:.2f} s ({r['phase']}; left {r['left']}), resumed from "
                  f"{r['resumed']}, {r['reruns']} re-run(s), identical: {r['identical']}"
                  + "".join(f"\n  FAILURE: {f}" for f in r["failures"]), flush=True)  # fmt: skip
            write_report(a.out, header, results, refs)
    print(write_report(a.out, header, results, refs))
    print(f"results: {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
