"""Test-only shim that lets real megatron-core run on a CPU-only torch build (gloo backend).

Megatron-core hard-codes CUDA in many places. ``install_cpu_shim()`` monkey-patches the handful
of torch entry points that the DDP / DistributedOptimizer / GPTModel / pipeline / checkpoint code
paths hit, so that "CUDA" silently means "CPU". ``uninstall_cpu_shim()`` restores everything.
Both are idempotent.  This module never imports megatron at import time; the only megatron patch
(the RNG tracker helpers) is applied inside ``install_cpu_shim()`` when megatron is importable.

NEVER use this in production code: it lies about devices process-wide.  Only
``stquant_megatron.testing``, tests, examples and benchmarks may import it.

What each shim is for (first Megatron site that needs it; paths under ``megatron/core/``):

* ``device='cuda' | 'cuda:N' | N | torch.device('cuda')`` -> CPU in the torch factory functions
  (``torch.zeros/ones/empty/full/tensor/arange/rand*/*_like/...``):
  ``optimizer/optimizer.py`` (``found_inf``, ``_dummy_overflow_buf``, ``_scale_one``),
  ``optimizer/clip_grads.py`` (norm tensors), ``transformer/utils.py:get_default_causal_mask``,
  ``pipeline_parallel/schedules.py`` (``total_num_tokens``), ``pipeline_parallel/p2p_communication.py``
  (receive buffers), ``distributed/param_and_grad_buffer.py`` (buffer allocation).
* ``Tensor.to(<cuda device>)`` -> CPU: ``optimizer/distrib_optimizer.py`` (``load_state_dict`` and
  dp_zero paths move CPU checkpoint tensors "to the GPU").
* ``Tensor.cuda()`` -> identity: ``optimizer/distrib_optimizer.py`` (dp_zero with
  ``use_gloo_comm=False``), ``optimizer/optimizer.py`` (``restore_from_cpu``), ``nn.Module.cuda()``.
* ``Tensor.type()`` (no-argument form) reports ``torch.cuda.*Tensor``: ``distrib_optimizer.py``
  ``_build_model_and_main_param_groups`` dispatches on ``'torch.cuda.BFloat16Tensor'`` etc.,
  ``optimizer/optimizer.py`` (Float16OptimizerWithFloat16Params), ``clip_grads.py`` asserts
  ``param.grad.type() == 'torch.cuda.FloatTensor'``.  ``Tensor.type('torch.cuda.X')`` casts to the
  CPU type ``torch.X``.
* ``torch.cuda.current_device()`` -> ``torch.device('cpu')``: used as ``device=`` all over
  (``distributed/param_and_grad_buffer.py`` buffer allocation, ``tensor_parallel/layers.py``,
  ``p2p_communication.py``, ``distrib_optimizer.py`` dummy state in ``load_state_dict``).
* ``torch.cuda.synchronize/empty_cache/set_device/device_count/...`` harmless:
  ``dist_checkpointing/strategies/filesystem_async.py`` (synchronize), ``p2p_communication.py``
  (synchronize after ``batch_isend_irecv``), checkpoint code (empty_cache).
  ``device_count()`` returns 1 (code computes ``rank % device_count()``).
* ``torch.cuda.Stream/Event/current_stream/default_stream/stream`` dummies: only needed with
  ``overlap_grad_reduce`` / ``overlap_param_gather`` (``param_and_grad_buffer.py``) and a few
  optional paths; not hit by the default DDP config.
* CUDA RNG == the CPU default generator: ``torch.cuda.{get,set}_rng_state``,
  ``torch.cuda.manual_seed(_all)`` and megatron's private
  ``tensor_parallel.random._{get,set}_cuda_rng_state`` (the latter queues its work with
  ``torch.cuda._lazy_call``, which never runs without CUDA, so it would be a silent no-op).
  Needed by ``tensor_parallel.model_parallel_cuda_manual_seed`` and ``CudaRNGStatesTracker.add/fork``
  (weight init on the GPU path, dropout in TP regions, activation recompute).  Since "CUDA" and CPU
  now share one generator, the tracker's "CPU RNG state changed within GPU RNG context" warning is
  meaningless and is filtered out.
* ``import triton`` (``transformer/moe/ops/paged_stash.py``, megatron-core >= 0.18, reached from
  ``import megatron.core``): the real ``triton`` package imports fine without a GPU, so nothing is
  needed when it is installed.  If it is not, a stub module for just ``paged_stash`` is registered
  (a global fake ``triton`` would break ``torch._inductor``); its kernels raise if called.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import sys
import types

import torch

__all__ = ["install_cpu_shim", "uninstall_cpu_shim", "is_cpu_shim_installed"]

_PATCHES: list = []  # (owner, attribute name, original value or _MISSING)
_MISSING = object()
_LOG_FILTER = object()  # marks a logging filter added by the shim
_PAGED_STASH = "megatron.core.transformer.moe.ops.paged_stash"
_RNG_WARNING = "CPU RNG state changed within GPU RNG context"

_FACTORIES = (
    "tensor", "as_tensor", "scalar_tensor", "zeros", "ones", "empty", "full", "empty_strided",
    "arange", "range", "linspace", "logspace", "eye", "rand", "randn", "randint", "randperm",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "randint_like", "tril_indices", "triu_indices",
)


def _cpu(device):
    """Map a CUDA device spec (``'cuda'``, ``'cuda:1'``, ``1``, ``torch.device('cuda')``) to CPU."""
    if isinstance(device, bool):
        return device
    if isinstance(device, int):
        return torch.device("cpu")
    if isinstance(device, str) and device.startswith("cuda"):
        return torch.device("cpu")
    if isinstance(device, torch.device) and device.type == "cuda":
        return torch.device("cpu")
    return device


def _patch(owner, name, value):
    # For classes remember only what the class itself defines (torch.Tensor inherits ``to``/``type``
    # /``cuda`` from the C base class): restoring then means deleting our override.
    if isinstance(owner, type):
        orig = owner.__dict__.get(name, _MISSING)
    else:
        orig = getattr(owner, name, _MISSING)
    _PATCHES.append((owner, name, orig))
    setattr(owner, name, value)


def _factory(fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return fn(*args, **kwargs)

    return wrapper


def _tensor_to(orig):
    @functools.wraps(orig)
    def to(self, *args, **kwargs):
        if args and not isinstance(args[0], (torch.dtype, torch.Tensor)):
            args = (_cpu(args[0]),) + args[1:]
        if "device" in kwargs:
            kwargs["device"] = _cpu(kwargs["device"])
        return orig(self, *args, **kwargs)

    return to


def _tensor_type(orig):
    @functools.wraps(orig)
    def type_(self, dtype=None, non_blocking=False, **kwargs):
        if dtype is None and not kwargs:
            name = orig(self)
            if self.device.type == "cpu" and name.startswith("torch.") and ".cuda." not in name:
                name = "torch.cuda." + name[len("torch."):]
            return name
        if isinstance(dtype, str):
            dtype = dtype.replace("torch.cuda.", "torch.")
        elif isinstance(dtype, type) and dtype.__module__ == "torch.cuda":
            dtype = getattr(torch, dtype.__name__)
        return orig(self, dtype, non_blocking, **kwargs)

    return type_


class _DummyStream:
    """Stand-in for ``torch.cuda.Stream``: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def wait_stream(self, *args, **kwargs):
        pass

    def wait_event(self, *args, **kwargs):
        pass

    def record_event(self, event=None):
        return event if event is not None else _DummyEvent()

    def synchronize(self):
        pass

    def query(self):
        return True


