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
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def round_to_bf16(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """float32 -> bfloat16, stochastically with `generator` (else to nearest): add 16 random bits below bfloat16's
    last place, then cut them off (a float's magnitude is its bit pattern's low 31 bits, so this rounds the
    magnitude up with probability equal to the cut-off fraction, whatever the sign)."""
    if generator is None:
        return x.to(torch.bfloat16)
    bits = x.contiguous().view(torch.int32)
    noise = torch.randint(0, 1 << 16, bits.shape, dtype=torch.int32, device=bits.device, generator=generator)
    return ((bits + noise) & -65536).view(torch.float32).to(torch.bfloat16)


class BF16AdamW(torch.optim.Optimizer):
    """AdamW (`decoupled`) or Adam (L2 penalty) whose update is computed in float32 per parameter and written back
    in the parameter's dtype: stochastically rounded for bfloat16 when `stochastic` (see the module docstring)."""

    def __init__(self, params, lr: float, betas=(0.9, 0.999), eps: float = 1e-8, weight_decay: float = 0.0,
                 decoupled: bool = True, stochastic: bool = True, seed: int = 0):  # fmt: skip
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay, "calls": 0})
        self.decoupled, self.stochastic, self.seed = decoupled, stochastic, seed
        #: set by the trainer before step(): a device float, 1.0 skips this step (no update, no step count)
        self.found_inf: torch.Tensor | None = None
        self._generators: dict[torch.device, torch.Generator] = {}

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
        found = self.found_inf
        for index, group in enumerate(self.param_groups):
            group["calls"] += 1  # in the checkpoint with the hyperparameters: a resume draws the same bits
            gen = None
            for p in group["params"]:
                if p.grad is None:
                    continue
                if gen is None:
                    gen = self._generator(_local(p).device, index, group["calls"])
                self._update(p, group, gen, found)
        return None

    def _update(self, p: torch.Tensor, group: dict, gen, found) -> None:
        st = self.state[p]
        if not st:
            st["step"] = torch.zeros((), dtype=torch.float32, device=_local(p).device)
            st["exp_avg"] = torch.zeros_like(p)
            st["exp_avg_sq"] = torch.zeros_like(p)
        x, m, v = _local(p), _local(st["exp_avg"]), _local(st["exp_avg_sq"])
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        ok = None if found is None else found.to(x.device) == 0
        step = st["step"].add_(1.0 if ok is None else ok.float())
        x32, g32, m32, v32 = x.float(), _local(p.grad).float(), m.float(), v.float()
        if wd and not self.decoupled:
            g32 = g32.add(x32, alpha=wd)
        new_m = m32.lerp(g32, 1 - b1)
        new_v = v32.mul(b2).addcmul_(g32, g32, value=1 - b2)
        bc1 = 1 - b1 ** step.clamp_min(1.0)
        bc2 = 1 - b2 ** step.clamp_min(1.0)
        new_x = x32.mul(1 - lr * wd) if (wd and self.decoupled) else x32.clone()
        new_x.addcdiv_(new_m / bc1, (new_v / bc2).sqrt_().add_(eps), value=-lr)
        if ok is not None:  # a skipped step leaves everything as it was
            new_x, new_m, new_v = torch.where(ok, new_x, x32), torch.where(ok, new_m, m32), torch.where(ok, new_v, v32)
        for dst, src in ((x, new_x), (m, new_m), (v, new_v)):
            dst.copy_(round_to_bf16(src, gen) if dst.dtype == torch.bfloat16 else src)
