"""CogVideoX, HunyuanVideo and Wan through the same loop (LTX-Video has its own, larger set of tests):
loss parity of LoRA on HSDP 2x2 and of full fine-tuning on FSDP2 against one process (fp32, gloo), the
full export loading with the transformer class, and a validation run writing a playable mp4."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import STEPS

pytestmark = pytest.mark.slow

NEW_MODELS = ("cogvideox", "hunyuan_video", "wan")


def _one_by_default(keep: str) -> list:
    """Every model, all but `keep` marked heavy (CI runs them; a local run keeps under 20 minutes)."""
    return [m if m == keep else pytest.param(m, marks=pytest.mark.heavy) for m in NEW_MODELS]
VALIDATION = ("--validation_prompts", "a red ball:::a dog", "--validation_steps", str(STEPS),
              "--validation_num_inference_steps", "2", "--validation_width", "64")  # fmt: skip


def _parity(run, ref):
    assert len(run.losses) == STEPS and all(math.isfinite(v) for v in run.losses)
    assert run.losses == pytest.approx(ref.losses, rel=1e-4), (run.losses, ref.losses)


@pytest.mark.heavy  # HSDP parity runs by default in test_parallel_training; this adds every model's validation
@pytest.mark.parametrize("model", _one_by_default("wan"))  # Wan: float32-kept modules, CLIP-free T2V validation
def test_lora_hsdp_matches_single_process_and_validates(launches, model):
    ref = launches("lora-single", model).run
    run = launches("lora-hsdp2x2", model, *VALIDATION).run
    _parity(run, ref)
    import decord

    videos = sorted((run.output_dir / "validation" / f"step-{STEPS}").glob("*.mp4"))
    assert [v.name[:5] for v in videos] == ["00-0-", "01-0-"]
    for v in videos:
        vr = decord.VideoReader(str(v))
        assert len(vr) == 9 and vr[0].shape == (32, 64, 3)
    assert (run.output_dir / "pytorch_lora_weights.safetensors").is_file()


# suite time; CI runs it. By default test_parallel_training's CAME case checks full fine-tune FSDP2 parity.
@pytest.mark.heavy
@pytest.mark.parametrize("model", NEW_MODELS)
def test_full_finetune_fsdp2_matches_single_process(launches, model, tiny_ckpts):
    ref, run = launches("full-single", model).run, launches("full-fsdp2", model).run
    _parity(run, ref)
    from ptrain.models.spec import get_spec

    cls = get_spec(model).transformer_cls
    trained = cls.from_pretrained(run.output_dir / "transformer").state_dict()
    base = cls.from_pretrained(tiny_ckpts(model), subfolder="transformer").state_dict()
    assert trained.keys() == base.keys()
    assert any(not torch.equal(trained[k].float(), base[k].float()) for k in trained)
    # The same training on one process exported the same weights.
    single = cls.from_pretrained(ref.output_dir / "transformer").state_dict()
    for k in trained:
        torch.testing.assert_close(trained[k], single[k], rtol=1e-3, atol=1e-5, msg=k)
