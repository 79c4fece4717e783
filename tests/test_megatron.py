"""The Megatron integration on real megatron-core (CPU, gloo, 1-4 processes).

Every test runs ranks through ``stquant_megatron.testing.run_distributed``; each rank patches (or
not) before building a tiny GPTModel + DistributedOptimizer. Runs on megatron-core 0.16.1 (pip)
and again on 0.19.2 (sources on PYTHONPATH) via ``tests/run_tests.sh``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from stquant_megatron import STQuantConfig
from stquant_megatron.testing import run_distributed

pytestmark = pytest.mark.megatron

STEPS = 6
# 8-bit packed moments against stock fp32 AdamW, same data and init: the per-step loss may differ
# by quantization noise only. Over 6 steps of a bf16 model we allow 1% relative per step (the
# observed differences are ~1e-3; an unpatched/broken update differs by far more after step 1).
TOL = 1e-2
PACKED = dict(exp_avg_sq_format="packed")  # both moments packed (the factored format has its own tests)


def _inners(opt):
    from stquant_megatron.testing.gpt import _distributed_optimizers

    return [d.optimizer for d in _distributed_optimizers(opt)]


def _snapshot(opt):
    """Per-unit packed codes/scales + main params of this rank (CPU copies)."""
    from stquant_megatron import PackedState
    from stquant_megatron.state import FactoredState

    out = {}
    for inner in _inners(opt):
        for group in inner.param_groups:
            for p in group["params"]:
                name = inner.param_name(p) if hasattr(inner, "param_name") else str(len(out))
                out[f"{name}.param"] = p.detach().float().cpu().clone()
                for key in ("exp_avg", "exp_avg_sq"):
                    v = inner.state[p][key]
                    if isinstance(v, FactoredState):
                        out[f"{name}.{key}.row"] = v.row.cpu().clone()
                        out[f"{name}.{key}.col"] = v.col.cpu().clone()
                    elif isinstance(v, PackedState):
                        out[f"{name}.{key}.codes"] = v.codes.cpu().clone()
                        out[f"{name}.{key}.scale"] = v.scale.cpu().clone()
                    else:
                        out[f"{name}.{key}"] = v.detach().float().cpu().clone()
    return out


def _assert_reloaded_exactly(results, what=""):
    """Every rank's state after reloading its own checkpoint (``reload_same``) is what it saved: the same
    entries (packed codes among them), each bit for bit."""
    for r in results:
        before, after = r["before"], r["after"]
        assert before.keys() == after.keys() and any(k.endswith(".codes") for k in before), (what, sorted(before)[:4])
        for k in before:
            assert torch.equal(before[k], after[k]), (what, k)


def _run(rank, world, spec):
    """One rank: build (patched or stock), train, optionally save/load; returns what the test checks."""
    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    init_megatron_parallel(spec.get("tp", 1), spec.get("pp", 1))
    if spec.get("config") is not None:
        patch(STQuantConfig(**spec["config"]), checkpoint_format=spec.get("ckpt_format"))
    else:
        unpatch()
    model_kwargs = dict(num_layers=spec.get("layers", 2), hidden_size=64, bf16=spec.get("bf16", True))
    if spec.get("pos"):
        model_kwargs["position_embedding_type"] = spec["pos"]
    if spec.get("swiglu"):  # Megatron saves the gated fc1 through a ShardedTensorFactory (two interleaved halves)
        model_kwargs.update(gated_linear_unit=True, activation_func=torch.nn.functional.silu)
    model, opt = gpt.build_gpt_and_optimizer(lr=3e-3, **model_kwargs)
    res = {"inner": sorted({type(i).__name__ for i in _inners(opt)})}
    from megatron.core import parallel_state as _ps

    res["tp_rank"] = _ps.get_tensor_model_parallel_rank()
    hist = gpt.train(model, opt, spec.get("steps", STEPS), micro_batch_size=spec.get("train_mbs", 2))
    res["losses"] = [h["loss"] for h in hist]
    res["local_losses"] = [h["local_loss"] for h in hist]
    if spec.get("snapshot"):
        from stquant_megatron.state import FactoredState

        res["snap"] = _snapshot(opt)
        res["sharded"] = sum(isinstance(v, FactoredState) and v.sharded
                             for i in _inners(opt) for st in i.state.values() for v in st.values())  # fmt: skip
    if spec.get("bytes"):
        inner = _inners(opt)[0]
        n = sum(p.numel() for g in inner.param_groups for p in g["params"])
        res["bytes_per_param"] = inner.state_bytes() / n
        res["state_bytes"] = sum(i.state_bytes() for i in _inners(opt))
        res["num_shards"] = sum(len(g["params"]) for i in _inners(opt) for g in i.param_groups)
    if spec.get("peak"):
        from stquant_megatron.formats.packing import num_blocks

        inner = _inners(opt)[0]
        cfg, params = inner.config, [p for g in inner.param_groups for p in g["params"]]
        packed = [p for p in params if inner._is_packed(p)]
        escapes = [p for p in params if not inner._is_packed(p)]
        blocks = [num_blocks(p.numel(), cfg.block_size) * cfg.block_size for p in packed]
        # this rank's budget, from its shard sizes: packed moments at avg_bits over whole blocks,
        # fp32 escapes and step counters; slack: one unit's codes and scales at 8 bits
        budget = (cfg.avg_bits / 8 * 2 * sum(blocks) + sum(8 * p.numel() for p in escapes)
                  + 4 * len(params))  # fmt: skip
        res["peak"] = (inner.peak_state_bytes(), budget, max(blocks) * (1 + 4 / cfg.block_size))
        res["rank_avg_bits"] = float(inner.scheduler.rank_bits().max())
    if "save" in spec:
        gpt.save_checkpoint(model, opt, spec["save"], spec.get("fmt", "dp_reshardable"))
        res["before"] = _snapshot(opt)
        res["saved_dense"] = gpt.dense_shards(opt)
        if spec.get("reload_same"):
            # perturb, reload into the same objects: moments and params must come back exactly
            for inner in _inners(opt):
                for g in inner.param_groups:
                    for p in g["params"]:
                        p.data.add_(1.0)
            gpt.load_checkpoint(model, opt, spec["save"], spec.get("fmt", "dp_reshardable"))
            res["after"] = _snapshot(opt)
        more = gpt.train(model, opt, spec.get("more", 0), start_step=spec.get("steps", STEPS),
                         micro_batch_size=spec.get("train_mbs", 2))
        res["continued"] = [h["loss"] for h in more]
        res["continued_local"] = [h["local_loss"] for h in more]
    if "load" in spec:
        gpt.load_checkpoint(model, opt, spec["load"], spec.get("fmt", "dp_reshardable"))
        res["loaded"] = _snapshot(opt)
        res["loaded_dense"] = gpt.dense_shards(opt)
        more = gpt.train(model, opt, spec.get("more", 2), start_step=spec.get("start", STEPS),
                         micro_batch_size=spec.get("mbs", 2))
        res["continued"] = [h["loss"] for h in more]
        res["continued_local"] = [h["local_loss"] for h in more]
    if spec.get("bits_history"):
        res["bits"] = [inner.unit_bits() for inner in _inners(opt)]
        res["avg_bits"] = [inner.scheduler.average_bits() for inner in _inners(opt)]
        res["decisions"] = [[d.bits for d in inner.scheduler.history] for inner in _inners(opt)]
        from megatron.core import parallel_state as ps

        from stquant_megatron.megatron.patch import global_param_names

        sched = _inners(opt)[0].scheduler
        res["unit_numel"] = {k: float(n) for k, n in zip(sched.names, sched.numel)}
        tp = ps.get_tensor_model_parallel_world_size()  # the full size of each tensor, from the model
        res["model_numel"] = {name: p.numel() * (tp if getattr(p, "tensor_model_parallel", False) else 1)
                              for p, name in global_param_names(model).items()}  # fmt: skip
    return res


def _close(a, b, tol=TOL):
    return all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b)) and len(a) == len(b)


def _assemble(ranks):
    """Full parameters' dense ``param``/``exp_avg``/``exp_avg_sq`` (flattened, TP shards concatenated
    along their partition dimension) from every rank's ``gpt.dense_shards`` of a saving run."""
    local = {}
    for shards in ranks:
        for e in shards:
            numel = int(torch.Size(e["shape"]).numel())
            d = local.setdefault((e["name"], e["tp_rank"]), {"meta": e, "t": {}, "cov": torch.zeros(numel, dtype=torch.bool)})
            for k, v in e["tensors"].items():
                d["t"].setdefault(k, torch.zeros(numel))[e["start"]:e["start"] + v.numel()] = v
                d["cov"][e["start"]:e["start"] + v.numel()] = True
    full = {}
    for name in sorted({n for n, _ in local}):
        parts = [d for (n, _), d in sorted(local.items(), key=lambda kv: kv[0][1]) if n == name]
        assert all(bool(d["cov"].all()) for d in parts), f"{name}: shards do not cover the parameter"
        pd = parts[0]["meta"]["partition_dim"]
        full[name] = {}
        for k in parts[0]["t"]:
            views = [d["t"][k].view(d["meta"]["shape"]) for d in parts]
            if pd is None:  # replicated across TP: every copy must agree
                assert all(torch.equal(views[0], v) for v in views[1:]), (name, k)
                full[name][k] = views[0].reshape(-1)
            elif _glu(name):  # each TP shard is [its part of the gate; its part of the up projection]
                halves = [v.chunk(2, dim=0) for v in views]
                full[name][k] = torch.cat([h[0] for h in halves] + [h[1] for h in halves]).reshape(-1)
            else:
                full[name][k] = torch.cat(views, dim=pd).reshape(-1)
    return full


