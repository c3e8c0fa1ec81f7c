"""Wan 2.2: the two-expert A14B checkpoints (--expert, the timestep range it trains, validation with both experts)
and TI2V-5B (a timestep per token, image-to-video by a clean first frame, the 16x VAE); --min_timestep /
--max_timestep for every model."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS
from diffusers import WanImageToVideoPipeline, WanTransformer3DModel
from PIL import Image
from safetensors.torch import load_file

from ptrain.config import ConfigError, ModelArgs, ObjectiveArgs, parse_config
from ptrain.models.spec import Components, get_spec, plan_experts
from ptrain.objectives import FlowMatching, Prepared, VPrediction, sample_generators
from ptrain.testing.tiny import build_tiny_pipeline, write_tiny_checkpoint


# --- --min_timestep / --max_timestep ------------------------------------------------------------------------------
@pytest.mark.parametrize("scheme", ["none", "logit_normal", "mode"])
def test_a_timestep_range_truncates_the_density_without_reshaping_it(scheme):
    """Every draw lies in the range, and the draws follow the unrestricted density conditioned on the range
    (its mean and spread), with the checkpoint's shift applied: the density is truncated, not squeezed."""
    full = FlowMatching(ObjectiveArgs(flow_weighting_scheme=scheme), 3.0)
    assert full.quantiles is None  # no range: the draws are the ones ptrain always made
    ref = full.sample_sigmas(sample_generators(1, range(100_000))) * 1000
    for lo, hi in ((875, 1000), (0, 875), (200, 600)):
        obj = FlowMatching(ObjectiveArgs(flow_weighting_scheme=scheme, min_timestep=lo, max_timestep=hi), 3.0)
        t = obj.sample_sigmas(sample_generators(0, range(20_000))) * 1000
        assert float(t.min()) >= lo - 1e-3 and float(t.max()) <= hi + 1e-3, (lo, hi)
        cond = ref[(ref >= lo) & (ref <= hi)]
        assert abs(float(t.mean() - cond.mean())) < 0.02 * (hi - lo), (scheme, lo, hi)
        assert abs(float(t.std() / cond.std()) - 1) < 0.05, (scheme, lo, hi)
        strata = (torch.arange(8), 8)  # --uniform_sampling: one stratum of the range each
        s = obj.sample_sigmas(sample_generators(0, range(8)), strata) * 1000
        assert bool((s.diff() > 0).all() or (s.diff() < 0).all()) and lo - 1e-3 <= float(s.min()) <= float(s.max()) <= hi + 1e-3


def test_a_timestep_range_for_v_prediction_and_bad_ranges():
    from diffusers import CogVideoXDDIMScheduler

    vp = VPrediction(CogVideoXDDIMScheduler(), ObjectiveArgs(min_timestep=100.5, max_timestep=300))
    assert vp.range == (101, 300)
    t = vp.prepare(torch.zeros(64, 1, 1, 1, 1), sample_generators(0, range(64))).timesteps
    assert int(t.min()) >= 101 and int(t.max()) <= 300 and len(set(t.tolist())) > 30
    for lo, hi in ((500, 500), (-1, 10), (10, 1001)):
        with pytest.raises(ConfigError, match="--min_timestep"):
            ObjectiveArgs(min_timestep=lo, max_timestep=hi).validate()


# --- the two experts of Wan 2.2 A14B ------------------------------------------------------------------------------
A14B = {"transformer": ["diffusers", "WanTransformer3DModel"], "transformer_2": ["diffusers", "WanTransformer3DModel"],
        "boundary_ratio": 0.875}  # fmt: skip


