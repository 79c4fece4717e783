"""Run Megatron-LM's own, unmodified training scripts (``pretrain_gpt.py``, ``pretrain_vlm.py``) on
CPU with gloo ranks (test-only; never on the patch path).

Two parts:

* ``run_megatron_lm(script, args, ...)`` (runner, in the test process): starts ``nproc`` rank
  processes ``python -m stquant_megatron.testing.megatron_lm [--route ...] SCRIPT ARGS`` with the
  ``torchrun`` environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT), waits, and returns
  what every rank recorded (per-iteration losses, grad norms, optimizer-state bytes, unit bits).
* ``main()`` (wrapper, in each rank): applies the CPU-only workarounds below, then runs the script
  exactly as a user would: ``--route launch`` through ``stquant_megatron.launch.main`` (=
  ``python -m stquant_megatron.launch SCRIPT ...``), ``--route script`` with ``runpy`` (stock, or the
  ``PYTHONPATH=patches`` route when the caller puts ``patches/`` on ``PYTHONPATH``).

Every CPU-only workaround the wrapper applies (none is needed on a GPU machine with TE/apex):

1. Python 3.11: ``typing.override`` (3.12) aliased from ``typing_extensions``.
2. ``torch.cuda`` -> CPU: ``stquant_megatron.testing.cpu_shim.install_cpu_shim()``.
3. ``initialize_megatron`` asserts ``torch.cuda.is_available()``: both bindings
   (``megatron.training.initialize`` and ``megatron.training.training``) get ``allow_no_cuda=True``.
4. Dataset helpers: the megatron-core wheel has no Makefile and only a CPython 3.12 build of
   ``helpers_cpp``; ``megatron/core/datasets/helpers.cpp`` is compiled with g++ and torch's bundled
   pybind11 headers (cached under ``~/.cache/stquant_megatron/helpers_cpp``), registered as
   ``megatron.core.datasets.helpers_cpp``, and Megatron's ``make`` step is skipped.
5. ``torch_dist`` saves start a results-queue Manager with ``spawn``, which re-imports the script
   without this wrapper: it is started with ``fork`` instead.
6. Stock resume (Megatron's torch AdamW fallback, used without TE/apex), two defects:
   (a) the optimizer has no state before its first step and ``DistributedOptimizer.state_dict()``
   asserts on it: ``load_checkpoint`` first calls ``gpt.init_stock_adam_state`` (a no-op for
   STQuantAdamW); (b) after the load, that optimizer's per-parameter ``step`` tensors do not hold
   the checkpoint's step (observed: 0 after a torch_dist load, so bias correction restarts;
   ``DistributedOptimizer.load_state_dict`` of 0.19.2 also hands every parameter one shared
   tensor, which torch AdamW increments once per parameter): ``gpt.restore_stock_adam_steps`` gives
   each parameter its own tensor set to its param group's ``step``, which Megatron restores.
7. TP/CP > 1 asks for the GPU architecture (``get_device_arch_version`` in Megatron-LM's argument
   checks): it reports 9 (Hopper); the runner sets ``CUDA_DEVICE_MAX_CONNECTIONS=1``.
8. ``TORCHDYNAMO_DISABLE=1`` (runner environment): Megatron's ``jit_fuser`` is ``torch.compile``, and
   ``pretrain`` warms the fused bias-GeLU / bias-dropout-add functions up unconditionally; inductor's
   CPU C++ compile of them took ~24 s per rank here. They run eagerly instead (same math).
9. ``pretrain_vlm.py`` without Transformer Engine: ``CLIPViTModel``'s default pre-LayerNorm is
   ``torch.nn.LayerNorm``, which it builds with Megatron's ``config=`` keyword (a TypeError in
   megatron-core 0.19.2 on any machine without TE); the wrapper makes the default Megatron's
   ``WrappedTorchNorm`` (same LayerNorm, Megatron's constructor signature).
10. ``--async-save --use-persistent-ckpt-worker``: Megatron-LM starts its persistent checkpoint
   worker with ``forkserver``, whose child re-imports the script without this wrapper (and fails on
   1.): it is started with ``fork`` instead, as in 5. And the async writer's "copy to host" of each
   tensor (``FileSystemWriterAsync.preload_tensors``), the snapshot the background write saves while
   training goes on, is a no-op for CPU tensors: the writer would save values the next iterations
   changed in place. It takes a copy, as the device-to-host copy does on a GPU.
Flags every run needs on CPU (``CPU_FLAGS``): ``--distributed-backend gloo --transformer-impl local
--no-persist-layer-norm --no-gradient-accumulation-fusion --no-masked-softmax-fusion`` (and
``--no-rope-fusion`` with RoPE); dropout 0 for exact comparisons (the shim shares one RNG between
"CPU" and "CUDA").

Recording (for tests): with ``STQUANT_LM_RECORD=<dir>`` each rank writes ``<dir>/rank<r>.json``:
``iterations`` (per ``training_log`` call: iteration, the DP-reduced losses, grad norm, skipped),
``local_losses`` (this rank's own per-iteration loss, from the forward-backward output before
Megatron's data-parallel all-reduce), and at the end ``optimizers`` (per DistributedOptimizer:
inner class, state bytes, params, this rank's unit bits, the scheduler's bits for every unit of
the optimizer, its average bits and number of decisions), ``saves`` / ``loads`` (per checkpoint save or
load: wall seconds, resident memory before and its peak during it). The wrapper also prints
``[stquant-lm] optimizer state: X B/param`` on every rank.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import sysconfig
import threading
import time

__all__ = ["CPU_FLAGS", "FIXTURES", "LMRun", "MegatronLMError", "ensure_helpers_cpp", "gpt_args", "main",
           "run_megatron_lm", "vlm_args"]  # fmt: skip

FIXTURES = os.path.abspath(
    os.environ.get("STQUANT_MEGATRON_LM")
    or os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "fixtures", "megatron-lm-core_r0.19.0")
)
"""Folder of Megatron-LM's scripts (``STQUANT_MEGATRON_LM`` overrides the shared fixture copy)."""

