"""Packed optimizer moments in torch_dist checkpoints (``stquant_megatron.megatron.packed_checkpoint``),
on real megatron-core (CPU, gloo, 1-2 processes).

Every check compares against something the checkpoint code did not produce: the saving run's own
state in memory (codes, scales, statistics; dense moments), a run that never saved, the bytes the
checkpoint holds on disk (read from the torch_dist metadata), and the stock format's files.
"""

from __future__ import annotations

import os
import shutil

import pytest
import torch

from stquant_megatron.testing import run_distributed

from test_megatron import _assert_reloaded_exactly, _check_loaded_against_saved, _close, _run, _snapshot  # noqa: E402

pytestmark = pytest.mark.megatron

FIXED = dict(bits=4, exp_avg_sq_format="packed")
SCHED = dict(avg_bits=3.0, warmup_steps=2, interval=2, stats_steps=1, min_numel=1024)  # stochastic rounding (default)
FACT = dict(bits=8, exp_avg_sq_format="factored")


def _disk_bytes(ckpt_dir: str) -> dict[str, int]:
    """Bytes on disk per top-level part of a torch_dist checkpoint ("optimizer", "model", ...), from the
    storage entries of its metadata (what the files hold, not what the code meant to write)."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt_dir).read_metadata()
    out: dict[str, int] = {"stquant_packed": 0, "stquant_layout": 0, "optimizer": 0, "other": 0}
    for index, info in md.storage_data.items():
        part = next((k for k in ("stquant_packed", "stquant_layout") if k in index.fqn), None)
        part = part or ("optimizer" if index.fqn.startswith("optimizer") else "other")
        out[part] += int(info.length)
    out["files"] = sum(os.path.getsize(os.path.join(ckpt_dir, f)) for f in os.listdir(ckpt_dir)
                       if os.path.isfile(os.path.join(ckpt_dir, f)))  # fmt: skip
    return out


def _read_layout(ckpt_dir: str) -> dict:
    """The layout object of a packed checkpoint, read offline (torch.distributed.checkpoint, one process)."""
    import io

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader

    key = next(k for k in FileSystemReader(ckpt_dir).read_metadata().state_dict_metadata if "stquant_layout" in k)
    sd = {key: io.BytesIO()}
    dcp.load(sd, storage_reader=FileSystemReader(ckpt_dir), no_dist=True)
    return sd[key][0] if isinstance(sd[key], list) else sd[key]


def _param_chunks(ckpt_dir: str) -> set:
    """(bucket key, offset, size) of every stored chunk of Megatron's own bucket `param` tensors."""
    from torch.distributed.checkpoint import FileSystemReader

    md = FileSystemReader(ckpt_dir).read_metadata()
    return {(k[: -len(".param")], c.offsets[0], c.sizes[0]) for k, m in md.state_dict_metadata.items()
            if k.endswith(".param") for c in m.chunks}  # fmt: skip


def test_packed_round_trip_is_exact_and_the_moments_take_their_packed_size(tmp_path):
    """DP=2, 4-bit moments: reloading a packed checkpoint into the same run restores every code, scale and
    param bit for bit; the moments on disk take the bytes they take in memory (+ the layout), a quarter
    or less of the dense format's."""
    packed, dense = str(tmp_path / "packed"), str(tmp_path / "dense")
    spec = dict(config=FIXED, steps=3, reload_same=True, more=2, bytes=True)
    rp = run_distributed(_run, 2, dict(spec, save=packed, fmt="packed"), timeout=600)
    rd = run_distributed(_run, 2, dict(spec, save=dense, fmt="dp_reshardable"), timeout=600)
    _assert_reloaded_exactly(rp)
    # the continuation after the reload equals the dense format's (same state restored exactly both ways)
    assert rp[0]["continued"] == rd[0]["continued"]
    p, d = _disk_bytes(packed), _disk_bytes(dense)
    assert d["stquant_packed"] == d["stquant_layout"] == 0 and p["stquant_packed"] > 0
    state = sum(r["state_bytes"] for r in rp)  # every rank's STQuantAdamW.state_bytes(), summed
    # the moments as in memory (state_bytes less the 4-byte step counters), a 16-byte header per rank, and
    # torch_dist's own framing of each stored tensor (torch.save: ~1.5 KB)
    want = state - 4 * sum(r["num_shards"] for r in rp) + 16 * len(rp)
    assert want <= p["stquant_packed"] <= want + 2048 * len(rp), (p["stquant_packed"], want)
    entries = 2 * sum(r["num_shards"] for r in rp)
    assert p["stquant_layout"] < 600 * entries, (p["stquant_layout"], entries)  # a few hundred bytes per entry
    dense_moments = d["optimizer"] - p["optimizer"]  # both hold the same params and non-tensor state
    assert 0 < p["stquant_packed"] < 0.25 * dense_moments, (p, d)
    assert p["files"] < d["files"], (p, d)
    # every entry knows its place in Megatron's bucket space (what an offline converter to the dense format
    # needs): it is the place of Megatron's own `param` slice of the same shard in the same checkpoint
    layout = _read_layout(packed)
    mine = {(e["bucket_key"], e["bucket_offset"], e["numel"]) for r in layout["ranks"] for e in r["entries"]}
    assert mine and mine <= _param_chunks(packed), sorted(mine - _param_chunks(packed))[:3]


