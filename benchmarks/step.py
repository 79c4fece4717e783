#!/usr/bin/env python
"""Optimizer-step benchmark: state bytes per parameter and step time, every optimizer in one process.

On one parameter set with transformer-like shapes (an embedding ``[vocab, h]``; per layer
``qkv [3h, h]``, ``proj [h, h]``, ``fc1 [4h, h]``, ``fc2 [h, 4h]`` and two norms ``[h]``; a final
norm) it measures, for each optimizer:

- optimizer-state bytes per parameter, counted from the tensors actually allocated (every tensor in
  the optimizer's state, tensor subclasses opened into their inner tensors, each storage counted
  once; ours: ``optimizer.state_bytes()``);
- the first step (state allocation, and ``torch.compile`` where an optimizer compiles), then
  ``--warmup`` warm-up steps, then the median of ``--steps`` timed steps. Every optimizer gets its
  own copy of the same initial parameters and the same fixed synthetic gradients (randn * 1e-3).
  The timed steps run in rounds, one step of every optimizer per round in a rotating order, so that
  load from other processes on a noisy machine spreads evenly over the optimizers.

Next to it, the bytes-moved-per-parameter model of a GPU step (``gpu_bytes_per_param``; the step is
memory-bound, so the expected GPU speedup over fp32 Adam is 28 / bytes). No GPU is timed here.

    python benchmarks/step.py --quick                 # ~2.6M parameters
    python benchmarks/step.py                         # ~23M parameters (default)
    python benchmarks/step.py --params 50e6 --json out.json

``--json PATH`` writes ``{"params": int, "rows": [{"optimizer", "bits", "state_bytes_per_param",
"step_ms_median", "step_time_vs_adamw", ...}]}``; ``step_time_vs_adamw`` is the ratio to
``torch.optim.AdamW(fused=True)`` measured in the same run. Rows that could not run are printed with
the reason and left out of the JSON.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import statistics
import sys
import time
import traceback
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402  (benchmarks/ is a script folder, not a package)

LR, BETAS, EPS, WEIGHT_DECAY = 1e-3, (0.9, 0.999), 1e-8, 0.01
BASELINE = "torch.AdamW(fused)"


# ----------------------------------------------------------------------------------- GPU model
def gpu_bytes_per_param(bits_m: int, bits_v: int, block: int | None, scale_bytes: int = 4) -> float:
    """HBM bytes moved per parameter by one fused optimizer step (memory-bound model).

    bytes = 12                              fixed: fp32 master param read + write (4 + 4), grad read (4)
          + 2 * (bits_m + bits_v) / 8       both moments' codes, read + write
          + 2 * 2 * scale_bytes / block     both moments' block scales, read + write

    fp32 Adam: bits 32/32, no scales -> 12 + 16 = 28 B. Ours at b bits, block 128, fp32 scales:
    12 + b/4 + 0.125 (4 bits: 14.125 B). 8-bit peers: 12 + 4 + scales; 4-bit peers: 12 + 2 + scales.
    Codebooks / qmaps (<= 1 KiB, cached) and fp32 escapes (norms, < 0.1% of parameters) are ignored.
    """
    fixed = 4 + 4 + 4
    moments = 2 * (bits_m + bits_v) / 8
    scales = 0.0 if block is None else 2 * 2 * scale_bytes / block
    return fixed + moments + scales


FP32_ADAM_BYTES = gpu_bytes_per_param(32, 32, None)  # 28


def ours_formula_bytes(bits: int, block: int = 128, scale_bytes: int = 4) -> float:
    """Expected packed state bytes per parameter: 2 moments x (b/8 + scale_bytes/block)."""
    return 2 * (bits / 8 + scale_bytes / block)


# ----------------------------------------------------------------------------------- parameters
def transformer_shapes(vocab: int, hidden: int, layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """GPT-like shapes (bias-free linears, norm weights): big matrices plus tiny fp32 escapes."""
    h = hidden
    shapes: list[tuple[str, tuple[int, ...]]] = [("embed", (vocab, h))]
    for i in range(layers):
        shapes += [
            (f"l{i}.norm1", (h,)), (f"l{i}.qkv", (3 * h, h)), (f"l{i}.proj", (h, h)),
            (f"l{i}.norm2", (h,)), (f"l{i}.fc1", (4 * h, h)), (f"l{i}.fc2", (h, 4 * h)),
        ]  # fmt: skip
    shapes.append(("final_norm", (h,)))
    return shapes


def pick_sizes(target: float) -> tuple[int, int, int]:
    """(vocab, hidden, layers) with about ``target`` parameters."""
    hidden = 256 if target < 8e6 else 512 if target < 80e6 else 1024
    vocab = 4096 if target < 8e6 else 8192
    layers = max(1, round((target - vocab * hidden) / (12 * hidden * hidden)))
    return vocab, hidden, layers


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


# ----------------------------------------------------------------------------------- state bytes
def _tensor_storages(t: torch.Tensor, out: dict[int, int]) -> None:
    """Real storages behind ``t`` (tensor subclasses opened via ``__tensor_flatten__``)."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            _tensor_storages(getattr(t, name), out)
        return
    s = t.untyped_storage()
    out[s.data_ptr()] = s.nbytes()


