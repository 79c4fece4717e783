#!/usr/bin/env python
"""Ahead-of-time compile check of the Triton step for real GPUs, on any CPU machine.

    python benchmarks/gpu_compile.py [--quick] [--arch 80,90] [--json PATH] [--markdown PATH]

The CPU interpreter (``TRITON_INTERPRET=1``, used by the tests) accepts code the real compiler
rejects. This script calls the real launchers (``triton_packed_adam_step`` and
``triton_packed_adam_group_step``) on tiny CPU tensors with the kernel launch intercepted, binds the
arguments exactly as Triton's JIT would for a CUDA target (signature, divisibility attributes,
constexprs, options), and compiles each specialization for sm_80 and sm_90 with the CUDA backend and
``ptxas`` shipped in the ``triton`` wheel (no GPU, no driver). Per specialization it reports:
compiled or the error; registers, spill bytes, stack frame (local memory), shared memory (from the
ptxas report and the compiled metadata); an occupancy estimate; static SASS instructions per element
on the common path; FMA contraction and fp64 instructions in the PTX.

How instructions per element are counted (``sass_per_element``): the kernel is straight-line (one
program handles ``G`` blocks; no loop), so the hot path is the whole entry function as disassembled
by ``nvdisasm``, minus (a) the out-of-line slow-path subroutines of IEEE division and square root
(``$__internal_*``) and (b) the stubs that call them (the instructions between a conditional branch
and its target label that contain ``CALL.REL.NOINC``). With statistics, only every
``SAMPLE_STRIDE``-th program measures them: the others leave at a predicated ``EXIT`` after the
step, so the instructions after the first predicated ``EXIT`` (``sass_sampled``) run in one program
of ``SAMPLE_STRIDE`` and count ``1 / SAMPLE_STRIDE`` each (``sass_expected = sass_common +
sass_sampled / SAMPLE_STRIDE``; a statistics specialization without that ``EXIT`` is reported as a
problem). That count is the instructions one thread issues on average; divided by the elements one
thread handles (``G * BLOCK / (32 * num_warps)``) it is comparable with the issue budget: an H100 issues about 132 SMs x 4 x 1.755 GHz = 0.93e12 warp
instructions/s, i.e. 29.7e12 thread instructions/s; at 3.35 TB/s and about 14 B per element (4/4
bits) memory allows 240e9 elements/s, so about 125 instructions per element.

It also replays 200 optimizer steps (``STQuantAdamW`` with the precision scheduler and stochastic
rounding, three units, shards with offsets past 2**32) through both launchers and counts distinct
compiles per configuration (a configuration = everything but per-step values: widths, kinds,
rounding, statistics, dtypes, block size).

Exits non-zero on any compile error, spill, local memory, fp64 instruction, FMA contraction, flush-to-zero
instruction (``.ftz`` in the PTX; NVIDIA's expansion of ``div.rn``/``sqrt.rn`` in the SASS excepted: see
``ftz_instructions``) or more than one compile per configuration.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass

os.environ.pop("TRITON_INTERPRET", None)  # the real compiler, not the interpreter
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the launch sets enable_fp_fusion=False itself

import torch  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import provenance  # noqa: E402  (commit, machine, code hash at the start of the run)

import triton  # noqa: E402
from triton import knobs  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.jit import create_function_from_signature  # noqa: E402

from stquant_megatron.config import AUTO_CODEBOOK  # noqa: E402
from stquant_megatron.formats.codebooks import KINDS, LOG_STEP, get_codebook  # noqa: E402
from stquant_megatron.kernels import GroupEntry, rng_key, step_scalars  # noqa: E402
from stquant_megatron.kernels import triton_adam as ta  # noqa: E402
from stquant_megatron.kernels import triton_factored as tf  # noqa: E402
from stquant_megatron.kernels.common import MAX_BLOCK_SIZE, MIN_BLOCK_SIZE, SAMPLE_STRIDE  # noqa: E402

BIN = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BLOCKS = [b for b in (2**k for k in range(4, 14)) if MIN_BLOCK_SIZE <= b <= MAX_BLOCK_SIZE]  # every allowed size
STATS = ("off", "stats", "probe")


@dataclass(frozen=True)
class Spec:
    """One launcher call: what the optimizer can produce."""

    m_bits: int = 4
    v_bits: int = 4
    m_kind: str = "pow2"
    v_kind: str = "pow2"
    stochastic: bool = False
    stats: str = "off"  # off | stats | probe (statistics plus the neighbouring-width probe)
    pdtype: str = "fp32"
    gdtype: str = "fp32"
    sdtype: str = "fp32"
    block: int = 128
    path: str = "group"  # unit | group | factored (exp_avg packed, exp_avg_sq factored: v_bits/v_kind unused)
    odd: bool = False  # a numel that is not a multiple of 4 (element masks; real layers have multiples of 4)

    def name(self) -> str:
        v = "vfact" if self.path == "factored" else f"v{self.v_bits}{self.v_kind[:3]}"
        return (f"{self.path} m{self.m_bits}{self.m_kind[:3]} {v} "
                f"{'sr' if self.stochastic else 'rn'} {self.stats} p{self.pdtype} g{self.gdtype} "
                f"s{self.sdtype} b{self.block}" + (" odd" if self.odd else ""))  # fmt: skip


def _kinds(bits: int, signed: bool) -> list[str]:
    return [k for k in KINDS if k != "log" or (not signed and bits in LOG_STEP)]


def _neighbor_kind(kind: str, bits: int) -> str:
    return "pow2" if kind == "log" and bits not in LOG_STEP else kind  # as STQuantConfig.codebook


def matrix(quick: bool) -> list[Spec]:
    """Every feature at least once (quick), or the full matrix."""
    specs: list[Spec] = []
    if quick:
        specs += [
            Spec(),
            Spec(path="unit", stochastic=True, stats="probe"),
            Spec(m_bits=2, v_bits=2, v_kind="log", stochastic=True, stats="stats"),
            Spec(m_bits=8, v_bits=8, m_kind="linear", v_kind="linear", stats="probe", block=2048),
            Spec(m_bits=3, v_bits=5, pdtype="bf16", gdtype="bf16", sdtype="bf16", stochastic=True, block=32),
            Spec(m_bits=6, v_bits=7, pdtype="fp16", gdtype="fp16", sdtype="fp16", path="unit", block=1024),
            Spec(m_bits=4, v_bits=3, v_kind="log", stats="probe", stochastic=True, block=512),
            Spec(m_bits=5, v_bits=4, stochastic=True, stats="probe", odd=True),
            Spec(path="factored", stochastic=True, stats="probe"),
            Spec(path="factored", m_bits=8, m_kind="linear", pdtype="bf16", gdtype="bf16", sdtype="bf16", block=2048),
        ]
        return specs
    widths = range(2, 9)
    specs += [Spec(m_bits=a, v_bits=b) for a in widths for b in widths]  # every width pair
    i = 0
    for b in widths:  # every codebook kind at every width, rounding alternating
        for mk in _kinds(b, True):
            for vk in _kinds(b, False):
                specs.append(Spec(m_bits=b, v_bits=b, m_kind=mk, v_kind=vk, stochastic=bool(i % 2)))
                i += 1
    for b in widths:  # the probe at every width and v kind (its neighbour widths are constexprs)
        for vk in _kinds(b, False):
            specs.append(Spec(m_bits=b, v_bits=b, v_kind=vk, stats="probe", stochastic=bool(b % 2)))
    for sr in (False, True):  # features at 4/4, both launch paths
        for st in STATS:
            specs += [Spec(stochastic=sr, stats=st, path=path) for path in ("unit", "group")]
        specs += [Spec(stochastic=sr, stats="probe" if sr else "off", path=path, odd=True) for path in ("unit", "group")]
    names = list(DTYPES)
    for i, pd in enumerate(names):  # param x grad dtypes, scale dtypes in turn
        for j, gd in enumerate(names):
            specs.append(Spec(pdtype=pd, gdtype=gd, sdtype=names[(i + j) % 3], stochastic=(pd == gd)))
    for blk in BLOCKS:  # every block size: the lightest and the heaviest configurations
        specs += [Spec(block=blk, path="unit"),
                  Spec(m_bits=8, v_bits=8, block=blk, stochastic=True, stats="probe"),
                  Spec(m_bits=4, v_bits=4, v_kind="log", block=blk, stochastic=True, stats="probe", path="unit")]  # fmt: skip
    fact = dict(path="factored", v_bits=0, v_kind="pow2")
    for b in widths:  # the factored step: every exp_avg width and kind, rounding alternating, probe at each
        for k, mk in enumerate(_kinds(b, True)):
            specs.append(Spec(m_bits=b, m_kind=mk, stochastic=bool((b + k) % 2), **fact))
        specs.append(Spec(m_bits=b, stats="probe", stochastic=bool(b % 2), **fact))
    for sr in (False, True):
        specs += [Spec(stochastic=sr, stats=st, **fact) for st in STATS] + [Spec(stochastic=sr, odd=True, **fact)]
    for i, pd in enumerate(names):
        specs.append(Spec(pdtype=pd, gdtype=names[(i + 1) % 3], sdtype=names[(i + 2) % 3], **fact))
    for blk in BLOCKS:
        specs += [Spec(block=blk, **fact), Spec(m_bits=8, block=blk, stochastic=True, stats="probe", **fact)]
    seen, out = set(), []
    for s in specs:
        if s not in seen:
            seen.add(s)
            out.append(s)
    return out


# ---------------------------------------------------------------------------- intercepted launches

class Capture:
    """Replaces the kernels' ``run`` so a launcher call records (kernel, args, kwargs) and returns."""

    def __init__(self):
        self.calls: list[tuple] = []
        self._saved = {}

    def __enter__(self):
        for k in (ta._packed_adam_kernel, ta._packed_adam_group_kernel, tf._factored_adam_kernel):
            self._saved[k] = k.__dict__.get("run")

            def run(*args, grid, warmup, _k=k, **kwargs):
                self.calls.append((_k, args, kwargs))

            k.run = run
        return self

    def __exit__(self, *exc):
        for k, old in self._saved.items():
            if old is None:
                del k.run
            else:
                k.run = old