def test_packed_resume_is_bit_exact_with_the_scheduler(tmp_path):
    """Scheduled 3.0 with stochastic rounding: 3 steps, packed save, resume for 3 more = 6 straight
    steps: the same losses, widths and decisions."""
    ck = str(tmp_path / "c")
    straight = run_distributed(_run, 2, dict(config=SCHED, steps=6, bits_history=True), timeout=600)
    run_distributed(_run, 2, dict(config=SCHED, steps=3, save=ck, fmt="packed", more=0), timeout=600)
    resumed = run_distributed(_run, 2, dict(config=SCHED, steps=0, load=ck, start=3, more=3, bits_history=True),
                              timeout=600)  # fmt: skip
    assert resumed[0]["continued"] == straight[0]["losses"][3:]
    assert resumed[0]["bits"] == straight[0]["bits"] and resumed[0]["decisions"] == straight[0]["decisions"]


@pytest.mark.parametrize("config", [FIXED, FACT], ids=["packed4", "factored"])
def test_packed_checkpoint_reshards_across_data_parallel_sizes(config, tmp_path):
    """DP=2 -> DP=1 and DP=1 -> DP=2: shards that no longer line up are decoded from the saved codes and
    re-coded: within one quantization step of what the saving run held (independent reference: its own
    dense moments); the first resumed loss is the saving job's next one."""
    ck2, ck1 = str(tmp_path / "dp2"), str(tmp_path / "dp1")
    saved2 = run_distributed(_run, 2, dict(config=config, steps=3, save=ck2, fmt="packed", more=2), timeout=600)
    r = run_distributed(_run, 1, dict(config=config, steps=0, load=ck2, start=3, more=2, mbs=4), timeout=600)[0]
    assert _check_loaded_against_saved([x["saved_dense"] for x in saved2], [r["loaded_dense"]]) > 0
    assert _close(r["continued_local"][:1], saved2[0]["continued"][:1], 1e-6), (r["continued_local"], saved2[0])
    saved1 = run_distributed(_run, 1, dict(config=config, steps=3, save=ck1, fmt="packed", more=2, train_mbs=4),
                             timeout=600)  # fmt: skip
    res = run_distributed(_run, 2, dict(config=config, steps=0, load=ck1, start=3, more=2), timeout=600)
    assert _check_loaded_against_saved([saved1[0]["saved_dense"]], [x["loaded_dense"] for x in res]) > 0
    assert _close(res[0]["continued"][:1], saved1[0]["continued"][:1], 1e-6), (res[0]["continued"], saved1[0])


def _stock_loads_packed(rank, world, spec):
    try:
        _run(rank, world, spec)
    except Exception as e:  # noqa: BLE001 - the message is what the test checks
        return f"{type(e).__name__}: {e}"
    return None


def test_a_stock_run_refuses_a_packed_checkpoint_with_a_message(tmp_path):
    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(config=FIXED, steps=2, save=ck, fmt="packed", more=0), timeout=600)
    errors = run_distributed(_stock_loads_packed, 2, dict(config=None, steps=0, load=ck, more=1), timeout=600)
    for e in errors:
        assert e is not None and "stquant" in e and "stquant-megatron checkpoint convert" in e, e


