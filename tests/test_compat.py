"""Other trainers' command lines: aliases, value translation, rejected flags, epochs and --fps sampling."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
import torch
from conftest import REPO, run_ptrain

from ptrain.config import ConfigError, parse_config
from ptrain.data.video import FrameSampling, fps_indices, load_clip, probe
from ptrain.testing.tiny import write_video

# The CogVideoX diffusers LoRA script's documented command (finetune README), launcher and paths rewritten.
COGVIDEOX_SEED = (
    "--model_name cogvideox --pretrained_model_name_or_path {ckpt} --instance_data_root {data} "
    "--caption_column prompts.txt --video_column videos.txt --validation_prompt 'a red ball:::a dog' "
    "--validation_prompt_separator ::: --num_validation_videos 1 --seed 42 --rank 128 --lora_alpha 64 "
    "--mixed_precision bf16 --output_dir {out} --height 480 --width 720 --fps 8 --max_num_frames 49 "
    "--train_batch_size 1 --num_train_epochs 10 --checkpointing_steps 500 --gradient_accumulation_steps 1 "
    "--learning_rate 1e-4 --lr_scheduler cosine_with_restarts --lr_warmup_steps 200 --lr_num_cycles 1 "
    "--optimizer AdamW --adam_beta1 0.9 --adam_beta2 0.95 --max_grad_norm 1.0 --gradient_checkpointing "
    "--report_to tensorboard"
)
# finetrainers-style flags (same names as ptrain's where they overlap).
FINETRAINERS_SEED = (
    "--model_name ltx_video --pretrained_model_name_or_path {ckpt} --data_root {data} --training_type lora "
    "--rank 128 --lora_alpha 128 --target_modules to_q to_k to_v to_out.0 --train_steps 3000 --batch_size 1 "
    "--gradient_accumulation_steps 4 --gradient_checkpointing --optimizer adamw --lr 3e-5 --beta1 0.9 "
    "--beta2 0.95 --weight_decay 1e-4 --epsilon 1e-8 --max_grad_norm 1.0 --flow_weighting_scheme logit_normal "
    "--seed 42 --output_dir {out}"
)
# VideoX-Fun scripts/wan2.1/train_lora.sh style.
VIDEOX_FUN_SEED = (
    "--model_name wan --pretrained_model_name_or_path {ckpt} --train_data_dir {data} "
    "--train_data_meta {data}/metadata.csv --video_sample_n_frames 81 --train_batch_size 1 "
    "--gradient_accumulation_steps 1 --dataloader_num_workers 8 --num_train_epochs 100 --checkpointing_steps 50 "
    "--learning_rate 1e-04 --seed 42 --output_dir {out} --gradient_checkpointing --mixed_precision bf16 "
    "--adam_weight_decay 3e-2 --adam_epsilon 1e-10 --max_grad_norm 0.05 --rank 64 --lora_alpha 32 --use_came"
)


def _parse(cmd: str, tmp_path):
    return parse_config(shlex.split(cmd.format(ckpt=tmp_path, data=tmp_path, out=tmp_path / "out")))


def _readme_commands() -> list[list[str]]:
    text = (REPO / "README.md").read_text()
    section = text.split("## Coming from other trainers", 1)[1].split("\n## ", 1)[0]
    blocks = [b.split("```", 1)[0] for b in section.split("```bash\n")[1:]]
    cmds = []
    for block in blocks:
        argv = shlex.split(block.replace("\\\n", " "))
        assert argv[:4] == ["torchrun", "--nproc_per_node", "8", "-m"] and argv[4] == "ptrain"
        cmds.append(argv[5:])
    return cmds


def test_readme_migration_commands_parse():
    cogvideox, finetrainers, videox_fun = (parse_config(argv) for argv in _readme_commands())
    assert cogvideox.model.model_name == "cogvideox" and cogvideox.data.caption_column == "prompts.txt"
    assert (cogvideox.optim.optimizer, cogvideox.optim.lr, cogvideox.train.num_train_epochs) == ("adam", 1e-3, 30)
    assert cogvideox.validation.validation_epochs == 10 and cogvideox.data.fps is None  # the script: export fps only
    assert (finetrainers.parallel.dp_degree, finetrainers.parallel.dp_shards) == (2, 4)
    assert finetrainers.model.target_modules == ["to_q", "to_k", "to_v", "to_out.0"]
    assert videox_fun.optim.optimizer == "came" and videox_fun.data.video_column == "file_path"
    assert videox_fun.model.transformer_dtype == "bfloat16" and videox_fun.data.num_frames == 81


def test_cogvideox_command_maps_onto_ptrain(tmp_path):
    c = _parse(COGVIDEOX_SEED, tmp_path)
    assert c.data.data_root == tmp_path and c.data.caption_column == "prompts.txt"
    assert (c.data.fps, c.data.num_frames, c.data.height, c.data.width) == (8, 49, 480, 720)
    assert (c.train.batch_size, c.train.num_train_epochs, c.optim.lr) == (1, 10, 1e-4)
    assert (c.optim.optimizer, c.optim.beta1, c.optim.beta2) == ("adamw", 0.9, 0.95)
    assert c.model.transformer_dtype == "bfloat16" and c.model.rank == 128 and c.model.lora_alpha == 64
    assert c.validation.validation_prompts == "a red ball:::a dog" and c.activation_checkpoint.gradient_checkpointing
    assert any("--mixed_precision" in n for n in c.compat_notes)


def test_finetrainers_and_videox_fun_commands(tmp_path):
    f = _parse(FINETRAINERS_SEED, tmp_path)
    assert f.model.target_modules == ["to_q", "to_k", "to_v", "to_out.0"] and f.train.gradient_accumulation_steps == 4
    assert f.objective.flow_weighting_scheme == "logit_normal" and f.optim.lr == 3e-5
    v = _parse(VIDEOX_FUN_SEED, tmp_path)
    assert v.data.dataset_file == tmp_path / "metadata.csv" and v.data.num_frames == 81
    assert (v.optim.optimizer, v.optim.weight_decay, v.optim.epsilon, v.optim.max_grad_norm) == (
        "came", 3e-2, 1e-10, 0.05,
    )  # fmt: skip
    assert v.data.dataloader_num_workers == 8 and v.train.num_train_epochs == 100


@pytest.mark.parametrize(
    "flag, says",
    [
        (["--use_deepspeed"], "FSDP2 instead of DeepSpeed: use --dp_shards"),
        (["--config_file", "acc.yaml"], "accelerate config files are not used"),
        (["--push_to_hub"], "does not upload"),
        (["--optimizer", "prodigy"], "prodigy is not supported"),
        (["--nccl_timeout", "1800"], "use --dist_timeout_s"),  # finetrainers' (the second audit)
        (["--parallel_backend", "ptd"], "launch with torchrun"),
        (["--tp_degree", "2"], "no tensor parallelism"),
        (["--lr", "1e-4", "--learning_rate", "2e-4"], "--lr and --learning_rate are the same setting"),  # one won
        (["--mixed_precision", "fp16", "--transformer_dtype", "bfloat16"], "are the same setting"),
    ],
)
def test_meaningless_flags_are_rejected_with_the_replacement(flag, says):
    with pytest.raises(ConfigError, match=says):
        parse_config(flag)


def test_finetrainers_precompute_conditions_turns_precomputation_on():
    cfg = parse_config(["--precompute_conditions"])
    assert cfg.data.enable_precomputation == "on" and "--precompute_conditions -> --enable_precomputation on" in (
        cfg.compat_notes
    )


def test_fps_sampling_picks_frames_by_time(tmp_path):
    assert fps_indices(30, 30, 10) == [0, 3, 6, 9, 12, 15, 18, 21, 24, 27]
    assert fps_indices(10, 8, 16)[:6] == [0, 1, 1, 2, 2, 3]  # upsampling repeats the nearest frame
    assert FrameSampling(9, fps=8).indices(48, 24) == [0, 3, 6, 9, 12, 15, 18, 21, 24]
    with pytest.raises(ValueError, match="fewer than --num_frames 9"):
        FrameSampling(9, fps=8).indices(20, 24)
    # Real encoded files at 24 and 12 fps: frame i has brightness 5*i; at --fps 6 the 24 fps clip takes
    # every 4th frame and the 12 fps clip every 2nd, so both span the same 1.5 s of motion.
    for fps, every in ((24, 4), (12, 2)):
        frames = np.stack([np.full((32, 64, 3), 5 * i, dtype=np.uint8) for i in range(48)])
        path = tmp_path / f"v{fps}.mp4"
        write_video(path, frames, fps=fps)
        assert probe(path).fps == pytest.approx(fps)
        clip = load_clip(path, 9, height=32, width=32, fps=6)
        levels = ((clip[:, :, 16, 16].mean(0) + 1) * 127.5).round()
        expected = torch.tensor([5.0 * every * k for k in range(9)])
        assert torch.allclose(levels, expected, atol=4), (levels, expected)


@pytest.mark.slow
def test_cogvideox_seed_command_trains_tiny_checkpoint(tiny_ckpts, tiny_data, tmp_path):
    """Acceptance: the CogVideoX seed command, with paths, a small resolution and fp32 for CPU."""
    cmd = shlex.split(COGVIDEOX_SEED.format(ckpt=tiny_ckpts("cogvideox"), data=tiny_data, out=tmp_path))
    cmd += ["--height", "32", "--width", "32", "--max_num_frames", "9", "--num_train_epochs", "1",
            "--mixed_precision", "no", "--vae_dtype", "float32", "--text_encoder_dtype", "float32",
            "--dataloader_num_workers", "0", "--validation_num_inference_steps", "2"]  # fmt: skip
    cmd = [a for a in cmd if a != "--output_dir" and a != str(tmp_path)]
    run = run_ptrain(1, cmd, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    usable = int(run.stderr.split("data: ")[1].split(" usable")[0])
    assert len(run.losses) == math.ceil(usable / 1) and all(math.isfinite(v) for v in run.losses)
    assert "--learning_rate -> --lr" in run.stderr
    # the script validates at the end without --validation_epochs; so does ptrain without --validation_steps, and
    # it records what each video is (the fifth audit: prompts without steps sampled nothing, silently)
    (step,) = sorted((tmp_path / "validation").iterdir())
    assert step.name == f"step-{len(run.losses)}" and "sampled at the end (step" in run.stderr
    index = json.loads((step / "prompts.json").read_text())
    assert sorted(index) == ["00-0-a_red_ball.mp4", "01-0-a_dog.mp4"]
    assert index["01-0-a_dog.mp4"]["prompt"] == "a dog" and index["01-0-a_dog.mp4"]["seed"] == 42 + 1000
    assert all(v["frames_written"] == v["num_frames"] == 9 for v in index.values())


@pytest.mark.slow
@pytest.mark.heavy  # suite time; CI runs it
def test_trainable_modules_and_uniform_sampling_on_fsdp2(launches, tiny_ckpt):
    """Only parameters matching --trainable_modules train (frozen ones share FSDP2 units with them), and
    rank-stratified timesteps keep the per-step losses layout-independent."""
    from diffusers import LTXVideoTransformer3DModel

    ref, run = launches("partial-single").run, launches("partial-fsdp2").run
    assert run.losses == pytest.approx(ref.losses, rel=1e-4)
    trained = LTXVideoTransformer3DModel.from_pretrained(run.output_dir / "transformer").state_dict()
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer").state_dict()
    changed = {k for k in trained if not torch.equal(trained[k], base[k])}
    assert changed == {k for k in trained if "attn1" in k}


def test_low_learning_rate_group_and_strata():
    from diffusers import LTXVideoTransformer3DModel

    from ptrain.config import ObjectiveArgs
    from ptrain.objectives import FlowMatching, sample_generators
    from ptrain.testing.tiny import LTX_TRANSFORMER_CONFIG
    from ptrain.parallelize import param_groups

    model = LTXVideoTransformer3DModel(**LTX_TRANSFORMER_CONFIG)
    model.requires_grad_(False)
    for name, p in model.named_parameters():
        p.requires_grad_("attn1" in name)
    cfg = parse_config(["--lr", "1e-3", "--trainable_modules_low_learning_rate", "to_q"])
    normal, slow = param_groups(model, cfg)
    assert slow["lr"] == 5e-4 and "lr" not in normal
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("attn1.to_q" in names[id(p)] for p in slow["params"]) and slow["params"]
    assert not any("to_q" in names[id(p)] for p in normal["params"])
    # Stratified sigmas: sample j of G lands in the j-th slice of the (uniform) noise range.
    fm = FlowMatching(ObjectiveArgs(uniform_sampling=True), shift=1.0)
    sig = fm.sample_sigmas(sample_generators(3, range(16)), (torch.arange(16), 16))
    assert all(j / 16 <= s < (j + 1) / 16 for j, s in enumerate(sig.tolist()))


@pytest.mark.slow
def test_fp8_storage_of_frozen_weights_trains_and_exports(tiny_ckpt, tiny_data, tmp_path):
    from diffusers import LTXPipeline

    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--train_steps", "3",
            "--height", "32", "--width", "32", "--num_frames", "9", "--transformer_dtype", "bfloat16",
            "--dataloader_num_workers", "0", "--report_to", "none", "--checkpointing_steps", "0",
            "--layerwise_upcasting_modules", "transformer", "--layerwise_upcasting_storage_dtype", "float8_e5m2"]  # fmt: skip
    run = run_ptrain(2, args, tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "frozen transformer weights stored in torch.float8_e5m2" in run.stderr
    assert len(run.losses) == 3 and all(math.isfinite(v) for v in run.losses)
    pipe = LTXPipeline.from_pretrained(tiny_ckpt)
    pipe.load_lora_weights(tmp_path)
    assert pipe.transformer.peft_config


def test_fp8_storage_casts_only_frozen_linear_weights_outside_skips():
    from diffusers import LTXVideoTransformer3DModel
    from peft import LoraConfig

    from ptrain.config import ModelArgs
    from ptrain.testing.tiny import LTX_TRANSFORMER_CONFIG
    from ptrain.parallelize import store_frozen_in_fp8

    model = LTXVideoTransformer3DModel(**LTX_TRANSFORMER_CONFIG)
    model.requires_grad_(False)
    model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
    store_frozen_in_fp8(model, torch.float8_e4m3fn, ModelArgs().layerwise_upcasting_skip_modules_pattern)
    dtypes = {n: p.dtype for n, p in model.named_parameters()}
    assert dtypes["transformer_blocks.0.attn1.to_q.base_layer.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.attn1.to_k.weight"] == torch.float8_e4m3fn
    assert dtypes["transformer_blocks.0.attn1.to_q.lora_A.default.weight"] == torch.float32  # trainable
    assert dtypes["proj_in.weight"] == torch.float32 and dtypes["proj_out.weight"] == torch.float32  # skipped
    assert all(d == torch.float32 for n, d in dtypes.items() if "norm" in n)
