"""Security of what is loaded (README "What ptrain deserialises"): a crafted malicious pickle, put in each place
ptrain reads files from, is refused with an error naming the file, and its payload never runs.

The payload's `__reduce__` makes unpickling call `os.system("touch <marker>")`; every test asserts the marker
file does not exist afterwards. `test_payload_is_live` shows that a plain `pickle.load` does run it.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import random
import shlex
import shutil
import warnings
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo

from ptrain.config import ConfigError
from ptrain.safe_load import (
    _METADATA_ALLOWED,
    UnsafeFileError,
    dcp_load,
    load_dcp_metadata,
    load_rank_state,
    load_safetensors,
)


class Payload:
    """Unpickling this runs a shell command that creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


@pytest.fixture
def marker(tmp_path) -> Path:
    m = tmp_path / "PAYLOAD_RAN"
    yield m
    assert not m.exists(), "the malicious pickle's payload ran"


@pytest.fixture(autouse=True)
def _quiet_dcp():
    with warnings.catch_warnings():  # "torch.distributed is disabled ... assuming a single process"
        warnings.simplefilter("ignore", UserWarning)
        yield


def evil_pickle(marker: Path) -> bytes:
    return pickle.dumps(Payload(marker))


def evil_torch_save(marker: Path) -> bytes:
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    return buf.getvalue()


def test_payload_is_live(tmp_path):
    m = tmp_path / "ran"
    pickle.loads(evil_pickle(m))
    assert m.exists()


# --- (a) per-rank state: rank-N.pt ----------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["torch.save", "raw pickle"])
def test_rank_state_payload_refused(tmp_path, marker, fmt):
    path = tmp_path / "rank-0.pt"
    path.write_bytes(evil_torch_save(marker) if fmt == "torch.save" else evil_pickle(marker))
    with pytest.raises(UnsafeFileError, match=str(path)):
        load_rank_state(path)


def test_rank_state_as_ptrain_writes_it_loads(tmp_path):
    from diffusers.optimization import get_scheduler

    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
    sched = get_scheduler("cosine", opt, num_warmup_steps=2, num_training_steps=10)
    np_state = np.random.get_state()
    state = {
        "rng": {
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
        },
        "lr_scheduler": sched.state_dict(),
        "sampler": {"micro_batches_done": 4, "base_position": 0},
    }
    torch.save(state, tmp_path / "rank-0.pt")
    back = load_rank_state(tmp_path / "rank-0.pt")
    assert back["rng"]["python"] == state["rng"]["python"] and back["sampler"] == state["sampler"]
    assert back["lr_scheduler"] == state["lr_scheduler"]


# --- (b) DCP checkpoint folders: .metadata, non-tensor items, tensor items --------------------------------------


def _state() -> dict:
    return {
        "model": {"w": torch.randn(3, 4), "b": torch.randn(2).to(torch.bfloat16)},
        "optim": {
            "state": {"w": {"step": torch.tensor(3.0), "exp_avg": torch.randn(3, 4)}},
            "param_groups": [{"lr": 1e-4, "betas": (0.9, 0.99), "amsgrad": False, "foreach": None, "params": ["w"]}],
        },
        "ema": {"w": torch.randn(3, 4)},
    }


def _blank(value):
    """The same structure with zeroed tensors and other values replaced (dcp.load fills them in)."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_blank(v) for v in value]
    return torch.zeros_like(value) if isinstance(value, torch.Tensor) else None


@pytest.fixture
def dcp_ckpt(tmp_path) -> tuple[Path, dict]:
    state = _state()
    path = tmp_path / "step-2"
    dcp.save(state, checkpoint_id=str(path))
    return path, state


def test_dcp_checkpoint_round_trips(dcp_ckpt):
    path, state = dcp_ckpt
    target = _blank(state)
    dcp_load(target, path)
    assert torch.equal(target["model"]["w"], state["model"]["w"])
    assert torch.equal(target["model"]["b"], state["model"]["b"])
    assert torch.equal(target["optim"]["state"]["w"]["exp_avg"], state["optim"]["state"]["w"]["exp_avg"])
    assert target["optim"]["param_groups"] == state["optim"]["param_groups"]


def test_dcp_optimizer_state_dict_round_trips(tmp_path):
    """A real model + AdamW state dict, as ptrain's Checkpointer builds it (get_state_dict / set_state_dict)."""
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.8, 0.95))
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    m_sd, o_sd = get_state_dict(model, opt)
    dcp.save({"model": m_sd, "optim": o_sd}, checkpoint_id=str(tmp_path / "ck"))

    model2 = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt2 = torch.optim.AdamW(model2.parameters(), lr=0.5)
    model2(torch.randn(5, 4)).sum().backward()
    opt2.step()
    m2, o2 = get_state_dict(model2, opt2)
    state = {"model": m2, "optim": o2}
    dcp_load(state, tmp_path / "ck")
    set_state_dict(model2, opt2, model_state_dict=state["model"], optim_state_dict=state["optim"])
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)
    assert opt2.param_groups[0]["lr"] == 1e-3 and opt2.param_groups[0]["betas"] == (0.8, 0.95)