class _DummyEvent:
    """Stand-in for ``torch.cuda.Event``: always complete, zero elapsed time."""

    def __init__(self, *args, **kwargs):
        pass

    def record(self, *args, **kwargs):
        pass

    def wait(self, *args, **kwargs):
        pass

    def synchronize(self):
        pass

    def query(self):
        return True

    def elapsed_time(self, other):
        return 0.0


def _noop(name):
    # A distinct function object per patched name: torch._dynamo's trace rules map torch
    # functions by identity and assert when one object appears under two names.
    def noop(*args, **kwargs):
        return None

    noop.__name__ = noop.__qualname__ = name
    return noop


def _cpu_get_rng_state(device="cuda"):
    return torch.get_rng_state()


def _cpu_set_rng_state(new_state, device="cuda"):
    torch.set_rng_state(new_state)


def _megatron_get_rng_state(device="cuda", clone=False, graph_safe=False):
    return torch.get_rng_state()


def _megatron_set_rng_state(new_state, device=-1, graph_safe=False):
    torch.set_rng_state(new_state)


def _cpu_manual_seed(seed):
    # Not torch.manual_seed: that one calls torch.cuda.manual_seed_all (-> recursion).
    torch.default_generator.manual_seed(int(seed))


class _DropRngWarning(logging.Filter):
    def filter(self, record):
        return _RNG_WARNING not in record.getMessage()


_RNG_FILTER = _DropRngWarning()