_GLU = {"on": False}  # set by a check of a gated-linear-unit (SwiGLU) model


def _glu(name: str) -> bool:
    return _GLU["on"] and name.endswith(("mlp.linear_fc1.weight", "mlp.linear_fc1.bias"))


def _requant_bound(ref, qmap, block):
    """Per element, the largest error of re-quantizing ``ref`` (nearest rounding) with absmax blocks
    of ``block`` elements (starting at the shard's first element) onto the normalized codebook
    ``qmap``: with the new block's scale ``s`` (its absmax: the scale changes with the layout) and
    ``x = ref / s``, half the gap between the two levels around ``x``, or, below a zero-free
    codebook's smallest level (where values round up to it), the distance to that level; times
    ``s``, plus fp32 rounding of the normalization and the decode (2**-20 of ``s``)."""
    levels = torch.unique(qmap.float())  # sorted; the repeated top signed code counts once
    pad = (-ref.numel()) % block
    absmax = torch.nn.functional.pad(ref.abs(), (0, pad)).view(-1, block).amax(1)
    s = absmax.repeat_interleave(block)[: ref.numel()]
    x = ref / torch.where(s > 0, s, torch.ones_like(s))
    hi = torch.searchsorted(levels, x.contiguous()).clamp(1, levels.numel() - 1)
    half = (levels[hi] - levels[hi - 1]) / 2
    below = x < levels[0]
    return s * torch.where(below, levels[0] - x, half) + s * 2.0**-20


