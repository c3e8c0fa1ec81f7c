"""Ring attention in one process: every cp rank's ring loop, run one after another (issue 15 item 7).

One GPU cannot host two NCCL ranks, so this is how the ring's CUDA kernels are checked on one GPU. It splits the
sequence as the cp hooks do (text replicated, video in `cp` zero-padded chunks), and for each rank runs the same
per-step code as `--cp_mode ring` (`ring_forward_step` / `ring_backward_step` of ptrain/parallel/context.py:
key selection, text mask, the block kernels that `ring_kernel` picks, the log-sum-exp merge, gradient routing);
only the send / receive is replaced by reading the visiting rank's block directly. The result is compared with
one full-sequence `F.scaled_dot_product_attention` forward and autograd backward.

`suite_check` is what benchmarks/gpu.py records: the CogVideoX-5B shape at 49x480x720 with `--cp_degree 2` on
CUDA (bf16), with and without a text padding mask, or a tiny shape on the CPU.
"""

from __future__ import annotations

import math
import time
from collections import Counter

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from ptrain.parallel.context import (
    CPGroup,
    _acc,
    _Layout,
    ring_backward_step,
    ring_forward_step,
    ring_grads,
    ring_inputs,
)

#: CogVideoX-5B at 49x480x720: 13 latent frames x 30 x 45 patches = 17550 video tokens, 226 text tokens.
COGVIDEOX_5B = {"heads": 48, "head_dim": 64, "video": 17550, "text": 226, "cp": 2}
TINY = {"heads": 2, "head_dim": 16, "video": 37, "text": 6, "cp": 2}
GIB = 2**30


def _rank_views(x: torch.Tensor, lay: _Layout, cp: int) -> list[torch.Tensor]:
    """Each cp rank's (text + video chunk) sequence of a full (B, H, T + N, D) tensor, as the cp hooks hand it
    to the attention: video zero-padded to cp x n_local tokens, text replicated."""
    full = _Layout(lay.text_len, lay.text_first, lay.n_valid, lay.n_valid)
    text, video = full.split(x)
    pad = lay.n_local * cp - lay.n_valid
    if pad:
        video = torch.cat([video, video.new_zeros(*video.shape[:2], pad, video.shape[3])], dim=2)
    return [lay.join(text, video.narrow(2, r * lay.n_local, lay.n_local)) for r in range(cp)]


def _assemble(parts: list[torch.Tensor], lay: _Layout, text_sum: bool) -> torch.Tensor:
    """The full-sequence tensor from the ranks' (text + video chunk) tensors: video chunks concatenated without
    padding; text from rank 0 (outputs: every rank computes the same) or summed (gradients: partial per rank)."""
    texts, videos = zip(*(lay.split(p) for p in parts))
    text = sum(texts[1:], texts[0]) if text_sum else texts[0]
    video = torch.cat(videos, dim=2).narrow(2, 0, lay.n_valid)
    return _Layout(lay.text_len, lay.text_first, lay.n_valid, lay.n_valid).join(text, video)


