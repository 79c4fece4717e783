#!/usr/bin/env python
"""The first day a GPU is lent, in one run (driven by ``benchmarks/gpu_day.sh``; see docs/gpu.md).

    python benchmarks/gpu_day.py [--dry-run] [--out DIR] [--iters N]

Stages, each in its own process (a failing stage is recorded and the next one still runs):

(a) ``parity``: ``tests/test_gpu_parity.py``, the compiled kernels on the GPU vs the CPU twin, bit for bit;
(b) ``step``: ``benchmarks/gpu_step.py`` (achieved GB/s against the device's peak, peers side by side);
(c) ``gpt``: megatron-core GPT on 1 GPU (``stquant_megatron.testing.gpt``), stock DistributedOptimizer vs
    patched at fixed 4 and 8 bits and the default config, one fresh process each: peak CUDA memory
    (``torch.cuda.max_memory_allocated``), median optimizer-step time, loss after ``--iters`` (50)
    iterations; Transformer Engine layers when TE imports, local layers otherwise; and the optimizer's own
    ``peak_state_bytes()`` against the CUDA allocation its state took (issue 20);
(d) a summary, printed last; every result is JSON under ``--out`` (``summary.json`` plus one file per stage).

``--dry-run``: the same stages on the CPU at a tiny size (Triton interpreter, gloo, the CPU shim): what
CI runs. Without CUDA and without ``--dry-run`` it refuses (exit 2). Exit 1 when a stage failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

REFUSAL = (
    "gpu_day needs a CUDA GPU, but torch.cuda.is_available() is False (torch {version}, CUDA build: {cuda}). "
    "On a CPU machine: `bash benchmarks/gpu_day.sh --dry-run` (the same code paths, tiny, no timing), or "
    "`bash benchmarks/gpu_day.sh --fetch-wheels` to prepare the wheels a GPU run needs."
)
# (name, STQuantConfig keyword arguments or None for stock)
GPT_CONFIGS = [("stock", None), ("stq4", {"bits": 4}), ("stq8", {"bits": 8}), ("stq_default", {})]
STAGE_TIMEOUT_S = {"parity": 300, "step": 150, "gpt": 90}  # per stage process (GPU); x3 on the dry run


def _env(dry: bool) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    if dry:
        env["TRITON_INTERPRET"] = "1"
        env.setdefault("OMP_NUM_THREADS", "1")
    else:
        env.pop("TRITON_INTERPRET", None)
    return env


def _run(name: str, cmd: list[str], out: str, dry: bool, timeout: float) -> dict:
    """Run one stage process; its output goes to ``out/<name>.log`` and (tail) to the console."""
    t0 = time.perf_counter()
    log = os.path.join(out, f"{name}.log")
    print(f"[gpu_day] {name}: {' '.join(cmd)}", flush=True)
    try:
        r = subprocess.run(cmd, cwd=ROOT, env=_env(dry), capture_output=True, text=True, timeout=timeout)
        rc, text = r.returncode, r.stdout + r.stderr
    except subprocess.TimeoutExpired as e:
        rc = 124
        text = f"{e.stdout or ''}{e.stderr or ''}\n[gpu_day] {name}: timed out after {timeout:.0f} s"
        text = text if isinstance(text, str) else text.decode(errors="replace")
    with open(log, "w") as f:
        f.write(text)
    tail = "\n".join(text.strip().splitlines()[-12:])
    print(tail, flush=True)
    return {"stage": name, "rc": rc, "ok": rc == 0, "wall_s": round(time.perf_counter() - t0, 1), "log": log}


# ------------------------------------------------------------------------------------------- (a) parity
def stage_parity(args) -> dict:
    junit = os.path.join(args.out, "parity.junit.xml")
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", os.path.join("tests", "test_gpu_parity.py"),
           f"--junitxml={junit}"]  # fmt: skip
    if args.dry_run:  # one of each kind of comparison, tiny, under the interpreter
        cmd += ["-k", "mode or detects or every_codebook or group_launch or factored_step"]
    res = _run("parity", cmd, args.out, args.dry_run, STAGE_TIMEOUT_S["parity"] * (3 if args.dry_run else 1))
    res.update(_junit_counts(junit))
    return res


def _junit_counts(path: str) -> dict:
    import xml.etree.ElementTree as ET

    if not os.path.exists(path):
        return {"tests": None}
    root = ET.parse(path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    keys = ("tests", "failures", "errors", "skipped")
    out = {k: int(suite.get(k, 0)) for k in keys}
    out["failed_tests"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                           if c.find("failure") is not None or c.find("error") is not None][:20]  # fmt: skip
    return out


# ------------------------------------------------------------------------------------------- (b) step
def stage_step(args) -> dict:
    js = os.path.join(args.out, "gpu_step.json")
    cmd = [sys.executable, os.path.join("benchmarks", "gpu_step.py"), "--json", js]
    cmd += ["--interpret-check"] if args.dry_run else ["--steps", "10", "--warmup", "2"] + (["--quick"] if args.quick else [])
    res = _run("step", cmd, args.out, args.dry_run, STAGE_TIMEOUT_S["step"] * (3 if args.dry_run else 1))
    if os.path.exists(js):
        with open(js) as f:
            step = json.load(f)
        res["device"], res["peak_bandwidth_Bps"], res["params"] = step["device"], step["peak_bandwidth_Bps"], step["params"]
        res["rows"] = [{k: r.get(k) for k in ("optimizer", "bits", "step_ms_median", "achieved_GBps", "fraction_of_peak",
                                               "step_time_vs_adamw", "skipped")} for r in step["rows"]]  # fmt: skip
    return res


# ------------------------------------------------------------------------------------------- (c) gpt
def gpt_sizes(dry: bool) -> dict:
    if dry:
        return dict(num_layers=2, hidden_size=64, num_attention_heads=4, seq_length=32, micro_batch_size=2)
    return dict(num_layers=12, hidden_size=1024, num_attention_heads=16, seq_length=512, micro_batch_size=8)


def _te_spec():
    """The Transformer Engine layer spec when TE imports, else None (local layers)."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        return get_gpt_layer_with_transformer_engine_spec(), "transformer_engine"
    except Exception as exc:  # noqa: BLE001 (absent or broken TE: local layers)
        return None, f"local ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"


