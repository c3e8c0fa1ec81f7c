"""Training objectives checked against diffusers' own functions and schedulers, and against closed forms.

Flow matching: the sigmas, timesteps, noisy input, target, loss weight and loss that `FlowMatching.prepare` /
`.loss` produce, for every `--flow_weighting_scheme`, with and without `--flow_shift`, against
`compute_density_for_timestep_sampling` + the SD3 shift + `compute_loss_weighting_for_sd3` (as diffusers' SD3
trainer combines them) and against the formulas written out. Sampling distributions (plain and
`--uniform_sampling`) are checked by their moments and a Kolmogorov-Smirnov distance over many seeded draws.
CogVideoX's v-prediction: weight 1 / (1 - alpha_bar_t) and x_t against the scheduler's `alphas_cumprod`,
itself recomputed from the checkpoint's scheduler config.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import CogVideoXDDIMScheduler, FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

from ptrain.config import ObjectiveArgs, parse_config
from ptrain.models.spec import Components, get_spec
from ptrain.objectives import FlowMatching, VPrediction, sample_generators, shift_sigmas
from ptrain.testing.tiny import (
    COGVIDEOX_SCHEDULER_CONFIG,
    HUNYUAN_SCHEDULER_CONFIG,
    LTX_SCHEDULER_CONFIG,
    WAN_SCHEDULER_CONFIG,
)

SCHEMES = ("none", "sigma_sqrt", "logit_normal", "mode", "cosmap")
# Away from the defaults (0, 1, 1.29), so that an argument dropped or swapped on the way changes the result.
MEAN, STD, MODE_SCALE = 0.3, 0.7, 0.8
N_DRAWS = 4000


def flow_args(scheme: str, *extra: str) -> ObjectiveArgs:
    """ObjectiveArgs as the command line gives them (so the flag -> objective path is covered too)."""
    argv = ["--flow_weighting_scheme", scheme, "--flow_logit_mean", str(MEAN), "--flow_logit_std", str(STD),
            "--flow_mode_scale", str(MODE_SCALE), *extra]  # fmt: skip
    return parse_config(argv).objective


def closed_form_weight(scheme: str, sigma: torch.Tensor) -> torch.Tensor:
    """SD3 paper loss weights written out: sigma_sqrt = sigma^-2, cosmap = 2 / (pi (1 - 2s + 2s^2)), else 1."""
    s = sigma.double()
    if scheme == "sigma_sqrt":
        return s**-2
    if scheme == "cosmap":
        return 2 / (math.pi * (1 - 2 * s + 2 * s**2))
    return torch.ones_like(s)


# --- the shift ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0, 7.0])
def test_shift_matches_the_flow_match_schedulers_sigmas(shift):
    """diffusers' FlowMatchEulerDiscreteScheduler(shift=s) holds the shifted training sigmas of t/1000."""
    sched = FlowMatchEulerDiscreteScheduler.from_config({"num_train_timesteps": 1000, "shift": shift})
    unshifted = torch.arange(1000, 0, -1, dtype=torch.float64) / 1000
    torch.testing.assert_close(shift_sigmas(unshifted, shift).float(), sched.sigmas[:1000].float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "model, scheduler, default_shift",
    [
        ("ltx_video", FlowMatchEulerDiscreteScheduler.from_config(LTX_SCHEDULER_CONFIG), 1.0),  # dynamic: no static
        ("hunyuan_video", FlowMatchEulerDiscreteScheduler.from_config(HUNYUAN_SCHEDULER_CONFIG), 7.0),
        ("wan", UniPCMultistepScheduler.from_config(WAN_SCHEDULER_CONFIG), 3.0),
    ],
)
def test_each_model_takes_its_schedulers_shift_unless_flow_shift_is_given(model, scheduler, default_shift):
    comps = Components(None, None, None, None, scheduler)
    spec = get_spec(model)
    assert spec.make_objective(flow_args("none"), comps).shift == default_shift
    assert spec.make_objective(flow_args("none", "--flow_shift", "2.5"), comps).shift == 2.5


