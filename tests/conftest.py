"""Shared fixtures: one tiny LTX checkpoint and one synthetic video dataset per test session,
and a helper that runs ptrain under torchrun (real processes, gloo) and reads its metrics."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptrain.testing.tiny import write_synthetic_videos, write_tiny_checkpoint


#: Seconds each test took in a recorded CI run (tests/data/test_seconds.json; `python tests/record_seconds.py
#: JUNIT_XML` rewrites it): pytest-xdist workers (`launch/test.sh`) get the longest files first, so that no long
#: file starts last and leaves one worker busy alone at the end.
SECONDS = Path(__file__).with_name("data") / "test_seconds.json"


def pytest_collection_modifyitems(config, items):
    """`heavy` tests run only with PTRAIN_TEST_HEAVY=1 (set by .ci/run), keeping a local run under 20 minutes.
    Under pytest-xdist the files are ordered longest first (their tests that run, by SECONDS; 1 s if unknown),
    each file's tests in their own order (--dist loadfile hands out whole files in collection order)."""
    heavy = os.environ.get("PTRAIN_TEST_HEAVY") == "1"
    skip = pytest.mark.skip(reason="heavy: set PTRAIN_TEST_HEAVY=1 to run (CI does)")
    for item in items:
        if not heavy and "heavy" in item.keywords:
            item.add_marker(skip)
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    try:
        seconds = json.loads(SECONDS.read_text())["seconds"]
    except (OSError, ValueError, KeyError):
        return
    weight: dict[str, float] = {}
    for item in items:
        runs = heavy or "heavy" not in item.keywords
        weight[item.nodeid.split("::")[0]] = weight.get(item.nodeid.split("::")[0], 0.0) + (
            seconds.get(item.nodeid, 1.0) if runs else 0.0
        )
    items.sort(key=lambda item: -weight[item.nodeid.split("::")[0]])  # stable: a file's own order is kept


REPO = Path(__file__).resolve().parents[1]

# Small, fast, fp32 settings shared by the training tests.
TINY_ARGS = [
    "--height", "32", "--width", "32", "--num_frames", "9",
    "--transformer_dtype", "float32", "--vae_dtype", "float32", "--text_encoder_dtype", "float32",
    "--text_encoder_2_dtype", "float32",
    "--dataloader_num_workers", "0", "--report_to", "none",
]  # fmt: skip


MODELS = ("ltx_video", "cogvideox", "hunyuan_video", "wan")


def full(t):
    """A parameter's whole value: a DTensor (FSDP2) gathered, a plain tensor (one process) as it is."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


@pytest.fixture
def single_process_env(monkeypatch):
    """In-process training as a world of one: no torchrun variables; the process group is torn down after."""
    import torch.distributed as dist

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):  # set by init_distributed: a later
        os.environ.pop(k, None)  # subprocess (a dry run) must not inherit this world's rendezvous port


@pytest.fixture(scope="session")
def tiny_ckpts(tmp_path_factory):
    """model name -> tiny checkpoint folder (written once per session, on first use)."""
    cache: dict[str, Path] = {}

    def get(model: str) -> Path:
        if model not in cache:
            cache[model] = write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / model, model_name=model, seed=0)
        return cache[model]

    return get


@pytest.fixture(scope="session")
def tiny_ckpt(tiny_ckpts) -> Path:
    return tiny_ckpts("ltx_video")


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    return write_synthetic_videos(tmp_path_factory.mktemp("data") / "videos", num_videos=8, seed=0)


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str
    output_dir: Path

    @property
    def metrics(self) -> list[dict]:
        path = self.output_dir / "metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []

    @property
    def losses(self) -> list[float]:
        return [m["loss"] for m in self.metrics]


def run_ptrain(nproc: int, args: list[str], output_dir: Path, timeout: int = 600, entry: tuple = ("-m", "ptrain"),
               env_extra: dict | None = None, cwd: Path = REPO) -> Run:  # fmt: skip
    """`torchrun --standalone --nproc_per_node N -m ptrain ARGS --output_dir OUT` in a fresh process (`entry`:
    another script that runs ptrain's main, e.g. with a fault injected)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += [*entry, *args, "--output_dir", str(output_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(env_extra or {})
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout, p.stderr, cwd / output_dir)