def _corrupt_then_load(rank, world, spec):
    """Load a damaged packed checkpoint (torch_dist, or legacy with ``fmt="torch"``) into a trained
    optimizer: ValueError, and nothing changed."""
    from stquant_megatron.megatron import patch
    from stquant_megatron import STQuantConfig
    from stquant_megatron.testing import gpt, init_megatron_parallel

    init_megatron_parallel(1, 1)
    patch(STQuantConfig(**spec["config"]), checkpoint_format=spec.get("ckpt_format"))
    model, opt = gpt.build_gpt_and_optimizer(lr=3e-3, num_layers=2, hidden_size=64, bf16=True)
    gpt.train(model, opt, 2, micro_batch_size=2)
    before = _snapshot(opt)
    try:
        gpt.load_checkpoint(model, opt, spec["load"], spec.get("fmt", "packed"))
    except ValueError as e:
        err = str(e)
    else:
        err = None
    after = _snapshot(opt)
    return err, all(torch.equal(before[k], after[k]) for k in before) and before.keys() == after.keys()


def test_a_damaged_packed_checkpoint_is_refused_and_changes_nothing(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(config=FIXED, steps=2, save=ck, fmt="packed", more=0), timeout=600)
    md = FileSystemReader(ck).read_metadata()
    chunks = [s for i, s in md.storage_data.items() if "stquant_packed" in i.fqn]
    assert len(chunks) == 2  # one per data-parallel rank
    for info in chunks:  # one flipped byte in the middle of each rank's packed moments
        with open(os.path.join(ck, info.relative_path), "r+b") as f:
            f.seek(info.offset + info.length // 2)
            b = f.read(1)
            f.seek(info.offset + info.length // 2)
            f.write(bytes([b[0] ^ 0x5A]))
    results = run_distributed(_corrupt_then_load, 2, dict(config=FIXED, load=ck), timeout=600)
    for err, unchanged in results:
        assert err is not None and "CRC32" in err and "packed checkpoint" in err and "'" in err, err  # names the tensor
        assert unchanged


def test_offline_converter_gives_stock_megatron_the_saved_moments(tmp_path):
    """``stquant-megatron checkpoint convert SRC DST --to dense`` in this (test) process, no process group:
    a stock DP=2 job loads the result, and every moment it holds equals what the saving job held
    (dequantized: the dense values the patched run itself would write), its params exactly; its first
    loss is the saving job's next one."""
    from stquant_megatron.cli import main as cli

    ck, dense = str(tmp_path / "packed"), str(tmp_path / "dense")
    for config in (FIXED, FACT):
        saved = run_distributed(_run, 2, dict(config=config, steps=3, save=ck, fmt="packed", more=2), timeout=600)
        assert cli(["checkpoint", "convert", ck, dense, "--to", "dense"]) == 0
        assert cli(["checkpoint", "convert", dense, str(tmp_path / "again")]) == 2  # not packed: refused
        stock = run_distributed(_run, 2, dict(config=None, steps=0, load=dense, start=3, more=2, fmt="dp_reshardable"),
                                timeout=600)  # fmt: skip
        assert stock[0]["inner"] != ["STQuantAdamW"]
        assert _check_loaded_against_saved([r["saved_dense"] for r in saved], [r["loaded_dense"] for r in stock]) == 0
        assert stock[0]["continued"][0] == saved[0]["continued"][0], (stock[0]["continued"], saved[0]["continued"])
        for d in (ck, dense, str(tmp_path / "again")):
            shutil.rmtree(d, ignore_errors=True)


# ----------------------------------------------------------------------------------- legacy torch (dp_zero)
LEGACY = dict(fmt="torch", ckpt_format="packed")  # save_parameter_state -> distrib_optim.pt, packed moments


def _distrib_optim(ckpt_dir: str) -> str:
    (name,) = [d for d in os.listdir(ckpt_dir) if d.startswith("mp_rank_")]
    return os.path.join(ckpt_dir, name, "distrib_optim.pt")


def _load_legacy(path: str):
    from stquant_megatron.megatron.packed_checkpoint import PackedMoments

    with torch.serialization.safe_globals([PackedMoments]):
        return torch.load(path, weights_only=True)


def test_packed_legacy_torch_round_trip_is_exact_and_small(tmp_path):
    """DP=2, 4-bit: ``save_parameter_state`` writes the main params as Megatron does and the moments as in
    memory (the packed bytes equal every rank's state bytes, counted independently); reloading restores
    every code, scale and param bit for bit, and the run continues as after a dense legacy reload."""
    packed, dense = str(tmp_path / "packed"), str(tmp_path / "dense")
    spec = dict(config=FIXED, steps=3, reload_same=True, more=2, bytes=True)
    rp = run_distributed(_run, 2, dict(spec, save=packed, **LEGACY), timeout=600)
    rd = run_distributed(_run, 2, dict(spec, save=dense, fmt="torch"), timeout=600)
    _assert_reloaded_exactly(rp)
    assert rp[0]["continued"] == rd[0]["continued"]
    state = _load_legacy(_distrib_optim(packed))
    moments = sum(r["state_bytes"] for r in rp) - 4 * sum(r["num_shards"] for r in rp)  # less the step counters
    assert state["stquant"]["packed"].numel() == moments + 16 * len(rp), (state["stquant"]["packed"].numel(), moments)
    dense_state = torch.load(_distrib_optim(dense), weights_only=True)
    for gbuf, dtypes in dense_state.items():  # Megatron's own param world tensors, unchanged
        if isinstance(gbuf, int):
            for dtype, d in dtypes.items():
                assert torch.equal(state[gbuf][dtype]["param"], d["param"]) and "exp_avg" in d
    ps, ds = os.path.getsize(_distrib_optim(packed)), os.path.getsize(_distrib_optim(dense))
    numel = sum(d["numel_unpadded"] for g, dt in dense_state.items() if isinstance(g, int) for d in dt.values())
    assert ps < 4 * numel + moments + 64 * 1024 and ds > 12 * numel, (ps, ds, numel)  # 12 B/param dense, ~5 packed


def test_packed_legacy_resume_is_bit_exact_with_the_scheduler(tmp_path):
    ck = str(tmp_path / "c")
    straight = run_distributed(_run, 2, dict(config=SCHED, steps=6, bits_history=True), timeout=600)
    run_distributed(_run, 2, dict(config=SCHED, steps=3, save=ck, more=0, **LEGACY), timeout=600)
    resumed = run_distributed(_run, 2, dict(config=SCHED, steps=0, load=ck, start=3, more=3, bits_history=True,
                                            **LEGACY), timeout=600)  # fmt: skip
    assert resumed[0]["continued"] == straight[0]["losses"][3:]
    assert resumed[0]["bits"] == straight[0]["bits"] and resumed[0]["decisions"] == straight[0]["decisions"]


@pytest.mark.parametrize("config", [FIXED, FACT], ids=["packed4", "factored"])
def test_packed_legacy_checkpoint_reshards_across_data_parallel_sizes(config, tmp_path):
    """As for torch_dist: DP=2 -> 1 and 1 -> 2, every loaded value within one re-quantization of the
    saving run's own (dense) moments, params exact, the first resumed loss the saving job's next."""
    ck2, ck1 = str(tmp_path / "dp2"), str(tmp_path / "dp1")
    saved2 = run_distributed(_run, 2, dict(config=config, steps=3, save=ck2, more=2, **LEGACY), timeout=600)
    r = run_distributed(_run, 1, dict(config=config, steps=0, load=ck2, start=3, more=2, mbs=4, **LEGACY),
                        timeout=600)[0]  # fmt: skip
    assert _check_loaded_against_saved([x["saved_dense"] for x in saved2], [r["loaded_dense"]]) > 0
    assert _close(r["continued_local"][:1], saved2[0]["continued"][:1], 1e-6), (r["continued_local"], saved2[0])
    saved1 = run_distributed(_run, 1, dict(config=config, steps=3, save=ck1, more=2, train_mbs=4, **LEGACY),
                             timeout=600)  # fmt: skip
    res = run_distributed(_run, 2, dict(config=config, steps=0, load=ck1, start=3, more=2, **LEGACY), timeout=600)
    assert _check_loaded_against_saved([saved1[0]["saved_dense"]], [x["loaded_dense"] for x in res]) > 0
    assert _close(res[0]["continued"][:1], saved1[0]["continued"][:1], 1e-6), (res[0]["continued"], saved1[0])


def test_a_stock_run_refuses_a_packed_legacy_checkpoint(tmp_path):
    """Stock Megatron's ``torch.load`` (weights only) stops at the packed entries' class, naming stquant; one
    that allowlists it stops at the first moment with the way back. (One rank: with more, stock Megatron
    leaves the others waiting in its scatter after rank 0 fails, as for any unreadable file.)"""
    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(config=FIXED, steps=2, save=ck, more=0, **LEGACY), timeout=600)
    (err,) = run_distributed(_stock_loads_packed, 1, dict(config=None, steps=0, load=ck, more=1, fmt="torch"),
                             timeout=600)  # fmt: skip
    assert err is not None and "stquant_megatron" in err and "PackedMoments" in err, err
    from stquant_megatron.megatron.packed_checkpoint import PACKED_DP_ZERO

    state = _load_legacy(_distrib_optim(ck))
    entry = next(v for k, d in state.items() if isinstance(k, int) for v in d.values())
    with pytest.raises(KeyError, match="stquant-megatron checkpoint convert"):
        entry["exp_avg"]
    assert "stquant-megatron checkpoint convert" in PACKED_DP_ZERO


def test_a_damaged_packed_legacy_checkpoint_is_refused_on_every_rank_and_changes_nothing(tmp_path):
    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(config=FIXED, steps=2, save=ck, more=0, **LEGACY), timeout=600)
    path = _distrib_optim(ck)
    state = _load_legacy(path)
    data, ranks = state["stquant"]["packed"], state["stquant"]["layout"]["ranks"]
    for r in ranks:  # one flipped byte in the middle of each rank's moments
        data[r["offset"] + r["nbytes"] // 2] ^= 0x5A
    torch.save(state, path)
    results = run_distributed(_corrupt_then_load, 2, dict(config=FIXED, load=ck, **LEGACY), timeout=600)
    for err, unchanged in results:  # both ranks raise (the damage was in each one's own entries) and agree
        assert err is not None and "CRC32" in err and "packed checkpoint" in err, err
        assert unchanged


def test_offline_converter_turns_a_packed_legacy_checkpoint_into_stock_megatron_s(tmp_path):
    """``stquant-megatron checkpoint convert`` on a legacy torch checkpoint: its distrib_optim.pt becomes
    exactly the file a dense save of the same (deterministic) run writes: params, both moments and the
    sizes, tensor for tensor; it loads with stock ``torch.load`` (weights only). (A stock legacy *load*
    cannot be run here: with torch's AdamW as the inner optimizer, as on a CPU without Apex/TE, stock
    Megatron's dp_zero loader asks the checkpoint for the per-parameter ``step`` tensor, which no legacy
    file holds, stock or ours.)"""
    from stquant_megatron.cli import main as cli

    for config in (FIXED, FACT):
        ck, dense, ref = (str(tmp_path / f"{n}-{config['exp_avg_sq_format']}") for n in ("packed", "dense", "ref"))
        saved = run_distributed(_run, 2, dict(config=config, steps=3, save=ck, more=0, **LEGACY), timeout=600)
        same = run_distributed(_run, 2, dict(config=config, steps=3, save=ref, more=0, fmt="torch"), timeout=600)
        assert saved[0]["losses"] == same[0]["losses"]  # the same run twice: one save packed, one dense
        assert cli(["checkpoint", "convert", ck, dense, "--to", "dense"]) == 0
        assert cli(["checkpoint", "convert", dense, str(tmp_path / "again")]) == 2  # not packed: refused
        converted = torch.load(_distrib_optim(dense), weights_only=True)  # stock torch.load: no stquant class
        want = torch.load(_distrib_optim(ref), weights_only=True)
        assert converted.keys() == want.keys() and "stquant" not in converted
        moments = 0
        for gbuf, dtypes in want.items():
            if not isinstance(gbuf, int):
                assert converted[gbuf] == dtypes
                continue
            for dtype, d in dtypes.items():
                got = converted[gbuf][dtype]
                assert got.keys() == d.keys() and got["numel_unpadded"] == d["numel_unpadded"]
                for key in ("param", "exp_avg", "exp_avg_sq"):
                    assert torch.equal(got[key], d[key]), (gbuf, dtype, key, float((got[key] - d[key]).abs().max()))
                moments += int((d["exp_avg_sq"] != 0).sum())
        assert moments > 10000  # trained second moments were compared, not zeros
        model = os.path.join(os.path.dirname(_distrib_optim(ck)), "model_optim_rng.pt")
        with open(model, "rb") as a, open(os.path.join(os.path.dirname(_distrib_optim(dense)), "model_optim_rng.pt"), "rb") as b:
            assert a.read() == b.read()  # everything else copied as it is


# ----------------------------------------------------------------------------------- fully_reshardable (model space)
FR = "packed_fully_reshardable"  # --dist-ckpt-optim-fully-reshardable with --stquant-checkpoint-format packed


def _model_space_tensors(ckpt_dir: str, part: str) -> dict[str, torch.Tensor]:
    """Every stored tensor of a torch_dist checkpoint whose key contains ``part``, read offline."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    md = FileSystemReader(ckpt_dir).read_metadata()
    sd = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.state_dict_metadata.items()
          if isinstance(m, TensorStorageMetadata) and part in k}  # fmt: skip
    dcp.load(sd, storage_reader=FileSystemReader(ckpt_dir), no_dist=True)
    return sd


def test_packed_fully_reshardable_round_trip_is_exact_and_small(tmp_path):
    """TP=2: a packed fully_reshardable checkpoint reloads every code, scale and param bit for bit; it holds
    no dense moment tensor, its params are stock's model-space tensors, and its moments take the bytes they
    take in memory."""
    packed, dense = str(tmp_path / "packed"), str(tmp_path / "dense")
    spec = dict(tp=2, config=FIXED, steps=3, reload_same=True, more=2, bytes=True)
    rp = run_distributed(_run, 2, dict(spec, save=packed, fmt=FR), timeout=600)
    rd = run_distributed(_run, 2, dict(spec, save=dense, fmt="fully_reshardable"), timeout=600)
    _assert_reloaded_exactly(rp)
    assert rp[0]["continued"] == rd[0]["continued"]
    p, d = _disk_bytes(packed), _disk_bytes(dense)
    assert p["stquant_packed"] > 0 and d["stquant_packed"] == 0
    assert not _model_space_tensors(packed, "optimizer.state.exp_avg")  # no dense moments at all
    params_p, params_d = _model_space_tensors(packed, "optimizer.state.param."), _model_space_tensors(dense, "optimizer.state.param.")
    assert params_p.keys() == params_d.keys() and params_p
    for k in params_p:  # the same model-space params as stock's own fully_reshardable writes
        assert torch.equal(params_p[k], params_d[k]), k
    state = sum(r["state_bytes"] for r in rp)  # replicated tensors are stored once: at most what the ranks hold
    assert p["stquant_packed"] <= state + 2048 * len(rp), (p["stquant_packed"], state)
    assert p["stquant_packed"] < 0.25 * (d["optimizer"] - p["optimizer"]), (p, d)


@pytest.mark.parametrize("case", ["tp2-to-tp1", "tp2-to-tp1-swiglu", "pp2-to-pp1", "pp2-to-pp1-factored",
                                  "dp1-to-dp2-factored", "tp2-to-tp1-factored"])  # fmt: skip
def test_packed_fully_reshardable_changes_tp_pp_and_dp(case, tmp_path):
    """A packed fully_reshardable checkpoint reloads bit for bit into the saving job, and loads at another TP,
    PP or DP size: every moment within one re-quantization step of what the saving job held (its own dense
    moments; the factored statistics exactly where the tensor-parallel matrix is unchanged), params exact,
    and the first resumed loss is the saving job's next one (TP: up to bf16 reductions in another order, as
    for stock's dense format). SwiGLU: Megatron saves the gated fc1 as two interleaved TP-sharded halves."""
    config = FACT if "factored" in case else FIXED
    ck = str(tmp_path / "c")
    save_world, save = {"tp2": (2, dict(tp=2)), "pp2": (2, dict(pp=2)), "dp1": (1, dict(train_mbs=4))}[case[:3]]
    load_world, load = (2, {}) if case.startswith("dp1") else (1, dict(mbs=2))
    model = dict(swiglu=True) if "swiglu" in case else {}
    saved = run_distributed(_run, save_world, dict(save, **model, config=config, steps=3, save=ck, fmt=FR, more=2,
                                                   reload_same=True), timeout=600)  # fmt: skip
    _assert_reloaded_exactly(saved, case)
    res = run_distributed(_run, load_world, dict(load, **model, config=config, steps=0, load=ck, fmt=FR, start=3, more=2),
                          timeout=600)  # fmt: skip
    got, ref = res[0]["continued"], saved[0]["continued"] if saved[0]["continued"][0] is not None else saved[-1]["continued"]
    keep = ("param", "exp_avg") if case == "tp2-to-tp1-factored" else None  # the TP halves' factored statistics
    # become one matrix's, estimated again from their dense values: not comparable element by element
    assert _check_loaded_against_saved([_only(x["saved_dense"], keep) for x in saved],
                                       [_only(x["loaded_dense"], keep) for x in res], glu="swiglu" in case) > 0  # fmt: skip
    tol = 2e-3 if case.startswith("tp2") else 1e-6
    assert _close(got[:1], ref[:1], tol), (got, ref)
    assert _close(got[1:], ref[1:], 1e-2), (got, ref)


def _only(shards: list[dict], keys) -> list[dict]:
    return shards if keys is None else [{**e, "tensors": {k: v for k, v in e["tensors"].items() if k in keys}} for e in shards]


def test_a_stock_run_refuses_a_packed_fully_reshardable_checkpoint(tmp_path):
    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(tp=2, config=FIXED, steps=2, save=ck, fmt=FR, more=0), timeout=600)
    errors = run_distributed(_stock_loads_packed, 2, dict(tp=2, config=None, steps=0, load=ck, fmt=FR, more=1), timeout=600)
    for e in errors:
        assert e is not None and "fully_reshardable+stquant_packed" in e and "stquant-megatron checkpoint convert" in e, e