def test_dcp_metadata_payload_refused(dcp_ckpt, marker):
    path, state = dcp_ckpt
    (path / ".metadata").write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafeFileError, match=str(path / ".metadata")) as e:
        dcp_load(_blank(state), path)
    assert "posix.system" in str(e.value) or "os.system" in str(e.value)


def test_dcp_rank_local_metadata_payload_refused(dcp_ckpt, marker):
    """DCP falls back to __<rank>.metadata when .metadata cannot be read: that file is guarded too."""
    path, state = dcp_ckpt
    (path / ".metadata").unlink()
    (path / "__0.metadata").write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafeFileError, match="__0.metadata"):
        dcp_load(_blank(state), path)


def test_dcp_metadata_of_another_type_refused(dcp_ckpt):
    path, _ = dcp_ckpt
    (path / ".metadata").write_bytes(pickle.dumps({"not": "metadata"}))
    with pytest.raises(UnsafeFileError, match="not torch.distributed.checkpoint Metadata"):
        load_dcp_metadata(path / ".metadata")


def _point_item_at(path: Path, fqn: str, payload: bytes) -> None:
    """Rewrite the checkpoint (as an attacker would) so item `fqn` is read from a new file holding `payload`."""
    md = pickle.loads((path / ".metadata").read_bytes())
    (path / "__evil.distcp").write_bytes(payload)
    hits = [k for k in md.storage_data if k.fqn == fqn]
    assert hits
    for k in hits:
        md.storage_data[k] = _StorageInfo("__evil.distcp", 0, len(payload))
    (path / ".metadata").write_bytes(pickle.dumps(md))


def test_dcp_non_tensor_item_payload_refused(dcp_ckpt, marker):
    """Upstream DefaultLoadPlanner reads these with torch.load(weights_only=False)."""
    path, state = dcp_ckpt
    _point_item_at(path, "optim.param_groups.0.lr", evil_torch_save(marker))
    with pytest.raises(UnsafeFileError, match=f"'optim.param_groups.0.lr' of checkpoint {path}"):
        dcp_load(_blank(state), path)


def test_dcp_tensor_item_payload_refused(dcp_ckpt, marker):
    path, state = dcp_ckpt
    _point_item_at(path, "model.w", evil_torch_save(marker))
    with pytest.raises(UnsafeFileError, match=f"tensor from checkpoint {path}"):
        dcp_load(_blank(state), path)


def test_metadata_allow_list_names_real_objects():
    """Every allow-listed (module, name) is where pickle would find that object in the installed torch."""
    import importlib

    for (module, name), obj in _METADATA_ALLOWED.items():
        found = importlib.import_module(module)
        for part in name.split("."):
            found = getattr(found, part)
        assert found is obj, (module, name)
    assert ("posix", "system") not in _METADATA_ALLOWED and ("builtins", "eval") not in _METADATA_ALLOWED


# --- (c) precomputed tensors (--enable_precomputation) ----------------------------------------------------------


def _precomputed(folder: Path, name: str = "00000000.safetensors"):
    from ptrain.data.precompute import PrecomputedDataset, sample_key

    record = SimpleNamespace(video=Path("a.mp4"), kind="video", caption="c", first_frame=None)
    usable = SimpleNamespace(records=[record], buckets=["b"])
    folder.mkdir(exist_ok=True)
    (folder / "manifest.json").write_text(json.dumps({"files": {sample_key(usable, 0): name}}))
    return PrecomputedDataset(usable, folder, caption_dropout_p=0.0, seed=0)


def test_precomputed_payload_refused(tmp_path, marker):
    ds = _precomputed(tmp_path / "cache")
    bad = tmp_path / "cache" / "00000000.safetensors"
    bad.write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafeFileError, match=str(bad)):
        ds[(0, 0)]
    bad.write_bytes(evil_torch_save(marker))
    with pytest.raises(UnsafeFileError, match="not a valid safetensors file"):
        ds[(0, 0)]


def test_precomputed_file_loads(tmp_path):
    from safetensors.torch import save_file

    ds = _precomputed(tmp_path / "cache")
    save_file({"latents": torch.ones(2, 3)}, tmp_path / "cache" / "00000000.safetensors")
    assert torch.equal(ds[(0, 5)]["latents"], torch.ones(2, 3)) and ds[(0, 5)]["position"] == 5


