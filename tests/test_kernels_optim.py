"""Ring attention's math kernel (the one used off CPU) against torch's SDPA, and each optimizer's update
against a reference written out (AdamW, Adam) or came-pytorch's own CAME with the same flags."""

from __future__ import annotations

import shutil

import pytest
import torch
import torch.nn.functional as F

from ptrain.config import OptimArgs
from ptrain.optim import build_optimizer
from ptrain.parallel import context
from ptrain.parallel.context import CPGroup, _Layout, _math_bwd, _math_fwd

TOL = {torch.float32: {"rtol": 2e-5, "atol": 2e-6}, torch.float64: {"rtol": 1e-10, "atol": 1e-12}}
# (batch, heads, query tokens, key blocks): uneven key blocks, as the ring visits them (the last rank's block is
# shorter when the video tokens do not divide by cp; the first one holds the text tokens too).
SHAPES = [(1, 2, 7, (7,)), (2, 3, 5, (4, 4)), (1, 2, 9, (6, 1, 4))]
HEAD_DIM, SCALE = 8, 0.27  # not 1/sqrt(head_dim): a kernel that ignores `scale` fails


def _inputs(b, h, lq, sizes, dtype, masked, seed=0):
    g = torch.Generator().manual_seed(seed)
    lk = sum(sizes)
    q, k, v = (torch.randn(b, h, n, HEAD_DIM, generator=g, dtype=dtype) for n in (lq, lk, lk))
    keep = None
    if masked:  # key padding as text padding masks arrive, (B, 1, 1, Lk); each block keeps its first key
        keep = torch.rand(b, 1, 1, lk, generator=g) > 0.4
        starts = torch.tensor([0, *sizes[:-1]]).cumsum(0)
        keep[..., starts] = True
    return q, k, v, keep


def _additive(keep, dtype):
    return None if keep is None else context._additive(keep, dtype)


def _blocks(x, sizes, dim=2):
    return list(torch.split(x, list(sizes), dim=dim))


@pytest.mark.parametrize("masked", [False, True], ids=["nomask", "mask"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("b, h, lq, sizes", SHAPES)
def test_ring_math_kernel_forward_lse_merge_and_gradients_match_sdpa(b, h, lq, sizes, dtype, masked):
    q, k, v, keep = _inputs(b, h, lq, sizes, dtype, masked)
    mask = _additive(keep, dtype)

    # Reference: SDPA with autograd, and the log-sum-exp of the scaled, masked scores in float64.
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=keep, scale=SCALE)
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1), dtype=dtype)
    ref.backward(dout)
    scores = (q.double() @ k.double().transpose(-1, -2)) * SCALE
    if mask is not None:
        scores = scores + mask.double()
    ref_lse = torch.logsumexp(scores, dim=-1)

    # Whole key range in one block.
    out, lse = _math_fwd(q, k, v, mask, SCALE)
    assert out.dtype == dtype and lse.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(out, ref.detach(), **TOL[dtype])
    torch.testing.assert_close(lse.double(), ref_lse, **TOL[dtype])

    # Key blocks visited one at a time and merged by log-sum-exp, as _RingAttention.forward does.
    kb, vb = _blocks(k, sizes), _blocks(v, sizes)
    mb = [None] * len(sizes) if mask is None else _blocks(mask, sizes, dim=-1)
    acc = torch.promote_types(dtype, torch.float32)
    m_out = m_lse = None
    for kk, vv, mm in zip(kb, vb, mb):
        o, lse_b = _math_fwd(q, kk, vv, mm, SCALE)
        if m_out is None:
            m_out, m_lse = o.to(acc), lse_b
        else:
            new = torch.logaddexp(m_lse, lse_b)
            m_out = m_out * torch.exp(m_lse - new).unsqueeze(-1) + o.to(acc) * torch.exp(lse_b - new).unsqueeze(-1)
            m_lse = new
    torch.testing.assert_close(m_out.to(dtype), ref.detach(), **TOL[dtype])
    torch.testing.assert_close(m_lse.double(), ref_lse, **TOL[dtype])

    # Backward per block from the merged output and lse (flash-attention identity): dq sums, dk/dv concatenate.
    dq = torch.zeros(q.shape, dtype=acc)
    dks, dvs = [], []
    for kk, vv, mm in zip(kb, vb, mb):
        gq, gk, gv = _math_bwd(dout, q, kk, vv, m_out.to(dtype), m_lse, mm, SCALE)
        dq += gq
        dks.append(gk)
        dvs.append(gv)
    torch.testing.assert_close(dq.to(dtype), qr.grad, **TOL[dtype])
    torch.testing.assert_close(torch.cat(dks, 2).to(dtype), kr.grad, **TOL[dtype])
    torch.testing.assert_close(torch.cat(dvs, 2).to(dtype), vr.grad, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("text_first", [True, False], ids=["text_prefix", "text_suffix"])
def test_ring_attention_with_the_math_kernel_matches_sdpa(monkeypatch, dtype, text_first):
    """The whole ring autograd Function (one rank) with the off-CPU kernel: text + video keys, text padding mask."""
    monkeypatch.setattr(context, "_block_fwd", _math_fwd)
    monkeypatch.setattr(context, "_block_bwd", _math_bwd)
    b, h, t, n = 2, 3, 4, 6
    q, k, v, _ = _inputs(b, h, t + n, (t + n,), dtype, masked=False, seed=2)
    text_keep = torch.tensor([[True, True, True, False], [True, False, False, False]]).view(b, 1, 1, t)
    keep = torch.cat([text_keep, torch.ones(b, 1, 1, n, dtype=torch.bool)] if text_first else
                     [torch.ones(b, 1, 1, n, dtype=torch.bool), text_keep], dim=-1)  # fmt: skip
    cpg = CPGroup(group=None, rank=0, size=1, global_ranks=[0], mode="ring")
    lay = _Layout(text_len=t, text_first=text_first, n_local=n, n_valid=n)

    qa, ka, va = (x.clone().requires_grad_() for x in (q, k, v))
    out = context._RingAttention.apply(qa, ka, va, text_keep, lay, cpg, SCALE)
    qr, kr, vr = (x.clone().requires_grad_() for x in (q, k, v))
    ref = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=keep, scale=SCALE)
    torch.testing.assert_close(out, ref, **TOL[dtype])
    dout = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3), dtype=dtype)
    out.backward(dout)
    ref.backward(dout)
    for got, want in ((qa, qr), (ka, kr), (va, vr)):
        torch.testing.assert_close(got.grad, want.grad, **TOL[dtype])


