"""Ring attention's block kernels (issue 15 item 7): the CUDA kernel choice and op calls on fake CUDA tensors (no
GPU here), the one-process ring (ptrain/parallel/ring_check.py: the ring's own per-step code for every cp rank)
against full SDPA on the CPU kernels and on the math reference, and the memory the planner's CPU simulation
counts against what the CUDA kernels hold."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from ptrain.parallel import context
from ptrain.parallel.context import _block_bwd, _block_fwd, forced_ring_kernel, merge_block, ring_kernel
from ptrain.parallel.ring_check import OpRecorder, full_keep, ring_one_process, sdpa_reference, suite_check

B, H, LQ, LK, D = 2, 3, 45, 37, 64  # token counts off the kernels' alignments (lse 32, bias 16)
SCALE = 0.27  # not 1/sqrt(D): a kernel that drops `scale` fails


def _fake_cuda(*shapes, dtype=torch.bfloat16):
    return [torch.randn(s, device="cuda", dtype=dtype) for s in shapes]


def _key_mask(lk: int, dtype):
    """An additive key mask (B, 1, 1, Lk) as the ring builds it at the step with text padding."""
    keep = torch.arange(lk, device="cuda").view(1, 1, 1, lk).expand(B, 1, 1, lk) < lk - 5
    return context._additive(keep, dtype)


@pytest.mark.parametrize(
    "dtype, head_dim, masked, want",
    [
        (torch.bfloat16, 64, False, "flash"),
        (torch.float16, 128, False, "flash"),
        (torch.bfloat16, 64, True, "efficient"),  # flash takes no mask
        (torch.bfloat16, 320, False, "efficient"),  # flash: head dim <= 256
        (torch.float32, 64, False, "efficient"),  # flash: fp16/bf16 only
        (torch.float32, 36, True, "efficient"),  # float32: head dim a multiple of 4
        (torch.bfloat16, 12, False, "math"),  # neither: head dim not a multiple of 8
        (torch.float64, 64, False, "math"),
    ],
)
def test_cuda_kernel_choice(dtype, head_dim, masked, want):
    with FakeTensorMode():
        q, k, v = _fake_cuda((B, H, LQ, head_dim), (B, H, LK, head_dim), (B, H, LK, head_dim), dtype=dtype)
        mask = _key_mask(LK, dtype) if masked else None
        assert ring_kernel(q, k, v, mask) == want
        with forced_ring_kernel("math"):
            assert ring_kernel(q, k, v, mask) == "math"
    cpu = torch.zeros(1, 1, 2, 8)
    assert ring_kernel(cpu, cpu, cpu, None) == "cpu"
    with pytest.raises(ValueError, match="ring kernel 'fast'"), forced_ring_kernel("fast"):
        pass


class _ArgShapes(TorchDispatchMode):
    """Records the (shape, stride, dtype) of every tensor argument of the attention ops."""

    def __init__(self):
        super().__init__()
        self.calls: dict[str, list] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if "scaled_dot_product" in name:
            self.calls[name] = [(tuple(a.shape), a.stride(), a.dtype) if isinstance(a, torch.Tensor) else a
                                for a in args]  # fmt: skip
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("masked", [False, True], ids=["flash", "efficient"])
def test_fused_block_kernels_on_fake_cuda(masked):
    """Forward: out (B, H, Lq, D) in q's dtype, lse (B, H, Lq) float32 (the efficient kernel's padded rows cut);
    backward from a merged (out, lse): grads shaped like q, k, v, the efficient kernel given its padded lse
    layout, a 16-aligned bias and the output in (B, Lq, H, D) memory order (the merged output here is not: the
    fake flash kernel returns q's layout); two key chunks merge to one (out, lse)."""
    fwd = "_scaled_dot_product_efficient_attention" if masked else "_scaled_dot_product_flash_attention"
    with FakeTensorMode():
        q, k, v, dout = _fake_cuda((B, H, LQ, D), (B, H, LK, D), (B, H, LK, D), (B, H, LQ, D))
        mask = _key_mask(LK, q.dtype) if masked else None
        with _ArgShapes() as rec:
            out, lse = _block_fwd(q, k, v, mask, SCALE)
            out2, lse2 = _block_fwd(q, k, v, None, SCALE)  # a second key chunk, unmasked: flash
            m_out, m_lse = merge_block(*merge_block(None, None, out, lse), out2, lse2)
            dq, dk, dv = _block_bwd(dout, q, k, v, m_out.to(q.dtype), m_lse, mask, SCALE)
        assert set(rec.calls) == {fwd, f"{fwd}_backward", "_scaled_dot_product_flash_attention"} - (
            set() if masked else {"_scaled_dot_product_efficient_attention"}
        )
        assert (out.shape, out.dtype, out.device.type) == ((B, H, LQ, D), torch.bfloat16, "cuda")
        assert (lse.shape, lse.dtype) == ((B, H, LQ), torch.float32)
        assert (m_out.shape, m_out.dtype, m_lse.shape, m_lse.dtype) == ((B, H, LQ, D), torch.float32, (B, H, LQ),
                                                                         torch.float32)  # fmt: skip
        for g, x in ((dq, q), (dk, k), (dv, v)):
            assert (g.shape, g.dtype, g.device.type) == (x.shape, x.dtype, "cuda")
        bwd = rec.calls[f"{fwd}_backward"]
        if masked:  # args: dout q k v bias out lse ...
            bias_shape, bias_stride, bias_dtype = bwd[4]
            assert bias_shape == (B, H, LQ, LK) and bias_dtype == torch.bfloat16 and bias_stride[0] % 16 == 0
            assert bwd[6][0] == (B, H, 64)  # lse padded to a multiple of 32 query rows, as the forward returns it
            assert bwd[5][:2] == ((B, H, LQ, D), (LQ * H * D, D, H * D, 1))  # out laid out as the kernel reads it
            assert rec.calls[fwd][3][0] == (B, H, LQ, LK)
        else:  # args: dout q k v out lse ...
            assert bwd[5][0] == (B, H, LQ) and bwd[5][1] == (H * LQ, LQ, 1)  # contiguous, as flash reads it


def test_the_math_kernel_off_cpu_is_logged_as_a_warning(caplog):
    context._logged_kernels.discard("math")
    with FakeTensorMode(), caplog.at_level(logging.INFO, logger="ptrain"):
        q, k, v = _fake_cuda((B, H, LQ, D), (B, H, LK, D), (B, H, LK, D), dtype=torch.float64)
        _block_fwd(q, k, v, None, SCALE)
        _block_fwd(q, k, v, None, SCALE)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING and "math attention kernel" in r.message]
    assert len(warnings) == 1 and "torch.float64" in warnings[0].message


