"""Factored second moments (``exp_avg_sq_format="factored"``): row and column statistics instead of
codes, checked against an independent full-tensor reference, across chunking, compile and checkpoints."""

from __future__ import annotations

import copy

import pytest
import torch

import stquant_megatron.kernels.torch_adam as ta
from stquant_megatron import STQuantAdamW, STQuantConfig
from stquant_megatron.formats.packing import num_blocks
from stquant_megatron.kernels import step_scalars
from stquant_megatron.state import FactoredState, PackedState


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(48, 96), torch.nn.GELU(), torch.nn.Linear(96, 40))


def _data(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(128, 48, generator=g), torch.randn(128, 40, generator=g)


def _train(model, opt, steps, data):
    x, y = data
    for _ in range(steps):
        opt.zero_grad()
        loss = ((model(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
    return loss.item()


def test_rank_one_moment_is_represented_exactly():
    a, b = torch.rand(37) + 0.1, torch.rand(53) + 0.1
    st = FactoredState.zeros((37, 53)).copy_(torch.outer(a, b))
    torch.testing.assert_close(st.dequantize().view(37, 53), torch.outer(a, b), rtol=1e-6, atol=0)
    assert st.nbytes == 4 * (37 + 53) and st.bits == 0
    assert FactoredState.factor_shape((8, 3, 3)) == (8, 9) and FactoredState.factor_shape((64,)) is None
    assert FactoredState.factor_shape((1, 64)) is None


def test_row_column_averages_match_a_dense_computation(monkeypatch):
    """Pass 1 against full-tensor ops, with Adam's L2 term and row chunks that do not divide the rows."""
    monkeypatch.setattr(ta, "ROW_CHUNK_ELEMENTS", 200)  # 3 rows of 64 per chunk, 10 rows
    g = torch.Generator().manual_seed(0)
    p, row, col = torch.randn(10, 64, generator=g), torch.zeros(10), torch.zeros(64)
    r_ref, c_ref = torch.zeros(10, dtype=torch.float64), torch.zeros(64, dtype=torch.float64)
    for step in range(1, 4):
        grad = torch.randn(10, 64, generator=g)
        sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, adamw=False)
        inv = ta.factored_moment_update(p, grad, row, col, sc)
        gg = (grad.double() + p.double() * sc.l2) ** 2
        r_ref = 0.95 * r_ref + 0.05 * gg.mean(1)
        c_ref = 0.95 * c_ref + 0.05 * gg.mean(0)
        torch.testing.assert_close(row.double(), r_ref, rtol=1e-5, atol=0)
        torch.testing.assert_close(col.double(), c_ref, rtol=1e-5, atol=0)
        assert abs(float(inv) * float(r_ref.mean()) - 1) < 1e-5


def _reference_run(model, steps, data, *, factored: bool, lr=1e-2, betas=(0.9, 0.95), wd=0.1, eps=1e-8):
    """Independent AdamW in plain full-tensor torch (fp64): dense fp32 m; v factored or dense."""
    x, y = data
    state = {}
    for step in range(1, steps + 1):
        model.zero_grad()
        ((model(x) - y) ** 2).mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                g = p.grad.double()
                st = state.setdefault(p, {"m": torch.zeros_like(g), "v": torch.zeros_like(g),
                                          "r": torch.zeros(g.shape[0], dtype=torch.float64),
                                          "c": torch.zeros(g[0].numel(), dtype=torch.float64)})  # fmt: skip
                st["m"] = betas[0] * st["m"] + (1 - betas[0]) * g
                if factored and p.ndim == 2:
                    g2 = (g * g).view(g.shape[0], -1)
                    st["r"] = betas[1] * st["r"] + (1 - betas[1]) * g2.mean(1)
                    st["c"] = betas[1] * st["c"] + (1 - betas[1]) * g2.mean(0)
                    v = torch.outer(st["r"], st["c"]) / st["r"].mean()
                else:
                    st["v"] = betas[1] * st["v"] + (1 - betas[1]) * g * g
                    v = st["v"]
                bc1, bc2 = 1 - betas[0] ** step, 1 - betas[1] ** step
                new = p.double() * (1 - lr * wd) - lr / bc1 * st["m"] / (v.sqrt() / bc2**0.5 + eps)
                p.copy_(new.float())
    return model


def test_factored_step_follows_the_factored_reference_not_adam():
    """8-bit exp_avg + factored exp_avg_sq tracks an independent factored AdamW much more closely than
    plain AdamW (so the test tells the two second moments apart)."""
    data = _data()
    ours = _model()
    init = [p.detach().clone() for p in ours.parameters()]
    opt = STQuantAdamW(ours.parameters(), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1,
                       config=STQuantConfig(bits=8, block_size=32, min_numel=256, exp_avg_sq_format="factored"))  # fmt: skip
    _train(ours, opt, 25, data)
    assert isinstance(opt.state[ours[0].weight]["exp_avg_sq"], FactoredState)
    fact = _reference_run(_model(), 25, data, factored=True)
    adam = _reference_run(_model(), 25, data, factored=False)
    for i, (p, pf, pa, p0) in enumerate(zip(ours.parameters(), fact.parameters(), adam.parameters(), init)):
        if p.ndim < 2:
            continue
        moved = (pf - p0).norm()
        d_fact, d_adam = (p - pf).norm() / moved, (p - pa).norm() / moved
        assert d_fact < 0.03, (i, float(d_fact))
        assert d_fact < 0.25 * d_adam, (i, float(d_fact), float(d_adam))


@pytest.mark.parametrize("stochastic", [False, True])
def test_factored_step_is_the_same_across_chunks_and_compile(monkeypatch, stochastic):
    """The update's chunking (rows split across chunks, a partial last block) and torch.compile change
    no bit (the statistics' summation order is fixed by ROW_CHUNK_ELEMENTS, not by the chunk size)."""
    g = torch.Generator().manual_seed(3)
    rows, cols, block = 13, 50, 32  # 650 elements: 21 blocks, the last partial
    from stquant_megatron.formats.codebooks import get_codebook

    cb = get_codebook("pow2", 4, True)

    def run(compile):
        p = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        m = PackedState.zeros(rows * cols, bits=4, kind="pow2", signed=True, block_size=block)
        v = FactoredState.zeros((rows, cols))
        stats, nst = torch.zeros(3), torch.zeros(6)
        gen = torch.Generator().manual_seed(1)
        for step in range(1, 4):
            grad = torch.randn(rows, cols, generator=gen)
            sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, adamw=True)
            ta.torch_factored_adam_step(p, grad, m.codes, m.scale, v.row, v.col, cb, sc, block_size=block,
                                        stochastic=stochastic, rng_key=1234 + step, stats=stats,
                                        neighbor_codebooks=(get_codebook("pow2", 3, True), get_codebook("pow2", 5, True),
                                                            None, None), neighbor_stats=nst, compile=compile,
                                        sample_phase=step - 1)  # fmt: skip
        return p, m.codes.clone(), m.scale.clone(), v.row.clone(), v.col.clone(), stats, nst

    want = run(False)
    monkeypatch.setattr(ta, "CHUNK_ELEMENTS", 128)  # 4 blocks per chunk
    for got in (run(False), run(True)):
        for a, b in zip(want[:5], got[:5]):
            assert torch.equal(a, b)
        for a, b in zip(want[5:], got[5:]):  # sums of per-chunk sums: the order differs
            torch.testing.assert_close(a, b, rtol=1e-5, atol=0)
    assert want[5][0] > 0 and want[5][1] == 0 and want[5][2] > 0  # exp_avg error measured; no v error
    assert want[6][0] > want[6][4] > want[6][1] > 0 and want[6][2] == want[6][3] == want[6][5] == 0


def test_state_bytes_of_factored_units_from_shapes():
    model = _model()
    opt = STQuantAdamW(model.parameters(), config=STQuantConfig(bits=4, min_numel=256, exp_avg_sq_format="factored"))
    _train(model, opt, 1, _data())
    want = 0
    for p in model.parameters():
        want += 4  # step
        if p.numel() < 256:
            want += 8 * p.numel()
        else:
            nb = num_blocks(p.numel(), 128)
            want += nb * 4 * 16 + nb * 4 + 4 * (p.shape[0] + p[0].numel())
    assert opt.state_bytes() == want
    assert opt.unit_bits()["param0.exp_avg_sq"] == 0 and opt.unit_bits()["param0.exp_avg"] == 4


def test_shards_and_vectors_stay_packed():
    w, b = torch.nn.Parameter(torch.randn(64, 64)), torch.nn.Parameter(torch.randn(4096))
    shard = torch.nn.Parameter(torch.randn(32, 64))
    opt = STQuantAdamW([w, b, shard], config=STQuantConfig(min_numel=256, exp_avg_sq_format="factored"))
    opt.set_param_name(shard, "big.weight", index_offset=2048, full_numel=4096)
    for p in (w, b, shard):
        p.grad = torch.randn_like(p)
    opt.step()
    kinds = [type(opt.state[p]["exp_avg_sq"]).__name__ for p in (w, b, shard)]
    assert kinds == ["FactoredState", "PackedState", "PackedState"]


def test_factored_checkpoints_resume_and_interoperate():
    data = _data()
    cfg = STQuantConfig(bits=4, min_numel=256, exp_avg_sq_format="factored")
    model = _model()
    opt = STQuantAdamW(model.parameters(), lr=1e-2, config=cfg)
    _train(model, opt, 5, data)
    sd = copy.deepcopy(opt.state_dict())
    twin, twin_opt = copy.deepcopy(model), None
    twin_opt = STQuantAdamW(twin.parameters(), lr=1e-2, config=cfg)
    twin_opt.load_state_dict(sd)
    _train(model, opt, 3, data)
    _train(twin, twin_opt, 3, data)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)

    # factored -> packed and packed/stock -> factored go through the dense second moment
    v_hat = opt.state[model[0].weight]["exp_avg_sq"].dequantize()
    packed_opt = STQuantAdamW(model.parameters(), lr=1e-2,
                              config=STQuantConfig(bits=8, min_numel=256, exp_avg_sq_format="packed"))
    with pytest.warns(RuntimeWarning, match="factored -> packed"):
        packed_opt.load_state_dict(opt.state_dict())
    v_packed = packed_opt.state[model[0].weight]["exp_avg_sq"]
    assert isinstance(v_packed, PackedState)
    torch.testing.assert_close(v_packed.dequantize(), v_hat, rtol=0.05, atol=float(v_hat.max()) * 0.02)
    stock = torch.optim.AdamW(model.parameters(), lr=1e-2)
    _train(model, stock, 2, data)
    fact = STQuantAdamW(model.parameters(), lr=1e-2, config=cfg)
    fact.load_state_dict(stock.state_dict())
    dense = stock.state[model[0].weight]["exp_avg_sq"]
    st = fact.state[model[0].weight]["exp_avg_sq"]
    # relative only: second moments are ~1e-5 here, below assert_close's default atol
    torch.testing.assert_close(st.row, dense.mean(1), rtol=1e-6, atol=0)
    torch.testing.assert_close(st.col, dense.mean(0), rtol=1e-6, atol=0)


@pytest.mark.parametrize("bad", ["shape", "negative", "dtype"])
def test_bad_factored_checkpoint_is_rejected_without_change(bad):
    cfg = STQuantConfig(bits=4, min_numel=256, exp_avg_sq_format="factored")
    model = _model()
    opt = STQuantAdamW(model.parameters(), lr=1e-2, config=cfg)
    _train(model, opt, 2, _data())
    before = copy.deepcopy(opt.state_dict())
    sd = copy.deepcopy(before)
    entry = sd["state"][0]["exp_avg_sq"]
    if bad == "shape":
        entry["row"] = torch.ones(entry["row"].numel() + 1)
        match = "factored as|numel"
    elif bad == "negative":
        entry["col"][0] = -1.0
        match = "finite and >= 0"
    else:
        entry["row"] = entry["row"].double()
        match = "1-D fp32"
    with pytest.raises(ValueError, match=match):
        opt.load_state_dict(sd)
    after = opt.state_dict()
    st0, st1 = before["state"][0]["exp_avg_sq"], after["state"][0]["exp_avg_sq"]
    assert torch.equal(st0["row"], st1["row"]) and torch.equal(st0["col"], st1["col"])


def test_scheduler_places_exp_avg_units_and_skips_factored_ones():
    model = _model()
    cfg = STQuantConfig(avg_bits=3.25, min_numel=256, exp_avg_sq_format="factored", warmup_steps=2, interval=3,
                        stats_steps=2)  # fmt: skip
    opt = STQuantAdamW(model.parameters(), lr=1e-2, config=cfg)
    windows = []  # each decision's window, read before the decision zeroes it
    _train(model, opt, 1, _data())  # the first step sets the scheduler up
    decide = opt.scheduler.decide
    opt.scheduler.decide = lambda step: (windows.append(opt.scheduler.window.clone()), decide(step))[1]
    _train(model, opt, 8, _data())
    assert opt.scheduler.names == ["param0.exp_avg", "param2.exp_avg"]
    assert opt.scheduler.decisions == 3  # after steps 2, 5 and 8
    assert opt.scheduler.average_bits() <= 3.25 + 1e-9
    assert len(windows) == 3
    for w in windows:  # column 0: error sums, column 1: reference sums; every exp_avg unit measured
        assert bool((w[:, 1] > 0).all()) and bool((w[:, 0] > 0).all()), w
        assert bool((w[:, 0] < w[:, 1]).all()), w  # a relative error below 1: the reference, not a copy of it


def test_config_rejects_unknown_format():
    with pytest.raises(ValueError, match="exp_avg_sq_format"):
        STQuantConfig(exp_avg_sq_format="rank1")


FACTORED_CASES = [
    # (exp_avg bits, kind, stochastic, stats + probe, param dtype, scale dtype, shape, block)
    (4, "pow2", False, False, torch.float32, torch.float32, (37, 41), 32),
    (2, "pow2", False, True, torch.float32, torch.float32, (64, 64), 128),
    (8, "linear", True, True, torch.bfloat16, torch.bfloat16, (13, 50), 64),
    (3, "pow2", True, False, torch.float32, torch.float32, (30, 33), 32),
    (5, "pow2", False, True, torch.float16, torch.float32, (16, 96), 256),
]


@pytest.mark.parametrize("mb,kind,stochastic,with_stats,pdtype,sdtype,shape,block", FACTORED_CASES)
def test_triton_factored_step_is_bit_identical_to_the_twin(mb, kind, stochastic, with_stats, pdtype, sdtype, shape,
                                                           block):  # fmt: skip
    """The Triton factored step (TRITON_INTERPRET=1) against its PyTorch twin: parameters, codes,
    scales and row/column statistics bit for bit; the error sums to rounding."""
    from stquant_megatron.formats.codebooks import get_codebook
    from stquant_megatron.kernels.triton_factored import triton_factored_adam_step

    rows, cols = shape
    cb = get_codebook(kind, mb, True)
    nbrs = (get_codebook(kind, mb - 1, True) if mb > 2 else None, get_codebook(kind, mb + 1, True) if mb < 8 else None,
            None, None)  # fmt: skip

    def run(fn):
        gen = torch.Generator().manual_seed(5)
        p = torch.randn(rows, cols, generator=gen).to(pdtype)
        m = PackedState.zeros(rows * cols, bits=mb, kind=kind, signed=True, block_size=block, scale_dtype=sdtype)
        v = FactoredState.zeros((rows, cols))
        stats, nst = (torch.zeros(3), torch.zeros(6)) if with_stats else (None, None)
        for step in range(1, 4):
            grad = (torch.randn(rows, cols, generator=gen) * 10 ** (torch.rand(rows, 1, generator=gen) * 3 - 2)).to(pdtype)
            sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, adamw=step != 2)
            fn(p, grad, m.codes, m.scale, v.row, v.col, cb, sc, block_size=block, stochastic=stochastic,
               rng_key=99 + step, stats=stats, neighbor_codebooks=nbrs if with_stats else None, neighbor_stats=nst,
               sample_phase=step - 1)  # statistics: a rotating sample of programs
        return p, m.codes, m.scale, v.row, v.col, stats, nst

    want, got = run(ta.torch_factored_adam_step), run(triton_factored_adam_step)
    for a, b in zip(want[:5], got[:5]):
        assert torch.equal(a, b)
    if with_stats:
        for a, b in zip(want[5:], got[5:]):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=0)
        assert want[5][0] > 0 and want[6][4] > 0