# --- prepare() and loss() end to end against diffusers ---------------------------------------------------------------
@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("scheme", SCHEMES)
def test_flow_prepare_and_loss_match_diffusers(scheme, shift):
    """What diffusers' SD3 trainer computes from the same per-sample generator: u from
    compute_density_for_timestep_sampling, then the noise; sigma = shift*u / (1 + (shift-1)*u);
    x_t = (1 - sigma) x_0 + sigma noise; target noise - x_0; weight compute_loss_weighting_for_sd3(sigma)."""
    args = flow_args(scheme, "--flow_shift", str(shift))
    fm = get_spec("hunyuan_video").make_objective(args, Components(None, None, None, None, None))
    positions = list(range(100, 108))
    x0 = torch.randn(len(positions), 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    p = fm.prepare(x0, sample_generators(5, positions))

    ref_sigma, ref_noise = [], []
    for g in sample_generators(5, positions):
        u = compute_density_for_timestep_sampling(
            weighting_scheme=scheme, batch_size=1, logit_mean=MEAN, logit_std=STD, mode_scale=MODE_SCALE, generator=g
        )
        ref_sigma.append(shift * u / (1 + (shift - 1) * u))
        ref_noise.append(torch.randn(x0.shape[1:], generator=g))
    sigma, noise = torch.cat(ref_sigma), torch.stack(ref_noise)
    s = sigma.view(-1, 1, 1, 1, 1)

    torch.testing.assert_close(p.timesteps, sigma * 1000, rtol=1e-6, atol=1e-4)
    torch.testing.assert_close(p.noisy, (1 - s) * x0 + s * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.target, noise - x0)
    torch.testing.assert_close(p.weight, compute_loss_weighting_for_sd3(scheme, sigma).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(p.weight.double(), closed_form_weight(scheme, sigma), rtol=1e-5, atol=0)
    if scheme in ("sigma_sqrt", "cosmap"):
        assert p.weight.std() > 0  # the weighting really varies with sigma

    # diffusers' SD3 trainer: mean over elements of weight * (pred - target)^2 per sample, then over the batch.
    pred = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    w = compute_loss_weighting_for_sd3(scheme, sigma).float().view(-1, 1, 1, 1, 1)
    ref_loss = torch.mean((w * (pred - p.target) ** 2).reshape(len(positions), -1), 1).mean()
    torch.testing.assert_close(fm.loss(pred, p), ref_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("scheme", ["none", "mode"])
def test_stratified_draw_of_a_batch_of_one_is_diffusers_draw(scheme):
    """With one stratum, --uniform_sampling draws u from the same generator as diffusers: identical sigmas."""
    fm = FlowMatching(flow_args(scheme), shift=3.0)
    gens = sample_generators(9, range(50))
    got = torch.cat([fm.sample_sigmas([g], (torch.zeros(1, dtype=torch.long), 1)) for g in gens])
    u = torch.cat(
        [compute_density_for_timestep_sampling(scheme, 1, MEAN, STD, MODE_SCALE, generator=g)
         for g in sample_generators(9, range(50))]
    )  # fmt: skip
    torch.testing.assert_close(got, 3 * u / (1 + 2 * u), rtol=1e-6, atol=1e-7)


# --- sampling distributions over many seeded draws --------------------------------------------------------------------
def _unshift(sigma: np.ndarray, shift: float) -> np.ndarray:
    """Inverse of shift*u / (1 + (shift-1)*u)."""
    return sigma / (shift - (shift - 1) * sigma)


def _cdf_u(scheme: str, u: np.ndarray) -> np.ndarray:
    """CDF of the unshifted density: logit-normal(MEAN, STD), SD3 'mode' (a decreasing map of U(0,1)), else U(0,1)."""
    if scheme == "logit_normal":
        z = (np.log(u) - np.log1p(-u) - MEAN) / STD
        return 0.5 * (1 + np.vectorize(math.erf)(z / math.sqrt(2)))
    if scheme == "mode":  # P(f(U) <= x) = 1 - f^-1(x), f decreasing: invert by bisection
        lo, hi = np.zeros_like(u), np.ones_like(u)
        for _ in range(60):
            mid = (lo + hi) / 2
            f = 1 - mid - MODE_SCALE * (np.cos(np.pi * mid / 2) ** 2 - 1 + mid)
            lo, hi = np.where(f > u, mid, lo), np.where(f > u, hi, mid)
        return 1 - (lo + hi) / 2
    return u


DENSITY_CASES = [
    (scheme, shift, stratified)
    for scheme in ("none", "logit_normal", "mode")
    for shift in (1.0, 3.0)
    for stratified in (False, True)
] + [("sigma_sqrt", 3.0, False), ("cosmap", 3.0, True)]  # uniform density like "none"


@pytest.mark.parametrize("scheme, shift, stratified", DENSITY_CASES)
def test_sigma_distribution(scheme, shift, stratified):
    fm = FlowMatching(flow_args(scheme), shift=shift)
    strata = (torch.arange(N_DRAWS), N_DRAWS) if stratified else None
    sigma = fm.sample_sigmas(sample_generators(11, range(N_DRAWS)), strata).double().numpy()
    assert ((sigma > 0) & (sigma < 1)).all()
    u = _unshift(sigma, shift)

    # Kolmogorov-Smirnov distance to the analytic CDF (1% critical value for 4000 draws: 0.026).
    ecdf = np.arange(1, N_DRAWS + 1) / N_DRAWS
    ks = np.abs(ecdf - _cdf_u(scheme, np.sort(u))).max()
    assert ks < 0.026, f"KS distance {ks:.4f}"

    if scheme == "logit_normal":
        logit = np.log(u) - np.log1p(-u)
        assert logit.mean() == pytest.approx(MEAN, abs=0.04) and logit.std() == pytest.approx(STD, abs=0.03)
    elif scheme == "mode":  # mean 1/2 whatever the scale; the variance depends on it (1/12 at scale 0)
        grid = np.linspace(0, 1, 200_001)
        f = 1 - grid - MODE_SCALE * (np.cos(np.pi * grid / 2) ** 2 - 1 + grid)
        var = np.trapezoid(f * f, grid) - 0.25
        assert u.mean() == pytest.approx(0.5, abs=0.015) and u.var() == pytest.approx(var, abs=0.003)
    else:  # uniform density
        assert u.mean() == pytest.approx(0.5, abs=0.015) and u.var() == pytest.approx(1 / 12, abs=0.003)
    if stratified:  # sample j of G sits in the j-th G-quantile slice (reversed for the decreasing mode map)
        d = np.diff(u)
        assert (d < 0).all() if scheme == "mode" else (d > 0).all()


# --- CogVideoX v-prediction ---------------------------------------------------------------------------------------------
def alphas_cumprod_from_config(cfg: dict) -> torch.Tensor:
    """CogVideoX's alpha_bar written out: scaled-linear betas, SD3 snr shift, zero-terminal-snr rescale."""
    n = cfg["num_train_timesteps"]
    betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, n, dtype=torch.float64) ** 2
    ab = torch.cumprod(1 - betas, 0)
    snr = cfg["snr_shift_scale"]
    ab = ab / (snr + (1 - snr) * ab)
    if cfg["rescale_betas_zero_snr"]:
        r = ab.sqrt()
        r0, rt = r[0].clone(), r[-1].clone()
        ab = ((r - rt) * r0 / (r0 - rt)) ** 2
    return ab


@pytest.mark.parametrize("snr_shift_scale", [3.0, 1.0], ids=["2b", "5b"])
def test_v_prediction_matches_the_cogvideox_scheduler(snr_shift_scale):
    cfg = {**COGVIDEOX_SCHEDULER_CONFIG, "snr_shift_scale": snr_shift_scale}
    sched = CogVideoXDDIMScheduler.from_config(cfg)
    ab = alphas_cumprod_from_config(cfg)
    torch.testing.assert_close(sched.alphas_cumprod.double(), ab, rtol=1e-6, atol=1e-9)
    vp = get_spec("cogvideox").make_objective(ObjectiveArgs(), Components(None, None, None, None, sched))
    assert isinstance(vp, VPrediction)

    positions = list(range(64))
    x0 = torch.randn(len(positions), 4, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    p = vp.prepare(x0, sample_generators(3, positions))
    ref_t, ref_noise = [], []
    for g in sample_generators(3, positions):
        ref_t.append(torch.randint(0, 1000, (1,), generator=g))
        ref_noise.append(torch.randn(x0.shape[1:], generator=g))
    t, noise = torch.cat(ref_t), torch.stack(ref_noise)
    a = ab[t].float().view(-1, 1, 1, 1, 1)

    assert torch.equal(p.timesteps, t)
    torch.testing.assert_close(p.weight, (1 / (1 - ab[t])).float(), rtol=1e-5, atol=0)
    torch.testing.assert_close(p.noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(p.target, x0)

    # diffusers' CogVideoX LoRA trainer: x_0 estimate via get_velocity, weights 1/(1 - alpha_bar), per-sample mean.
    v = torch.randn(x0.shape, generator=torch.Generator().manual_seed(1))
    x0_pred = a.sqrt() * p.noisy - (1 - a).sqrt() * v
    w = (1 / (1 - ab[t])).float().view(-1, 1, 1, 1, 1)
    ref_loss = torch.mean((w * (x0_pred - x0) ** 2).reshape(len(positions), -1), dim=1).mean()
    torch.testing.assert_close(vp.loss(v, p), ref_loss, rtol=1e-5, atol=0)


@pytest.mark.parametrize("stratified", [False, True], ids=["iid", "uniform_sampling"])
def test_v_prediction_timesteps_are_uniform_integers(stratified):
    sched = CogVideoXDDIMScheduler.from_config(COGVIDEOX_SCHEDULER_CONFIG)
    vp = VPrediction(sched)
    strata = (torch.arange(N_DRAWS), N_DRAWS) if stratified else None
    t = vp.prepare(torch.zeros(N_DRAWS, 1, 1, 1, 1), sample_generators(4, range(N_DRAWS)), strata).timesteps
    assert t.dtype == torch.long and t.min() >= 0 and t.max() <= 999
    tf = t.double()
    assert tf.mean().item() == pytest.approx(499.5, abs=12) and tf.std().item() == pytest.approx(288.7, abs=8)
    counts = torch.bincount(t // 100, minlength=10).double()  # chi-square over 10 bins, 9 dof: 1% at 21.7
    chi2 = ((counts - N_DRAWS / 10) ** 2 / (N_DRAWS / 10)).sum().item()
    assert chi2 < 21.7 and t.min() < 10 and t.max() > 989
    if stratified:
        j = torch.arange(N_DRAWS)
        assert ((t >= j * 1000 // N_DRAWS) & (t <= (j + 1) * 1000 // N_DRAWS)).all()
