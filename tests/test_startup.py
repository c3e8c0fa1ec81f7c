"""Multi-GPU start-up: device choice from torchrun's environment, --dist_timeout_s, the per-rank start line."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import torch
from conftest import REPO

from ptrain.config import ConfigError, parse_config
from ptrain.parallel.dims import ParallelConfigError, select_device


def test_all_gpus_visible_uses_local_rank():
    assert select_device({"LOCAL_RANK": "3"}, "cuda", 8) == torch.device("cuda", 3)


def test_one_gpu_per_process_uses_index_0():
    env = {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "5"}
    assert select_device(env, "cuda", 1) == torch.device("cuda", 0)


def test_local_rank_beyond_visible_gpus_is_an_error():
    env = {"LOCAL_RANK": "3", "CUDA_VISIBLE_DEVICES": "0,1"}
    with pytest.raises(ParallelConfigError, match=r"LOCAL_RANK=3 .*sees 2 CUDA device.*CUDA_VISIBLE_DEVICES=0,1"):
        select_device(env, "cuda", 2)


def test_cpu_ignores_local_rank():
    assert select_device({"LOCAL_RANK": "3"}, "cpu", 0) == torch.device("cpu")


def test_dist_timeout_must_be_positive(tmp_path):
    (tmp_path / "model_index.json").write_text('{"transformer": ["diffusers", "LTXVideoTransformer3DModel"]}')
    args = ["--pretrained_model_name_or_path", str(tmp_path), "--data_root", str(tmp_path)]
    assert parse_config([*args, "--dist_timeout_s", "60"]).validate().parallel.dist_timeout_s == 60
    assert parse_config(args).parallel.dist_timeout_s == 1800
    with pytest.raises(ConfigError, match="--dist_timeout_s must be > 0.*got 0"):
        parse_config([*args, "--dist_timeout_s", "0"]).validate()


def _cpu_env() -> dict[str, str]:
    """This environment without a launcher's variables, on CPU + gloo even on a GPU machine."""
    drop = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "CUDA_VISIBLE_DEVICES")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1"}


def test_init_distributed_prints_one_start_line():
    code = (
        "from ptrain.parallel.dims import init_distributed\n"
        "import torch.distributed as dist\n"
        "print(init_distributed(60))\n"
        "dist.destroy_process_group()\n"
    )
    cmd = [sys.executable, "-c", code]
    p = subprocess.run(cmd, check=False, cwd=REPO, env=_cpu_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stderr.splitlines() if line.startswith("ptrain start:")]
    expected = (
        f"ptrain start: host={socket.gethostname()} rank=0/1 local_rank=0 device=cpu backend=gloo "
        "CUDA_VISIBLE_DEVICES= dist_timeout_s=60"
    )
    assert lines == [expected], p.stderr
    assert p.stdout.strip() == "(0, 1, device(type='cpu'))"


def test_cuda_allocator_defaults_to_expandable_segments_unless_the_user_set_it():
    from ptrain.parallel.dims import default_allocator_conf

    env = {}
    assert "expandable_segments:True (ptrain's default)" in default_allocator_conf(env)
    assert env == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    for name in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF"):
        env = {name: "max_split_size_mb:512"}
        assert default_allocator_conf(env) == f"{name}=max_split_size_mb:512 (yours)"
        assert env == {name: "max_split_size_mb:512"}  # the user's setting is left alone


def test_cpu_offload_gets_a_gloo_backend_beside_nccl():
    """--fsdp_cpu_offload keeps gradients in CPU memory: clipping all-reduces their norm there, which nccl cannot."""
    from ptrain.parallel.dims import backend

    assert backend("cuda") == "nccl" and backend("cuda", cpu_offload=True) == "cuda:nccl,cpu:gloo"
    assert backend("cpu") == backend("cpu", cpu_offload=True) == "gloo"


