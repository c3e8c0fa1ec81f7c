"""CLI and config: flat underscore flags, TOML presets (CLI > file > defaults), --help, validation errors."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys

from pathlib import Path

import pytest
from conftest import REPO

from ptrain.config import Config, ConfigError, DataArgs, parse_config
from ptrain.parallel.dims import ParallelConfigError, ParallelDims


def _all_flags() -> list[str]:
    cfg = Config()
    names = ["config"]
    for f in dataclasses.fields(cfg):
        if dataclasses.is_dataclass(getattr(cfg, f.name)):
            names += [g.name for g in dataclasses.fields(getattr(cfg, f.name))]
    return names


def test_flags_are_flat_with_underscores():
    cfg = parse_config(
        ["--dp_degree", "2", "--dp_shards", "4", "--training_type", "full-finetune", "--target_modules", "to_q",
         "to_k", "--gradient_checkpointing", "--ac_mode", "selective", "--ac_every_n_blocks", "3", "--lr", "3e-5",
         "--optimizer", "came", "--compile", "--compile_backend", "aot_eager"]
    )  # fmt: skip
    assert (cfg.parallel.dp_degree, cfg.parallel.dp_shards) == (2, 4)
    assert cfg.model.training_type == "full-finetune" and cfg.model.target_modules == ["to_q", "to_k"]
    ac = cfg.activation_checkpoint
    assert ac.gradient_checkpointing and ac.ac_mode == "selective" and ac.ac_every_n_blocks == 3
    assert cfg.optim.lr == 3e-5 and cfg.optim.optimizer == "came" and cfg.compile.compile


def test_toml_preset_precedence(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('lr = 2e-4\nrank = 16\noutput_dir = "from-file"\n[parallel]\ndp_degree = 2\n')
    cfg = parse_config(["--config", str(preset), "--rank", "32"])
    assert cfg.optim.lr == 2e-4  # file beats default
    assert cfg.model.rank == 32  # CLI beats file
    assert cfg.parallel.dp_degree == 2  # [group] tables work too
    assert str(cfg.train.output_dir) == "from-file"
    assert cfg.optim.beta1 == 0.9  # untouched default
    preset.write_text("\ufeff" + preset.read_text(), encoding="utf-8")  # a byte-order mark (Windows editors)
    assert parse_config(["--config", str(preset)]).optim.lr == 2e-4


def test_vae_tiling_flags_are_auto_on_off(tmp_path):
    """--enable_tiling / --enable_slicing: auto by default, the bare flag still on, --no_FLAG off, a preset's
    true / false on / off; anything else names the choices."""
    assert (parse_config([]).model.enable_tiling, parse_config([]).model.enable_slicing) == ("auto", "auto")
    m = parse_config(["--enable_tiling", "--enable_slicing", "--rank", "8"]).model
    assert (m.enable_tiling, m.enable_slicing, m.rank) == ("on", "on", 8)
    m = parse_config(["--no_enable_tiling", "--enable_slicing", "off"]).model
    assert (m.enable_tiling, m.enable_slicing) == ("off", "off")
    assert parse_config(["--enable_tiling", "auto", "--enable_slicing"]).model.enable_slicing == "on"
    preset = tmp_path / "p.toml"
    preset.write_text("enable_tiling = true\nenable_slicing = false\n")
    m = parse_config(["--config", str(preset)]).model
    assert (m.enable_tiling, m.enable_slicing) == ("on", "off")
    with pytest.raises(SystemExit):
        parse_config(["--enable_tiling", "maybe"])


def test_mixed_precision_values_are_named_with_it():
    with pytest.raises(ConfigError, match=r"--mixed_precision 'fp8': give no, fp16 or bf16 .*--layerwise_upcasting"):
        parse_config(["--data_root", "x", "--mixed_precision", "fp8"])
    assert parse_config(["--data_root", "x", "--mixed_precision=bf16"]).model.transformer_dtype == "bfloat16"


def test_toml_unknown_key_is_named(tmp_path):
    preset = tmp_path / "bad.toml"
    preset.write_text("learning_rat = 1e-4\n")
    with pytest.raises(ConfigError, match="learning_rat"):
        parse_config(["--config", str(preset)])


@pytest.mark.parametrize(
    "line, says",
    [
        ('flow_weighting_scheme = "logit-normal"',
         "invalid choice 'logit-normal' for argument '--weighting_scheme/--flow_weighting_scheme'"),
        ('gradient_checkpointing = "false"', "gradient_checkpointing = 'false': write true or false"),
        ("train_steps = 10.5", "invalid literal for int() with base 10: '10.5'"),
        ('lr_scheduler = "cosin"', "invalid choice 'cosin' for argument '--lr_scheduler'"),
        ("dp_degree = [1, 2]", "dp_degree = [1, 2]: one value expected, not a list"),
        ('lr = true', "lr = True: this setting takes a value, not true / false"),
        # a new-user trial: these were "unknown key (not a ptrain flag)", unlike learning_rate
        ('mixed_precision = "bf16"', "'mixed_precision' is another trainer's name: write 'transformer_dtype'"),
        ("save_every_n_steps = 100", "'save_every_n_steps' is not a ptrain setting: --checkpointing_steps N"),
    ],
)
def test_toml_preset_values_are_checked_as_flags(tmp_path, line, says):
    """A preset's values go through the flags' parser: the new-user audit's presets had passed unchecked (a quoted
    "false" turned checkpointing on, a hyphenated choice trained on diffusers' uniform fallback, 10.5 steps)."""
    preset = tmp_path / "p.toml"
    preset.write_text(line + "\n")
    with pytest.raises(ConfigError, match=re.escape(f"--config {preset}: ") + ".*" + re.escape(says)):
        parse_config(["--config", str(preset)])