def test_a_damaged_packed_fully_reshardable_checkpoint_is_refused_and_changes_nothing(tmp_path):
    from torch.distributed.checkpoint import FileSystemReader

    ck = str(tmp_path / "c")
    run_distributed(_run, 2, dict(config=FIXED, steps=2, save=ck, fmt=FR, more=0), timeout=600)
    md = FileSystemReader(ck).read_metadata()
    chunks = [s for i, s in md.storage_data.items() if "stquant_packed" in i.fqn]
    assert len(chunks) == 2  # one per rank
    for info in chunks:
        with open(os.path.join(ck, info.relative_path), "r+b") as f:
            f.seek(info.offset + info.length // 2)
            b = f.read(1)
            f.seek(info.offset + info.length // 2)
            f.write(bytes([b[0] ^ 0x5A]))
    results = run_distributed(_corrupt_then_load, 2, dict(config=FIXED, load=ck, fmt=FR), timeout=600)
    for err, unchanged in results:
        assert err is not None and "CRC32" in err and "packed checkpoint" in err, err
        assert unchanged


def test_offline_converter_writes_stock_fully_reshardable_form(tmp_path):
    """The converter's output equals a dense fully_reshardable save of the same deterministic TP=2 run,
    tensor for tensor (params, exp_avg, exp_avg_sq in model space), and a job at TP=1 resumes from it
    with the saving job's next loss."""
    from stquant_megatron.cli import main as cli

    for config in (FIXED, FACT):
        ck, dense, conv = (str(tmp_path / n) for n in ("packed", "dense", "conv"))
        saved = run_distributed(_run, 2, dict(tp=2, config=config, steps=3, save=ck, fmt=FR, more=2), timeout=600)
        run_distributed(_run, 2, dict(tp=2, config=config, steps=3, save=dense, fmt="fully_reshardable", more=0), timeout=600)
        assert cli(["checkpoint", "convert", ck, conv, "--to", "dense"]) == 0
        got, want = _model_space_tensors(conv, "optimizer."), _model_space_tensors(dense, "optimizer.")
        assert got.keys() == want.keys() and any(".exp_avg_sq." in k for k in got), sorted(set(got) ^ set(want))[:4]
        for k in got:
            assert torch.equal(got[k], want[k]), (k, float((got[k] - want[k]).abs().max()))
        res = run_distributed(_run, 1, dict(config=config, ckpt_format="dense", steps=0, load=conv, fmt="fully_reshardable",
                                            start=3, more=1), timeout=600)  # fmt: skip
        assert _close(res[0]["continued"], saved[0]["continued"][:1], 2e-3), (res[0]["continued"], saved[0]["continued"])
        for d in (ck, dense, conv):
            shutil.rmtree(d, ignore_errors=True)


def test_offline_converter_packs_a_dense_fully_reshardable_checkpoint(tmp_path):
    """``--to packed`` on a dense fully_reshardable TP=2 checkpoint: no dense moment is left, the moments take
    about an eighth of their bytes, packing then unpacking stays within 8-bit rounding of the dense values
    (an independent check: the original tensors), and a patched TP=1 job resumes from it with the saving job's
    next loss (params exact; the first step's update from moments re-coded twice)."""
    from stquant_megatron.cli import main as cli

    dense, packed, back = (str(tmp_path / n) for n in ("dense", "packed", "back"))
    saved = run_distributed(_run, 2, dict(tp=2, config=FIXED, steps=3, save=dense, fmt="fully_reshardable", more=2), timeout=600)
    assert cli(["checkpoint", "convert", dense, packed, "--to", "packed", "--bits", "8"]) == 0
    assert cli(["checkpoint", "convert", packed, str(tmp_path / "again"), "--to", "packed"]) == 2  # packed already
    assert not _model_space_tensors(packed, "optimizer.state.exp_avg")
    p, d = _disk_bytes(packed), _disk_bytes(dense)
    assert 0 < p["stquant_packed"] < 0.3 * (d["optimizer"] - p["optimizer"]), (p, d)
    assert cli(["checkpoint", "convert", packed, back, "--to", "dense"]) == 0
    got, want = _model_space_tensors(back, "optimizer.state.exp_avg"), _model_space_tensors(dense, "optimizer.state.exp_avg")
    assert got.keys() == want.keys() and got
    requantized = 0
    for k in want:
        err = float((got[k] - want[k]).abs().max())
        assert err <= 2 ** -6 * float(want[k].abs().max()) + 1e-30, (k, err)
        requantized += not torch.equal(got[k], want[k])
    assert requantized > 0  # it was quantized, not copied
    res = run_distributed(_run, 1, dict(config=FIXED, steps=0, load=packed, fmt=FR, start=3, more=2), timeout=600)
    assert _close(res[0]["continued"][:1], saved[0]["continued"][:1], 2e-3), (res[0]["continued"], saved[0]["continued"])
    assert _close(res[0]["continued"][1:], saved[0]["continued"][1:], 1e-2), (res[0]["continued"], saved[0]["continued"])


@pytest.mark.parametrize("fmt", ["packed", FR])
def test_a_packed_checkpoint_loads_at_other_widths_and_block_sizes(fmt, tmp_path):
    """Saved at 4 bits in blocks of 128, loaded by a run at 3 bits in blocks of 256 (same layout): every
    moment is the saved one re-coded once at the new width and blocks (within half a level of its new
    block: the bound checked element by element against the saving run's own values), and training goes on."""
    ck = str(tmp_path / "c")
    saved = run_distributed(_run, 2, dict(config=FIXED, steps=3, save=ck, fmt=fmt, more=2), timeout=600)
    other = dict(bits=3, block_size=256, exp_avg_sq_format="packed")
    res = run_distributed(_run, 2, dict(config=other, steps=0, load=ck, fmt=fmt, start=3, more=2), timeout=600)
    assert _check_loaded_against_saved([r["saved_dense"] for r in saved], [r["loaded_dense"] for r in res]) > 0
    for r in res:
        codes = [v for k, v in r["loaded"].items() if k.endswith(".codes")]
        assert codes and all(c.shape[1] == 3 and c.shape[2] == 256 // 8 for c in codes), [tuple(c.shape) for c in codes][:3]
    assert _close(res[0]["continued"][:1], saved[0]["continued"][:1], 1e-6), (res[0]["continued"], saved[0]["continued"])
    assert _close(res[0]["continued"][1:], saved[0]["continued"][1:], 2e-2), (res[0]["continued"], saved[0]["continued"])
