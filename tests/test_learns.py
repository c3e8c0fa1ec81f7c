"""ptrain trains the model that the model's diffusers pipeline samples (the seventh audit).

Two tests per family (LTX-Video, CogVideoX, HunyuanVideo, Wan):

* test_pipeline_sees_what_ptrain_trains (no training, ~2 s a family): at three sampling steps of the model's own
  pipeline, the keyword arguments the pipeline gives the transformer equal those ptrain's spec.forward gives it
  for the same noisy latents and timestep with ptrain's text conditioning (embeddings, masks, RoPE, ofs,
  guidance, ...); and the pipeline sampled with an *oracle* transformer, one that returns exactly the target
  ptrain's objective trains towards for a fixed latent x0 (the relation read off objective.prepare() on random
  latents), returns x0. Together: ptrain's noisy input / timestep / target conventions are the scheduler's.
* test_overfit_one_clip_samples_it (one short training run a family): full fine-tune on ONE clip with ONE caption,
  export, load the export into the pipeline, sample the caption at the training shape (fixed seed, no CFG,
  output_type="latent"), and compare with the clip's latent from ptrain's precompute cache:
  trained MSE < 0.3 x the base model's MSE and < 0.5 x the target's variance.

The tiny checkpoints are ptrain.testing.tiny's with two changes, both needed for a clip to be learnable:
the VAE's posterior is made narrow (its log-variance layer gets zero weights and bias -18; the random tiny VAE
has a posterior std ~1, so a "clip latent" would be mostly noise) with its mean scaled so the pipeline's
(normalised) latent of the clip varies with std 1, and the transformer is 4 heads wide instead of 2.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from conftest import MODELS, TINY_ARGS

from ptrain.config import ObjectiveArgs, parse_config
from ptrain.models.spec import Components, get_spec
from ptrain.objectives import sample_generators
from ptrain.testing.tiny import write_synthetic_videos, write_tiny_checkpoint

HW, FRAMES = 32, 9
WIDE = {
    "ltx_video": {"num_attention_heads": 4, "attention_head_dim": 16, "cross_attention_dim": 64},
    "cogvideox": {"num_attention_heads": 4, "attention_head_dim": 16, "time_embed_dim": 64},
    "wan": {"num_attention_heads": 4, "attention_head_dim": 16, "ffn_dim": 256},
    "hunyuan_video": {"num_attention_heads": 4, "attention_head_dim": 16},
}
#: (train steps, lr, batch size) per family: full fine-tune, fp32, constant lr, AdamW (a batch repeats the clip with
#: other noise and timesteps).
TRAIN = {
    "ltx_video": (300, 3e-3, 1),
    "cogvideox": (300, 3e-3, 4),
    "wan": (600, 3e-3, 1),
    "hunyuan_video": (250, 3e-3, 1),
}


# --- fixtures -------------------------------------------------------------------------------------------------
def _logvar_layer(vae, model):
    """(conv, latent channels, log-variance rows) of the layer that ends the VAE encoder."""
    if model == "ltx_video":  # C mean channels + 1 log-variance channel
        conv = vae.encoder.conv_out.conv
        c = conv.out_channels - 1
        return conv, c, slice(c, c + 1)
    conv = vae.encoder.conv_out.conv if model == "cogvideox" else vae.quant_conv
    c = conv.out_channels // 2
    return conv, c, slice(c, 2 * c)


def learnable_checkpoint(out: Path, model: str, clip: torch.Tensor, variant: str | None = None) -> Path:
    """A tiny checkpoint with a narrow VAE posterior (std ~1e-4, mean std ~1 on `clip`) and a wider transformer."""
    spec = get_spec(model)
    write_tiny_checkpoint(out, model_name=model, seed=0, variant=variant)
    vae = spec.component_classes["vae"].from_pretrained(out, subfolder="vae").eval()
    conv, c, lv = _logvar_layer(vae, model)
    with torch.no_grad():
        conv.weight[lv], conv.bias[lv] = 0.0, -18.0
        m = vae.encode(clip).latent_dist.mean  # scaled so the pipeline's latent varies with std 1, as real VAEs' do
        k = 1.0 / float((pipeline_latent(model, vae, m) - pipeline_latent(model, vae, torch.zeros_like(m))).std())
        conv.weight[:c] *= k
        conv.bias[:c] *= k
    vae.save_pretrained(out / "vae")
    cls = spec.transformer_cls
    cfg = {k: v for k, v in cls.load_config(out, subfolder="transformer").items() if not k.startswith("_")}
    torch.manual_seed(2)
    cfg.update(WIDE[model])
    if cfg.get("added_kv_proj_dim"):  # Wan I2V: image key/value projections as wide as the attention
        cfg["added_kv_proj_dim"] = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    cls(**cfg).save_pretrained(out / "transformer")
    return out


@pytest.fixture(scope="module")
def one_clip(tmp_path_factory):
    from ptrain.data.video import load_clip

    data = write_synthetic_videos(tmp_path_factory.mktemp("one_clip"), num_videos=1, seed=0)
    video = data / (data / "videos.txt").read_text().split()[0]
    return data, load_clip(video, FRAMES, HW, HW)[None], (data / "prompts.txt").read_text().splitlines()[0]


@pytest.fixture(scope="module")
def ckpts(one_clip, tmp_path_factory):
    cache = {}

    def get(model):
        if model not in cache:
            cache[model] = learnable_checkpoint(tmp_path_factory.mktemp("learn") / model, model, one_clip[1])
        return cache[model]

    return get


# --- the pipeline side ----------------------------------------------------------------------------------------
def pipeline(model, ckpt, transformer_dir=None):
    spec = get_spec(model)
    kw = {"transformer": spec.transformer_cls.from_pretrained(transformer_dir)} if transformer_dir else {}
    pipe = spec.pipeline_cls.from_pretrained(ckpt, dtype=torch.float32, **kw)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def unpack(model, pipe, z):
    """The pipeline's transformer-layout latents -> (B, C, F, H, W)."""
    if model == "ltx_video":
        t, s = pipe.vae_temporal_compression_ratio, pipe.vae_spatial_compression_ratio
        f, h = (FRAMES - 1) // t + 1, HW // s
        return pipe._unpack_latents(
            z, f, h, h, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size
        )
    return z.permute(0, 2, 1, 3, 4) if model == "cogvideox" else z


