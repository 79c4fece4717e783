"""Test-only utilities: run real megatron-core on CPU with gloo (never used by the patch path).

* ``cpu_shim``: ``install_cpu_shim()`` / ``uninstall_cpu_shim()`` -- CUDA calls -> CPU.
* ``distributed``: ``run_distributed(fn, world_size, *args)`` and ``init_megatron_parallel(tp, pp)``.
* ``gpt``: tiny GPTModel + DDP + DistributedOptimizer builders, train step, checkpoint helpers.

Importing this package only imports torch; megatron is imported inside the functions.
"""

from . import gpt
from .cpu_shim import install_cpu_shim, is_cpu_shim_installed, uninstall_cpu_shim
from .distributed import DistributedRunError, RemoteTraceback, init_megatron_parallel, run_distributed

__all__ = [
    "gpt",
    "install_cpu_shim",
    "uninstall_cpu_shim",
    "is_cpu_shim_installed",
    "run_distributed",
    "init_megatron_parallel",
    "DistributedRunError",
    "RemoteTraceback",
]
