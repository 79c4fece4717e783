#!/usr/bin/env python
"""Quality benchmark: every optimizer on the same real-data training runs, against fp32 AdamW.

Two tasks, each trained with the same seed, data order and step count for every optimizer:

``gpt``
    A megatron-core ``GPTModel`` (bf16 params with fp32 main params, byte-level vocabulary 256,
    local layer spec, rotary positions, tied embeddings) on the Python standard library's own
    source files (``stquant_megatron.testing.data``: ``TRAIN_FILES`` for training, the held-out
    ``VAL_FILES`` for validation). The batch of step ``s`` is ``global_batch`` windows of the training
    text at offsets drawn from a generator seeded by ``(seed, s)``; data-parallel rank ``r`` takes
    windows ``r, r + dp, ...``. Validation: fixed, evenly spaced windows of the held-out text,
    forward only (``forward_only=True`` through Megatron's pipeline schedule).

    - fp32 AdamW and ours run on 2 gloo CPU ranks (DP=2) through Megatron's
      ``DistributedOptimizer``: stock megatron-core (its torch ``AdamW`` inner optimizer), and
      patched by ``stquant_megatron.megatron.patch`` (``STQuantAdamW`` inner optimizer).
    - The peers (bitsandbytes ``AdamW8bit``, torchao ``AdamW8bit`` / ``AdamW4bit``) cannot be the
      inner optimizer of the ``DistributedOptimizer`` (it steps flat fp32 shards of parameters and
      reads/writes ``exp_avg``/``exp_avg_sq`` as dense tensors), so they run **on one rank**: the same
      GPTModel, built at DP=1 with Megatron's non-distributed mixed-precision optimizer
      (``Float16OptimizerWithFloat16Params``: fp32 main params, the same grad clipping and param
      groups), whose inner optimizer is replaced by the peer; same global batch (DP=1 rank takes all
      windows of the step). A stock fp32 AdamW run in that same 1-rank set-up is the reference of
      the peer rows (``val_loss_vs_adamw`` of a "(1 rank)" row is against "fp32 AdamW (1 rank)").

    ``--gpt-seeds N`` runs every configuration for seeds ``seed .. seed+N-1`` (the seed sets the
    initial weights and the data order) and reports the mean final val loss and the mean and
    standard deviation (n - 1) over seeds of ``final_val / final_val(fp32 AdamW, same seed, same
    world size)``; curves and bits history are the first seed's.

``digits``
    A small ViT (2x2 patches of scikit-learn's 8x8 ``load_digits`` images -> 16 tokens, class token,
    4 pre-norm transformer layers, dim 64) with the standalone optimizers on a fixed stratified
    split (75 % train / 25 % test, ``random_state=0``); reports test accuracy and test loss
    (``final_val_loss``). ``--digits-seeds K`` repeats every optimizer for seeds ``seed .. seed+K-1``
    (same seeds for all optimizers) and reports the means.

Optimizers: fp32 AdamW (torch), bitsandbytes AdamW8bit, torchao AdamW8bit and AdamW4bit, ours at
fixed 8 and 4 bits, ours adaptive at ``avg_bits`` 4.0 and 3.5 (``warmup_steps`` = 10 % of the
steps, ``interval`` = 7.5 % of the steps). All use the same betas, eps, weight decay (Megatron-style:
none on biases and norms), gradient clipping at 1.0 and a warm-up + cosine learning-rate schedule.

State bytes per parameter: storage actually allocated for the optimizer state (codes, scales,
qmaps/absmax, fp32 moments of unquantized tensors, step counters), tensor subclasses opened into
their inner tensors and each storage counted once; ours: ``STQuantAdamW.state_bytes()``. For the
2-rank runs the state of both ranks is summed (each rank holds a shard), divided by the model's
parameter count. Megatron's fp32 main params are not optimizer state and are not counted.
Reported twice: at the end of training (``state_bytes_per_param``) and at its peak
(``peak_state_bytes_per_param``): ours ``STQuantAdamW.peak_state_bytes()``, the high-water mark
since construction with precision transitions included (a re-coded unit briefly holds old and new
codes); the peers allocate their state once, at the first step, so theirs is the max of the state
bytes sampled after the first step, at every eval point and at the end. With several seeds: final
bytes are the mean, peak bytes the max over seeds.

torchao's optimizers compile their per-parameter step with ``torch.compile`` (inductor C++ on CPU);
the first step of each parameter shape compiles (tens of seconds on a loaded 2-core machine, cached
on disk afterwards), which shows in wall time only.

    python benchmarks/quality.py --quick --task all                   # smoke run, a few minutes
    python benchmarks/quality.py --task all --json benchmarks/results/quality.json --plots out/quality

``--json PATH`` writes ``{"task", "rows": [{"optimizer", "bits", "state_bytes_per_param",
"peak_state_bytes_per_param", "final_val_loss", "val_loss_vs_adamw", "val_loss_vs_adamw_std",
"accuracy"}]}`` (``val_loss_vs_adamw_std``: None unless GPT ran several seeds); with ``--task all`` one file per task, the task
name inserted before the suffix (``quality.json`` -> ``quality_gpt.json``, ``quality_digits.json``).
Next to each, ``<name>.meta.json`` holds what the rows do not: set-up, hardware, versions, command,
wall times, loss curves, per-seed results and the adaptive runs' bits history (every decision of
the run, recorded by a decision callback; ``benchmarks/results_table.py`` reads the meta file).
``--plots DIR`` writes ``quality_<task>_loss.png`` (train/val loss curves per optimizer),
``quality_<task>_memory.png`` (peak state bytes/param vs final val loss) and
``quality_<task>_bits_avg<X>.png`` (bits heatmap of each adaptive run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
if os.path.dirname(os.path.abspath(__file__)) not in sys.path:
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from provenance import hardware, provenance, versions  # noqa: E402,F401  (benchmarks/ is a script folder)

BETAS, EPS, WEIGHT_DECAY, CLIP = (0.9, 0.95), 1e-8, 0.1, 1.0

# megatron-core warns about missing Apex / Transformer Engine when the ranks' fork server imports it
# (before any in-process filter exists); the environment variable reaches that process.
os.environ.setdefault(
    "PYTHONWARNINGS",
    "ignore:Transformer Engine and Apex are not installed,ignore:Apex is not installed,"
    "ignore:Transformer Engine is not installed",
)


# ----------------------------------------------------------------------------------- optimizers
@dataclass
class OptSpec:
    key: str
    label: str
    bits: str
    family: str  # torch | bnb8 | ao8 | ao4 | stq
    config: dict | None = None
    default: bool = True  # False: runs only when named in --optimizers


# provenance: specs begin
def optimizer_specs(steps: int, only: list[str] | None = None) -> list[OptSpec]:
    """The compared optimizers; adaptive runs' warm-up and interval scale with the run length."""
    warmup = max(1, round(0.10 * steps))
    interval = max(4, round(0.075 * steps))
    sched = dict(warmup_steps=warmup, interval=interval, stats_steps=min(4, interval))
    # the GPT task is Megatron (packed anyway); digits: the same rows. The rows name their rounding:
    # scheduled runs round stochastically by default (STQuantConfig), these rows round to nearest.
    packed = dict(exp_avg_sq_format="packed", stochastic_rounding=False)
    specs = [
        OptSpec("adamw", "fp32 AdamW", "32", "torch"),
        # exactly what STQuantConfig() / --stquant alone give (scheduler warm-up and interval at their defaults)
        OptSpec("default", "STQuant default, STQuantConfig()", "auto 3.0, SR", "stq", {}),
        OptSpec("bnb8", "bnb AdamW8bit", "8", "bnb8"),
        OptSpec("ao8", "torchao AdamW8bit", "8", "ao8"),
        OptSpec("ao4", "torchao AdamW4bit", "4", "ao4"),
        OptSpec("stq8", "STQuant 8-bit", "8", "stq", dict(bits=8, **packed)),
        OptSpec("stq4", "STQuant 4-bit", "4", "stq", dict(bits=4, **packed)),
        OptSpec("auto4.0", "STQuant adaptive 4.0, nearest", "auto 4.0", "stq", dict(avg_bits=4.0, **packed, **sched)),
        OptSpec("auto3.5", "STQuant adaptive 3.5, nearest", "auto 3.5", "stq", dict(avg_bits=3.5, **packed, **sched)),
    ]
    # the frontier's configurations (benchmarks/frontier.py), run when named; factored ones too
    lean = dict(scale_dtype="bf16", block_size=256, **packed)
    fact = dict(exp_avg_sq_format="factored", stochastic_rounding=False)
    for avg in (3.0, 2.5):
        specs.append(OptSpec(f"auto{avg}", f"STQuant adaptive {avg}, nearest", f"auto {avg}", "stq",
                             dict(avg_bits=avg, **packed, **sched), default=False))  # fmt: skip
        specs.append(OptSpec(f"auto{avg}-lean", f"STQuant adaptive {avg}, nearest, bf16 scales, block 256", f"auto {avg}", "stq",
                             dict(avg_bits=avg, **lean, **sched), default=False))  # fmt: skip
    specs.append(OptSpec("fact4", "STQuant 4-bit m, factored v", "4 + fact.", "stq", dict(bits=4, **fact), default=False))
    for avg in (5.5, 4.0, 3.0):
        specs.append(OptSpec(f"fact-auto{avg}", f"STQuant adaptive {avg} m, factored v", f"auto {avg} + fact.", "stq",
                             dict(avg_bits=avg, **fact, **sched), default=False))  # fmt: skip
    if only:
        unknown = sorted(set(only) - {s.key for s in specs})
        if unknown:
            raise SystemExit(f"--optimizers: unknown {unknown}; choose from {[s.key for s in specs]}")
        return [s for s in specs if s.key in only or s.key == "adamw"]
    return [s for s in specs if s.default]