def test_toml_preset_natural_forms_mean_what_the_flags_mean(tmp_path):
    preset = tmp_path / "p.toml"
    preset.write_text('lr = "1e-4"\ntrain_steps = "20"\ntransformer_dtype = "bf16"\noptimizer = "AdamW"\n'
                      'target_modules = "to_q"\nvalidation_prompts = ["a cat", "a dog"]\n'
                      "gradient_checkpointing = true\n")  # fmt: skip
    cfg = parse_config(["--config", str(preset)])
    assert (cfg.optim.lr, cfg.train.train_steps, cfg.model.transformer_dtype, cfg.optim.optimizer) == (
        1e-4, 20, "bfloat16", "adamw")  # fmt: skip
    assert cfg.model.target_modules == ["to_q"] and cfg.validation.validation_prompts == "a cat:::a dog"
    assert cfg.activation_checkpoint.gradient_checkpointing and cfg.config == preset
    off = parse_config(["--config", str(preset), "--no_gradient_checkpointing", "--lr", "3e-4"])
    assert not off.activation_checkpoint.gradient_checkpointing and off.optim.lr == 3e-4  # flags win


@pytest.mark.parametrize("preset", sorted((REPO / "configs").rglob("*.toml")), ids=lambda p: p.name)
def test_shipped_presets_parse(preset):
    import tomllib

    from ptrain.config import _field_owner

    cfg = parse_config(["--config", str(preset)])
    raw = tomllib.loads(preset.read_text())
    flat = {k: v for k, v in raw.items() if not isinstance(v, dict)}
    for table in (v for v in raw.values() if isinstance(v, dict)):
        flat.update(table)
    assert flat, f"{preset} sets nothing"
    owner = _field_owner()
    for key, value in flat.items():  # every key of the file took effect, with its value
        got = getattr(getattr(cfg, owner[key]), key)
        got = [str(x) for x in got] if isinstance(got, (list, tuple)) else got
        want = [str(x) for x in value] if isinstance(value, list) else value
        assert (str(got) if isinstance(got, Path) else got) == want, f"{preset.name}: {key} = {got!r}, file {value!r}"
    if preset.parent.name != "configs":  # configs/<model>/<lora|full>.toml
        assert cfg.model.model_name == preset.parent.name
        # lora.toml / full.toml, or a variant's: lora_a14b.toml
        assert cfg.model.training_type == {"lora": "lora", "full": "full-finetune"}[preset.stem.split("_")[0]]


