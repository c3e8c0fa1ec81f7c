"""ptrain.parallel.swap.streamed (validation's text encoders while the training state is resident): every op of a
text encoder's forward reads the device copies of its layers, never the host weights, and the output is the
same; afterwards the weights are the host tensors again. On the CPU the copies are clones (the GPU's mechanism)."""

from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ptrain.models.registry import get_spec
from ptrain.models.spec import Components
from ptrain.parallel.swap import streamed
from ptrain.testing.tiny import build_tiny_pipeline

MAIN = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")


class NoHostWeights(TorchDispatchMode):
    """Fails an op that reads a tensor sharing storage with one of `host` (the weights that stay in host memory)."""

    def __init__(self, host: set[int]):
        super().__init__()
        self.host, self.ops, self.copies = host, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.clone.default, torch.ops.aten._to_copy.default):
            self.copies += 1  # the transfer itself (a clone on the CPU, a copy to the device on a GPU)
        else:
            for t in tree_leaves((args, kwargs or {})):
                if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in self.host:
                    raise AssertionError(f"{func} read a host weight of shape {tuple(t.shape)}")
            self.ops += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("model", ["ltx_video", "cogvideox", "hunyuan_video", "wan"])
def test_text_encoders_read_only_streamed_copies(model):
    parts = build_tiny_pipeline(model).components
    comps = Components(*(parts[k] for k in MAIN), {k: v for k, v in parts.items() if k not in MAIN})
    spec = get_spec(model).bind(comps)
    encoders = [m for k, m in parts.items() if k.startswith("text_encoder") and m is not None]
    weights = [t for e in encoders for t in (*e.parameters(), *e.buffers())]
    before = [t.data_ptr() for t in weights]

    def hooks():
        return [(len(m._forward_hooks), len(m._forward_pre_hooks)) for e in encoders for m in e.modules()]

    plain = spec.encode_text(comps, ["a cat walks"], 16).tensors
    hooks_before = hooks()  # after a first call: transformers installs some of its own lazily
    mode = NoHostWeights({t.untyped_storage().data_ptr() for t in weights})
    with contextlib.ExitStack() as stack:
        for e in encoders:
            stack.enter_context(streamed(e, torch.device("cpu")))
        with mode:
            out = spec.encode_text(comps, ["a cat walks"], 16).tensors
    assert mode.ops > 20 and mode.copies >= len(weights)
    assert out.keys() == plain.keys()
    for k in plain:
        torch.testing.assert_close(out[k], plain[k], rtol=0, atol=0)
    assert [t.data_ptr() for t in weights] == before  # the host tensors are back ...
    assert hooks() == hooks_before  # ... and only the model's own hooks


def test_a_forward_that_raises_leaves_the_host_weights(tmp_path):
    layer = torch.nn.Linear(4, 4)
    host = layer.weight.data
    with pytest.raises(RuntimeError), streamed(layer, torch.device("cpu")):
        layer(torch.ones(3, 5))  # wrong width: raises inside the layer's forward, after its copies went in
    assert layer.weight.data_ptr() == host.data_ptr() and not layer._forward_pre_hooks
