"""Resumable training: bit-exact resume per layout, SIGKILL + elastic restart, partial checkpoints,
rotation, changed-layout errors, resharded resume and the NaN guard. Real torchrun processes on gloo."""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ARGS, Run, first_error, run_ptrain
from safetensors.torch import load_file

from ptrain.checkpoint import MARKER, complete_checkpoints, resolve_resume
from ptrain.config import ConfigError

pytestmark = pytest.mark.slow


def _exported(out: Path) -> dict[str, torch.Tensor]:
    lora = out / "pytorch_lora_weights.safetensors"
    if lora.exists():
        return load_file(lora)
    return {k: v for f in sorted((out / "transformer").glob("*.safetensors")) for k, v in load_file(f).items()}


def _assert_bit_identical(a: Path, b: Path) -> None:
    wa, wb = _exported(a), _exported(b)
    assert wa.keys() == wb.keys() and wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), f"{k} differs"


def _restart_copy(launch, dest: Path, keep_step: int = 2) -> Path:
    """A copy of a finished run's output_dir as if it had crashed right after checkpoint `keep_step`."""
    shutil.copytree(launch.run.output_dir, dest)
    for step, path in complete_checkpoints(dest):
        if step > keep_step:
            shutil.rmtree(path)
    (dest / "pytorch_lora_weights.safetensors").unlink(missing_ok=True)
    shutil.rmtree(dest / "transformer", ignore_errors=True)
    shutil.rmtree(dest / "ema", ignore_errors=True)
    return dest


@pytest.mark.parametrize(
    "name, extra",
    [
        ("lora-ddp2", ["--async_checkpoint", "--checkpointing_steps", "1"]),
        pytest.param("lora-fsdp2", ["--export_every_checkpoint"], marks=pytest.mark.heavy),  # suite time: CI
        pytest.param("lora-hsdp2x2", ["--resume_from_checkpoint", "latest"], marks=pytest.mark.heavy),
        ("full-fsdp2", []),
    ],
)
def test_resume_is_bit_exact(launches, tmp_path, name, extra):
    launch = launches(name)
    out = _restart_copy(launch, tmp_path / "resumed")
    (out / "checkpoints" / ".tmp-step-3").mkdir()  # a save that crashed half-way
    run = run_ptrain(launch.nproc, launch.args + extra, out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "resuming from" in run.stderr and "at step 2" in run.stderr
    assert "removing incomplete checkpoint" in run.stderr and not (out / "checkpoints" / ".tmp-step-3").exists()
    # Same per-step losses (steps 1-2 kept from before the crash, 3-4 recomputed) and identical weights.
    assert [m["step"] for m in run.metrics] == [1, 2, 3, 4]
    assert run.losses == launch.run.losses
    _assert_bit_identical(out, launch.run.output_dir)
    if (launch.run.output_dir / "ema").is_dir():  # the EMA is checkpointed too
        _assert_bit_identical(out / "ema", launch.run.output_dir / "ema")
    if "--export_every_checkpoint" in extra:
        assert (out / "checkpoints" / "step-4" / "export" / "pytorch_lora_weights.safetensors").is_file()
    if "--async_checkpoint" in extra:
        assert [s for s, _ in complete_checkpoints(out)] == [2, 3, 4]


def test_changed_layout_is_a_named_error(launches, tmp_path):
    launch = launches("lora-ddp2")  # DDP: dp_degree 2 x dp_shards 1
    out = _restart_copy(launch, tmp_path / "o")
    args = [a for a in launch.args]
    args[args.index("--dp_degree") + 1], args[args.index("--dp_shards") + 1] = "1", "2"
    run = run_ptrain(2, args, out)
    assert run.returncode != 0
    assert "written with world_size=2 dp_degree=2 dp_shards=1 cp_degree=1" in run.stderr
    assert "this run has world_size=2 dp_degree=1 dp_shards=2 cp_degree=1" in run.stderr
    assert "[rank0]: Traceback" not in run.stderr


@pytest.mark.heavy  # suite time (36 s); CI runs it
def test_allow_reshard_continues_the_same_samples(launches, tmp_path):
    # Written by FSDP2 on 2 ranks (batch 1 x accum 2), resumed in 1 process (batch 4): same global batch.
    launch = launches("lora-fsdp2")
    out = _restart_copy(launch, tmp_path / "o")
    args = [a for a in launch.args if a not in ("--compile",)]
    args[args.index("--batch_size") + 1] = "4"
    args[args.index("--gradient_accumulation_steps") + 1] = "1"
    args[args.index("--dp_shards") + 1] = "1"
    run = run_ptrain(1, [*args, "--allow_reshard"], out)
    assert run.returncode == 0, first_error(run.stderr)
    assert "resharding checkpoint" in run.stderr
    assert run.losses == pytest.approx(launch.run.losses, rel=1e-4)


def test_resume_picks_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((2, True), (4, True), (6, False)):
        (root / f"step-{step}").mkdir(parents=True)
        if complete:
            marker = {"step": step, "train_state": {}, "layout": {}, "trainable_only": True, "files": {}}
            (root / f"step-{step}" / MARKER).write_text(json.dumps(marker))
    (root / ".tmp-step-8").mkdir()
    assert resolve_resume("latest", tmp_path) == root / "step-4"
    assert resolve_resume("auto", tmp_path) == root / "step-4"
    assert resolve_resume("2", tmp_path) == root / "step-2"
    assert resolve_resume("none", tmp_path) is None
    assert resolve_resume("auto", tmp_path / "elsewhere") is None
    with pytest.raises(ConfigError, match=r"no complete checkpoint for step 6 .*complete: \[2, 4\]"):
        resolve_resume("6", tmp_path)
    with pytest.raises(ConfigError, match="not a complete ptrain checkpoint"):
        resolve_resume(str(root / "step-6"), tmp_path)


def test_nan_guard_skips_counts_and_stops(tiny_ckpt, tiny_data, tmp_path):
    # lr 1e30 blows the LoRA weights up at step 1: from step 2 on the loss is not finite.
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "10",
            "--lr", "1e30", "--lr_scheduler", "constant", "--max_nan_steps", "3", "--checkpointing_steps", "1",
            *TINY_ARGS]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([sys.executable, "-m", "ptrain", *args, "--output_dir", str(tmp_path)], cwd=REPO,
                       env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)  # fmt: skip
    run = Run(p.returncode, p.stdout, p.stderr, tmp_path)
    assert run.returncode == 3, first_error(run.stderr)  # ptrain's own exit code (torchrun would report 1)
    assert "3 non-finite steps in a row (--max_nan_steps 3); stopping" in run.stderr
    assert "optimizer step skipped (1 in a row, 1 in total)" in run.stderr
    rows = run.metrics
    assert [r["skipped_step"] for r in rows] == [False, True, True, True]
    assert [s for s, _ in complete_checkpoints(tmp_path)] == [1, 2, 3]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(x) for x in out.split()]