def test_dry_run_checks_degrees_against_plan_world_size(tiny_ckpt, tiny_data, tmp_path):
    """The second new-user audit: the planner's suggestion for --plan_world_size 8 (e.g. --dp_shards 4
    --cp_degree 2), pasted back into the dry run, failed "degrees ... = 8, but world size is 1". A one-process dry
    run planning for N GPUs now checks the degrees (and counts steps) for N."""
    from conftest import TINY_ARGS

    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    args = [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root",
            str(tiny_data), "--output_dir", str(tmp_path / "o"), "--dry_run", *TINY_ARGS]  # fmt: skip
    ok = subprocess.run([*args, "--plan_world_size", "2", "--dp_shards", "2"], cwd=REPO, env=env,
                        capture_output=True, text=True)  # fmt: skip
    assert ok.returncode == 0, ok.stderr[-3000:]
    assert "planned for --plan_world_size 2" in ok.stderr and "dp_shard 2" in ok.stdout
    assert "global batch 2: 4 steps per epoch" in ok.stdout  # 8 videos over 2 ranks of batch 1
    bad = subprocess.run([*args, "--plan_world_size", "2", "--dp_shards", "4"], cwd=REPO, env=env,
                         capture_output=True, text=True)  # fmt: skip
    assert bad.returncode == 2 and "= 4, but world size" in bad.stderr and "is 2" in bad.stderr, bad.stderr[-2000:]


def test_layout_and_device_options_are_checked_before_the_load(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """The fourth new-user audit: --blocks_to_swap on several GPUs, CUDA-graph compile modes on FSDP2 and 8-bit
    AdamW without bitsandbytes passed --dry_run and failed only after the weights loaded. They are checked where the
    run is planned (ptrain.parallelize.check_parallel_options), for --plan_world_size too."""
    from conftest import TINY_ARGS

    from ptrain.config import ConfigError, parse_config
    from ptrain.parallel import ParallelDims
    from ptrain.parallelize import plain_single_process
    from ptrain.trainer import Trainer, train

    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--output_dir",
            str(tmp_path / "o"), *TINY_ARGS]  # fmt: skip
    loads = []
    for extra, message in (
        (["--dry_run", "--plan_world_size", "2", "--dp_shards", "2", "--gradient_checkpointing", "--blocks_to_swap",
          "1"], "--blocks_to_swap is for one GPU; on 2, FSDP2 shards the weights instead"),
        (["--dry_run", "--plan_world_size", "2", "--dp_shards", "2", "--compile", "--compile_mode", "reduce-overhead"],
         "--compile_mode reduce-overhead replays CUDA graphs, which need the plain module of one process"),
        (["--training_type", "full-finetune", "--transformer_dtype", "bfloat16", "--dry_run", "--compile",
          "--compile_mode", "max-autotune"], "(LoRA, --full_bf16 or float32; here: single process"),
        (["--optimizer", "adamw-8bit", "--train_steps", "1"], "--optimizer adamw-8bit runs on CUDA only"),
    ):  # fmt: skip
        with pytest.MonkeyPatch.context() as m:
            m.setattr(Trainer, "load_model", lambda self: loads.append(1))  # refused before any weights load
            with pytest.raises(ConfigError) as info:
                train(parse_config([*args, *extra]))
        assert message in str(info.value), (extra, str(info.value))
    assert not loads
    cfg = parse_config(["--data_root", "x"])
    one, two = ParallelDims.build(1, 1, 1, 1), ParallelDims.build(1, 2, 1, 2)
    assert plain_single_process(cfg, one) and not plain_single_process(cfg, two)
    cfg.model.layerwise_upcasting_modules = ["transformer"]  # FP8 storage keeps FSDP2 in one process
    assert not plain_single_process(cfg, one)