# provenance: specs end


def _clean_groups(groups: list[dict]) -> list[dict]:
    """Param-group dicts without the previous optimizer's hyper-parameter keys (Megatron's own
    keys such as ``wd_mult``/``lr_mult`` are kept)."""
    drop = {"lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "maximize", "capturable",
            "differentiable", "fused", "decoupled_weight_decay", "step", "initial_lr"}  # fmt: skip
    return [{k: v for k, v in g.items() if k not in drop} for g in groups]


def make_optimizer(family: str, groups, lr: float, config: dict | None = None):
    """A fresh optimizer of ``family`` over ``groups`` (param-group dicts)."""
    kw = dict(lr=lr, betas=BETAS, eps=EPS, weight_decay=WEIGHT_DECAY)
    if family == "torch":
        return torch.optim.AdamW(groups, **kw)
    if family == "bnb8":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(groups, **kw)
    if family in ("ao8", "ao4"):
        import torchao.optim

        return (torchao.optim.AdamW8bit if family == "ao8" else torchao.optim.AdamW4bit)(groups, **kw)
    if family == "stq":
        from stquant_megatron import STQuantAdamW, STQuantConfig

        return STQuantAdamW(groups, **kw, config=STQuantConfig(**(config or {})))
    raise ValueError(family)


def _storages(obj: Any, out: dict[int, int]) -> None:
    from stquant_megatron import PackedState

    if isinstance(obj, PackedState):
        _storages(obj.codes, out)
        _storages(obj.scale, out)
    elif torch.is_tensor(obj):
        if type(obj) not in (torch.Tensor, torch.nn.Parameter) and hasattr(obj, "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                _storages(getattr(obj, name), out)
            return
        s = obj.untyped_storage()
        out[s.data_ptr()] = s.nbytes()
    elif isinstance(obj, dict):
        for v in obj.values():
            _storages(v, out)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _storages(v, out)


def state_bytes(opt) -> int:
    """Bytes of optimizer state actually allocated (ours: ``state_bytes()``; others: every distinct
    storage reachable from ``opt.state``, tensor subclasses opened)."""
    if hasattr(opt, "state_bytes"):
        return int(opt.state_bytes())
    out: dict[int, int] = {}
    for st in opt.state.values():
        _storages(st, out)
    return sum(out.values())


class PeakMeter:
    """Peak optimizer-state bytes of one process. Ours (``peak_state_bytes()``): the optimizer's own
    high-water mark, transitions included. Others allocate their state once, at the first step: the
    max of ``state_bytes`` sampled after the first step, at every eval point and at the end."""

    def __init__(self, opts: list):
        self.opts = list(opts)
        self.sampled = 0

    def sample(self) -> None:
        self.sampled = max(self.sampled, sum(state_bytes(o) for o in self.opts))

    def value(self) -> int:
        if all(hasattr(o, "peak_state_bytes") for o in self.opts):
            return sum(int(o.peak_state_bytes()) for o in self.opts)
        self.sample()
        return self.sampled


def record_decisions(opt) -> list[dict]:
    """Every scheduler decision of ``opt`` (the scheduler keeps only the last few in memory): a list
    that a decision callback fills with ``Decision.row(names)``."""
    rows: list[dict] = []
    opt.decision_callbacks.append(lambda d, o: rows.append(d.row(o.scheduler.names)))
    return rows


def _mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for fewer than 2 values)."""
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, None
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def lr_at(step: int, steps: int, lr: float, warmup_frac: float = 0.05, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to ``final_frac * lr`` (the same for every optimizer)."""
    warm = max(1, round(warmup_frac * steps))
    if step < warm:
        return lr * (step + 1) / warm
    t = (step - warm) / max(1, steps - warm)
    return lr * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * min(1.0, t))))


