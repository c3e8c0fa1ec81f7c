"""Context parallelism: the video token sequence split over the `cp` mesh dim.

torch's `context_parallel` cannot serve here (no DTensor strategy for the CPU
attention kernels, and not every attention layout these models use), so ptrain
splits the sequence itself, with forward hooks placed by each model's `CPPlan`:

* the module that produces the video tokens (patch embedding) returns only this
  rank's contiguous chunk of them, zero-padded so that every rank holds
  `ceil(N / cp)` tokens; rotary embeddings (and per-token timesteps) are sliced
  the same way;
* the module that produces the output tokens (`proj_out`) gathers the chunks
  back and drops the padding, so the loss sees the full prediction;
* the sequence-parallel attention modules (self-attention and joint text+video
  attention; never cross-attention to text, whose keys are not split) get a
  wrapped processor. The model's own processor still does projections, norms
  and rotary embeddings; only its `scaled_dot_product_attention` call is
  replaced by Ulysses (all-to-all heads <-> sequence) or ring attention (K/V
  blocks passed around the ring, partial results merged by log-sum-exp), both
  exact in forward and backward. Text tokens of joint attention are replicated
  on every cp rank; padded video keys are masked out.

Gradient bookkeeping: every cp rank computes the same loss from the gathered
output, whose backward keeps only the local chunk's gradient, and replicated
computations (text tokens, embeddings) receive the partial gradient of their
local consumers. The cp ranks' gradients therefore *sum* to the full gradient;
the trainer multiplies the loss by `cp` because FSDP averages over
`dp_shard x cp`.
"""

from __future__ import annotations

import contextlib
import fnmatch
import inspect
import logging
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

log = logging.getLogger(__name__)

CP_MODES = ("ulysses", "ring")


@dataclass(frozen=True)
class CPPlan:
    """Where a model's video token sequence is split and gathered (module paths relative to the transformer)."""

    #: Module whose output holds the video tokens, and its layout: "tokens" = (B, N, C);
    #: "text_prefix" = (B, T + N, C) with T text tokens first (their count is the first input's length);
    #: "grid" = (B, C, F, H, W), flattened to tokens by the model right after.
    split: str
    split_kind: str
    #: Modules whose outputs are tuples of per-token rotary tensors, with their token dim.
    rotary: tuple[tuple[str, int], ...] = ()
    #: Transformer forward kwargs that are per-token (rotary tuples or tensors), with their token dim.
    token_kwargs: tuple[tuple[str, int], ...] = ()
    #: Module whose output (B, N_local, C) is gathered back to (B, N, C).
    gather: str = "proj_out"
    #: fnmatch patterns of the attention modules whose queries and keys are the (split) video tokens.
    attention: tuple[str, ...] = ()
    #: Where text tokens sit in those attentions' sequences: None (self-attention only), "prefix", "suffix".
    text: str | None = None


@dataclass
class CPGroup:
    """The cp process group of this rank plus the per-forward sequence facts the hooks share."""

    group: dist.ProcessGroup
    rank: int
    size: int
    global_ranks: list[int]
    mode: str
    #: Global video token count of the current forward (set by the split hook).
    n_valid: int = 0
    warned: set = field(default_factory=set)

    @classmethod
    def from_mesh(cls, cp_mesh, mode: str) -> CPGroup:
        if mode not in CP_MODES:
            raise ValueError(f"--cp_mode {mode!r}: choose one of {', '.join(CP_MODES)}")
        group = cp_mesh.get_group()
        ranks = [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]
        return cls(group, dist.get_rank(group), len(ranks), ranks, mode)

    def local_len(self, n: int) -> int:
        return math.ceil(n / self.size)


