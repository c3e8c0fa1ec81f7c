"""The memory planner on the conditioned train modes (i2v, inpaint): Wan 2.1 I2V's CLIP, Wan's inpaint masks, Wan 2.2
TI2V's clean first frame, HunyuanVideo-I2V's Llava prompt, and an i2v step that reads its conditioning from the
precomputation cache. (A file of its own, so that test_planner.py does not hold one pytest worker alone.)"""

from __future__ import annotations

import pytest
import torch

from ptrain.models.spec import get_spec
from ptrain.planner import simulate


@pytest.mark.parametrize("variant,mode", [("i2v", "i2v"), ("t2v", "inpaint"), ("2.2-ti2v", "i2v")])
def test_the_planner_runs_wans_conditioned_modes(tmp_path, variant, mode):
    """Wan's conditioning runs inside the planned step: the VAE encodes the conditioning frames (its encoder once per
    chunk of frames), inpaint draws its masks, Wan 2.1 I2V's CLIP encodes the first frame, Wan 2.2 TI2V keeps a
    clean first frame with per-token timesteps (its model_index.json's expand_timesteps). Each used to stop the
    planner (and with it --enable_tiling auto at a GPU run's start)."""
    from ptrain.testing.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / variant, model_name="wan", variant=variant)
    flags = ["--model_name", "wan", "--num_frames", "9", "--height", "64", "--width", "64", "--train_mode", mode]
    got = simulate(flags, 1, ckpt, vae_phases=False)
    assert got["peak_bytes"] > 0 and got["tokens"] == 3 * (4 if variant == "2.2-ti2v" else 16)
    if mode == "i2v":  # precomputed, the first frame's conditioning is read from the cache: no encode in the step
        pre = simulate([*flags, "--enable_precomputation", "on"], 1, ckpt, vae_phases=False)
        assert 0 < pre["peak_bytes"] < got["peak_bytes"]
    if variant == "2.2-ti2v":  # no input channels added: the clean first frame is in the latents
        normal = simulate(flags[:-2], 1, ckpt, vae_phases=False)
        assert got["params_total"] == normal["params_total"] and got["latent_shape"][1] == 48
    # the model FLOPs ptrain's mfu counts at start-up run the same conditioning (Wan 2.1 I2V: CLIP on fake tensors)
    from ptrain.config import parse_config
    from ptrain.flops import step_flops

    cfg = parse_config(["--data_root", "x", "--pretrained_model_name_or_path", str(ckpt), *flags])
    key, model_flops, _ = step_flops(cfg, get_spec("wan"), ckpt, 9, 64, 64)
    assert model_flops > 0 and key[0] == (48 if variant == "2.2-ti2v" else 16)


def test_the_planner_runs_hunyuan_video_i2v(tmp_path):
    """HunyuanVideo-I2V: the planner knows the checkpoint's Llava text encoder (checkpoint_classes; it used to
    refuse the mode, seeing none), sizes it among the resident encoders, and simulates the Llava prompt's length (the
    image's tokens, then the text), which the real encoding matches. Wan 2.1 I2V's CLIP counts as resident too."""
    import numpy as np

    from ptrain.models.spec import Components
    from ptrain.planner import encoder_bytes
    from ptrain.testing.tiny import build_tiny_pipeline, write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "hy", model_name="hunyuan_video", variant="i2v")
    flags = ["--model_name", "hunyuan_video", "--num_frames", "9", "--height", "32", "--width", "32",
             "--train_mode", "i2v"]  # fmt: skip
    fly = simulate(flags, 1, ckpt, vae_phases=False)
    pre = simulate([*flags, "--enable_precomputation", "on"], 1, ckpt, vae_phases=False)
    assert 0 < pre["peak_bytes"] < fly["peak_bytes"]
    dtypes = {"vae": torch.float32, "text_encoder": torch.bfloat16, "text_encoder_2": torch.bfloat16}
    llava = build_tiny_pipeline("hunyuan_video", seed=0, variant="i2v").text_encoder
    assert encoder_bytes(get_spec("hunyuan_video"), ckpt, dtypes)["text_encoder"] == 2 * llava.num_parameters()

    pipe = build_tiny_pipeline("hunyuan_video", seed=0, variant="i2v")
    comps = Components.from_pipeline(pipe)
    spec = get_spec("hunyuan_video").bind(comps, "i2v", training_type="lora")
    image = torch.from_numpy(np.random.default_rng(0).random((1, 3, 32, 32))).float() * 2 - 1
    real = spec.encode_text(comps, ["a red ball"], 64, images=image).tensors
    simulated = spec.simulated_conditioning(comps.transformer.config, 1, 64, "cpu", torch.float32).tensors
    assert {k: v.shape for k, v in simulated.items()} == {k: v.shape for k, v in real.items()}

    wan = write_tiny_checkpoint(tmp_path / "wan", model_name="wan", variant="i2v")
    assert encoder_bytes(get_spec("wan"), wan, dtypes)["image_encoder"] > 0


def test_validation_keeps_wans_clip_where_the_encoders_stay(tmp_path):
    """Wan 2.1 I2V trained on the fly keeps its CLIP image encoder on the device beside the text encoders, so the
    planned validation phase counts it; with --offload_encoders validation streams the text encoder a layer at a
    time and brings no resident CLIP."""
    import numpy as np
    from PIL import Image

    from ptrain.testing.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "wan", model_name="wan", variant="i2v")
    image = tmp_path / "first.png"
    Image.fromarray((np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)).save(image)
    flags = ["--model_name", "wan", "--num_frames", "9", "--height", "64", "--width", "64", "--train_mode", "i2v",
             "--validation_prompts", "a cat", "--validation_images", str(image), "--validation_steps", "2"]  # fmt: skip
    resident = simulate(flags, 1, ckpt)
    val = resident["phases"]["validation"]["categories"]
    clip = resident["vae"]["encoder_bytes"]["image_encoder"]
    assert val["Image encoder"] == clip > 0 and val["Text encoders"] > 0
    assert resident["phases"]["forward_backward"]["categories"]["Image encoder (resident)"] == clip
    offloaded = simulate([*flags, "--offload_encoders"], 1, ckpt)["phases"]["validation"]
    assert "Image encoder" not in offloaded["categories"] and "Text encoders" not in offloaded["categories"]
    assert offloaded["categories"]["Text encoder layer (streamed)"] > 0
    assert resident["phases"]["validation"]["peak_bytes"] > offloaded["peak_bytes"]
