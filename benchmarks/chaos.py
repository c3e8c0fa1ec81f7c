"""Chaos test: SIGKILL a real 2-rank training run at a random moment, re-run it, and check the exports are identical.

ptrain promises that a run killed at ANY moment (start-up, a step, an async checkpoint write, rotation,
validation, the final export) and started again with the same command (`--resume_from_checkpoint auto`, the
default) ends with exactly the weights an uninterrupted run exports. This harness checks that promise, without
mocks, on a tiny LTX-Video checkpoint and a synthetic dataset written by ptrain's own fixtures
(`ptrain.testing.tiny`):

1. Reference: one uninterrupted run per variant (lora / full fine-tune); its wall time T, the moment T1 its
   first metrics.jsonl row (step 1) appeared, and the sha256 of every exported weight file (`*.safetensors`
   under OUT, outside checkpoints/ and validation/; EMA ones included).
2. Each trial: a fresh OUT; the same command in its own session, output to a log file; at a kill time drawn from
   `random.Random(--seed)`, every process of the run (torchrun, both ranks, their data loader workers, async
   checkpoint threads) is frozen with SIGSTOP and then SIGKILLed, like a machine losing power. The kill time:
   `--window run` (default): uniform in (0, T) after the trial's start (about half of it lands in start-up);
   `--window training`: the trial's own first metrics row + u * (T - T1), u uniform in [0, 1), so kills land in
   the steps, async saves and their commits, rotation, validation, the final checkpoint and the export (start-up
   time varies with load, so the delay is measured from the trial's own step 1). torchrun starts each rank in a
   session of its own (start_new_session=True), so killing torchrun's process group alone would leave the ranks
   running: the harness walks the process tree instead.
   Then the same command is re-run until it exits 0 (at most 3 re-runs; every non-zero exit is a failure).
3. Checks: the export hashes equal the reference; the first re-run logs "resuming from ... at step K" with K the
   newest checkpoint the killed run left (and no resume line if it left none); metrics.jsonl holds steps 1..8,
   each exactly once. The phase the kill landed in is read, best effort, from the killed run's log (progress bar,
   "validation:", "checkpoint saved:", "checkpoint rotation", "done:") and what it left on disk (checkpoint
   folders, OUT/.export-tmp: an export being staged or published, OUT/ptrain_export.json: the export published).

    python benchmarks/chaos.py --trials 20 --seed 0                    # both variants, ~45 min on 2 CPU cores
    python benchmarks/chaos.py --trials 20 --seed 0 --window training  # kills after step 1 only
    python benchmarks/chaos.py --trials 2 --variant lora               # quick check

Every process imports a copy of ptrain/ taken at the start (WORK/src; the header names the commit, any uncommitted
change and a digest of the copy), so edits to a shared working tree during the run cannot change the code under test.

Writes the table (rewritten after every trial, so partial results survive) to --out (default
benchmarks/results/chaos.md for `--window run`, chaos_training.md for `--window training`); exits 1 if any trial
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
CODE = [REPO]  # where the runs import ptrain from: a snapshot of REPO/ptrain taken at the start (see snapshot)


def command(ckpt: Path, data: Path, out: Path, variant: str) -> list[str]:
    import shlex

    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "ptrain",
            "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--output_dir", str(out),
            *shlex.split(ARGS), *VARIANT_ARGS[variant]]  # fmt: skip


def snapshot(work: Path) -> tuple[Path, str]:
    """Copy REPO/ptrain to WORK/src/ptrain and run every process from there (cwd and PYTHONPATH; they come before
    the editable install's finder), so edits to the working tree during the run (a shared checkout, 30+ minutes)
    cannot change the code under test half-way. Returns the folder and a digest of the copied sources."""
    src = work / "src"
    shutil.rmtree(src, ignore_errors=True)
    shutil.copytree(REPO / "ptrain", src / "ptrain", ignore=shutil.ignore_patterns("__pycache__"))
    CODE[0] = src
    ENV["PYTHONPATH"] = os.pathsep.join([str(src), *filter(None, [os.environ.get("PYTHONPATH")])])
    return src, tree_digest(src / "ptrain")


def tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in root.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def launch(cmd: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=CODE[0], env=ENV, start_new_session=True)


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


def first_row(out: Path) -> bool:
    """Whether OUT/metrics.jsonl holds a complete first row (step 1 finished and was logged)."""
    try:
        return "\n" in (out / "metrics.jsonl").read_text(errors="replace")
    except OSError:
        return False


def wait_first_row(proc: subprocess.Popen, out: Path, t0: float, timeout: float) -> float | None:
    """Seconds from t0 until OUT/metrics.jsonl got its first row; None if the process exited (or timed out) first."""
    while time.time() - t0 < timeout:
        if first_row(out):
            return time.time() - t0
        if proc.poll() is not None:
            return time.time() - t0 if first_row(out) else None
        time.sleep(0.02)
    return None


def run_reference(cmd: list[str], out: Path, log: Path, timeout: float) -> tuple[int, float, float | None]:
    """Exit code, wall time and the moment the first metrics row appeared (seconds after the start)."""
    t0, proc = time.time(), launch(cmd, log)
    t1 = wait_first_row(proc, out, t0, timeout)
    try:
        rc = proc.wait(timeout=max(1.0, timeout - (time.time() - t0)))
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        rc = -999
    return rc, time.time() - t0, t1


def export_hashes(out: Path) -> dict[str, str]:
    files = [
        p
        for p in sorted(out.rglob("*.safetensors"))
        if p.relative_to(out).parts[0] not in ("checkpoints", "validation")
    ]
    return {str(p.relative_to(out)): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def metric_rows(out: Path) -> dict[int, tuple]:
    """step -> (loss, lr, grad_norm) from OUT/metrics.jsonl, to show where a resumed run drifted."""
    rows = {}
    path = out / "metrics.jsonl"
    for x in path.read_text().splitlines() if path.exists() else []:
        try:
            r = json.loads(x)
            rows[r["step"]] = (r.get("loss"), r.get("lr"), r.get("grad_norm"))
        except (ValueError, KeyError, TypeError):
            continue
    return rows


def newest_checkpoint(out: Path) -> int | None:
    steps = [int(p.name[5:]) for p in (out / "checkpoints").glob("step-*") if (p / "ptrain_checkpoint.json").is_file()]
    return max(steps, default=None)


def left_on_disk(out: Path) -> str:
    """Checkpoint folders (a .tmp-step-N with its export/ staged shows as .tmp-step-N+export), OUT's dot entries
    (.export-tmp: an export staged or half-published; metrics.jsonl.tmp) and the published export's marker."""
    ck = []
    if (out / "checkpoints").is_dir():
        for p in sorted((out / "checkpoints").glob("*")):
            ck.append(p.name + ("+export" if p.name.startswith(".tmp-") and (p / "export").exists() else ""))
    staged = sorted(p.name for p in out.glob(".*")) if out.is_dir() else []
    marker = ["ptrain_export.json"] if (out / "ptrain_export.json").exists() else []
    return " ".join(ck + staged + marker) or "-"


def phase(log: str, out: Path | None = None) -> str:
    """Best effort: where the kill landed, from the progress bar, rank 0's INFO lines and (given OUT) what is on disk.

    Per step k the trainer runs: step k, its metrics row, validation (k % 4 == 0), poll (commits a finished async
    save: "checkpoint saved", then "checkpoint rotation"), then for even k < 8 the save of ckpt-k (it first waits
    for and commits the previous one, then writes rank state and the staged export, then starts the async write).
    After step 8: validation, the final (synchronous) ckpt-8 save, its commit and rotation, then the export into
    OUT/.export-tmp, its publication (files moved, then OUT/ptrain_export.json) and "done:"."""
    step, started, done, vals, saved, last = 0, False, False, set(), set(), ""
    for seg in re.split(r"[\r\n]", log):
        if (m := re.search(r"train:.*?\|\s*(\d+)/\d+ \[", seg)) and int(m.group(1)) > step:
            step, last = int(m.group(1)), ""
        started |= " INFO data: " in seg
        done |= " INFO done: " in seg
        if m := re.search(r"INFO validation: .*step-(\d+)", seg):
            vals.add(int(m.group(1)))
        if m := re.search(r"INFO checkpoint saved: .*step-(\d+)", seg):
            saved.add(int(m.group(1)))
            last = f"ckpt-{m.group(1)} committed"
        if m := re.search(r"INFO checkpoint rotation .*step-(\d+)", seg):
            last = f"rotation removing step-{m.group(1)}"
    staging = out is not None and (out / ".export-tmp").exists()
    marker = out is not None and (out / "ptrain_export.json").exists()
    if done:
        return "exit after 'done'"
    if not started:
        return "start-up"
    if step == 0:
        return "before step 1"
    note = f" (after {last})" if last else ""
    if step % 4 == 0 and step not in vals:
        return f"validation @{step}{note}"
    if step == STEPS:
        if STEPS not in saved:
            return f"final ckpt-{STEPS} save{note}"
        if staging:
            return "export: published, staging not yet removed" if marker else "export (staging/publishing)"
        if marker:
            return "export published, before 'done'"
        return f"ckpt-{STEPS} rotation / before export{note}"
    if step % 2 == 0:
        return f"ckpt-{step} save / step {step + 1}{note}"
    return f"training step {step + 1}{note}"


def tail(path: Path, n: int = 15) -> str:
    lines = [s for s in re.split(r"[\r\n]", path.read_text(errors="replace")) if s.strip()]
    return "\n".join(lines[-n:])


def trial(
    cmd, out: Path, kill_at: float, ref: dict, T: float, after_first_row: bool = False, ref_rows: dict | None = None
) -> dict:
    """kill_at: seconds after the start or, with after_first_row, after the first metrics row appeared."""
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    logs = out.parent / f"{out.name}-logs"
    shutil.rmtree(logs, ignore_errors=True)
    logs.mkdir()
    r = {"kill_at": kill_at, "first_row": None, "failures": [], "reruns": 0}
    t0, proc = time.time(), launch(cmd, logs / "killed.log")
    if after_first_row:
        r["first_row"] = wait_first_row(proc, out, t0, 10 * T + 120)
        wait = (r["first_row"] if r["first_row"] is not None else time.time() - t0) + kill_at
    else:
        wait = kill_at
    try:
        rc = proc.wait(timeout=max(0.0, wait - (time.time() - t0)))
        r["phase"] = "not interrupted"
        if rc != 0:
            r["failures"].append(f"uninterrupted run exited {rc}:\n{tail(logs / 'killed.log')}")
    except subprocess.TimeoutExpired:
        kill_tree(proc)
        r["phase"] = phase((logs / "killed.log").read_text(errors="replace"), out)
    r["killed_at"] = time.time() - t0
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
        got_rows = metric_rows(out)
        drift = [f"step {k}: (loss, lr, grad_norm) {got_rows.get(k)} vs reference {v}"
                 for k, v in sorted((ref_rows or {}).items()) if got_rows.get(k) != v]  # fmt: skip
        if drift:
            r["failures"].append("metrics.jsonl differs from the reference's:\n" + "\n".join(drift))
    return r


def write_report(path: Path, header: str, results: dict, refs: dict, window: str = "run") -> str:
    lines = [header, ""]
    for variant, rows in results.items():
        T, T1, hashes = refs[variant]
        first = f", first metrics row (step 1) at {T1:.1f} s" if T1 is not None else ""
        lines += [f"## {variant}", "", f"Reference: {T:.1f} s uninterrupted{first}; exports:", ""]
        lines += [f"- `{k}` sha256 `{v[:16]}…`" for k, v in hashes.items()]
        if window == "training":
            lines += ["", ("| trial | kill s after step 1 (window) | first row s | killed (or exited) at s | phase | "
                      "left on disk after kill | resumed from step | re-runs | identical |"),
                      "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        else:
            lines += ["", ("| trial | kill time s | phase | left on disk after kill | resumed from step | re-runs | "
                      "identical |"), "|---|---|---|---|---|---|---|"]  # fmt: skip
        for i, r in enumerate(rows, 1):
            ok = "yes" if r["identical"] and not r["failures"] else ("yes, but FAILED" if r["identical"] else "**no**")
            resumed = r["resumed"] if r["resumed"] is not None else "-"
            if window == "training":
                fr = f"{r['first_row']:.2f}" if r["first_row"] is not None else "-"
                lines.append(f"| {i} | {r['kill_at']:.2f} of {T - T1:.1f} | {fr} | {r['killed_at']:.2f} | "
                             f"{r['phase']} | {r['left']} | {resumed} | {r['reruns']} | {ok} |")  # fmt: skip
            else:
                lines.append(f"| {i} | {r['kill_at']:.2f} | {r['phase']} | {r['left']} | {resumed} | {r['reruns']} "
                             f"| {ok} |")  # fmt: skip
        lines += ["", summary(variant, rows), ""]
        counts: dict[str, int] = {}
        for r in rows:
            key = re.sub(r" \(after .*\)$", "", r["phase"])
            counts[key] = counts.get(key, 0) + 1
        lines += ["Phases: " + "; ".join(f"{k}: {n}" for k, n in counts.items()), ""]
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
    ap.add_argument("--window", choices=["run", "training"], default="run",
                    help="run: kill uniform over the reference run's whole duration; training: uniform between "
                    "the trial's first metrics row (step 1 done) and that plus the reference's time from its "
                    "first row to its exit")  # fmt: skip
    ap.add_argument("--out", type=Path, default=None,
                    help="default benchmarks/results/chaos.md (--window run) or chaos_training.md (training)")  # fmt: skip
    a = ap.parse_args()
    if a.out is None:
        a.out = REPO / "benchmarks" / "results" / ("chaos.md" if a.window == "run" else "chaos_training.md")
    work = a.work_dir or Path(tempfile.mkdtemp(prefix="ptrain-chaos-"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(a.seed)
    git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], check=False, cwd=REPO, capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "ptrain"], check=False, cwd=REPO, capture_output=True, text=True
    )
    src, digest = snapshot(work)
    check = subprocess.run([sys.executable, "-c", "import ptrain; print(ptrain.__file__)"], cwd=src, env=ENV,
                           capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    if not check.startswith(str(src)):
        sys.exit(f"the snapshot in {src} is not what `import ptrain` finds ({check})")
    print(f"seed {a.seed}, work dir {work}", flush=True)
    import torch

    ckpt, data = work / "ckpt", work / "data"
    for extra, d in (([], ckpt), (["--videos", "--num_videos", "6"], data)):
        if not d.exists():
            subprocess.run([sys.executable, "-m", "ptrain.testing.tiny", "--output_dir", str(d), *extra],
                           check=True, cwd=CODE[0], env=ENV, capture_output=True)  # fmt: skip
    cpu = next(
        (
            x.split(":", 1)[1].strip()
            for x in Path("/proc/cpuinfo").read_text().splitlines()
            if x.startswith("model name")
        ),
        "?",
    )
    argv = " ".join(sys.argv[1:])
    changed = [x[3:] for x in dirty.stdout.splitlines() if x.strip()]
    commit = (git.stdout.strip() or "?") + (f" plus uncommitted changes ({', '.join(changed)})" if changed else "")
    window = (
        "the whole run: uniform in (0, T) after the trial's start, T the reference's wall time"
        if a.window == "run"
        else "training: the trial's first metrics row (step 1 done) + u * (T - T1), u uniform in [0, 1), T the "
        "reference's wall time and T1 the moment its first metrics row appeared"
    )
    header = (f"# Chaos test: SIGKILL at a random moment, resume, compare exports\n\n"
              f"`python benchmarks/chaos.py {argv}`{' ' if argv else ''}(seed {a.seed}) on {os.cpu_count()} CPUs "
              f"({cpu}), torch {torch.__version__}, {datetime.date.today()}. Training command (lora; full adds "
              f"`--training_type full-finetune --lr 1e-5`):\n\n"
              f"`python -m torch.distributed.run --standalone --nproc_per_node=2 -m ptrain "
              f"--pretrained_model_name_or_path CKPT --data_root DATA --output_dir OUT {ARGS} --training_type lora`"
              f"\n\nCode: ptrain at commit {commit}, copied at the start to WORK/src (sources digest {digest}); every "
              f"run imports that copy. Kill window (`--window {a.window}`): {window}.")  # fmt: skip
    variants = ["lora", "full"] if a.variant == "both" else [a.variant]
    results: dict[str, list] = {}
    refs: dict[str, tuple] = {}
    bad = 0
    for variant in variants:
        ref_out = work / variant / "reference"
        shutil.rmtree(ref_out, ignore_errors=True)
        ref_out.mkdir(parents=True)
        rc, T, T1 = run_reference(
            command(ckpt, data, ref_out, variant), ref_out, work / variant / "reference.log", 1800
        )
        if rc != 0 or (a.window == "training" and T1 is None):
            print(f"{variant}: reference run exited {rc} (first metrics row: {T1}):\n"
                  f"{tail(work / variant / 'reference.log')}")  # fmt: skip
            return 2
        refs[variant] = (T, T1, export_hashes(ref_out))
        print(f"{variant}: reference {T:.1f} s (first metrics row at {T1} s), exports {list(refs[variant][2])}",
              flush=True)  # fmt: skip
        results[variant] = []
        for i in range(1, a.trials + 1):
            kill_at = rng.uniform(0, T) if a.window == "run" else rng.random() * (T - T1)
            out = work / variant / f"trial-{i:02d}"
            r = trial(command(ckpt, data, out, variant), out, kill_at, refs[variant][2], T, a.window == "training",
                      metric_rows(work / variant / "reference"))  # fmt: skip
            results[variant].append(r)
            bad += bool(r["failures"]) or not r["identical"]
            when = f"{kill_at:.2f} s" + (f" after step 1 (first row at {r['first_row']})" if a.window == "training"
                                          else "")  # fmt: skip
            print(f"{variant} trial {i}: kill at {when}, killed/exited at {r['killed_at']:.2f} s ({r['phase']}; "
                  f"left {r['left']}), resumed from "
                  f"{r['resumed']}, {r['reruns']} re-run(s), identical: {r['identical']}"
                  + "".join(f"\n  FAILURE: {f}" for f in r["failures"]), flush=True)  # fmt: skip
            write_report(a.out, header, results, refs, a.window)
    if tree_digest(REPO / "ptrain") != digest:
        header += " (REPO/ptrain changed during the run; the trials ran the copy.)"
    print(write_report(a.out, header, results, refs, a.window))
    print(f"results: {a.out}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
