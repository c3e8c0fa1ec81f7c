"""--train_mode i2v (issue 4, LTX-Video and CogVideoX): conditioning semantics, T2V -> I2V channel expansion
(step 0 equals the T2V model), loss parity FSDP 2 vs 1 process, and exports that the diffusers image-to-video
pipelines load and sample from."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_ARGS, first_error, lora_changes_the_sample, run_ptrain
from PIL import Image

from ptrain.config import ConfigError, ObjectiveArgs
from ptrain.models.spec import Components, Conditioning, get_spec
from ptrain.objectives import FlowMatching, sample_generators
from ptrain.testing.tiny import build_tiny_pipeline, write_tiny_checkpoint

# Mean absolute difference (frames in [0, 1]) that a LoRA trained 3 steps must make to a 2-step sample. Measured:
# 1.5e-4 (Wan inpaint) to 1.4e-2 (LTX-Video i2v); the same seed twice gives identical frames (difference 0).


@pytest.fixture(scope="module")
def first_frame(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "first.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(path)
    return path


def _args(ckpt, data, model, *extra):
    return ["--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
            "--train_steps", "3", "--seed", "5", "--lr", "1e-3", "--checkpointing_steps", "0", "--train_mode", "i2v",
            *TINY_ARGS, *extra]  # fmt: skip


def test_ltx_i2v_condition_first_frame_clean_timestep_zero_and_unscored():
    pipe = build_tiny_pipeline("ltx_video", seed=0)
    spec, comps = get_spec("ltx_video"), Components.from_pipeline(pipe)
    spec = spec.bind(comps, "i2v")
    latents = torch.randn(2, 8, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    gens = sample_generators(0, [0, 1])
    fm = FlowMatching(ObjectiveArgs(), 1.0)
    given = Conditioning({"first_latents": latents[:, :, :1]})  # image_condition's: the first frame encoded alone
    prepared, cond = spec.condition("i2v", comps, None, latents, fm.prepare(latents, gens), given, gens)
    assert "first_latents" not in cond.tensors  # used up: forward does not take it
    assert torch.equal(prepared.noisy[:, :, 0], latents[:, :, 0])
    assert not torch.equal(prepared.noisy[:, :, 1], latents[:, :, 1])
    per_frame = prepared.timesteps.view(2, 3, -1)  # tokens are frame-major (patch 1)
    assert (per_frame[:, 0] == 0).all() and (per_frame[:, 1:] > 0).all()
    pred = prepared.target.clone()
    pred[:, :, 0] += 100.0  # errors on the conditioning frame do not count
    assert fm.loss(pred, prepared).item() == 0.0


def test_cogvideox_expansion_step0_equals_t2v_and_mode_errors():
    pipe = build_tiny_pipeline("cogvideox", seed=0, variant="2b")
    spec = get_spec("cogvideox")
    comps = Components.from_pipeline(pipe)
    t2v = build_tiny_pipeline("cogvideox", seed=0, variant="2b").transformer
    spec = spec.bind(comps, "i2v", training_type="full-finetune")
    assert comps.transformer.config.in_channels == 32 and comps.transformer.patch_embed.proj.weight.shape[1] == 32
    noisy = torch.randn(1, 16, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    cond = spec.encode_text(comps, ["a red ball"], spec.max_sequence_length(comps))
    video = torch.rand(1, 3, 9, 32, 32, generator=torch.Generator().manual_seed(2)) * 2 - 1
    gens = sample_generators(0, [0])
    _, cond_i2v = spec.condition("i2v", comps, video, noisy, None, cond, gens)
    assert cond_i2v.tensors["concat_latents"].shape == noisy.shape
    assert cond_i2v.tensors["concat_latents"][:, :, 1:].abs().max() == 0  # zero latent frames after the image
    t = torch.tensor([500])
    with torch.no_grad():
        expanded = spec.forward(comps.transformer, noisy, t, cond_i2v)
        plain = spec.forward(t2v, noisy, t, cond)
    torch.testing.assert_close(expanded, plain)  # the new channels start at zero: step 0 is the T2V model
    with pytest.raises(ConfigError, match=r"takes 32 input channels .* train it with --train_mode i2v"):
        spec.check_mode("normal", comps, "lora")
    with pytest.raises(ConfigError, match=r"--train_mode inpaint needs 33: train it with --train_mode i2v"):
        spec.check_mode("inpaint", comps, "lora")


def test_ltx_i2v_lora_parity_and_pipeline(tiny_data, first_frame, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "ltx-i2v", "ltx_video", variant="i2v")
    val = ["--validation_prompts", "a red ball", "--validation_images", str(first_frame), "--validation_steps", "3",
           "--validation_num_inference_steps", "2", "--validation_num_frames", "9"]  # fmt: skip
    one = run_ptrain(1, _args(ckpt, tiny_data, "ltx_video", "--batch_size", "2"), tmp_path / "one")
    two = run_ptrain(2, _args(ckpt, tiny_data, "ltx_video", "--batch_size", "1", "--dp_shards", "2", *val),
                     tmp_path / "two")  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, first_error(one.stderr + two.stderr)
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-4)
    assert len(list((tmp_path / "two" / "validation" / "step-3").glob("*.mp4"))) == 1

    from diffusers import LTXImageToVideoPipeline

    pipe = LTXImageToVideoPipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "two")
    frames = lora_changes_the_sample(pipe, lambda: pipe(
        image=Image.open(first_frame).convert("RGB"), prompt="a red ball", height=32, width=64, num_frames=9,
        num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)).frames[0])  # fmt: skip
    assert frames.shape == (9, 32, 64, 3)


def test_cogvideox_i2v_full_finetune_from_t2v_parity_and_export(tiny_ckpts, tiny_data, tmp_path):
    ckpt = tiny_ckpts("cogvideox")  # text-to-video: the image channels are added
    extra = ["--training_type", "full-finetune", "--lr", "1e-4"]
    one = run_ptrain(1, _args(ckpt, tiny_data, "cogvideox", *extra, "--batch_size", "2"), tmp_path / "one")
    two = run_ptrain(2, _args(ckpt, tiny_data, "cogvideox", *extra, "--batch_size", "1", "--dp_shards", "2"),
                     tmp_path / "two")  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, first_error(one.stderr + two.stderr)
    assert "expanded from 16 to 32 input channels" in two.stderr
    assert ".export-tmp" not in two.stderr  # huggingface_hub's "saved to" named the emptied staging folder
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-4)

    from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

    transformer = CogVideoXTransformer3DModel.from_pretrained(tmp_path / "two" / "transformer")
    assert transformer.config.in_channels == 32
    pipe = CogVideoXImageToVideoPipeline.from_pretrained(ckpt, transformer=transformer, dtype=torch.float32)
    image = Image.fromarray(np.full((32, 48, 3), 200, np.uint8))
    frames = pipe(image=image, prompt="a red ball", height=32, width=32, num_frames=9, num_inference_steps=2,
                  max_sequence_length=transformer.config.max_text_seq_length, output_type="np").frames[0]  # fmt: skip
    assert frames.shape == (9, 32, 32, 3)


def test_cogvideox15_i2v_lora_loads_in_pipeline(tiny_data, first_frame, tmp_path):
    ckpt = write_tiny_checkpoint(tmp_path / "cog15-i2v", "cogvideox", variant="1.5-i2v")  # has the ofs embedding
    args = _args(ckpt, tiny_data, "cogvideox", "--num_frames", "13", "--batch_size", "1", "--dp_shards", "2",
                 "--rank", "4", "--lora_alpha", "8")  # fmt: skip
    run = run_ptrain(2, args, tmp_path / "run")
    assert run.returncode == 0, first_error(run.stderr)
    assert len(run.losses) == 3 and all(np.isfinite(run.losses))

    from diffusers import CogVideoXImageToVideoPipeline

    pipe = CogVideoXImageToVideoPipeline.from_pretrained(ckpt, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "run")
    assert next(iter(pipe.transformer.peft_config.values())).lora_alpha == 8
    frames = lora_changes_the_sample(pipe, lambda: pipe(
        image=Image.open(first_frame).convert("RGB"), prompt="a dog", height=32, width=32, num_frames=13,
        num_inference_steps=2, max_sequence_length=pipe.transformer.config.max_text_seq_length, output_type="np",
        generator=torch.Generator().manual_seed(0)).frames[0])  # fmt: skip
    assert frames.shape[1:] == (32, 32, 3) and frames.shape[0] >= 13
