"""--model_name auto (the default): the family comes from the checkpoint's transformer class, for local folders
and hub ids; a named family that contradicts the checkpoint, or a transformer ptrain does not train, is an error
that names the class and the flag to pass (a new user's first run used to load a Wan checkpoint as LTX-Video and
crash inside diffusers)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from conftest import MODELS

from ptrain.config import ConfigError, parse_config
from ptrain.hub import peek_checkpoint
from ptrain.testing.hub_cache import add_snapshot


@pytest.mark.parametrize("model", MODELS)
def test_the_family_is_read_from_the_checkpoint(tiny_ckpts, tiny_data, model):
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpts(model)), "--data_root", str(tiny_data)])
    assert cfg.model.model_name == "auto"
    assert cfg.validate().model.model_name == model


def test_a_contradicting_family_names_the_checkpoints_class(tiny_ckpts, tiny_data):
    args = ["--pretrained_model_name_or_path", str(tiny_ckpts("wan")), "--data_root", str(tiny_data)]
    with pytest.raises(ConfigError, match="--model_name ltx_video, but .* holds a WanTransformer3DModel \\(wan\\): "
                                          "pass --model_name wan"):  # fmt: skip
        parse_config([*args, "--model_name", "ltx_video"]).validate()
    assert parse_config([*args, "--model_name", "wan"]).validate().model.model_name == "wan"


def test_an_unknown_transformer_is_refused_unless_named(tmp_path, tiny_data):
    (tmp_path / "model_index.json").write_text(json.dumps({"transformer": ["diffusers", "SD3Transformer2DModel"]}))
    args = ["--pretrained_model_name_or_path", str(tmp_path), "--data_root", str(tiny_data)]
    with pytest.raises(ConfigError, match="its transformer is SD3Transformer2DModel, which ptrain does not train"):
        parse_config(args).validate()
    # named, it is the user's call (an unknown class contradicts nothing ptrain knows)
    assert parse_config([*args, "--model_name", "cogvideox"]).validate().model.model_name == "cogvideox"


def test_a_local_transformer_id_decides(tiny_ckpts, tiny_data):
    """--transformer_id replaces the transformer: its class is the one trained."""
    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpts("ltx_video")), "--data_root",
                        str(tiny_data), "--transformer_id", str(tiny_ckpts("cogvideox") / "transformer")])  # fmt: skip
    cfg.model.resolve_model_name()
    assert cfg.model.model_name == "cogvideox"
    cfg.model.model_name = "ltx_video"
    with pytest.raises(ConfigError, match="holds a CogVideoXTransformer3DModel"):
        cfg.model.resolve_model_name()


def test_an_older_full_export_naming_fsdps_class_is_read(tiny_ckpts, tmp_path):
    """Full exports of FSDP2-wrapped runs before the fifth audit named fully_shard's class (FSDP<Class>)."""
    folder = tmp_path / "transformer"
    shutil.copytree(tiny_ckpts("wan") / "transformer", folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "_class_name": "FSDPWanTransformer3DModel"}))
    from ptrain.models.registry import resolve_model_name

    assert resolve_model_name("auto", tiny_ckpts("ltx_video"), folder) == "wan"


def test_a_hub_id_is_read_from_its_fetched_configs(tiny_ckpts, tmp_path, monkeypatch):
    """A hub id (an offline cache laid out as huggingface_hub lays it out): model_index.json and the transformer
    config are enough to tell the family, before any weights are fetched."""
    cache = tmp_path / "cache"
    add_snapshot(cache, "tiny-org/tiny-hunyuan", tiny_ckpts("hunyuan_video"))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = parse_config(["--pretrained_model_name_or_path", "tiny-org/tiny-hunyuan"])
    m = cfg.model
    m.validate()  # a hub id: left to be read once fetched
    assert m.model_name == "auto"
    m.resolve_model_name(peek_checkpoint(m))
    assert m.model_name == "hunyuan_video"


def test_a_dry_run_refuses_a_shape_the_family_cannot_train(tiny_ckpt, tiny_data, tmp_path):
    """The family's shape rules (from its configs, no weights) hold the configured shape at start-up, so --dry_run
    refuses what the run would (it used to approve --height 30 for LTX-Video, whose run then stopped after loading)."""
    import subprocess
    import sys

    from conftest import REPO

    base = [sys.executable, "-m", "ptrain", "--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root",
            str(tiny_data), "--num_frames", "9", "--width", "32", "--output_dir", str(tmp_path / "out"),
            "--dry_run"]  # fmt: skip
    # no rendezvous variables an in-process test of this session may have left: the run picks its own port
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    p = subprocess.run([*base, "--height", "30"], cwd=REPO, capture_output=True, text=True, timeout=300,
                       check=False, env=env)  # fmt: skip
    assert p.returncode == 2 and "--height 30: LTX-Video needs a multiple of" in p.stderr, p.stderr[-1500:]


def test_cogvideox_5b_i2v_trains_at_its_one_size_only(tmp_path):
    """CogVideoX-5B-I2V's learned positional embeddings hold one frame size; diffusers' patch embedding raises at
    the first step for any other, after the weights loaded (and with loader workers the process then hung at exit).
    The shape rules now refuse other sizes at start-up, naming the size, while its frame counts and side multiple
    are still found."""
    from ptrain.errors import FixedSizeError
    from ptrain.models.spec import get_spec
    from ptrain.testing.tiny import write_tiny_checkpoint

    ckpt = write_tiny_checkpoint(tmp_path / "cog", model_name="cogvideox", variant="5b-i2v")  # 32x32 (4 x 8)
    rules = get_spec("cogvideox").shape_rules(str(ckpt), {})
    rules.check(9, 32, 32)
    assert rules.multiple == 16 and rules.frame_ok(49) and not rules.frame_ok(10)
    with pytest.raises(FixedSizeError, match="--height 64 --width 32: .* learned positional embeddings for 32x32 only"):
        rules.check(9, 64, 32)