def _ring_on(device, dtype, masked: bool, forced: str | None = None, t: int = 40, n: int = 1001, cp: int = 2):
    """Peak bytes (MemTracker, as the planner counts), kernels and outputs of the one-process ring on fake tensors."""
    from torch.distributed._tools.mem_tracker import MemTracker

    with FakeTensorMode():
        q, k, v, dout = (torch.randn(1, 4, t + n, D, device=device, dtype=dtype) for _ in range(4))
        keep = None
        if masked:
            keep = (torch.arange(t, device=device) < t // 2).view(1, 1, 1, t)
        tracker = MemTracker()
        with tracker, forced_ring_kernel(forced) if forced else contextlib.nullcontext(), OpRecorder() as rec:
            res = ring_one_process(q, k, v, dout, t, True, keep, cp, SCALE)
        peak = sum(sum(per_dev.values()) for per_dev in tracker.get_tracker_snapshot("peak").values())
        return peak, rec.attention_kernels(), [(r.shape, r.dtype, r.device.type) for r in res], q.shape


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "textmask"])
def test_one_process_ring_on_fake_cuda_and_the_memory_the_planner_counts(masked):
    """The whole ring (cp 2) on fake CUDA tensors runs the fused kernels only (efficient at the step with masked
    text, flash elsewhere), returns out/dq/dk/dv shaped like the inputs, and holds the memory that the same ring
    holds with the CPU kernel: the planner, which simulates on fake CPU tensors, counts the GPU's ring kernels.
    The math kernel (scores in memory) holds more."""
    peak_cuda, kernels, outs, shape = _ring_on("cuda", torch.bfloat16, masked)
    fused = {"_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_backward"}
    if masked:
        fused |= {"_scaled_dot_product_efficient_attention", "_scaled_dot_product_efficient_attention_backward"}
    assert set(kernels) == fused
    assert outs == [(shape, torch.bfloat16, "cuda")] * 4
    peak_cpu, cpu_kernels, _, _ = _ring_on("cpu", torch.bfloat16, masked)
    assert cpu_kernels == ["_scaled_dot_product_flash_attention_for_cpu",
                           "_scaled_dot_product_flash_attention_for_cpu_backward"]  # fmt: skip
    assert abs(peak_cuda - peak_cpu) <= 0.001 * peak_cpu, (peak_cuda, peak_cpu)
    peak_math, math_kernels, _, _ = _ring_on("cuda", torch.bfloat16, masked, forced="math")
    assert math_kernels == ["math (logsumexp of materialised scores)"]
    scores = 4 * (40 + 501) ** 2 * 4  # one block's float32 scores: heads x local queries x (text + block) keys
    assert peak_math > peak_cuda + scores


