"""AdamW / Adam for bfloat16 weights without float32 master copies (--full_bf16).

A full fine-tune normally keeps float32 weights (4 bytes), float32 gradients (4) and two float32 moments (8):
16 bytes per parameter. With --full_bf16 the weights, their gradients and both moments are bfloat16: 8 bytes.
The cost is precision: bfloat16 has 8 significant bits, so an update smaller than half a unit in the last place
of a weight is lost when it is rounded to nearest, and with small learning rates most updates are (the weights
stop moving). Stochastic rounding (the default, `--bf16_rounding stochastic`) rounds up or down with the
probabilities that make the rounding exact on average, so small updates accumulate in expectation: the update is
computed in float32 from the bfloat16 values, then written back with random bits added below bfloat16's last
place and cut off (Gupta et al. 2015, "Deep learning with limited numerical precision"). Moments are rounded the
same way. Parameters kept in float32 (a model's `_keep_in_fp32_modules`) are updated exactly in float32.

The random bits come from a generator seeded by (--seed, rank, the optimizer's step count), which the checkpoint
keeps: a resumed run rounds as the uninterrupted one did (a different layout rounds differently). A step whose
loss or gradient norm is not finite is skipped on the device (`found_inf`, as torch's fused optimizers take it).
`benchmarks/bf16_drift.py` measures the drift against float32 master weights.

The update of one parameter is one elementwise function (`adamw_update`). Eager, it runs about 60 operations
that write about 200 bytes of float32 temporaries per parameter. On CUDA it runs compiled (torch.compile, dynamic
shapes: a graph per dtype combination and parameter rank, not per size): one fused kernel that reads the
bfloat16 weight, gradient and moments and the random bits (14 bytes per parameter) and writes the three back in
place (6), with no temporaries; the random bits are drawn before it, from the same generator as eager. Eager and
compiled round the same float32 values with the same bits, so they agree up to the float32 arithmetic's last bit.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

log = logging.getLogger("ptrain")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def draw_noise(n: int, device: torch.device, generator: torch.Generator) -> torch.Tensor:
    """Random bits for rounding a parameter of n elements, its first and its second moment: (3, n) int16, each
    element's low 16 bits uniform (`_round` masks them)."""
    return torch.randint(-(2**15), 2**15, (3, n), dtype=torch.int16, device=device, generator=generator)


def _round(x: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    """float32 -> bfloat16: stochastically with `noise` (int16 of x's shape), else to nearest. The 16 random bits
    are added below bfloat16's last place and cut off (a float's magnitude is its bit pattern's low 31 bits, so
    this rounds the magnitude up with probability equal to the cut-off fraction, whatever the sign)."""
    if noise is None:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32) + (noise.to(torch.int32) & 0xFFFF)
    return (bits & -65536).view(torch.float32).to(torch.bfloat16)


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> bfloat16, stochastically with bits from `generator` (else to nearest)."""
    if generator is None:
        return _round(x, None)
    return _round(x, draw_noise(x.numel(), x.device, generator)[0].view(x.shape))


def adamw_update(x, g, m, v, noise, step, found, lr, b1: float, b2: float, eps: float, wd: float,
                 decoupled: bool) -> None:  # fmt: skip
    """One AdamW (`decoupled`) / Adam step of one parameter, in place: weight `x`, gradient `g`, moments `m`, `v`
    (same shape), the step count `step` (0-d float32), `found` (0-d: non-zero skips the step: nothing changes, the
    count included), `noise` ((3, *x.shape) int16 for stochastic rounding, or None: to nearest). Computed in
    float32; written back in each tensor's dtype (bfloat16 rounded, float32 exact). No host sync."""
    ok = found == 0
    step.add_(ok.to(step.dtype))
    x32, g32, m32, v32 = x.float(), g.float(), m.float(), v.float()
    if wd and not decoupled:
        g32 = g32 + x32 * wd
    new_m = m32.lerp(g32, 1 - b1)
    new_v = v32 * b2 + g32 * g32 * (1 - b2)
    s = step.clamp_min(1.0)
    bc1, bc2 = 1 - b1**s, 1 - b2**s
    new_x = x32 * (1 - lr * wd) if (wd and decoupled) else x32
    new_x = new_x - lr * (new_m / bc1) / ((new_v / bc2).sqrt() + eps)
    new_x, new_m, new_v = torch.where(ok, new_x, x32), torch.where(ok, new_m, m32), torch.where(ok, new_v, v32)
    for i, (dst, src) in enumerate(((x, new_x), (m, new_m), (v, new_v))):
        dst.copy_(_round(src, None if noise is None else noise[i]) if dst.dtype == torch.bfloat16 else src)