def test_factored_format_scheduled_and_triton_backend_equals_torch():
    """The "factored" format, scheduled: matrices' exp_avg_sq factored, vectors packed; the Triton backend
    (interpreter) through the optimizer gives the PyTorch backend's bits."""
    data = _data()
    runs = []
    for backend in ("torch", "triton"):
        model = _model()
        cfg = STQuantConfig(min_numel=64, backend=backend, stochastic_rounding=True, warmup_steps=2, interval=3,
                            stats_steps=2, exp_avg_sq_format="factored")  # fmt: skip
        opt = STQuantAdamW(model.named_parameters(), lr=1e-2, config=cfg)
        _train(model, opt, 7, data)
        runs.append((model, opt))
    (ma, oa), (mb, ob) = runs
    assert isinstance(oa.state[ma[0].weight]["exp_avg_sq"], FactoredState)
    assert isinstance(oa.state[ma[0].bias]["exp_avg_sq"], PackedState)  # 96 elements >= min_numel: packed vector
    assert oa.scheduler is not None and oa.scheduler.decisions >= 1
    for (na, a), (nb, b) in zip(ma.named_parameters(), mb.named_parameters()):
        assert torch.equal(a, b), na
        for k in ("exp_avg", "exp_avg_sq"):
            sa, sb = oa.state[a][k], ob.state[b][k]
            if torch.is_tensor(sa):  # fp32 escape (40-element bias)
                assert torch.equal(sa, sb), (na, k)
                continue
            for x, y in zip(sa.to_dict().values(), sb.to_dict().values()):
                assert torch.equal(x, y) if torch.is_tensor(x) else x == y, (na, k)


