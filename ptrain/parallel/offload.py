"""Activation offload (--activation_offload): what the transformer blocks save for the backward waits in pinned
host memory instead of on the GPU; the alternative to recomputing it (activation checkpointing).

Each block's forward runs under `torch.autograd.graph.saved_tensors_hooks`. The pack hook copies every saved
tensor of at least MIN_BYTES (activations; not parameters, which stay where they are) into a pinned host buffer on
a side stream and hands autograd a handle instead, so the device copy is freed as soon as the forward lets go of
it (`record_stream` keeps the allocator from reusing it before the copy is done). In the backward, the first
unpack in a block starts copying that block's tensors and the previous block's (the next the backward needs)
back on the side stream; each unpack makes the compute stream wait for its own copy only. The device then holds
about two blocks' saved tensors at a time in the backward instead of all of them.

The cost is the traffic: every saved byte crosses the host link twice per step, overlapped with compute as far as
the link keeps up (about 25 GB/s each way on PCIe 4.0 x16). Recompute costs about one more forward of the blocks
instead; which is faster depends on the model and the link: `benchmarks/gpu.py` has rows for both.

On the CPU (tests) the same path runs with plain host copies: the values round-trip exactly. The memory planner
runs it on fake tensors: a packed tensor leaves the device and comes back as a new one of its shape (two blocks'
worth at a time, as on a GPU), and the host bytes are reported beside the device peak.

Not combined with activation checkpointing (inside a checkpointed block nothing is saved but its inputs, and
choosing recompute or offload is the point), torch.compile (compiled blocks save tensors inside their own graph)
or --blocks_to_swap.
"""

from __future__ import annotations

import functools
import math

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

#: Saved tensors smaller than this stay on the device: the copies of small tensors cost more than they save.
MIN_BYTES = 1 << 20


class _Saved:
    """One offloaded storage (or a contiguous copy of one small view of a big storage): its host copy (on fake
    tensors only its size), and its device copy once brought back."""

    __slots__ = ("block", "device_copy", "host", "meta", "ready", "uses", "written")

    def __init__(self, block: int):
        self.block = block
        self.host = self.meta = self.written = self.device_copy = self.ready = None
        self.uses = 0  # unpacks still to come in this backward (one per op that saved a view of it)


