"""The training step does not wait for the device: no host sync in a step that does not log.

On a GPU, `torch.cuda.set_sync_debug_mode` would flag them; on this CPU the test counts the calls that read a
tensor's value on the host (`item`, `bool`, `float`, `int`, `tolist`, `cpu`, `numpy`) inside the step's model
work (`forward_backward`: inputs, objective, conditioning, forward, backward; `optimizer_step`: clipping, the
global loss, the NaN guard, the fused update, EMA; `log_step`). The loader's own work (decode, collate) runs
before and is not the device's.
"""

from __future__ import annotations

import torch
from conftest import TINY_ARGS
from torch.overrides import TorchFunctionMode

SYNCS = {torch.Tensor.item, torch.Tensor.__bool__, torch.Tensor.__float__, torch.Tensor.__int__,
         torch.Tensor.__index__, torch.Tensor.tolist, torch.Tensor.cpu, torch.Tensor.numpy}  # fmt: skip


class CountSyncs(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in SYNCS:
            self.calls.append(func.__name__)
        return func(*args, **(kwargs or {}))


def test_no_host_sync_in_a_non_logging_step(tiny_ckpt, tiny_data, tmp_path, single_process_env):
    from tqdm import tqdm

    from ptrain.config import parse_config
    from ptrain.trainer import Trainer, plan_run

    cfg = parse_config(["--pretrained_model_name_or_path", str(tiny_ckpt), "--data_root", str(tiny_data),
                        "--output_dir", str(tmp_path), "--train_steps", "4", "--logging_steps", "2",
                        "--checkpointing_steps", "0", "--ema_decay", "0.9", "--gradient_accumulation_steps", "2",
                        *TINY_ARGS])  # fmt: skip
    cfg.validate()
    trainer = Trainer(plan_run(cfg))
    counters, current = {}, [0]
    for name in ("forward_backward", "optimizer_step", "log_step"):
        method = getattr(trainer, name)

        def counted(*args, _method=method, _name=name, **kwargs):
            with CountSyncs() as mode:
                out = _method(*args, **kwargs)
            counters.setdefault(current[0], []).extend(f"{_name}: {c}" for c in mode.calls)
            return out

        setattr(trainer, name, counted)
    trainer.data_iter = iter(trainer.loader)
    bar = tqdm(disable=True)
    for step in (1, 2):
        current[0] = step
        trainer.log_step(step, trainer.train_step(step), bar)
    assert counters[1] == [], counters[1]  # step 1 does not log (--logging_steps 2)
    assert any("log_step" in c for c in counters[2])  # the logging step reads loss and grad norm: the check bites
    rows = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(rows) == 1 and '"step": 2' in rows[0]