PATCHES = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "patches"))

CPU_FLAGS = (
    "--distributed-backend", "gloo", "--transformer-impl", "local", "--no-persist-layer-norm",
    "--no-gradient-accumulation-fusion", "--no-masked-softmax-fusion",
)  # fmt: skip


def gpt_args(*, layers: int | None = 2, hidden: int = 64, heads: int = 4, seq: int = 64, vocab: int = 256,
             iters: int = 8, mbs: int = 2, gbs: int = 4, lr: float = 3e-3, bf16: bool = True,
             rope: bool = False, tp: int = 1, pp: int = 1, extra: tuple | list = ()) -> list[str]:
    """Megatron-LM flags for a tiny GPT on ``--mock-data`` (CPU flags included), constant lr,
    no dropout, no evaluation, a log line every iteration."""
    args = [
        *(["--num-layers", str(layers)] if layers is not None else []), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
        "--seq-length", str(seq), "--max-position-embeddings", str(seq),
        "--micro-batch-size", str(mbs), "--global-batch-size", str(gbs), "--train-iters", str(iters),
        "--lr", str(lr), "--min-lr", str(lr), "--lr-decay-style", "constant", "--weight-decay", "0.01",
        "--clip-grad", "1.0", "--adam-beta2", "0.95", "--init-method-std", "0.02", "--seed", "1234",
        "--hidden-dropout", "0", "--attention-dropout", "0",
        "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", str(vocab),
        "--tensor-model-parallel-size", str(tp), "--pipeline-model-parallel-size", str(pp),
        "--use-distributed-optimizer", "--optimizer", "adam",
        "--log-interval", "1", "--eval-iters", "0", "--eval-interval", "1000000",
        *CPU_FLAGS,
    ]  # fmt: skip
    if bf16:
        args.append("--bf16")
    if rope:
        args += ["--position-embedding-type", "rope", "--no-rope-fusion"]
    return args + list(extra)


