"""--fused_backward_pass: the optimizer steps each block inside the backward and frees its gradients.

Without clipping the update is the same per parameter, so training must match the normal step exactly (one
process) or to reduction order (FSDP2); with clipping each block is clipped by its own norm; a block with a
non-finite gradient is not updated; no step holds the whole model's gradients (counted at the hooks, and in the
planner's simulation of CogVideoX-5B). Exact resume with it: tests/test_resume.py (--full_bf16 on FSDP2, heavy)."""

from __future__ import annotations

import os

import pytest
import torch
from conftest import TINY_ARGS, first_error, run_ptrain

from ptrain.config import ConfigError, parse_config
from ptrain.fused_backward import FusedBackward


def _net(seed: int = 0) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 16), torch.nn.GELU(),
                               torch.nn.Linear(16, 4))  # fmt: skip


def _units(net) -> list[list[torch.nn.Parameter]]:
    return [list(net[0].parameters()), list(net[2].parameters())]  # net[4]: the parameters outside the units


def _loss(net, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (net(torch.randn(32, 8, generator=g)) ** 2).mean() * 100  # large gradients: clipping bites


def test_each_unit_is_clipped_by_its_own_norm_and_stepped_in_the_backward():
    fused, ref = _net(), _net()
    opt = torch.optim.AdamW(fused.parameters(), lr=1e-2, fused=True)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    fb = FusedBackward(opt, list(fused.parameters()), _units(fused), max_grad_norm=0.5, on_device=True)
    held = []
    for p in fused.parameters():  # registered after the FusedBackward's: sees what is held once it has run
        p.register_post_accumulate_grad_hook(lambda _: held.append(sum(q.grad is not None for q in fused.parameters())))
    for step in range(3):
        _loss(fused, step).backward()
        norm = fb.finish(torch.device("cpu"))
        assert all(p.grad is None for p in fused.parameters())
        _loss(ref, step).backward()
        units = [list(ref[i].parameters()) for i in (0, 2, 4)]
        assert norm.item() == pytest.approx(torch.nn.utils.get_total_norm([p.grad for p in ref.parameters()]).item(),
                                            rel=1e-5)  # fmt: skip
        for unit in units:  # the reference: clip each unit on its own, then the same AdamW
            torch.nn.utils.clip_grad_norm_(unit, 0.5)
        ref_opt.step()
        ref_opt.zero_grad()
        for a, b in zip(fused.parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
    # the backward reaches net[4] first: it is stepped at once; at most one unit's gradients (2 tensors) are held
    assert max(held) <= 2, held


def test_a_unit_with_non_finite_gradients_is_not_updated_the_others_are():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    fb = FusedBackward(opt, list(net.parameters()), _units(net), max_grad_norm=1.0, on_device=True)
    before = [p.detach().clone() for p in net.parameters()]
    net[2].weight.register_hook(lambda g: g * float("nan"))  # net[2]'s gradient only
    _loss(net).backward()
    assert not torch.isfinite(fb.finish(torch.device("cpu")))
    changed = [not torch.equal(p, b) for p, b in zip(net.parameters(), before)]
    assert changed == [True, True, False, False, True, True]
    assert opt.state[net[2].weight]["step"].item() == 0 and opt.state[net[0].weight]["step"].item() == 1


def test_the_host_decides_for_optimizers_without_found_inf():
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, foreach=True)  # takes no found_inf
    fb = FusedBackward(opt, list(net.parameters()), _units(net), max_grad_norm=0.0, on_device=False)
    before = [p.detach().clone() for p in net.parameters()]
    net[0].bias.register_hook(lambda g: g * float("inf"))
    _loss(net).backward()
    fb.finish(torch.device("cpu"))
    assert [not torch.equal(p, b) for p, b in zip(net.parameters(), before)] == [False, False, True, True, True, True]


def _in_process(tiny_ckpt, tiny_data, out, *extra):
    import torch.distributed as dist

    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(out), "--train_steps", "3", "--logging_steps", "1",
                        "--checkpointing_steps", "0", "--training_type", "full-finetune", "--lr", "1e-4",
                        "--seed", "3", "--gradient_checkpointing", "--ac_mode", "full", *TINY_ARGS, *extra])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    result = trainer.train()
    params = {n: p.detach().clone() for n, p in trainer.model.transformer.named_parameters()}
    dist.destroy_process_group()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        os.environ.pop(k, None)
    return result, params


@pytest.mark.parametrize("extra", [[], ["--trainable_modules", "attn1", "--trainable_modules_low_learning_rate",
                                         "to_q"]], ids=["all", "two-lr-groups"])  # fmt: skip
def test_one_process_trains_exactly_as_the_normal_step(tiny_ckpt, tiny_data, tmp_path, single_process_env, extra):
    """LTX-Video full fine-tune, float32, fused AdamW, full AC, no clipping: the same losses and weights, bit for
    bit; the logged norm is the global one. Also with two parameter groups (to_q at half the lr): each block's step
    narrows both."""
    ref, ref_params = _in_process(tiny_ckpt, tiny_data, tmp_path / "ref", "--max_grad_norm", "0", *extra)
    out, params = _in_process(tiny_ckpt, tiny_data, tmp_path / "fused", "--max_grad_norm", "0",
                              "--fused_backward_pass", *extra)  # fmt: skip
    assert out.losses == ref.losses
    assert out.grad_norms == pytest.approx(ref.grad_norms, rel=1e-5)
    for name, p in ref_params.items():
        assert torch.equal(params[name], p), name


