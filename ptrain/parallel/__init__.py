"""Parallelism: mesh construction and the parallel plan applied to the transformer.

Order (fixed, applied by ptrain/parallelize.py): context parallelism -> activation checkpointing -> compile per
block -> placement on the device -> fully_shard / replicate.
"""

from ptrain.parallel.activation import apply_ac
from ptrain.parallel.compile import apply_compile
from ptrain.parallel.dims import (
    ParallelConfigError,
    ParallelDims,
    backend,
    device_type,
    init_distributed,
    select_device,
)
from ptrain.parallel.fsdp import apply_data_parallel

__all__ = [
    "ParallelConfigError",
    "ParallelDims",
    "apply_ac",
    "apply_compile",
    "apply_data_parallel",
    "backend",
    "device_type",
    "init_distributed",
    "select_device",
]
