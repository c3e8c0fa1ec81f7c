"""launch/ scripts: rendered commands (PTRAIN_LAUNCH_DRY=1), their errors, the SLURM header, and a real
multi-node-style launch (c10d rendezvous, one node) of a dry run."""

from __future__ import annotations

import os
import re
import socket
import subprocess
from pathlib import Path

import pytest
from conftest import TINY_ARGS, first_error

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "MASTER_", "NPROC"))}
    return subprocess.run(["bash", str(REPO / "launch" / script), *args], env={**base, **env}, capture_output=True,
                          text=True, timeout=300, cwd=cwd)  # fmt: skip


def test_single_node_renders_torchrun():
    p = _run("single_node.sh", "--model_name", "wan", "--dp_shards", "4", PTRAIN_LAUNCH_DRY="1", NPROC="4")
    assert p.returncode == 0, p.stderr
    assert re.search(r"-m torch.distributed.run --standalone --nproc_per_node 4 --max_restarts 0 -m ptrain "
                     r"--model_name wan --dp_shards 4\s*$", p.stdout), p.stdout  # fmt: skip


def test_multi_node_renders_rendezvous_and_names_missing_variables():
    p = _run("multi_node.sh", "--dp_degree", "2", PTRAIN_LAUNCH_DRY="1", NNODES="2", MASTER_ADDR="node0",
             MASTER_PORT="1234", NPROC_PER_NODE="8", RUN_ID="job7")  # fmt: skip
    assert p.returncode == 0, p.stderr
    for part in ("--nnodes 2", "--nproc_per_node 8", "--rdzv_backend c10d", "--rdzv_endpoint node0:1234",
                 "--rdzv_id job7", "--max_restarts 3", "-m ptrain --dp_degree 2"):  # fmt: skip
        assert part in p.stdout, (part, p.stdout)
    p = _run("multi_node.sh", PTRAIN_LAUNCH_DRY="1", MASTER_ADDR="node0")
    assert p.returncode != 0 and "NNODES" in p.stderr
    p = _run("multi_node.sh", PTRAIN_LAUNCH_DRY="1", NNODES="2")
    assert p.returncode != 0 and "MASTER_ADDR" in p.stderr


def test_slurm_header_and_render():
    text = (REPO / "launch" / "slurm.sbatch").read_text()
    sbatch = dict(re.findall(r"^#SBATCH --([\w-]+)=(\S+)", text, flags=re.M))
    assert sbatch["nodes"] == "2" and sbatch["ntasks-per-node"] == "1" and sbatch["gpus-per-node"] == "8"
    assert sbatch["output"].startswith("logs/")
    p = _run("slurm.sbatch", "--output_dir", "/shared/out", PTRAIN_LAUNCH_DRY="1", SLURM_NNODES="4",
             SLURM_JOB_ID="99", MASTER_ADDR="gpu001", SLURM_SUBMIT_DIR=str(REPO))  # fmt: skip
    assert p.returncode == 0, p.stderr
    assert re.search(r"srun --nodes 4 --ntasks-per-node 1 --kill-on-bad-exit=1 bash launch/multi_node.sh "
                     r"--output_dir /shared/out", p.stdout), p.stdout  # fmt: skip
    p = _run("slurm.sbatch", PTRAIN_LAUNCH_DRY="1", SLURM_SUBMIT_DIR=str(REPO))
    assert p.returncode != 0 and "SLURM_NNODES" in p.stderr


@pytest.mark.slow
def test_multi_node_script_launches_for_real(tiny_ckpt, tiny_data, tmp_path):
    """One node through the c10d rendezvous, 2 processes on CPU, a --dry_run of the tiny model."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    p = _run("multi_node.sh", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
             "--output_dir", str(tmp_path / "out"), "--dry_run", *TINY_ARGS,
             NNODES="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=port, NPROC_PER_NODE="2", MAX_RESTARTS="0",
             OMP_NUM_THREADS="1")  # fmt: skip
    assert p.returncode == 0, first_error(p.stderr)
    assert "FSDP2: world 2 = dp_replicate 1 x dp_shard 2 x cp 1" in p.stdout, p.stdout


@pytest.mark.slow
def test_single_node_script_takes_relative_paths_from_where_it_is_called(tiny_ckpt, tiny_data, tmp_path):
    """A new-user trial: the launch scripts changed into the checkout first, so `--pretrained_model_name_or_path
    tiny-wan` from the user's folder was "no such folder" and a relative --output_dir landed in the checkout."""
    (tmp_path / "ckpt").symlink_to(tiny_ckpt, target_is_directory=True)
    (tmp_path / "data").symlink_to(tiny_data, target_is_directory=True)
    p = _run("single_node.sh", "--pretrained_model_name_or_path", "ckpt", "--data_root", "data", "--output_dir",
             "out", "--dry_run", *TINY_ARGS, cwd=tmp_path, NPROC="1", OMP_NUM_THREADS="1")  # fmt: skip
    assert p.returncode == 0, first_error(p.stderr)
    assert "valid" in p.stdout and not (REPO / "out").exists()