class ActivationOffload:
    """The pack / unpack hooks around every block's forward (`blocks`: the flattened block lists)."""

    def __init__(self, block_lists: list[nn.ModuleList], device: torch.device):
        self.blocks = [b for bl in block_lists for b in bl]
        self.device = device
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        #: per block, the tensors its last forward offloaded (kept for the backward's prefetch)
        self.saved: list[list[_Saved]] = [[] for _ in self.blocks]
        #: bytes offloaded by the last forward (host memory in use until its backward is done)
        self.host_bytes = 0
        #: the current block forward's offloaded storages (by id) -> (a tensor holding it, its _Saved)
        self.packed: dict = {}
        #: the block whose saved tensors the backward is unpacking
        self.backward_block: int | None = None
        for i, block in enumerate(self.blocks):
            block.forward = self._wrap(i, block.forward)

    def _wrap(self, i: int, forward):
        @functools.wraps(forward)
        def run(*args, **kwargs):
            if not torch.is_grad_enabled():  # validation, no_grad: autograd saves nothing
                return forward(*args, **kwargs)
            if i == 0:
                self.host_bytes, self.backward_block = 0, None
            self.saved[i], self.packed = [], {}
            try:
                with torch.autograd.graph.saved_tensors_hooks(functools.partial(self._pack, i), self._unpack):
                    return forward(*args, **kwargs)
            finally:
                self.packed = {}  # the block's device tensors may go now (once their copies have read them)

        return run

    def _pack(self, i: int, t: torch.Tensor):
        nbytes = t.numel() * t.element_size()
        # What is not in the autograd graph stays: frozen weights (and views of them), RoPE tables, masks.
        if not (t.requires_grad or t.grad_fn is not None) or isinstance(t, nn.Parameter):
            return t
        if nbytes < MIN_BYTES or t.device.type != self.device.type:
            return t
        # Offload whole storages: views of one storage saved by several ops (a block input feeding q, k and v;
        # LoRA's input to both of its paths; q, k and v as chunks of one projection) cross the link once. The
        # block's forward holds the storages meanwhile, so their ids stay unique. A small view of a big storage
        # is copied alone.
        st = t.untyped_storage()
        whole = 2 * nbytes >= st.nbytes()
        key = id(st) if whole else ("view", t._cdata)
        view = (t.dtype, t.storage_offset(), tuple(t.shape), t.stride()) if whole else None
        if key in self.packed:
            s = self.packed[key][1]
            s.uses += 1
            return (s, view)
        s = _Saved(i)
        s.uses = 1
        self.packed[key] = (t, s)
        src = None if is_fake(t) else torch.empty(0, dtype=torch.uint8, device=t.device).set_(st) if whole else t
        if src is None:  # the planner (fake tensors): only the size leaves the device
            s.meta = ((st.nbytes(),), torch.uint8, t.device) if whole else (tuple(t.shape), t.dtype, t.device)
        elif self.cuda:
            s.host = torch.empty(src.shape, dtype=src.dtype, pin_memory=True)
            self.stream.wait_stream(torch.cuda.current_stream(t.device))
            with torch.cuda.stream(self.stream):
                s.host.copy_(src, non_blocking=True)
                s.written = torch.cuda.Event()
                s.written.record(self.stream)
            t.record_stream(self.stream)  # the device copy stays allocated until the copy has read it
        else:
            s.host = src.detach().clone(memory_format=torch.contiguous_format)
        self.host_bytes += s.host.nbytes if s.host is not None else math.prod(s.meta[0]) * s.meta[1].itemsize
        self.saved[i].append(s)
        return (s, view)

    def _release_after(self, i: int) -> None:
        """The backward has reached block `i`: the later blocks' backward is done. Device copies of theirs that
        no op unpacked (a view saved by an op whose backward did not need it) go now, not at the next forward."""
        for later in self.saved[i + 1 :]:
            for s in later:
                s.device_copy = s.ready = None

    def _bring(self, i: int) -> None:
        """Start bringing block `i`'s offloaded tensors back (those not back yet and still to be unpacked)."""
        for s in self.saved[i]:
            if s.device_copy is None and s.uses > 0:
                self._bring_one(s)

    def _bring_one(self, s: _Saved) -> None:
        if s.meta is not None:
            shape, dtype, device = s.meta
            s.device_copy = torch.empty(shape, dtype=dtype, device=device)
        elif self.cuda:
            with torch.cuda.stream(self.stream):
                self.stream.wait_event(s.written)
                s.device_copy = s.host.to(self.device, non_blocking=True)
                s.ready = torch.cuda.Event()
                s.ready.record(self.stream)
        else:
            s.device_copy = s.host

    def _unpack(self, handle):
        """`handle`: what _pack returned: a kept tensor, or (_Saved, view) with the view's (dtype, offset, size,
        stride) in the saved storage, None when the _Saved holds a contiguous copy of the tensor itself."""
        if not (isinstance(handle, tuple) and len(handle) == 2 and isinstance(handle[0], _Saved)):
            return handle
        s, view = handle
        if s.block != self.backward_block:  # the backward enters this block: the later ones are done
            self.backward_block = s.block
            self._release_after(s.block)
            self._bring(s.block)  # what the prefetch has not brought yet
            if s.block > 0:  # the backward runs the blocks in reverse: the previous one is next
                self._bring(s.block - 1)
        if s.device_copy is None:  # unpacked once more than packed (retain_graph, a second backward)
            self._bring_one(s)
        t = s.device_copy
        if s.ready is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(s.ready)
            t.record_stream(current)  # allocated on the side stream, used and freed on this one
            s.ready = None
        s.uses -= 1
        if s.uses <= 0:  # autograd holds the tensor from here on
            s.device_copy = None
        if view is None:
            return t
        dtype, offset, size, stride = view  # t: the storage's bytes (uint8)
        return t.view(dtype).as_strided(size, stride, offset)


def apply_activation_offload(block_lists: list[nn.ModuleList], device: torch.device) -> ActivationOffload:
    """--activation_offload on every block of `block_lists` (before FSDP2 wraps them)."""
    return ActivationOffload(block_lists, device)