def set_lr(param_groups, lr: float, weight_decay: float = WEIGHT_DECAY) -> None:
    """What Megatron's OptimizerParamScheduler does: lr * lr_mult, weight_decay * wd_mult."""
    for g in param_groups:
        v = lr * g.get("lr_mult", 1.0)
        if torch.is_tensor(g["lr"]):
            g["lr"].fill_(v)  # torchao keeps lr as a tensor
        else:
            g["lr"] = v
        g["weight_decay"] = weight_decay * g.get("wd_mult", 1.0)


def _progress(total: int, desc: str, enabled: bool = True):
    from tqdm import tqdm

    tty = sys.stderr.isatty()
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, dynamic_ncols=True,
                mininterval=0.5 if tty else 15.0, leave=True)  # fmt: skip


# ----------------------------------------------------------------------------------- GPT task
@dataclass
class GPTSetup:
    steps: int = 200
    layers: int = 2
    hidden: int = 128
    heads: int = 4
    seq: int = 64
    global_batch: int = 8
    lr: float = 1.5e-3  # near the fp32-AdamW optimum of this set-up (3e-3 and 1e-3 are worse)
    seed: int = 1234
    eval_every: int = 25
    val_windows_curve: int = 32
    val_windows: int = 256
    eval_batch: int = 16


def _gpt_train_batch(tokens: torch.Tensor, step: int, setup: GPTSetup, dp_rank: int, dp_size: int):
    gen = torch.Generator().manual_seed(setup.seed * 1_000_003 + step)
    offsets = torch.randint(0, tokens.numel() - setup.seq - 1, (setup.global_batch,), generator=gen)
    mine = offsets[dp_rank::dp_size]
    return [_microbatch(tokens, mine, setup.seq)]


def _microbatch(tokens: torch.Tensor, offsets: torch.Tensor, seq: int) -> dict:
    idx = offsets[:, None] + torch.arange(seq + 1)
    window = tokens[idx]
    n = len(offsets)
    return dict(
        tokens=window[:, :-1].contiguous(), labels=window[:, 1:].contiguous(),
        loss_mask=torch.ones(n, seq, dtype=torch.float32),
        position_ids=torch.arange(seq).unsqueeze(0).expand(n, -1).contiguous(),
    )  # fmt: skip


