"""Loading files that may come from elsewhere without running code from them (see README "What ptrain
deserialises").

torch.distributed.checkpoint (torch 2.13) is not safe to point at a checkpoint folder someone else wrote:

* `FileSystemReader.read_metadata` reads `.metadata` (and the fallback `__<rank>.metadata`) with a plain
  `pickle.load`: any object's `__reduce__` runs (arbitrary code);
* `DefaultLoadPlanner.load_bytes` reads every non-tensor item (optimizer hyper-parameters such as `lr`, `betas`,
  the `params` name lists) with `torch.load(weights_only=False)`: the same;
* tensor items are read with `torch.load(weights_only=True)` (restricted; safe).

`dcp_load` replaces `dcp.load(state, checkpoint_id=path)` with `SafeFileSystemReader` (metadata through an
allow-list unpickler holding only the DCP metadata classes, torch.Size, dtypes/layouts and plain containers) and
`SafeLoadPlanner` (non-tensor items through `torch.load(weights_only=True)`). `load_rank_state` reads a
`rank-N.pt` file with `torch.load(weights_only=True)`. `load_safetensors` reads a safetensors file. A refused
file raises `UnsafeFileError` (a ConfigError: `python -m ptrain` prints it and exits 2) naming the file.
"""

from __future__ import annotations

import builtins
import collections
import io
import os
import pathlib
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader, _StorageInfo

from ptrain.errors import ConfigError


class UnsafeFileError(ConfigError):
    """A file ptrain was asked to load holds something it refuses to deserialise (or is not in the expected
    format); the message names the file."""


class UnreadableFileError(UnsafeFileError):
    """The file is not readable as its format at all (truncated, overwritten, garbage): damage, not a refusal."""


def _why(e: BaseException) -> str:
    """The line of torch's weights_only refusal that says what was refused (e.g. "unsupported GLOBAL
    posix.system"), without its advice to retry with weights_only=False."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if "GLOBAL" in ln or "WeightsUnpickler error" in ln or "Unsupported" in ln:
            return ln
    return lines[-1] if lines else type(e).__name__


def _metadata_allow_list() -> dict[tuple[str, str], Any]:
    """(module, name) -> object: everything a DCP `.metadata` pickle written by torch may reference."""
    allowed: dict[tuple[str, str], Any] = {}

    def add(obj: Any, module: str | None = None, name: str | None = None) -> None:
        allowed[(module or obj.__module__, name or obj.__qualname__)] = obj

    for cls in (
        dcp_metadata.Metadata,
        dcp_metadata.MetadataIndex,
        dcp_metadata.StorageMeta,
        dcp_metadata.TensorStorageMetadata,
        dcp_metadata.BytesStorageMetadata,
        dcp_metadata.ChunkStorageMetadata,
        dcp_metadata.TensorProperties,
        dcp_metadata._MEM_FORMAT_ENCODING,  # an Enum: unpickled as _MEM_FORMAT_ENCODING(value)
        _StorageInfo,
    ):
        add(cls)
    add(torch.Size, "torch", "Size")
    # torch.dtype pickles as the global `torch.<name>`; torch.layout as torch.serialization._get_layout("<name>"),
    # a lookup in a table of layouts.
    for name, value in vars(torch).items():
        if isinstance(value, (torch.dtype, torch.layout, torch.memory_format)):
            add(value, "torch", name)
    add(torch.serialization._get_layout, "torch.serialization", "_get_layout")
    # StorageMeta.checkpoint_id is the path the checkpoint was saved to.
    for cls in (pathlib.PosixPath, pathlib.PurePosixPath, pathlib.PureWindowsPath):
        add(cls, "pathlib")
    for name in ("dict", "list", "tuple", "set", "frozenset", "int", "float", "bool", "str", "bytes", "complex"):
        add(getattr(builtins, name), "builtins", name)
    add(collections.OrderedDict, "collections", "OrderedDict")
    return allowed


_METADATA_ALLOWED = _metadata_allow_list()


class _MetadataUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals on the allow-list (REDUCE/NEWOBJ can then only call those)."""

    def __init__(self, file, path: str):
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        obj = _METADATA_ALLOWED.get((module, name))
        if obj is None:
            raise UnsafeFileError(
                f"refused to load checkpoint metadata {self._path}: it references {module}.{name}, which is not "
                "one of the torch.distributed.checkpoint metadata types. The file was not written by "
                "torch.distributed.checkpoint (or was tampered with); ptrain does not unpickle arbitrary objects."
            )
        return obj

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeFileError(f"refused to load checkpoint metadata {self._path}: unexpected persistent id")