def pack(model, pipe, z):
    if model == "ltx_video":
        return pipe._pack_latents(z, pipe.transformer_spatial_patch_size, pipe.transformer_temporal_patch_size)
    return z.permute(0, 2, 1, 3, 4) if model == "cogvideox" else z


def sample(model, pipe, prompt, steps=20, seed=0):
    """(1, C, F, H, W) latents at the training shape, no classifier-free guidance (HunyuanVideo: the embedded
    guidance ptrain trains with, 1.0)."""
    kw = {"prompt": prompt, "height": HW, "width": HW, "num_frames": FRAMES, "num_inference_steps": steps,
          "guidance_scale": 1.0, "generator": torch.Generator().manual_seed(seed), "output_type": "latent"}  # fmt: skip
    if model == "cogvideox":
        kw["max_sequence_length"] = int(pipe.transformer.config.max_text_seq_length)
    with torch.no_grad():
        return unpack(model, pipe, pipe(**kw).frames).float()


def pipeline_latent(model, vae, mean):
    """A VAE posterior mean (1, C, F, H, W) as the pipeline's latents (inverse of what it does before decoding)."""
    cfg = vae.config
    if model == "ltx_video":  # LTXPipeline._denormalize_latents
        return (
            (mean - vae.latents_mean.view(1, -1, 1, 1, 1)) * cfg.scaling_factor / vae.latents_std.view(1, -1, 1, 1, 1)
        )
    if model == "wan":  # WanPipeline: latents * std + mean
        mu, std = torch.tensor(cfg.latents_mean), torch.tensor(cfg.latents_std)
        return (mean - mu.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    return mean * cfg.scaling_factor  # CogVideoX 1.0 / 5B, HunyuanVideo: latents / scaling_factor


def bound_spec(model, pipe):
    comps = Components.from_pipeline(pipe)
    return get_spec(model).bind(comps), comps


def target_rule(model, spec, comps):
    """target = rule(noisy, timestep, x0): the transformer output that makes ptrain's loss zero. Checked with
    ptrain's own objective (prepare() on random latents, then loss())."""
    obj = spec.make_objective(ObjectiveArgs(), comps)
    if model == "cogvideox":  # v-prediction: the x0 for which scheduler.get_velocity(pred, noisy, t) gives x0
        ab = obj.alpha_bar

        def rule(xt, t, x0):
            a = ab[t.long()].view(-1, *[1] * (xt.ndim - 1))
            return (a.sqrt() * xt - x0) / (1 - a).sqrt()

    else:  # flow matching with timestep = 1000 sigma: noisy = (1 - sigma) x0 + sigma noise, target noise - x0

        def rule(xt, t, x0):
            return (xt - x0) / (t.view(-1, *[1] * (xt.ndim - 1)) / 1000.0)

    x0 = torch.randn(8, 4, 2, 3, 3)
    p = obj.prepare(x0, sample_generators(0, range(8)))
    assert float(obj.loss(rule(p.noisy, p.timesteps, x0), p)) < 1e-8, "the objective is not the one assumed"
    return rule


def _same(a, b):
    if isinstance(a, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.numel() == b.numel() and torch.allclose(
            a.float().reshape(-1), b.float().reshape(-1), atol=1e-5, rtol=1e-5)  # fmt: skip
    return a == b


# --- tests -----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_pipeline_sees_what_ptrain_trains(model, tiny_ckpts):
    ckpt = tiny_ckpts(model)  # the suite's tiny checkpoint: no training here
    pipe = pipeline(model, ckpt)
    spec, comps = bound_spec(model, pipe)
    caption = "a black square moving right"
    cond = spec.encode_text(comps, [caption], spec.max_sequence_length(comps))

    # 1. The transformer's inputs at three sampling steps: the pipeline's vs ptrain's forward.
    tr, calls = pipe.transformer, []
    real = tr.forward
    tr.forward = lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1]
    sample(model, pipe, caption, steps=6)
    seen = calls[:]
    for i in (0, 3, 5):
        kw = seen[i]
        noisy = unpack(model, pipe, kw["hidden_states"])
        spec.forward(tr, noisy, kw["timestep"], cond)
        ours = calls.pop()
        for k in set(kw) | set(ours):
            if k in ("return_dict", "attention_kwargs") or (kw.get(k) is None and ours.get(k) is None):
                continue
            assert _same(kw.get(k), ours.get(k)), f"step {i}: {k} differs between the pipeline and ptrain"
    tr.forward = real

    # 2. An oracle transformer returning ptrain's training target for x0: the pipeline must sample x0.
    rule = target_rule(model, spec, comps)
    x0 = sample(model, pipe, caption, steps=2).normal_(generator=torch.Generator().manual_seed(1))

    class Oracle(torch.nn.Module):
        config, dtype, device = tr.config, torch.float32, torch.device("cpu")

        def forward(self, hidden_states=None, timestep=None, return_dict=False, **kw):
            xt = unpack(model, pipe, hidden_states).float()
            return (pack(model, pipe, rule(xt, timestep.flatten()[:1].float(), x0)),)

    pipe.transformer = Oracle()
    pipe.transformer.__dict__.update({k: getattr(tr, k) for k in ("cache_context",) if hasattr(tr, k)})
    got = sample(model, pipe, caption, steps=20)
    assert float((got - x0).pow(2).mean()) < 1e-4 * float(x0.pow(2).mean())


@pytest.mark.parametrize("model", MODELS)
def test_overfit_one_clip_samples_it(model, ckpts, one_clip, tmp_path, single_process_env):
    from safetensors.torch import load_file

    from ptrain.trainer import train

    data, _, caption = one_clip
    ckpt = ckpts(model)
    steps, lr, batch = TRAIN[model]
    t0 = time.time()
    result = train(parse_config([
        "--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
        "--output_dir", str(tmp_path), "--train_steps", str(steps), "--lr", str(lr), "--training_type",
        "full-finetune", "--enable_precomputation", "on", "--checkpointing_steps", "0", "--seed", "0",
        "--batch_size", str(batch), *TINY_ARGS,
    ]))  # fmt: skip
    train_s = time.time() - t0
    (cached,) = (tmp_path / "precomputed").glob("*/00000000.safetensors")

    base = pipeline(model, ckpt)
    x0 = pipeline_latent(model, base.vae, load_file(cached)["latent_dist"][None].float().chunk(2, dim=1)[0])
    base_mse = float((sample(model, base, caption) - x0).pow(2).mean())
    trained = pipeline(model, ckpt, tmp_path / "transformer")
    trained_mse = float((sample(model, trained, caption) - x0).pow(2).mean())
    n = max(1, steps // 10)
    print(f"{model}: loss {sum(result.losses[:n]) / n:.3f} -> {sum(result.losses[-n:]) / n:.3f}, sample MSE base "
          f"{base_mse:.3f} trained {trained_mse:.3f} (target var {float(x0.var()):.3f}), "
          f"train {train_s:.1f} s")  # fmt: skip
    assert trained_mse < 0.3 * base_mse
    assert trained_mse < 0.5 * float(x0.var())