# --- collectives with exact backward -----------------------------------------------------------------------------
class _AllToAll(torch.autograd.Function):
    """Equal-split all-to-all along dim 0 (chunk i goes to cp rank i); its own inverse, so also its backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cpg: CPGroup) -> torch.Tensor:
        ctx.cpg = cpg
        x = x.contiguous()
        out = torch.empty_like(x)
        dist.all_to_all_single(out, x, group=cpg.group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return _AllToAll.apply(grad, ctx.cpg), None


class _AllGather(torch.autograd.Function):
    """All-gather equal chunks along `dim`.

    Backward: with `reduce_grad=False` every rank's consumer is assumed to hold the same gradient (the gathered
    model output, from which every cp rank computes the same loss), so each rank keeps its own slice; with
    `reduce_grad=True` consumers hold partial gradients, which are summed first.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, dim: int, cpg: CPGroup, reduce_grad: bool) -> torch.Tensor:
        ctx.dim, ctx.cpg, ctx.reduce_grad, ctx.n = dim, cpg, reduce_grad, x.shape[dim]
        parts = [torch.empty_like(x.contiguous()) for _ in range(cpg.size)]
        dist.all_gather(parts, x.contiguous(), group=cpg.group)
        return torch.cat(parts, dim=dim)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if ctx.reduce_grad:
            grad = grad.contiguous()
            dist.all_reduce(grad, group=ctx.cpg.group)
        return grad.narrow(ctx.dim, ctx.cpg.rank * ctx.n, ctx.n), None, None, None


def shard_tokens(x: torch.Tensor, dim: int, cpg: CPGroup) -> torch.Tensor:
    """This rank's contiguous chunk of `x` along `dim`, zero-padded to ceil(N / cp) tokens."""
    n = x.shape[dim]
    local = cpg.local_len(n)
    pad = local * cpg.size - n
    if pad:
        shape = list(x.shape)
        shape[dim] = pad
        x = torch.cat([x, x.new_zeros(shape)], dim=dim)
    return x.narrow(dim, cpg.rank * local, local)


def gather_tokens(x: torch.Tensor, dim: int, n_valid: int, cpg: CPGroup) -> torch.Tensor:
    full = _AllGather.apply(x, dim, cpg, False)
    return full.narrow(dim, 0, n_valid)


# --- attention kernels returning log-sum-exp (ring) ---------------------------------------------------------------
#: What runs one ring block (see ring_kernel), by name, for the log line.
RING_KERNELS = {
    "cpu": "aten._scaled_dot_product_flash_attention_for_cpu",
    "flash": "aten._scaled_dot_product_flash_attention (FlashAttention-2)",
    "efficient": "aten._scaled_dot_product_efficient_attention (memory-efficient, additive mask)",
    "math": "ptrain's float32 math kernel (scores in memory)",
}
_EFFICIENT_LSE_ALIGN = 1 if torch.version.hip else 32  # the CUDA mem-efficient kernel pads its lse along the queries
_forced_kernel: list[str] = []  # forced_ring_kernel's stack
_logged_kernels: set[str] = set()


@contextlib.contextmanager
def forced_ring_kernel(name: str):
    """Run every ring block through kernel `name` (tests and checks: the math kernel as the reference)."""
    if name not in RING_KERNELS:
        raise ValueError(f"ring kernel {name!r}: choose one of {', '.join(RING_KERNELS)}")
    _forced_kernel.append(name)
    try:
        yield
    finally:
        _forced_kernel.pop()


def ring_kernel(q, k, v, mask) -> str:
    """The kernel that runs one ring block: "cpu", "flash", "efficient" or "math" (keys of RING_KERNELS).

    CPU tensors: the CPU flash op. CUDA: FlashAttention when there is no mask and it takes the inputs (fp16 /
    bf16, one head dim for q, k, v that is a multiple of 8 up to 256); else the memory-efficient kernel, which
    takes the additive mask and float32 too (head dim a multiple of 8, or 4 in float32); else (float64, other
    head dims, other devices) the math kernel, which holds the block's float32 scores. On a real GPU torch's own
    admission checks must pass as well (GPU generation; backends switched off with torch.backends.cuda); fake
    tensors (the planner, tests without a GPU) are decided by the rules above alone.
    """
    if _forced_kernel:
        return _forced_kernel[-1]
    if q.device.type == "cpu":
        return "cpu"
    if q.device.type != "cuda":
        return "math"
    d = q.shape[-1]
    same = k.shape[-1] == d and v.shape[-1] == d
    half = q.dtype in (torch.float16, torch.bfloat16)
    if mask is None and half and same and d % 8 == 0 and d <= 256 and _admitted("flash", q, k, v, None):
        return "flash"
    efficient = (half or q.dtype == torch.float32) and same and d % (8 if half else 4) == 0
    return "efficient" if efficient and _admitted("efficient", q, k, v, mask) else "math"