# --- optimizers -----------------------------------------------------------------------------------------------------------
# Every hyperparameter away from its default, so that a flag not passed on changes the update.
LR, B1, B2, B3, WD, EPS = 0.01, 0.8, 0.9, 0.7, 0.1, 1e-3
GRADS = [torch.tensor([[0.5, -1.0, 2.0], [0.1, 0.0, -0.3]]), torch.tensor([[-0.2, 0.4, 1.0], [0.3, -0.6, 0.05]])]
P0 = torch.tensor([[1.0, -2.0, 0.5], [0.25, 3.0, -1.0]])


def _optim_args(name: str) -> OptimArgs:
    return OptimArgs(optimizer=name, lr=LR, beta1=B1, beta2=B2, beta3=B3, weight_decay=WD, epsilon=EPS)


def _adam_reference(decoupled: bool, lr: float = LR) -> torch.Tensor:
    """Two steps of Adam (L2 penalty in the gradient) or AdamW (decoupled decay), written out in float64."""
    p = P0.double().clone()
    m = torch.zeros_like(p)
    v = torch.zeros_like(p)
    for t, g in enumerate(GRADS, start=1):
        g = g.double()
        if decoupled:
            p = p * (1 - lr * WD)
        else:
            g = g + WD * p
        m = B1 * m + (1 - B1) * g
        v = B2 * v + (1 - B2) * g * g
        p = p - lr * (m / (1 - B1**t)) / ((v / (1 - B2**t)).sqrt() + EPS)
    return p


def _step_twice(opt: torch.optim.Optimizer, params: list[torch.nn.Parameter], grads: list[list[torch.Tensor]]):
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()


@pytest.mark.parametrize("name", ["adamw", "adam"])
def test_adam_family_update_matches_the_formula(name):
    p = torch.nn.Parameter(P0.clone())
    slow = torch.nn.Parameter(P0.clone())  # a param group with its own learning rate (--*_low_learning_rate)
    opt = build_optimizer([{"params": [p]}, {"params": [slow], "lr": LR / 10}], _optim_args(name), torch.device("cpu"))
    _step_twice(opt, [p, slow], [[g, g] for g in GRADS])
    want = _adam_reference(decoupled=name == "adamw")
    torch.testing.assert_close(p.detach().double(), want, rtol=1e-6, atol=1e-7)
    assert (p.detach() - P0).abs().min() > 1e-3  # every entry moved
    torch.testing.assert_close(slow.detach().double(), _adam_reference(name == "adamw", LR / 10), rtol=1e-6, atol=1e-7)


