"""The training step does not wait for the device: no host sync in a step that does not log.

On a GPU, `torch.cuda.set_sync_debug_mode` would flag them; on this CPU the test counts the calls that read a
tensor's value on the host (`item`, `bool`, `float`, `int`, `tolist`, `cpu`, `numpy`) inside the step's model
work (`forward_backward`: inputs, objective, conditioning, forward, backward; `optimizer_step`: clipping, the
global loss, the NaN guard, the fused update, EMA; `log_step`). The loader's own work (decode, collate) runs
before and is not the device's.
"""

from __future__ import annotations

import contextlib

import pytest

import torch
from conftest import TINY_ARGS
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}  # fmt: skip


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


class CountFlash(TorchDispatchMode):
    """Calls of the CPU flash SDPA kernel (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if "_scaled_dot_product_flash_attention_for_cpu" in str(func):
            self.calls += 1
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_a_non_logging_step(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    from tqdm import tqdm

    from ptrain.config import parse_config
    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "4", "--logging_steps", "2",
                        "--checkpointing_steps", "0", "--ema_decay", "0.9", "--gradient_accumulation_steps", "2",
                        "--attention_backend", "math", *TINY_ARGS])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    counters, current, flash_calls = {}, [0], []
    for name in ("forward_backward", "optimizer_step", "log_step"):
        method = getattr(trainer, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            with CountSyncs() as mode:
                out = _method(*args, **kwargs)
            counters.setdefault(current[0], []).extend(f"{_name}: {c}" for c in mode.calls)
            return out

        setattr(trainer, name, counted)
    for name in ("loss", "backward"):  # the transformer's part (the text encoder's attention keeps torch's choice)
        method = getattr(trainer.step, name)

        def flash_counted(*args, _method=method, **kwargs):
            with CountFlash() as flash:
                out = _method(*args, **kwargs)
            flash_calls.append(flash.calls)
            return out

        setattr(trainer.step, name, flash_counted)
    trainer.data_iter = iter(trainer.loader)
    bar = tqdm(disable=True)
    for step in (1, 2):
        current[0] = step
        trainer.log_step(step, trainer.train_step(step), bar)
    assert counters[1] == [], counters[1]  # step 1 does not log (--logging_steps 2)
    assert any("log_step" in c for c in counters[2])  # the logging step reads loss and grad norm: the check bites
    # --attention_backend math held the forward and backward (incl. accumulation) off torch's default CPU flash kernel
    assert len(flash_calls) == 8 and sum(flash_calls) == 0 and trainer.step.kernels is not contextlib.nullcontext
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"step": 2' in rows[0]


class CountCopies(TorchDispatchMode):
    """Host -> GPU copies seen at dispatch, split by whether they block the host (non_blocking=False)."""

    def __init__(self):
        super().__init__()
        self.blocking: list[str] = []
        self.non_blocking = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default:
            src, dst, nb = args[0].device, kwargs.get("device"), kwargs.get("non_blocking", False)
        elif func is torch.ops.aten.copy_.default:
            src, dst, nb = args[1].device, args[0].device, (args[2] if len(args) > 2 else kwargs.get("non_blocking"))
        else:
            return func(*args, **kwargs)
        if dst is not None and src.type == "cpu" and torch.device(dst).type == "cuda":
            if nb:
                self.non_blocking += 1
            else:
                self.blocking.append(f"{func}: {tuple(args[0].shape)}")
        return func(*args, **kwargs)


def test_host_draws_reach_the_gpu_without_blocking_copies():
    """Noise, timesteps, loss weights and posterior draws come from per-sample host generators (the same values on
    every device and layout); on a GPU they must be copied without blocking the host: a copy from pageable memory
    synchronises the stream at every step. Checked on fake CUDA tensors at dispatch (VPrediction uses the same
    copies, but the scheduler's table lookup does not run on fake CUDA tensors)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.config import ObjectiveArgs
    from ptrain.objectives import FlowMatching, sample_generators, sample_posterior

    gens = sample_generators(0, [0, 1])
    flow = FlowMatching(ObjectiveArgs(flow_weighting_scheme="logit_normal"), shift=3.0)
    with FakeTensorMode(allow_non_fake_inputs=True):
        latents = torch.zeros(2, 4, 3, 8, 8, device="cuda:0")
        params = torch.zeros(2, 8, 3, 8, 8, device="cuda:0", dtype=torch.bfloat16)
        with CountCopies() as probe:  # the recorder sees what it must: a plain copy blocks
            torch.ones(3).to("cuda:0")
        assert len(probe.blocking) == 1
        with CountCopies() as copies:
            flow.prepare(latents, gens)
            z = sample_posterior(params, gens)
            strata = (torch.tensor([0, 1]), 2)
            flow.prepare(latents, gens, strata)
    assert copies.blocking == [], copies.blocking
    assert copies.non_blocking >= 7  # noise, sigmas, weights (x2), posterior noise
    assert z.shape == (2, 4, 3, 8, 8) and z.device.type == "cuda"


def test_posterior_draw_matches_diffusers():
    """sample_posterior draws what diffusers' DiagonalGaussianDistribution.sample does with the same generators
    (exports and resumes of earlier versions stay reproducible)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from ptrain.objectives import sample_generators, sample_posterior

    params = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    params[:, 4:] = params[:, 4:] * 20  # log-variances past the clamp too
    ours = sample_posterior(params, sample_generators(5, [7, 9]))
    theirs = DiagonalGaussianDistribution(params).sample(generator=sample_generators(5, [7, 9]))
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_gc_is_off_in_the_loop_and_collects_every_n_steps(monkeypatch):
    import gc

    from ptrain.trainer import GCControl

    calls = []
    monkeypatch.setattr(gc, "collect", lambda generation=2: calls.append(generation))
    assert gc.isenabled()
    control = GCControl(3)
    assert not gc.isenabled() and calls == [2]  # one full collection before step 1
    for step in range(1, 8):
        control.maybe_collect(step)
    assert calls == [2, 1, 1]  # steps 3 and 6
    control.close()
    assert gc.isenabled()
    GCControl(0).close()  # 0 leaves the collector alone
    assert gc.isenabled() and calls == [2, 1, 1]


@pytest.mark.parametrize("model", ["ltx_video", "wan"])
def test_latent_normalisation_and_step_stats_copy_without_blocking(model):
    """Per micro-batch host -> GPU copies outside the draws: LTX-Video's and Wan's latent statistics (the VAE sits on
    the host once precomputation has offloaded it; Wan's are config lists) and the loader's replaced-sample count
    in the step's global stats, reduced over a (fake) process group. Each pageable copy would make the host wait
    for the GPU at every step; checked on fake CUDA tensors at dispatch, as above."""
    import torch.distributed as dist
    from torch._subclasses.fake_tensor import FakeTensorMode

    from ptrain.models.spec import Components, get_spec
    from ptrain.planner import _fake_world
    from ptrain.testing import tiny
    from ptrain.trainer import _global_step_stats

    cls, config = {"ltx_video": ("AutoencoderKLLTXVideo", tiny.LTX_VAE_CONFIG),
                   "wan": ("AutoencoderKLWan", tiny.WAN_VAE_CONFIG)}[model]  # fmt: skip
    import diffusers

    created = not dist.is_initialized()
    _fake_world(2)
    try:
        with FakeTensorMode(allow_non_fake_inputs=True):
            vae = getattr(diffusers, cls)(**config)  # its buffers: host tensors, as after offloading
            comps = Components(transformer=None, vae=vae, text_encoder=None, tokenizer=None, scheduler=None)
            channels = vae.config.latent_channels if model == "ltx_video" else vae.config.z_dim
            latents = torch.zeros(1, channels, 2, 4, 4, device="cuda:0")
            loss = torch.zeros((), device="cuda:0")
            with CountCopies() as copies:
                out = get_spec(model).normalize_latents(comps, latents)
                stats = _global_step_stats(loss, torch.zeros(2, dtype=torch.long).sum(), dist.group.WORLD, 2)
        assert copies.blocking == [], copies.blocking
        assert copies.non_blocking >= 3 and out.device.type == "cuda" and stats.shape == (2,)
    finally:
        if created:
            dist.destroy_process_group()