def gpt_child(name: str, out_path: str, iters: int, dry: bool) -> None:
    """One configuration in this (fresh) process, world size 1: written to ``out_path`` as JSON."""
    import warnings

    import torch
    import torch.distributed as dist

    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE) .*not installed.*")
    from stquant_megatron import STQuantConfig
    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    cuda = torch.cuda.is_available() and not dry
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 2000))
    os.environ.setdefault("CUDA_DEVICE_MAX_CONNECTIONS", "1")
    if cuda:
        torch.cuda.set_device(0)
    dist.init_process_group("cpu:gloo,cuda:nccl" if cuda else "gloo", rank=0, world_size=1)
    init_megatron_parallel(1, 1, seed=1234, cpu_shim=not cuda)
    cfg = dict(GPT_CONFIGS)[name]
    if cfg is None:
        unpatch()
    else:
        # backend "auto": Triton on CUDA; the twin in the dry run (the interpreter's Triton step is the
        # parity and step stages' business: here it would take ~20 s per iteration)
        patch(STQuantConfig(**cfg))
    size = gpt_sizes(dry)
    spec, layers = _te_spec() if cuda else (None, "local (dry run)")
    mem = (lambda: torch.cuda.memory_allocated()) if cuda else (lambda: None)  # noqa: E731
    model = gpt.build_gpt_model(
        num_layers=size["num_layers"], hidden_size=size["hidden_size"], num_attention_heads=size["num_attention_heads"],
        seq_length=size["seq_length"], bf16=True, layer_spec=spec, cuda=cuda,
        ddp_overrides={"use_distributed_optimizer": True},
    )  # fmt: skip
    optimizer = gpt.build_optimizer(model, lr=1e-3, weight_decay=0.01, clip_grad=1.0, use_distributed_optimizer=True)
    inners = [mo.optimizer for mo in gpt.distributed_optimizers(optimizer)]
    inner_types = sorted({type(o).__name__ for o in inners})
    if cfg is not None and inner_types != ["STQuantAdamW"]:
        raise RuntimeError(f"patch did not install STQuantAdamW (inner optimizers: {inner_types})")
    nparams = sum(p.numel() for p in model[0].parameters())

    step_ms: list[float] = []
    inner_step = optimizer.step

    def timed_step(*a, **kw):  # the optimizer step alone (grad norm, clip, inner step, param gather)
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        r = inner_step(*a, **kw)
        if cuda:
            torch.cuda.synchronize()
        step_ms.append((time.perf_counter() - t) * 1e3)
        return r

    optimizer.step = timed_step
    dev = torch.device("cuda") if cuda else torch.device("cpu")
    losses, mem_before_first, mem_after_first, first_peak = [], None, None, None
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for it in range(iters):
        mbs = gpt.get_microbatches(it, micro_batch_size=size["micro_batch_size"], seq_length=size["seq_length"])
        mbs = [{k: v.to(dev) for k, v in mb.items()} for mb in mbs]
        if it == 0:
            mem_before_first = mem()
        out = gpt.train_step(model, optimizer, mbs)
        if it == 0:
            mem_after_first = mem()
            first_peak = torch.cuda.max_memory_allocated() if cuda else None
        losses.append(out["loss"])
    wall = time.perf_counter() - t0
    from quality import state_bytes  # every storage reachable from the inner optimizers' state

    own_peak = sum(int(o.peak_state_bytes()) for o in inners) if all(hasattr(o, "peak_state_bytes") for o in inners) else None
    storages = sum(state_bytes(o) for o in inners)
    res = dict(
        config=name, stquant=cfg, inner=inner_types, layers=layers, params=nparams, iters=iters, **size,
        loss_first=losses[0], loss_last=losses[-1], losses=losses, wall_s=round(wall, 2),
        step_ms_median=round(statistics.median(step_ms[min(5, len(step_ms) - 1):]), 3), step_ms_first=round(step_ms[0], 1),
        max_memory_allocated=torch.cuda.max_memory_allocated() if cuda else None,
        state_bytes_storages=storages, peak_state_bytes_own=own_peak,
        state_alloc_first_step=None if mem_before_first is None else mem_after_first - mem_before_first,
        peak_during_first_step=None if first_peak is None else first_peak - mem_before_first,
        device=torch.cuda.get_device_name() if cuda else "cpu (dry run)",
    )  # fmt: skip
    if res["state_alloc_first_step"] and own_peak:
        res["own_peak_vs_cuda_state_alloc"] = round(own_peak / res["state_alloc_first_step"], 4)
    with open(out_path, "w") as f:
        json.dump(res, f, indent=1)
    dist.destroy_process_group()