def test_came_update_is_came_pytorchs_with_every_flag_passed():
    from came_pytorch import CAME

    def run(opt_factory):
        w = torch.nn.Parameter(P0.clone())  # factored (row/column) moments
        bias = torch.nn.Parameter(P0[0].clone())  # unfactored
        opt = opt_factory([w, bias])
        _step_twice(opt, [w, bias], [[g, g[0]] for g in GRADS])
        return w.detach(), bias.detach(), opt

    got_w, got_b, opt = run(lambda ps: build_optimizer(ps, _optim_args("came"), torch.device("cpu")))
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["weight_decay"]) == (LR, (B1, B2, B3), (EPS, 1e-16), WD)
    ref_w, ref_b, _ = run(lambda ps: CAME(ps, lr=LR, betas=(B1, B2, B3), eps=(EPS, 1e-16), weight_decay=WD))
    torch.testing.assert_close(got_w, ref_w, rtol=0, atol=0)
    torch.testing.assert_close(got_b, ref_b, rtol=0, atol=0)
    assert (got_w - P0).abs().min() > 1e-4 and (got_b - P0[0]).abs().min() > 1e-4
    # The reference is sensitive to each flag: a wrong beta3 / eps / weight decay would not match it.
    for other in ({"betas": (B1, B2, 0.9999)}, {"eps": (1e-30, 1e-16)}, {"weight_decay": 0.0}):
        kw = {"lr": LR, "betas": (B1, B2, B3), "eps": (EPS, 1e-16), "weight_decay": WD} | other
        w, _, _ = run(lambda ps, kw=kw: CAME(ps, **kw))
        assert not torch.allclose(w, got_w, rtol=1e-6, atol=1e-7), other


def test_stochastic_rounding_to_bf16_is_unbiased_and_nearest_is_not():
    from ptrain.bf16_optim import round_to_bf16

    x = torch.full((200_000,), 1.0 + 2.0**-10)  # a quarter of the way from 1 to the next bfloat16 (1 + 2^-7)
    sr = round_to_bf16(x, torch.Generator().manual_seed(0)).float()
    assert set(sr.unique().tolist()) == {1.0, 1.0 + 2.0**-7}
    assert sr.mean().item() == pytest.approx(1.0 + 2.0**-10, rel=1e-4)  # exact on average
    neg = round_to_bf16(-x, torch.Generator().manual_seed(0)).float()
    assert neg.mean().item() == pytest.approx(-(1.0 + 2.0**-10), rel=1e-4)
    assert round_to_bf16(x, None).float().unique().tolist() == [1.0]  # nearest: the update is lost
    exact = torch.tensor([1.0, -3.5, 0.0, 2.0**-20])
    assert round_to_bf16(exact, torch.Generator().manual_seed(1)).float().equal(exact)  # representable: unchanged


def test_bf16_adamw_matches_float32_adamw_and_skips_on_device():
    """BF16AdamW's update is AdamW's (computed in float32); on float32 parameters it is exact; found_inf = 1 leaves
    weights, moments and the step count as they were."""
    from ptrain.bf16_optim import BF16AdamW

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 32, generator=g)
    grads = [torch.randn(64, 32, generator=g) for _ in range(3)]
    ref, ours = torch.nn.Parameter(w.clone()), torch.nn.Parameter(w.clone())
    opt_ref = torch.optim.AdamW([ref], lr=1e-2, weight_decay=0.1)
    opt = BF16AdamW([ours], lr=1e-2, weight_decay=0.1, seed=3)
    for grad in grads:
        ref.grad, ours.grad = grad.clone(), grad.clone()
        opt_ref.step()
        opt.step()
    torch.testing.assert_close(ours, ref)
    before = (ours.detach().clone(), opt.state[ours]["exp_avg"].clone(), float(opt.state[ours]["step"]))
    opt.found_inf = torch.tensor(1.0)
    ours.grad = torch.full_like(w, float("nan"))
    opt.step()
    assert ours.detach().equal(before[0]) and opt.state[ours]["exp_avg"].equal(before[1])
    assert float(opt.state[ours]["step"]) == before[2]
    half = torch.nn.Parameter(w.to(torch.bfloat16))  # bfloat16: moments in bfloat16 too, rounded stochastically
    opt16 = BF16AdamW([half], lr=1e-2, seed=3)
    half.grad = grads[0].to(torch.bfloat16)
    opt16.step()
    assert half.dtype == opt16.state[half]["exp_avg"].dtype == torch.bfloat16
    moved = (half.float() - w.to(torch.bfloat16).float()).abs()
    ulp = torch.maximum(w.abs(), half.detach().float().abs()) * 2**-7  # bfloat16 spacing at x <= |x| 2^-7
    assert (moved <= 1e-2 * 1.001 + ulp).all() and moved.mean() > 5e-3  # about lr, within a bfloat16 unit


