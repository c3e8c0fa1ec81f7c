"""Resumable state: DCP checkpoints under output_dir/checkpoints/step-N/, atomic commit, rotation, resume.

A checkpoint holds the (sharded) model and optimizer state written with
torch.distributed.checkpoint, plus per-rank extras (RNG states, sampler
position) and a commit marker written last. Every rank writes into a hidden
`.tmp-step-N` folder; after a barrier rank 0 writes the marker and renames the
folder to `step-N`. So a `step-N` folder is always complete, a crash mid-save
leaves only a `.tmp-*` folder (removed at the next start), and rotation never
touches anything but complete, older checkpoints.

The data order needs no loader state: the sampler is a pure function of the
stream position (see data/sampler.py), which the marker records.
"""

from __future__ import annotations

import json
import logging
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ptrain.config import ConfigError

log = logging.getLogger("ptrain")

MARKER = "ptrain_checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainState:
    step: int = 0
    samples_seen: int = 0
    tokens_seen: int = 0
    #: Stream position and step where the current data order started (non-zero after a resharded resume).
    base_position: int = 0
    base_step: int = 0
    nan_steps_total: int = 0
    #: Samples that failed to decode during training and were replaced (summed over data-parallel ranks).
    data_replaced: int = 0


@dataclass
class Layout:
    world_size: int
    dp_degree: int
    dp_shards: int
    cp_degree: int
    global_batch_size: int


def checkpoint_root(output_dir: Path) -> Path:
    return Path(output_dir) / "checkpoints"


def complete_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """(step, path) of every committed checkpoint, oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: auto | latest | none | N | PATH -> checkpoint folder or None."""
    if spec is None or spec == "none":
        return None
    done = complete_checkpoints(output_dir)
    if spec in ("auto", "latest"):
        if done:
            return done[-1][1]
        if spec == "latest":
            log.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s; starting fresh",
                checkpoint_root(output_dir),
            )
        return None
    if spec.isdigit():
        for step, path in done:
            if step == int(spec):
                return path
        raise ConfigError(
            f"--resume_from_checkpoint {spec}: no complete checkpoint for step {spec} in {checkpoint_root(output_dir)} "
            f"(complete: {[s for s, _ in done] or 'none'})"
        )
    path = Path(spec)
    if not (path / MARKER).is_file():
        raise ConfigError(f"--resume_from_checkpoint {path}: not a complete ptrain checkpoint (no {MARKER})")
    return path


def read_marker(path: Path) -> dict:
    return json.loads((path / MARKER).read_text())


def check_layout(marker: dict, now: Layout, path: Path, allow_reshard: bool) -> bool:
    """True when the layout changed (only allowed with --allow_reshard); else raise a ConfigError naming both."""
    old = Layout(**marker["layout"])
    if old == now:
        return False
    if allow_reshard:
        log.warning("resharding checkpoint %s: written with %s, resuming with %s", path, old, now)
        return True
    raise ConfigError(
        f"checkpoint {path} was written with world_size={old.world_size} dp_degree={old.dp_degree} "
        f"dp_shards={old.dp_shards} cp_degree={old.cp_degree} (global batch {old.global_batch_size}); this run has "
        f"world_size={now.world_size} dp_degree={now.dp_degree} dp_shards={now.dp_shards} cp_degree={now.cp_degree} "
        f"(global batch {now.global_batch_size}). Resume with the same layout, pass --allow_reshard, or "
        "--resume_from_checkpoint none to start over."
    )