def _check_loaded_against_saved(saved_ranks, loaded_ranks, glu: bool = False):
    """Every loaded shard against the saved run's state, independently of the checkpoint code:
    main params exact; moments exact when stored dense, within one quantization step of the saved
    values when re-packed (a different DP/TP layout shifts the block boundaries). Returns the
    number of packed moments compared (so a caller can insist there were some). ``glu``: the model's
    fc1 is gated (SwiGLU), its TP shards each hold a part of both halves."""
    _GLU["on"] = glu
    full, packed = _assemble(saved_ranks), 0
    for shards in loaded_ranks:
        for e in shards:
            ref_full = full[e["name"]]
            for k, got in e["tensors"].items():
                ref = ref_full[k]
                if e["partition_dim"] is not None:
                    shape = list(e["shape"])
                    shape[e["partition_dim"]] *= e["tp_size"]
                    if _glu(e["name"]):
                        ref = torch.cat([h.chunk(e["tp_size"])[e["tp_rank"]] for h in ref.view(shape).chunk(2)]).reshape(-1)
                    else:
                        ref = ref.view(shape).chunk(e["tp_size"], dim=e["partition_dim"])[e["tp_rank"]].reshape(-1)
                ref = ref[e["start"]:e["start"] + got.numel()]
                where = f"{e['name']}.{k}[{e['start']}:+{got.numel()}]"
                if k in e["packing"]:
                    bound = _requant_bound(ref, *e["packing"][k])
                    err = (got - ref).abs()
                    assert bool((err <= bound * (1 + 1e-6) + 1e-30).all()), (where, float((err - bound).max()))
                    assert float(ref.abs().max()) > 0, where  # a trained moment, not zeros
                    packed += 1
                else:
                    assert torch.equal(got, ref), (where, float((got - ref).abs().max()))
    return packed


@pytest.mark.parametrize("tp,pp,world", [(1, 1, 2), (2, 1, 4), (1, 2, 2)], ids=["dp2", "tp2xdp2", "pp2"])
def test_patched_gpt_tracks_stock(tp, pp, world):
    stock = run_distributed(_run, world, dict(tp=tp, pp=pp), timeout=400)
    ours = run_distributed(_run, world, dict(tp=tp, pp=pp, config=dict(bits=8, **PACKED), bytes=True), timeout=400)
    assert stock[0]["inner"] != ["STQuantAdamW"] and ours[0]["inner"] == ["STQuantAdamW"]
    assert ours[0]["losses"][-1] < ours[0]["losses"][0]  # it trains
    assert _close(ours[0]["losses"], stock[0]["losses"]), (ours[0]["losses"], stock[0]["losses"])
    # each rank's own loss, before any all-reduce, tracks the same rank's stock loss; in the
    # DP=2 case the two data-parallel ranks saw different data and report different losses
    for r_ours, r_stock in zip(ours, stock):
        if r_stock["local_losses"][0] is not None:  # last pipeline stage
            assert _close(r_ours["local_losses"], r_stock["local_losses"]), (r_ours["local_losses"], r_stock["local_losses"])
    if (tp, pp) == (1, 1):
        assert ours[0]["local_losses"] != ours[1]["local_losses"]
        mean = [(a + b) / 2 for a, b in zip(ours[0]["local_losses"], ours[1]["local_losses"])]
        assert _close(mean, ours[0]["losses"], 1e-9)
    assert all(r["bytes_per_param"] < 3.0 for r in ours), [r["bytes_per_param"] for r in ours]


