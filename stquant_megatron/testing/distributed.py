"""Run a function on N local CPU processes with a gloo process group (test-only).

``run_distributed(fn, world_size, *args)`` starts ``world_size`` processes (from a
``forkserver`` that has torch + megatron-core pre-imported, or ``spawn``; either way ``fn`` and
``args`` must be picklable: define ``fn`` at module level), in each one installs the CPU shim
(:mod:`stquant_megatron.testing.cpu_shim`), joins a gloo process group, calls
``fn(rank, world_size, *args)`` and sends the (picklable) return value back.  The parent returns
the list of per-rank results, or re-raises the first child exception with the child's traceback
attached as ``__cause__``.  Nothing can hang forever: the whole run has a deadline, collectives
have a gloo timeout, after a failure the other ranks get a short grace period and are then
killed together with any process they started, and each rank has a watchdog thread that exits
if the parent disappears.

The rendezvous store (``TCPStore``) is opened by the parent on an OS-assigned free port (no
"pick a port, close it, hope nobody takes it" race); ``MASTER_ADDR``/``MASTER_PORT``/``RANK``/
``WORLD_SIZE``/``LOCAL_RANK`` are still exported in the children for code that reads them.

``init_megatron_parallel(tp, pp, ...)`` sets up megatron-core's ``parallel_state`` and the
model-parallel RNG tracker inside such a child.
"""

from __future__ import annotations

import datetime
import faulthandler
import os
import pickle
import queue as queue_mod
import re
import signal
import time
import traceback
import warnings

__all__ = ["run_distributed", "init_megatron_parallel", "DistributedRunError", "RemoteTraceback"]


class RemoteTraceback(Exception):
    """Carries a child's formatted traceback; set as ``__cause__`` of the re-raised exception."""

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class DistributedRunError(RuntimeError):
    """A child failed with an unpicklable exception, died without reporting, or timed out."""


# Imported once by the multiprocessing fork server (missing modules are skipped by Python).
_FORKSERVER_PRELOAD = (
    "torch",
    "torch.distributed",
    "torch._dynamo",
    "stquant_megatron.testing.cpu_shim",
    "megatron.core",
    "megatron.core.optimizer",
    "megatron.core.distributed",
    "megatron.core.models.gpt",
    "megatron.core.models.gpt.gpt_layer_specs",
    "megatron.core.pipeline_parallel",
    "megatron.core.dist_checkpointing",
    "megatron.core.dist_checkpointing.strategies.torch",
)

# Known-irrelevant warnings silenced in the ranks when quiet=True (matched as substrings).
_QUIET_WARNINGS = (
    "Transformer Engine and Apex are not installed",
    "Apex is not installed",
    "Transformer Engine is not installed",
    "`torch.distributed.reduce_scatter_tensor` is deprecated",
    "`torch.distributed.all_gather_into_tensor` is deprecated",
    "full scope is deprecated",
)


def _watchdog(parent_pid: int, deadline: float):
    """Exit this rank if the parent process disappears or the run's deadline has long passed."""
    import threading

    def watch():
        while True:
            time.sleep(1.0)
            try:
                os.kill(parent_pid, 0)
            except OSError:
                os._exit(70)
            if time.monotonic() > deadline:
                os._exit(71)

    threading.Thread(target=watch, name="stquant-watchdog", daemon=True).start()