def _model_optim_state(model, optimizer, trainable_only: bool, ema=None):
    opts = StateDictOptions(ignore_frozen_params=trainable_only)
    model_sd, optim_sd = get_state_dict(model, optimizer, options=opts)
    state = {"model": model_sd, "optim": optim_sd}
    if ema is not None:
        state["ema"] = ema.state_dict()  # sharded like the parameters
    return state, opts


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, *rest = state["numpy"]
    np.random.set_state((kind, keys.numpy(), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Checkpointer:
    """Saves and loads training state; all ranks call every method (they are collective)."""

    def __init__(self, output_dir: Path, limit: int | None, trainable_only: bool, async_save: bool):
        self.output_dir = Path(output_dir)
        self.root = checkpoint_root(self.output_dir)
        self.limit = limit
        self.trainable_only = trainable_only
        self.async_save = async_save
        self.rank = dist.get_rank()
        # A separate gloo group keeps async saves' collectives off the training stream (and works on CPU).
        self._group = dist.new_group(backend="gloo") if async_save else None
        self._pending: tuple | None = None  # (future, tmp, final, marker) of an async save not yet committed

    def clean_partial(self) -> None:
        """Remove leftovers of saves that never committed (a crash mid-save)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-step-"):
                    log.warning("removing incomplete checkpoint %s (a save that did not finish)", p)
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def save(
        self,
        model,
        optimizer,
        lr_scheduler,
        train_state: TrainState,
        layout: Layout,
        meta: dict,
        rank_extra: dict,
        export_fn=None,
        final: bool = False,
        ema=None,
    ) -> Path:
        self.wait()  # one save in flight at most; commits the previous async save
        step = train_state.step
        final_dir = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        state, _ = _model_optim_state(model, optimizer, self.trainable_only, ema)
        torch.save(
            {"rng": _rng_state(), "lr_scheduler": lr_scheduler.state_dict(), **rank_extra},
            tmp / f"rank-{self.rank}.pt",
        )
        marker = {
            "step": step,
            "train_state": asdict(train_state),
            "layout": asdict(layout),
            "trainable_only": self.trainable_only,
            "ema": ema is not None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **meta,
        }
        if export_fn is not None:
            export_fn(tmp / "export")
        if self.async_save and not final:
            fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
            self._pending = (fut, tmp, final_dir, marker)
            return final_dir
        dcp.save(state, checkpoint_id=str(tmp))
        self._commit(tmp, final_dir, marker)
        return final_dir

    def wait(self) -> None:
        """Finish and commit an async save in flight (no-op otherwise)."""
        if self._pending is None:
            return
        fut, tmp, final_dir, marker = self._pending
        self._pending = None
        fut.result()
        self._commit(tmp, final_dir, marker)

    def _commit(self, tmp: Path, final_dir: Path, marker: dict) -> None:
        dist.barrier()  # every rank has finished writing its shards
        if self.rank == 0:
            (tmp / MARKER).write_text(json.dumps(marker, indent=2))
            if final_dir.exists():  # an older save of the same step (e.g. a run restarted with "none")
                shutil.rmtree(final_dir)
            tmp.rename(final_dir)
            log.info("checkpoint saved: %s", final_dir)
            self._rotate(keep=final_dir)
        dist.barrier()

    def _rotate(self, keep: Path) -> None:
        if not self.limit:
            return
        done = complete_checkpoints(self.output_dir)
        for _, path in done[: max(0, len(done) - self.limit)]:
            if path != keep:
                log.info("checkpoint rotation (--checkpointing_limit %d): removing %s", self.limit, path)
                shutil.rmtree(path, ignore_errors=True)

    def load(self, path: Path, model, optimizer, lr_scheduler, resharded: bool, ema=None) -> dict:
        """Restore model/optimizer/EMA (DCP, reshards as needed) and, unless resharded, this rank's extras."""
        marker = read_marker(path)
        with_ema = ema is not None and marker.get("ema", False)
        state, opts = _model_optim_state(model, optimizer, marker["trainable_only"], ema if with_ema else None)
        dcp.load(state, checkpoint_id=str(path))
        set_state_dict(
            model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
            options=StateDictOptions(ignore_frozen_params=opts.ignore_frozen_params, strict=False),
        )  # fmt: skip
        if ema is not None and not with_ema:
            log.warning("checkpoint %s has no EMA: the EMA starts from the resumed weights", path)
            ema.reset()
        extra_path = path / ("rank-0.pt" if resharded else f"rank-{self.rank}.pt")
        extra = torch.load(extra_path, weights_only=True)
        lr_scheduler.load_state_dict(extra["lr_scheduler"])
        if not resharded:
            _set_rng_state(extra["rng"])
        return extra