def _admitted(kernel: str, q, k, v, mask) -> bool:
    """torch's own check that `kernel` runs these inputs on this GPU (True for fake tensors)."""
    from torch._subclasses.fake_tensor import is_fake

    if not torch.cuda.is_available() or is_fake(q):
        return True
    params = torch.backends.cuda.SDPAParams(q, k, v, mask, 0.0, False, False)
    if kernel == "flash":
        return torch.backends.cuda.can_use_flash_attention(params)
    return torch.backends.cuda.can_use_efficient_attention(params)


def _note_kernel(kernel: str, q) -> None:
    """Log once per process which kernel runs ring blocks (a warning for the math kernel off the CPU)."""
    if kernel in _logged_kernels or _forced_kernel:
        return
    _logged_kernels.add(kernel)
    if kernel == "math" and q.device.type != "cpu":
        log.warning(
            "--cp_mode ring on %s runs ptrain's math attention kernel for %s inputs with head dim %d: it holds each "
            "block's float32 scores (B x heads x local tokens x block tokens) in memory; the fused kernels take "
            "fp16/bf16 (flash, memory-efficient) and float32 (memory-efficient) with head dims a multiple of 8",
            q.device.type, q.dtype, q.shape[-1],
        )  # fmt: skip
    else:
        log.info("ring attention blocks run %s", RING_KERNELS[kernel])