_BACKENDS: dict = {}


def bind(kernel, args, kwargs, arch: int):
    """What Triton's JIT would compile for this launch on ``sm_<arch>``."""
    if arch not in _BACKENDS:
        target = GPUTarget("cuda", arch, 32)
        _BACKENDS[arch] = (target, make_backend(target), {})
    target, backend, binders = _BACKENDS[arch]
    if kernel not in binders:
        binders[kernel] = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, spec, opts = binders[kernel](*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, spec, opts)
    key = (kernel.__name__, repr(spec), repr(sorted(options.__dict__.items())))
    consts = {kernel.arg_names[k[0]]: v for k, v in constexprs.items()}
    config = (kernel.__name__, tuple(sorted((k, str(v)) for k, v in consts.items())),
              tuple(v for v in signature.values() if v.startswith("*")))  # fmt: skip
    return target, options, signature, constexprs, attrs, key, config


def _tensors(spec: Spec, nblocks: int = 3):
    n = nblocks * spec.block - (5 if spec.odd else 4)  # a partial last block either way
    mcb = get_codebook(spec.m_kind, spec.m_bits, True)
    vcb = get_codebook(spec.v_kind, spec.v_bits, False) if spec.path != "factored" else None
    p = torch.zeros(n, dtype=DTYPES[spec.pdtype])
    g = torch.zeros(n, dtype=DTYPES[spec.gdtype])
    mc = torch.zeros(nblocks, spec.m_bits, spec.block // 8, dtype=torch.uint8)
    vc = torch.zeros(nblocks, max(spec.v_bits, 1), spec.block // 8, dtype=torch.uint8)
    ms = torch.zeros(nblocks, dtype=DTYPES[spec.sdtype])
    vs = torch.zeros(nblocks, dtype=DTYPES[spec.sdtype])
    return p, g, mc, ms, vc, vs, mcb, vcb


def _neighbors(spec: Spec):
    out = []
    for kind, b, signed in ((spec.m_kind, spec.m_bits - 1, True), (spec.m_kind, spec.m_bits + 1, True),
                            (spec.v_kind, spec.v_bits - 1, False), (spec.v_kind, spec.v_bits + 1, False)):
        out.append(get_codebook(_neighbor_kind(kind, b), b, signed) if 2 <= b <= 8 else None)
    return tuple(out)


def launch(spec: Spec, step: int = 1, index_offset: int = 0):
    """Call the real launcher for ``spec`` with the launch intercepted; returns the recorded call."""
    p, g, mc, ms, vc, vs, mcb, vcb = _tensors(spec)
    sc = step_scalars(lr=1e-3, beta1=0.9, beta2=0.999, eps=1e-8, weight_decay=0.1, step=step, adamw=True)
    key = rng_key(0, step, 7)
    with_stats = spec.stats != "off"
    probe = spec.stats == "probe"
    with Capture() as cap:
        if spec.path == "factored":  # a shard of a [rows, cols] matrix (pass 1 runs on the host here)
            cols = 1 if spec.odd else 4  # cols and index_offset are runtime integers: one kernel for all
            rows = -(-(p.numel() + index_offset) // cols)
            tf.triton_factored_adam_step(
                p, g, mc, ms, torch.zeros(rows), torch.zeros(cols), mcb, sc, block_size=spec.block,
                stochastic=spec.stochastic, rng_key=key, stats=torch.zeros(3) if with_stats else None,
                neighbor_codebooks=_neighbors(spec) if probe else None, neighbor_stats=torch.zeros(6) if probe else None,
                inv_mean=torch.ones(()), index_offset=index_offset,
            )  # fmt: skip
        elif spec.path == "unit":
            ta.triton_packed_adam_step(
                p, g, mc, ms, vc, vs, mcb, vcb, sc, block_size=spec.block, stochastic=spec.stochastic, rng_key=key,
                index_offset=index_offset, stats=torch.zeros(3) if with_stats else None,
                neighbor_codebooks=_neighbors(spec) if probe else None, neighbor_stats=torch.zeros(6) if probe else None,
            )  # fmt: skip
        else:
            ta.triton_packed_adam_group_step(
                [GroupEntry(p, g, mc, ms, vc, vs, sc, key, index_offset)], mcb, vcb, block_size=spec.block,
                stochastic=spec.stochastic, stats=torch.zeros(1, 3) if with_stats else None,
                neighbor_codebooks=_neighbors(spec) if probe else None,
                neighbor_stats=torch.zeros(1, 6) if probe else None,
            )  # fmt: skip
    assert len(cap.calls) == 1, cap.calls
    return cap.calls[0]


# ---------------------------------------------------------------------------- compile and measure

_PTXAS = re.compile(r"Used (\d+) registers")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_INSN = re.compile(r"^\s+/\*[0-9a-f]{4,}\*/\s+(.*?)\s*;")
_F64 = re.compile(r"^\s*(?:@%p\d+\s+)?[a-z]+(?:\.[a-z0-9]+)*\.f64\b", re.M)


def count_sass(cubin: bytes, sampled: bool) -> dict:
    """Static SASS of the entry function: all, common path (slow-path stubs and subroutines out), and
    with ``sampled`` the part after the first predicated EXIT (programs that sample statistics only)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    finally:
        os.remove(path)
    lines = text.splitlines()
    insns = []  # (label or None, instruction)
    in_sub = False
    for line in lines:
        s = line.strip()
        if s.startswith("$__internal") and s.endswith(":"):
            in_sub = True  # out-of-line slow paths of div_rn / sqrt_rn
        elif s.startswith(".L_x_") and s.endswith(":"):
            insns.append((s[:-1], None))
            continue
        m = _INSN.match(line)
        if m and not in_sub:
            insns.append((None, m.group(1)))
    total = sum(1 for lab, ins in insns if ins is not None and not ins.startswith("NOP"))
    # drop regions "@P BRA `(.L_x_k)" ... ".L_x_k:" that call a slow path; after the first predicated
    # EXIT (programs that do not sample statistics leave there), count into "sampled"
    counts = {"common": 0, "sampled": 0}
    part, i = "common", 0
    while i < len(insns):
        lab, ins = insns[i]
        if ins is None:
            i += 1
            continue
        m = re.match(r"@!?U?P\w+\s+BRA\s+`\((\.L_x_\d+)\)", ins)
        if m:
            j = i + 1
            while j < len(insns) and insns[j][0] != m.group(1):
                j += 1
            region = [x for _, x in insns[i + 1 : j] if x is not None]
            if any("CALL.REL.NOINC" in x for x in region):
                counts[part] += 1  # the branch itself is executed
                i = j
                continue
        if not ins.startswith("NOP") and not re.match(r"BRA\s+`\((\.L_x_\d+)\)", ins or "") or (
            ins.startswith("BRA") and i + 1 < len(insns)
            and insns[i + 1][0] != re.search(r"(\.L_x_\d+)", ins).group(1)
        ):  # fmt: skip
            counts[part] += 1
        if sampled and re.match(r"@!?U?P\w+\s+EXIT\b", ins):
            part = "sampled"
        i += 1
    # the trailing self-branch after EXIT is padding
    return {"sass_total": total, "sass_common": counts["common"], "sass_sampled": counts["sampled"],
            "sass_shared_ops": len(re.findall(r"\b(?:STS|LDS)\b", text)),
            "sass_barriers": len(re.findall(r"\bBAR\.SYNC", text))}  # fmt: skip


def occupancy(regs: int, warps: int, shared: int) -> float:
    """Resident threads / 2048 on sm_80/sm_90 (64K registers, 32 CTAs, 227 KiB shared per SM)."""
    regs_per_warp = -(-max(regs, 1) * 32 // 256) * 256
    by_regs = 65536 // (regs_per_warp * warps)
    by_threads = 2048 // (32 * warps)
    by_smem = (227 * 1024) // shared if shared else 32
    ctas = min(by_regs, by_threads, by_smem, 32)
    return ctas * 32 * warps / 2048


# ---------------------------------------------------------------------------- flush-to-zero check

# An instruction that flushes subnormal inputs or results to zero: ``.ftz`` in the PTX, ``.FTZ`` in the
# SASS. The kernels' arithmetic must not flush (the twin on the CPU does not): Triton's default
# ``enable_reflect_ftz=True`` makes libdevice's ``floor`` (``tl.floor``) a ``cvt.rmi.ftz.f32.f32``, so the
# launch passes ``enable_reflect_ftz=False``. The check fails on any ``.ftz`` in the PTX: there every
# instruction is the kernel's own (IEEE division and square root are single non-ftz instructions,
# ``div.rn.f32`` / ``sqrt.rn.f32``). Excepted, by construction: NVIDIA's expansion of those two in
# ptxas, which exists only in the SASS: predicated inline ``FMUL.FTZ``/``FADD.FTZ`` on operands it has
# pre-scaled (by 2**32 and the like) around ``MUFU.RSQ``/``MUFU.RCP``, and the out-of-line subroutines
# ``$__internal_<n>_$__cuda_sm3x_div_rn_noftz_f32_slowpath`` / ``..._sqrt_rn_f32_slowpath`` (recognised by
# those labels); they implement a correctly rounded, non-flushing operation. ``ftz_sass`` lists the
# SASS ``.FTZ`` outside those subroutines for the record (``ftz_sass`` in the results; not a failure).
_PTX_FTZ = re.compile(r"^\s*(?:@!?%p\d+\s+)?([a-z]+(?:\.[a-z0-9]+)*\.ftz(?:\.[a-z0-9]+)*)\b", re.M)
_SLOW_PATH = re.compile(r"^\$__internal_\d+_\$__cuda_sm\d+x_(?:div_rn|sqrt_rn|rcp_rn)\w*_slowpath:$")
_PTX_LAST: dict = {}


def ftz_instructions(ptx: str) -> list[str]:
    """The PTX instructions with ``.ftz`` (the PTX has no slow-path subroutines: all of it is the kernel's)."""
    return _PTX_FTZ.findall(ptx)


def ftz_sass(cubin: bytes) -> list[str]:
    """SASS instructions with ``.FTZ`` outside NVIDIA's division/square-root slow paths."""
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
        path = f.name
    try:
        text = subprocess.run([os.path.join(BIN, "nvdisasm"), "-c", path], capture_output=True, text=True,
                              check=True).stdout  # fmt: skip
    finally:
        os.remove(path)
    out, in_slow = [], False
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("$__internal") and s.endswith(":"):
            in_slow = bool(_SLOW_PATH.match(s))  # any other internal subroutine is checked like the kernel
        elif s.startswith(".text.") or (s.endswith(":") and not s.startswith(".L_x_") and not s.startswith("$")):
            in_slow = False
        m = _INSN.match(line)
        if m and not in_slow and ".FTZ" in m.group(1):
            out.append(m.group(1))
    return out


def check_ftz(out: dict, ptx: str, cubin: bytes) -> None:
    """Adds the flush-to-zero findings of one compile to its result (``problems`` reports them)."""
    out["ftz_ptx"] = ftz_instructions(ptx)
    out["ftz_sass"] = ftz_sass(cubin)  # inline parts of div.rn / sqrt.rn (see above): recorded, not failed
    out["ftz"] = len(out["ftz_ptx"])


def last_ptx(kernel, args, kwargs, arch: int) -> str:
    """The PTX of ``compile_call(kernel, args, kwargs, arch)`` (compiled if not yet)."""
    compile_call(kernel, args, kwargs, arch)
    return _PTX_LAST[(arch, bind(kernel, args, kwargs, arch)[5])]


def ftz_self_check(arch: int) -> tuple[bool, str]:
    """The detector can fail: the default configuration compiled with Triton's default
    ``enable_reflect_ftz=True`` (``tl.floor`` -> ``cvt.rmi.ftz.f32.f32``) must be caught."""
    kernel, a, kw = launch(Spec(m_kind="linear", v_kind="linear"))
    r = compile_call(kernel, a, dict(kw, enable_reflect_ftz=True), arch)
    if not r["ok"] or "flush to zero (.ftz)" not in problems(r):
        return False, "self-check: enable_reflect_ftz=True (cvt.rmi.ftz from tl.floor) went undetected"
    return True, f"self-check: enable_reflect_ftz=True is detected ({', '.join(sorted(set(r['ftz_ptx'])))} in the PTX)"


_COMPILED: dict = {}


def compile_call(kernel, args, kwargs, arch: int) -> dict:
    target, options, signature, constexprs, attrs, key, config = bind(kernel, args, kwargs, arch)
    ck_key = (arch, key)
    if ck_key in _COMPILED:
        return _COMPILED[ck_key]
    out: dict = {"arch": arch, "kernel": kernel.__name__, "num_warps": options.num_warps,
                 "enable_fp_fusion": options.enable_fp_fusion}  # fmt: skip
    buf = io.StringIO()
    t0 = time.perf_counter()
    knobs.nvidia.dump_ptxas_log = True
    knobs.compilation.always_compile = True  # a cached kernel would skip ptxas and its report
    try:
        with contextlib.redirect_stdout(buf):
            ck = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target,
                                options=options.__dict__)  # fmt: skip
    except Exception as exc:  # the compiler's message is the result
        msg = str(exc).strip().splitlines()
        out.update(ok=False, error=" | ".join(x for x in msg if x.strip())[:600])
        _COMPILED[ck_key] = out
        return out
    out["compile_s"] = round(time.perf_counter() - t0, 2)
    log = buf.getvalue()
    regs = _PTXAS.search(log)
    frame = _FRAME.search(log)
    ptx = ck.asm["ptx"]
    out.update(
        ok=True, registers=int(regs.group(1)) if regs else None,
        stack_frame=int(frame.group(1)) if frame else None,
        spill_stores=int(frame.group(2)) if frame else None, spill_loads=int(frame.group(3)) if frame else None,
        local_memory=ptx.count(".local"), shared=ck.metadata.shared,
        fma=len(re.findall(r"\bfma\.rn(?:\.ftz)?\.f32\b", ptx)), fp64=len(_F64.findall(ptx)),
    )  # fmt: skip
    check_ftz(out, ptx, ck.asm["cubin"])
    _PTX_LAST[ck_key] = ptx
    out["with_stats"] = bool(constexprs[(kernel.arg_names.index("WITH_STATS"),)])
    out.update(count_sass(ck.asm["cubin"], out["with_stats"]))
    G = constexprs[(kernel.arg_names.index("G"),)]
    BLOCK = constexprs[(kernel.arg_names.index("BLOCK"),)]
    per_thread = G * BLOCK / (32 * options.num_warps)
    out["elements_per_thread"] = per_thread
    out["sass_expected"] = out["sass_common"] + out["sass_sampled"] / SAMPLE_STRIDE
    out["sass_per_element"] = round(out["sass_expected"] / per_thread, 1)
    out["sass_per_element_sampled_program"] = round((out["sass_common"] + out["sass_sampled"]) / per_thread, 1)
    out["occupancy"] = occupancy(out["registers"] or 0, options.num_warps, out["shared"])
    _COMPILED[ck_key] = out
    return out


def problems(r: dict) -> list[str]:
    if not r["ok"]:
        return ["compile error"]
    bad = []
    if r["spill_stores"] or r["spill_loads"]:
        bad.append("spills")
    if r["stack_frame"] or r["local_memory"]:
        bad.append("local memory")
    if r["fp64"]:
        bad.append("fp64")
    if r["fma"]:
        bad.append("FMA contraction")
    if r.get("ftz"):
        bad.append("flush to zero (.ftz)")
    if r["with_stats"] and not r["sass_sampled"]:  # the count's split point is where it must be
        bad.append("statistics without a sampled-program EXIT")
    return bad


# ---------------------------------------------------------------------------- 200-step replay

def replay(steps: int, arch: int) -> list[dict]:
    """200 optimizer steps (scheduler, stochastic rounding, three units) through both launchers;
    distinct compiles per configuration."""
    import stquant_megatron.optim as optim_mod
    from stquant_megatron import STQuantAdamW, STQuantConfig
    from stquant_megatron.kernels import torch_factored_adam_step, torch_packed_adam_group_step

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 72), torch.nn.Linear(72, 50))
    seen: dict = {}

    def record(kernel, args, kwargs):
        *_, key, config = bind(kernel, args, kwargs, arch)
        seen.setdefault(config, set()).add(key)

    def hooked(entries, mcb, vcb, *, stats=None, neighbor_stats=None, **kw):
        torch_packed_adam_group_step(entries, mcb, vcb, stats=stats, neighbor_stats=neighbor_stats, **kw)
        st = None if stats is None else torch.zeros_like(stats)
        ns = None if neighbor_stats is None else torch.zeros_like(neighbor_stats)
        with Capture() as cap:
            ta.triton_packed_adam_group_step(entries, mcb, vcb, stats=st, neighbor_stats=ns, **kw)
            # the same units through the one-unit launcher, as whole units and as shards of a unit
            # past 2**31 / 2**32 elements
            for en in entries:
                for off in (en.index_offset, en.index_offset + 3 * 2**31 + 64):
                    ta.triton_packed_adam_step(
                        *en[:6], mcb, vcb, en.scalars, rng_key=en.rng_key, index_offset=off,
                        stats=None if st is None else torch.zeros(3),
                        neighbor_stats=None if ns is None else torch.zeros(6), **kw,
                    )  # fmt: skip
        for call in cap.calls:
            record(*call)

    def hooked_factored(p, g, mc, ms, row, col, mcb, sc, *, stats=None, neighbor_stats=None, **kw):
        r0, c0 = row.clone(), col.clone()  # the twin updates the statistics; the captured launch sees them
        torch_factored_adam_step(p, g, mc, ms, row, col, mcb, sc, stats=stats, neighbor_stats=neighbor_stats, **kw)
        with Capture() as cap:
            tf.triton_factored_adam_step(p, g, mc, ms, r0, c0, mcb, sc,
                                         stats=None if stats is None else torch.zeros_like(stats),
                                         neighbor_stats=None if neighbor_stats is None else torch.zeros_like(neighbor_stats),
                                         **kw)  # fmt: skip
        for call in cap.calls:
            record(*call)

    saved = optim_mod.get_group_step_fn, optim_mod.get_factored_step_fn
    optim_mod.get_group_step_fn = lambda backend, device: hooked
    optim_mod.get_factored_step_fn = lambda backend, device: hooked_factored
    try:
        for fmt in ("packed", "factored"):
            torch.manual_seed(0)
            model = torch.nn.Sequential(torch.nn.Linear(96, 160), torch.nn.Linear(160, 72), torch.nn.Linear(72, 50))
            cfg = STQuantConfig(min_numel=1000, block_size=64, stochastic_rounding=True, avg_bits=4.5,
                                warmup_steps=10, interval=20, stats_steps=4, backend="torch", exp_avg_sq_format=fmt)  # fmt: skip
            opt = STQuantAdamW(model.parameters(), lr=1e-3, config=cfg)
            gen = torch.Generator().manual_seed(1)
            for _ in range(steps):
                x = torch.randn(32, 96, generator=gen)
                opt.zero_grad()
                model(x).square().mean().backward()
                opt.step()
    finally:
        optim_mod.get_group_step_fn, optim_mod.get_factored_step_fn = saved
    rows = []
    for config, keys in sorted(seen.items()):
        c = dict(config[1])
        v = f"v{c['V_BITS']}" if "V_BITS" in c else "vfact"
        probe = sum(int(c.get(f"N{k}_BITS", 0)) for k in range(4)) > 0
        rows.append({"arch": arch, "kernel": config[0],
                     "config": f"m{c['M_BITS']} {v} sr={c['STOCHASTIC']} stats={c['WITH_STATS']} probe={probe} "
                               f"block={c['BLOCK']}",
                     "compiles": len(keys)})  # fmt: skip
    return rows


# ---------------------------------------------------------------------------- report

def markdown(results: list[dict], replays: list[dict], cmd: str) -> str:
    out = [f"Generated by `{cmd}` (triton {triton.__version__}; ptxas from the triton wheel).", "",
           "| arch | specialization | ok | regs | spill B | local | smem B | occ. | warps | el/thread | SASS common | "
           "SASS sampled | SASS/elem | SASS/elem sampled program | FMA | fp64 |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in results:
        if not r["ok"]:
            out.append(f"| sm_{r['arch']} | {r['spec']} | **error** | | | | | | | | | | | | | |")
            continue
        out.append(
            f"| sm_{r['arch']} | {r['spec']} | yes | {r['registers']} | {r['spill_stores'] + r['spill_loads']} | "
            f"{r['stack_frame']} | {r['shared']} | {r['occupancy']:.0%} | {r['num_warps']} | {r['elements_per_thread']:g} | "
            f"{r['sass_common']} | {r['sass_sampled']} | {r['sass_per_element']} | {r['sass_per_element_sampled_program']} | "
            f"{r['fma']} | {r['fp64']} |"
        )
    out += ["", "Distinct compiles per configuration over a 200-step replay:", "",
            "| arch | kernel | configuration | compiles |", "|---|---|---|---|"]  # fmt: skip
    out += [f"| sm_{r['arch']} | {r['kernel']} | {r['config']} | {r['compiles']} |" for r in replays]
    return "\n".join(out) + "\n"


COMPARED = [(path, sr, st) for st in STATS for sr in (False, True) for path in ("unit", "group")]


def compare(before: str, after: str) -> str:
    """Markdown: SASS per element (registers, occupancy) of the 4/4 pow2 fp32 block-128 specializations
    and the factored path's, in two result files; and the medians over each file's matrix."""
    runs = []
    for path in (before, after):
        with open(path) as f:
            runs.append({(r["arch"], r["spec"]): r for r in json.load(f)["results"] if r.get("ok")})

    def cell(r, sampled=False):
        if r is None:
            return "-"
        extra = f"; sampled program {r['sass_per_element_sampled_program']}" if sampled and r.get("sass_sampled") else ""
        return f"{r['sass_per_element']} ({r['registers']} regs, {r['occupancy']:.0%}{extra})"

    out = [f"Generated by `python benchmarks/gpu_compile.py --compare {before} {after}`.", "",
           "| arch | specialization | before | after |", "|---|---|---|---|"]  # fmt: skip
    for arch in sorted({a for a, _ in runs[1]}, reverse=True):
        specs = [(Spec(path=p, stochastic=sr, stats=st), f"{p}, {'stochastic' if sr else 'nearest'}, {st}")
                 for p, sr, st in COMPARED]  # fmt: skip
        specs += [(Spec(path="factored", v_bits=0, stochastic=sr, stats=st), f"factored, {'stochastic' if sr else 'nearest'}, {st}")
                  for sr, st in ((False, "off"), (True, "probe"))]  # fmt: skip
        for spec, label in specs:
            key = (arch, spec.name())
            out.append(f"| sm_{arch} | {label} | {cell(runs[0].get(key))} | {cell(runs[1].get(key), True)} |")
    for name, run in zip(("before", "after"), runs):
        for arch in sorted({a for a, _ in run}, reverse=True):
            rs = [r for (a, _), r in run.items() if a == arch]
            out.append(f"- {name}, sm_{arch}: median {statistics.median(r['sass_per_element'] for r in rs):.1f} SASS/element "
                       f"over {len(rs)} specializations, most registers {max(r['registers'] for r in rs)}, lowest "
                       f"occupancy estimate {min(r['occupancy'] for r in rs):.1%}")  # fmt: skip
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a subset covering every feature once per arch")
    ap.add_argument("--arch", default="80,90", help="compute capabilities, comma separated (default 80,90)")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--markdown", help="write the table here")
    ap.add_argument("--replay-steps", type=int, default=200)
    ap.add_argument("--path", choices=("unit", "group", "factored"),
                    help="only this launch path's specializations (checking one kernel after a change to it)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                    help="compile nothing: print the before/after table of two --json results (key specializations)")
    args = ap.parse_args(argv)
    if args.compare:
        print(compare(*args.compare))
        return 0
    archs = [int(a) for a in args.arch.split(",")]
    specs = [sp for sp in matrix(args.quick) if args.path in (None, sp.path)]
    t0 = time.perf_counter()
    results, failures = [], []
    for arch in archs:
        for spec in specs:
            kernel, a, kw = launch(spec, index_offset=77 if spec.path == "factored" else 0)
            r = dict(compile_call(kernel, a, kw, arch), spec=spec.name(), **{f"spec_{k}": v for k, v in asdict(spec).items()})
            results.append(r)
            bad = problems(r)
            status = ", ".join(bad) if bad else "ok"
            if bad:
                failures.append(f"sm_{arch} {spec.name()}: {status}" + (f": {r.get('error', '')}" if not r["ok"] else ""))
            if r["ok"]:
                print(f"sm_{arch} {spec.name():<58} regs {r['registers']:>3} spill {r['spill_stores']}/{r['spill_loads']} "
                      f"smem {r['shared']:>5} occ {r['occupancy']:.0%} SASS/el {r['sass_per_element']:>6} {status}", flush=True)  # fmt: skip
            else:
                print(f"sm_{arch} {spec.name():<58} ERROR {r['error'][:300]}", flush=True)
    # the FMA detector can fail: the default configuration compiled with contraction on must be caught
    kernel, a, kw = launch(Spec())
    fused = compile_call(kernel, a, dict(kw, enable_fp_fusion=True), archs[-1])
    if "FMA contraction" not in problems(fused):
        failures.append("self-check: FMA contraction with enable_fp_fusion=True went undetected")
    else:
        print(f"self-check: enable_fp_fusion=True is detected ({fused['fma']} fma.rn.f32 in the PTX)")
    ok, msg = ftz_self_check(archs[-1])
    print(msg)
    if not ok:
        failures.append(msg)
    replays = []
    for arch in archs:
        rows = replay(args.replay_steps, arch)
        replays += rows
        for r in rows:
            print(f"replay sm_{arch} {r['kernel']:<26} {r['config']:<40} compiles {r['compiles']}")
            if r["compiles"] != 1:
                failures.append(f"replay sm_{arch} {r['kernel']} {r['config']}: {r['compiles']} compiles")
    wall = time.perf_counter() - t0
    cmd = ("python benchmarks/gpu_compile.py" + (" --quick" if args.quick else "") + f" --arch {args.arch}"
           + (f" --path {args.path}" if args.path else ""))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"command": cmd, "triton": triton.__version__, "wall_s": round(wall, 1), "results": results,
                       "replay": replays, "failures": failures,
                       "provenance": provenance(__file__, argv, deps=("gpu_compile",))}, f, indent=1)  # fmt: skip
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(results, replays, cmd))
    print(f"{len(results)} compiles checked, {len(replays)} replayed configurations, {wall:.0f} s")
    if failures:
        print(f"FAILED ({len(failures)}):\n  " + "\n  ".join(failures))
        return 1
    print("OK: every specialization compiles without spills, local memory, fp64, FMA contraction or .ftz; "
          "one compile per configuration")
    return 0


if __name__ == "__main__":
    sys.exit(main())
