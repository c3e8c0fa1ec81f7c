"""Loss parity across parallel layouts with real torchrun processes on gloo (fp32).

For a seed and a global batch of 4, every step must see the same samples, noise
and timesteps whatever the layout, so per-step losses of 1 process, DDP 2,
FSDP 2 and HSDP 2x2 agree. The FSDP and HSDP runs also turn on activation
checkpointing and compile (cheap aot_eager backend), which must not change the loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from conftest import TINY_ARGS, run_ptrain

pytestmark = pytest.mark.slow

STEPS = 4
RTOL = 1e-4


def _args(ckpt, data, *extra: str) -> list[str]:
    return [
        "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
        "--train_steps", str(STEPS), "--seed", "7", "--lr", "1e-3", *TINY_ARGS, *extra,
    ]  # fmt: skip


def _check(run, reference=None):
    assert run.returncode == 0, f"ptrain failed:\n{run.stderr[-4000:]}"
    losses = run.losses
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    if reference is not None:
        for step, (a, b) in enumerate(zip(losses, reference.losses), 1):
            assert a == pytest.approx(b, rel=RTOL), f"step {step}: {losses} vs reference {reference.losses}"
    return losses


@pytest.fixture(scope="module")
def lora_reference(tiny_ckpt, tiny_data, tmp_path_factory):
    run = run_ptrain(1, _args(tiny_ckpt, tiny_data, "--batch_size", "4"), tmp_path_factory.mktemp("ref"))
    _check(run)
    return run


def test_ddp2_matches_single_process(lora_reference, tiny_ckpt, tiny_data, tmp_path):
    run = run_ptrain(2, _args(tiny_ckpt, tiny_data, "--batch_size", "2", "--dp_degree", "2", "--dp_shards", "1"), tmp_path)
    _check(run, lora_reference)
    assert "DDP" in run.stderr


def test_fsdp2_with_grad_accum_and_compile_matches(lora_reference, tiny_ckpt, tiny_data, tmp_path):
    run = run_ptrain(
        2,
        _args(
            tiny_ckpt, tiny_data, "--batch_size", "1", "--gradient_accumulation_steps", "2",
            "--dp_shards", "2", "--compile", "--compile_backend", "aot_eager",
        ),
        tmp_path,
    )  # fmt: skip
    _check(run, lora_reference)
    assert "FSDP2 over 2 shards" in run.stderr and "torch.compile (aot_eager): 2 blocks" in run.stderr


def test_hsdp_2x2_with_activation_checkpointing_matches(lora_reference, tiny_ckpt, tiny_data, tmp_path):
    run = run_ptrain(
        4,
        _args(tiny_ckpt, tiny_data, "--batch_size", "1", "--dp_degree", "2", "--dp_shards", "2",
              "--gradient_checkpointing", "--ac_mode", "full"),
        tmp_path,
    )  # fmt: skip
    _check(run, lora_reference)
    assert "HSDP: 2 replicas x 2 shards" in run.stderr and "activation checkpointing (full): 2 blocks" in run.stderr
    # The exported LoRA equals the single-process one (same training, other layout).
    a = load_file(tmp_path / "pytorch_lora_weights.safetensors")
    b = load_file(lora_reference.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_full_finetune_fsdp2_came_matches_single_process(tiny_ckpt, tiny_data, tmp_path):
    # CAME's factored second moments reduce over rows and columns of sharded weights: a real DTensor check.
    full = ("--training_type", "full-finetune", "--lr", "1e-4", "--optimizer", "came")
    ref = run_ptrain(1, _args(tiny_ckpt, tiny_data, "--batch_size", "2", *full), tmp_path / "ref")
    _check(ref)
    run = run_ptrain(
        2,
        _args(tiny_ckpt, tiny_data, "--batch_size", "1", "--gradient_checkpointing", "--ac_mode", "selective",
              "--ac_every_n_blocks", "2", *full),
        tmp_path / "fsdp",
    )  # fmt: skip
    _check(run, ref)
    assert "activation checkpointing (selective): 1 blocks" in run.stderr
    from diffusers import LTXVideoTransformer3DModel

    for out in (ref.output_dir, run.output_dir):
        LTXVideoTransformer3DModel.from_pretrained(out / "transformer")
    a = LTXVideoTransformer3DModel.from_pretrained(run.output_dir / "transformer").state_dict()
    b = LTXVideoTransformer3DModel.from_pretrained(ref.output_dir / "transformer").state_dict()
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer").state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a), "full fine-tune changed no weight"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