def test_mesh_sub_groups_get_the_dist_timeout(tmp_path):
    """Session 17's review of the mesh groups: DeviceMesh made its sub-groups with torch's default timeout (NCCL: 10
    minutes; gloo: 30) instead of --dist_timeout_s, so a rank lagging in an HSDP or CP collective was aborted early.
    4 gloo processes, HSDP 2 x cp 2: every group of every mesh carries the timeout given."""
    code = (
        "import os, torch, torch.distributed as dist\n"
        "from datetime import timedelta\n"
        "from ptrain.parallel.dims import ParallelDims, init_distributed\n"
        "init_distributed(61)\n"
        "dims = ParallelDims.build(2, 1, 2, 4)\n"
        "m = dims.build_mesh(61)\n"
        "meshes = (m.world, m.dp, m.dp_shard_cp, m.dp_cp, m.hsdp)\n"
        "groups = {id(g): g for mesh in meshes for g in mesh.get_all_groups()}\n"
        "subs = [g for g in groups.values() if g is not dist.group.WORLD]\n"
        "t = [g._get_backend(torch.device('cpu')).options._timeout for g in subs]\n"
        "plain = ParallelDims.build(2, 1, 2, 4).build_mesh()\n"  # the same groups again, without the timeout
        "other = [g._get_backend(torch.device('cpu')).options._timeout for g in plain.world.get_all_groups()\n"
        "         if g is not dist.group.WORLD]\n"
        "given, default = sorted({x.total_seconds() for x in t}), sorted({x.total_seconds() for x in other})\n"
        "line = f'subs {len(subs)} {given} {default}'\n"
        "os.write(1, (line + '\\n').encode())\n"  # one write per rank: print's parts interleave across the 4 ranks
        "dist.destroy_process_group()\n"
    )
    env = {**_cpu_env(), "PYTHONPATH": str(REPO)}
    script = tmp_path / "mesh.py"
    script.write_text(code)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "4", str(script)]
    p = subprocess.run(cmd, check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert p.returncode == 0, p.stderr[-3000:]
    lines = [line for line in p.stdout.splitlines() if line.startswith("subs")]
    assert len(lines) == 4, p.stdout
    for line in lines:
        n, mine, plain = line.split(" ", 2)[1], *line.split(" [")[1:]
        assert int(n) >= 3 and mine == "61.0]" and "61.0" not in plain, line


def test_cpu_offload_refuses_a_mesh_group_without_a_cpu_backend():
    """Session 17's review (R2): with --fsdp_cpu_offload the clipped gradients are CPU tensors, so every mesh group
    needs a CPU backend. torch's fake process group stands in for a group made with nccl only ("cuda:fake": no
    backend for CPU tensors): the check names the mesh and dim at start. With a CPU backend it passes."""
    code = (
        "import torch.distributed as dist, sys\n"
        "from torch.testing._internal.distributed.fake_pg import FakeStore\n"
        "from ptrain.parallel.dims import ParallelConfigError, ParallelDims\n"
        "dist.init_process_group(sys.argv[1], store=FakeStore(), rank=0, world_size=4)\n"
        "try:\n"
        "    ParallelDims.build(2, 1, 2, 4).build_mesh(cpu_offload=True)\n"
        "    print('built')\n"
        "except ParallelConfigError as e:\n"
        "    print('refused:', e)\n"
        "dist.destroy_process_group()\n"
    )
    env = {**_cpu_env(), "PYTHONPATH": str(REPO)}
    out = {}
    for spec in ("cuda:fake", "cpu:fake"):
        p = subprocess.run([sys.executable, "-c", code, spec], check=False, cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=120)  # fmt: skip
        assert p.returncode == 0, p.stderr[-3000:]
        out[spec] = p.stdout.strip()
    assert out["cpu:fake"] == "built", out
    assert out["cuda:fake"].startswith("refused: --fsdp_cpu_offload: the world mesh's 'dp_replicate' process group "
                                       "has no CPU backend"), out  # fmt: skip
    assert "'cuda:nccl,cpu:gloo'" in out["cuda:fake"], out
