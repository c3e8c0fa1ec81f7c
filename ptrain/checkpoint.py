"""Resumable state: DCP checkpoints under output_dir/checkpoints/step-N/, atomic commit, rotation, resume.

A checkpoint holds the (sharded) model and optimizer state written with
torch.distributed.checkpoint, plus per-rank extras (RNG states, sampler
position) and a commit marker written last. Every rank writes into a hidden
`.tmp-step-N` folder; after a barrier rank 0 writes the marker and renames the
folder to `step-N`. So a `step-N` folder is always complete, a crash mid-save
leaves only a `.tmp-*` folder (removed at the next start), and rotation never
touches anything but complete, older checkpoints.

The marker lists every file of the checkpoint with its size. Resume checks them
before loading: a checkpoint with a missing or truncated file, or an unreadable
marker, is skipped with a warning and the previous one is used; one that fails
to load is renamed `damaged-step-N` (kept for inspection, never picked again),
so a bad checkpoint cannot cause a crash loop.

The data order needs no loader state: the sampler is a pure function of the
stream position (see data/sampler.py), which follows from the train state the
marker records (micro-batches consumed by training, not the prefetching
sampler's counter).
"""

from __future__ import annotations

import errno
import json
import logging
import pickle
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
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ptrain.collective import PeerFailed, all_max, raise_if_any_failed
from ptrain.errors import ConfigError
from ptrain.safe_load import UnreadableFileError, dcp_load, load_rank_state

log = logging.getLogger("ptrain")

MARKER = "ptrain_checkpoint.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")
_DAMAGED_DIR = re.compile(r"^damaged-step-\d+")


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
    """(step, path) of every committed checkpoint (a `step-N` folder with its marker), oldest first."""
    root = checkpoint_root(output_dir)
    found = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / MARKER).is_file():
                found.append((int(m.group(1)), p))
    return sorted(found)


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint at `path` cannot be resumed (None if its marker and every file it lists are intact)."""
    try:
        marker = read_marker(path)
    except FileNotFoundError:
        return f"no {MARKER}"
    except (OSError, ValueError) as e:
        return f"unreadable {MARKER} ({e})"
    if not isinstance(marker, dict) or not {"step", "train_state", "layout", "trainable_only"} <= marker.keys():
        return f"{MARKER} lacks step/train_state/layout"
    files = marker.get("files")
    if files is None:  # written before the file list existed: at least DCP's metadata must be there
        return None if (path / ".metadata").is_file() else "no DCP .metadata file"
    for name, size in sorted(files.items()):
        f = path / name
        if not f.is_file():
            return f"missing file {name}"
        if f.stat().st_size != size:
            return f"{name} has {f.stat().st_size} bytes, {size} were written (truncated or damaged)"
    return None


def supersede(output_dir: Path, after_step: int | None) -> Path | None:
    """Move the committed checkpoints of output_dir past `after_step` (every one if None) into
    checkpoints/superseded-<time>/ and return that folder (None if none moved).

    For a run that branches from an earlier checkpoint (--resume_from_checkpoint N) or starts over (none): the
    newer checkpoints belong to the run it branched from, and a later start with `auto` would resume from them
    (and call the run complete, keeping the old weights). They are moved, not deleted: no work is lost."""
    later = [(step, path) for step, path in complete_checkpoints(output_dir) if after_step is None or step > after_step]
    if not later:
        return None
    dest = checkpoint_root(output_dir) / f"superseded-{time.strftime('%Y%m%d-%H%M%S')}"
    dest.mkdir(parents=True, exist_ok=True)
    for _, path in later:
        path.rename(dest / path.name)
    return dest


def usable_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Committed checkpoints that pass `checkpoint_problem`, oldest first; each one skipped is logged by name."""
    good = []
    root = checkpoint_root(output_dir)
    if root.is_dir():  # ptrain writes the marker before the rename, so a step-N folder without one is damaged
        for p in sorted(root.iterdir()):
            if _STEP_DIR.match(p.name) and not (p / MARKER).is_file():
                log.warning("skipping damaged checkpoint %s: no %s", p, MARKER)
    for step, path in complete_checkpoints(output_dir):
        problem = checkpoint_problem(path)
        if problem:
            log.warning("skipping damaged checkpoint %s: %s", path, problem)
        else:
            good.append((step, path))
    return good


