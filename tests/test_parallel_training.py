"""Loss parity across parallel layouts with real torchrun processes on gloo (fp32); the reference is one process
with no FSDP wrapper (a plain module).

For a seed and a global batch, every step must see the same samples, noise and
timesteps whatever the layout, so per-step losses of 1 process, DDP 2, FSDP 2 and
HSDP 2x2 agree. The FSDP run also uses gradient accumulation and compile (cheap
aot_eager backend), the HSDP run activation checkpointing: neither may change the loss.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import STEPS
from safetensors.torch import load_file

pytestmark = pytest.mark.slow

RTOL = 1e-4


def _assert_parity(run, reference):
    losses = run.losses
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses), losses
    for step, (a, b) in enumerate(zip(losses, reference.losses), 1):
        assert a == pytest.approx(b, rel=RTOL), f"step {step}: {losses} vs reference {reference.losses}"


@pytest.mark.parametrize(
    "name, expect",
    [
        ("lora-ddp2", "DDP (FSDP2 replicate) over 2 replicas"),
        ("lora-fsdp2", "torch.compile (aot_eager): 2 blocks"),
        ("lora-hsdp2x2", "activation checkpointing (full): 2 of 2 blocks"),
    ],
)
def test_lora_layouts_match_single_process(launches, name, expect):
    ref, run = launches("lora-single").run, launches(name).run
    _assert_parity(run, ref)
    assert expect in run.stderr
    # The exported LoRA equals the single-process one (same training, other layout).
    a = load_file(run.output_dir / "pytorch_lora_weights.safetensors")
    b = load_file(ref.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() and len(a) > 0
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def test_hsdp_describes_layout(launches):
    assert "HSDP: 2 replicas x 2 shards" in launches("lora-hsdp2x2").run.stderr
    assert "FSDP2 over 2 shards" in launches("lora-fsdp2").run.stderr


def test_full_finetune_fsdp2_came_matches_single_process(launches, tiny_ckpt):
    # CAME's factored second moments reduce over rows and columns of sharded weights: a real DTensor check.
    ref, run = launches("full-single").run, launches("full-fsdp2").run
    _assert_parity(run, ref)
    assert "activation checkpointing (selective, every 2): 1 of 2 blocks" in run.stderr
    from diffusers import LTXVideoTransformer3DModel

    a = LTXVideoTransformer3DModel.from_pretrained(run.output_dir / "transformer").state_dict()
    b = LTXVideoTransformer3DModel.from_pretrained(ref.output_dir / "transformer").state_dict()
    base = LTXVideoTransformer3DModel.from_pretrained(tiny_ckpt, subfolder="transformer").state_dict()
    assert any(not torch.equal(a[k], base[k]) for k in a), "full fine-tune changed no weight"
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    # The fifth audit: an FSDP2-wrapped export named fully_shard's class (FSDPLTXVideoTransformer3DModel), which
    # diffusers' AutoModel and ptrain's own --model_name auto refused; an older export's name is still read.
    from diffusers import AutoModel

    from ptrain.models.registry import resolve_model_name

    assert json.loads((run.output_dir / "transformer" / "config.json").read_text())["_class_name"] == \
        "LTXVideoTransformer3DModel"
    assert type(AutoModel.from_pretrained(str(run.output_dir / "transformer"))) is LTXVideoTransformer3DModel
    assert resolve_model_name("auto", tiny_ckpt, run.output_dir / "transformer") == "ltx_video"


def test_cpu_offload_gives_the_same_losses(launches):
    run, ref = launches("full-fsdp2-offload").run, launches("full-fsdp2").run
    assert "offloaded to CPU" in run.stderr
    assert run.losses == pytest.approx(ref.losses, rel=1e-5)


def test_cpu_offload_policy_reaches_every_unit(single_process_env):
    """On CPU offloading changes no number (the losses above), so check that every FSDP2 unit (blocks, float32
    submodules, root) holds its parameters with FSDP2's CPU offload policy, and that without the flag none does
    (one process without offload: no FSDP2 unit at all)."""
    from torch import nn
    from torch.distributed.fsdp import CPUOffloadPolicy

    from ptrain.parallel import ParallelDims, apply_data_parallel, init_distributed

    init_distributed(60)
    dims = ParallelDims.build(1, 1, 1, 1)
    mesh = dims.build_mesh()
    for offload in (True, False):
        m = nn.Module()
        m.blocks, m.norm, m.out = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.LayerNorm(4), nn.Linear(4, 2)
        apply_data_parallel(m, [m.blocks], mesh, dims, torch.bfloat16, ["norm"], cpu_offload=offload)
        units = [*m.blocks, m.norm, m]
        groups = [u._get_fsdp_state()._fsdp_param_group for u in units if hasattr(u, "_get_fsdp_state")]
        assert len(groups) == (len(units) if offload else 0)  # one process without offload: the plain module
        assert all(isinstance(g.offload_policy, CPUOffloadPolicy) == offload for g in groups), offload
        assert all(fp.offload_to_cpu == offload for g in groups for fp in g.fsdp_params), offload


def test_units_reach_the_device_one_at_a_time(single_process_env):
    """Start-up without a whole-model copy on the device: apply_data_parallel places each FSDP2 unit (float32
    submodules, blocks, then the root) just before wrapping it, when the units before it are sharded and the ones
    after it not yet; the plain module of one process is placed whole. place_states moves only what is not on the
    device yet (here the meta device stands in for the GPU), one submodule at a time."""
    from torch import nn
    from torch.distributed.fsdp import FSDPModule

    from ptrain.parallel import ParallelDims, apply_data_parallel, init_distributed
    from ptrain.parallelize import place_states

    init_distributed(60)
    dims = ParallelDims.build(1, 1, 1, 1)
    mesh = dims.build_mesh()

    def model():
        m = nn.Module()
        m.blocks, m.norm, m.out = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)]), nn.LayerNorm(4), nn.Linear(4, 2)
        return m

    for plain in (False, True):
        m, seen = model(), []

        def place(unit, m=m, seen=seen):
            seen.append((unit, [isinstance(u, FSDPModule) for u in (m.norm, *m.blocks, m)]))

        apply_data_parallel(m, [m.blocks], mesh, dims, torch.bfloat16, ["norm"], plain_single=plain, place=place)
        if plain:
            assert seen == [(m, [False] * 4)]
        else:
            assert seen == [(m.norm, [False] * 4), (m.blocks[0], [True, False, False, False]),
                            (m.blocks[1], [True, True, False, False]), (m, [True, True, True, False])]  # fmt: skip
    m = model()
    m.blocks[1].to("meta")  # already "on the device"
    kept = m.blocks[1].weight
    place_states(m.blocks[0], torch.device("meta"))
    assert m.blocks[0].weight.is_meta and not m.out.weight.is_meta and m.blocks[1].weight is kept


def test_ema_under_fsdp2_equals_single_process_ema(launches):
    ref, run = launches("lora-single").run, launches("lora-fsdp2").run
    a = load_file(run.output_dir / "ema" / "pytorch_lora_weights.safetensors")
    b = load_file(ref.output_dir / "ema" / "pytorch_lora_weights.safetensors")
    w = load_file(run.output_dir / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys() == w.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)
    assert any((a[k] - w[k]).abs().max() > 1e-5 for k in a), "EMA equals the raw weights"


def test_one_process_runs_without_fsdp(launches):
    """A world of one trains the plain module (no FSDP2 wrapper, plain tensors); the layouts above match its losses."""
    for name in ("lora-single", "full-single"):
        stderr = launches(name).run.stderr
        assert "one process: plain module (no FSDP), float32" in stderr and "FSDP2 over" not in stderr