def ring_one_process(q, k, v, dout, text_len: int, text_first: bool, text_keep, cp: int, scale: float):
    """(out, dq, dk, dv) of attention over the full sequence computed as `cp` ring ranks would: q, k, v, dout
    (B, H, T + N, D) with T text tokens first (or last); text_keep (B, 1, 1, T) bool or None. The text rows of
    dout go to rank 0 alone (the ranks' text gradients are partial and sum to the whole)."""
    n = q.shape[2] - text_len
    lay = _Layout(text_len, text_first, math.ceil(n / cp), n)
    ranks = [CPGroup(group=None, rank=r, size=cp, global_ranks=list(range(cp)), mode="ring") for r in range(cp)]
    qs, ks, vs = (_rank_views(x, lay, cp) for x in (q, k, v))
    douts = _rank_views(dout, lay, cp)
    if text_len:
        for r in range(1, cp):
            text, video = lay.split(douts[r])
            douts[r] = lay.join(torch.zeros_like(text), video)
    inputs = [ring_inputs(ks[r], vs[r], lay) for r in range(cp)]  # (text k, text v, video K|V block) per rank
    outs, lses = [], []
    for r in range(cp):
        kt, vt, _ = inputs[r]
        out = lse = None
        for s in range(cp):  # at step s rank r holds the block of rank r - s
            block = inputs[(r - s) % cp][2]
            out, lse = ring_forward_step(qs[r], block, kt, vt, text_keep, lay, ranks[r], s, scale, out, lse)
        outs.append(out.to(q.dtype))
        lses.append(lse)
    acc = _acc(q.dtype)
    dblocks = [torch.zeros(blk.shape, dtype=acc, device=blk.device) for _, _, blk in inputs]
    dqs, text_grads = [], []
    for r in range(cp):
        kt, vt, _ = inputs[r]
        dq, tg = torch.zeros(qs[r].shape, dtype=acc, device=q.device), None
        for s in range(cp):
            owner = (r - s) % cp
            got = ring_backward_step(douts[r], qs[r], inputs[owner][2], kt, vt, text_keep, lay, ranks[r], s,
                                     outs[r], lses[r], scale, dq, dblocks[owner])  # fmt: skip
            tg = got if got is not None else tg
        dqs.append(dq)
        text_grads.append(tg)
    grads = [ring_grads(qs[r], ks[r], vs[r], dqs[r], dblocks[r], text_grads[r], *inputs[r][:2], lay) for r in range(cp)]
    out = _assemble(outs, lay, text_sum=False)
    return (out, *(_assemble([g[i] for g in grads], lay, text_sum=True) for i in range(3)))


def full_keep(text_keep, text_len: int, text_first: bool, n: int):
    """The boolean key mask (B, 1, 1, T + N) of the full sequence, or None."""
    if text_keep is None:
        return None
    video = torch.ones(*text_keep.shape[:-1], n, dtype=torch.bool, device=text_keep.device)
    return torch.cat([text_keep, video] if text_first else [video, text_keep], dim=-1)


def sdpa_reference(q, k, v, dout, keep, scale: float, dtype: torch.dtype):
    """(out, dq, dk, dv) of one full-sequence F.scaled_dot_product_attention in `dtype`, autograd backward."""
    qr, kr, vr = (x.detach().to(dtype).requires_grad_() for x in (q, k, v))
    out = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=keep, scale=scale)
    out.backward(dout.to(dtype))
    return out.detach(), qr.grad, kr.grad, vr.grad