def _child(rank, world_size, port, payload, result_queue, num_threads, timeout, quiet, parent_pid, env):
    """Body of one spawned rank.  Always reports exactly one message on ``result_queue``."""
    import torch
    import torch.distributed as dist

    # Children are not daemonic (dist_checkpointing starts its own helper processes), so they
    # must not outlive the parent: a watchdog thread ends them.
    _watchdog(parent_pid, time.monotonic() + timeout + 60.0)
    # Store/collective timeout: never below 60 s, so that a short run deadline on a loaded
    # machine ends in the parent's TimeoutError (with stacks), not in a rendezvous error.
    pg_timeout = datetime.timedelta(seconds=max(timeout, 60.0))
    try:
        faulthandler.register(signal.SIGUSR1, all_threads=True)  # parent dumps stacks on timeout
        if quiet:
            for msg in _QUIET_WARNINGS:
                warnings.filterwarnings("ignore", message=f".*{re.escape(msg)}")
        os.environ.update(env or {})
        os.environ.update(
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=str(port),
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            LOCAL_WORLD_SIZE=str(world_size),
        )
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
        torch.set_num_threads(num_threads)
        from .cpu_shim import install_cpu_shim

        install_cpu_shim()
        # Unpickled only now, so that fn's module is imported with ``env`` set and the shim on
        # (e.g. @triton.jit picks the interpreter from TRITON_INTERPRET at decoration time).
        fn, args = pickle.loads(payload)
        store = dist.TCPStore("127.0.0.1", port, world_size, is_master=False, timeout=pg_timeout)
        dist.init_process_group("gloo", store=store, rank=rank, world_size=world_size,
                                timeout=pg_timeout)
        result = fn(rank, world_size, *args)
        result_queue.put(("ok", rank, _dumps(result)))
    except BaseException as exc:  # noqa: BLE001 - report everything, including KeyboardInterrupt
        tb = traceback.format_exc()
        try:
            exc_bytes = _dumps(exc)
            pickle.loads(exc_bytes)
        except Exception:
            exc_bytes = None
        result_queue.put(("err", rank, (tb, exc_bytes)))
        _flush(result_queue)  # in the pipe before peers see this rank's group go away
        _teardown(dist, clean=False)
        return
    _flush(result_queue)
    _teardown(dist, clean=True)


def _flush(result_queue):
    result_queue.close()
    result_queue.join_thread()


def _load_from_bytes(b):
    """Unpickles tensor storages sent by the ranks (what ``torch.storage._load_from_bytes`` does)."""
    import io

    import torch

    return torch.load(io.BytesIO(b), weights_only=False)


def _dumps(obj) -> bytes:
    """``pickle.dumps`` whose tensors unpickle without importing megatron in the parent.

    megatron-core >= 0.19 replaces ``torch.storage._load_from_bytes`` with its own function on
    import, and pickled storages reference it by name, so unpickling a rank's tensors would import
    megatron.core (seconds) into the test process.  Pickle them against this module instead.
    """
    import torch.storage

    current = torch.storage._load_from_bytes
    torch.storage._load_from_bytes = _load_from_bytes
    try:
        return pickle.dumps(obj)
    finally:
        torch.storage._load_from_bytes = current


def _teardown(dist, clean: bool):
    import sys

    if "megatron.core.parallel_state" in sys.modules:
        try:
            sys.modules["megatron.core.parallel_state"].destroy_model_parallel()
        except Exception:
            pass
    if dist.is_initialized():
        try:
            if clean:
                dist.barrier()  # nobody leaves while a peer may still talk to it
            dist.destroy_process_group()
        except Exception:
            pass


