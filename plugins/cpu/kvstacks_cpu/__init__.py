"""kvstacks-cpu: the ``cpu`` tier backend (pooled host memory)."""

from kvstacks import hookimpl

from kvstacks_cpu.backend import CpuBackend, PooledObj
from kvstacks_cpu.pool import BufferPool, PoolBuffer, PoolStats, size_class

__all__ = ["BufferPool", "CpuBackend", "PoolBuffer", "PoolStats", "PooledObj", "size_class"]


@hookimpl
def register_backends(register):
    register(CpuBackend)