def test_expert_choice_and_its_timesteps():
    with pytest.raises(ConfigError, match="two experts.*--expert high_noise or --expert low_noise"):
        plan_experts(ModelArgs(), ObjectiveArgs(), A14B, False)
    with pytest.raises(ConfigError, match="--expert low_noise: this checkpoint has one transformer"):
        plan_experts(ModelArgs(expert="low_noise"), ObjectiveArgs(), {**A14B, "transformer_2": [None, None]}, False)
    assert plan_experts(ModelArgs(), ObjectiveArgs(), {"transformer": A14B["transformer"]}, True) is None

    o = ObjectiveArgs()
    plan = plan_experts(ModelArgs(expert="high_noise"), o, A14B, True)
    assert (plan.folder, plan.other, plan.boundary, o.timestep_range()) == ("transformer", "transformer_2", 875, (875, 1000))
    o = ObjectiveArgs()
    plan = plan_experts(ModelArgs(expert="low_noise"), o, A14B, False)
    assert (plan.folder, plan.other, o.timestep_range()) == ("transformer_2", None, (0, 875))
    o = ObjectiveArgs(min_timestep=100)  # a given bound is kept, the other comes from the expert's side
    plan_experts(ModelArgs(expert="low_noise"), o, A14B, False)
    assert o.timestep_range() == (100, 875)
    with pytest.raises(ConfigError, match="--min_timestep 900 / --max_timestep 875"):
        plan_experts(ModelArgs(expert="low_noise"), ObjectiveArgs(min_timestep=900), A14B, False)


# the high-noise full fine-tune runs with the default dtypes (bfloat16 compute, float32 masters, which the pipeline
# then feeds the bfloat16 other expert) and the default 2 loader workers
@pytest.mark.parametrize("expert,training_type", [("low_noise", "lora"), ("high_noise", "full-finetune")])
def test_an_expert_trains_its_side_and_validation_samples_with_both(expert, training_type, tiny_data, tmp_path,
                                                                    single_process_env, monkeypatch):  # fmt: skip
    """A tiny two-expert checkpoint: the run trains the --expert's own weights (the export starts from its folder),
    every training timestep is on its side of the boundary, and the validation video is sampled by the pipeline
    with both experts, each at its own steps (the trained one with the run's weights)."""
    from ptrain.trainer import train

    ckpt = write_tiny_checkpoint(tmp_path / "a14b", model_name="wan", variant="2.2-t2v")
    calls = []
    real = WanTransformer3DModel.forward

    def record(self, *args, **kwargs):
        trained = any(p.requires_grad for p in self.parameters())
        calls.append((trained, torch.is_grad_enabled(), float(kwargs["timestep"].flatten()[0])))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(WanTransformer3DModel, "forward", record)
    out = tmp_path / "out"
    train(parse_config([
        "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(tiny_data), "--output_dir", str(out),
        "--expert", expert, "--training_type", training_type, "--train_steps", "3", "--lr", "1e-3",
        "--checkpointing_steps", "0", "--validation_prompts", "a cat", "--validation_steps", "3",
        "--validation_num_inference_steps", "6",
        *(TINY_ARGS if training_type == "lora" else ["--height", "32", "--width", "32", "--num_frames", "9",
                                                     "--report_to", "none"]),
    ]))  # fmt: skip
    steps = [t for trained, grad, t in calls if grad]
    sampled = [(trained, t) for trained, grad, t in calls if not grad]
    assert len(steps) == 3 and all(trained for trained, grad, _ in calls if grad)
    high = expert == "high_noise"
    assert all((t >= 875) == high for t in steps), steps
    assert {t >= 875 for _, t in sampled} == {True, False}, sampled  # the validation crossed the boundary
    assert all(trained == ((t >= 875) == high) for trained, t in sampled), sampled
    assert len(list((out / "validation" / "step-3").glob("*.mp4"))) == 1

    mine, other = ("transformer", "transformer_2") if high else ("transformer_2", "transformer")
    base = {k: v for f in (ckpt / mine).glob("*.safetensors") for k, v in load_file(f).items()}
    rest = {k: v for f in (ckpt / other).glob("*.safetensors") for k, v in load_file(f).items()}
    if training_type == "full-finetune":
        got = {k: v for f in (out / "transformer").glob("*.safetensors") for k, v in load_file(f).items()}
        near = sum(float((got[k] - base[k]).abs().max()) for k in base)
        far = sum(float((got[k] - rest[k]).abs().max()) for k in base)
        assert 0 < near < 0.1 * far, (near, far)
    else:  # the LoRA goes onto the low-noise expert: diffusers' load_lora_weights(load_into_transformer_2=True)
        from diffusers import WanPipeline

        pipe = WanPipeline.from_pretrained(ckpt)
        before = pipe.transformer_2.blocks[0].attn1.to_q.weight.clone()
        pipe.load_lora_weights(out, load_into_transformer_2=True)
        pipe.transformer_2.fuse_lora()
        assert not torch.equal(pipe.transformer_2.blocks[0].attn1.to_q.weight, before)