def _stub_paged_stash():
    """Register a stub ``paged_stash`` module when ``triton`` is missing (megatron-core >= 0.18)."""
    if _PAGED_STASH in sys.modules:
        return
    try:
        importlib.import_module("triton")  # the real package imports fine without a GPU
        return
    except ImportError:
        pass

    def _unavailable(*args, **kwargs):
        raise RuntimeError("paged_stash needs triton, which is not installed (CPU test shim)")

    stub = types.ModuleType(_PAGED_STASH)
    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    sys.modules[_PAGED_STASH] = stub
    _PATCHES.append((sys.modules, _PAGED_STASH, _MISSING))


def _patch_megatron_rng():
    try:
        import megatron.core.tensor_parallel.random as mrandom
    except ImportError:  # megatron not installed: the torch-level shims still apply
        return
    _patch(mrandom, "_get_cuda_rng_state", _megatron_get_rng_state)
    _patch(mrandom, "_set_cuda_rng_state", _megatron_set_rng_state)
    logger = logging.getLogger(mrandom.__name__)
    logger.addFilter(_RNG_FILTER)
    _PATCHES.append((logger, "filter", _LOG_FILTER))


def is_cpu_shim_installed() -> bool:
    return bool(_PATCHES)


PRELOAD: dict = {}
"""``{"orig": FileSystemWriterAsync.preload_tensors}`` once ``megatron_lm`` replaced it by ``preload_copies``."""


def preload_copies(write_buckets, non_blocking=True):
    """megatron-core's async writer's ``preload_tensors`` (its "copy to host") with the snapshot a GPU's
    device-to-host copy takes: on the CPU, ``tensor.to("cpu")`` is the live tensor, which the next
    iterations change in place while the background write runs. Only for ``--async-save``: synchronous
    saves are left as they are (what the checkpoint benchmark's host-memory column measures). (Module
    level: the async request that carries it is pickled to the forked writer.)"""
    out = PRELOAD["orig"](write_buckets, non_blocking)
    from megatron.training.global_vars import get_args

    if not getattr(get_args(), "async_save", False):  # a synchronous save writes before training goes on
        return out
    return [(f, k, (b, [(item, t.clone()) for item, t in tensors])) for f, k, (b, tensors) in out]


def install_cpu_shim(patch_megatron: bool = True) -> None:
    """Make CUDA calls used by megatron-core run on CPU (test-only, process-wide, idempotent).

    ``patch_megatron``: also import ``megatron.core.tensor_parallel.random`` (if installed) and
    route its CUDA RNG helpers to the CPU generator.  Refuses to run on a machine with CUDA.
    """
    if _PATCHES:
        return
    if torch.cuda.is_available():
        raise RuntimeError("install_cpu_shim() is for CPU-only machines; CUDA is available here")
    # torch._dynamo builds (and caches) a rule map keyed by torch function objects on first import
    # (megatron imports it through torch.compile decorators); build it from the real functions.
    importlib.import_module("torch._dynamo")
    _stub_paged_stash()
    for name in _FACTORIES:
        if hasattr(torch, name):
            _patch(torch, name, _factory(getattr(torch, name)))
    T = torch.Tensor
    _patch(T, "to", _tensor_to(T.to))
    _patch(T, "type", _tensor_type(T.type))
    _patch(T, "cuda", lambda self, *args, **kwargs: self)
    cuda = torch.cuda
    for name, value in {
        "current_device": lambda: torch.device("cpu"),
        "device_count": lambda: 1,
        "set_device": _noop("set_device"),
        "synchronize": _noop("synchronize"),
        "empty_cache": _noop("empty_cache"),
        "Stream": _DummyStream,
        "Event": _DummyEvent,
        "current_stream": lambda *args, **kwargs: _DummyStream(),
        "default_stream": lambda *args, **kwargs: _DummyStream(),
        "stream": lambda *args, **kwargs: _DummyStream(),
        "get_rng_state": _cpu_get_rng_state,
        "set_rng_state": _cpu_set_rng_state,
        "manual_seed": _cpu_manual_seed,
        "manual_seed_all": _cpu_manual_seed,
    }.items():
        _patch(cuda, name, value)
    for name in ("get_rng_state", "set_rng_state", "manual_seed", "manual_seed_all"):
        _patch(cuda.random, name, getattr(cuda, name))
    if patch_megatron:
        _patch_megatron_rng()


def uninstall_cpu_shim() -> None:
    """Undo ``install_cpu_shim()`` (idempotent).  A stubbed ``paged_stash`` module is dropped."""
    while _PATCHES:
        owner, name, orig = _PATCHES.pop()
        if orig is _LOG_FILTER:
            owner.removeFilter(_RNG_FILTER)
        elif owner is sys.modules:
            sys.modules.pop(name, None)
        elif orig is _MISSING:
            delattr(owner, name)
        else:
            setattr(owner, name, orig)