@pytest.mark.parametrize("cp", [1, 2, 3, 4])  # cp 4: 5 video tokens in chunks of 2, 2, 1, 0 (a rank of padding)
@pytest.mark.parametrize("text", ["none", "prefix", "suffix", "prefix-masked", "suffix-masked"])
@pytest.mark.parametrize("kernel", ["cpu", "math"])
def test_one_process_ring_matches_full_sdpa(cp, text, kernel):
    """Forward and backward of the ring's per-step code, every rank in this process, against one full-sequence
    SDPA with autograd (float64: exact to rounding). The same function runs on CUDA in benchmarks/gpu.py."""
    t = 0 if text == "none" else 3
    first = not text.startswith("suffix")
    g = torch.Generator().manual_seed(cp)
    q, k, v, dout = (torch.randn(2, 3, t + 5, 8, generator=g, dtype=torch.float64) for _ in range(4))
    keep = torch.tensor([[True, False, True], [False, False, True]]).view(2, 1, 1, 3) if "masked" in text else None
    with forced_ring_kernel(kernel):
        got = ring_one_process(q, k, v, dout, t, first, keep, cp, SCALE)
    want = sdpa_reference(q, k, v, dout, full_keep(keep, t, first, 5), SCALE, torch.float64)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        assert a.shape == b.shape and a.dtype == torch.float64, name
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=name)


def test_suite_check_in_cpu_mode():
    """benchmarks/gpu.py's record: both cases pass, name the CPU kernels and compare with full SDPA."""
    res = suite_check(cpu=True)
    assert res["check"] == "ring-attention" and res["ok"] and res["device"] == "CPU"
    assert [c["shape"]["text_mask"] for c in res["cases"]] == [False, True]
    for case in res["cases"]:
        assert case["kernels"] == ["_scaled_dot_product_flash_attention_for_cpu",
                                   "_scaled_dot_product_flash_attention_for_cpu_backward"]  # fmt: skip
        for name in ("out", "dq", "dk", "dv"):
            err = case["ring_err"][name]
            assert 0 <= err["max_abs_err"] < 1e-5 * err["ref_max_abs"], (name, err)
        assert case["ring_peak_gib"] is None and case["ring_fwd_bwd_s"] > 0


def test_bmhk_layout_keeps_values():
    x = torch.randn(B, H, LQ, D)
    y = context._bmhk(x)
    assert torch.equal(y, x) and y.stride() == (LQ * H * D, D, H * D, 1)
    assert context._bmhk(y) is y  # already in that layout: no copy