def _walk(obj: Any, out: dict[int, int]) -> None:
    if torch.is_tensor(obj):
        _tensor_storages(obj, out)
    elif isinstance(obj, dict):
        for v in obj.values():
            _walk(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _walk(v, out)
    elif hasattr(obj, "codes") and hasattr(obj, "scale"):  # PackedState-like: its storage tensors
        _walk(obj.codes, out)
        _walk(obj.scale, out)


def walked_state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every distinct storage reachable from ``opt.state`` (codes, scales, qmaps, absmax,
    moments, step counters); storages shared between parameters (e.g. bnb's qmap) count once."""
    storages: dict[int, int] = {}
    for st in opt.state.values():
        _walk(st, storages)
    return sum(storages.values())


def ours_packed_split(opt) -> tuple[int, int]:
    """(bytes, numel) of our packed units only (codes + scales), without fp32 escapes and counters."""
    from stquant_megatron import PackedState

    nbytes = n = 0
    for st in opt.state.values():
        for v in st.values():
            if isinstance(v, PackedState):
                nbytes += v.nbytes
                n += v.numel
    return nbytes, n // 2  # two moments per parameter


# ----------------------------------------------------------------------------------- optimizers
@dataclass
class Spec:
    name: str
    bits: str
    make: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]
    model: tuple[int, int, int | None]  # (bits_m, bits_v, block) for gpu_bytes_per_param
    ours_bits: int | None = None
    note: str = ""


def specs(extras: bool) -> list[Spec]:
    def torch_adamw(**kw):
        return lambda ps: torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, **kw)

    def bnb_adamw8bit(ps):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

    def torchao(cls_name):
        def make(ps):
            import torchao.optim

            return getattr(torchao.optim, cls_name)(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)

        return make

    def ours(bits, **cfg):
        def make(ps):
            from stquant_megatron import STQuantAdamW, STQuantConfig

            config = STQuantConfig(bits=bits, backend="torch", **cfg)
            return STQuantAdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY, config=config)

        # the default config (compile=None: units of >= 2**18 elements compiled on the CPU; the first
        # step of each width combination includes the compile, reported as "first step ms")

        return make

    rows = [
        Spec(BASELINE, "32", torch_adamw(fused=True), (32, 32, None)),
        Spec("torch.AdamW(foreach)", "32", torch_adamw(foreach=True), (32, 32, None)),
        Spec("bnb.AdamW8bit", "8", bnb_adamw8bit, (8, 8, 256)),  # blockwise, 256 per absmax
        Spec("torchao.AdamW8bit", "8", torchao("AdamW8bit"), (8, 8, 256)),  # default block_size 256
        Spec("torchao.AdamW4bit", "4", torchao("AdamW4bit"), (4, 4, 128)),  # default block_size 128
    ]
    if extras:  # first of ours: its first step builds the 4/4-bit graphs (later rows of the process reuse them)
        rows.append(Spec("STQuantAdamW+compile", "4", ours(4, compile=True), (4, 4, 128), ours_bits=4,
                         note="compile=True: every unit compiled; first step includes compile"))  # fmt: skip
    for b in (8, 6, 5, 4, 3, 2):
        rows.append(Spec("STQuantAdamW", str(b), ours(b), (b, b, 128), ours_bits=b))
    if extras:
        rows.append(Spec("STQuantAdamW+sr", "4", ours(4, stochastic_rounding=True), (4, 4, 128), ours_bits=4,
                         note="stochastic rounding"))  # fmt: skip
        rows.append(Spec("STQuantAdamW eager", "4", ours(4, compile=False), (4, 4, 128), ours_bits=4,
                         note="compile=False: no unit compiled"))  # fmt: skip
    return rows


