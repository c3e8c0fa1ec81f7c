"""Training metrics: MFU / HFU from FLOPs counted per training shape at start-up (ptrain/flops.py), and the
per-phase step breakdown on request."""

from __future__ import annotations

import json

import pytest
from conftest import first_error, train_args


@pytest.mark.slow
def test_mfu_and_step_breakdown_are_logged(ptrain_run, tiny_ckpt, tiny_data, tmp_path):
    args = train_args(tiny_ckpt, tiny_data, "--train_steps", "2", "--checkpointing_steps", "0", "--batch_size", "1",
                      "--gradient_accumulation_steps", "2", "--peak_tflops", "0.5", "--log_step_breakdown",
                      "--profile_from_step", "2", "--profile_num_steps", "1")  # fmt: skip
    run = ptrain_run(1, args, tmp_path / "out")
    assert run.returncode == 0, first_error(run.stderr)
    # --profile_from_step (the same run): step 2's trace and operator table
    trace = json.loads((tmp_path / "out" / "profile" / "trace_rank0.json").read_text())
    assert any(e.get("name", "").startswith("aten::") for e in trace["traceEvents"])
    assert "aten::" in (tmp_path / "out" / "profile" / "ops_rank0.txt").read_text()
    assert "profiling steps 2-2" in run.stderr
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2
    for r in rows:
        assert r["tflops_per_step"] > 0 and 0 < r["mfu"] < 1
        assert r["mfu"] == pytest.approx(r["tflops_per_step"] / r["step_time_s"] / 0.5, rel=1e-6)
        assert r["forward_s"] > 0 and r["backward_s"] > 0 and r["optimizer_s"] >= 0
        assert r["forward_s"] + r["backward_s"] + r["optimizer_s"] <= r["step_time_s"]
    assert rows[0]["tflops_per_step"] == rows[1]["tflops_per_step"]  # counted once (2 micro-batches each)


def test_no_mfu_without_a_known_peak(tmp_path):
    import torch

    from ptrain.metrics import device_peak_tflops

    assert device_peak_tflops(torch.device("cpu"), None) is None
    assert device_peak_tflops(torch.device("cpu"), 1.5) == 1.5


