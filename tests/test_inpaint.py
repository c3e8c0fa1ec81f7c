"""--train_mode inpaint for every model, Wan image-to-video, and LoRA from a text-to-video checkpoint whose input
layer the mode widens (issue 4): mask semantics, step 0 equal to the text-to-video model, conditioning equal to
what the diffusers image-to-video pipeline builds, FSDP 2 vs 1 process loss parity, and exports that load and
generate."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import MODELS, TINY_ARGS, first_error, lora_changes_the_sample, run_ptrain
from PIL import Image

from ptrain.config import ConfigError, ModelArgs, ObjectiveArgs
from ptrain.models.conditioning import latent_keep_mask, sample_keep_mask
from ptrain.models.spec import Components, get_spec
from ptrain.objectives import sample_generators
from ptrain.testing.tiny import build_tiny_pipeline, write_tiny_checkpoint

# Mean absolute difference of the frames in [0, 1] (or of the prediction where diffusers has no pipeline) that a
# LoRA trained 3 steps must make to a 2-step sample. Measured:
# 1.5e-4 (Wan inpaint) to 1.4e-2 (LTX-Video i2v); the same seed twice gives identical frames (difference 0).


def _video(seed: int = 2, batch: int = 2) -> torch.Tensor:
    return torch.rand(batch, 3, 9, 32, 32, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_keep_masks_types_and_latent_grid():
    gens = sample_generators(0, range(64))
    probs = ModelArgs().mask_probs()
    keep, kinds = sample_keep_mask("inpaint", probs, (64, 3, 9, 32, 32), gens)
    again, _ = sample_keep_mask("inpaint", probs, (64, 3, 9, 32, 32), sample_generators(0, range(64)))
    assert torch.equal(keep, again) and set(kinds) == {"block", "frames", "first_frame", "full"}
    for k, kind in zip(keep, kinds):
        per_frame = k.flatten(2).mean(-1).squeeze(0)  # fraction given per frame
        if kind == "first_frame":
            assert per_frame.tolist() == [1.0] + [0.0] * 8
        elif kind == "full":
            assert k.sum() == 0
        elif kind == "frames":  # whole frames, some given and some generated
            assert set(per_frame.tolist()) == {0.0, 1.0}
        else:  # one rectangle generated, the same in every frame
            assert 0 < per_frame[0] < 1 and torch.equal(k[:, 0], k[:, 5])
    only_block, kinds = sample_keep_mask("inpaint", {"block": 1.0}, (4, 3, 9, 32, 32), gens[:4])
    assert kinds == ["block"] * 4
    i2v, kinds = sample_keep_mask("i2v", probs, (2, 3, 9, 32, 32), gens[:2])
    assert kinds == ["first_frame"] * 2
    # a latent cell is given only when all of its pixels are: 1 + 2 pixel frames per latent frame, 8x8 pixels
    pixel = torch.ones(1, 1, 5, 16, 16)
    pixel[:, :, 4, 0, 0] = 0  # one pixel of the last frame generated
    cells = latent_keep_mask(pixel, (1, 4, 3, 2, 2), temporal=2)
    assert cells.shape == (1, 1, 3, 2, 2) and cells.sum() == 11 and cells[0, 0, 2, 0, 0] == 0
    packed = latent_keep_mask(i2v[:1], (1, 16, 3, 4, 4), temporal=4, packed=True)
    assert packed.shape == (1, 4, 3, 4, 4) and packed[:, :, 0].min() == 1 and packed[:, :, 1:].max() == 0
    with pytest.raises(ConfigError, match="--inpaint_mask_probs 'blok=1'.*unknown: blok"):
        ModelArgs(inpaint_mask_probs="blok=1").mask_probs()


@pytest.mark.parametrize("model", MODELS)
def test_inpaint_step0_equals_text_to_video(model):
    """The widened input layer starts at zero: the inpaint model's first prediction is the T2V model's. LTX-Video
    conditions by clean tokens (no widening): its given tokens are clean, at timestep 0 and out of the loss."""
    spec, comps = get_spec(model), Components.from_pipeline(build_tiny_pipeline(model, seed=0))
    t2v = build_tiny_pipeline(model, seed=0).transformer
    spec = spec.bind(comps, "inpaint", {"block": 1.0}, "lora")
    c = comps.vae.config.get("latent_channels") or comps.vae.config.z_dim
    expected = {"ltx_video": c, "cogvideox": 2 * c + 1, "hunyuan_video": 2 * c + 1, "wan": 2 * c + 4}[model]
    assert comps.transformer.config.in_channels == expected
    assert spec.expanded_input == (None if model == "ltx_video" else spec.input_layer)
    video, gens = _video(), sample_generators(0, [0, 1])
    latents = spec.encode_video(comps, video, gens)
    prepared = spec.make_objective(ObjectiveArgs(), comps).prepare(latents, gens)
    cond = spec.encode_text(comps, ["a red ball", "a cat"], spec.max_sequence_length(comps))
    p2, c2 = spec.condition("inpaint", comps, video, latents, prepared, cond, gens)
    with torch.no_grad():
        widened = spec.forward(comps.transformer, p2.noisy, p2.timesteps, c2)
        plain = spec.forward(t2v, p2.noisy, p2.timesteps, cond)
    torch.testing.assert_close(widened, plain)
    if model == "ltx_video":
        given = 1 - p2.loss_mask  # (B, 1, F', h, w): cells a block mask leaves whole
        assert 0 < given.mean() < 1
        assert torch.equal(p2.timesteps == 0, given.flatten(1).bool())  # frame-major tokens, patch 1
        assert not torch.equal(p2.noisy * given, prepared.noisy * given)  # given cells are clean, not noised
    else:
        extra = c2.tensors["concat_latents"]
        assert extra.shape[1] == expected - c and extra.shape[2:] == latents.shape[2:]


def test_cogvideox_inpaint_conditioning_is_cogvideox_funs():
    """The seventh audit: CogVideoX inpaint as VideoX-Fun trains and samples CogVideoX-Fun InP (its train.py and
    CogVideoX_Fun_Pipeline_Inpaint): generated pixels set to -1 before encoding, the mask channel times the VAE's
    scaling factor, and all zeros where nothing is given. ptrain had filled 0 and left the mask at 1."""
    spec, comps = get_spec("cogvideox"), Components.from_pipeline(build_tiny_pipeline("cogvideox", seed=0))
    spec = spec.bind(comps, "inpaint", {"first_frame": 0.5, "full": 0.5}, "lora")
    sf = comps.vae.config.scaling_factor
    assert sf != 1
    video, gens = _video(batch=8), sample_generators(0, range(8))
    latents = spec.encode_video(comps, video, gens)
    cond = spec.encode_text(comps, ["a red ball"] * 8, spec.max_sequence_length(comps))
    _, kinds = sample_keep_mask("inpaint", {"first_frame": 0.5, "full": 0.5}, tuple(video.shape),
                                sample_generators(0, range(8)))  # fmt: skip
    assert set(kinds) == {"first_frame", "full"}
    _, c2 = spec.condition("inpaint", comps, video, latents, None, cond, sample_generators(0, range(8)))
    extra = c2.tensors["concat_latents"]
    c = latents.shape[1]
    for i, kind in enumerate(kinds):
        mask, given = extra[i, :1], extra[i, 1:]
        if kind == "full":
            assert not extra[i].any()
            continue
        assert torch.equal(mask[:, 0], torch.full_like(mask[:, 0], sf)) and not mask[:, 1:].any()
        black = video[i : i + 1].clone()
        black[:, :, 1:] = -1  # the generated frames, black
        want = spec.condition_latents(comps, black)[0]
        torch.testing.assert_close(given, want.to(given))
        assert given.shape[0] == c


def test_wan_i2v_conditioning_equals_the_pipeline():
    """Mask, condition latents and CLIP image embeddings equal what WanImageToVideoPipeline builds for the image."""
    spec, comps = get_spec("wan"), Components.from_pipeline(build_tiny_pipeline("wan", seed=0, variant="i2v"))
    spec = spec.bind(comps, "i2v", training_type="lora")
    assert spec.expanded_input is None  # the I2V checkpoint has the 36 channels
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    video = _video(batch=1)
    video[0, :, 0] = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    gens = sample_generators(0, [0])
    latents = spec.encode_video(comps, video, gens)
    cond = spec.encode_text(comps, ["a red ball"], 512)
    cond.tensors.update(spec.image_condition(comps, video[:, :, 0], tuple(latents.shape)))  # as the step does
    _, cond = spec.condition("i2v", comps, video, latents, None, cond, gens)
    pipe = spec.sampling_pipe
    image = pipe.video_processor.preprocess(Image.fromarray(img), height=32, width=32)
    with torch.no_grad():
        _, reference = pipe.prepare_latents(image, 1, 16, 32, 32, 9, torch.float32, torch.device("cpu"), None)
        embeds = pipe.encode_image(Image.fromarray(img), torch.device("cpu"))
    torch.testing.assert_close(cond.tensors["concat_latents"], reference)
    torch.testing.assert_close(cond.tensors["encoder_hidden_states_image"], embeds)
    with pytest.raises(ConfigError, match=r"takes 36 input channels .* train it with --train_mode i2v or inpaint"):
        spec.check_mode("normal", comps, "lora")


def _args(ckpt, data, model, mode, *extra):
    return ["--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--data_root", str(data),
            "--train_steps", "3", "--seed", "5", "--lr", "1e-3", "--checkpointing_steps", "0", "--train_mode", mode,
            "--rank", "4", "--lora_alpha", "4", *TINY_ARGS, *extra]  # fmt: skip


def _parity(ckpt, data, model, mode, tmp_path, *extra):
    one = run_ptrain(1, _args(ckpt, data, model, mode, "--batch_size", "2", *extra), tmp_path / "one")
    two = run_ptrain(2, _args(ckpt, data, model, mode, "--batch_size", "1", "--dp_shards", "2", *extra),
                     tmp_path / "two")  # fmt: skip
    assert one.returncode == 0 and two.returncode == 0, first_error(one.stderr + two.stderr)
    assert len(two.losses) == 3 and all(np.isfinite(two.losses))
    np.testing.assert_allclose(two.losses, one.losses, rtol=1e-4)
    return two


def _generate(pipe, image, frames=9):
    """2 steps from a fixed seed, the frames with the loaded LoRA, checked to differ from those without it."""
    return lora_changes_the_sample(pipe, lambda: pipe(
        image=image, prompt="a red ball", height=32, width=32, num_frames=frames, num_inference_steps=2,
        output_type="np", generator=torch.Generator().manual_seed(0),
        **({"max_sequence_length": pipe.transformer.config.max_text_seq_length}
           if "CogVideoX" in type(pipe).__name__ else {})).frames[0])  # fmt: skip


@pytest.mark.heavy  # suite time; CI runs it
@pytest.mark.parametrize("model", MODELS)
def test_inpaint_lora_from_t2v_parity_and_export(model, tiny_ckpts, tiny_data, tmp_path):
    """LoRA inpaint from the text-to-video checkpoint: FSDP 2 = 1 process; the widened input layer is exported
    beside the LoRA, goes back into the base transformer, and the result samples (in the image-to-video pipeline
    where diffusers has one for the layout)."""
    from ptrain.export import load_expanded_transformer

    ckpt = tiny_ckpts(model)
    two = _parity(ckpt, tiny_data, model, "inpaint", tmp_path)
    spec = get_spec(model)
    out = tmp_path / "two"
    if model == "ltx_video":  # clean-token conditioning: no new channels, a plain LoRA
        assert not (out / "input_layer.safetensors").exists()
    else:
        assert (out / "input_layer.safetensors").is_file() and "LoRA trains this layer fully" in two.stderr
        transformer = load_expanded_transformer(spec.transformer_cls, ckpt, out, torch_dtype=torch.float32)
        assert transformer.config.in_channels == spec.mode_in_channels("inpaint", Components.from_pipeline(
            build_tiny_pipeline(model, seed=0)))  # fmt: skip
    image = Image.fromarray(np.full((32, 48, 3), 200, np.uint8))
    if spec.inpaint_pipeline_cls is not None:
        kwargs = {} if model == "ltx_video" else {"transformer": transformer}
        pipe = spec.inpaint_pipeline_cls.from_pretrained(ckpt, dtype=torch.float32, **kwargs)
        pipe.load_lora_weights(out)
        assert _generate(pipe, image).shape == (9, 32, 32, 3)
    else:  # diffusers has no pipeline for this layout: the widened model with the LoRA still runs
        pipe = spec.pipeline_cls.from_pretrained(ckpt, transformer=transformer, dtype=torch.float32)
        pipe.load_lora_weights(out)
        comps = Components.from_pipeline(pipe)
        spec = spec.bind(comps, "inpaint")
        video, gens = _video(batch=1), sample_generators(0, [0])
        latents = spec.encode_video(comps, video, gens)
        cond = spec.encode_text(comps, ["a red ball"], spec.max_sequence_length(comps))
        prepared = spec.make_objective(ObjectiveArgs(), comps).prepare(latents, gens)
        _, cond = spec.condition("inpaint", comps, video, latents, prepared, cond, gens)
        with torch.no_grad():
            pred = lora_changes_the_sample(pipe, lambda: spec.forward(pipe.transformer, prepared.noisy,
                                                                       prepared.timesteps, cond).numpy())  # fmt: skip
        assert pred.shape == latents.shape


@pytest.mark.parametrize("model", ["wan", pytest.param("hunyuan_video", marks=pytest.mark.heavy)])
def test_i2v_lora_parity_validation_and_pipeline(model, tiny_data, tmp_path):
    """Wan 2.1 I2V (CLIP image embeddings + mask + condition latents) and HunyuanVideo-I2V (Llava prompt with the
    image, latent_concat), each from its tiny I2V checkpoint: FSDP 2 = 1 process, validation through the model's
    image-to-video pipeline, and the LoRA loads there and generates."""
    ckpt = write_tiny_checkpoint(tmp_path / "i2v", model, variant="i2v")
    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((40, 56, 3)) * 255).astype(np.uint8)).save(image)
    val = ["--validation_prompts", "a red ball", "--validation_images", str(image), "--validation_steps", "3",
           "--validation_num_inference_steps", "2"]  # fmt: skip
    _parity(ckpt, tiny_data, model, "i2v", tmp_path, *val)
    assert len(list((tmp_path / "two" / "validation" / "step-3").glob("*.mp4"))) == 1

    pipe = get_spec(model).i2v_pipeline_cls.from_pretrained(ckpt, dtype=torch.float32)
    pipe.load_lora_weights(tmp_path / "two")
    frames = _generate(pipe, Image.open(image).convert("RGB"))
    # HunyuanVideo's I2V pipeline drops the conditioning latent frame's 4 frames
    assert frames.shape == ((5 if model == "hunyuan_video" else 9), 32, 32, 3)


@pytest.mark.slow
@pytest.mark.heavy  # four runs up to the error, about 45 s: CI runs it
def test_inpaint_errors(tiny_ckpts, tiny_data, tmp_path):
    """Bad inpaint settings stop before training with the flag named."""
    ckpt = tiny_ckpts("cogvideox")
    cases = [
        (["--validation_prompts", "a cat", "--validation_steps", "1"], "no pipeline that samples cogvideox's inpaint"),
        (["--enable_precomputation"], "cannot use --enable_precomputation"),
        (["--inpaint_mask_probs", "block=-1"], "--inpaint_mask_probs 'block=-1'"),
        (["--export_comfyui"], "--export_comfyui: this run widens patch_embed.proj"),
    ]
    for extra, message in cases:
        run = run_ptrain(1, _args(ckpt, tiny_data, "cogvideox", "inpaint", *extra), tmp_path / "err")
        assert run.returncode != 0 and message in run.stderr, (extra, first_error(run.stderr))


def test_first_frame_images_from_the_dataset(tiny_data, tiny_ckpt, tmp_path):
    """A row's image beside its video is the first frame i2v conditions on; a missing one is a named skip; the
    run trains with them, precomputed or not, to the same losses."""
    import csv

    from ptrain.config import DataArgs
    from ptrain.data import VideoDataset, scan_dataset
    from ptrain.data.video import FrameSampling

    rows = list(csv.DictReader((tiny_data / "metadata.csv").open()))
    Image.fromarray(np.full((40, 40, 3), 255, np.uint8)).save(tiny_data / "white.png")
    table = tmp_path / "table.csv"
    with table.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "video", "image"])
        for i, r in enumerate(rows):
            w.writerow([r["caption"], r["video"], "white.png" if i % 2 == 0 else ("gone.png" if i == 1 else "")])
    args = DataArgs(dataset_file=table, data_root=tiny_data, height=32, width=32, num_frames=9)
    sampling = FrameSampling.from_args(args)
    usable = scan_dataset(args, sampling)
    assert len(usable.records) == len(rows) - 1 and any("gone.png" in why for why in usable.skipped.values())
    ds = VideoDataset(usable.records, args, sampling, seed=0)
    with_image = next(i for i, r in enumerate(usable.records) if r.first_frame is not None)
    without = next(i for i, r in enumerate(usable.records) if r.first_frame is None)
    torch.testing.assert_close(ds[with_image, 0]["first_frame"], torch.ones(3, 32, 32))  # white, bucket size
    item = ds[without, 0]
    assert torch.equal(item["first_frame"], item["video"][:, 0])  # the clip's own first frame

    base = ["--model_name", "ltx_video", "--pretrained_model_name_or_path", str(tiny_ckpt), "--dataset_file",
            str(table), "--data_root", str(tiny_data), "--train_steps", "2", "--train_mode", "i2v",
            "--checkpointing_steps", "0", *TINY_ARGS]  # fmt: skip
    run = run_ptrain(1, base, tmp_path / "run")
    assert run.returncode == 0 and len(run.losses) == 2 and all(np.isfinite(run.losses)), first_error(run.stderr)
    # precomputation stores each row's first-frame conditioning from its image (tests/test_i2v_precompute.py)
    pre = run_ptrain(1, [*base, "--enable_precomputation"], tmp_path / "pre")
    assert pre.returncode == 0, first_error(pre.stderr)
    np.testing.assert_allclose(pre.losses, run.losses, rtol=1e-5)


def test_hunyuan_i2v_conditioning_equals_the_pipeline_and_mode_errors():
    """HunyuanVideo-I2V (latent_concat): the Llava prompt embeddings with the image, the image latents and the
    mask equal what HunyuanVideoImageToVideoPipeline builds; a Llama (T2V) checkpoint cannot train i2v and a Llava
    one trains only i2v."""
    spec, comps = get_spec("hunyuan_video"), Components.from_pipeline(build_tiny_pipeline("hunyuan_video", seed=0, variant="i2v"))
    spec = spec.bind(comps, "i2v", training_type="lora")
    img = (np.random.default_rng(0).random((32, 32, 3)) * 255).astype(np.uint8)
    video = _video(batch=1)
    video[0, :, 0] = torch.from_numpy(img).permute(2, 0, 1).float() / 127.5 - 1
    gens = sample_generators(0, [0])
    latents = spec.encode_video(comps, video, gens)
    assert spec.text_needs_image("i2v") and not spec.text_needs_image("inpaint")
    cond = spec.encode_text(comps, ["a red ball"], 256, images=video[:, :, 0])
    cond.tensors.update(spec.image_condition(comps, video[:, :, 0], tuple(latents.shape)))  # as the step does
    _, cond = spec.condition("i2v", comps, video, latents, None, cond, gens)
    pipe = spec.sampling_pipe
    image = pipe.video_processor.preprocess(Image.fromarray(img), 32, 32)
    with torch.no_grad():
        _, image_latents = pipe.prepare_latents(image, 1, 16, 32, 32, 9, torch.float32, torch.device("cpu"), None)
        embeds, pooled, mask = pipe.encode_prompt(image=Image.fromarray(img), prompt="a red ball",
                                                  device=torch.device("cpu"), max_sequence_length=256)  # fmt: skip
    image_latents[:, :, 1:] = 0  # as the pipeline's latent_concat input
    keep = torch.zeros_like(image_latents[:, :1])
    keep[:, :, 0] = 1
    torch.testing.assert_close(cond.tensors["concat_latents"], torch.cat([image_latents, keep], dim=1))
    torch.testing.assert_close(cond.tensors["encoder_hidden_states"], embeds)
    torch.testing.assert_close(cond.tensors["pooled_projections"], pooled)
    assert torch.equal(cond.tensors["encoder_attention_mask"], mask)
    with pytest.raises(ConfigError, match="train it with --train_mode i2v, not inpaint"):
        spec.check_mode("inpaint", comps, "lora")
    t2v = Components.from_pipeline(build_tiny_pipeline("hunyuan_video", seed=0))
    with pytest.raises(ConfigError, match="needs HunyuanVideo-I2V's text encoder"):
        get_spec("hunyuan_video").check_mode("i2v", t2v, "lora")
