"""--enable_precomputation with --train_mode i2v: the first frame's conditioning (ModelSpec.image_condition) is
stored per sample, so a precomputed run trains on exactly what an on-the-fly run computes every step (Wan 2.1's
conditioning latents and CLIP embeddings, Wan 2.2 TI2V's and LTX-Video's clean first latent frame,
HunyuanVideo-I2V's latents and its prompt read with the image), first-frame images from the dataset included,
and its steps run no encoder."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from conftest import TINY_ARGS
from PIL import Image
from safetensors import safe_open

from ptrain.config import parse_config
from ptrain.testing.tiny import write_tiny_checkpoint

#: (model, tiny variant, the image-condition tensors its cache files hold)
CASES = [
    ("ltx_video", "i2v", {"image.first_latents"}),
    ("wan", "i2v", {"image.concat_latents", "image.encoder_hidden_states_image"}),
    ("wan", "2.2-ti2v", {"image.first_latents"}),
    ("hunyuan_video", "i2v", {"image.concat_latents"}),
]

#: The frozen text and image encoders' classes: none runs in a precomputed step (nor does the VAE's encode).
ENCODERS = ("CLIP", "Llava", "T5", "UMT5", "Llama")


@pytest.fixture(scope="module")
def table(tiny_data, tmp_path_factory):
    """The tiny videos with a first-frame image column: an image for every other row, the clip's own frame else."""
    folder = tmp_path_factory.mktemp("i2v-table")
    rows = list(csv.DictReader((tiny_data / "metadata.csv").open()))[:4]
    rng = np.random.default_rng(1)
    path = folder / "table.csv"
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["caption", "video", "image"])
        for i, r in enumerate(rows):
            image = ""
            if i % 2 == 0:
                image = str(folder / f"first{i}.png")
                Image.fromarray((rng.random((40, 40, 3)) * 255).astype(np.uint8)).save(image)
            w.writerow([r["caption"], r["video"], image])
    return path


def _losses(out) -> list[float]:
    return [json.loads(line)["loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize(("model", "variant", "stored"), CASES, ids=[f"{m}-{v}" for m, v, _ in CASES])
def test_precomputed_i2v_trains_on_what_the_step_would_encode(model, variant, stored, table, tiny_data, tmp_path,
                                                             single_process_env, monkeypatch):  # fmt: skip
    from ptrain.trainer import train

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", model_name=model, variant=variant)
    args = ["--model_name", model, "--pretrained_model_name_or_path", str(ckpt), "--dataset_file", str(table),
            "--data_root", str(tiny_data), "--train_mode", "i2v", "--train_steps", "3", "--batch_size", "2",
            "--lr", "1e-3", "--seed", "4", "--caption_dropout_p", "0.5", "--checkpointing_steps", "0",
            *TINY_ARGS]  # fmt: skip
    if variant == "2.2-ti2v":  # its VAE is 16x spatially: sides are multiples of 32 (TINY_ARGS' 32 fits)
        args += ["--num_frames", "5"]
    train(parse_config([*args, "--enable_precomputation", "off", "--output_dir", str(tmp_path / "fly")]))

    encodes = []

    def seen(module, _args):
        if module.__class__.__name__.startswith(ENCODERS):
            encodes.append(module.__class__.__name__)

    from ptrain import trainer
    from torch.nn.modules.module import register_module_forward_pre_hook

    step = trainer.Trainer.forward_backward

    def watched(self, *a, **k):  # encoders called inside a training step (not precomputation, not validation)
        vae, encode = self.comps.vae, self.comps.vae.encode
        vae.encode = lambda *x, **y: (encodes.append("vae.encode"), encode(*x, **y))[1]  # a method, not a forward
        handle = register_module_forward_pre_hook(seen)
        try:
            return step(self, *a, **k)
        finally:
            handle.remove()
            del vae.encode

    monkeypatch.setattr(trainer.Trainer, "forward_backward", watched)
    cache = tmp_path / "cache"
    train(parse_config([*args, "--enable_precomputation", "on", "--precomputation_dir", str(cache),
                        "--output_dir", str(tmp_path / "pre")]))  # fmt: skip
    np.testing.assert_allclose(_losses(tmp_path / "pre"), _losses(tmp_path / "fly"), rtol=1e-5)
    assert not encodes, encodes

    (folder,) = [p for p in cache.iterdir() if p.is_dir()]
    files = sorted(folder.glob("0*.safetensors"))
    assert len(files) == 4
    with safe_open(str(files[0]), framework="pt") as f:
        keys = set(f.keys())
    assert stored <= keys, keys
    # HunyuanVideo-I2V reads the image into the prompt: each sample keeps its own empty-caption entry
    assert any(k.startswith("empty.text.") for k in keys) == (model == "hunyuan_video")
    assert json.loads((folder / "manifest.json").read_text())["condition"]["train_mode"] == "i2v"


def test_what_the_i2v_cache_key_covers(table, tiny_data, tmp_path, single_process_env):
    """The first-frame conditioning's key covers the image processor and model_index.json's settings (Wan 2.2's
    expand_timesteps switches what is stored); a normal-mode run ignores a first-frame image column entirely (it
    neither loads nor keys those images)."""
    from ptrain.data.precompute import stored_condition
    from ptrain.models.spec import get_spec
    from ptrain.trainer import plan_run

    ckpt = write_tiny_checkpoint(tmp_path / "ckpt", model_name="wan", variant="i2v")
    args = ["--model_name", "wan", "--pretrained_model_name_or_path", str(ckpt), "--dataset_file", str(table),
            "--data_root", str(tiny_data), "--output_dir", str(tmp_path / "out"), *TINY_ARGS]  # fmt: skip
    cfg = parse_config([*args, "--train_mode", "i2v"])
    spec = get_spec("wan")
    before = stored_condition(cfg, spec)
    assert stored_condition(parse_config(args), spec) is None  # normal mode stores no conditioning
    processor = ckpt / "image_processor" / "preprocessor_config.json"
    processor.write_text(processor.read_text().replace("{", '{"crop_size_note": 1,', 1))
    assert stored_condition(cfg, spec) != before
    changed = stored_condition(cfg, spec)
    index = ckpt / "model_index.json"
    index.write_text(json.dumps({**json.loads(index.read_text()), "expand_timesteps": True}))
    assert stored_condition(cfg, spec) != changed

    # one row names an image that is not there: a normal run ignores the column (no skip), i2v skips that row
    broken = tmp_path / "broken.csv"
    rows = list(csv.reader(table.open()))
    rows[2][2] = str(tmp_path / "missing.png")
    with broken.open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    args[args.index("--dataset_file") + 1] = str(broken)
    run = plan_run(parse_config(args).validate())
    assert all(r.first_frame is None for r in run.usable.records)
    assert len(run.usable.records) == 4 and not run.usable.skipped
    run = plan_run(parse_config([*args, "--train_mode", "i2v", "--output_dir", str(tmp_path / "o2")]).validate())
    assert any(r.first_frame is not None for r in run.usable.records) and len(run.usable.records) == 3
    assert [f"first-frame image {tmp_path / 'missing.png'} not found"] == list(run.usable.skipped.values())