def test_flop_count_of_a_training_step_matches_the_formula():
    """What the trainer counts for MFU (FlopCounterMode around forward, loss and backward), on the tiny LTX
    transformer, against arithmetic from the layer sizes: 2*rows*in*out per Linear in forward, the same again in
    backward for the input gradient (where the input needs one) and for the weight gradient; attention
    4*B*H*Lq*Lk*D in forward (q k^T and p v) and twice that in backward. SDPA's math kernel is forced: torch's
    counter has no formula for the CPU flash kernel (ptrain.flops registers one; see the test below)."""
    import torch
    from diffusers import LTXVideoTransformer3DModel
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from ptrain.config import ObjectiveArgs
    from ptrain.models.spec import get_spec
    from ptrain.objectives import FlowMatching, sample_generators
    from ptrain.testing.tiny import LTX_TRANSFORMER_CONFIG

    cfg = LTX_TRANSFORMER_CONFIG
    model = LTXVideoTransformer3DModel(**cfg)
    spec = get_spec("ltx_video")
    spec._vae_ratios = (8, 32)
    b, f, h, w, text = 2, 2, 4, 4, 6
    latents = torch.randn(b, cfg["in_channels"], f, h, w)
    cond = spec.simulated_conditioning(cfg, b, text, torch.device("cpu"), torch.float32)
    objective = FlowMatching(ObjectiveArgs(), 1.0)
    prepared = objective.prepare(latents, sample_generators(0, range(b)))

    linears = []
    hooks = [
        m.register_forward_hook(
            lambda m, a, out: linears.append((a[0].numel() // m.in_features, m, a[0].requires_grad))
        )
        for m in model.modules()
        if isinstance(m, torch.nn.Linear)
    ]
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        loss = objective.loss(spec.forward(model, prepared.noisy, prepared.timesteps, cond), prepared)
        loss.backward()
    for hook in hooks:
        hook.remove()

    linear = sum(2 * rows * m.in_features * m.out_features * (2 + needs_input_grad)
                 for rows, m, needs_input_grad in linears)  # fmt: skip
    n, heads, d = f * h * w, cfg["num_attention_heads"], cfg["attention_head_dim"]
    attention = cfg["num_layers"] * 3 * 4 * b * heads * d * (n * n + n * text)  # self + cross attention
    assert len(linears) > 10 and any(not g for _, _, g in linears)  # proj_in's input (latents) needs no grad
    assert counter.get_total_flops() == linear + attention


def test_cpu_flash_attention_is_counted_like_the_math_kernel():
    """torch's FlopCounterMode counts 0 for the CPU flash SDPA kernel; ptrain.flops registers its formula, so the
    fused kernel's forward and backward count what the math kernel's matmuls do (4*B*H*L*L*D forward)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    import ptrain.flops  # noqa: F401  (registers the formula)

    b, h, n, d = 2, 3, 16, 8
    counts = []
    for backend in (SDPBackend.FLASH_ATTENTION, SDPBackend.MATH):
        q, k, v = (torch.randn(b, h, n, d, requires_grad=True) for _ in range(3))
        with sdpa_kernel(backend), FlopCounterMode(display=False) as counter:
            F.scaled_dot_product_attention(q, k, v).sum().backward()
        counts.append(counter.get_total_flops())
    assert counts[0] == counts[1] == 4 * b * h * n * n * d * 3  # forward + backward (twice the forward)


def test_model_flops_do_not_count_recompute(tiny_ckpt, tiny_data):
    """Model FLOPs (mfu) are the same with and without activation checkpointing; hardware FLOPs (hfu) add the
    recomputed forward with it; the block extrapolation equals counting every block."""
    from ptrain.config import parse_config
    from ptrain.flops import _count, step_flops
    from ptrain.models.spec import get_spec

    flags = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data)]
    spec = get_spec("ltx_video")
    key, model, hardware = step_flops(parse_config(flags), spec, tiny_ckpt, 9, 32, 32)
    key_ac, model_ac, hardware_ac = step_flops(parse_config([*flags, "--gradient_checkpointing"]), spec, tiny_ckpt,
                                               9, 32, 32)  # fmt: skip
    assert key == key_ac and model == hardware == model_ac and hardware_ac > model_ac
    blocks = int(spec.transformer_cls.load_config(tiny_ckpt, subfolder="transformer")["num_layers"])
    assert _count(parse_config(flags), spec, tiny_ckpt, (1, 3, 9, 32, 32), (blocks,), False)[0] == model


def test_step_profiler_window_and_a_window_never_reached(tmp_path, caplog):
    """StepProfiler records exactly its steps (trace + operator table), and says so when a run never reaches them."""
    import logging

    import torch

    from ptrain.profiling import StepProfiler

    prof = StepProfiler(2, 2, tmp_path, 0, torch.device("cpu"))
    a = torch.randn(64, 64)
    for step in (1, 2, 3, 4):
        prof.step_begin(step)
        with torch.autograd.profiler.record_function(f"step{step}"):
            a = torch.tanh(a @ a)
        prof.step_end(step)
    prof.close(4)
    names = {e.get("name") for e in json.loads((tmp_path / "profile" / "trace_rank0.json").read_text())["traceEvents"]}
    assert {"step2", "step3"} <= names and not names & {"step1", "step4"}
    assert "aten::mm" in (tmp_path / "profile" / "ops_rank0.txt").read_text()
    summary = json.loads((tmp_path / "profile" / "summary_rank0.json").read_text())
    assert summary["steps"] == 2 and summary["wall_s_per_step"] > 0
    assert summary["device_s_per_step"] is None and summary["device_busy"] is None  # a CPU: no device timeline
    assert summary["kernel_launches_per_step"] == 0
    assert summary["aten_ops_per_step"] >= 2  # mm and tanh (and what they call)
    from ptrain.profiling import busy_us

    # the device's busy time: the union of its events' intervals (overlapping streams and repeats counted once)
    assert busy_us([(0, 10), (5, 12), (20, 25), (21, 22), (20, 25)]) == 17
    assert busy_us([]) == 0
    with caplog.at_level(logging.WARNING, logger="ptrain"):
        StepProfiler(9, 2, tmp_path / "late", 0, torch.device("cpu")).close(4)
    assert "--profile_from_step 9" in caplog.text and not (tmp_path / "late" / "profile").exists()