def test_bf16_weights_drift_from_float32_masters_is_bounded_with_stochastic_rounding():
    """200 AdamW steps at lr 1e-5 on weights of scale 0.05 (bfloat16 spacing there ~2.4e-4: every single update is
    far below half a unit): round-to-nearest loses most of the update; stochastic rounding keeps it on average
    (its accumulated rounding noise grows as the square root of the steps, the update linearly)."""
    from ptrain.bf16_optim import BF16AdamW

    g = torch.Generator().manual_seed(0)
    w0 = (torch.randn(20_000, generator=g) * 0.05).to(torch.bfloat16).float()
    target = w0 + torch.randn(20_000, generator=g) * 0.05

    def train(param_dtype, stochastic: bool | None):
        p = torch.nn.Parameter(w0.to(param_dtype, copy=True))
        opt = (torch.optim.AdamW([p], lr=1e-5) if stochastic is None
               else BF16AdamW([p], lr=1e-5, stochastic=stochastic, seed=1))  # fmt: skip
        noise = torch.Generator().manual_seed(2)
        for _ in range(200):
            p.grad = ((p.detach().float() - target) + 0.01 * torch.randn(20_000, generator=noise)).to(param_dtype)
            opt.step()
        return p.detach().float() - w0

    ref = train(torch.float32, None)
    drift = {}
    for name, stochastic in (("stochastic", True), ("nearest", False)):
        d = train(torch.bfloat16, stochastic)
        drift[name] = (float(torch.nn.functional.cosine_similarity(d, ref, dim=0)), float(d.norm() / ref.norm()))
    assert drift["stochastic"][0] > 0.85 and 0.8 < drift["stochastic"][1] < 1.3, drift
    assert drift["nearest"][1] < 0.5, drift  # updates below half a unit are rounded away


@pytest.mark.skipif(not any(shutil.which(c) for c in ("g++", "c++", "clang++")),
                    reason="torch.compile's CPU backend (inductor) needs a C++ compiler")  # fmt: skip
def test_bf16_adamw_compiled_update_matches_eager():
    """--full_bf16's compiled update (CUDA's path; here under torch.compile on the CPU) does what the eager one
    does: same random bits, same float32 math, so weights and moments agree up to one bfloat16 unit on a few
    elements (float32 rounding of the update differs between the fused kernel and eager ops); a schedule's changing
    lr and every parameter size share one compiled graph per dtype combination and rank; a skipped step skips."""
    from torch._dynamo.utils import counters

    from ptrain.bf16_optim import BF16AdamW

    g = torch.Generator().manual_seed(0)
    shapes = [((64, 32), torch.bfloat16), ((7,), torch.bfloat16), ((300,), torch.bfloat16),
              ((16, 16), torch.float32), ((1,), torch.bfloat16)]  # fmt: skip
    init = [torch.randn(s, generator=g).to(dt) for s, dt in shapes]
    grads = [[torch.randn(s, generator=g).to(dt) for s, dt in shapes] for _ in range(4)]
    counters.clear()
    runs = {}
    for fused in (False, True):
        ps = [torch.nn.Parameter(w.clone()) for w in init]
        opt = BF16AdamW(ps, lr=1e-2, weight_decay=0.1, seed=5, fused=fused)
        for i, step_grads in enumerate(grads):
            opt.param_groups[0]["lr"] = 1e-2 / (i + 1)  # as an LR schedule sets it
            opt.found_inf = torch.tensor(1.0 if i == 2 else 0.0)  # step 3 is skipped
            for p, gr in zip(ps, step_grads):
                p.grad = gr.clone()
            opt.step()
        runs[fused] = [(p.detach(), opt.state[p]["exp_avg"], opt.state[p]["exp_avg_sq"], opt.state[p]["step"])
                       for p in ps]  # fmt: skip
    for (shape, dtype), eager, comp in zip(shapes, runs[False], runs[True]):
        assert float(eager[3]) == float(comp[3]) == 3.0  # four steps, one skipped
        for a, b in zip(eager[:3], comp[:3]):
            assert a.dtype == b.dtype == dtype
            if dtype == torch.float32:  # exact float32 updates: equal up to float32 rounding
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
                continue
            unit = a.float().abs().clamp_min(1e-30) * 2**-7  # bfloat16's spacing at a value is at most |a| 2^-7
            diff = (a.float() - b.float()).abs()
            assert (diff <= unit * 1.01).all(), (shape, diff.max())
            assert (diff > 0).float().mean() <= 0.02, (shape, (diff > 0).float().mean())
    assert runs[False][0][0].float().sub(init[0].float()).abs().mean() > 1e-3  # it trained
    # bfloat16 with bits (its 2-D and 1-D parameters), float32 without; not one per size or learning rate
    assert counters["stats"]["unique_graphs"] == 3