@pytest.fixture
def ptrain_run():
    return run_ptrain


def resume_run(done: Run, nproc: int, args: list[str], out: Path, from_step: int, last_step: int) -> Run:
    """A copy of the finished run `done` in `out` cut back to its checkpoint at `from_step` (the one at
    `last_step` and the export removed), then the same command again: it resumes from `from_step`."""
    from ptrain.export import EXPORT_MARKER

    shutil.copytree(done.output_dir, out)
    shutil.rmtree(out / "checkpoints" / f"step-{last_step}")
    shutil.rmtree(out / "transformer")
    (out / EXPORT_MARKER).unlink()
    run = run_ptrain(nproc, args, out)
    assert run.returncode == 0, first_error(run.stderr)
    assert f"at step {from_step}" in run.stderr
    return run


# --- Training runs shared by the parity and the checkpoint tests (each launched once per session) ---

STEPS = 4


def train_args(ckpt: Path, data: Path, *extra: str) -> list[str]:
    """Tiny fp32 training, 4 steps, a checkpoint every 2 steps (so resume tests can restart from step 2)."""
    return [
        "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data), "--train_steps", str(STEPS),
        "--seed", "7", "--lr", "1e-3", "--checkpointing_steps", "2", *TINY_ARGS, *extra,
    ]  # fmt: skip


@dataclass
class Launch:
    nproc: int
    args: list[str]
    run: Run


