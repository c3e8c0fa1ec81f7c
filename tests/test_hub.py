"""Hub ids (ptrain/hub.py) from an offline Hugging Face cache laid out as huggingface_hub lays it out
(ptrain.testing.hub_cache): every component loads, --revision / ID@REVISION / --variant pick their files, missing ids,
revisions and files fail with the id and what to do, and rank 0 resolves before the other ranks."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_ARGS, first_error
from safetensors.torch import load_file

from ptrain.config import ConfigError, parse_config
import ptrain.hub
from ptrain.hub import resolve_model_sources
from ptrain.models.spec import get_spec
from ptrain.testing.hub_cache import add_snapshot
from ptrain.testing.tiny import build_tiny_pipeline, write_tiny_checkpoint

REPO_ID = "tiny-org/tiny-ltx"
FP32 = {k: torch.float32 for k in ("transformer", "vae", "text_encoder", "text_encoder_2")}
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="session")
def hub_cache(tmp_path_factory, tiny_ckpt) -> dict:
    """A hub cache: tiny-org/tiny-ltx at main (seed 0), v2 (seed 1), fp16-only (fp16 variant files only), no-vae and
    no-weights (broken copies); tiny-org/tiny-ltx-transformer: a component repo (seed 1's transformer at its root)."""
    root = tmp_path_factory.mktemp("hub")
    cache, work = root / "cache", root / "work"
    seed1 = write_tiny_checkpoint(work / "seed1", seed=1)
    fp16 = work / "fp16"
    build_tiny_pipeline("ltx_video", seed=0).save_pretrained(fp16, safe_serialization=True, variant="fp16")
    no_vae, no_weights = work / "no_vae", work / "no_weights"
    shutil.copytree(tiny_ckpt, no_vae)
    shutil.rmtree(no_vae / "vae")
    shutil.copytree(tiny_ckpt, no_weights)
    (no_weights / WEIGHTS).unlink()
    commits = {"main": add_snapshot(cache, REPO_ID, tiny_ckpt)}
    for ref, folder in (("v2", seed1), ("fp16-only", fp16), ("no-vae", no_vae), ("no-weights", no_weights)):
        commits[ref] = add_snapshot(cache, REPO_ID, folder, revision=ref)
    add_snapshot(cache, "tiny-org/tiny-ltx-transformer", seed1 / "transformer")
    return {"cache": cache, "commits": commits, "seed0": tiny_ckpt, "seed1": seed1}


@pytest.fixture
def offline(hub_cache, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(hub_cache["cache"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub_cache


def _resolve(tiny_data, *flags: str):
    cfg = parse_config(["--pretrained_model_name_or_path", REPO_ID, "--data_root", str(tiny_data), *flags])
    cfg.validate()
    spec = get_spec("ltx_video")
    originals = resolve_model_sources(cfg.model, list(spec.component_classes))
    return cfg.model, spec, originals


def _load(m, spec):
    overrides = {"transformer": m.transformer_id, "vae": m.vae_id, "tokenizer": m.tokenizer_id}
    return spec.load_components(m.pretrained_model_name_or_path, FP32, torch.device("cpu"), overrides, m.variant)


def _same_transformer(comps, folder: Path, name: str = WEIGHTS) -> bool:
    ref = load_file(folder / name)
    state = comps.transformer.state_dict()
    return all(torch.equal(state[k], v) for k, v in ref.items())


def test_hub_id_loads_every_component_from_the_offline_cache(offline, tiny_data):
    m, spec, originals = _resolve(tiny_data)
    snapshot = offline["cache"] / "models--tiny-org--tiny-ltx" / "snapshots" / offline["commits"]["main"]
    assert originals == {"--pretrained_model_name_or_path": REPO_ID}
    assert Path(m.pretrained_model_name_or_path) == snapshot
    comps = _load(m, spec)
    assert {type(c).__name__ for c in (comps.transformer, comps.vae, comps.text_encoder, comps.scheduler)} == {
        "LTXVideoTransformer3DModel", "AutoencoderKLLTXVideo", "T5EncoderModel", "FlowMatchEulerDiscreteScheduler"}  # fmt: skip
    assert comps.tokenizer("a cat").input_ids
    assert _same_transformer(comps, offline["seed0"])
    # --revision belongs to a hub id; a local folder has none.
    with pytest.raises(ConfigError, match="--revision v2: applies to a hub id"):
        parse_config(["--pretrained_model_name_or_path", str(offline["seed0"]), "--data_root", str(tiny_data),
                      "--revision", "v2"]).validate()  # fmt: skip


def test_revision_and_component_ids_pick_their_snapshots(offline, tiny_data):
    m, spec, _ = _resolve(tiny_data, "--revision", "v2")
    assert Path(m.pretrained_model_name_or_path).name == offline["commits"]["v2"]
    assert _same_transformer(_load(m, spec), offline["seed1"])
    m, spec, _ = _resolve(tiny_data, "--revision", offline["commits"]["v2"])  # a commit hash works too
    assert Path(m.pretrained_model_name_or_path).name == offline["commits"]["v2"]
    # A component repo (weights at its root) and a pipeline repo at a revision (its transformer/ subfolder).
    for override in ("tiny-org/tiny-ltx-transformer", f"{REPO_ID}@v2"):
        m, spec, originals = _resolve(tiny_data, "--transformer_id", override)
        assert originals["--transformer_id"] == override
        comps = _load(m, spec)
        assert _same_transformer(comps, offline["seed1"])
        assert Path(m.pretrained_model_name_or_path).name == offline["commits"]["main"]


def test_variant_loads_the_variant_files(offline, tiny_data):
    m, spec, _ = _resolve(tiny_data, "--revision", "fp16-only", "--variant", "fp16")
    folder = Path(m.pretrained_model_name_or_path)
    assert (folder / "transformer/diffusion_pytorch_model.fp16.safetensors").is_file()
    assert not (folder / WEIGHTS).exists()
    comps = _load(m, spec)
    assert _same_transformer(comps, folder, "transformer/diffusion_pytorch_model.fp16.safetensors")
    m.variant = None
    with pytest.raises(ConfigError, match="cannot load transformer"):
        _load(m, spec)


def test_missing_id_revision_or_file_says_what_to_do(offline, tiny_data, monkeypatch):
    # (a mistyped relative folder reads as a hub id: the error says that no such folder is there either)
    with pytest.raises(ConfigError, match=r"nobody/nothing: not in the hub cache and HF_HUB_OFFLINE=1\. There is no "
                                          r"local folder nobody/nothing either .*unset it.*"
                                          r"hf download nobody/nothing.*local diffusers folder"):  # fmt: skip
        resolve_model_sources(parse_config(["--pretrained_model_name_or_path", "nobody/nothing"]).model, ["vae"])
    with pytest.raises(ConfigError, match=f"{REPO_ID}@nope: not in the hub cache.*--revision nope"):
        _resolve(tiny_data, "--revision", "nope")
    with pytest.raises(ConfigError, match=f"{REPO_ID}: the snapshot .* has no vae/ folder.*hf download {REPO_ID}"):
        _resolve(tiny_data, "--revision", "no-vae")
    m, spec, _ = _resolve(tiny_data, "--revision", "no-weights")
    with pytest.raises(ConfigError, match=f"cannot load transformer .*hub id {REPO_ID} at revision no-weights"):
        _load(m, spec)
    # Neither a folder nor an id: caught by config validation, before anything runs.
    with pytest.raises(ConfigError, match="--vae_id ./nope: no such folder, and not a hub id"):
        _resolve(tiny_data, "--vae_id", "./nope")
    # Online (no HF_HUB_OFFLINE) without a network: the same advice, without the offline part.
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: a connection error, at once
    with pytest.raises(ConfigError, match="nobody/nothing: .*hf download nobody/nothing"):
        resolve_model_sources(parse_config(["--pretrained_model_name_or_path", "nobody/nothing"]).model, ["vae"])


def test_dry_run_fetches_configs_but_no_weights(offline, tiny_data, tmp_path, monkeypatch, single_process_env):
    """The README points a new user at a dry run right after the hub-id example: it plans from the configs, so it
    must not download the weights (gigabytes). What each download asks the hub for is recorded (the real
    snapshot_download runs, from the offline cache): a dry run asks for no `.safetensors`, the run itself does."""
    from ptrain.trainer import train

    asked: list[list[str]] = []
    real = ptrain.hub.download

    def recording(flag, repo, revision, allow, ignore, cache_only):
        asked.append(list(allow))
        return real(flag, repo, revision, allow, ignore, cache_only)

    monkeypatch.setattr(ptrain.hub, "download", recording)
    train(parse_config(["--pretrained_model_name_or_path", REPO_ID, "--data_root", str(tiny_data), "--output_dir",
                        str(tmp_path / "out"), "--dry_run", *TINY_ARGS]))  # fmt: skip
    assert asked and not [p for allow in asked for p in allow if p.endswith(".safetensors")], asked
    assert any(p.endswith("config.json") or p.endswith("*.json") for allow in asked for p in allow), asked
    asked.clear()
    m, _, _ = _resolve(tiny_data)  # what the run resolves: the weights too
    assert any(p == "transformer/*.safetensors" for allow in asked for p in allow), asked
    assert Path(m.pretrained_model_name_or_path).name == offline["commits"]["main"]


@pytest.mark.slow
def test_rank0_resolves_before_the_others(hub_cache, tmp_path):
    """2 gloo processes: rank 0 starts 1 s late, yet rank 1 starts resolving only after rank 0 has finished, and
    both read the same snapshot."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    env.update(HF_HUB_CACHE=str(hub_cache["cache"]), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(REPO / "tests" / "hub_worker.py"), REPO_ID, str(tmp_path)]  # fmt: skip
    p = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, first_error(p.stderr)
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["start"] > r1["called"] + 0.5  # rank 0 really came late
    assert r1["resolved"] > r0["resolved"]  # and rank 1 still waited for it
    assert r0["folder"] == r1["folder"] and Path(r0["folder"]).name == hub_cache["commits"]["main"]


@pytest.mark.slow
@pytest.mark.heavy  # suite time; CI runs it
def test_hub_id_training_and_validation_split_over_two_ranks(offline, tiny_data, ptrain_run, tmp_path):
    """Train from the hub id (offline cache) in 1 and 2 processes, validating 3 prompts: with 2 ranks each prompt's
    video is written once, by rank i % 2, and the files equal the 1-process run's (same seed per prompt; lr 1e-12
    leaves the weights as they were, so the samples must match bit for bit). Tensorboard gets one frame strip each."""
    from conftest import TINY_ARGS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    args = ["--pretrained_model_name_or_path", REPO_ID, "--data_root", str(tiny_data), "--train_steps", "1",
            "--batch_size", "1", "--lr", "1e-12", "--checkpointing_steps", "0", "--seed", "3",
            "--validation_prompts", "a red square:::a blue circle:::a green cross", "--validation_steps", "1",
            "--validation_num_inference_steps", "2", "--validation_height", "32", "--validation_width", "32",
            "--validation_num_frames", "9", *TINY_ARGS, "--report_to", "tensorboard"]  # fmt: skip
    runs = {n: ptrain_run(n, args, tmp_path / f"n{n}") for n in (1, 2)}
    videos = {}
    for n, run in runs.items():
        assert run.returncode == 0, first_error(run.stderr)
        assert f"--pretrained_model_name_or_path {REPO_ID} -> " in run.stderr
        config = json.loads((run.output_dir / "config.json").read_text())
        assert config["hub_ids"] == {"--pretrained_model_name_or_path": REPO_ID}  # the id, beside the folder it gave
        videos[n] = sorted((run.output_dir / "validation" / "step-1").glob("*.mp4"))
        assert [v.name[:4] for v in videos[n]] == ["00-0", "01-0", "02-0"]
        images = EventAccumulator(str(run.output_dir / "logs"), size_guidance={"images": 0}).Reload()
        tags = sorted(t for t in images.Tags()["images"] if t.startswith("validation/"))
        assert tags == ["validation/00-0", "validation/01-0", "validation/02-0"]
        assert images.Images(tags[0])[0].width == 4 * 32  # 4 frames side by side
    assert [v.read_bytes() for v in videos[1]] == [v.read_bytes() for v in videos[2]]
    by_rank = ", ".join(f"{v.name} by rank {i % 2}" for i, v in enumerate(videos[2]))
    assert f"validation: 3 videos in {runs[2].output_dir / 'validation' / 'step-1'} ({by_rank})" in runs[2].stderr


def test_validation_plan_keeps_ranks_in_step():
    from ptrain.validation import ValidationItem, validation_plan

    items = [ValidationItem(p, 32, 32, 9, 2) for p in "abc"]
    assert validation_plan(items, 1, 2, 0) == [(0, 0, True), (2, 0, True)]
    assert validation_plan(items, 1, 2, 1) == [(1, 0, True), (2, 0, False)]  # same count: a dropped repeat
    assert validation_plan(items, 2, 4, 3) == [(1, 1, True), (2, 0, False)]  # 6 videos over 4 ranks
    items[1].num_inference_steps = 5  # step counts differ: everyone samples everything, keeps its own
    assert validation_plan(items, 1, 2, 1) == [(0, 0, False), (1, 0, True), (2, 0, False)]


def test_a_local_folder_without_a_component_stops_the_dry_run(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    """A new-user trial: a ptrain full fine-tune's output (transformer/ alone) given as the model was "valid" to
    --dry_run and failed only at load, naming a vae/ folder that is not there. The dry run now stops, names the
    missing folders and says how to use a fine-tuned transformer; with the base model and --transformer_id it runs."""
    from ptrain.trainer import train

    out = tmp_path / "finetuned"
    shutil.copytree(tiny_ckpt / "transformer", out / "transformer")
    args = ["--data_root", str(tiny_data), "--output_dir", str(tmp_path / "run"), "--dry_run", *TINY_ARGS]
    with pytest.raises(ConfigError, match=r"no vae/, text_encoder/, tokenizer/, scheduler/ folder: .* with "
                                          r"--transformer_id .*finetuned/transformer"):  # fmt: skip
        train(parse_config(["--pretrained_model_name_or_path", str(out), *args]))
    train(parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--transformer_id",
                        str(out / "transformer"), *args]))  # fmt: skip