def test_bf16_adamw_planned_fused_allocates_only_its_random_bits():
    """The planner cannot compile on fake tensors: with `planning`, the fused BF16AdamW allocates what the compiled
    update does (its int16 random bits, 6 bytes per element; it writes in place), where the eager update makes
    float32 temporaries of the parameter's size."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.bf16_optim import BF16AdamW
    from ptrain.planner import PeakBytes

    n = 1 << 16
    peaks = {}
    with FakeTensorMode():
        for fused in (False, True):
            p = torch.nn.Parameter(torch.zeros(n, dtype=torch.bfloat16))
            p.grad = torch.zeros(n, dtype=torch.bfloat16)
            opt = BF16AdamW([p], lr=1e-3, fused=fused, planning=True)
            opt.step()  # the first step makes the moments (4 bytes per element)
            with PeakBytes() as mem:
                opt.step()
            peaks[fused] = mem.peak
    assert 6 * n <= peaks[True] <= 6 * n + 64  # (and the 0-d "no overflow" flag)
    assert peaks[False] > 5 * 4 * n  # float32 copies of weight, gradient, moments, and the update's


def test_bf16_adamw_falls_back_to_eager_when_compiling_fails(monkeypatch, caplog):
    """A compile failure (raised before the update runs) logs a warning and the step runs eager: the same result
    as an eager optimizer, and later steps do not try again."""
    import logging

    from ptrain import bf16_optim
    from ptrain.bf16_optim import BF16AdamW

    calls = []

    def failing():
        def fn(*args):
            calls.append(1)
            raise RuntimeError("backend compiler failed: planted\nmore lines")

        return fn

    monkeypatch.setattr(bf16_optim, "compiled_update", failing)
    g = torch.Generator().manual_seed(0)
    w, grads = torch.randn(32, 16, generator=g), [torch.randn(32, 16, generator=g) for _ in range(2)]
    out = {}
    for fused in (True, False):
        p = torch.nn.Parameter(w.to(torch.bfloat16))
        opt = BF16AdamW([p], lr=1e-2, seed=2, fused=fused)
        with caplog.at_level(logging.WARNING, logger="ptrain"):
            for gr in grads:
                p.grad = gr.to(torch.bfloat16)
                opt.step()
        out[fused] = (p.detach().clone(), float(opt.state[p]["step"]))
    assert calls == [1]  # tried once, then eager
    assert "compiling the optimizer update failed (RuntimeError: backend compiler failed: planted)" in caplog.text
    assert out[True][0].equal(out[False][0]) and out[True][1] == out[False][1] == 2.0


def test_found_inf_goes_to_the_parameters_device():
    """The CUDA review: with --fsdp_cpu_offload the parameters are on the CPU and the step's `finite` on the GPU;
    torch's fused AdamW would copy found_inf with non_blocking=True into pinned memory that its CPU kernel reads
    before the copy lands. ptrain hands it over on the parameters' device (a blocking copy), here the meta device
    standing for the other one."""
    from ptrain.optim import found_inf_for

    finite = torch.tensor(False)
    same = found_inf_for([torch.nn.Parameter(torch.zeros(2))], finite)
    assert same.device.type == "cpu" and same.dtype == torch.float32 and same.item() == 1.0
    assert found_inf_for([torch.nn.Parameter(torch.zeros(2, device="meta"))], finite).device.type == "meta"
    assert found_inf_for([], torch.tensor(True)).item() == 0.0
