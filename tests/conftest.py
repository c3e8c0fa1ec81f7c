"""Shared fixtures: one tiny LTX checkpoint and one synthetic video dataset per test session,
and a helper that runs ptrain under torchrun (real processes, gloo) and reads its metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from ptrain.testing.tiny import write_synthetic_videos, write_tiny_checkpoint

REPO = Path(__file__).resolve().parents[1]

# Small, fast, fp32 settings shared by the training tests.
TINY_ARGS = [
    "--height", "32", "--width", "32", "--num_frames", "9",
    "--transformer_dtype", "float32", "--vae_dtype", "float32", "--text_encoder_dtype", "float32",
    "--dataloader_num_workers", "0", "--report_to", "none",
]  # fmt: skip


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "ltx", model_name="ltx_video", seed=0)


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


def run_ptrain(nproc: int, args: list[str], output_dir: Path, timeout: int = 600) -> Run:
    """`torchrun --standalone --nproc_per_node N -m ptrain ARGS --output_dir OUT` in a fresh process."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
    cmd += ["-m", "ptrain", *args, "--output_dir", str(output_dir)]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return Run(p.returncode, p.stdout, p.stderr, output_dir)


@pytest.fixture
def ptrain_run():
    return run_ptrain