def test_scheduler_budget_bounds_each_ranks_peak():
    cfg = dict(avg_bits=3.0, warmup_steps=2, interval=2, stats_steps=1, min_numel=1024, **PACKED)
    for r in run_distributed(_run, 2, dict(config=cfg, steps=6, peak=True), timeout=400):
        peak, budget, slack = r["peak"]
        assert peak <= budget + slack, (peak, budget, slack)
        assert r["rank_avg_bits"] <= 3.0 + 1e-9


def test_fp32_params_pack_track_stock_and_round_trip(tmp_path):
    """fp32 model params (no bf16): the distributed optimizer's shard main params are views of the
    model params (non-leaf tensors); the patch must still pack them, train like stock and reload."""
    stock = run_distributed(_run, 2, dict(bf16=False, steps=4), timeout=400)
    ours = run_distributed(_run, 2, dict(bf16=False, steps=4, config=dict(bits=8, **PACKED), bytes=True,
                                         save=str(tmp_path / "c"), reload_same=True, more=1), timeout=400)  # fmt: skip
    assert ours[0]["inner"] == ["STQuantAdamW"] and stock[0]["inner"] != ["STQuantAdamW"]
    assert _close(ours[0]["losses"], stock[0]["losses"], 1e-3), (ours[0]["losses"], stock[0]["losses"])
    for r in ours:
        assert 2.0 < r["bytes_per_param"] < 3.0, r["bytes_per_param"]
    _assert_reloaded_exactly(ours)


@pytest.mark.parametrize("fmt", ["dp_reshardable", "fully_reshardable", "torch"])
def test_checkpoint_round_trip_is_exact(fmt, tmp_path):
    spec = dict(config=dict(bits=4, **PACKED), steps=3, save=str(tmp_path / fmt), fmt=fmt, reload_same=True, more=2)
    results = run_distributed(_run, 2, spec, timeout=400)
    _assert_reloaded_exactly(results, fmt)
    for r in results:
        assert len(r["continued"]) == 2 and all(map(lambda x: x == x, r["continued"]))


@pytest.mark.parametrize("mode", ["fixed", "scheduler", "stock"])
def test_resume_is_deterministic(mode, tmp_path):
    # "stock": the harness's own resume of Megatron's torch-AdamW fallback (restore_stock_adam_steps)
    cfg = {"fixed": dict(bits=4, **PACKED), "stock": None,
           "scheduler": dict(avg_bits=4.0, warmup_steps=2, interval=2, stats_steps=1, min_numel=1024, **PACKED)}[mode]  # fmt: skip
    hist = mode == "scheduler"
    straight = run_distributed(_run, 2, dict(config=cfg, steps=6, bits_history=hist), timeout=400)
    half = run_distributed(_run, 2, dict(config=cfg, steps=3, save=str(tmp_path / "c"), more=0), timeout=400)
    resumed = run_distributed(_run, 2, dict(config=cfg, steps=0, load=str(tmp_path / "c"), start=3, more=3,
                                            bits_history=hist), timeout=400)  # fmt: skip
    assert half[0]["losses"] + resumed[0]["continued"] == straight[0]["losses"]
    if hist:
        assert resumed[0]["bits"] == straight[0]["bits"]
        assert resumed[0]["decisions"] == straight[0]["decisions"]


def test_reshard_dp2_to_dp1_and_stock_interop(tmp_path):
    """Every load below is compared with what the saving run held (``_check_loaded_against_saved``):
    a patched 4-bit checkpoint re-packed at DP=1 stays within one quantization step, loaded into
    stock it is the saved dense moments exactly, and a stock checkpoint re-packed at 4 bits stays
    within one step of the stock fp32 moments; the continued losses of each rank track a run that
    never left its layout."""
    ck = str(tmp_path / "dp2")
    saved = run_distributed(_run, 2, dict(config=dict(bits=4, **PACKED), steps=3, save=ck, more=2), timeout=400)
    saved_dense = [r["saved_dense"] for r in saved]
    # patched DP=2 checkpoint -> patched DP=1, and -> stock DP=1
    for cfg in (dict(bits=4, **PACKED), None):
        r = run_distributed(_run, 1, dict(config=cfg, steps=0, load=ck, start=3, more=2, mbs=4), timeout=400)[0]
        packed = _check_loaded_against_saved(saved_dense, [r["loaded_dense"]])
        assert (packed > 0) == (cfg is not None)
        # DP=1 with micro-batch 4 sees the global batch the two DP ranks shared: its own loss at the
        # first resumed step is their mean (same params, 1e-6). The next one follows one update at
        # another DP size: bf16 sums in another order, which Adam's sign-like early steps amplify
        # (DP=1 vs DP=2 runs that never saved differ by ~1% per step here too): 3%.
        got, ref = r["continued_local"], saved[0]["continued"]
        assert _close(got[:1], ref[:1], 1e-6), (got, ref)
        assert _close(got[1:], ref[1:], 3e-2), (got, ref)
    # stock checkpoint -> patched run (same DP=2 layout, fp32 moments re-packed at 4 bits)
    stock_ck = str(tmp_path / "stock")
    stock = run_distributed(_run, 2, dict(steps=3, save=stock_ck, more=2), timeout=400)
    res = run_distributed(_run, 2, dict(config=dict(bits=4, **PACKED), steps=0, load=stock_ck, start=3, more=2), timeout=400)
    assert res[0]["inner"] == ["STQuantAdamW"]
    assert _check_loaded_against_saved([r["saved_dense"] for r in stock], [r["loaded_dense"] for r in res]) > 0
    for rank in range(2):  # each rank's own loss, before any all-reduce, tracks stock's continuation
        assert _close(res[rank]["continued_local"], stock[rank]["continued_local"], 1e-2), (rank, res, stock)
    assert res[0]["continued_local"] != res[1]["continued_local"]