class OpRecorder(TorchDispatchMode):
    """Counts the aten ops that run (to name the attention kernels a run used)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def attention_kernels(self) -> list[str]:
        names = sorted(op for op in self.ops if "scaled_dot_product" in op)
        return names + (["math (logsumexp of materialised scores)"] if self.ops.get("logsumexp") else [])


def _inputs(shape: dict, device, dtype, masked: bool, seed: int = 0):
    """q, k, v, dout (1, H, T + N, D) with text first, and a text keep-mask (the last half of the text padded,
    as HunyuanVideo's prompts are) or None."""
    g = torch.Generator(device=device).manual_seed(seed)
    size = (1, shape["heads"], shape["text"] + shape["video"], shape["head_dim"])
    q, k, v, dout = (torch.randn(size, generator=g, device=device, dtype=dtype) for _ in range(4))
    keep = None
    if masked:
        keep = torch.ones(1, 1, 1, shape["text"], dtype=torch.bool, device=device)
        keep[..., shape["text"] // 2 :] = False
    return q, k, v, dout, keep


def _timed(fn, device) -> tuple[object, float, float]:
    """(result, seconds, peak GiB above what was allocated before) of fn() on `device`."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    t0 = time.perf_counter()
    res = fn()
    if cuda:
        torch.cuda.synchronize()
    secs = time.perf_counter() - t0
    peak = (torch.cuda.max_memory_allocated() - base) / GIB if cuda else None
    return res, secs, peak


def _errors(got, want) -> dict:
    """Max abs error of out, dq, dk, dv against the reference, and the reference's max abs value."""
    names = ("out", "dq", "dk", "dv")
    return {n: {"max_abs_err": (g.float() - w.float()).abs().max().item(), "ref_max_abs": w.abs().max().item()}
            for n, g, w in zip(names, got, want)}  # fmt: skip


def run_case(shape: dict, device, dtype, ref_dtype, masked: bool) -> dict:
    """One check: the one-process ring and full SDPA (both in `dtype`) against full SDPA in `ref_dtype`, with the
    kernels the ring ran, its time and peak memory (CUDA), and the score bytes the math kernel would hold."""
    device = torch.device(device)
    q, k, v, dout, keep = _inputs(shape, device, dtype, masked)
    t, cp, scale = shape["text"], shape["cp"], shape["head_dim"] ** -0.5
    mask = full_keep(keep, t, True, shape["video"])

    def ring():
        return ring_one_process(q, k, v, dout, t, True, keep, cp, scale)

    with OpRecorder() as rec:  # also the warm-up
        ring()
    got, ring_s, ring_peak = _timed(ring, device)
    base, sdpa_s, sdpa_peak = _timed(lambda: sdpa_reference(q, k, v, dout, mask, scale, dtype), device)
    ref = sdpa_reference(q, k, v, dout, mask, scale, ref_dtype)
    ring_err, base_err = _errors(got, ref), _errors(base, ref)
    eps = torch.finfo(dtype).eps
    ok = all(ring_err[n]["max_abs_err"] <= 4 * base_err[n]["max_abs_err"] + 2 * eps * ring_err[n]["ref_max_abs"]
             for n in ring_err)  # fmt: skip
    n_local = math.ceil(shape["video"] / cp)
    scores = q.shape[0] * q.shape[1] * (t + n_local) ** 2 * 4  # step 0: local queries x (text + own block) keys
    return {"shape": {**shape, "dtype": str(dtype).removeprefix("torch."), "text_mask": masked},
            "reference": f"full F.scaled_dot_product_attention in {str(ref_dtype).removeprefix('torch.')}",
            "kernels": rec.attention_kernels(), "ring_err": ring_err, "sdpa_err": base_err, "ok": ok,
            "ring_fwd_bwd_s": ring_s, "sdpa_fwd_bwd_s": sdpa_s, "ring_peak_gib": ring_peak,
            "sdpa_peak_gib": sdpa_peak, "math_scores_gib_per_block": scores / GIB}  # fmt: skip


def suite_check(cpu: bool) -> dict:
    """The GPU suite's ring check: CogVideoX-5B, cp 2, bf16 on CUDA (reference float32), without a text mask
    (flash at every step) and with one (the step with text runs the memory-efficient kernel); with `cpu` the
    tiny shape in float32 (reference float64) on the CPU kernels."""
    if cpu:
        shape, device, dtype, ref = TINY, "cpu", torch.float32, torch.float64
    else:
        shape, device, dtype, ref = COGVIDEOX_5B, "cuda", torch.bfloat16, torch.float32
    t0 = time.perf_counter()
    cases = [run_case(shape, device, dtype, ref, masked) for masked in (False, True)]
    info = {"device": "CPU" if cpu else torch.cuda.get_device_name(0), "torch": torch.__version__,
            "cuda": torch.version.cuda}  # fmt: skip
    note = ("cp ranks run one after another in this process (ring_one_process); peak = CUDA peak allocated above "
            "the inputs during the ring's forward + backward of all ranks")  # fmt: skip
    return {"check": "ring-attention", "ok": all(c["ok"] for c in cases), "cases": cases, **info, "note": note,
            "seconds": time.perf_counter() - t0}  # fmt: skip