def resolve_resume(spec: str | None, output_dir: Path) -> Path | None:
    """--resume_from_checkpoint: auto | latest | none | N | PATH -> checkpoint folder or None.

    auto/latest take the newest checkpoint that is intact, skipping damaged ones with a warning; if there are
    checkpoints but none is intact, that is an error (starting over silently would discard the run)."""
    if spec is None or spec == "none":
        return None
    if spec in ("auto", "latest"):
        found = complete_checkpoints(output_dir)
        done = usable_checkpoints(output_dir)
        if done:
            return done[-1][1]
        root = checkpoint_root(output_dir)
        damaged = [f"{p.name}: {checkpoint_problem(p)}" for _, p in found]
        if root.is_dir():
            damaged += [f"{p.name}: failed to load" for p in sorted(root.iterdir()) if _DAMAGED_DIR.match(p.name)]
        if damaged:
            raise ConfigError(
                f"--resume_from_checkpoint {spec}: no intact checkpoint in {root} (damaged: {'; '.join(damaged)}). "
                "Pass --resume_from_checkpoint none to start over (or --resume_from_checkpoint PATH)."
            )
        if spec == "latest":
            log.warning(
                "--resume_from_checkpoint latest: no complete checkpoint in %s; starting fresh",
                checkpoint_root(output_dir),
            )
        return None
    if spec.isdigit():
        done = complete_checkpoints(output_dir)
        for step, path in done:
            if step == int(spec):
                break
        else:
            raise ConfigError(
                f"--resume_from_checkpoint {spec}: no complete checkpoint for step {spec} in "
                f"{checkpoint_root(output_dir)} (complete: {[s for s, _ in done] or 'none'})"
            )
    else:
        path = Path(spec)
        if not (path / MARKER).is_file():
            # an output_dir or its checkpoints/ folder given: name the checkpoint to give instead
            inside = complete_checkpoints(path.parent if path.name == "checkpoints" else path)
            hint = f"; the newest checkpoint in it is {inside[-1][1]}" if inside else ""
            raise ConfigError(f"--resume_from_checkpoint {path}: not a complete ptrain checkpoint (no {MARKER}){hint}")
    problem = checkpoint_problem(path)
    if problem:
        raise ConfigError(f"--resume_from_checkpoint {spec}: checkpoint {path} is damaged: {problem}")
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


class ModelState:
    """The model's (sharded) state dict as a DCP `Stateful` (get/set_model_state_dict). `trainable_only` leaves
    out frozen parameters (LoRA's base)."""

    def __init__(self, model: torch.nn.Module, trainable_only: bool):
        self.model, self.trainable_only = model, trainable_only

    def _options(self, **kw) -> StateDictOptions:
        return StateDictOptions(ignore_frozen_params=self.trainable_only, **kw)

    def state_dict(self) -> dict:
        return get_model_state_dict(self.model, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        set_model_state_dict(self.model, state, options=self._options(strict=False))


class OptimizerState(ModelState):
    """The optimizer's (sharded) state dict as a DCP `Stateful` (get/set_optimizer_state_dict)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, trainable_only: bool):
        super().__init__(model, trainable_only)
        self.optimizer = optimizer

    def state_dict(self) -> dict:
        return get_optimizer_state_dict(self.model, self.optimizer, options=self._options())

    def load_state_dict(self, state: dict) -> None:
        set_optimizer_state_dict(self.model, self.optimizer, state, options=self._options(strict=False))


class RNGState:
    """This rank's Python, NumPy and torch (CPU and CUDA) generator states as a `Stateful`."""

    def state_dict(self) -> dict:
        np_state = np.random.get_state()
        state = {
            "python": random.getstate(),
            "numpy": (np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]),
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state()
        return state

    def load_state_dict(self, state: dict) -> None:
        random.setstate(state["python"])
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, keys.numpy(), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])


class CheckpointSaveError(RuntimeError):
    """A checkpoint could not be written (disk full, unwritable folder, ...); older ones are intact."""


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**28 else f"{n / 2**20:.1f} MiB"