_compiled_update = None


def compiled_update():
    """adamw_update under torch.compile, dynamic shapes (built on first use; one graph per dtype combination and
    parameter rank, whatever the sizes and the learning rate)."""
    global _compiled_update
    if _compiled_update is None:
        _compiled_update = torch.compile(adamw_update, dynamic=True)
    return _compiled_update


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (`decoupled`) or Adam (L2 penalty) whose update is computed in float32 per parameter and written back
    in the parameter's dtype: stochastically rounded for bfloat16 when `stochastic` (see the module docstring).

    `fused`: run the update compiled (one kernel per parameter); None: on CUDA. `planning` (the memory planner, on
    fake tensors, which torch.compile cannot take): with `fused`, allocate what the compiled update allocates (the
    random bits; it writes in place) instead of running it."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = True, stochastic: bool = True, seed: int = 0, fused: bool | None = None,
                 planning: bool = False):  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "calls": 0})
        self.decoupled, self.stochastic, self.seed = decoupled, stochastic, seed
        self.fused, self.planning = fused, planning
        #: set by the trainer before step(): a device float, 1.0 skips this step (no update, no step count)
        self.found_inf: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}
        self._zeros: dict[torch.device, torch.Tensor] = {}

    def _generator(self, device: torch.device, group: int, calls: int) -> torch.Generator | None:
        if not self.stochastic:
            return None
        if device not in self._generators:
            self._generators[device] = torch.Generator(device)
        rank = dist.get_rank() if dist.is_initialized() else 0
        key = (self.seed * 1_000_003 + rank) * 1_000_003 + calls * 101 + group
        return self._generators[device].manual_seed(key % (2**63))

    @torch.no_grad()
    def step(self, closure=None):
        for index, group in enumerate(self.param_groups):
            group["calls"] += 1  # in the checkpoint with the hyperparameters: a resume draws the same bits
            gen = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if gen is None:
                    gen = self._generator(_local(p).device, index, group["calls"])
                self._update(p, group, gen)
        return None

    def _update(self, p: torch.Tensor, group: dict, gen) -> None:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        x, g, m, v = _local(p), _local(p.grad), _local(st["exp_avg"]), _local(st["exp_avg_sq"])
        device = x.device
        found = self.found_inf
        if found is None:
            if device not in self._zeros:
                self._zeros[device] = torch.zeros((), device=device)
            found = self._zeros[device]
        found = found.to(device)
        noise = None
        if gen is not None and torch.bfloat16 in (x.dtype, m.dtype, v.dtype):
            noise = draw_noise(x.numel(), device, gen)
        fused = self.fused if self.fused is not None else device.type == "cuda"
        if fused and self.planning:  # the compiled update's allocations: the bits (above); in place otherwise
            st["step"].add_(found == 0)
            return
        (b1, b2), hyper = group["betas"], (group["eps"], group["weight_decay"], self.decoupled)
        if fused and all(t.is_contiguous() for t in (x, g, m, v)) and x.numel() > 1:
            flat = [t.view(-1) for t in (x, g, m, v)]
            # one graph per dtype combination and rank of the parameter (dynamo guards on a view's base): a few
            # more than torch's default limit of 8 recompiles, past which it would run eager silently
            try:
                with torch._dynamo.config.patch(recompile_limit=64):
                    compiled_update()(*flat, noise, st["step"], found, group["lr"], b1, b2, *hyper)
                return
            except Exception as e:  # noqa: BLE001 - a compile failure (raised before the update ran): go eager
                log.warning("--full_bf16: compiling the optimizer update failed (%s: %s); it runs eager from now "
                            "on (slower, the same result)", type(e).__name__, str(e).splitlines()[0][:300])  # fmt: skip
                self.fused = False
        shaped = None if noise is None else noise.view(3, *x.shape)
        adamw_update(x, g, m, v, shaped, st["step"], found, group["lr"], b1, b2, *hyper)
