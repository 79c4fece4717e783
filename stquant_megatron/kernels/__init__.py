"""Fused packed-Adam step: the Triton kernel (GPU) and its PyTorch twin (CPU, reference).

Both have the same signature and produce the same packed codes; ``get_step_fn`` picks one.
"""

from __future__ import annotations

import os

import torch

from .common import GroupEntry, StepScalars, rng_key, step_scalars, unit_id
from .torch_adam import torch_factored_adam_step, torch_packed_adam_group_step, torch_packed_adam_step
from .triton_adam import HAS_TRITON, triton_packed_adam_group_step, triton_packed_adam_step
from .triton_factored import triton_factored_adam_step

__all__ = [
    "GroupEntry", "StepScalars", "get_factored_step_fn", "get_group_step_fn", "get_step_fn", "rng_key", "step_scalars",
    "torch_factored_adam_step", "torch_packed_adam_group_step", "torch_packed_adam_step", "triton_packed_adam_group_step",
    "triton_factored_adam_step", "triton_packed_adam_step", "unit_id",
]  # fmt: skip


def get_step_fn(backend: str, device: torch.device):
    """``backend`` "auto": Triton on CUDA when installed, else PyTorch."""
    if backend == "torch":
        return torch_packed_adam_step
    if backend == "triton":
        if not HAS_TRITON:
            raise RuntimeError("backend='triton' but triton is not installed: pip install triton")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"backend='triton' on a {device.type} tensor needs TRITON_INTERPRET=1 (CPU interpreter); "
                "use backend='auto' or 'torch' for the fast CPU path"
            )
        return triton_packed_adam_step
    if device.type == "cuda" and HAS_TRITON:
        return triton_packed_adam_step
    return torch_packed_adam_step


def get_group_step_fn(backend: str, device: torch.device):
    """The grouped entry point of the backend ``get_step_fn`` picks (same rules)."""
    fn = get_step_fn(backend, device)
    return triton_packed_adam_group_step if fn is triton_packed_adam_step else torch_packed_adam_group_step


def get_factored_step_fn(backend: str, device: torch.device):
    """The factored-exp_avg_sq step (``torch_factored_adam_step``'s signature) of the backend ``get_step_fn`` picks."""
    fn = get_step_fn(backend, device)
    return triton_factored_adam_step if fn is triton_packed_adam_step else torch_factored_adam_step