def _state_bytes(obj) -> int:
    """Bytes of the tensors this rank writes (local shards of DTensors)."""
    if isinstance(obj, dict):
        return sum(_state_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_state_bytes(v) for v in obj)
    if isinstance(obj, torch.Tensor):
        t = obj.to_local() if hasattr(obj, "to_local") else obj
        return t.numel() * t.element_size()
    return 0


def _causes(e: BaseException | None, depth: int = 0):
    """The exception, the per-rank failures DCP wraps in CheckpointException.failures ((exception, traceback)
    pairs), and their causes/contexts, depth first."""
    if isinstance(e, tuple):
        e = e[0] if e else None
    if e is None or depth > 8:
        return
    yield e
    for inner in getattr(e, "failures", {}).values():
        yield from _causes(inner, depth + 1)
    yield from _causes(e.__cause__ or e.__context__, depth + 1)


def _find_os_error(e: BaseException | None) -> OSError | None:
    """The OSError behind an exception."""
    return next((c for c in _causes(e) if isinstance(c, OSError)), None)


class Checkpointer:
    """Saves and loads the run's `Stateful` objects; all ranks call every method (they are collective).

    Built once from:
    - `sharded`: objects whose state dicts hold the (sharded) tensors, written with DCP (model, optimizer, EMA);
      a name whose state a checkpoint lacks (e.g. "ema" in one written without it) is reset if it has reset();
    - `per_rank`: small objects written per rank with torch.save (learning-rate schedule, RNG states); on a
      resharded resume only the schedule is taken (from rank 0), RNG states start anew;
    - `train_state`: the counters recorded in the commit marker. The data order needs no state of its own: the
      sampler position follows from them (see data/sampler.py).
    `save(step, last_step)` decides itself whether the step is due (--checkpointing_steps; the last step always
    when checkpointing is on) and writes synchronously at the last step.
    """

    def __init__(
        self, output_dir: Path, *, sharded: dict, per_rank: dict, train_state: TrainState, layout: Layout,
        meta: dict, every: int, limit: int | None, trainable_only: bool, async_save: bool, export_fn=None,
        saved_step: int = -1,
    ):  # fmt: skip
        self.output_dir = Path(output_dir)
        self.root = checkpoint_root(self.output_dir)
        self.sharded, self.per_rank, self.train_state = sharded, per_rank, train_state
        self.layout, self.meta, self.every, self.limit = layout, meta, every, limit
        self.trainable_only = trainable_only
        self.async_save = async_save
        self.export_fn = export_fn
        self.saved_step = saved_step  # the step of the newest checkpoint (-1: none yet)
        self.rank = dist.get_rank()
        # A separate gloo group keeps async saves' collectives off the training stream (and works on CPU).
        self._group = dist.new_group(backend="gloo") if async_save else None
        # poll()'s all-reduce needs a group of its own: the upload thread runs its collectives on _group
        # concurrently, and two threads' collectives on one group would pair up wrongly across ranks.
        self._poll_group = dist.new_group(backend="gloo") if async_save else None
        self._pending: tuple | None = None  # (future, tmp, final, marker) of an async save not yet committed

    def clean_partial(self) -> None:
        """Remove leftovers of saves that never committed (a crash mid-save)."""
        if self.rank == 0 and self.root.is_dir():
            for p in self.root.iterdir():
                if p.name.startswith(".tmp-step-"):
                    log.warning("removing incomplete checkpoint %s (a save that did not finish)", p)
                    shutil.rmtree(p, ignore_errors=True)
        dist.barrier()

    def _sharded_state(self, names=None) -> dict:
        for obj in self.sharded.values():
            if isinstance(obj, ModelState):
                obj.trainable_only = self.trainable_only
        return {k: v for k, v in self.sharded.items() if v is not None and (names is None or k in names)}

    def due(self, step: int, last_step: bool = False) -> bool:
        """Whether `save(step, last_step)` would write a checkpoint."""
        return bool(self.every) and step != self.saved_step and (last_step or step % self.every == 0)

    def save(self, step: int, last_step: bool = False) -> Path | None:
        """Write checkpoint step-N when it is due (collective); None when it is not. A failed write raises
        CheckpointSaveError on every rank: the partial folder is removed and every older checkpoint is left as
        it was."""
        if not self.due(step, last_step):
            return None
        self.wait()  # one save in flight at most; commits the previous async save
        final_dir = self.root / f"step-{step}"
        tmp = self.root / f".tmp-step-{step}"
        state = {k: v.state_dict() for k, v in self._sharded_state().items()}
        marker = {
            "step": step,
            "train_state": asdict(self.train_state),
            "layout": asdict(self.layout),
            "trainable_only": self.trainable_only,
            "ema": self.sharded.get("ema") is not None,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            **self.meta,
        }
        self.saved_step = step
        try:
            err = None
            if self.rank == 0:
                try:
                    shutil.rmtree(tmp, ignore_errors=True)
                    tmp.mkdir(parents=True)
                except OSError as e:
                    err = e
            raise_if_any_failed(err, f"creating {tmp}")
            try:
                torch.save({k: v.state_dict() for k, v in self.per_rank.items()}, tmp / f"rank-{self.rank}.pt")
            except OSError as e:
                err = e
            raise_if_any_failed(err, f"writing {tmp}/rank-*.pt")
            if self.export_fn is not None:
                self.export_fn(tmp / "export")
            if self.async_save and not last_step:
                fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._group)
                self._pending = (fut, tmp, final_dir, marker, _state_bytes(state))
                return final_dir
            dcp.save(state, checkpoint_id=str(tmp))
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._save_failed(tmp, e, _state_bytes(state)) from e
        self._commit(tmp, final_dir, marker)
        return final_dir

    def poll(self) -> None:
        """Commit an async save as soon as every rank has written its part (collective; call once per step).

        Without it a finished async save would stay uncommitted until the next save, and a crash in between
        would lose it. The check is one small all-reduce on the CPU (gloo) group: no device sync."""
        if self._pending is None:
            return
        if all_max(0 if self._pending[0].done() else 1, group=self._poll_group) == 0:
            self.wait()

    def wait(self) -> None:
        """Finish and commit an async save in flight (no-op otherwise)."""
        if self._pending is None:
            return
        fut, tmp, final_dir, marker, nbytes = self._pending
        self._pending = None
        try:
            fut.result()
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._save_failed(tmp, e, nbytes) from e
        self._commit(tmp, final_dir, marker)

    def _save_failed(self, tmp: Path, e: BaseException, local_bytes: int) -> CheckpointSaveError:
        """Remove the partial folder; an error naming the path, the cause and the space it needs."""
        if self.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        os_err = _find_os_error(e)
        cause = f"{os_err.strerror or os_err} ({os_err.filename or tmp})" if os_err else f"{type(e).__name__}: {e}"
        world = dist.get_world_size()
        try:
            free = shutil.disk_usage(self.root).free
        except OSError:
            free = None
        space = "" if free is None else f"; {_gb(free)} free on that filesystem"
        older = [p.name for _, p in complete_checkpoints(self.output_dir)]
        hint = (
            "Free disk space (or lower --checkpointing_limit), then run the same command to resume."
            if os_err is not None and os_err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
            else "Fix the cause, then run the same command to resume."
        )
        return CheckpointSaveError(
            f"saving checkpoint {tmp.name[len('.tmp-') :]} to {self.root} failed: {cause}. It needs about "
            f"{_gb(local_bytes * world)} ({_gb(local_bytes)} from rank {self.rank} of {world}){space}. The partial "
            f"checkpoint was removed; older checkpoints are intact ({', '.join(older) or 'none'}). {hint}"
        )

    def _commit(self, tmp: Path, final_dir: Path, marker: dict) -> None:
        dist.barrier()  # every rank has finished writing its shards
        err = None
        if self.rank == 0:
            try:
                # Every file with its size: resume refuses a checkpoint whose files are missing or truncated.
                marker = {**marker, "files": {
                    str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()
                }}  # fmt: skip
                (tmp / MARKER).write_text(json.dumps(marker, indent=2))
                if final_dir.exists():  # an older save of the same step (e.g. a run restarted with "none")
                    shutil.rmtree(final_dir)
                tmp.rename(final_dir)
            except OSError as e:
                err = e
        try:
            raise_if_any_failed(err, f"committing {final_dir}")
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            raise self._save_failed(tmp, e, 0) from e
        if self.rank == 0:
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

    def load(self, path: Path, resharded: bool) -> None:
        """Restore the sharded state (DCP, reshards as needed) and, unless resharded, this rank's per-rank state.

        Collective: if any rank fails, all raise. A failure that shows damaged files (unreadable, truncated,
        corrupt) raises CheckpointDamaged on every rank (the caller renames the folder with mark_damaged, so no
        restart picks it again, and falls back to an older checkpoint)."""
        err = None
        try:
            self._load(path, resharded)
        except (Exception, CheckpointException) as e:  # DCP's CheckpointException is a BaseException
            err = e
        outcome = all_max(0 if err is None else 2 if _is_damage(err) else 1)  # every rank decides alike
        if outcome == 2:
            reason = f"{type(err).__name__}: {err}" if err is not None else "another rank could not read its part"
            raise CheckpointDamaged(path, reason) from err
        if outcome == 1:
            if err is None:
                raise PeerFailed(f"loading checkpoint {path} failed on another rank")
            if isinstance(err, (ValueError, KeyError, RuntimeError, CheckpointException)):  # shapes / names differ
                root = next((c for c in _causes(err) if not isinstance(c, CheckpointException)), err)
                raise ConfigError(
                    f"resuming from {path} failed ({type(root).__name__}: {str(root).splitlines()[0][:300]}): the "
                    "checkpoint was written with other settings (LoRA rank or target modules, training type, "
                    "model, optimizer; the flags it was started with are in config.json beside its checkpoints/ "
                    "folder, and a resume in that output_dir warns with the changed ones). Resume with those "
                    "flags, or start anew: another --output_dir, or --resume_from_checkpoint none"
                ) from err
            raise err
        self.saved_step = self.train_state.step

    def mark_damaged(self, path: Path, reason: str) -> Path:
        """Rename a checkpoint that failed to load to damaged-step-N (collective); returns the new path."""
        target = path.with_name(f"damaged-{path.name}")
        if self.rank == 0 and path.exists():
            k = 1
            while target.exists():
                target, k = path.with_name(f"damaged-{path.name}.{k}"), k + 1
            path.rename(target)
            log.warning("checkpoint %s could not be loaded (%s): renamed to %s", path, reason, target.name)
        dist.barrier()
        return target

    def _load(self, path: Path, resharded: bool) -> None:
        marker = read_marker(path)
        names = [k for k in self.sharded if k != "ema" or marker.get("ema", False)]
        for obj in self.sharded.values():  # read as the checkpoint was written (with or without the frozen base)
            if isinstance(obj, ModelState):
                obj.trainable_only = marker["trainable_only"]
        try:
            # DCP calls each object's state_dict() and load_state_dict(); no unrestricted unpickling (safe_load.py)
            dcp_load({k: v for k, v in self.sharded.items() if k in names and v is not None}, path)
        finally:
            for obj in self.sharded.values():
                if isinstance(obj, ModelState):
                    obj.trainable_only = self.trainable_only
        for name in set(self.sharded) - set(names):
            if self.sharded[name] is not None:
                log.warning(
                    "checkpoint %s has no %s: the %s starts from the resumed weights", path, *[name.upper()] * 2
                )
                self.sharded[name].reset()
        extra = load_rank_state(path / ("rank-0.pt" if resharded else f"rank-{self.rank}.pt"))
        for name, obj in self.per_rank.items():
            if name not in extra:  # e.g. the float16 loss scale, after a run in another dtype: starts anew
                log.warning("checkpoint %s has no %s state: it starts anew", path, name)
            elif not (resharded and isinstance(obj, RNGState)):
                obj.load_state_dict(extra[name])
        self.train_state.__dict__.update(marker["train_state"])


class CheckpointDamaged(RuntimeError):
    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} is damaged: {reason}")
        self.path, self.reason = path, reason


def _is_damage(e: BaseException) -> bool:
    """Whether a load failure comes from the files (I/O, truncation, corrupt data), not from this run's config."""
    for c in _causes(e):
        if isinstance(c, (OSError, EOFError, pickle.UnpicklingError, UnreadableFileError)):
            return True
        if isinstance(c, RuntimeError) and any(
            k in str(c) for k in ("PytorchStreamReader", "zip archive", "unexpected EOF")
        ):
            return True
    return False