def load_dcp_metadata(path: str | os.PathLike) -> dcp_metadata.Metadata:
    """A DCP `.metadata` file through the allow-list unpickler; UnsafeFileError names the file if refused."""
    with open(path, "rb") as f:
        try:
            metadata = _MetadataUnpickler(f, str(path)).load()
        except UnsafeFileError:
            raise
        except Exception as e:  # truncated / not a pickle / a type's __setstate__ rejecting its state
            raise UnreadableFileError(f"cannot read checkpoint metadata {path}: {type(e).__name__}: {e}") from e
    if not isinstance(metadata, dcp_metadata.Metadata):
        raise UnsafeFileError(
            f"checkpoint metadata {path} holds a {type(metadata).__name__}, not torch.distributed.checkpoint Metadata"
        )
    return metadata


class SafeFileSystemReader(FileSystemReader):
    """FileSystemReader whose metadata is read with the allow-list unpickler (upstream uses pickle.load) and
    whose tensor reads name the checkpoint folder when torch.load(weights_only=True) refuses one.

    A refusal is kept in `.refused`: dcp.load wraps errors into a CheckpointException (or, for metadata, a
    "metadata is None" error after trying the per-rank fallback file), and `dcp_load` re-raises this one."""

    def __init__(self, path: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        super().__init__(path, *args, **kwargs)
        self.refused: UnsafeFileError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_metadata.Metadata:
        path = self._get_metadata_path(kwargs.get("rank"))
        try:
            metadata = load_dcp_metadata(path)
        except UnsafeFileError as e:
            if kwargs.get("rank") is None or self.refused is None:  # keep the .metadata refusal over the fallback's
                self.refused = e
            raise
        # as FileSystemReader.read_metadata does
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = dcp_metadata.StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata

    def read_data(self, plan, planner):
        try:
            return super().read_data(plan, planner)
        except pickle.UnpicklingError as e:
            self.refused = UnsafeFileError(f"refused to load a tensor from checkpoint {self.path}: {_why(e)}")
            raise self.refused from None


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner whose non-tensor items are read with torch.load(weights_only=True) (upstream:
    weights_only=False). They are plain Python values (floats, bools, tuples, strings, lists of names)."""

    def __init__(self, *args: Any, checkpoint: str | os.PathLike = "", **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoint = str(checkpoint)
        self.refused: UnsafeFileError | None = None

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            self.refused = UnsafeFileError(
                f"refused to load item {read_item.dest_index.fqn!r} of checkpoint {self.checkpoint}: {_why(e)}"
            )
            raise self.refused from None
        # Hand the now-checked value to the upstream logic (which places it in the state dict, flattened or
        # not) re-serialised by us: its torch.load(weights_only=False) only ever sees bytes we just wrote.
        buf = io.BytesIO()
        torch.save(obj, buf)
        buf.seek(0)
        super().load_bytes(read_item, buf)


def dcp_load(state: dict, path: str | os.PathLike, **kwargs: Any) -> None:
    """`dcp.load(state, checkpoint_id=path)` without unrestricted unpickling; UnsafeFileError names what was
    refused. `kwargs` go to dcp.load (e.g. process_group)."""
    reader = SafeFileSystemReader(path)
    planner = SafeLoadPlanner(checkpoint=path)
    try:
        dcp.load(state, storage_reader=reader, planner=planner, **kwargs)
    except (CheckpointException, Exception) as e:
        refused = reader.refused or planner.refused
        if refused is not None and refused is not e:
            raise refused from None
        raise


def load_rank_state(path: str | os.PathLike) -> Any:
    """A per-rank state file (rank-N.pt: RNG states, LR scheduler, sampler position) through
    torch.load(weights_only=True); a pickle that needs anything beyond tensors and plain containers is refused
    with an UnsafeFileError naming the file."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise UnsafeFileError(
            f"refused to load {path}: it is not a plain state file (tensors, numbers, strings, containers) and "
            f"ptrain does not unpickle arbitrary objects. The file was not written by ptrain or was tampered "
            f"with. torch.load(weights_only=True): {_why(e)}"
        ) from None


def load_safetensors(path: str | os.PathLike, device: str = "cpu") -> dict[str, torch.Tensor]:
    """safetensors.torch.load_file, with a parse error naming the file (safetensors' own message does not)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(path, device=device)
    except SafetensorError as e:
        raise UnsafeFileError(f"cannot load {path}: not a valid safetensors file ({e})") from None


__all__ = [
    "SafeFileSystemReader",
    "SafeLoadPlanner",
    "UnreadableFileError",
    "UnsafeFileError",
    "dcp_load",
    "load_dcp_metadata",
    "load_rank_state",
    "load_safetensors",
]