def _acc(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float32, or float64 for float64 inputs."""
    return torch.promote_types(dtype, torch.float32)


def _math_fwd(q, k, v, mask, scale):
    a = _acc(q.dtype)
    s = (q.to(a) @ k.to(a).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(a)
    lse = torch.logsumexp(s, dim=-1)
    out = torch.exp(s - lse.unsqueeze(-1)) @ v.to(a)
    return out.to(q.dtype), lse


def _math_bwd(dout, q, k, v, out, lse, mask, scale):
    a = _acc(q.dtype)
    s = (q.to(a) @ k.to(a).transpose(-1, -2)) * scale
    if mask is not None:
        s = s + mask.to(a)
    p = torch.exp(s - lse.unsqueeze(-1))
    dout = dout.to(a)
    dv = p.transpose(-1, -2) @ dout
    dp = dout @ v.to(a).transpose(-1, -2)
    ds = p * (dp - (dout * out.to(a)).sum(-1, keepdim=True))
    dq = (ds @ k.to(a)) * scale
    dk = (ds.transpose(-1, -2) @ q.to(a)) * scale
    return dq, dk, dv


def _contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    """The fused CUDA kernels need a unit stride along the head dim (any other strides are fine). A clone, not
    .contiguous(): copy_ of fake CUDA tensors fails on a CPU-only torch, and tests run these paths on them."""
    return x if x.stride(-1) == 1 else _contiguous(x)


def _bmhk(x: torch.Tensor) -> torch.Tensor:
    """(B, H, M, D) with the memory layout of a contiguous (B, M, H, D): the memory-efficient backward reads the
    output it is given with that row stride (heads x head dim) whatever its strides say, as its forward writes it;
    a merged ring output need not be laid out so."""
    t = x.transpose(1, 2)
    return x if t.is_contiguous() else t.clone(memory_format=torch.contiguous_format).transpose(1, 2)


def _efficient_bias(mask, q, k):
    """The additive mask (B, 1, 1, Lk) as the memory-efficient kernel takes it: q's dtype, rows 16-aligned in
    memory (its alignment check on the bias strides), expanded to (B, heads, Lq, Lk) without copies."""
    if mask is None:
        return None
    lk = k.shape[2]
    bias = F.pad(mask.to(q.dtype), (0, -lk % 16)).narrow(-1, 0, lk)
    return bias.expand(q.shape[0], q.shape[1], q.shape[2], lk)


def _efficient_lse(lse: torch.Tensor) -> torch.Tensor:
    """(B, H, Lq) lse in the layout the memory-efficient forward returns it: padded along Lq to its alignment."""
    return F.pad(lse.to(torch.float32), (0, -lse.shape[-1] % _EFFICIENT_LSE_ALIGN))


def _block_fwd(q, k, v, mask, scale):
    """(out, lse) of softmax(q k^T * scale + mask) v; lse in float32 (float64 for float64), shape (B, H, Lq)."""
    kernel = ring_kernel(q, k, v, mask)
    _note_kernel(kernel, q)
    if kernel == "cpu":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, False, attn_mask=None if mask is None else mask.to(q.dtype), scale=scale
        )
        return out, lse.to(_acc(q.dtype))
    if kernel == "math":
        return _math_fwd(q, k, v, mask, scale)
    q, k, v = (_last_contiguous(x) for x in (q, k, v))
    if kernel == "flash":
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)[:2]
        return out, lse
    bias = _efficient_bias(mask, q, k)
    out, lse = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, bias, True, 0.0, False, scale=scale)[:2]
    return out, lse.narrow(-1, 0, q.shape[2])  # drop the kernel's padding rows


def _block_bwd(dout, q, k, v, out, lse, mask, scale):
    """Gradients of one key block's share, given the *merged* output and log-sum-exp (flash-attention identity)."""
    kernel = ring_kernel(q, k, v, mask)
    if kernel == "cpu":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward(
            dout.contiguous(), q, k, v, out, lse.to(q.dtype) if q.dtype == torch.float64 else lse, 0.0, False,
            attn_mask=None if mask is None else mask.to(q.dtype), scale=scale,
        )  # fmt: skip
    if kernel == "math":
        return _math_bwd(dout, q, k, v, out, lse, mask, scale)
    dout, q, k, v, out = (_last_contiguous(x) for x in (dout, q, k, v, out))
    if kernel == "flash":  # dropout 0: the kernels never read the RNG state, so empty tensors stand in for it
        rng = torch.empty(0, dtype=torch.uint64, device=q.device)
        return torch.ops.aten._scaled_dot_product_flash_attention_backward(
            dout, q, k, v, out, _contiguous(lse), None, None, q.shape[2], k.shape[2], 0.0, False, rng, rng,
            scale=scale,
        )  # fmt: skip
    rng = torch.empty(0, dtype=torch.int64, device=q.device)
    dq, dk, dv, _ = torch.ops.aten._scaled_dot_product_efficient_attention_backward(
        dout, q, k, v, _efficient_bias(mask, q, k), _bmhk(out), _efficient_lse(lse), rng, rng, 0.0,
        [True, True, True, False], False, scale=scale,
    )  # fmt: skip
    return dq, dk, dv


def merge_block(out, lse, block_out, block_lse):
    """Fold one key block's (output, lse) into the running merge: returns the new (out, lse), out in the
    accumulation dtype. `out` None starts the merge. softmax over the union of the blocks' keys =
    sum_b exp(lse_b - lse) * out_b with lse = logaddexp over the blocks."""
    acc = _acc(block_out.dtype)
    if out is None:
        return block_out.to(acc), block_lse
    new = torch.logaddexp(lse, block_lse)
    out = out * torch.exp(lse - new).unsqueeze(-1) + block_out.to(acc) * torch.exp(block_lse - new).unsqueeze(-1)
    return out, new


def _ring_exchange(send: torch.Tensor, cpg: CPGroup) -> tuple[torch.Tensor, list]:
    """Start sending `send` to the next cp rank and receiving the previous rank's tensor of the same shape."""
    recv = torch.empty_like(send)
    nxt = cpg.global_ranks[(cpg.rank + 1) % cpg.size]
    prv = cpg.global_ranks[(cpg.rank - 1) % cpg.size]
    ops = [dist.P2POp(dist.isend, send, nxt, cpg.group), dist.P2POp(dist.irecv, recv, prv, cpg.group)]
    return recv, dist.batch_isend_irecv(ops)


@dataclass(frozen=True)
class _Layout:
    """The sequence of one sequence-parallel attention call on this rank."""

    text_len: int  # replicated text tokens
    text_first: bool  # text before the video tokens (else after)
    n_local: int  # video tokens held here (padded length)
    n_valid: int  # global video tokens (without padding)

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(text, video) parts of (B, H, L, D) (narrow, not indexing: this also runs on fake CUDA tensors)."""
        t, n = self.text_len, x.shape[2] - self.text_len
        if self.text_first:
            return x.narrow(2, 0, t), x.narrow(2, t, n)
        return x.narrow(2, n, t), x.narrow(2, 0, n)

    def join(self, text: torch.Tensor, video: torch.Tensor) -> torch.Tensor:
        if not self.text_len:
            return video
        return torch.cat([text, video] if self.text_first else [video, text], dim=2)

    def valid_in_block(self, owner: int) -> int:
        """Valid (unpadded) video tokens in cp rank `owner`'s chunk."""
        return max(0, min(self.n_local, self.n_valid - owner * self.n_local))


def _additive(keep: torch.Tensor | None, dtype) -> torch.Tensor | None:
    """bool key mask (B, 1, 1, Lk) -> additive float mask, or None."""
    if keep is None:
        return None
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill(keep.logical_not(), float("-inf"))


# --- the ring: per-step work shared by the autograd Function and the one-process check (ring_check.py) ----------------
def ring_inputs(k, v, lay: _Layout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(text keys, text values, this rank's video K|V block): the block is what travels around the ring."""
    kt, kv_k = lay.split(k)
    vt, kv_v = lay.split(v)
    return kt, vt, torch.cat([kv_k, kv_v], dim=-1).contiguous()


def _ring_keys(block, d, kt, vt, text_keep, lay: _Layout, cpg: CPGroup, step: int, dtype):
    """Keys/values/mask visited at ring step `step`: the video block of rank (rank - step), plus text at step 0."""
    owner = (cpg.rank - step) % cpg.size
    valid = lay.valid_in_block(owner)
    bk, bv = block.narrow(2, 0, valid).narrow(-1, 0, d), block.narrow(2, 0, valid).narrow(-1, d, d)
    if step == 0 and lay.text_len:
        bk, bv = torch.cat([kt, bk], dim=2), torch.cat([vt, bv], dim=2)
        if text_keep is not None:
            ones = torch.ones(*text_keep.shape[:-1], valid, dtype=torch.bool, device=text_keep.device)
            return bk, bv, _additive(torch.cat([text_keep, ones], dim=-1), dtype)
        return bk, bv, None
    if valid == 0:
        return None, None, None
    return bk, bv, None


def ring_forward_step(q, block, kt, vt, text_keep, lay: _Layout, cpg: CPGroup, step: int, scale, out, lse):
    """Attend `q` to the keys of ring step `step` (`block` is the K|V block visiting now) and merge the result
    into the running (out, lse); returns the new pair (unchanged when the block holds only padding)."""
    bk, bv, mask = _ring_keys(block, q.shape[-1], kt, vt, text_keep, lay, cpg, step, q.dtype)
    if bk is None:
        return out, lse
    o, l = _block_fwd(q, bk, bv, mask, scale)
    return merge_block(out, lse, o, l)


def ring_backward_step(dout, q, block, kt, vt, text_keep, lay: _Layout, cpg: CPGroup, step: int, out, lse, scale,
                       dq, dblock):  # fmt: skip
    """Gradients of ring step `step` from the merged (out, lse): added in place to `dq` and to `dblock` (the
    gradient travelling with `block`); returns the text keys' and values' gradients at step 0, else None."""
    d = q.shape[-1]
    bk, bv, mask = _ring_keys(block, d, kt, vt, text_keep, lay, cpg, step, q.dtype)
    if bk is None:
        return None
    gq, gk, gv = _block_bwd(dout, q, bk, bv, out, lse, mask, scale)
    dq.add_(gq)
    text = None
    if step == 0 and lay.text_len:
        t = lay.text_len
        text = gk.narrow(2, 0, t), gv.narrow(2, 0, t)
        gk, gv = gk.narrow(2, t, gk.shape[2] - t), gv.narrow(2, t, gv.shape[2] - t)
    rows = dblock.narrow(2, 0, gk.shape[2])
    rows.narrow(-1, 0, d).add_(gk)
    rows.narrow(-1, d, d).add_(gv)
    return text


def ring_grads(q, k, v, dq, dblock, text_grads, kt, vt, lay: _Layout):
    """(dq, dk, dv) in the inputs' dtypes from the accumulators of the backward loop (dblock back with its owner)."""
    d = q.shape[-1]
    acc = dq.dtype
    dk, dv = dblock.narrow(-1, 0, d), dblock.narrow(-1, d, d)
    if lay.text_len:
        dkt, dvt = text_grads if text_grads is not None else (torch.zeros_like(kt), torch.zeros_like(vt))
        dk, dv = lay.join(dkt.to(acc), dk), lay.join(dvt.to(acc), dv)
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


class _RingAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, text_keep, lay: _Layout, cpg: CPGroup, scale: float):
        kt, vt, block = ring_inputs(k, v, lay)
        out = lse = None
        for s in range(cpg.size):
            pending = None
            if s < cpg.size - 1:
                nxt_block, pending = _ring_exchange(block, cpg)
            out, lse = ring_forward_step(q, block, kt, vt, text_keep, lay, cpg, s, scale, out, lse)
            if pending is not None:
                for w in pending:
                    w.wait()
                block = nxt_block
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse, text_keep)
        ctx.lay, ctx.cpg, ctx.scale = lay, cpg, scale
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse, text_keep = ctx.saved_tensors
        lay, cpg, scale = ctx.lay, ctx.cpg, ctx.scale
        kt, vt, block = ring_inputs(k, v, lay)
        acc = _acc(q.dtype)
        dblock = torch.zeros(block.shape, dtype=acc, device=block.device)  # travels with its block
        dq = torch.zeros(q.shape, dtype=acc, device=q.device)
        text_grads = None
        for s in range(cpg.size):
            got = ring_backward_step(dout, q, block, kt, vt, text_keep, lay, cpg, s, out, lse, scale, dq, dblock)
            text_grads = got if got is not None else text_grads
            # Pass the block and its gradient on; after cp hops each gradient is back with its owner.
            if cpg.size == 1:
                break
            if s < cpg.size - 1:
                nxt_block, w1 = _ring_exchange(block, cpg)
            nxt_grad, w2 = _ring_exchange(dblock, cpg)
            for w in w2 + (w1 if s < cpg.size - 1 else []):
                w.wait()
            dblock = nxt_grad
            if s < cpg.size - 1:
                block = nxt_block
        return *ring_grads(q, k, v, dq, dblock, text_grads, kt, vt, lay), None, None, None, None


def ring_attention(q, k, v, text_keep, lay: _Layout, cpg: CPGroup, scale: float) -> torch.Tensor:
    """Exact attention with the video keys split over the cp ranks; each block runs ring_kernel's choice."""
    return _RingAttention.apply(q, k, v, text_keep, lay, cpg, scale)


def ulysses_attention(q, k, v, text_keep, lay: _Layout, cpg: CPGroup, scale: float) -> torch.Tensor:
    """All-to-all from (local tokens, all heads) to (all tokens, heads / cp); heads are zero-padded to a multiple."""
    b, h, _, d = q.shape
    p = cpg.size
    hl = math.ceil(h / p)
    hp = hl * p

    def to_seq(x):  # (B, Hp, n, D) -> (B, hl, P * n, D)
        n = x.shape[2]
        x = x.reshape(b, p, hl, n, d).permute(1, 0, 2, 3, 4)
        return _AllToAll.apply(x, cpg).permute(1, 2, 0, 3, 4).reshape(b, hl, p * n, d)

    def from_seq(y):  # (B, hl, P * n, D) -> (B, Hp, n, D)
        n = y.shape[2] // p
        y = y.reshape(b, hl, p, n, d).permute(2, 0, 1, 3, 4)
        return _AllToAll.apply(y, cpg).permute(1, 0, 2, 3, 4).reshape(b, hp, n, d)

    parts = []
    for x in (q, k, v):
        if hp != h:
            x = F.pad(x, (0, 0, 0, 0, 0, hp - h))
        text, video = lay.split(x)
        parts.append(lay.join(text[:, cpg.rank * hl : (cpg.rank + 1) * hl], to_seq(video)))
    n_full = lay.n_local * p
    keep = None
    if text_keep is not None or lay.n_valid < n_full:
        vid_keep = (torch.arange(n_full, device=q.device) < lay.n_valid).view(1, 1, 1, n_full)
        if text_keep is None:
            text_keep = torch.ones(1, 1, 1, lay.text_len, dtype=torch.bool, device=q.device)
        vid_keep = vid_keep.expand(*text_keep.shape[:-1], n_full)
        keep = torch.cat([text_keep, vid_keep] if lay.text_first else [vid_keep, text_keep], dim=-1)
    o = F.scaled_dot_product_attention(*parts, attn_mask=keep, scale=scale)
    full_lay = _Layout(lay.text_len, lay.text_first, n_full, lay.n_valid)
    text_o, video_o = full_lay.split(o)
    video_o = from_seq(video_o)[:, :h]
    if lay.text_len:
        text_o = _AllGather.apply(text_o, 1, cpg, True)[:, :h]
    return lay.join(text_o, video_o)


# --- the processor wrapper -------------------------------------------------------------------------------------------
class _SDPAMode(TorchFunctionMode):
    """Routes the wrapped processor's `scaled_dot_product_attention` call to the cp attention."""

    def __init__(self, cpg: CPGroup, lay: _Layout):
        super().__init__()
        self.cpg, self.lay = cpg, lay

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        sig = inspect.signature(_sdpa_reference).bind(*args, **kwargs)
        sig.apply_defaults()
        a = sig.arguments
        q, k, v, mask = a["query"], a["key"], a["value"], a["attn_mask"]
        if a["dropout_p"] or a["is_causal"] or a["enable_gqa"]:
            raise NotImplementedError("context parallel attention supports dropout_p=0, is_causal=False, no GQA")
        lay = self.lay
        expected = lay.text_len + lay.n_local
        if q.shape[2] != expected or k.shape[2] != expected:
            raise RuntimeError(
                f"context parallel attention expected {expected} local tokens ({lay.text_len} text + {lay.n_local} "
                f"video), got query {tuple(q.shape)} key {tuple(k.shape)}: this attention is not in the model's "
                "sequence layout (its CPPlan is wrong)"
            )
        text_keep = None
        if mask is not None:
            if mask.dtype != torch.bool or mask.shape[-2] != 1:
                raise NotImplementedError(
                    f"context parallel attention supports boolean key-padding masks (B, 1, 1, L); got {mask.dtype} "
                    f"{tuple(mask.shape)}"
                )
            mask = mask.reshape(mask.shape[0], 1, 1, mask.shape[-1])
            if lay.text_len:  # video keys are never masked by the model; only text padding matters
                t = lay.text_len
                text_keep = mask[..., :t] if lay.text_first else mask[..., mask.shape[-1] - t :]
        scale = a["scale"] if a["scale"] is not None else q.shape[-1] ** -0.5
        fn = ring_attention if self.cpg.mode == "ring" else ulysses_attention
        return fn(q, k, v, text_keep, lay, self.cpg, scale)


def _sdpa_reference(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """Signature of F.scaled_dot_product_attention (used to bind its arguments)."""


class CPAttnProcessor:
    """Runs the model's own processor with its SDPA call made sequence parallel (eager; compiled code around it)."""

    def __init__(self, inner, cpg: CPGroup, text: str | None):
        self.inner, self.cpg, self.text = inner, cpg, text
        self._sig = inspect.signature(inner.__call__)

    @torch.compiler.disable
    def _run(self, attn, *args, **kwargs):
        a = self._sig.bind(attn, *args, **kwargs).arguments
        video = a["hidden_states"]
        text = a.get("encoder_hidden_states")
        text_len = 0 if (self.text is None or text is None) else text.shape[1]
        lay = _Layout(text_len, self.text == "prefix", video.shape[1], self.cpg.n_valid)
        with _SDPAMode(self.cpg, lay):
            return self.inner(attn, *args, **kwargs)


def _wrap_processor(inner, cpg: CPGroup, text: str | None) -> CPAttnProcessor:
    """A CPAttnProcessor whose `__call__` has the inner processor's signature.

    diffusers' Attention.forward drops keyword arguments that the processor's `__call__` does not name
    (e.g. `image_rotary_emb`), so the wrapper must expose the same parameters.
    """

    def call(self, *args, **kwargs):
        return self._run(*args, **kwargs)

    inner_call = type(inner).__call__
    call.__signature__ = inspect.signature(inner_call)
    cls = type(f"CP{type(inner).__name__}", (CPAttnProcessor,), {"__call__": call})
    return cls(inner, cpg, text)


# --- applying a plan ---------------------------------------------------------------------------------------------------
def _split_output(kind: str, cpg: CPGroup):
    def hook(module, args, output):
        if kind == "tokens":
            cpg.n_valid = output.shape[1]
            return shard_tokens(output, 1, cpg)
        if kind == "text_prefix":
            t = args[0].shape[1]
            cpg.n_valid = output.shape[1] - t
            return torch.cat([output[:, :t], shard_tokens(output[:, t:], 1, cpg)], dim=1)
        if kind == "grid":  # (B, C, F, H, W): hand back a (B, C, 1, 1, n_local) grid the model flattens itself
            flat = output.flatten(2)
            cpg.n_valid = flat.shape[2]
            local = shard_tokens(flat, 2, cpg)
            return local.reshape(*local.shape[:2], 1, 1, local.shape[2])
        raise ValueError(f"unknown CPPlan split_kind {kind!r}")

    return hook


def _shard_any(x, dim: int, cpg: CPGroup):
    """Shard tensors (or tuples of them) along `dim`; tensors without that dim (e.g. timesteps (B,)) pass."""
    if isinstance(x, torch.Tensor):
        return shard_tokens(x, dim, cpg) if x.ndim > dim else x
    if isinstance(x, (tuple, list)):
        return type(x)(_shard_any(t, dim, cpg) for t in x)
    return x


def apply_context_parallel(transformer: nn.Module, plan: CPPlan, cp_mesh, mode: str) -> CPGroup:
    """Install `plan` on `transformer` (before activation checkpointing, compile and fully_shard)."""
    cpg = CPGroup.from_mesh(cp_mesh, mode)
    modules = dict(transformer.named_modules())

    def get(name: str) -> nn.Module:
        if name not in modules:
            raise ValueError(f"CPPlan names module {name!r}, which {type(transformer).__name__} does not have")
        return modules[name]

    get(plan.split).register_forward_hook(_split_output(plan.split_kind, cpg))
    for name, dim in plan.rotary:
        get(name).register_forward_hook(lambda m, a, out, dim=dim: _shard_any(out, dim, cpg))
    if plan.token_kwargs:

        def shard_kwargs(module, args, kwargs):
            for key, dim in plan.token_kwargs:
                if kwargs.get(key) is not None:
                    kwargs[key] = _shard_any(kwargs[key], dim, cpg)
            return args, kwargs

        transformer.register_forward_pre_hook(shard_kwargs, with_kwargs=True)
    get(plan.gather).register_forward_hook(lambda m, a, out: gather_tokens(out, 1, cpg.n_valid, cpg))
    wrapped = 0
    for name, module in modules.items():
        if any(fnmatch.fnmatchcase(name, pat) for pat in plan.attention):
            module.processor = _wrap_processor(module.processor, cpg, plan.text)
            wrapped += 1
    if not wrapped:
        raise ValueError(f"CPPlan attention patterns {plan.attention} match no module of {type(transformer).__name__}")
    log.info("context parallel (%s) over %d ranks: %d attention modules", mode, cpg.size, wrapped)
    return cpg