def test_fully_reshardable_changes_tp(tmp_path):
    ck = str(tmp_path / "tp2")
    saved = run_distributed(_run, 2, dict(tp=2, config=dict(bits=4, **PACKED), steps=3, save=ck, fmt="fully_reshardable",
                                          more=2), timeout=400)  # fmt: skip
    r = run_distributed(_run, 1, dict(tp=1, config=dict(bits=4, **PACKED), steps=0, load=ck, fmt="fully_reshardable", start=3, more=2), timeout=400)[0]
    # TP shards concatenated along their partition dim, re-packed at TP=1: within half a level per element
    assert _check_loaded_against_saved([x["saved_dense"] for x in saved], [r["loaded_dense"]]) > 0
    # the same data (DP=1 both): the first resumed loss is the saving job's continuation on the same
    # params, up to bf16 TP reductions in another order (0.2 %); the next follows one update from the
    # re-packed moments and those reductions (1 %)
    got, ref = r["continued"], saved[0]["continued"]
    assert len(got) == 2 and _close(got[:1], ref[:1], 2e-3), (got, ref)
    assert _close(got[1:], ref[1:], 1e-2), (got, ref)


FACT = dict(bits=8, exp_avg_sq_format="factored")  # exp_avg packed at 8 bits, matrices' exp_avg_sq factored


@pytest.mark.parametrize("tp,world", [(1, 2), (2, 4)], ids=["dp2", "tp2xdp2"])
def test_factored_statistics_are_all_reduced_over_data_parallel_shards(tp, world):
    """Each data-parallel rank holds part of each matrix (some cut inside a row). Against DP=1 on the
    same global batch (fp32 params): every rank's row and column statistics of every matrix equal
    the DP=1 run's, which holds the matrices whole. A rank that summed only its own shard would be
    off by the rows and column sums it does not hold."""
    spec = dict(tp=tp, bf16=False, steps=2, config=FACT, snapshot=True)
    dp2 = run_distributed(_run, world, spec, timeout=400)
    dp1 = run_distributed(_run, tp, dict(spec, train_mbs=4), timeout=400)
    ref = {r["tp_rank"]: r["snap"] for r in dp1}
    assert sum(r["sharded"] for r in dp2) > 0 and sum(r["sharded"] for r in dp1) == 0
    compared = 0
    for r in dp2:
        for k, v in r["snap"].items():
            if k.endswith((".row", ".col")):
                torch.testing.assert_close(v, ref[r["tp_rank"]][k], rtol=1e-4, atol=0, msg=k)
                compared += 1
    assert compared >= 8 * world // tp, compared
    assert _close(dp2[0]["losses"], dp1[0]["losses"], 1e-4), (dp2[0]["losses"], dp1[0]["losses"])


def _check_factored_reload(before, after):
    """A reload of a checkpoint holding factored matrices: the same states (some factored), codes and
    params exactly, row/column statistics to rounding (rebuilt from every rank's dense shard)."""
    assert before.keys() == after.keys() and any(k.endswith(".row") for k in before)
    for k in before:
        if k.endswith((".row", ".col")):
            torch.testing.assert_close(after[k], before[k], rtol=1e-5, atol=0, msg=k)
        else:
            assert torch.equal(before[k], after[k]), k


