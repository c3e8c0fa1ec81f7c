"""Parallel degrees -> validated layout -> DeviceMesh, plus the one place that picks device and backend.

Mesh dims, outermost first: `dp_replicate` (DDP/HSDP replicas), `dp_shard` (FSDP2
shards), `cp` (context parallel). Flattened views: `dp` = dp_replicate x dp_shard
(ranks that read different data), `dp_shard_cp` = dp_shard x cp (ranks that hold
one shard of the parameters), `dp_cp` = every rank that takes part in the
gradient mean.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ptrain.config import ParallelArgs
from ptrain.errors import ConfigError


class ParallelConfigError(ValueError):
    """Degrees that do not fit the world size; the message names every value."""


def device_type() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def backend(kind: str | None = None, cpu_offload: bool = False) -> str:
    """The process group's backend on device type `kind` (default: this machine's). With --fsdp_cpu_offload on
    CUDA the gradients live in CPU memory, and gradient clipping all-reduces their norm there: the group gets a
    gloo backend for CPU tensors beside nccl."""
    kind = kind or device_type()
    if kind != "cuda":
        return "gloo"
    return "cuda:nccl,cpu:gloo" if cpu_offload else "nccl"


@dataclass(frozen=True)
class ParallelDims:
    dp_replicate: int
    dp_shard: int
    cp: int
    world_size: int

    @classmethod
    def build(cls, dp_degree: int, dp_shards: int, cp_degree: int, world_size: int,
              source: str = "torchrun --nproc_per_node x --nnodes") -> ParallelDims:  # fmt: skip
        """`source`: where the world size comes from, for the messages (a dry run's --plan_world_size)."""
        try:  # the degree check is written once, in ParallelArgs.validate
            ParallelArgs(dp_degree=dp_degree, dp_shards=dp_shards, cp_degree=cp_degree).validate()
        except ConfigError as e:
            raise ParallelConfigError(str(e)) from None
        if dp_shards == -1:
            rest = dp_degree * cp_degree
            if world_size % rest:
                raise ParallelConfigError(
                    f"--dp_shards -1 cannot fill world size {world_size} ({source}): dp_degree={dp_degree} x "
                    f"cp_degree={cp_degree} = {rest} does not divide it; use a world size that is a multiple of "
                    f"{rest}, or smaller --dp_degree / --cp_degree"
                )
            dp_shards = world_size // rest
        product = dp_degree * dp_shards * cp_degree
        if product != world_size:
            raise ParallelConfigError(
                f"parallel degrees do not match the world size: dp_degree={dp_degree} x dp_shards={dp_shards} x "
                f"cp_degree={cp_degree} = {product}, but world size ({source}) is {world_size}; launch "
                f"{product} processes, or leave --dp_shards at -1 to shard over what the other degrees leave"
                + (" (a dry run plans for several GPUs with --plan_world_size N)"
                   if world_size == 1 and source.startswith("torchrun") else "")
            )
        return cls(dp_replicate=dp_degree, dp_shard=dp_shards, cp=cp_degree, world_size=world_size)

    @property
    def dp(self) -> int:
        """Number of ranks that read different samples."""
        return self.dp_replicate * self.dp_shard

    @property
    def fsdp_enabled(self) -> bool:
        return self.dp_shard * self.cp > 1

    @property
    def ddp_enabled(self) -> bool:
        return self.dp_replicate > 1 and not self.fsdp_enabled

    def describe(self) -> str:
        if self.world_size == 1:
            kind = "single process"
        elif self.ddp_enabled:
            kind = "DDP"
        elif self.dp_replicate > 1:
            kind = "HSDP"
        else:
            kind = "FSDP2"
        return (
            f"{kind}: world {self.world_size} = dp_replicate {self.dp_replicate} x dp_shard {self.dp_shard} "
            f"x cp {self.cp}"
        )

    def build_mesh(self, timeout_s: int | None = None, cpu_offload: bool = False) -> Meshes:
        """The meshes; `timeout_s` (--dist_timeout_s) is given to every sub-group they made (see group_timeouts);
        with `cpu_offload` (--fsdp_cpu_offload) every group must also reduce CPU tensors (see check_cpu_backends)."""
        world = init_device_mesh(
            device_type(),
            (self.dp_replicate, self.dp_shard, self.cp),
            mesh_dim_names=("dp_replicate", "dp_shard", "cp"),
        )
        dp_cp = world["dp_replicate", "dp_shard", "cp"]._flatten("dp_cp")
        meshes = Meshes(
            world=world,
            dp=world["dp_replicate", "dp_shard"]._flatten("dp"),
            dp_shard_cp=world["dp_shard", "cp"]._flatten("dp_shard_cp"),
            dp_cp=dp_cp,
            hsdp=dp_cp._unflatten(0, (self.dp_replicate, self.dp_shard * self.cp), ("dp_replicate", "dp_shard_cp")),
        )
        if timeout_s is not None:
            group_timeouts(meshes, timedelta(seconds=timeout_s))
        if cpu_offload:
            check_cpu_backends(meshes)
        return meshes


def group_timeouts(meshes: Meshes, timeout: timedelta) -> int:
    """DeviceMesh makes its sub-groups (split_group / new_group without a timeout) with torch's default timeout,
    10 minutes for NCCL, not init_process_group's: a rank that lagged longer in a sub-group's collective (e.g. an
    uneven first compile under HSDP or CP) was aborted before --dist_timeout_s. Give each its timeout; returns how
    many groups were set (the default group has it already)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 0
    from torch.distributed.distributed_c10d import _set_pg_timeout

    done = {id(dist.group.WORLD)}
    for _, _, group in _mesh_groups(meshes):
        if id(group) not in done:
            done.add(id(group))
            _set_pg_timeout(timeout, group)
    return len(done) - 1


def _mesh_groups(meshes: Meshes):
    """(mesh name, dim name, group) of every group the meshes hold, the default group's repeats included."""
    for name in ("world", "dp", "dp_shard_cp", "dp_cp", "hsdp"):
        mesh = getattr(meshes, name)
        for dim, group in zip(mesh.mesh_dim_names, mesh.get_all_groups()):
            yield name, dim, group


def check_cpu_backends(meshes: Meshes) -> None:
    """With --fsdp_cpu_offload the gradients are CPU tensors, and clipping reduces their norm on the mesh's
    groups (the default group for FSDP and DDP, a sub-group for HSDP): each group needs a CPU backend (gloo)
    beside nccl. init_distributed asks for `cuda:nccl,cpu:gloo`, and the sub-groups DeviceMesh splits from it
    carry both on torch 2.11-2.13; a torch or launcher that builds a group without it would otherwise fail only
    at the first clip, with torch's "No backend type associated with device type cpu". Checked at start."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    cpu = torch.device("cpu")
    for name, dim, group in _mesh_groups(meshes):
        try:
            group._get_backend(cpu)
        except RuntimeError:
            raise ParallelConfigError(
                f"--fsdp_cpu_offload: the {name} mesh's {dim!r} process group has no CPU backend "
                f"(backend {dist.get_backend(group)!r}), so the offloaded gradients cannot be reduced there "
                "(gradient clipping would fail); start the run with a process group that has gloo for CPU "
                "tensors (ptrain asks for 'cuda:nccl,cpu:gloo'), or drop --fsdp_cpu_offload"
            ) from None


@dataclass(frozen=True)
class Meshes:
    """The world mesh and the flattened views the parallel plan and the loop use."""

    world: DeviceMesh  # (dp_replicate, dp_shard, cp)
    dp: DeviceMesh  # ranks that read different samples
    dp_shard_cp: DeviceMesh  # ranks that hold one parameter shard (FSDP)
    dp_cp: DeviceMesh  # every rank in the gradient mean
    hsdp: DeviceMesh  # 2-D (dp_replicate, dp_shard_cp) for HSDP / replicate


def select_device(env: Mapping[str, str], device_type: str, device_count: int) -> torch.device:
    """The device this process trains on, from torchrun's environment; pure, so it is testable without a GPU.

    With every GPU visible to every process the index is LOCAL_RANK; with one GPU per process
    (CUDA_VISIBLE_DEVICES set per process, as SLURM and some launchers do) the only index is 0.
    Anything else (e.g. LOCAL_RANK 3 with two visible GPUs) is an error naming the values.
    """
    if device_type != "cuda":
        return torch.device(device_type)
    raw = env.get("LOCAL_RANK", "0")
    visible = env.get("CUDA_VISIBLE_DEVICES", "<unset>")
    try:
        local_rank = int(raw)
    except ValueError:
        raise ParallelConfigError(f"LOCAL_RANK={raw!r} is not an integer (CUDA_VISIBLE_DEVICES={visible})") from None
    if 0 <= local_rank < device_count:
        return torch.device("cuda", local_rank)
    if device_count == 1 and local_rank >= 0:
        return torch.device("cuda", 0)
    raise ParallelConfigError(
        f"cannot choose a GPU: LOCAL_RANK={local_rank} but this process sees {device_count} CUDA device(s) "
        f"(CUDA_VISIBLE_DEVICES={visible}); start at most as many processes per node as visible GPUs "
        "(torchrun --nproc_per_node), and give each process either all of the node's GPUs or exactly one"
    )


def init_distributed(timeout_s: int = 1800, cpu_offload: bool = False) -> tuple[int, int, torch.device]:
    """Initialise the default process group from torchrun's environment (or a single process).

    Returns (rank, world size, device). On first initialisation each rank prints one line to stderr
    naming host, rank, local rank and device; `timeout_s` (--dist_timeout_s) bounds rendezvous and
    every collective.
    """
    alloc = default_allocator_conf(os.environ)  # before anything touches the CUDA allocator
    kind = device_type()
    first = not dist.is_initialized()
    if first and "RANK" not in os.environ:  # plain `python -m ptrain`: a world of one
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    device = select_device(os.environ, kind, torch.cuda.device_count() if kind == "cuda" else 0)
    if first:
        if kind == "cuda":
            torch.cuda.set_device(device)
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        # Before the rendezvous, so a rank that hangs there has still said where it runs.
        print(
            f"ptrain start: host={socket.gethostname()} rank={rank}/{world} "
            f"local_rank={os.environ.get('LOCAL_RANK', '0')} device={device} backend={backend(kind, cpu_offload)} "
            f"CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')} dist_timeout_s={timeout_s}"
            + (f" allocator={alloc}" if kind == "cuda" else ""),
            file=sys.stderr,
            flush=True,
        )
        timeout = timedelta(seconds=timeout_s)
        # device_id binds the NCCL communicators to this GPU eagerly; gloo on CPU takes none.
        dist.init_process_group(backend(kind, cpu_offload), store=_rendezvous_store(rank, world, timeout), rank=rank,
                                world_size=world, timeout=timeout,
                                device_id=device if kind == "cuda" else None)  # fmt: skip
    return dist.get_rank(), dist.get_world_size(), device


ALLOC_ENV = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def default_allocator_conf(env) -> str:
    """The CUDA caching allocator's settings: expandable segments unless the user set either variable torch reads.
    Expandable segments let a block grow in place instead of leaving differently sized cached blocks behind (on
    the H200, reserved was 6 GiB over allocated without them). Returns the setting in force, for the log."""
    for name in ALLOC_ENV:
        if env.get(name):
            return f"{name}={env[name]} (yours)"
    env["PYTORCH_ALLOC_CONF"] = "expandable_segments:True"
    if env is os.environ and torch.cuda.is_initialized():
        # the allocator read its settings when CUDA started (code that ran ptrain in-process touched CUDA first):
        # the variable alone would be ignored, and the log would say otherwise
        setter = getattr(torch._C, "_accelerator_setAllocatorSettings", None)  # newer torch; older ones: torch.cuda's
        (setter or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
        return "expandable_segments:True (ptrain's default, set after CUDA started)"
    return "PYTORCH_ALLOC_CONF=expandable_segments:True (ptrain's default)"


def _rendezvous_store(rank: int, world: int, timeout: timedelta) -> dist.Store:
    """The env:// store, namespaced by torchrun's restart count.

    After an elastic restart the workers share the agent's store with the previous attempt, whose
    stale connection addresses a fast new rank could read before its peers overwrite them (gloo
    then fails with "connection refused"). A per-attempt prefix keeps every attempt's keys apart.
    """
    agent_store = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        world,
        is_master=rank == 0 and not agent_store,
        timeout=timeout,
        wait_for_workers=False,
    )
    return dist.PrefixStore(f"ptrain/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