def test_help_documents_every_flag():
    out = subprocess.run(
        [sys.executable, "-m", "ptrain", "--help"], cwd=REPO, capture_output=True, text=True, env={"COLUMNS": "200"}
    )
    assert out.returncode == 0, out.stderr
    for name in _all_flags():
        assert f"--{name}" in out.stdout, f"--{name} missing from --help"


def test_validation_names_the_flag(tmp_path, tiny_ckpt, tiny_data):
    ok = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data)]
    parse_config(ok).validate()
    with pytest.raises(ConfigError, match="--pretrained_model_name_or_path .*nope.*no such folder"):
        parse_config(
            ["--pretrained_model_name_or_path", str(tmp_path / "nope"), "--data_root", str(tiny_data)]
        ).validate()
    with pytest.raises(ConfigError, match="--data_root .*missing"):
        parse_config(
            ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tmp_path / "missing")]
        ).validate()
    with pytest.raises(ConfigError, match="not a diffusers checkpoint"):
        parse_config(["--pretrained_model_name_or_path", str(tmp_path), "--data_root", str(tiny_data)]).validate()
    with pytest.raises(ConfigError, match="--batch_size must be >= 1, got 0"):
        parse_config([*ok, "--batch_size", "0"]).validate()
    assert parse_config([*ok, "--cp_degree", "2", "--cp_mode", "ring"]).validate().parallel.cp_mode == "ring"
    # an AC mode that would do nothing: no block is checkpointed without --gradient_checkpointing
    with pytest.raises(ConfigError, match="--ac_mode keep_attention .* without --gradient_checkpointing"):
        parse_config([*ok, "--ac_mode", "keep_attention"]).validate()
    parse_config([*ok, "--gradient_checkpointing", "--ac_mode", "keep_attention"]).validate()
    parse_config([*ok, "--ac_mode", "auto", "--gpu_memory_gb", "24"]).validate()  # auto decides both


def test_bad_cp_mode_names_the_choices(capsys):
    with pytest.raises(SystemExit):
        parse_config(["--cp_mode", "ringg"])
    err = capsys.readouterr().err
    assert "--cp_mode" in err and "ulysses" in err and "ring" in err


def test_parallel_dims():
    assert ParallelDims.build(2, -1, 1, 8).dp_shard == 4
    assert ParallelDims.build(1, -1, 2, 8).dp_shard == 4  # cp takes its share of the world first
    d = ParallelDims.build(2, 2, 1, 4)
    assert (d.dp, d.fsdp_enabled, d.ddp_enabled) == (4, True, False) and d.describe().startswith("HSDP")
    assert ParallelDims.build(2, 1, 1, 2).describe().startswith("DDP")
    assert ParallelDims.build(1, -1, 1, 2).describe().startswith("FSDP2")
    with pytest.raises(ParallelConfigError, match=r"dp_degree=2 x dp_shards=3 x cp_degree=1 = 6.*world size .* is 4"):
        ParallelDims.build(2, 3, 1, 4)
    with pytest.raises(ParallelConfigError, match="dp_degree=3 x cp_degree=1 = 3 does not divide it"):
        ParallelDims.build(3, -1, 1, 4)
    with pytest.raises(ParallelConfigError, match=">= 1"):
        ParallelDims.build(0, 1, 1, 1)


