#!/usr/bin/env python
"""GPU optimizer-step benchmark: our fused packed step against fused AdamW and the 8/4-bit peers.

    python benchmarks/gpu_step.py [--quick] [--json PATH]      # needs a CUDA GPU; ~1-3 min on an H100

On one parameter set with GPT-like shapes (default about 1e9 elements: vocab 50304, hidden 2048,
18 layers; ``--quick``: about 2.6e6) it times, one optimizer at a time and with the same fixed
gradients:

- ``STQuantAdamW`` at 8, 6, 5, 4, 3 and 2 bits (both moments), and a scheduled mix of widths
  (per unit, as the precision scheduler leaves them: exp_avg 3-5, exp_avg_sq 3-6 bits), each step one
  grouped launch per width group (``backend="auto"`` = Triton on CUDA; ``nonfinite="unchecked"``
  since the peers do not check gradients either);
- ``torch.optim.AdamW(fused=True)``, ``bitsandbytes`` ``AdamW8bit`` and ``torchao`` ``AdamW4bit``.

Per optimizer: the first step (state allocation, Triton compiles) separately, ``--warmup`` steps,
then the median of ``--steps`` steps timed with CUDA events. Achieved bandwidth = bytes moved per
parameter (``benchmarks/step.py:gpu_bytes_per_param``: 12 B of param/grad traffic + both moments'
codes read and written + scales) x parameters / time, printed against the device's peak bandwidth.
Nothing is installed at run time: a missing peer is reported and skipped.

``--interpret-check`` runs the same code path on the CPU with the Triton kernel under the
interpreter (``TRITON_INTERPRET=1``) at a tiny size, without meaningful timing: what the tests run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, ".."))
sys.path.insert(0, HERE)

if "--interpret-check" in sys.argv:  # before triton is imported
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from step import gpu_bytes_per_param, transformer_shapes  # noqa: E402

LR, BETAS, EPS, WD = 1e-3, (0.9, 0.999), 1e-8, 0.01
BLOCK = 128
# a scheduled mix (exp_avg bits, exp_avg_sq bits), assigned to the packed units in turn
MIX = [(4, 4), (3, 5), (5, 6), (4, 3), (3, 4), (5, 5)]
PEAK_BW = {"H200": 4.8e12, "H100 SXM": 3.35e12, "H100 NVL": 3.9e12, "H100 PCIe": 2.0e12, "H100": 3.35e12,
           "A100-SXM4-80GB": 2.04e12, "A100 80GB PCIe": 1.94e12, "A100": 1.56e12}  # fmt: skip

REFUSAL = (
    "gpu_step.py times the GPU step and needs a CUDA GPU, but torch.cuda.is_available() is False "
    "(torch {version}, CUDA build: {cuda}). Run it on an A100/H100/H200 machine; on a CPU use "
    "benchmarks/step.py (CPU step times) or benchmarks/gpu_compile.py (ahead-of-time compile check)."
)


def peak_bandwidth(device: torch.device) -> tuple[float | None, str]:
    if device.type != "cuda":
        return None, "cpu"
    props = torch.cuda.get_device_properties(device)
    clock = getattr(props, "memory_clock_rate", 0)  # kHz
    bus = getattr(props, "memory_bus_width", 0)  # bits
    if clock and bus:
        return 2 * clock * 1e3 * bus / 8, f"{props.name} (2 x {clock / 1e6:.2f} GHz x {bus} bit)"
    for key, bw in PEAK_BW.items():
        if key in props.name:
            return bw, f"{props.name} (datasheet)"
    return None, props.name


def sizes(args) -> tuple[int, int, int]:
    if args.interpret_check:
        return 128, 16, 1
    if args.quick:
        return 4096, 256, 3
    return 50304, 2048, 18


def make_params(args, device):
    vocab, hidden, layers = sizes(args)
    shapes = transformer_shapes(vocab, hidden, layers)
    gen = torch.Generator(device=device).manual_seed(0)
    init = [torch.randn(s, generator=gen, device=device) * 0.02 for _, s in shapes]
    grads = [torch.randn(s, generator=gen, device=device) * 1e-3 for _, s in shapes]
    return shapes, init, grads


def ours(bits, *, mix: bool = False, backend: str = "auto", min_numel: int = 4096):
    def make(ps):
        from stquant_megatron import PackedState, STQuantAdamW, STQuantConfig

        cfg = STQuantConfig(bits=bits, block_size=BLOCK, backend=backend, nonfinite="unchecked", min_numel=min_numel)
        opt = STQuantAdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, config=cfg)
        if mix:  # the widths a scheduled run settles on, unit by unit
            opt.init_state()
            i = 0
            for p in ps:
                st = opt.state[p]
                if isinstance(st.get("exp_avg"), PackedState):
                    mb, vb = MIX[i % len(MIX)]
                    i += 1
                    for moment, b in (("exp_avg", mb), ("exp_avg_sq", vb)):
                        st[moment] = PackedState.zeros(p.numel(), bits=b, kind=cfg.codebook(moment, b),
                                                       signed=moment == "exp_avg", block_size=BLOCK, device=p.device)  # fmt: skip
        return opt

    return make


def peers(device):
    def adamw(ps):
        return torch.optim.AdamW(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD, fused=True)

    def bnb8(ps):
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    def ao4(ps):
        import torchao.optim

        return torchao.optim.AdamW4bit(ps, lr=LR, betas=BETAS, eps=EPS, weight_decay=WD)

    return [("torch.AdamW(fused)", "32", adamw, (32, 32, None)), ("bnb.AdamW8bit", "8", bnb8, (8, 8, 256)),
            ("torchao.AdamW4bit", "4", ao4, (4, 4, 128))]  # fmt: skip


def rows_to_run(args, device):
    backend = "triton" if args.interpret_check else "auto"
    min_numel = 512 if args.interpret_check else 4096
    # the interpreter check runs fused AdamW only: bnb and torchao are CUDA-first (torchao compiles for ~1 min on a CPU)
    rows = list(peers(device))[:1] if args.interpret_check else list(peers(device))
    for b in (8, 6, 5, 4, 3, 2):
        rows.append(("STQuantAdamW", str(b), ours(b, backend=backend, min_numel=min_numel), (b, b, BLOCK)))
    mean_m = sum(m for m, _ in MIX) / len(MIX)
    mean_v = sum(v for _, v in MIX) / len(MIX)
    rows.append(("STQuantAdamW(scheduled mix)", f"{mean_m:.2g}/{mean_v:.2g}",
                 ours(4, mix=True, backend=backend, min_numel=min_numel), (mean_m, mean_v, BLOCK)))  # fmt: skip
    return rows


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(opt, device, n: int) -> list[float]:
    out = []
    for _ in range(n):
        if device.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            opt.step()
            b.record()
            b.synchronize()
            out.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            opt.step()
            out.append((time.perf_counter() - t) * 1e3)
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="about 2.6e6 parameters instead of 1e9")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--interpret-check", action="store_true",
                    help="CPU, Triton interpreter, tiny size, no meaningful timing (the tests' code-path check)")
    args = ap.parse_args(argv)
    if not args.interpret_check and not torch.cuda.is_available():
        print(REFUSAL.format(version=torch.__version__, cuda=torch.version.cuda), file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.interpret_check else "cuda")
    if args.interpret_check:
        args.steps, args.warmup = 1, 0
    peak, dev_name = peak_bandwidth(device)
    shapes, init, grads = make_params(args, device)
    n_params = sum(t.numel() for t in init)
    print(f"{n_params / 1e6:.1f}M parameters in {len(shapes)} tensors on {dev_name}"
          + (f", peak {peak / 1e12:.2f} TB/s" if peak else ""))  # fmt: skip
    results, t_start = [], time.perf_counter()
    for name, bits, make, model in rows_to_run(args, device):
        params = [torch.nn.Parameter(t.clone()) for t in init]
        for p, g in zip(params, grads):
            p.grad = g
        try:
            opt = make(params)
            sync(device)
            t0 = time.perf_counter()
            opt.step()
            sync(device)
            first_ms = (time.perf_counter() - t0) * 1e3
            time_steps(opt, device, args.warmup)
            times = time_steps(opt, device, args.steps)
        except Exception as exc:  # a missing or failing peer is reported, not fatal
            print(f"{name:<28} {bits:>7}  skipped: {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            results.append({"optimizer": name, "bits": bits, "skipped": f"{type(exc).__name__}: {exc}"[:300]})
            del params
            continue
        if not all(bool(torch.isfinite(p).all()) for p in params) or all(
            torch.equal(p, t) for p, t in zip(params, init)
        ):  # fmt: skip
            raise RuntimeError(f"{name}: parameters did not move or are not finite after the steps")
        ms = statistics.median(times)
        bpp = gpu_bytes_per_param(*model)
        gbs = bpp * n_params / (ms * 1e-3) / 1e9
        row = {"optimizer": name, "bits": bits, "step_ms_median": round(ms, 4), "first_step_ms": round(first_ms, 1),
               "bytes_per_param_model": round(bpp, 3), "achieved_GBps": round(gbs, 1),
               "fraction_of_peak": round(gbs * 1e9 / peak, 3) if peak else None}  # fmt: skip
        results.append(row)
        print(f"{name:<28} {bits:>7}  {ms:9.3f} ms  first {first_ms:9.1f} ms  {bpp:6.2f} B/param  {gbs:8.1f} GB/s"
              + (f"  {gbs * 1e9 / peak:5.1%} of peak" if peak else ""), flush=True)  # fmt: skip
        del opt, params
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = next((r for r in results if r["optimizer"] == "torch.AdamW(fused)" and "step_ms_median" in r), None)
    for r in results:
        if base and "step_ms_median" in r:
            r["step_time_vs_adamw"] = round(r["step_ms_median"] / base["step_ms_median"], 3)
    out = {"command": "python benchmarks/gpu_step.py" + (" --quick" if args.quick else ""), "device": dev_name,
           "peak_bandwidth_Bps": peak, "params": n_params, "timed": not args.interpret_check,
           "wall_s": round(time.perf_counter() - t_start, 1), "rows": results}  # fmt: skip
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)
    print(f"done in {out['wall_s']} s" + ("" if out["timed"] else " (interpreter check: times are not meaningful)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