def stage_gpt(args) -> dict:
    rows, runs = [], []
    for name, _ in GPT_CONFIGS:
        js = os.path.join(args.out, f"gpt_{name}.json")
        if os.path.exists(js):
            os.remove(js)
        cmd = [sys.executable, os.path.abspath(__file__), "--gpt-child", name, "--json", js, "--iters", str(args.iters)]
        cmd += ["--dry-run"] if args.dry_run else []
        r = _run(f"gpt_{name}", cmd, args.out, args.dry_run, STAGE_TIMEOUT_S["gpt"] * (3 if args.dry_run else 1))
        runs.append(r)
        if os.path.exists(js):
            with open(js) as f:
                row = json.load(f)
            row.pop("losses", None)
            rows.append(row)
    stock = next((r for r in rows if r["config"] == "stock"), None)
    for r in rows:
        if stock and r["max_memory_allocated"] and stock["max_memory_allocated"]:
            r["memory_vs_stock"] = round(r["max_memory_allocated"] / stock["max_memory_allocated"], 4)
        if stock:
            r["step_time_vs_stock"] = round(r["step_ms_median"] / stock["step_ms_median"], 3)
    ok = all(r["ok"] for r in runs) and len(rows) == len(GPT_CONFIGS)
    return {"stage": "gpt", "ok": ok, "rc": 0 if ok else 1, "wall_s": round(sum(r["wall_s"] for r in runs), 1),
            "runs": runs, "rows": rows}  # fmt: skip


# ------------------------------------------------------------------------------------------- (d) summary
def _mib(x):
    return "-" if x is None else f"{x / 2**20:.1f}"