def test_triton_factored_shard_step_is_bit_identical_to_the_twin():
    """A shard of a matrix (first and last rows partial): the kernel reads the statistics at the shard's
    offset in the matrix like its twin, bit for bit."""
    from stquant_megatron.formats.codebooks import get_codebook
    from stquant_megatron.kernels.triton_factored import triton_factored_adam_step

    rows, cols, offset, n, block = 13, 50, 77, 403, 64
    cb = get_codebook("pow2", 4, True)

    def run(fn, at=offset):
        gen = torch.Generator().manual_seed(3)
        p = torch.randn(n, generator=gen)
        m = PackedState.zeros(n, bits=4, kind="pow2", signed=True, block_size=block)
        v = FactoredState.zeros((rows, cols), offset=offset, numel=n)
        for step in range(1, 4):
            grad = torch.randn(n, generator=gen)
            sc = step_scalars(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, step=step, adamw=True)
            sums = ta.factored_partial_sums(p, grad, sc, rows, cols, offset)
            sums += torch.rand(rows + cols, generator=gen)  # the other shards' part of the all-reduce
            inv = ta.factored_ema(v.row, v.col, sums, sc)
            fn(p, grad, m.codes, m.scale, v.row, v.col, cb, sc, block_size=block, inv_mean=inv, index_offset=at)
        return p, m.codes, m.scale, v.row, v.col

    want, got = run(ta.torch_factored_adam_step), run(triton_factored_adam_step)
    for a, b in zip(want, got):
        assert torch.equal(a, b)
    # the offset matters: read from the matrix's start, other rows' statistics give other parameters
    assert not torch.equal(want[0], run(ta.torch_factored_adam_step, at=0)[0])