def vlm_args(*, vision_layers: int = 1, language_layers: int = 2, img: int = 32, patch: int = 8,
             text_seq: int = 48, **gpt_kwargs) -> list[str]:
    """Megatron-LM flags for ``pretrain_vlm.py`` (LLaVA: CLIP ViT + MLP projector + GPT, local
    specs) on its ``MockMultimodalDataset``: an ``img`` x ``img`` image in ``patch``-pixel patches
    (+ class token) before ``text_seq`` text tokens. The script allows only ``--ckpt-format torch``."""
    n_img = (img // patch) ** 2 + 1
    args = gpt_args(layers=None, seq=text_seq, **gpt_kwargs)
    i = args.index("--max-position-embeddings")
    args[i + 1] = str(text_seq + n_img)
    return args + ["--encoder-num-layers", str(vision_layers), "--decoder-num-layers", str(language_layers),
                   "--img-h", str(img), "--img-w", str(img), "--patch-dim", str(patch), "--ckpt-format", "torch"]


# ------------------------------------------------------------------------------------ helpers_cpp
def _mcore_dir() -> str:
    spec = importlib.util.find_spec("megatron.core")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("megatron.core is not importable (put the 0.19.x sources on PYTHONPATH)")
    return list(spec.submodule_search_locations)[0]


def ensure_helpers_cpp(mcore_dir: str | None = None) -> str:
    """Path of a ``helpers_cpp`` extension for this Python, compiled once from the installed
    megatron-core's ``datasets/helpers.cpp`` (g++, torch's pybind11 headers) and cached."""
    src = os.path.join(mcore_dir or _mcore_dir(), "datasets", "helpers.cpp")
    with open(src, "rb") as f:
        digest = hashlib.sha256(f.read() + sys.version.encode()).hexdigest()[:16]
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    out_dir = os.path.join(cache, "stquant_megatron", "helpers_cpp", digest)
    out = os.path.join(out_dir, "helpers_cpp" + sysconfig.get_config_var("EXT_SUFFIX"))
    if os.path.exists(out):
        return out
    import torch

    os.makedirs(out_dir, exist_ok=True)
    tmp = f"{out}.{os.getpid()}.tmp"
    cmd = ["g++", "-O3", "-shared", "-std=c++17", "-fPIC", f"-I{sysconfig.get_paths()['include']}",
           f"-I{os.path.join(os.path.dirname(torch.__file__), 'include')}", src, "-o", tmp]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"compiling {src} failed ({' '.join(cmd)}):\n{proc.stderr[-4000:]}")
    os.replace(tmp, out)  # atomic: concurrent builders agree
    return out


# ------------------------------------------------------------------------------------ the wrapper
_REC: dict = {"iterations": [], "local_losses": [], "optimizers": None, "saves": [], "loads": []}
_STATE: dict = {"optimizer": None}


def _record_path():
    d = os.environ.get("STQUANT_LM_RECORD")
    return os.path.join(d, f"rank{os.environ.get('RANK', '0')}.json") if d else None


def _flush_record():
    path = _record_path()
    if path:
        with open(path + ".tmp", "w") as f:
            json.dump(_REC, f)
        os.replace(path + ".tmp", path)


def _float(x):
    try:
        return float(x.item() if hasattr(x, "item") else x)
    except (TypeError, ValueError):
        return None


def _optimizer_summary(optimizer) -> list[dict]:
    import torch

    from stquant_megatron.optim import STQuantAdamW
    from stquant_megatron.testing.gpt import distributed_optimizers

    out = []
    for opt in distributed_optimizers(optimizer):
        inner = opt.optimizer
        nparams = sum(p.numel() for g in inner.param_groups for p in g["params"])
        if isinstance(inner, STQuantAdamW):
            nbytes, bits = inner.state_bytes(), inner.unit_bits()
        else:  # stock torch Adam/AdamW: the storage of its state tensors
            seen, nbytes = set(), 0
            for st in inner.state.values():
                for v in st.values():
                    if torch.is_tensor(v) and v.untyped_storage().data_ptr() not in seen:
                        seen.add(v.untyped_storage().data_ptr())
                        nbytes += v.untyped_storage().nbytes()
            bits = {}
        sched = getattr(inner, "scheduler", None)
        sched = sched if sched is not None and sched.numel is not None else None  # set up at the first step
        out.append({"inner": type(inner).__name__, "state_bytes": nbytes, "params": nparams, "bits": bits,
                    "avg_bits": sched.average_bits() if sched else None,
                    "scheduler_bits": dict(sched.current()) if sched else None,
                    "decisions": len(sched.history) if sched else None,
                    "expert": bool(getattr(opt, "is_expert_parallel", False)
                                   or any(g.get("is_expert_parallel") for g in inner.param_groups))})  # fmt: skip
    return out


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextlib.contextmanager
def _measured(kind: str):
    """Record the wall time of a checkpoint save or load and this process's peak resident memory during
    it (sampled every 2 ms by a thread; ``rss_before``: just before), in ``_REC[kind]``."""
    before, peak, done = _rss(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss())
            done.wait(0.002)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    t0 = time.perf_counter()
    try:
        yield
    finally:
        seconds = time.perf_counter() - t0
        done.set()
        t.join()
        peak[0] = max(peak[0], _rss())
        _REC[kind].append({"seconds": seconds, "rss_before": before, "rss_peak": peak[0]})
        _flush_record()


