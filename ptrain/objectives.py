"""Training objectives: per-sample noise, timesteps, noisy input, target and loss.

Every random draw of a sample comes from that sample's own generator, seeded by
(seed, global sample position). That is what makes the noise and timesteps of a
step independent of how the global batch is split over ranks.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3
from torch._subclasses.fake_tensor import is_fake

from ptrain.config import ConfigError, ObjectiveArgs


def sample_generators(seed: int, positions: list[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, global position in the sample stream)."""
    gens = []
    for pos in [int(p) for p in positions]:
        state = np.random.SeedSequence([seed, pos]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def to_device(x: torch.Tensor, device: torch.device | str, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host tensor (a per-sample draw, a mask) on `device` without making the host wait for the device.

    A copy from pageable host memory to a GPU synchronises the stream: the host would wait for all queued work
    at every such copy, and could never run ahead of the GPU. On CUDA the tensor is staged in pinned memory
    (torch's caching host allocator keeps the block until the copy is done) and copied with non_blocking=True.
    The draws stay on the host generators, so the values are the same on every device and layout. Fake tensors
    (the planner) cannot be pinned and are moved as they are."""
    device = torch.device(device)
    if device.type == "cuda" and x.device.type == "cpu":
        x = (x if is_fake(x) else x.pin_memory()).to(device, non_blocking=True)
    else:
        x = x.to(device)
    return x if dtype is None else x.to(dtype)


def sample_posterior(params: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """A draw from the VAE's diagonal Gaussian posterior (mean and log-variance on channels, as diffusers'
    DiagonalGaussianDistribution holds them: log-variance clamped to [-30, 20]), one generator per sample, in
    the parameters' dtype; the same values as that class's `sample(generator=...)`, whose host draw is copied
    to the device with a blocking copy (see to_device)."""
    mean, logvar = torch.chunk(params, 2, dim=1)
    std = torch.exp(0.5 * torch.clamp(logvar, -30.0, 20.0))
    noise = torch.cat([torch.randn((1, *mean.shape[1:]), generator=g, dtype=params.dtype) for g in generators])
    return mean + std * to_device(noise, params.device)


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of SD3/Flux/LTX flow matching: shift*s / (1 + (shift-1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


@dataclass
class Prepared:
    """One micro-batch ready for the transformer: its input, timesteps, target and per-sample loss weight."""

    noisy: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor
    weight: torch.Tensor
    #: 1 where the loss counts, 0 where it does not (e.g. a conditioning frame); broadcastable to the latents.
    loss_mask: torch.Tensor | None = None


def _noise_like(latents: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators])
    return to_device(noise, latents.device, latents.dtype)


def _stratified(generators: list[torch.Generator], strata) -> torch.Tensor:
    """u in [j/G, (j+1)/G) for sample j of a global batch of G (`strata` = (j tensor, G))."""
    index, size = strata
    r = torch.cat([torch.rand(1, generator=g) for g in generators])
    return (index.float() + r) / size


def _weighted_mse(
    pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over (unmasked) elements per sample, weighted, then mean over the micro-batch."""
    sq = (pred.float() - target.float()).pow(2)
    if mask is None:
        per_sample = sq.flatten(1).mean(1)
    else:
        mask = mask.to(sq).expand_as(sq)
        per_sample = (sq * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
    return (weight * per_sample).mean()


def density_icdf(args: ObjectiveArgs, q: torch.Tensor) -> torch.Tensor:
    """The pre-shift sigma of quantile `q` (uniform in [0, 1]) under --flow_weighting_scheme's density: the
    logit-normal's inverse CDF, the mode density's map (decreasing in q), or q itself (uniform)."""
    if args.flow_weighting_scheme == "logit_normal":
        normal = torch.distributions.Normal(args.flow_logit_mean, args.flow_logit_std)
        return torch.sigmoid(normal.icdf(q.clamp(1e-6, 1 - 1e-6)))
    if args.flow_weighting_scheme == "mode":
        return 1 - q - args.flow_mode_scale * (torch.cos(torch.pi * q / 2) ** 2 - 1 + q)
    return q


def quantile_range(args: ObjectiveArgs, shift: float, lo: float, hi: float) -> tuple[float, float]:
    """The quantiles (q_a, q_b) whose shifted sigmas are lo and hi: drawing q uniformly in between samples the
    density truncated to [lo, hi], its shape kept. The map q -> sigma is monotone (checked on a grid: the mode
    density with a large --flow_mode_scale is not); bisection in float64."""
    grid = torch.linspace(0, 1, 4097, dtype=torch.float64)
    values = shift_sigmas(density_icdf(args, grid).clamp(0.0, 1.0), shift)
    steps = values.diff()
    increasing = bool((steps >= 0).all())
    if not increasing and not bool((steps <= 0).all()):
        raise ConfigError(
            f"--min_timestep / --max_timestep: the {args.flow_weighting_scheme} density with --flow_mode_scale "
            f"{args.flow_mode_scale} does not map quantiles to timesteps monotonically; use a smaller scale"
        )

    def solve(target: float) -> float:
        a, b = 0.0, 1.0
        for _ in range(60):
            mid = (a + b) / 2
            v = float(shift_sigmas(density_icdf(args, torch.tensor([mid], dtype=torch.float64)).clamp(0, 1), shift))
            if (v < target) == increasing:
                a = mid
            else:
                b = mid
        return (a + b) / 2

    qa, qb = solve(lo), solve(hi)
    return (qa, qb) if qa <= qb else (qb, qa)


class FlowMatching:
    """Rectified flow: x_t = (1 - s) x_0 + s * noise, target = noise - x_0, timestep = 1000 s.

    With --min_timestep / --max_timestep (or a Wan 2.2 expert's range) every draw goes through the density's
    inverse CDF with its quantile drawn uniformly in the range's quantiles: the same density, truncated."""

    def __init__(self, args: ObjectiveArgs, shift: float = 1.0):
        self.args, self.shift = args, shift
        self.quantiles = None
        if args.restricted():
            lo, hi = args.timestep_range()
            self.quantiles = quantile_range(args, shift, lo / 1000.0, hi / 1000.0)

    def sample_sigmas(self, generators: list[torch.Generator], strata=None) -> torch.Tensor:
        a = self.args
        if strata is not None or self.quantiles is not None:
            if strata is not None:
                q = _stratified(generators, strata)
            else:
                q = torch.cat([torch.rand(1, generator=g) for g in generators])
            if self.quantiles is not None:
                qa, qb = self.quantiles
                q = (qa + q.double() * (qb - qa)).float()
            u = density_icdf(a, q)  # the inverse CDF keeps the strata
            return shift_sigmas(u.float().clamp(0.0, 1.0), self.shift)
        u = torch.cat(
            [
                compute_density_for_timestep_sampling(
                    weighting_scheme=a.flow_weighting_scheme,
                    batch_size=1,
                    logit_mean=a.flow_logit_mean,
                    logit_std=a.flow_logit_std,
                    mode_scale=a.flow_mode_scale,
                    generator=g,
                )
                for g in generators
            ]
        )
        return shift_sigmas(u.float().clamp(0.0, 1.0), self.shift)

    def prepare(self, latents: torch.Tensor, generators: list[torch.Generator], strata=None) -> Prepared:
        sigmas = self.sample_sigmas(generators, strata)  # on the host, then one non-blocking copy each
        noise = _noise_like(latents, generators)
        weight = compute_loss_weighting_for_sd3(self.args.flow_weighting_scheme, sigmas).float()
        weight = to_device(weight, latents.device)
        sigmas = to_device(sigmas, latents.device)
        s = sigmas.to(latents.dtype).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise
        return Prepared(noisy, sigmas * 1000.0, noise - latents, weight)

    def loss(self, pred: torch.Tensor, p: Prepared) -> torch.Tensor:
        return _weighted_mse(pred, p.target, p.weight, p.loss_mask)


class VPrediction:
    """DDPM-style v-prediction as diffusers' CogVideoX trainer does it: integer timesteps drawn uniformly,
    x_t from the scheduler's alphas (snr shift included), the v output turned into an x_0 estimate with
    `scheduler.get_velocity`, and an MSE against x_0 weighted by 1 / (1 - alpha_bar_t)."""

    def __init__(self, scheduler, args: ObjectiveArgs | None = None):
        self.scheduler = scheduler
        self.num_train_timesteps = int(scheduler.config.num_train_timesteps)
        #: Inclusive integer range (--min_timestep / --max_timestep, on the scheduler's 0..N-1 steps).
        lo, hi = args.timestep_range() if args is not None else (0.0, 1000.0)
        last = self.num_train_timesteps - 1
        self.range = (min(math.ceil(lo), last), min(math.floor(hi), last))
        if self.range[0] > self.range[1]:
            raise ConfigError(f"--min_timestep {lo:g} / --max_timestep {hi:g}: no integer timestep in between")
        #: A host copy: the scheduler moves its own to the device at the first add_noise.
        self.alpha_bar = scheduler.alphas_cumprod.detach().to("cpu", torch.float32).clone()

    def prepare(self, latents: torch.Tensor, generators: list[torch.Generator], strata=None) -> Prepared:
        lo, hi = self.range
        if strata is not None:
            u = _stratified(generators, strata)
            t = (lo + u * (hi + 1 - lo)).long().clamp(lo, hi)
        else:
            t = torch.cat([torch.randint(lo, hi + 1, (1,), generator=g) for g in generators])
        noise = _noise_like(latents, generators)
        weight = to_device(1.0 / (1.0 - self.alpha_bar[t]), latents.device)
        t = to_device(t, latents.device)
        noisy = self.scheduler.add_noise(latents, noise, t)
        return Prepared(noisy, t, latents, weight)

    def loss(self, pred: torch.Tensor, p: Prepared) -> torch.Tensor:
        x0 = self.scheduler.get_velocity(pred.float(), p.noisy.float(), p.timesteps)
        return _weighted_mse(x0, p.target, p.weight, p.loss_mask)