# name -> (processes, extra flags). Global batch is 4 for the LoRA runs and 2 for the full fine-tunes.
LAYOUTS = {
    "lora-single": (1, ["--batch_size", "4", "--ema_decay", "0.9", "--export_ema"]),
    "lora-ddp2": (2, ["--batch_size", "2", "--dp_degree", "2", "--dp_shards", "1"]),
    "lora-fsdp2": (
        2,
        ["--batch_size", "1", "--gradient_accumulation_steps", "2", "--dp_shards", "2", "--compile",
         "--compile_backend", "aot_eager", "--ema_decay", "0.9", "--export_ema"],
    ),
    "lora-hsdp2x2": (
        4,
        ["--batch_size", "1", "--dp_degree", "2", "--dp_shards", "2", "--gradient_checkpointing", "--ac_mode", "full"],
    ),
    "full-single": (1, ["--batch_size", "2", "--training_type", "full-finetune", "--lr", "1e-4", "--optimizer", "came"]),
    "full-fsdp2": (
        2,
        ["--batch_size", "1", "--training_type", "full-finetune", "--lr", "1e-4", "--optimizer", "came",
         "--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "2"],
    ),
    # Full fine-tune of only the self-attention (to_q at half lr), with rank-stratified timesteps.
    "partial-single": (1, ["--batch_size", "4", "--training_type", "full-finetune", "--lr", "1e-3",
                           "--trainable_modules", "attn1", "--trainable_modules_low_learning_rate", "to_q",
                           "--uniform_sampling", "--flow_weighting_scheme", "logit_normal"]),
    "partial-fsdp2": (2, ["--batch_size", "1", "--gradient_accumulation_steps", "2", "--training_type",
                          "full-finetune", "--lr", "1e-3", "--trainable_modules", "attn1",
                          "--trainable_modules_low_learning_rate", "to_q", "--uniform_sampling",
                          "--flow_weighting_scheme", "logit_normal"]),
    "full-fsdp2-offload": (
        2,
        ["--batch_size", "1", "--training_type", "full-finetune", "--lr", "1e-4", "--optimizer", "came",
         "--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "2", "--fsdp_cpu_offload"],
    ),
    # Context parallel: dp_shards 2 x cp 2 (FSDP over dp_shard x cp), and cp only (FSDP over the 2 cp ranks).
    "lora-cp2-ring": (4, ["--batch_size", "2", "--dp_shards", "2", "--cp_degree", "2", "--cp_mode", "ring",
                          "--gradient_checkpointing", "--ac_mode", "full"]),
    # Ulysses under compile, with full AC that keeps the attention outputs (its all-to-alls are recomputed)
    "lora-cp2-ulysses": (4, ["--batch_size", "2", "--dp_shards", "2", "--cp_degree", "2", "--cp_mode", "ulysses",
                             "--compile", "--compile_backend", "aot_eager", "--gradient_checkpointing",
                             "--ac_mode", "keep_attention"]),
    "full-cp2": (2, ["--batch_size", "2", "--training_type", "full-finetune", "--lr", "1e-4", "--optimizer", "came",
                     "--dp_shards", "1", "--cp_degree", "2", "--cp_mode", "ring"]),
}  # fmt: skip


def session_shared_dir(tmp_path_factory, name: str) -> Path:
    """A folder every pytest-xdist worker of this session sees (`bash launch/test.sh` runs 2 or more workers); the
    session's own base folder when the run has one process."""
    base = tmp_path_factory.getbasetemp()
    path = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / name
    path.mkdir(exist_ok=True)
    return path


@pytest.fixture(scope="session")
def launches(tiny_ckpts, tiny_data, tmp_path_factory):
    """Lazily launched, cached training runs keyed by (LAYOUTS name, model, extra flags). Each runs once per test
    session, also across pytest-xdist workers: the first worker to need it runs it under a file lock, and the
    others read its result (outputs, stdout, stderr) from the shared folder."""
    import fcntl
    import hashlib

    cache: dict[tuple[str, ...], Launch] = {}
    shared = session_shared_dir(tmp_path_factory, "launches")

    def get(name: str, model: str = "ltx_video", *more: str) -> Launch:
        key = (name, model, *more)
        if key not in cache:
            nproc, extra = LAYOUTS[name]
            folder = shared / f"{model}-{name}-{hashlib.sha1(repr(key).encode()).hexdigest()[:10]}"
            with open(f"{folder}.lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
                record = folder / "launch.json"
                if record.exists():  # run by another worker (its checkpoint and data paths are in `args`)
                    d = json.loads(record.read_text())
                    run = Run(d["returncode"], d["stdout"], d["stderr"], folder / "out")
                    args = d["args"]
                else:
                    args = train_args(tiny_ckpts(model), tiny_data, "--model_name", model, *extra, *more)
                    run = run_ptrain(nproc, args, folder / "out")
                    folder.mkdir(exist_ok=True)
                    d = {"args": args, "returncode": run.returncode, "stdout": run.stdout, "stderr": run.stderr}
                    (folder / "launch.json.tmp").write_text(json.dumps(d))
                    (folder / "launch.json.tmp").replace(record)
            assert run.returncode == 0, f"{model} {name} failed:\n{first_error(run.stderr)}"
            cache[key] = Launch(nproc, args, run)
        return cache[key]

    return get


def first_error(stderr: str, context: int = 3000) -> str:
    """The first rank traceback in a torchrun log (the interesting part), else the tail."""
    i = stderr.find("Traceback")
    return stderr[max(0, i - 200) : i + context] if i >= 0 else stderr[-context:]


#: Mean absolute difference a trained LoRA must make to a tiny pipeline's sample (seen: 1.5e-4 to 1.4e-2).
LORA_MIN_DIFF = 2e-5


def lora_changes_the_sample(pipe, sample):
    """Sample twice with the same seed and inputs, the loaded LoRA enabled then disabled: the frames have the same
    shape and differ (a LoRA that loads but changes nothing, e.g. exported untrained, fails). Returns the first."""
    import numpy as np

    with_lora = sample()
    pipe.disable_lora()
    try:
        without = sample()
    finally:
        pipe.enable_lora()
    assert with_lora.shape == without.shape
    diff = float(np.abs(with_lora - without).mean())
    assert diff > LORA_MIN_DIFF, diff
    return with_lora
