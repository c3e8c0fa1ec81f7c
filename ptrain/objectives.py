"""Training objectives: per-sample noise, timesteps, noisy input, target and loss.

Every random draw of a sample comes from that sample's own generator, seeded by
(seed, global sample position). That is what makes the noise and timesteps of a
step independent of how the global batch is split over ranks.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ptrain.config import TrainArgs


def sample_generators(seed: int, positions: list[int] | torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per sample, seeded by (seed, global position in the sample stream)."""
    gens = []
    for pos in [int(p) for p in positions]:
        state = np.random.SeedSequence([seed, pos]).generate_state(2, dtype=np.uint32)
        gens.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return gens


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    """Timestep shift of SD3/Flux/LTX flow matching: shift*s / (1 + (shift-1)*s)."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


class FlowMatching:
    """Rectified flow: x_t = (1 - s) x_0 + s * noise, target = noise - x_0, timestep = 1000 s."""

    def __init__(self, args: TrainArgs):
        self.args = args

    def sample_sigmas(self, generators: list[torch.Generator]) -> torch.Tensor:
        a = self.args
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
        return shift_sigmas(u.float().clamp(0.0, 1.0), a.flow_shift)

    def prepare(
        self, latents: torch.Tensor, generators: list[torch.Generator]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> noisy latents, timesteps (0..1000), target, per-sample loss weight."""
        sigmas = self.sample_sigmas(generators)
        noise = torch.stack([torch.randn(latents.shape[1:], generator=g) for g in generators]).to(latents)
        s = sigmas.to(latents).view(-1, *([1] * (latents.ndim - 1)))
        noisy = (1.0 - s) * latents + s * noise
        target = noise - latents
        weight = compute_loss_weighting_for_sd3(self.args.flow_weighting_scheme, sigmas).float()
        return noisy, sigmas.to(latents.device) * 1000.0, target, weight.to(latents.device)

    @staticmethod
    def loss(pred: torch.Tensor, target: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """Weighted MSE, mean over elements then over the samples of the micro-batch."""
        per_sample = (pred.float() - target.float()).pow(2).flatten(1).mean(1)
        return (weight * per_sample).mean()
