"""Block swap (--blocks_to_swap N): the frozen weights of N transformer blocks live in (pinned) host memory and
visit the GPU only while their block runs: one process, LoRA (or any run whose swapped weights are frozen).

Each swapped block's frozen parameters get a host copy. A forward pre-hook on the block puts device copies in
(`param.data`), waiting for a copy started earlier on a side stream, and starts copying the next swapped block of
the current direction (forward: the next block; in backward, where activation checkpointing re-runs the blocks
in reverse, the previous one); the forward hook puts the host copies back. Autograd keeps what it saved of a
device copy until that block's backward, so releasing after the forward is safe with or without recompute, but
only activation checkpointing lets the copies go between forward and backward: without it the device holds every
block's weights again by the end of the forward (so --blocks_to_swap requires --gradient_checkpointing). The
cost is the host-to-device transfer of the swapped weights, twice per step (forward and recompute), overlapped
with the previous block's compute.

This is what musubi-tuner and diffusion-pipe call block swap (their flag name), built on torch's stream API.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

from ptrain.errors import ConfigError


def _inner(block: nn.Module) -> nn.Module:
    """The block inside an activation-checkpoint wrapper (hooks there fire in the forward and the recompute)."""
    return getattr(block, "_checkpoint_wrapped_module", block)


class BlockSwap:
    """Host-resident frozen weights of `count` blocks (the first ones of the flattened block lists)."""

    def __init__(self, block_lists: list[nn.ModuleList], count: int, device: torch.device, prepare=None):
        blocks = [_inner(b) for bl in block_lists for b in bl]
        if count > len(blocks):
            raise ConfigError(f"--blocks_to_swap {count}: the transformer has only {len(blocks)} blocks")
        self.device, self.blocks = device, blocks[:count]
        self.cuda = device.type == "cuda"
        self.stream = torch.cuda.Stream(device) if self.cuda else None
        #: per swapped block: [(param, host tensor)] of its frozen parameters
        self.host: list[list[tuple[nn.Parameter, torch.Tensor]]] = []
        self.pending: dict[int, tuple[object, list[torch.Tensor]]] = {}
        for i, block in enumerate(self.blocks):
            if prepare is not None:  # the memory planner: meta tensors materialised first (on its fake host device)
                prepare(block)
            pairs = []
            for p in block.parameters():
                if p.requires_grad:
                    continue
                host = p.data.to("cpu")
                if self.cuda:
                    host = host.pin_memory()
                p.data = host
                pairs.append((p, host))
            self.host.append(pairs)
            block.register_forward_pre_hook(lambda m, a, i=i: self.put_in(i))
            block.register_forward_hook(lambda m, a, o, i=i: self.put_back(i))

    @property
    def host_params(self) -> set[int]:
        """ids of the host-resident parameters (placement skips them)."""
        return {id(p) for pairs in self.host for p, _ in pairs}

    def host_bytes(self) -> int:
        return sum(h.numel() * h.element_size() for pairs in self.host for _, h in pairs)

    def _start(self, i: int) -> None:
        """Start copying block i's weights to the device (on the side stream on CUDA)."""
        if i in self.pending or not 0 <= i < len(self.blocks):
            return
        if self.cuda:  # host memory is only read: the copy need not wait for the compute stream
            with torch.cuda.stream(self.stream):
                copies = [h.to(self.device, non_blocking=True) for _, h in self.host[i]]
                event = self.stream.record_event()
        else:  # the CPU: a copy all the same, so the mechanism is the one the GPU runs
            copies, event = [h.clone() for _, h in self.host[i]], None
        self.pending[i] = (event, copies)

    def put_in(self, i: int) -> None:
        self._start(i)
        event, copies = self.pending.pop(i)
        if event is not None:
            current = torch.cuda.current_stream(self.device)
            current.wait_event(event)
            for t in copies:
                t.record_stream(current)  # the side stream's allocation is used on the compute stream
        for (p, _), t in zip(self.host[i], copies):
            p.data = t
        in_backward = torch._C._current_graph_task_id() != -1
        self._start(i - 1 if in_backward else i + 1)

    def put_back(self, i: int) -> None:
        for p, host in self.host[i]:
            p.data = host


def apply_block_swap(block_lists: list[nn.ModuleList], count: int, device: torch.device, prepare=None) -> BlockSwap:
    return BlockSwap(block_lists, count, device, prepare)


@contextlib.contextmanager
def streamed(module: nn.Module, device: torch.device):
    """`module` (frozen: a text encoder during validation) stays in host memory: each submodule that owns
    parameters or buffers gets device copies of them only while its own forward runs, so the device holds one
    layer at a time instead of the whole model. No prefetch: for a few prompt encodings per validation the
    transfer (about 9 GB for T5-XXL, under a second per prompt on PCIe) costs far less than the denoising. On the
    CPU the copies are clones: the mechanism the GPU runs."""
    owners = [m for m in module.modules() if m._parameters or m._buffers]
    host = {m: ({k: p.data for k, p in m._parameters.items() if p is not None},
                {k: b for k, b in m._buffers.items() if b is not None}) for m in owners}  # fmt: skip

    def copy(t: torch.Tensor) -> torch.Tensor:
        return t.to(device, non_blocking=True) if device.type != "cpu" else t.clone()

    def put_in(m, args):
        params, buffers = host[m]
        for k, t in params.items():
            m._parameters[k].data = copy(t)
        for k, t in buffers.items():
            m._buffers[k] = copy(t)

    def put_back(m, args, output):
        params, buffers = host[m]
        for k, t in params.items():
            m._parameters[k].data = t
        for k, t in buffers.items():
            m._buffers[k] = t

    handles = [h for m in owners for h in (m.register_forward_pre_hook(put_in), m.register_forward_hook(put_back))]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for m in owners:  # a forward that raised left its copies in
            put_back(m, None, None)