# ----------------------------------------------------------------------------------- measurement
@dataclass
class Result:
    spec: Spec
    ok: bool = False
    error: str = ""
    state_bytes: int = 0
    walked_bytes: int = 0
    first_ms: float = float("nan")
    step_ms: list[float] = field(default_factory=list)
    cpu_ms: list[float] = field(default_factory=list)
    packed: tuple[int, int] = (0, 0)
    opt: Any = None
    params: list = field(default_factory=list)
    first_graphs: int = 0  # torch.compile graphs built during the first step

    @property
    def median_ms(self) -> float:
        return statistics.median(self.step_ms) if self.step_ms else float("nan")

    def fail(self, e: BaseException) -> None:
        msg = f"{type(e).__name__}: {e}".strip().splitlines()
        self.ok, self.error = False, (msg[0][:160] if msg else type(e).__name__)
        self.opt, self.params = None, []
        if os.environ.get("STEP_BENCH_TRACEBACK"):
            traceback.print_exception(e)


def _graphs_compiled() -> int:
    """Graphs torch.compile has built in this process so far (dynamo's own counter)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def start(spec: Spec, masters: list[torch.Tensor], grads: list[torch.Tensor], warmup: int) -> Result:
    """Build ``spec``'s optimizer on a fresh copy of the parameters; time its first step; warm up.

    Every parameter set shares the same gradient tensors (no optimizer here writes its gradients;
    ``main`` checks they are unchanged at the end)."""
    res = Result(spec)
    res.params = [torch.nn.Parameter(m.clone()) for m in masters]
    for p, g in zip(res.params, grads):
        p.grad = g
    try:
        res.opt = spec.make(res.params)
        gc.collect()
        graphs = _graphs_compiled()
        t0 = time.perf_counter()
        res.opt.step()
        res.first_ms = (time.perf_counter() - t0) * 1e3
        res.first_graphs = _graphs_compiled() - graphs  # 0: the graphs came from an earlier row
        for _ in range(warmup):
            res.opt.step()
        res.ok = True
    except Exception as e:  # a peer that cannot run here gets a row saying why
        res.fail(e)
    gc.collect()
    return res


def timed_rounds(results: list[Result], steps: int) -> None:
    """``steps`` rounds; each round times one step of every optimizer, in a rotating order, so that
    load from other processes on a noisy machine spreads evenly over the optimizers."""
    for rnd in range(steps):
        live = [r for r in results if r.ok]
        k = rnd % max(1, len(live))
        gc.collect()
        gc.disable()  # no collector pauses inside the timed region
        try:
            for r in live[k:] + live[:k]:
                try:
                    c0, t0 = time.process_time(), time.perf_counter()
                    r.opt.step()
                    r.step_ms.append((time.perf_counter() - t0) * 1e3)
                    r.cpu_ms.append((time.process_time() - c0) * 1e3)
                except Exception as e:
                    r.fail(e)
        finally:
            gc.enable()
        print(f"  round {rnd + 1}/{steps} done", flush=True)


def finish(res: Result) -> None:
    """Count state bytes, check the parameters, release the optimizer."""
    if not res.ok:
        return
    try:
        if not all(bool(torch.isfinite(p).all()) for p in res.params):
            raise RuntimeError("parameters became non-finite")
        res.walked_bytes = walked_state_bytes(res.opt)
        if res.spec.ours_bits is not None:
            res.state_bytes = res.opt.state_bytes()
            res.packed = ours_packed_split(res.opt)
        else:
            res.state_bytes = res.walked_bytes
    except Exception as e:
        res.fail(e)
    res.opt, res.params = None, []
    gc.collect()


# ----------------------------------------------------------------------------------- report
def fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def table(results: list[Result], n_params: int) -> tuple[str, list[dict]]:
    base = next((r.median_ms for r in results if r.spec.name == BASELINE and r.ok), float("nan"))
    head = (
        f"{'optimizer':<22} {'bits':>4} {'state B/param':>13} {'step ms (med)':>13} {'vs fused AdamW':>14} "
        f"{'min ms':>9} {'CPU ms (med)':>12} {'first step ms':>13} | {'GPU B/param model':>17} {'GPU speedup (28/B)':>18}"
    )
    lines = [head, "-" * len(head)]
    rows = []
    for r in results:
        s = r.spec
        gpu = gpu_bytes_per_param(*s.model)
        if not r.ok:
            lines.append(
                f"{s.name:<22} {s.bits:>4} {'-':>13} {'-':>13} {'-':>14} {'-':>9} {'-':>12} {'-':>13} | {gpu:>17.3f} "
                f"{FP32_ADAM_BYTES / gpu:>17.2f}x   FAILED: {r.error}"
            )
            continue
        bpp = r.state_bytes / n_params
        ratio = r.median_ms / base
        lines.append(
            f"{s.name:<22} {s.bits:>4} {bpp:>13.4f} {r.median_ms:>13.1f} {fmt(ratio, '>13.2f')}x "
            f"{min(r.step_ms):>9.1f} {statistics.median(r.cpu_ms):>12.1f} {r.first_ms:>13.1f} | {gpu:>17.3f} {FP32_ADAM_BYTES / gpu:>17.2f}x"
        )
        rows.append({
            "optimizer": s.name, "bits": s.bits, "state_bytes_per_param": bpp, "step_ms_median": r.median_ms,
            "step_time_vs_adamw": ratio, "first_step_ms": r.first_ms, "first_step_graphs_compiled": r.first_graphs,
            "step_ms_min": min(r.step_ms), "step_ms_max": max(r.step_ms),
            "step_cpu_ms_median": statistics.median(r.cpu_ms), "step_ms_all": [round(t, 3) for t in r.step_ms],
            "gpu_bytes_per_param_model": gpu, "gpu_speedup_vs_fp32_adam_model": FP32_ADAM_BYTES / gpu,
        })  # fmt: skip
    return "\n".join(lines), rows


def memory_check(results: list[Result], n_params: int) -> tuple[str, bool]:
    """Ours: state bytes per parameter against 2 * (b/8 + 4/128), all-in and packed units only."""
    head = (
        f"{'ours':<22} {'bits':>4} {'2(b/8+4/128)':>12} {'all-in B/param':>14} {'dev':>7} "
        f"{'packed-only':>12} {'dev':>8} {'walk==state_bytes':>17} {'<1%':>4}"
    )
    lines, all_ok = [head, "-" * len(head)], True
    for r in results:
        b = r.spec.ours_bits
        if b is None or not r.ok:
            continue
        want = ours_formula_bytes(b)
        allin = r.state_bytes / n_params
        packed_bytes, packed_n = r.packed
        packed = packed_bytes / packed_n if packed_n else float("nan")
        dev_all, dev_packed = allin / want - 1, packed / want - 1
        ok = abs(dev_all) < 0.01
        all_ok &= ok
        lines.append(
            f"{r.spec.name:<22} {b:>4} {want:>12.4f} {allin:>14.4f} {dev_all:>+7.2%} {packed:>12.4f} "
            f"{dev_packed:>+8.3%} {str(r.walked_bytes == r.state_bytes):>17} {'yes' if ok else 'NO':>4}"
        )
    return "\n".join(lines), all_ok


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small run: ~2.6M parameters, fewer steps")
    ap.add_argument("--params", type=float, default=None, help="approximate parameter count (default 23M; quick 2.6M)")
    ap.add_argument("--warmup", type=int, default=None, help="warm-up steps after the first step (default 2; quick 1)")
    ap.add_argument("--steps", type=int, default=None, help="timed steps, median reported (default 7; quick 5)")
    ap.add_argument("--no-extras", action="store_true", help="skip ours+stochastic rounding and ours+compile rows")
    ap.add_argument("--only", default="", help="comma-separated substrings: run only matching optimizers (+ baseline)")
    ap.add_argument("--json", metavar="PATH", help="write the results as JSON")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=None,
                    help="torch.set_num_threads (default: torch's default). On a loaded machine 1 thread avoids "
                         "OpenMP barrier stalls that inflate op-heavy (eager) steps far more than fused ones")  # fmt: skip
    args = ap.parse_args(argv)

    t_start = time.perf_counter()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    target = args.params if args.params is not None else (2.6e6 if args.quick else 23e6)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    steps = args.steps if args.steps is not None else (5 if args.quick else 7)
    load_start = list(os.getloadavg())
    vocab, hidden, layers = pick_sizes(target)
    shapes = transformer_shapes(vocab, hidden, layers)
    n_params = sum(numel(s) for _, s in shapes)
    n_small = sum(numel(s) for _, s in shapes if numel(s) < 4096)

    gen = torch.Generator().manual_seed(args.seed)
    masters = [torch.randn(s, generator=gen) * (0.02 if len(s) > 1 else 1.0) for _, s in shapes]
    grads = [torch.randn(s, generator=gen) * 1e-3 for _, s in shapes]

    todo = specs(extras=not args.no_extras)
    if args.only:
        keys = [k.strip().lower() for k in args.only.split(",") if k.strip()]
        todo = [s for s in todo if s.name == BASELINE or any(k in f"{s.name} {s.bits}".lower() for k in keys)]

    print(
        f"parameters: {n_params:,} in {len(shapes)} tensors (vocab {vocab}, hidden {hidden}, layers {layers}; "
        f"{n_small:,} = {n_small / n_params:.3%} in tensors < 4096 elements: fp32 escapes)\n"
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, warm-up {warmup} + timed {steps} steps "
        f"per optimizer; grads randn*1e-3, lr {LR}, betas {BETAS}, eps {EPS}, weight_decay {WEIGHT_DECAY}",
        flush=True,
    )
    with warnings.catch_warnings():  # import the peers up front: their import-time chatter lands here
        warnings.simplefilter("ignore")
        for mod in ("bitsandbytes", "torchao.optim"):
            try:
                __import__(mod)
            except Exception as e:  # the row then fails with the reason
                print(f"(import {mod} failed: {type(e).__name__}: {e})", flush=True)
    grad_sums = [float(g.double().sum()) for g in grads]
    results = []
    print(f"phase 1: build, first step (allocation / compile), {warmup} warm-up steps", flush=True)
    for i, spec in enumerate(todo, 1):
        print(f"[{i}/{len(todo)}] {spec.name} bits={spec.bits} ...", end=" ", flush=True)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            r = start(spec, masters, grads, warmup)
        results.append(r)
        if r.ok:
            print(f"first step {r.first_ms:.0f} ms ({time.perf_counter() - t0:.1f}s)", flush=True)
        else:
            print(f"FAILED: {r.error}", flush=True)
    print(f"phase 2: {steps} timed rounds, one step of every optimizer per round", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed_rounds(results, steps)
    for r in results:
        finish(r)
    if [float(g.double().sum()) for g in grads] != grad_sums:
        print("WARNING: an optimizer modified the shared gradients; later rows saw different gradients")

    text, rows = table(results, n_params)
    check, check_ok = memory_check(results, n_params)
    print()
    print(text)
    print(
        "\nGPU model: bytes/param = 12 (param read+write 8, grad read 4) + 2*(b_m+b_v)/8 (codes read+write) "
        "+ 2*2*4/block (fp32 scales read+write); fp32 Adam = 28; speedup = 28 / bytes (memory-bound step)."
    )
    print("CPU ms: process CPU time of the step, all threads (less sensitive to other processes' load than wall time).")
    print("State bytes: storage actually allocated (codes, scales, qmaps/absmax, fp32 escapes, step counters).")
    print()
    print(check)
    print(f"memory check (all-in state bytes/param within 1% of 2*(b/8+4/128), every width): {'PASS' if check_ok else 'FAIL'}")
    wall = time.perf_counter() - t_start
    print(f"\ntotal wall time {wall:.1f}s")
    if args.json:
        prov = provenance(__file__, argv, deps=("step",))
        meta = {
            "command": prov["command"], "provenance": prov,
            "threads": torch.get_num_threads(), "torch": torch.__version__, "warmup": warmup, "steps": steps,
            "shapes": {"vocab": vocab, "hidden": hidden, "layers": layers, "tensors": len(shapes)},
            "load_average_start": load_start, "load_average_end": list(os.getloadavg()),
            "wall_seconds": wall, "memory_check_pass": check_ok, "hardware": prov["hardware"],
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"params": n_params, "rows": rows, "meta": meta}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