def run_distributed(fn, world_size: int, *args, timeout: float = 300.0, num_threads: int | None = None,
                    quiet: bool = True, grace: float = 10.0, start_method: str | None = None,
                    env: dict | None = None):
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo CPU processes.

    Returns ``[result_rank0, result_rank1, ...]`` (each pickled in the child, unpickled here).
    ``timeout``: wall-clock limit in seconds for the whole run (start-up included); the ranks'
    gloo/store timeout is ``max(timeout, 60)``.
    ``num_threads``: torch intra-op threads per rank (default: cores // world_size, at least 1).
    ``quiet``: silence megatron's "TE/Apex not installed" warnings in the children.
    ``grace``: seconds the remaining ranks get to exit after one rank failed, before being killed.
    ``start_method``: ``'forkserver'`` (default; env ``STQUANT_MP_START_METHOD`` overrides) or
    ``'spawn'``.  The fork server imports torch + megatron-core once per parent process
    (``_FORKSERVER_PRELOAD``) so each rank starts in well under a second instead of paying
    ~7 s of imports per rank; ranks are forked from that clean, single-purpose server (it has
    never initialised a process group, RNG tracker or the shim).  ``'spawn'`` starts from scratch.
    ``env``: variables set in each rank before ``fn``/``args`` are unpickled (so ``fn``'s module
    is imported with them).  Forkserver ranks inherit the environment of the server, i.e. of the
    process at its *first* ``run_distributed`` call, not the caller's current ``os.environ``; and
    modules the server preloaded (torch, megatron, the ``stquant_megatron`` package itself) were
    imported with that environment.  So set process-wide switches such as ``TRITON_INTERPRET=1``
    in ``os.environ`` before the first call (e.g. in ``conftest.py``) when kernels living in the
    ``stquant_megatron`` package must see them; ``env`` suffices for modules imported later.
    Raises the child's exception (with ``RemoteTraceback`` as ``__cause__``) when a rank fails,
    ``DistributedRunError`` when a rank dies silently or an exception is unpicklable, and
    ``TimeoutError`` when the deadline passes (the hanging ranks' stacks are printed to stderr
    first).  ``timeout`` includes process start-up (the first forkserver call imports megatron).
    """
    import torch.distributed as dist
    import torch.multiprocessing as mp

    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    if num_threads is None:
        num_threads = max(1, (os.cpu_count() or 1) // world_size)
    try:
        payload = pickle.dumps((fn, args))
    except Exception as e:
        raise TypeError(f"run_distributed: fn and args must be picklable (define fn at module "
                        f"level): {e}") from e
    start_method = start_method or os.environ.get("STQUANT_MP_START_METHOD", "forkserver")
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(list(_FORKSERVER_PRELOAD))  # only used when the server starts
    # Parent-held rendezvous store on a free port chosen by the OS (port=0).
    store = dist.TCPStore("127.0.0.1", 0, None, True, wait_for_workers=False,
                          timeout=datetime.timedelta(seconds=max(timeout, 60.0)))
    deadline = time.monotonic() + timeout  # includes start-up (fork server preload on first use)
    result_queue = ctx.Queue()
    procs = []
    for rank in range(world_size):
        p = ctx.Process(target=_child, name=f"stquant-rank{rank}", daemon=False,
                        args=(rank, world_size, store.port, payload, result_queue, num_threads,
                              timeout, quiet, os.getpid(), env))
        p.start()
        procs.append(p)

    results: dict[int, object] = {}
    failures: list[tuple[int, str, bytes | None]] = []
    fail_deadline = None
    try:
        while len(results) + len(failures) < world_size:
            now = time.monotonic()
            if fail_deadline is not None and now > fail_deadline:
                break
            if now > deadline:
                missing = sorted(set(range(world_size)) - set(results) - {f[0] for f in failures})
                if failures:
                    break
                _dump_stacks(procs, missing)
                raise TimeoutError(f"run_distributed({getattr(fn, '__name__', fn)}): ranks {missing} "
                                   f"did not finish within {timeout:.0f} s")
            try:
                status, rank, payload = result_queue.get(timeout=0.2)
            except queue_mod.Empty:
                reported = set(results) | {f[0] for f in failures}
                dead = [r for r, p in enumerate(procs) if r not in reported and p.exitcode is not None]
                if dead:
                    # A dead rank may still have a message in flight: give the queue a moment.
                    time.sleep(0.5)
                    try:
                        while True:
                            status, rank, payload = result_queue.get_nowait()
                            _record(status, rank, payload, results, failures)
                    except queue_mod.Empty:
                        pass
                    reported = set(results) | {f[0] for f in failures}
                    for r in dead:
                        if r not in reported:
                            failures.append((r, f"rank {r} exited with code {procs[r].exitcode} "
                                                f"without reporting a result\n", None))
                    if fail_deadline is None and failures:
                        fail_deadline = time.monotonic() + grace
                continue
            _record(status, rank, payload, results, failures)
            if failures and fail_deadline is None:
                fail_deadline = time.monotonic() + grace
        if not failures:
            # Children barrier, destroy the group and run their exit handlers after reporting.
            exit_deadline = time.monotonic() + max(grace, 30.0)
            for p in procs:
                p.join(timeout=max(0.1, exit_deadline - time.monotonic()))
    finally:
        _stop(procs)
        result_queue.close()
        del store

    if failures:
        failures.sort(key=lambda f: f[1].startswith("rank ") and "without reporting" in f[1])
        rank, tb, exc_bytes = failures[0]
        others = sorted(f[0] for f in failures[1:])
        note = (f"raised in rank {rank} of {world_size} (run_distributed of "
                f"{getattr(fn, '__qualname__', fn)})" + (f"; ranks {others} also failed" if others else ""))
        remote = RemoteTraceback(f"\n--- traceback of rank {rank} ---\n{tb}")
        exc = pickle.loads(exc_bytes) if exc_bytes is not None else None
        if exc is None:
            exc = DistributedRunError(f"{note}:\n{tb}")
        elif hasattr(exc, "add_note"):
            exc.add_note(note)
        raise exc from remote
    return [results[r] for r in range(world_size)]


def _dump_stacks(procs, ranks):
    """Ask hanging ranks to print their Python stacks (faulthandler on SIGUSR1) to stderr."""
    for r in ranks:
        if procs[r].is_alive():
            try:
                os.kill(procs[r].pid, signal.SIGUSR1)
            except OSError:
                pass
    time.sleep(1.0)


def _descendants(pid):
    try:
        import psutil
    except ImportError:
        return []
    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.Error:
        return []


def _stop(procs):
    """Terminate ranks still alive, and everything they started (dist_checkpointing's Manager and
    writer processes would otherwise be orphaned and keep inherited pipes open)."""
    alive = [p for p in procs if p.is_alive()]
    if not alive:
        return
    extra = [c for p in alive for c in _descendants(p.pid)]
    for p in alive:
        p.terminate()
    for p in alive:
        p.join(timeout=5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    for c in extra:
        try:
            c.kill()
        except Exception:
            pass


def _record(status, rank, payload, results, failures):
    if status == "ok":
        results[rank] = pickle.loads(payload)
    else:
        failures.append((rank, payload[0], payload[1]))


def init_megatron_parallel(tp: int = 1, pp: int = 1, *, vpp: int | None = None, seed: int = 1234,
                           cpu_shim: bool = True, **kwargs) -> dict:
    """Initialise megatron-core model parallelism + RNG on the current (gloo) world.

    Wraps ``parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp,
    pipeline_model_parallel_size=pp, virtual_pipeline_model_parallel_size=vpp, **kwargs)`` and
    ``tensor_parallel.model_parallel_cuda_manual_seed(seed)`` (which needs the CPU shim: the
    "CUDA" RNG is the CPU generator; ``cpu_shim=False`` on a real CUDA device, e.g. ``benchmarks/gpu_day.py``).
    Re-initialises if already initialised.  Returns a dict
    with the ranks/sizes of this process (``tp_rank, tp_size, pp_rank, pp_size, dp_rank, dp_size``).
    """
    import torch
    from megatron.core import parallel_state as ps
    from megatron.core import tensor_parallel

    from .cpu_shim import install_cpu_shim

    if cpu_shim:
        install_cpu_shim()
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                                 virtual_pipeline_model_parallel_size=vpp, **kwargs)
    torch.manual_seed(seed)
    tensor_parallel.model_parallel_cuda_manual_seed(seed)
    return dict(
        rank=torch.distributed.get_rank(),
        tp_rank=ps.get_tensor_model_parallel_rank(), tp_size=ps.get_tensor_model_parallel_world_size(),
        pp_rank=ps.get_pipeline_model_parallel_rank(), pp_size=ps.get_pipeline_model_parallel_world_size(),
        dp_rank=ps.get_data_parallel_rank(), dp_size=ps.get_data_parallel_world_size(),
    )