# --- Wan 2.2 TI2V-5B ----------------------------------------------------------------------------------------------
def _ti2v_components():
    pipe = build_tiny_pipeline("wan", variant="2.2-ti2v")
    return Components.from_pipeline(pipe), pipe


def test_ti2v_shapes_follow_its_16x_vae():
    comps, _ = _ti2v_components()
    spec = get_spec("wan")
    spec.check_shape(9, 64, 96, comps)  # multiples of 32: VAE 16 x patch 2
    with pytest.raises(ConfigError, match="--height 48: Wan needs a multiple of 32"):
        spec.check_shape(9, 48, 64, comps)
    with pytest.raises(ConfigError, match="inpaint"):
        spec.bind(comps, "inpaint", training_type="lora")


def test_ti2v_image_to_video_is_what_the_pipeline_samples():
    """WanImageToVideoPipeline with expand_timesteps (TI2V): the transformer's input at a sampling step (the first
    latent frame replaced by the image's latent) and its per-token timesteps (0 on the first frame's tokens) equal
    what ptrain's i2v conditioning and forward give it for the same noisy latents; the first frame is out of the
    loss; and text-to-video gets the pipeline's per-token timesteps too."""
    comps, t2v = _ti2v_components()
    assert comps.settings["expand_timesteps"] is True
    spec = get_spec("wan").bind(comps, "i2v", training_type="lora")
    assert spec.sampling_pipe.config.expand_timesteps
    pipe = WanImageToVideoPipeline(**{k: v for k, v in comps.as_pipeline_kwargs().items() if k != "image_encoder"},
                                   expand_timesteps=True)  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype("uint8"))
    tr, calls = comps.transformer, []
    real = tr.forward
    tr.forward = lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1]
    with torch.no_grad():
        pipe(image=image, prompt="a cat", height=64, width=64, num_frames=9, num_inference_steps=2,
             guidance_scale=1.0, output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
    seen = calls[0]
    t = seen["timestep"]
    assert t.shape == (1, 3 * 2 * 2) and float(t[0, :4].abs().max()) == 0 and float(t[0, 4:].min()) > 0

    video = pipe.video_processor.preprocess(image, height=64, width=64).unsqueeze(2)  # [-1, 1], one frame
    video = torch.cat([video, torch.zeros(1, 3, 8, 64, 64)], dim=2)
    latents = seen["hidden_states"].float()
    noisy = latents.clone()
    noisy[:, :, 0] = 7.0  # replaced by the image's latent
    p = Prepared(noisy, t[:, -1:].flatten().float(), torch.zeros_like(latents), torch.ones(1))
    cond = spec.encode_text(comps, ["a cat"], spec.max_sequence_length(comps))
    cond.tensors.update(spec.image_condition(comps, video[:, :, 0], tuple(latents.shape)))  # as the step does
    p, cond = spec.condition("i2v", comps, video, latents, p, cond, sample_generators(0, [0]))
    with torch.no_grad():
        spec.forward(tr, p.noisy, p.timesteps, cond)
    ours = calls[-1]
    assert torch.allclose(ours["hidden_states"].float(), latents, atol=1e-5)
    assert torch.allclose(ours["timestep"].float(), t.float())
    assert p.loss_mask[:, :, 0].sum() == 0 and bool((p.loss_mask[:, :, 1:] == 1).all())

    calls.clear()  # text-to-video: the per-token timesteps of WanPipeline (expand_timesteps)
    tr.forward = real
    normal = get_spec("wan").bind(comps, "normal")
    tr.forward = lambda *a, **kw: (calls.append(kw), real(*a, **kw))[1]
    with torch.no_grad():
        t2v(prompt="a cat", height=64, width=64, num_frames=9, num_inference_steps=2, guidance_scale=1.0,
            output_type="latent", generator=torch.Generator().manual_seed(0))  # fmt: skip
        seen = calls[0]
        normal.forward(tr, seen["hidden_states"], seen["timestep"][:, 0], cond)
    assert torch.equal(calls[-1]["timestep"].float(), seen["timestep"].float())
    assert math.isclose(float(seen["timestep"].std()), 0.0, abs_tol=0)
    tr.forward = real


def test_a_hub_id_fetches_the_trained_expert_and_the_other_only_to_validate(tiny_data, tmp_path, monkeypatch,
                                                                             single_process_env):  # fmt: skip
    """A Wan 2.2 A14B hub id (from an offline cache laid out as the hub's): --expert low_noise downloads
    transformer_2/'s weights and not transformer/'s (14B of weights it would not use); with validation both."""
    import ptrain.hub
    from ptrain.testing.hub_cache import add_snapshot
    from ptrain.trainer import train

    ckpt = write_tiny_checkpoint(tmp_path / "a14b", model_name="wan", variant="2.2-t2v")
    add_snapshot(tmp_path / "cache", "tiny-org/wan22-a14b", ckpt)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    asked: list[str] = []
    real = ptrain.hub.download
    monkeypatch.setattr(ptrain.hub, "download", lambda flag, repo, rev, allow, ignore, cache_only: (
        asked.extend(allow), real(flag, repo, rev, allow, ignore, cache_only))[1])  # fmt: skip
    args = ["--pretrained_model_name_or_path", "tiny-org/wan22-a14b", "--data_root", str(tiny_data), "--expert",
            "low_noise", "--train_steps", "1", "--checkpointing_steps", "0", *TINY_ARGS]  # fmt: skip
    train(parse_config([*args, "--output_dir", str(tmp_path / "o1")]))
    assert "transformer_2/*.safetensors" in asked and "transformer/*.safetensors" not in asked, asked
    asked.clear()
    train(parse_config([*args, "--output_dir", str(tmp_path / "o2"), "--validation_prompts", "a cat",
                        "--validation_num_inference_steps", "2"]))  # fmt: skip
    assert {"transformer_2/*.safetensors", "transformer/*.safetensors"} <= set(asked), asked


# --- the Wan 2.2 presets ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("preset", "variant", "extra"), [
    ("lora_a14b.toml", "2.2-t2v", []),
    ("lora_ti2v.toml", "2.2-ti2v", ["--train_mode", "i2v"]),
], ids=["a14b", "ti2v"])  # fmt: skip
def test_the_wan22_presets_train_their_checkpoints(preset, variant, extra, tiny_data, tmp_path, single_process_env):
    """configs/wan/lora_a14b.toml and lora_ti2v.toml, at a tiny size, train their checkpoint layouts: the A14B one
    its high-noise expert (the preset's --expert), and both adapt the FFN as DiffSynth-Studio's recipes do."""
    from conftest import REPO

    from ptrain.trainer import train

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", model_name="wan", variant=variant)
    out = tmp_path / "out"
    train(parse_config(["--config", str(REPO / "configs" / "wan" / preset), "--pretrained_model_name_or_path",
                        str(ckpt), "--data_root", str(tiny_data), "--output_dir", str(out), "--train_steps", "2",
                        "--checkpointing_steps", "0", "--dp_shards", "1", *TINY_ARGS, "--num_frames", "5",
                        *extra]))  # fmt: skip
    keys = load_file(out / "pytorch_lora_weights.safetensors")
    assert any(".ffn.net.0.proj.lora_A" in k for k in keys) and any(".attn2.to_k.lora_B" in k for k in keys)