@pytest.mark.parametrize("fmt", ["dp_reshardable", "torch"])
def test_factored_checkpoint_round_trip_and_resume(fmt, tmp_path):
    """Checkpoints hold the dense estimate (stock-compatible); reloading rebuilds each matrix's
    statistics from every rank's shard: codes and params exactly, statistics to rounding; the run
    then continues as one that never stopped (to rounding)."""
    straight = run_distributed(_run, 2, dict(config=FACT, steps=5), timeout=400)
    spec = dict(config=FACT, steps=3, save=str(tmp_path / fmt), fmt=fmt, reload_same=True, more=2)
    for r in run_distributed(_run, 2, spec, timeout=400):
        _check_factored_reload(r["before"], r["after"])
        assert _close(r["continued"], straight[0]["losses"][3:], 1e-4), (r["continued"], straight[0]["losses"])


def test_factored_checkpoint_reshards_and_loads_into_stock(tmp_path):
    """A factored DP=2 checkpoint loaded at DP=1, patched (matrices whole) and stock: the dense
    exp_avg_sq each loads equals what the saving run held (stock: exactly; factored: to rounding, the
    statistics of a rank-one matrix are its row and column means)."""
    ck = str(tmp_path / "dp2")
    saved = run_distributed(_run, 2, dict(config=FACT, steps=3, save=ck, more=1), timeout=400)
    full = _assemble([r["saved_dense"] for r in saved])
    for cfg in (FACT, None):
        r = run_distributed(_run, 1, dict(config=cfg, steps=0, load=ck, start=3, more=1, mbs=4), timeout=400)[0]
        n = 0
        for e in r["loaded_dense"]:
            for k, got in e["tensors"].items():
                want = full[e["name"]][k][e["start"] : e["start"] + got.numel()]
                if cfg is not None and k == "exp_avg" and k in e["packing"]:  # re-packed at 8 bits, other blocks
                    bound = _requant_bound(want, *e["packing"][k])
                    assert bool(((got - want).abs() <= bound).all()), (e["name"], float(((got - want).abs() - bound).max()))
                    n += float(want.abs().max()) > 0
                elif cfg is not None and k == "exp_avg_sq":
                    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-30, msg=f"{e['name']}.{k}")
                    n += float(want.abs().max()) > 0
                else:
                    assert torch.equal(got, want), (e["name"], k)
        assert (n > 0) == (cfg is not None)
        # the loaded run continues as the saving job did (DP=1 with the DP=2 global batch: the same
        # data; the first resumed loss on the same params, 1e-6 as in the packed reshard test)
        assert _close(r["continued_local"][:1], saved[0]["continued"][:1], 1e-6), (r["continued_local"], saved[0]["continued"])


def test_scheduler_agrees_across_tp_dp_ranks():
    cfg = dict(avg_bits=4.0, warmup_steps=2, interval=2, stats_steps=1, min_numel=1024, **PACKED)
    # learned position embeddings: a packed tensor that every TP rank keeps whole
    res = run_distributed(_run, 4, dict(tp=2, config=cfg, steps=8, bits_history=True, pos="learned_absolute"),
                          timeout=400)  # fmt: skip
    decisions = [r["decisions"] for r in res]
    assert all(d == decisions[0] for d in decisions) and len(decisions[0][0]) >= 3
    for r in res:
        assert 3.9 <= r["avg_bits"][0] <= 4.0 + 1e-9, r["avg_bits"]
    packed = {v for v in res[0]["bits"][0].values() if v != 32}
    assert len(packed) > 1, res[0]["bits"][0]
    # each unit's size in the budget is its tensor's full size: TP-split tensors summed over TP ranks,
    # TP-replicated ones (e.g. position embeddings) counted once, not once per TP rank
    model_numel = res[0]["model_numel"]
    for unit, n in res[0]["unit_numel"].items():
        assert n == model_numel[unit.rsplit(".", 1)[0]], (unit, n)
    assert "embedding.position_embeddings.weight.exp_avg" in res[0]["unit_numel"]


def _unsupported(rank, world):
    from megatron.core.optimizer import get_megatron_optimizer

    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    init_megatron_parallel(1, 1)
    patch(STQuantConfig(bits=4))
    patch(STQuantConfig(bits=4))  # idempotent
    model = gpt.build_gpt_model(num_layers=1, hidden_size=64, bf16=True)
    msgs = []
    for overrides in (dict(use_distributed_optimizer=False), dict(optimizer="sgd")):
        try:
            gpt.build_optimizer(model, **overrides)
            msgs.append(None)
        except ValueError as e:
            msgs.append(str(e))
    unpatch()
    stock = type(gpt.build_optimizer(model).chained_optimizers[0].optimizer).__name__
    return msgs, stock, get_megatron_optimizer.__name__


def test_unsupported_setups_fail_clearly_and_unpatch_restores_stock():
    msgs, stock, name = run_distributed(_unsupported, 1, timeout=200)[0]
    assert msgs[0] and "--use-distributed-optimizer" in msgs[0]
    assert msgs[1] and "--optimizer sgd" in msgs[1] and "--optimizer adam" in msgs[1]
    assert stock in ("AdamW", "Adam") and name == "get_megatron_optimizer"