@pytest.mark.heavy  # ~65 s; CI runs it
def test_sigkill_at_random_moment_restarts_and_ends_bit_identical(tiny_ckpt, tiny_data, tmp_path):
    """Acceptance: HSDP 2x2, 8 steps, checkpoint every 2 keeping 2; a worker SIGKILLed at a random
    moment of training (possibly mid-save); torchrun --max-restarts restarts it; `auto` resumes; the
    final LoRA equals an uninterrupted run's bit for bit."""
    # 2 data-loader workers (the default when decoding; this 2-epoch run precomputes, whose default is 0): the
    # sampler runs ahead of training in the main process.
    tiny = [a for a in TINY_ARGS]
    tiny[tiny.index("--dataloader_num_workers") + 1] = "2"
    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "8",
            "--checkpointing_steps", "2", "--checkpointing_limit", "2", "--dp_degree", "2", "--dp_shards", "2",
            "--seed", "11", "--lr", "1e-3", "--lr_scheduler", "polynomial", "--lr_power", "2", "--lr_warmup_steps", "2",
            *tiny]  # fmt: skip
    ref = run_ptrain(4, args, tmp_path / "ref")
    assert ref.returncode == 0, first_error(ref.stderr)

    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=4", "--max-restarts=2",
           "-m", "ptrain", *args, "--output_dir", str(out)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    log_path = tmp_path / "killed.log"  # a file, not a pipe: a full pipe would block the workers
    log_file = open(log_path, "w")
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log_file, stderr=subprocess.STDOUT, text=True)
    seed = int(os.environ.get("PTRAIN_KILL_SEED", time.time_ns() % 10**6))
    print(f"kill seed {seed} (rerun with PTRAIN_KILL_SEED={seed})")
    rng = random.Random(seed)
    kill_after_rows = rng.randint(3, 6)  # step 2 checkpointed (row 3 follows its save), before step 7
    extra_delay = rng.uniform(0.0, 0.5)
    deadline = time.time() + 300
    metrics = out / "metrics.jsonl"
    while time.time() < deadline:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= kill_after_rows:
            break
        time.sleep(0.05)
    time.sleep(extra_delay)
    victims = _children(proc.pid)
    assert victims, "no worker process to kill"
    os.kill(rng.choice(victims), signal.SIGKILL)
    proc.wait(timeout=600)
    log_file.close()
    log = log_path.read_text()
    assert proc.returncode == 0, f"kill seed {seed}\n" + first_error(log)
    resumed = re.findall(r"resuming from \S+/step-(\d+) at step (\d+)", log)
    assert resumed, f"kill seed {seed}: the restarted run did not resume\n{log[-3000:]}"
    assert int(resumed[0][1]) in (2, 4, 6), resumed
    _assert_bit_identical(out, ref.output_dir)
    assert _sha(out / "pytorch_lora_weights.safetensors") == _sha(ref.output_dir / "pytorch_lora_weights.safetensors")
    assert [s for s, _ in complete_checkpoints(out)] == [6, 8]  # rotation kept exactly 2
    rows = [json.loads(r) for r in metrics.read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 9))
    assert [(r["loss"], r["lr"], r["grad_norm"]) for r in rows] == [(r["loss"], r["lr"], r["grad_norm"]) for r in ref.metrics]