def _fsdp_args(tiny_ckpt, tiny_data) -> list[str]:
    # clipping at a bound no gradient reaches: the per-block norm (reduced over the ranks) and clipping path runs
    # without changing the update
    return ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "4",
            "--training_type", "full-finetune", "--dp_shards", "2", "--checkpointing_steps", "2", "--seed", "5",
            "--lr", "1e-4", "--max_grad_norm", "1e6", *TINY_ARGS]  # fmt: skip


@pytest.mark.heavy  # 30 s (CI runs it); the default suite keeps the one-process exact parity
def test_fsdp_matches_the_normal_step(tiny_ckpt, tiny_data, tmp_path):
    """2 FSDP2 ranks: the hooks run on the reduce-scattered shards; losses and (global) norms as the normal
    step's, to float32 rounding (the norm is summed per block)."""
    args = _fsdp_args(tiny_ckpt, tiny_data)
    ref = run_ptrain(2, args, tmp_path / "ref")
    assert ref.returncode == 0, first_error(ref.stderr)
    fused = run_ptrain(2, [*args, "--fused_backward_pass"], tmp_path / "fused")
    assert fused.returncode == 0, first_error(fused.stderr)
    assert "fused backward pass: the optimizer steps" in fused.stderr
    assert [m["loss"] for m in fused.metrics] == pytest.approx([m["loss"] for m in ref.metrics], rel=1e-5)
    assert [m["grad_norm"] for m in fused.metrics] == pytest.approx([m["grad_norm"] for m in ref.metrics], rel=1e-4)


def test_flags_that_need_the_whole_gradient_are_refused(tmp_path):
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--training_type", "full-finetune",
            "--fused_backward_pass"]  # fmt: skip
    with pytest.raises(ConfigError, match="--fused_backward_pass with --gradient_accumulation_steps 2"):
        parse_config([*base, "--gradient_accumulation_steps", "2"])._validate_fused_backward()
    with pytest.raises(ConfigError, match="--fused_backward_pass with --transformer_dtype float16"):
        parse_config([*base, "--transformer_dtype", "float16"])._validate_fused_backward()


def test_the_planner_sees_no_whole_model_gradients():
    """CogVideoX-5B full fine-tune, --full_bf16, 2 blocks simulated: the backward's peak holds almost no gradients
    (the normal step's holds all of them) and is lower."""
    from pathlib import Path

    from ptrain.planner import simulate_config

    variant = Path(__file__).resolve().parents[1] / "benchmarks" / "model_configs" / "cogvideox-5b"
    flags = ["--model_name", "cogvideox", "--pretrained_model_name_or_path", str(variant), "--num_frames", "49",
             "--height", "480", "--width", "720", "--training_type", "full-finetune", "--transformer_dtype",
             "bfloat16", "--full_bf16", "--gradient_checkpointing", "--ac_mode", "full",
             "--enable_precomputation", "on"]  # fmt: skip
    normal, fused = (simulate_config(parse_config(f), 1, variant, (2,))["phases"]["forward_backward"]
                     for f in (flags, [*flags, "--fused_backward_pass"]))  # fmt: skip
    grads = normal["categories"]["Gradient"]
    assert grads > 0.2 * 2**30  # the bf16 gradients of 2 blocks and the rest of the model
    assert fused["categories"]["Gradient"] < 0.05 * grads  # seen: 6.7 MB of 271 MB
    # the fused peak moves to the backward's start, where every block's saved input is still held (seen: 156 MB
    # lower with 2 blocks; 44.17 -> 38.25 GiB with all 42, benchmarks/results/memory.md)
    assert normal["peak_bytes"] - fused["peak_bytes"] > 0.5 * grads


def test_no_host_sync_in_a_non_logging_step(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """With the fused AdamW the per-block norm, clipping and skip stay on the device: a step that does not log
    reads nothing on the host (counted as in tests/test_host_syncs.py; the hooks' work on its own, since torch
    function modes do not reach into the autograd engine's hooks)."""
    from test_host_syncs import CountSyncs
    from tqdm import tqdm

    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "4", "--logging_steps", "2",
                        "--checkpointing_steps", "0", "--training_type", "full-finetune", "--fused_backward_pass",
                        *TINY_ARGS])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    calls, runs = [], {}
    fb = trainer.model.fused_backward

    # the model's work (the loader's runs before, on the host) and the hooks' per-block step
    def counting(method, name):
        def counted(*args, **kwargs):
            with CountSyncs() as mode:
                out = method(*args, **kwargs)
            calls.extend(f"{name}: {c}" for c in mode.calls)
            runs[name] = runs.get(name, 0) + 1
            return out

        return counted

    for owner, name in ((trainer, "forward_backward"), (trainer, "optimizer_step"), (fb, "_step")):
        setattr(owner, name, counting(getattr(owner, name), name))
    trainer.data_iter = iter(trainer.loader)
    stats = trainer.train_step(1)
    assert calls == [], calls
    assert runs["_step"] == len(fb.units) == 3  # it counted the hooks' work: 2 blocks and the rest
    trainer.log_step(1, stats, tqdm(disable=True))
    assert all(p.grad is None for p in trainer.model.params)


def test_a_second_gradient_in_one_step_is_an_error():
    """A parameter whose unit was stepped gets another gradient before finish(): refused, not lost."""
    net = _net()
    opt = torch.optim.AdamW(net.parameters(), lr=1e-2, fused=True)
    fb = FusedBackward(opt, list(net.parameters()), _units(net), max_grad_norm=0.0, on_device=True)
    _loss(net).backward()
    with pytest.raises(RuntimeError, match="received its gradient twice in one backward"):
        _loss(net).backward()
    fb.pending = {}