def _fused_adam_branch(rank, world):
    import megatron.core.optimizer as mco

    from stquant_megatron.megatron import patch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    class FusedAdam(torch.optim.Optimizer):  # stand-in for TE / apex FusedAdam (GPU-only)
        def __init__(self, params, lr=1e-3, weight_decay=0.0, betas=(0.9, 0.999), eps=1e-8, adam_w_mode=True, **kw):
            self.adam_w_mode = adam_w_mode
            super().__init__(params, dict(lr=lr, weight_decay=weight_decay, betas=betas, eps=eps))

    import megatron.core.optimizer.distrib_optimizer as dopt

    init_megatron_parallel(1, 1)
    # what importing megatron does when Transformer Engine is installed
    mco.Adam, mco.USING_PYTORCH_OPTIMIZER = FusedAdam, False
    dopt.Adam, dopt.HAVE_APEX_OR_TE, dopt.USING_TE_OPTIMIZER = FusedAdam, True, True
    patch(STQuantConfig(bits=4))
    model = gpt.build_gpt_model(num_layers=1, hidden_size=64, bf16=True)
    opt = gpt.build_optimizer(model, decoupled_weight_decay=False)
    inner = opt.chained_optimizers[0].optimizer
    losses = [h["loss"] for h in gpt.train(model, opt, 3)]
    sd = opt.state_dict()  # TE bookkeeping: the step is read from the param groups
    for st in inner.state.values():
        st["step"].zero_()
    opt.load_state_dict(sd)
    steps = sorted({int(st["step"]) for st in inner.state.values()})
    return type(inner).__name__, [g["decoupled_weight_decay"] for g in inner.param_groups], losses, steps


def test_fused_adam_branch_is_replaced():
    name, modes, losses, steps = run_distributed(_fused_adam_branch, 1, timeout=200)[0]
    assert name == "STQuantAdamW" and modes and not any(modes)  # Adam with L2, as configured
    assert losses[-1] < losses[0]
    assert steps == [3]  # per-parameter steps restored from the groups' step after a reload


def test_flags_parse_and_launch_routes_install_the_patch(tmp_path):
    # Megatron-LM's parser ships with the megatron-core 0.19.2 sources (not with the 0.16.1 wheel)
    mcore = os.environ.get("STQUANT_MCORE_019") or subprocess.run(
        [sys.executable, "tests/fetch_megatron_019.py"], capture_output=True, text=True, check=True
    ).stdout.strip().splitlines()[-1]
    code = (  # megatron.training 0.19.2 uses typing.override (Python 3.12); give 3.11 the backport
        "import sys, typing, typing_extensions; typing.override = typing_extensions.override;"
        "from megatron.training.arguments import parse_args;"
        "from stquant_megatron.megatron import is_patched, config_from_args;"
        "sys.argv=['pretrain_gpt.py','--stquant','--stquant-bits','5,3','--stquant-block-size','64'];"
        "a=parse_args(); c=config_from_args(a); print('OK', is_patched(), c.bits, c.avg_bits, c.block_size)"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.abspath("patches"), mcore])}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert "OK True (5, 3) None 64" in out.stdout, out.stdout + out.stderr
    script = tmp_path / "pretrain_stub.py"
    script.write_text(code.replace("sys.argv=[", "sys.argv=sys.argv[:1]+[").replace("'pretrain_gpt.py',", ""))
    env["PYTHONPATH"] = mcore
    out = subprocess.run([sys.executable, "-m", "stquant_megatron.launch", str(script)], capture_output=True,
                         text=True, timeout=300, env=env)  # fmt: skip
    assert "OK True (5, 3) None 64" in out.stdout, out.stdout + out.stderr


def test_decisions_reach_megatron_writers(monkeypatch, tmp_path):
    """The TensorBoard/W&B hook writes per-unit bits through Megatron-LM's global writers."""
    try:
        import megatron.training.global_vars as gv
    except ImportError:
        gv = None
    import types

    from stquant_megatron.megatron.patch import log_to_megatron_writers

    class Writer:
        def __init__(self):
            self.rows = []

        def add_scalar(self, k, v, step):
            self.rows.append((k, v, step))

    writer = Writer()
    if gv is None:  # megatron-core 0.16.1 wheel: no megatron.training; give the hook a stand-in module
        gv = types.ModuleType("megatron.training.global_vars")
        monkeypatch.setitem(sys.modules, "megatron.training", types.ModuleType("megatron.training"))
        monkeypatch.setitem(sys.modules, "megatron.training.global_vars", gv)
        gv.get_tensorboard_writer = gv.get_wandb_writer = lambda: None
    monkeypatch.setattr(gv, "get_tensorboard_writer", lambda: writer)
    monkeypatch.setattr(gv, "get_wandb_writer", lambda: None)
    monkeypatch.setattr(gv, "get_args", lambda: types.SimpleNamespace(save=str(tmp_path)), raising=False)
    model = torch.nn.Linear(64, 64)
    from stquant_megatron import STQuantAdamW
    from stquant_megatron.report import history_of

    opt = STQuantAdamW(model.parameters(), config=STQuantConfig(avg_bits=4.0, min_numel=1, warmup_steps=1, interval=1, stats_steps=1,
                                                               exp_avg_sq_format="packed"))  # as under Megatron
    model(torch.randn(2, 64)).sum().backward()
    opt.step()  # warm-up ends: first decision
    decision = opt.scheduler.history[-1]
    log_to_megatron_writers(decision, opt)
    got = {k: (v, s) for k, v, s in writer.rows}
    assert got["stquant/bits/param0.exp_avg"] == (decision.bits["param0.exp_avg"], 1)
    assert got["stquant/avg_bits"] == (decision.avg_bits, 1) and "stquant/error/param0.exp_avg_sq" in got
    hist = history_of(str(tmp_path / "stquant_history.jsonl"))  # what `stquant-megatron report` reads
    assert hist["names"] == opt.scheduler.names and hist["history"][0]["step"] == 1