def _install_workarounds() -> None:
    import typing

    import typing_extensions

    if not hasattr(typing, "override"):  # 1. Python 3.11
        typing.override = typing_extensions.override
    helpers = ensure_helpers_cpp()  # 4. (before megatron.core.datasets.helpers is imported)
    spec = importlib.util.spec_from_file_location("megatron.core.datasets.helpers_cpp", helpers)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules["megatron.core.datasets.helpers_cpp"] = module

    import torch

    from stquant_megatron.testing.cpu_shim import install_cpu_shim

    install_cpu_shim()  # 2.

    import megatron.core.datasets.utils as dsutils
    import megatron.training.arguments as margs
    import megatron.training.initialize as minit
    import megatron.training.training as mtrain
    from megatron.core.dist_checkpointing.strategies import filesystem_async as fa

    from stquant_megatron.testing import gpt

    dsutils.compile_helpers = lambda: None  # 4. nothing to `make`
    start_async_worker = minit.init_persistent_async_worker
    minit.init_persistent_async_worker = lambda rank, mp_mode="spawn": start_async_worker(rank, "fork")  # 10.
    from stquant_megatron.testing import cpu_shim

    cpu_shim.PRELOAD["orig"] = fa.FileSystemWriterAsync.preload_tensors
    fa.FileSystemWriterAsync.preload_tensors = staticmethod(cpu_shim.preload_copies)  # 10.
    margs.get_device_arch_version = lambda: 9  # 7. (Hopper: TP needs CUDA_DEVICE_MAX_CONNECTIONS=1)

    def no_cuda(orig):  # 3.
        @functools.wraps(orig)
        def initialize_megatron(*args, **kwargs):
            kwargs["allow_no_cuda"] = True
            return orig(*args, **kwargs)

        return initialize_megatron

    minit.initialize_megatron = no_cuda(minit.initialize_megatron)
    mtrain.initialize_megatron = no_cuda(mtrain.initialize_megatron)

    orig_queue = fa.get_write_results_queue  # 5.
    fa.get_write_results_queue = functools.wraps(orig_queue)(lambda mp_mode="spawn": orig_queue("fork"))

    orig_load = mtrain.load_checkpoint  # 6a.

    @functools.wraps(orig_load)
    def load_checkpoint(model, optimizer, *args, **kwargs):
        if optimizer is not None:
            gpt.init_stock_adam_state(optimizer)
        with _measured("loads"):
            out = orig_load(model, optimizer, *args, **kwargs)
        if optimizer is not None:  # 6b.
            gpt.restore_stock_adam_steps(optimizer)
        return out

    mtrain.load_checkpoint = load_checkpoint

    orig_save = mtrain.save_checkpoint  # recording: time and host memory of each save

    @functools.wraps(orig_save)
    def save_checkpoint(*args, **kwargs):
        with _measured("saves"):
            return orig_save(*args, **kwargs)

    mtrain.save_checkpoint = save_checkpoint

    # 9. Without Transformer Engine, CLIPViTModel's default ``ln_pre_impl`` is ``torch.nn.LayerNorm``,
    # which it then builds with Megatron's ``config=`` keyword (TypeError in megatron-core 0.19.2);
    # Megatron's own torch-norm wrapper takes that signature.
    import megatron.core.models.vision.clip_vit_model as clip
    from megatron.core.transformer.torch_norm import WrappedTorchNorm

    init = clip.CLIPViTModel.__init__
    if init.__defaults__ and torch.nn.LayerNorm in init.__defaults__:
        init.__defaults__ = tuple(WrappedTorchNorm if d is torch.nn.LayerNorm else d for d in init.__defaults__)

    # ---- recording (not a workaround)
    orig_setup = mtrain.setup_model_and_optimizer

    @functools.wraps(orig_setup)
    def setup_model_and_optimizer(*args, **kwargs):
        out = orig_setup(*args, **kwargs)
        _STATE["optimizer"] = out[1]
        return out

    mtrain.setup_model_and_optimizer = setup_model_and_optimizer

    orig_fb = mtrain.get_forward_backward_func

    @functools.wraps(orig_fb)
    def get_forward_backward_func(*args, **kwargs):
        fb = orig_fb(*args, **kwargs)

        @functools.wraps(fb)
        def forward_backward(*a, **k):
            losses = fb(*a, **k)
            if losses and not k.get("forward_only"):
                # per microbatch {'lm loss': [sum over tokens, tokens]} of this rank, pre all-reduce
                tot = [0.0, 0.0]
                for d in losses:
                    v = d.get("lm loss")
                    if torch.is_tensor(v) and v.numel() == 2:
                        tot[0] += float(v[0])
                        tot[1] += float(v[1])
                if tot[1]:
                    _REC["local_losses"].append(tot[0] / tot[1])
            return losses

        return forward_backward

    mtrain.get_forward_backward_func = get_forward_backward_func

    orig_log = mtrain.training_log

    @functools.wraps(orig_log)
    def training_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                     skipped_iter, grad_norm, *args, **kwargs):  # fmt: skip
        _REC["iterations"].append({
            "iteration": int(iteration), "skipped": int(skipped_iter), "grad_norm": _float(grad_norm),
            "losses": {k: _float(v) for k, v in loss_dict.items()},
        })  # fmt: skip
        out = orig_log(loss_dict, total_loss_dict, learning_rate, iteration, loss_scale, report_memory_flag,
                       skipped_iter, grad_norm, *args, **kwargs)  # fmt: skip
        _flush_record()
        return out

    mtrain.training_log = training_log

    orig_pretrain = mtrain.pretrain

    @functools.wraps(orig_pretrain)
    def pretrain(*args, **kwargs):
        try:
            out = orig_pretrain(*args, **kwargs)
        finally:
            _flush_record()  # what was logged so far, also when training failed
        if _STATE["optimizer"] is not None:
            _REC["optimizers"] = _optimizer_summary(_STATE["optimizer"])
            nbytes = sum(o["state_bytes"] for o in _REC["optimizers"])
            nparams = sum(o["params"] for o in _REC["optimizers"])
            print(f"[stquant-lm] rank {os.environ.get('RANK', '0')}: optimizer state {nbytes} B for "
                  f"{nparams} params on this rank = {nbytes / max(1, nparams):.3f} B/param "
                  f"({', '.join(o['inner'] for o in _REC['optimizers'])})", flush=True)  # fmt: skip
        _flush_record()
        return out

    mtrain.pretrain = pretrain
    import megatron.training as mt

    mt.pretrain = pretrain  # `from megatron.training import pretrain` in the scripts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--route", choices=("launch", "script"), default="script",
                        help="launch: python -m stquant_megatron.launch SCRIPT; script: run SCRIPT as is")  # fmt: skip
    parser.add_argument("script")
    parser.add_argument("args", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    script = os.path.abspath(ns.script)
    sys.path.insert(0, os.path.dirname(script))  # as `python SCRIPT` would (gpt_builders, ...)
    _install_workarounds()
    if ns.route == "launch":
        from stquant_megatron import launch

        launch.main([script, *ns.args])
    else:
        import runpy

        sys.argv = [script, *ns.args]
        runpy.run_path(script, run_name="__main__")


# ------------------------------------------------------------------------------------ the runner
class MegatronLMError(RuntimeError):
    """A rank failed; the message carries the tail of every rank's log."""


@dataclasses.dataclass
class LMRun:
    """What ``run_megatron_lm`` returns: per-rank records (see the module doc) and logs."""

    records: list[dict]
    logs: list[str]
    wall_s: float
    command: list[str]

    def losses(self, rank: int = -1, key: str = "lm loss") -> list[float]:
        """Per-iteration DP-reduced loss as logged by Megatron (on the last rank by default)."""
        return [it["losses"][key] for it in self.records[rank]["iterations"] if key in it["losses"]]

    def grad_norms(self, rank: int = -1) -> list[float]:
        return [it["grad_norm"] for it in self.records[rank]["iterations"]]

    def iterations(self, rank: int = -1) -> list[int]:
        return [it["iteration"] for it in self.records[rank]["iterations"]]

    def bytes_per_param(self) -> float:
        """Optimizer-state bytes over all ranks / parameters over all ranks (each shard once)."""
        opts = [o for r in self.records for o in (r["optimizers"] or [])]
        return sum(o["state_bytes"] for o in opts) / max(1, sum(o["params"] for o in opts))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_megatron_lm(script: str, args: list[str], *, nproc: int = 2, route: str = "script",
                    patches: bool = False, workdir: str, env: dict | None = None,
                    timeout: float = 600) -> LMRun:  # fmt: skip
    """Run Megatron-LM ``script`` (a name in ``FIXTURES`` or a path) with ``nproc`` gloo ranks.

    ``route``: ``"launch"`` (``python -m stquant_megatron.launch SCRIPT``) or ``"script"``;
    ``patches``: put ``patches/`` first on ``PYTHONPATH`` (the sitecustomize route).
    megatron-core comes from the caller's ``PYTHONPATH`` (the 0.19.x sources: ``STQUANT_MCORE_019``
    is put first when set). Logs and records go to ``workdir``.
    """
    if route not in ("launch", "script"):
        raise ValueError(f"route must be 'launch' or 'script', got {route!r}")
    path = script if os.path.isabs(script) else os.path.join(FIXTURES, script)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"Megatron-LM script {path} not found (set STQUANT_MEGATRON_LM)")
    os.makedirs(workdir, exist_ok=True)
    record = os.path.join(workdir, "record")
    os.makedirs(record, exist_ok=True)
    for f in os.listdir(record):
        os.remove(os.path.join(record, f))
    pkg_root = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
    pythonpath = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    mcore = os.environ.get("STQUANT_MCORE_019")
    lead = ([PATCHES] if patches else []) + ([mcore] if mcore else []) + [pkg_root]
    pythonpath = lead + [p for p in pythonpath if p not in lead and os.path.abspath(p) != PATCHES]
    base = {**os.environ, **(env or {})}
    if not patches:
        base["STQUANT_DISABLE"] = "1"  # a patches/ dir inherited from the caller must not act
    base.update(PYTHONPATH=os.pathsep.join(pythonpath), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE=str(nproc), CUDA_DEVICE_MAX_CONNECTIONS="1", STQUANT_LM_RECORD=record,
                TORCHDYNAMO_DISABLE=base.get("TORCHDYNAMO_DISABLE", "1"),
                OMP_NUM_THREADS=base.get("OMP_NUM_THREADS", "1"), PYTHONUNBUFFERED="1")  # fmt: skip
    ensure_helpers_cpp()  # once, here, rather than racing in every rank
    cmd = [sys.executable, "-m", "stquant_megatron.testing.megatron_lm", "--route", route, path, *args]
    procs, logs = [], []
    start = time.time()
    for rank in range(nproc):
        log = open(os.path.join(workdir, f"rank{rank}.log"), "w")
        logs.append(log)
        procs.append(subprocess.Popen(cmd, cwd=workdir, stdout=log, stderr=subprocess.STDOUT,
                                      env={**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}))  # fmt: skip
    failed = None
    try:
        for rank, p in enumerate(procs):
            left = max(1.0, timeout - (time.time() - start))
            try:
                if p.wait(timeout=left) != 0 and failed is None:
                    failed = f"rank {rank} exited with {p.returncode}"
            except subprocess.TimeoutExpired:
                failed = f"timed out after {timeout:.0f} s"
                break
            if failed:
                break
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        for log in logs:
            log.close()
    texts = []
    for rank in range(nproc):
        with open(os.path.join(workdir, f"rank{rank}.log")) as f:
            texts.append(f.read())
    if failed:
        tails = "\n".join(f"----- rank {r} (last lines) -----\n" + "\n".join(t.splitlines()[-40:])
                          for r, t in enumerate(texts))  # fmt: skip
        raise MegatronLMError(f"{os.path.basename(path)} {failed}: {' '.join(cmd)}\n{tails}")
    records = []
    for rank in range(nproc):
        with open(os.path.join(record, f"rank{rank}.json")) as f:
            records.append(json.load(f))
    return LMRun(records=records, logs=texts, wall_s=time.time() - start, command=cmd)


if __name__ == "__main__":
    main()