def _gpt_val_loss(model, optimizer, tokens: torch.Tensor, n_windows: int, setup: GPTSetup, dp_rank: int,
                  dp_size: int) -> float:
    """Mean LM loss on ``n_windows`` evenly spaced held-out windows (the same on every DP size)."""
    from stquant_megatron.testing import gpt

    n_windows = max(dp_size, n_windows - n_windows % dp_size)
    offsets = torch.linspace(0, tokens.numel() - setup.seq - 2, n_windows).long()
    mine = offsets[dp_rank::dp_size]
    mbs = max(1, setup.eval_batch // dp_size)
    mbs = min(mbs, len(mine))
    while len(mine) % mbs:
        mbs -= 1
    microbatches = [_microbatch(tokens, mine[i:i + mbs], setup.seq) for i in range(0, len(mine), mbs)]
    for chunk in model:
        chunk.eval()
    with torch.no_grad():
        loss = gpt.train_step(model, optimizer, microbatches, forward_only=True)["loss"]
    for chunk in model:
        chunk.train()
    return loss


def gpt_rank(rank: int, world: int, spec: dict, setup: dict, progress: bool = True) -> dict:
    """One rank of one GPT run: build (stock / patched / peer), train, evaluate; see module doc."""
    warnings.filterwarnings("ignore", message=".*(Apex|Transformer Engine|TE) .*not installed.*")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch._functorch")
    from megatron.core import parallel_state as ps

    from stquant_megatron import STQuantConfig
    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel
    from stquant_megatron.testing.data import stdlib_corpus

    spec, setup = OptSpec(**spec), GPTSetup(**setup)
    init_megatron_parallel(1, 1, seed=setup.seed)
    dp_rank, dp_size = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
    if spec.family == "stq":
        patch(STQuantConfig(**spec.config))
    else:
        unpatch()
    distributed = spec.family == "stq" or world > 1
    model = gpt.build_gpt_model(
        num_layers=setup.layers, hidden_size=setup.hidden, num_attention_heads=setup.heads,
        seq_length=setup.seq, bf16=True, ddp_overrides={"use_distributed_optimizer": distributed},
    )  # fmt: skip
    optimizer = gpt.build_optimizer(model, lr=setup.lr, weight_decay=WEIGHT_DECAY, clip_grad=CLIP,
                                    adam_beta1=BETAS[0], adam_beta2=BETAS[1], adam_eps=EPS,
                                    use_distributed_optimizer=distributed)  # fmt: skip
    inners = gpt.distributed_optimizers(optimizer)
    if spec.family not in ("torch", "stq"):
        for mo in inners:  # Megatron's Float16Optimizer keeps fp32 main params in its inner groups
            mo.optimizer = make_optimizer(spec.family, _clean_groups(mo.optimizer.param_groups), setup.lr)
    inner_types = sorted({type(mo.optimizer).__name__ for mo in inners})
    if spec.family == "stq" and inner_types != ["STQuantAdamW"]:
        raise RuntimeError(f"patch did not install STQuantAdamW (inner optimizers: {inner_types})")
    nparams = sum(p.numel() for p in model[0].parameters())
    # a fingerprint of the initial weights (shows that the seed changes the init)
    init_fingerprint = float(sum(p.detach().float().sum().item() for p in model[0].parameters()))
    inner = inners[0].optimizer
    scheduled = spec.family == "stq" and getattr(inner, "scheduler", None) is not None
    decisions = record_decisions(inner) if scheduled else None
    peak = PeakMeter([mo.optimizer for mo in inners])

    train_tokens, val_tokens = stdlib_corpus("train"), stdlib_corpus("val")
    train_curve, val_curve = [], []
    bar = _progress(setup.steps, f"gpt | {spec.label}{' (1 rank)' if world == 1 else ''}", progress and rank == 0)
    t0 = time.perf_counter()
    for step in range(setup.steps):
        set_lr(optimizer.param_groups, lr_at(step, setup.steps, setup.lr))
        out = gpt.train_step(model, optimizer, _gpt_train_batch(train_tokens, step, setup, dp_rank, dp_size))
        if not math.isfinite(out["loss"]):
            raise FloatingPointError(f"{spec.label}: non-finite loss at step {step}")
        train_curve.append(out["loss"])
        if step == 0:
            peak.sample()
        if setup.eval_every and (step + 1) % setup.eval_every == 0 and step + 1 < setup.steps:
            peak.sample()
            val_curve.append((step + 1, _gpt_val_loss(model, optimizer, val_tokens, setup.val_windows_curve,
                                                      setup, dp_rank, dp_size)))  # fmt: skip
        bar.update(1)
        bar.set_postfix(loss=f"{out['loss']:.3f}", refresh=False)
    train_seconds = time.perf_counter() - t0
    final_val = _gpt_val_loss(model, optimizer, val_tokens, setup.val_windows, setup, dp_rank, dp_size)
    val_curve.append((setup.steps, final_val))
    bar.set_postfix(loss=f"{train_curve[-1]:.3f}", val=f"{final_val:.3f}")
    bar.close()
    res = dict(
        train_curve=train_curve, val_curve=val_curve, final_val=final_val, nparams=nparams,
        state_bytes=sum(state_bytes(mo.optimizer) for mo in inners), peak_state_bytes=peak.value(),
        train_seconds=train_seconds, inner=inner_types, world=world, seed=setup.seed,
        init_fingerprint=init_fingerprint,
    )  # fmt: skip
    if scheduled and rank == 0:
        res["bits_history"] = {"names": list(inner.scheduler.names), "history": decisions}
        res["avg_bits"] = inner.scheduler.average_bits()
    return res


def run_gpt(specs: list[OptSpec], setup: GPTSetup, progress: bool = True, log=print,
            threads: int = 1, seeds: int = 1) -> tuple[list[dict], dict]:
    """Every optimizer on the GPT task, each configuration for seeds ``setup.seed + i``
    (``i < seeds``). Returns (rows, meta)."""
    from stquant_megatron.testing import run_distributed

    jobs = []
    for spec in specs:
        if spec.family == "stq" or spec.key == "adamw":
            jobs.append((spec, 2))
        if spec.family not in ("stq",):
            jobs.append((spec, 1))
    # the 1-rank fp32 reference only matters when a peer runs
    if not any(s.family in ("bnb8", "ao8", "ao4") for s in specs):
        jobs = [j for j in jobs if not (j[0].key == "adamw" and j[1] == 1)]
    seed_list = [setup.seed + i for i in range(max(1, seeds))]
    runs: dict[str, dict] = {}
    for spec, world in jobs:
        per_seed = []
        t0 = time.perf_counter()
        try:
            for seed in seed_list:
                s_setup = GPTSetup(**{**asdict(setup), "seed": seed})
                results = run_distributed(gpt_rank, world, asdict(spec), asdict(s_setup), progress,
                                          timeout=max(600.0, 20.0 * setup.steps), num_threads=threads)  # fmt: skip
                r = dict(results[0])
                r["state_bytes"] = sum(x["state_bytes"] for x in results)
                r["peak_state_bytes"] = sum(x["peak_state_bytes"] for x in results)
                per_seed.append(r)
        except Exception as e:  # a peer that cannot run is reported, not fatal
            log(f"  !! {spec.label} ({world} rank{'s' if world > 1 else ''}) failed: {type(e).__name__}: {e}")
            continue
        r = dict(per_seed[0])  # curves, bits history: first seed
        r["final_val"] = sum(x["final_val"] for x in per_seed) / len(per_seed)
        r["state_bytes"] = sum(x["state_bytes"] for x in per_seed) / len(per_seed)
        r["peak_state_bytes"] = max(x["peak_state_bytes"] for x in per_seed)
        r["per_seed"] = [{k: x[k] for k in ("seed", "final_val", "state_bytes", "peak_state_bytes", "train_seconds",
                                            "init_fingerprint")} for x in per_seed]  # fmt: skip
        r["wall_seconds"] = time.perf_counter() - t0
        runs[f"{spec.key}@{world}"] = dict(spec=asdict(spec), **r)
        log(f"  {spec.label} ({world} rank{'s' if world > 1 else ''}): val loss {r['final_val']:.4f}"
            + (f" (mean of {len(per_seed)} seeds)" if len(per_seed) > 1 else "")
            + f", {r['wall_seconds']:.0f} s (training {sum(x['train_seconds'] for x in per_seed):.0f} s)", flush=True)
    # val loss / fp32 AdamW of the same seed and world size, then mean and std over seeds
    for name, r in runs.items():
        ref = runs.get(f"adamw@{r['world']}")
        ref_val = {x["seed"]: x["final_val"] for x in ref["per_seed"]} if ref else {}
        for x in r["per_seed"]:
            x["vs_adamw"] = x["final_val"] / ref_val[x["seed"]] if x["seed"] in ref_val else float("nan")
        r["vs_adamw"], r["vs_adamw_std"] = _mean_std([x["vs_adamw"] for x in r["per_seed"]])
    rows = []
    for name, r in runs.items():
        spec = OptSpec(**r["spec"])
        world = r["world"]
        label = spec.label + (" (1 rank)" if world == 1 else "")
        rows.append(dict(
            optimizer=label, bits=spec.bits, state_bytes_per_param=r["state_bytes"] / r["nparams"],
            peak_state_bytes_per_param=r["peak_state_bytes"] / r["nparams"],
            final_val_loss=r["final_val"], val_loss_vs_adamw=r["vs_adamw"], val_loss_vs_adamw_std=r["vs_adamw_std"],
            accuracy=None,
        ))  # fmt: skip
    seeds_text = (f"; val loss and its ratio to fp32 AdamW (same seed) are means over seeds {seed_list}, "
                  "± the standard deviation of the ratio over seeds") if len(seed_list) > 1 else f"; seed {seed_list[0]}"
    meta = dict(
        task="gpt",
        setup=asdict(setup),
        description=(
            f"megatron-core {_mcore_version()} GPTModel ({setup.layers} layers, hidden {setup.hidden}, {setup.heads} heads, "
            f"seq {setup.seq}, byte vocab 256, bf16 params + fp32 main params), {_nparams(runs):,} "
            f"parameters; Python stdlib sources ({setup.steps} steps, global batch {setup.global_batch} x {setup.seq} bytes); "
            f"val = {setup.val_windows} held-out windows" + seeds_text
        ),
        notes=[
            "fp32 AdamW and STQuant rows: 2 gloo CPU ranks (DP=2), Megatron DistributedOptimizer "
            "(stock: torch AdamW inner; ours: patched, STQuantAdamW inner).",
            "Peer rows marked '(1 rank)': bitsandbytes/torchao cannot be the DistributedOptimizer's inner "
            "optimizer, so they run in the same GPTModel at DP=1 with Megatron's non-distributed "
            "Float16Optimizer (fp32 main params, same clipping and param groups), same global batch; their "
            "val_loss_vs_adamw is against 'fp32 AdamW (1 rank)', the same set-up with torch AdamW.",
        ],
        seeds=seed_list,
        runs={k: {kk: vv for kk, vv in v.items()} for k, v in runs.items()},
    )
    if len(seed_list) > 1:
        meta["notes"].append(
            f"Each configuration ran with seeds {seed_list} (initial weights and data order); curves and bits "
            "heatmaps are the first seed's; state bytes/param: mean over seeds, peak: max over seeds; "
            "per-seed numbers in the .meta.json (runs.*.per_seed)."
        )
    return rows, meta


def _nparams(runs: dict) -> int:
    return next(iter(runs.values()))["nparams"] if runs else 0


def _mcore_version() -> str:
    from importlib import metadata

    try:
        return metadata.version("megatron-core")
    except metadata.PackageNotFoundError:
        return "?"


# ----------------------------------------------------------------------------------- digits task
@dataclass
class DigitsSetup:
    steps: int = 400
    dim: int = 64
    layers: int = 4
    heads: int = 4
    batch: int = 64
    lr: float = 4e-3
    seed: int = 0
    seeds: int = 1
    eval_every: int = 50


class TinyViT(torch.nn.Module):
    """2x2 patches of 8x8 grey images -> 16 tokens + class token, pre-norm encoder, linear head."""

    def __init__(self, dim: int = 64, layers: int = 4, heads: int = 4, patch: int = 2):
        super().__init__()
        self.patch = patch
        n = (8 // patch) ** 2
        self.embed = torch.nn.Linear(patch * patch, dim)
        self.cls = torch.nn.Parameter(torch.zeros(1, 1, dim))
        self.pos = torch.nn.Parameter(torch.randn(1, n + 1, dim) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout=0.0, batch_first=True,
                                                 norm_first=True, activation="gelu")  # fmt: skip
        self.body = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = torch.nn.LayerNorm(dim)
        self.head = torch.nn.Linear(dim, 10)

    def forward(self, x):  # x: [B, 8, 8]
        b, p = x.shape[0], self.patch
        t = x.reshape(b, 8 // p, p, 8 // p, p).permute(0, 1, 3, 2, 4).reshape(b, -1, p * p)
        h = torch.cat([self.cls.expand(b, -1, -1), self.embed(t)], dim=1) + self.pos
        return self.head(self.norm(self.body(h))[:, 0])


def digits_data():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    x = (x - 0.5) / 0.5
    y = torch.tensor(d.target, dtype=torch.int64)
    idx_tr, idx_te = train_test_split(range(len(y)), test_size=0.25, random_state=0, stratify=d.target)
    return x[idx_tr], y[idx_tr], x[idx_te], y[idx_te]


def _digits_groups(model):
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or n in ("cls", "pos") else decay).append((n, p))
    return [dict(params=[p for _, p in decay], wd_mult=1.0, names=[n for n, _ in decay]),
            dict(params=[p for _, p in no_decay], wd_mult=0.0, names=[n for n, _ in no_decay])]  # fmt: skip


def digits_run(spec: OptSpec, setup: DigitsSetup, seed: int, data, progress: bool = True) -> dict:
    xtr, ytr, xte, yte = data
    torch.manual_seed(seed)
    model = TinyViT(setup.dim, setup.layers, setup.heads)
    nparams = sum(p.numel() for p in model.parameters())
    groups = _digits_groups(model)
    names = [g.pop("names") for g in groups]
    opt = make_optimizer(spec.family, groups, setup.lr, spec.config)
    if hasattr(opt, "set_param_name"):
        for g, ns in zip(opt.param_groups, names):
            for p, n in zip(g["params"], ns):
                opt.set_param_name(p, n)
    decisions = record_decisions(opt) if getattr(opt, "scheduler", None) is not None else None
    peak = PeakMeter([opt])
    gen = torch.Generator().manual_seed(seed * 7919 + 1)
    order = torch.empty(0, dtype=torch.int64)
    train_curve, val_curve = [], []
    loss_fn = torch.nn.functional.cross_entropy

    def evaluate():
        model.eval()
        with torch.no_grad():
            logits = model(xte)
            loss, acc = loss_fn(logits, yte).item(), (logits.argmax(-1) == yte).float().mean().item()
        model.train()
        return loss, acc

    bar = _progress(setup.steps, f"digits | {spec.label} | seed {seed}", progress)
    t0 = time.perf_counter()
    for step in range(setup.steps):
        if order.numel() < setup.batch:  # epochs of a seeded permutation; the tail joins the next epoch
            order = torch.cat([order, torch.randperm(len(ytr), generator=gen)])
        idx, order = order[: setup.batch], order[setup.batch:]
        set_lr(opt.param_groups, lr_at(step, setup.steps, setup.lr))
        loss = loss_fn(model(xtr[idx]), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        train_curve.append(loss.item())
        if step == 0:
            peak.sample()
        if setup.eval_every and (step + 1) % setup.eval_every == 0 and step + 1 < setup.steps:
            peak.sample()
            val_curve.append((step + 1, evaluate()[0]))
        bar.update(1)
        bar.set_postfix(loss=f"{train_curve[-1]:.3f}", refresh=False)
    seconds = time.perf_counter() - t0
    val, acc = evaluate()
    val_curve.append((setup.steps, val))
    bar.set_postfix(loss=f"{train_curve[-1]:.3f}", val=f"{val:.3f}", acc=f"{acc:.4f}")
    bar.close()
    res = dict(train_curve=train_curve, val_curve=val_curve, final_val=val, accuracy=acc, nparams=nparams,
               state_bytes=state_bytes(opt), peak_state_bytes=peak.value(), train_seconds=seconds)  # fmt: skip
    if decisions is not None:
        res["bits_history"] = {"names": list(opt.scheduler.names), "history": decisions}
        res["avg_bits"] = opt.scheduler.average_bits()
    return res


def run_digits(specs: list[OptSpec], setup: DigitsSetup, progress: bool = True, log=print) -> tuple[list[dict], dict]:
    data = digits_data()
    runs: dict[str, dict] = {}
    seeds = [setup.seed + i for i in range(setup.seeds)]
    for spec in specs:
        t0 = time.perf_counter()
        try:
            per_seed = [digits_run(spec, setup, s, data, progress) for s in seeds]
        except Exception as e:
            log(f"  !! {spec.label} failed: {type(e).__name__}: {e}")
            continue
        r = dict(per_seed[0])  # curves, bits history: first seed
        r["final_val"] = sum(x["final_val"] for x in per_seed) / len(per_seed)
        r["accuracy"] = sum(x["accuracy"] for x in per_seed) / len(per_seed)
        r["state_bytes"] = sum(x["state_bytes"] for x in per_seed) / len(per_seed)
        r["peak_state_bytes"] = max(x["peak_state_bytes"] for x in per_seed)
        r["per_seed"] = [dict(seed=s, final_val=x["final_val"], accuracy=x["accuracy"], state_bytes=x["state_bytes"],
                              peak_state_bytes=x["peak_state_bytes"]) for s, x in zip(seeds, per_seed)]  # fmt: skip
        r["wall_seconds"] = time.perf_counter() - t0
        runs[spec.key] = dict(spec=asdict(spec), world=1, **r)
        log(f"  {spec.label}: accuracy {100 * r['accuracy']:.2f}%, test loss {r['final_val']:.4f}, "
            f"{r['wall_seconds']:.0f} s", flush=True)
    ref = runs.get("adamw")
    rows = []
    for r in runs.values():
        spec = OptSpec(**r["spec"])
        rows.append(dict(
            optimizer=spec.label, bits=spec.bits, state_bytes_per_param=r["state_bytes"] / r["nparams"],
            peak_state_bytes_per_param=r["peak_state_bytes"] / r["nparams"],
            final_val_loss=r["final_val"], val_loss_vs_adamw=(r["final_val"] / ref["final_val"]) if ref else float("nan"),
            val_loss_vs_adamw_std=None, accuracy=r["accuracy"],
        ))  # fmt: skip
    xtr, _, xte, _ = data
    meta = dict(
        task="digits",
        setup=asdict(setup),
        description=(
            f"ViT ({setup.layers} layers, dim {setup.dim}, 2x2 patches, {_nparams(runs):,} "
            f"parameters) on scikit-learn load_digits ({len(xtr)} train / {len(xte)} test, stratified, random_state=0), "
            f"{setup.steps} steps of batch {setup.batch}, standalone optimizers"
            + (f"; accuracy and loss are means over seeds {seeds}" if len(seeds) > 1 else f"; seed {seeds[0]}")
        ),
        notes=["final_val_loss = test-set cross-entropy; accuracy = test-set accuracy (fraction)."]
        + (["state bytes/param: mean over seeds; peak: max over seeds."] if len(seeds) > 1 else []),
        seeds=seeds,
        runs=runs,
    )
    return rows, meta


# ----------------------------------------------------------------------------------- output
def print_table(task: str, rows: list[dict], log=print) -> None:
    log(f"\n[{task}]")
    head = (f"{'optimizer':34s} {'bits':>9s} {'state B/param':>13s} {'peak B/param':>12s} {'final val loss':>14s} "
            f"{'val/AdamW':>18s} {'accuracy':>8s}")  # fmt: skip
    log(head)
    log("-" * len(head))
    for r in rows:
        acc = "" if r["accuracy"] is None else f"{100 * r['accuracy']:7.2f}%"
        ratio = f"{r['val_loss_vs_adamw']:.4f}"
        if r.get("val_loss_vs_adamw_std") is not None:
            ratio += f" ± {r['val_loss_vs_adamw_std']:.4f}"
        log(f"{r['optimizer']:34s} {r['bits']:>9s} {r['state_bytes_per_param']:13.3f} "
            f"{r['peak_state_bytes_per_param']:12.3f} {r['final_val_loss']:14.4f} {ratio:>18s} {acc:>8s}")  # fmt: skip


def json_path(path: str, task: str, several: bool) -> str:
    if not several:
        return path
    stem, ext = os.path.splitext(path)
    return f"{stem}_{task}{ext or '.json'}"


def write_json(path: str, task: str, rows: list[dict], meta: dict) -> str:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump({"task": task, "rows": rows}, f, indent=1)
    stem, _ = os.path.splitext(path)
    with open(stem + ".meta.json", "w") as f:
        json.dump(meta, f, indent=1, default=str)
    return path


def plots(task: str, meta: dict, rows: list[dict], out_dir: str, prefix: str | None = None) -> list[str]:
    """Write ``<prefix>_loss.png``, ``<prefix>_memory.png`` and ``<prefix>_bits_avg<X>.png`` (one per
    adaptive run) to ``out_dir``; ``prefix`` defaults to ``quality_<task>``. Returns the paths."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from stquant_megatron.report import heatmap

    os.makedirs(out_dir, exist_ok=True)
    prefix = prefix or f"quality_{task}"
    written = []
    runs = meta["runs"]
    labels = {k: OptSpec(**r["spec"]).label + (" (1 rank)" if task == "gpt" and r["world"] == 1 else "") for k, r in runs.items()}

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.8))
    for k, r in runs.items():
        tc = torch.tensor(r["train_curve"])
        w = max(1, len(tc) // 25)
        smooth = torch.nn.functional.avg_pool1d(tc[None, None], w, 1).flatten() if len(tc) >= w else tc
        style = "--" if "(1 rank)" in labels[k] else "-"
        ax1.plot(range(w, w + len(smooth)), smooth, style, label=labels[k], lw=1.2)
        vs, vl = zip(*r["val_curve"])
        ax2.plot(vs, vl, style + "o", label=labels[k], lw=1.2, ms=3)
    ax1.set(xlabel="step", ylabel="train loss (moving average)", title=f"{task}: train loss")
    ax2.set(xlabel="step", ylabel="validation loss" if task == "gpt" else "test loss", title=f"{task}: held-out loss")
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
    ax2.legend(fontsize=7)
    # zoom on the part of the run where the curves separate
    lo = min(min(v for _, v in r["val_curve"]) for r in runs.values())
    hi = max(r["val_curve"][len(r["val_curve"]) // 3][1] for r in runs.values())
    if hi > lo:
        ax2.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_loss.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for r in rows:
        ours = r["optimizer"].startswith("STQuant")
        ax.scatter(r["peak_state_bytes_per_param"], r["final_val_loss"], marker="o" if ours else "s",
                   color="tab:red" if ours else "tab:blue")  # fmt: skip
        ax.annotate(r["optimizer"], (r["peak_state_bytes_per_param"], r["final_val_loss"]), fontsize=7,
                    xytext=(4, 3), textcoords="offset points")  # fmt: skip
    ax.set_xscale("log", base=2)
    ax.set(xlabel="peak optimizer state bytes per parameter (log2)", ylabel="final validation loss",
           title=f"{task}: memory vs quality (red: STQuant)")  # fmt: skip
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = os.path.join(out_dir, f"{prefix}_memory.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)

    for k, r in runs.items():
        hist = r.get("bits_history")
        if hist and hist.get("history"):
            path = os.path.join(out_dir, f"{prefix}_bits_{k.split('@')[0].replace('auto', 'avg')}.png")
            heatmap(hist, path, title=f"{task}: {labels[k]} bits per unit")
            written.append(path)
    return written


# ----------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", choices=("gpt", "digits", "all"), default="all")
    ap.add_argument("--quick", action="store_true", help="short run (smoke test): both tasks in a few minutes")
    ap.add_argument("--json", metavar="PATH", help="write results (with --task all: PATH with _gpt/_digits inserted)")
    ap.add_argument("--plots", metavar="DIR", help="write loss-curve, memory-vs-loss and bits-heatmap PNGs")
    ap.add_argument("--gpt-steps", type=int, help="GPT training steps (default 200; --quick 40)")
    ap.add_argument("--digits-steps", type=int, help="digits training steps (default 400; --quick 120)")
    ap.add_argument("--gpt-seeds", type=int, default=1,
                    help="GPT: seeds per configuration (setup seed + i: initial weights and data order); mean val "
                         "loss, mean and std of the ratio to fp32 AdamW of the same seed (default 1)")
    ap.add_argument("--digits-seeds", type=int, help="digits: seeds per optimizer, results averaged (default 1)")
    ap.add_argument("--optimizers", nargs="+", metavar="KEY",
                    help="subset: adamw bnb8 ao8 ao4 stq8 stq4 auto4.0 auto3.5, or the frontier's auto3.0 auto2.5 "
                         "auto3.0-lean auto2.5-lean fact4 fact-auto5.5 fact-auto4.0 fact-auto3.0 (not run by "
                         "default) (adamw always runs)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads per process (default 1: on a shared 2-core machine more threads per "
                         "process oversubscribe the cores and can be 10-40x slower)")
    ap.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    if args.gpt_seeds < 1 or (args.digits_seeds is not None and args.digits_seeds < 1):
        ap.error("--gpt-seeds / --digits-seeds must be at least 1")
    torch.set_num_threads(args.threads)

    tasks = ["gpt", "digits"] if args.task == "all" else [args.task]
    progress = not args.no_progress
    t_all = time.perf_counter()
    print(f"hardware: {hardware()}", flush=True)
    for task in tasks:
        t0 = time.perf_counter()
        if task == "gpt":
            setup = GPTSetup()
            if args.quick:
                setup = GPTSetup(steps=40, layers=2, hidden=64, seq=64, global_batch=8, eval_every=20,
                                 val_windows_curve=16, val_windows=64)  # fmt: skip
            if args.gpt_steps:
                setup.steps = args.gpt_steps
                setup.eval_every = max(1, setup.steps // 6)
            specs = optimizer_specs(setup.steps, args.optimizers)
            print(f"\n== gpt: {setup.steps} steps x {args.gpt_seeds} seed(s), {len(specs)} optimizers "
                  "(peers and an fp32 reference on 1 rank) ==", flush=True)
            rows, meta = run_gpt(specs, setup, progress, threads=args.threads, seeds=args.gpt_seeds)
        else:
            setup = DigitsSetup()
            if args.quick:
                setup = DigitsSetup(steps=120, eval_every=30)
            if args.digits_steps:
                setup.steps = args.digits_steps
                setup.eval_every = max(1, setup.steps // 10)
            if args.digits_seeds:
                setup.seeds = args.digits_seeds
            specs = optimizer_specs(setup.steps, args.optimizers)
            print(f"\n== digits: {setup.steps} steps x {setup.seeds} seed(s), {len(specs)} optimizers ==", flush=True)
            rows, meta = run_digits(specs, setup, progress)
        wall = time.perf_counter() - t0
        prov = provenance(__file__, argv, deps=("quality",))
        meta.update(hardware=prov["hardware"], versions=prov["versions"], wall_seconds=wall, quick=args.quick,
                    command=prov["command"], provenance=prov)  # fmt: skip
        print_table(task, rows)
        for n in meta["notes"]:
            print(f"  note: {n}")
        print(f"  {task} wall time: {wall:.0f} s")
        if args.json:
            path = write_json(json_path(args.json, task, len(tasks) > 1), task, rows, meta)
            print(f"  wrote {path} (+ {os.path.splitext(path)[0]}.meta.json)")
        if args.plots:
            for p in plots(task, meta, rows, args.plots):
                print(f"  wrote {p}")
    print(f"\ntotal wall time: {time.perf_counter() - t_all:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