ROWS, COLS, CUT = 12, 20, 97  # rank 0 holds elements [0, 97) of the flattened matrix, rank 1 the rest


def _sharded_rank(rank, world):
    """Each rank steps its shard (partial rows at the cut) with statistics all-reduced over the group;
    rank 0 also steps the whole matrix alone, on the same gradients (the reference)."""
    import torch.distributed as dist

    lo, hi = (0, CUT) if rank == 0 else (CUT, ROWS * COLS)
    cfg = STQuantConfig(bits=4, min_numel=1, exp_avg_sq_format="factored", block_size=32)

    def make(shard: bool):
        p = torch.nn.Parameter(torch.zeros(hi - lo) if shard else torch.zeros(ROWS, COLS))
        opt = STQuantAdamW([p], lr=1e-2, config=cfg)
        if shard:
            opt.set_param_name(p, "w", lo, full_numel=ROWS * COLS, full_shape=(ROWS, COLS))
            # "v" is held by no rank: its slot is all-reduced as zeros; "b" is a vector: packed, no slot
            opt.set_factored_sharding(dist.group.WORLD, [("v", (7, 9)), ("w", (ROWS, COLS)), ("b", (64,))])
        else:
            opt.set_param_name(p, "w")
        return p, opt

    shard, whole = make(True), make(False)
    gen = torch.Generator().manual_seed(11)
    for _ in range(4):
        g = torch.randn(ROWS, COLS, generator=gen) * torch.rand(ROWS, 1, generator=gen)
        shard[0].grad = g.reshape(-1)[lo:hi].clone()
        whole[0].grad = g.clone()
        shard[1].step()
        whole[1].step()
    vs, vw = shard[1].state[shard[0]]["exp_avg_sq"], whole[1].state[whole[0]]["exp_avg_sq"]
    out = dict(row=vs.row.clone(), col=vs.col.clone(), dense=vs.dequantize(), sharded=vs.sharded,
               whole_row=vw.row.clone(), whole_col=vw.col.clone(), whole_dense=vw.dequantize()[lo:hi])
    # a load: fresh shards get the dense values; finish_factored_load rebuilds the statistics from both
    p2, opt2 = make(True)
    opt2.init_state()
    opt2.stage_factored_load(p2, vs.dequantize())
    before_finish = opt2.state[p2]["exp_avg_sq"].row.clone()
    opt2.finish_factored_load()
    v2 = opt2.state[p2]["exp_avg_sq"]
    out.update(loaded_row=v2.row.clone(), loaded_col=v2.col.clone(), before_finish=before_finish)
    return out


def test_sharded_statistics_equal_the_whole_matrix():
    """Two ranks, each holding part of a matrix (the cut is inside a row): after 4 steps each rank's
    statistics equal a whole-matrix run on the same gradients (rounding only), and its dense estimate
    is the whole's at its elements; reloading both shards' dense values rebuilds the statistics."""
    from stquant_megatron.testing import run_distributed

    res = run_distributed(_sharded_rank, 2, timeout=200)
    for r in res:
        assert r["sharded"]
        torch.testing.assert_close(r["row"], res[0]["whole_row"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r["col"], res[0]["whole_col"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r["row"], r["whole_row"], rtol=1e-6, atol=0)
        torch.testing.assert_close(r["dense"], r["whole_dense"], rtol=1e-5, atol=0)
        assert float(r["before_finish"].abs().max()) == 0  # nothing is set before the collective
        torch.testing.assert_close(r["loaded_row"], r["row"], rtol=1e-5, atol=0)
        torch.testing.assert_close(r["loaded_col"], r["col"], rtol=1e-5, atol=0)
    # rank 0 holds no element of the last row: its statistic came through the all-reduce
    assert float(res[0]["row"][-1]) > 0