def summary_lines(s: dict) -> list[str]:
    out = [f"== gpu_day summary ({'DRY RUN, CPU: numbers mean nothing' if s['dry_run'] else s['device']}) ==",
           f"torch {s['versions']['torch']}  triton {s['versions']['triton']}  python {s['versions']['python']}  "
           f"megatron-core {s['versions']['megatron_core']}  wall {s['wall_s']} s"]  # fmt: skip
    for st in s["stages"]:
        out.append(f"[{'OK' if st['ok'] else 'FAILED'}] {st['stage']} ({st['wall_s']} s)")
        if st["stage"] == "parity":
            out.append(f"    {st.get('tests')} tests, {st.get('failures')} failures, {st.get('errors')} errors, "
                       f"{st.get('skipped')} skipped" + (f"; failed: {st['failed_tests']}" if st.get("failed_tests") else ""))
        if st["stage"] == "step":
            peak = st.get("peak_bandwidth_Bps")
            out.append(f"    {st.get('device')}, {st.get('params')} params, peak "
                       + (f"{peak / 1e12:.2f} TB/s" if peak else "unknown"))  # fmt: skip
            for r in st.get("rows", []):
                if r.get("skipped"):
                    out.append(f"    {r['optimizer']:<28} {r['bits']:>7}  skipped: {r['skipped'][:80]}")
                else:
                    frac = r.get("fraction_of_peak")
                    out.append(f"    {r['optimizer']:<28} {r['bits']:>7}  {r['step_ms_median']:9.3f} ms  "
                               f"{r['achieved_GBps']:8.1f} GB/s" + (f"  {frac:6.1%} of peak" if frac else ""))
        if st["stage"] == "gpt":
            rows = st.get("rows", [])
            if rows:
                out.append(f"    layers: {rows[0]['layers']}; {rows[0]['params']} params; loss after {rows[0]['iters']} iterations")
                out.append(f"    {'config':<12} {'inner':<22} {'max alloc MiB':>13} {'step ms':>9} {'loss':>8} "
                           f"{'own peak state MiB':>18} {'CUDA state MiB':>14}")
                for r in rows:
                    out.append(f"    {r['config']:<12} {','.join(r['inner']):<22} {_mib(r['max_memory_allocated']):>13} "
                               f"{r['step_ms_median']:9.2f} {r['loss_last']:8.4f} {_mib(r['peak_state_bytes_own']):>18} "
                               f"{_mib(r['state_alloc_first_step']):>14}")
    out.append("gpu_day: " + ("all stages passed" if s["ok"] else "SOME STAGES FAILED") + f"; results in {s['out']}")
    return out


def versions() -> dict:
    import torch

    def ver(mod):
        try:
            return __import__(mod).__version__
        except Exception:  # noqa: BLE001
            return None

    try:
        from megatron.core import package_info

        mc = package_info.__version__
    except Exception:  # noqa: BLE001
        mc = None
    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "triton": ver("triton"), "megatron_core": mc, "torchao": ver("torchao"), "bitsandbytes": ver("bitsandbytes"),
            "transformer_engine": ver("transformer_engine")}  # fmt: skip


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dry-run", action="store_true", help="CPU, interpreter, gloo, tiny sizes: the code paths only")
    ap.add_argument("--out", default=os.path.join(ROOT, ".gpu_day", "results"), help="results folder (re-used)")
    ap.add_argument("--iters", type=int, help="GPT iterations (default 50; the dry run 3)")
    ap.add_argument("--quick", action="store_true", help="gpu_step.py --quick (2.6e6 params instead of 1e9)")
    ap.add_argument("--stages", default="parity,step,gpt", help="comma-separated subset of parity,step,gpt")
    ap.add_argument("--gpt-child", help=argparse.SUPPRESS)
    ap.add_argument("--json", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.iters = args.iters or (3 if args.dry_run else 50)
    if args.gpt_child:
        sys.path.insert(0, HERE)
        gpt_child(args.gpt_child, args.json, args.iters, args.dry_run)
        return 0
    import torch

    if not args.dry_run and not torch.cuda.is_available():
        print(REFUSAL.format(version=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    os.makedirs(args.out, exist_ok=True)
    t0 = time.perf_counter()
    stages = []
    for name in [s.strip() for s in args.stages.split(",") if s.strip()]:
        fn = {"parity": stage_parity, "step": stage_step, "gpt": stage_gpt}[name]
        st = fn(args)
        stages.append(st)
        with open(os.path.join(args.out, f"{name}.json"), "w") as f:
            json.dump(st, f, indent=1)
    s = {"dry_run": args.dry_run, "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
         "versions": versions(), "wall_s": round(time.perf_counter() - t0, 1), "out": args.out,
         "ok": all(st["ok"] for st in stages), "stages": stages}  # fmt: skip
    with open(os.path.join(args.out, "summary.json"), "w") as f:
        json.dump(s, f, indent=1)
    print("\n" + "\n".join(summary_lines(s)), flush=True)
    return 0 if s["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