def test_cli_errors_exit_2_with_one_line(tmp_path, tiny_ckpt, tiny_data, ptrain_run):
    # Bad degrees are caught after torchrun starts (world size known): every value is named.
    run = ptrain_run(
        2,
        ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--dp_degree", "2",
         "--dp_shards", "2"],
        tmp_path / "out",
    )  # fmt: skip
    assert run.returncode != 0
    assert "dp_degree=2 x dp_shards=2 x cp_degree=1 = 4, but world size" in run.stderr
    assert "ptrain: error:" in run.stderr and "[rank0]: Traceback" not in run.stderr
    # Printed once (rank 0), and in torchrun's failure summary for each failed rank (its error file), so that an
    # error raised on one rank only, which that rank does not print, is seen too.
    assert run.stderr.count("\nptrain: error: parallel degrees do not match") == 1, run.stderr[-3000:]
    assert "rank      : 1 (local_rank: 1)" in run.stderr
    assert "traceback : ptrain: error: parallel degrees do not match the world size" in run.stderr
    out = subprocess.run(
        [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root",
         str(tmp_path / "no-data")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "--data_root" in out.stderr and "no such folder" in out.stderr
    # A frame count the VAE cannot take is caught once the checkpoint is loaded, before training.
    out = subprocess.run(
        [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root",
         str(tiny_data), "--num_frames", "10", "--output_dir", str(tmp_path / "o2")],
        cwd=REPO, capture_output=True, text=True,
    )  # fmt: skip
    assert out.returncode == 2 and "--num_frames 10: LTX-Video needs 8k+1 frames" in out.stderr, out.stderr[-2000:]


def test_validation_sizes_and_images_are_checked_at_start(tiny_ckpt, tiny_data, tmp_path):
    """The fifth audit: a validation size the pipeline refuses, or first-frame images in a text-to-video run,
    stopped the run at its first validation (a traceback, the steps since the last checkpoint lost), and --dry_run
    passed them. Now --dry_run refuses them, naming the validation flag."""
    from PIL import Image

    args = ["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data), "--dry_run",
            "--output_dir", str(tmp_path / "o"), "--validation_prompts", "a cat", "--num_frames", "9", "--height",
            "32", "--width", "32"]  # fmt: skip
    run = subprocess.run([sys.executable, "-m", "ptrain", *args, "--validation_num_frames", "10"], cwd=REPO,
                         capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 2 and "ptrain: error: validation prompt 0 ('a cat'): --validation_num_frames 10: " \
        "LTX-Video needs 8k+1 frames" in run.stderr, run.stderr[-2000:]
    Image.new("RGB", (32, 32)).save(tmp_path / "first.png")
    from ptrain.validation import load_validation_items

    cfg = parse_config([*args, "--validation_images", str(tmp_path / "first.png")])
    with pytest.raises(ConfigError, match="are first frames for --train_mode i2v / inpaint; this run is"):
        load_validation_items(cfg.validation, cfg.data, "normal")
    assert load_validation_items(cfg.validation, cfg.data, "i2v")[0].image == tmp_path / "first.png"
    # a file that is not an image (a clip given as the first frame, a truncated PNG): refused at start-up, not at
    # the first validation after the steps since the last checkpoint
    clip = next(tiny_data.glob("**/*.mp4"))
    (tmp_path / "cut.png").write_bytes((tmp_path / "first.png").read_bytes()[:40])
    for bad in (clip, tmp_path / "cut.png"):
        cfg = parse_config([*args, "--validation_images", str(bad)])
        with pytest.raises(ConfigError, match=f"validation image {bad}: not an image ptrain can read"):
            load_validation_items(cfg.validation, cfg.data, "i2v")


def test_optimizer_errors_are_clear():
    import torch

    from ptrain.config import OptimArgs
    from ptrain.optim import build_optimizer

    p = [torch.nn.Parameter(torch.zeros(2, 2))]
    with pytest.raises(ConfigError, match="adamw-8bit runs on CUDA only"):
        build_optimizer(p, OptimArgs(optimizer="adamw-8bit"), torch.device("cpu"))
    with pytest.raises(ConfigError, match="no trainable parameters"):
        build_optimizer([], OptimArgs(), torch.device("cpu"))
    # Each optimizer's update is checked against a reference in tests/test_kernels_optim.py.


def test_component_overrides_load_from_other_folders(tiny_ckpt, tmp_path):
    import torch

    from ptrain.models.spec import component_source, get_spec
    from ptrain.testing.tiny import write_tiny_checkpoint

    other = write_tiny_checkpoint(tmp_path / "other", model_name="ltx_video", seed=1)
    assert component_source(str(tiny_ckpt), None, "vae") == (str(tiny_ckpt), "vae")
    assert component_source(str(tiny_ckpt), str(other), "vae") == (str(other), "vae")  # a whole checkpoint
    assert component_source(str(tiny_ckpt), str(other / "vae"), "vae") == (str(other / "vae"), None)  # the folder
    dtypes = dict.fromkeys(("transformer", "vae", "text_encoder", "text_encoder_2"), torch.float32)
    spec = get_spec("ltx_video")
    comps = spec.load_components(str(tiny_ckpt), dtypes, torch.device("cpu"), {"vae": str(other / "vae")})
    ref_vae = spec.load_components(str(other), dtypes, torch.device("cpu"), {}).vae
    base_te = spec.load_components(str(tiny_ckpt), dtypes, torch.device("cpu"), {}).text_encoder
    for a, b in zip(comps.vae.parameters(), ref_vae.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(comps.text_encoder.parameters(), base_te.parameters()):
        assert torch.equal(a, b)
    assert not comps.vae.training and not any(p.requires_grad for p in comps.vae.parameters())
    with pytest.raises(ConfigError, match=r"cannot load vae \(AutoencoderKLLTXVideo\) from .*empty"):
        (tmp_path / "empty").mkdir()
        spec.load_components(str(tiny_ckpt), dtypes, torch.device("cpu"), {"vae": str(tmp_path / "empty")})


def test_full_bf16_and_block_swap_flags_are_checked(tmp_path):
    (tmp_path / "model_index.json").write_text('{"transformer": ["diffusers", "LTXVideoTransformer3DModel"]}')
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--data_root", str(tmp_path)]
    full = [*base, "--training_type", "full-finetune", "--full_bf16"]
    cfg = parse_config([*full, "--gc_every_n_steps", "10"]).validate()
    assert cfg.optim.bf16_rounding == "stochastic" and cfg.train.gc_every_n_steps == 10
    with pytest.raises(ConfigError, match="--full_bf16 rounds stochastically with --optimizer adamw or adam"):
        parse_config([*full, "--optimizer", "came"]).validate()
    assert parse_config([*full, "--optimizer", "came", "--bf16_rounding", "nearest"]).validate()
    with pytest.raises(ConfigError, match="--full_bf16 is a full fine-tune in bfloat16"):
        parse_config([*base, "--full_bf16"]).validate()
    with pytest.raises(ConfigError, match="--ema_decay with --full_bf16"):
        parse_config([*full, "--ema_decay", "0.99"]).validate()
    with pytest.raises(ConfigError, match="--gc_every_n_steps must be >= 0"):
        parse_config([*base, "--gc_every_n_steps", "-1"]).validate()
    with pytest.raises(ConfigError, match="--seed must be >= 0, got -1"):  # (a new-user trial: it hung the run)
        parse_config([*base, "--seed", "-1"]).validate()
    swap = [*base, "--gradient_checkpointing", "--blocks_to_swap", "2"]
    assert parse_config(swap).validate().parallel.blocks_to_swap == 2
    with pytest.raises(ConfigError, match="a full fine-tune has none"):
        parse_config([*swap, "--training_type", "full-finetune"]).validate()


def test_ac_every_n_blocks_belongs_to_selective(tmp_path):
    """The fourth audit: --ac_every_n_blocks 4 without --ac_mode selective ran full AC without a word."""
    (tmp_path / "model_index.json").write_text('{"transformer": ["diffusers", "LTXVideoTransformer3DModel"]}')
    base = ["--pretrained_model_name_or_path", str(tmp_path), "--data_root", str(tmp_path), "--gradient_checkpointing"]
    with pytest.raises(ConfigError, match=r"--ac_every_n_blocks 4 applies to --ac_mode selective only \(got --ac_mode "
                                          r"full\): add --ac_mode selective"):  # fmt: skip
        parse_config([*base, "--ac_every_n_blocks", "4"]).validate()
    with pytest.raises(ConfigError, match=r"\(got --ac_mode auto; auto chooses it\)"):
        parse_config([*base, "--ac_mode", "auto", "--ac_every_n_blocks", "4"]).validate()
    a = parse_config([*base, "--ac_mode", "selective"]).validate().activation_checkpoint
    assert (a.ac_every_n_blocks, a.every_n(), a.period()) == (None, 2, 2)
    a = parse_config([*base, "--ac_mode", "selective", "--ac_every_n_blocks", "3"]).validate().activation_checkpoint
    assert a.period() == 3


def test_planner_names_the_options_it_does_not_search():
    """The fourth audit: "nothing tried fits ... use LoRA" was said to LoRA runs, and no memory option was named."""
    from ptrain.planner import _nothing_fits

    lora = _nothing_fits(parse_config(["--data_root", "x"]), 1)
    assert "--blocks_to_swap" in lora and "--layerwise_upcasting_modules transformer" in lora
    assert "--training_type lora" not in lora and "FSDP shards the frozen weights" in lora
    full = _nothing_fits(parse_config(["--data_root", "x", "--training_type", "full-finetune"]), 8)
    assert "--full_bf16" in full and "--fused_backward_pass" in full and "--training_type lora" in full
    # a new-user trial: encoders planned on the device (auto planned as off) and precomputation not named
    assert "--enable_precomputation on" in full and "planned as off here" in full and "--offload_encoders" in full
    pre = _nothing_fits(parse_config(["--data_root", "x", "--enable_precomputation", "on"]), 1)
    assert "--enable_precomputation" not in pre and "--offload_encoders" not in pre


def test_data_root_given_a_table_file_points_to_dataset_file(tmp_path):
    from ptrain.data.sources import load_records

    (tmp_path / "metadata.csv").write_text("video,caption\na.mp4,a\n")
    with pytest.raises(ConfigError, match=r"--data_root .*metadata.csv: a file, not a folder; give a table with "
                                          r"--dataset_file"):  # fmt: skip
        load_records(DataArgs(data_root=tmp_path / "metadata.csv"))


def test_resume_from_a_missing_folder_says_so(tmp_path):
    cfg = parse_config(["--resume_from_checkpoint", str(tmp_path / "nope")])
    with pytest.raises(ConfigError, match="nope: no such folder"):
        cfg.checkpoint.validate()


def test_layout_errors_say_where_the_world_size_comes_from_and_what_to_do():
    """The sixth audit: the degree errors named the flags but no fix, blamed torchrun for --plan_world_size's world,
    and --plan_world_size 0 / -4 planned one process / "world -4"."""
    from ptrain.parallel.dims import ParallelConfigError, ParallelDims

    with pytest.raises(ParallelConfigError) as e:
        ParallelDims.build(1, 8, 1, 1)
    assert "world size (torchrun --nproc_per_node x --nnodes) is 1; launch 8 processes" in str(e.value)
    assert "--dp_shards at -1" in str(e.value) and "--plan_world_size N" in str(e.value)
    with pytest.raises(ParallelConfigError) as e:
        ParallelDims.build(1, 3, 1, 8, "--plan_world_size")
    assert "world size (--plan_world_size) is 8" in str(e.value) and "torchrun" not in str(e.value)
    with pytest.raises(ParallelConfigError, match=r"cannot fill world size 3 \(--plan_world_size\).*multiple of 2"):
        ParallelDims.build(2, -1, 1, 3, "--plan_world_size")
    for bad in ("0", "-4"):
        with pytest.raises(ConfigError, match=f"--plan_world_size {bad}: .* must be >= 1"):
            parse_config(["--dry_run", "--plan_world_size", bad]).plan.validate()


def test_flags_the_run_will_not_use_are_said_at_start():
    """A new-user trial: LoRA flags on a full fine-tune, a warmup longer than the run and an empty
    --validation_prompts were accepted without a word."""
    from ptrain.trainer import unused_flag_warnings

    full = parse_config(["--data_root", "x", "--training_type", "full-finetune", "--rank", "32", "--network_alpha",
                         "16", "--train_steps", "6", "--lr_warmup_steps", "200", "--lr", "1e-3"])  # fmt: skip
    said = unused_flag_warnings(full)
    assert said[0].startswith("--rank, --network_alpha: LoRA's settings, unused by --training_type full-finetune")
    assert said[1] == "--lr_warmup_steps 200 exceeds --train_steps 6: the learning rate reaches only 3% of --lr 0.001 by the last step"  # fmt: skip
    assert unused_flag_warnings(parse_config(["--data_root", "x", "--rank", "32", "--train_steps", "6"])) == []
    with pytest.raises(ConfigError, match=r"--validation_prompts '  ::: ': no prompt in it \(an unset shell"):
        parse_config(["--data_root", "x", "--validation_prompts", "  ::: "]).validation.validate()