@pytest.mark.parametrize("name", ["../elsewhere.safetensors", "/etc/passwd", "x.pt"])
def test_precomputed_manifest_names_only_cache_files(tmp_path, name):
    with pytest.raises(UnsafeFileError, match="invalid cache file name"):
        _precomputed(tmp_path / "cache", name)


def test_load_safetensors_names_the_file(tmp_path, marker):
    bad = tmp_path / "lora.safetensors"
    bad.write_bytes(evil_pickle(marker))
    with pytest.raises(UnsafeFileError, match=str(bad)):
        load_safetensors(bad)


# --- (d) model weights, remote code, LoRA files, configs and dataset files --------------------------------------


@pytest.fixture
def model_dir(tiny_ckpt, tmp_path) -> Path:
    return Path(shutil.copytree(tiny_ckpt, tmp_path / "model"))


def _load_components(path: Path):
    from ptrain.models.spec import get_spec

    dtypes = dict.fromkeys(("transformer", "vae", "text_encoder", "text_encoder_2"), torch.float32)
    return get_spec("ltx_video").load_components(str(path), dtypes, torch.device("cpu"), {})


@pytest.mark.parametrize(
    ("sub", "safetensors_name", "bin_name"),
    [
        ("transformer", "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin"),  # diffusers
        ("text_encoder", "model.safetensors", "pytorch_model.bin"),  # transformers
    ],
)
def test_pickled_model_weights_refused(model_dir, marker, sub, safetensors_name, bin_name):
    (model_dir / sub / safetensors_name).unlink()
    (model_dir / sub / bin_name).write_bytes(evil_torch_save(marker))
    with pytest.raises(ConfigError, match=rf"cannot load {sub} .*\.safetensors only"):
        _load_components(model_dir)


def test_tokenizer_remote_code_refused(model_dir, marker):
    tok = model_dir / "tokenizer"
    (tok / "evil_tokenizer.py").write_text(
        f"import os\nos.system({f'touch {shlex.quote(str(marker))}'!r})\n"
        "from transformers import PreTrainedTokenizerFast\nclass EvilTokenizer(PreTrainedTokenizerFast):\n    pass\n"
    )
    cfg = json.loads((tok / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "evil_tokenizer.EvilTokenizer"]})
    (tok / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="cannot load tokenizer"):
        _load_components(model_dir)


def test_lora_file_payload_refused(tmp_path, marker):
    from ptrain.export_comfyui import read_lora_file

    bad = tmp_path / "pytorch_lora_weights.safetensors"
    bad.write_bytes(evil_pickle(marker))
    with pytest.raises(Exception, match="deserializing header"):  # safetensors' parser refuses it
        read_lora_file(bad)


@pytest.mark.parametrize("suffix", [".json", ".jsonl", ".parquet"])
def test_dataset_file_payload_refused(tmp_path, marker, suffix):
    from ptrain.data.sources import read_table

    bad = tmp_path / f"metadata{suffix}"
    bad.write_bytes(evil_pickle(marker))
    # (.parquet: pyarrow's ArrowInvalid, a ValueError naming the file; sources.read_table wraps only OSError)
    with pytest.raises(ConfigError if suffix != ".parquet" else ValueError, match=str(bad)):
        read_table(bad)


def test_parquet_pickled_extension_type_not_unpickled(tmp_path, marker):
    """pyarrow < 14.0.1 unpickled `arrow.py_extension_type` field metadata (CVE-2023-47248); ptrain needs >= 15."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ptrain.data.sources import read_table

    meta = {b"ARROW:extension:name": b"arrow.py_extension_type", b"ARROW:extension:metadata": evil_pickle(marker)}
    schema = pa.schema([pa.field("caption", pa.binary(), metadata=meta), pa.field("video", pa.string())])
    pq.write_table(pa.table({"caption": [b"a cat"], "video": ["a.mp4"]}, schema=schema), tmp_path / "m.parquet")
    assert read_table(tmp_path / "m.parquet") == [{"caption": b"a cat", "video": "a.mp4"}]


@pytest.mark.parametrize("kind", ["--config", "--dataset_config"])
def test_config_payload_refused(tmp_path, marker, kind):
    from ptrain.config import _load_toml
    from ptrain.data.sources import read_dataset_config

    bad = tmp_path / "evil.toml"
    bad.write_bytes(evil_pickle(marker))
    # tomllib / json only build dicts, lists, strings and numbers: nothing to run. (--config: a non-UTF-8 file
    # surfaces as UnicodeDecodeError, a ValueError, rather than a ConfigError.)
    with pytest.raises(ValueError):
        (_load_toml if kind == "--config" else read_dataset_config)(bad)