AUTO = dict(avg_bits=2.5, exp_avg_sq_format="auto", warmup_steps=2, interval=2, stats_steps=2, min_numel=1024)


@pytest.mark.parametrize("tp,pp", [(1, 1), (2, 1), (1, 2)], ids=["dp2", "tp2", "pp2"])
def test_scheduler_chooses_formats_and_every_rank_agrees(tp, pp):
    """exp_avg_sq_format="auto" under Megatron (2 ranks: DP=2 with matrices cut between the ranks, TP=2,
    PP=2): every rank takes the same decisions, formats included (0 = factored), some matrices are
    factored, and each rank's states are in the format its decisions say (factored statistics of a
    DP-sharded matrix all-reduced from both shards)."""
    res = run_distributed(_run, 2, dict(tp=tp, pp=pp, config=AUTO, steps=6, bits_history=True, snapshot=True),
                          timeout=600)  # fmt: skip
    decisions = [r["decisions"] for r in res]
    assert all(d == decisions[0] for d in decisions) and len(decisions[0][0]) == 3
    final = decisions[0][0][-1]
    assert any(b == 0 for b in final.values()) and any(b >= 2 for b in final.values()), final
    for r in res:
        held = r["bits"][0]
        for unit, b in final.items():
            if unit in held:
                assert held[unit] == b, (unit, held[unit], b)
        assert r["avg_bits"][0] <= AUTO["avg_bits"] + 1e-9
    if tp == 1 and pp == 1:
        assert sum(r["sharded"] for r in res) > 0  # a factored matrix cut between the DP ranks


@pytest.mark.parametrize("fmt", ["dp_reshardable", "torch"])
def test_resume_across_a_format_switch(fmt, tmp_path):
    """Saved after the scheduler factored some matrices (dense moments on disk, as every checkpoint
    today): reloading restores the formats, codes and params exactly, the statistics to rounding (they
    are rebuilt from every rank's dense shard), and the run continues as one that never stopped."""
    straight = run_distributed(_run, 2, dict(config=AUTO, steps=7), timeout=600)
    spec = dict(config=AUTO, steps=5, save=str(tmp_path / fmt), fmt=fmt, reload_same=True, more=2, bits_history=True)
    for r in run_distributed(_run, 2, spec, timeout=600):
        _check_factored_reload(r["before"], r["after"])
        assert _close(r["continued"], straight[0]["losses"][5:], 1e-4), (r["continued"], straight[0]["losses"])


def test_tied_embedding_copies_stay_equal_across_pipeline_stages():
    """PP=2 with tied embeddings: Megatron keeps a copy of the word embedding on the last stage and sums the two
    copies' gradients, so stock Adam updates them identically. With the default config (scheduled widths,
    stochastic rounding) the copy is the same unit as the embedding (one width, one random stream): after a
    scheduler decision both stages hold the same main params and the same packed moments, bit for bit."""
    cfg = dict(avg_bits=3.0, warmup_steps=2, interval=2, stats_steps=1, min_numel=1024)
    ranks = run_distributed(_run, 2, dict(pp=2, config=cfg, steps=4, snapshot=True), timeout=400)
    def copy(snap):  # the embedding's entries (param, codes, scales) by what follows its name, whatever its name
        return {k.split("weight", 1)[1]: v for k, v in snap.items()
                if k.startswith(("embedding.word_embeddings.weight", "output_layer.weight"))}  # fmt: skip

    first, last = copy(ranks[0]["snap"]), copy(ranks[1]["snap"])
    assert any(k.endswith(".codes") for k in first) and first.keys() == last.keys(), (sorted(first), sorted(last))
    for k in first:
        assert torch.equal(first[k], last[k]), (k, float((first[k].float() - last[k].float()).abs().max()))
