"""Megatron-LM's own, unmodified ``pretrain_gpt.py`` / ``pretrain_vlm.py`` (fixtures of the
``core_r0.19.0`` branch) on 2 CPU gloo ranks, launched the way users launch them:

* stock: ``python pretrain_gpt.py <args>``;
* ``python -m stquant_megatron.launch pretrain_gpt.py <args> --stquant ...``;
* ``PYTHONPATH=patches:$PYTHONPATH python pretrain_gpt.py <args> --stquant ...``.

Each rank runs under the test-only wrapper ``stquant_megatron.testing.megatron_lm`` (CPU-only
workarounds listed there); what a test checks comes from what Megatron itself computed and logged
(per-iteration loss and grad norm from ``training_log``, each rank's own loss before the
data-parallel all-reduce) and from the optimizer objects at the end of the run.

These need Megatron-LM's ``megatron.training`` (megatron-core >= 0.19 sources): marked
``megatron_lm``, they run in the 0.19.2 pass of ``tests/run_tests.sh`` and are deselected (not
skipped) in the 0.16.1 pass by ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest

from stquant_megatron.testing.megatron_lm import PATCHES, gpt_args, run_megatron_lm

megatron_lm = [pytest.mark.megatron, pytest.mark.megatron_lm]

ITERS = 6
# 8-bit packed moments against stock fp32 moments, same init, data and flags: per-iteration losses
# may differ by quantization noise only. Observed: <= 2e-5 relative over 6 iterations; the loss
# falls ~2% per iteration, so a step that is skipped, doubled or wrong by a few % shows up above this.
TOL_8BIT = 1e-3
# 4-bit average (scheduled) against stock: coarser moments, still a small perturbation.
TOL_4BIT = 1e-2
PACKED = ["--stquant-exp-avg-sq-format", "packed"]  # both moments packed (the default; explicit, so these tests keep their meaning)
SCHED = ["--stquant-avg-bits", "4.0", "--stquant-warmup-steps", "2", "--stquant-interval", "2",
         "--stquant-stats-steps", "1", "--stquant-min-numel", "1024", *PACKED]  # fmt: skip

# The factored exp_avg_sq is saved as its dense estimate (stock-compatible) and its row/column
# statistics are rebuilt from it on load: equal to rounding (~1e-7 relative), not bit for bit.
TOL_FACTORED_RESUME = 1e-5

_STOCK: dict = {}

# ---------------------------------------------------------------------- the README's Megatron-LM table
# Each test appends its runs after its assertions passed; with STQUANT_RECORD_MEGATRON_LM=<json> the
# module writes them there with their provenance (benchmarks/results_table.py renders the README table).
_ROWS: list = []
_T0 = time.perf_counter()


def _flags_text(flags) -> str:
    if list(flags) == SCHED:
        return "`--stquant-avg-bits 4.0`"
    kept = list(flags[:-2]) if list(flags[-2:]) == PACKED else list(flags)  # the explicit default pair
    return f"`{' '.join(kept)}`" if kept else "stock"


def _record(run: str, route: str, result, checked: str, losses=None) -> None:
    _ROWS.append(dict(run=run, route=route, checked=checked, test=os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0],
                      bytes_per_param=None if result is None else result.bytes_per_param(),
                      losses=list(losses if losses is not None else result.losses())))  # fmt: skip


@pytest.fixture(scope="module", autouse=True)
def _write_records():
    yield
    out = os.environ.get("STQUANT_RECORD_MEGATRON_LM")
    if not out or not _ROWS:
        return
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
    from provenance import provenance

    prov = provenance(__file__, ["-m", "megatron_lm", "(pytest, STQUANT_RECORD_MEGATRON_LM set)"], deps=("megatron_lm",))
    prov["command"] = (f"STQUANT_RECORD_MEGATRON_LM={os.path.relpath(out)} PYTHONPATH=$STQUANT_MCORE_019 "
                       "python -m pytest -m megatron_lm tests/test_megatron_lm.py")
    with open(out, "w") as f:
        json.dump(dict(rows=_ROWS, tests=len({r["test"] for r in _ROWS}),
                       wall_seconds=time.perf_counter() - _T0, iterations=ITERS, provenance=prov), f, indent=1)


def _stock(tmp_path_factory, **ga):
    """Stock run (no patch at all), cached per model/flags for the tests of this module."""
    key = json.dumps(ga, sort_keys=True)
    if key not in _STOCK:
        _STOCK[key] = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, **ga),
                                      workdir=str(tmp_path_factory.mktemp("stock")))  # fmt: skip
    return _STOCK[key]


def _rel_close(a, b, tol):
    return len(a) == len(b) and all(abs(x - y) <= tol * abs(y) for x, y in zip(a, b))


def _check_local_losses(run):
    """Every rank's own loss (before Megatron's DP all-reduce) is its own, and their mean is the
    loss Megatron logged: the ranks trained on different data and the logged loss is real."""
    local = [r["local_losses"] for r in run.records]
    assert all(len(x) == len(run.losses()) for x in local), local
    assert local[0] != local[1], "both DP ranks computed the same loss: same data or a broadcast"
    for i, logged in enumerate(run.losses()):
        assert abs((local[0][i] + local[1][i]) / 2 - logged) <= 1e-5 * abs(logged), (i, local, run.losses())


def _check_packed(run, lo=0.5, hi=2.3, inner="STQuantAdamW"):
    assert all(o["inner"] == inner for r in run.records for o in r["optimizers"]), run.records[0]["optimizers"]
    bpp = run.bytes_per_param()
    assert lo < bpp < hi, bpp
    assert all("optimizer state" in log and "B/param (STQuantAdamW" in log for log in run.logs)
    return bpp


# --------------------------------------------------------------------------------------------- GPT
@pytest.mark.megatron
@pytest.mark.megatron_lm
@pytest.mark.parametrize("precision", ["bf16", "fp32"])
def test_gpt_dp2_stquant8_launch_tracks_stock(precision, tmp_path, tmp_path_factory):
    bf16 = precision == "bf16"
    stock = _stock(tmp_path_factory, bf16=bf16)
    ours = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, bf16=bf16) + ["--stquant", "--stquant-bits", "8", *PACKED],
                           route="launch", workdir=str(tmp_path))  # fmt: skip
    assert stock.iterations() == ours.iterations() == list(range(1, ITERS + 1))
    assert all(o["inner"] == "AdamW" for r in stock.records for o in r["optimizers"])
    assert abs(stock.bytes_per_param() - 8.0) < 0.01  # fp32 exp_avg + exp_avg_sq (+ step counters)
    # 8-bit codes + fp32 block-128 scales: 2 x (1 + 4/128) = 2.0625 B/param on packed units; the
    # norms/biases under min_numel keep fp32 moments (8 B/param) and are counted.
    bpp = _check_packed(ours, lo=2.0625, hi=2.3)
    assert ours.losses()[-1] < ours.losses()[0] - 0.2  # it trains
    assert _rel_close(ours.losses(), stock.losses(), TOL_8BIT), (ours.losses(), stock.losses())
    assert _rel_close(ours.grad_norms(), stock.grad_norms(), 2e-2), (ours.grad_norms(), stock.grad_norms())
    _check_local_losses(ours)
    _record(f"GPT DP=2 {precision}, stock", "script", stock, "")
    _record(f"GPT DP=2 {precision}, `--stquant-bits 8`", "launch", ours,
            "every iteration within 1e-3 of stock; grad norms within 2e-2; each rank's own loss")
    print(f"{precision}: stock {stock.bytes_per_param():.3f} B/param, --stquant-bits 8 {bpp:.3f} B/param; "
          f"losses stock {stock.losses()} ours {ours.losses()}; wall {ours.wall_s:.1f} s")  # fmt: skip


@pytest.mark.parametrize(
    "name,precision,route,flags",
    [
        pytest.param("fixed4", "bf16", "launch", ["--stquant-bits", "4", *PACKED], marks=megatron_lm),
        # the same with the moments written packed (stquant_megatron.megatron.packed_checkpoint)
        pytest.param("packed-ckpt", "bf16", "launch", ["--stquant-bits", "4", "--stquant-checkpoint-format", "packed",
                                                       *PACKED], marks=megatron_lm),  # fmt: skip
        # ... saved asynchronously (--async-save: torch_dist's background writer; mcore's, as nvidia-resiliency-ext
        # is not installed here)
        pytest.param("packed-async", "bf16", "launch", ["--stquant-bits", "4", "--stquant-checkpoint-format", "packed",
                                                        "--async-save", "--use-persistent-ckpt-worker", "--async-strategy",
                                                        "mcore", *PACKED], marks=megatron_lm),  # fmt: skip
        pytest.param("sched4", "fp32", "patches", SCHED, marks=megatron_lm),
        # scheduled 4.0 bits (the default) with the matrices' exp_avg_sq factored
        pytest.param("factored", "bf16", "launch", ["--stquant-exp-avg-sq-format", "factored"], marks=megatron_lm),
    ],
)
def test_gpt_save_resume_is_exact(name, precision, route, flags, tmp_path, tmp_path_factory):
    """Straight run of 6 iterations saving (torch_dist) at 3 and 6; a new job loads iteration 3 and
    trains to 6: its losses and grad norms equal the straight run's from iteration 4 on."""
    bf16 = precision == "bf16"
    ck = str(tmp_path / "ckpt")
    kw = dict(route="launch") if route == "launch" else dict(patches=True)
    base = gpt_args(iters=ITERS, bf16=bf16) + ["--stquant", *flags, "--ckpt-format", "torch_dist"]
    straight = run_megatron_lm("pretrain_gpt.py", base + ["--save", ck, "--save-interval", "3"],
                               workdir=str(tmp_path / "straight"), **kw)  # fmt: skip
    resumed = run_megatron_lm("pretrain_gpt.py", base + ["--load", ck, "--ckpt-step", "3"],
                              workdir=str(tmp_path / "resumed"), **kw)  # fmt: skip
    assert resumed.iterations() == [4, 5, 6]
    print(f"{name}: resumed {resumed.losses()} straight {straight.losses()[3:]}")
    if "--async-save" in flags:  # Megatron-LM switches it off (with a warning) where it cannot run it
        log = "\n".join(straight.logs)
        assert "Disabling --async-save" not in log and "Starting Async Caller" in log, log[-3000:]
    if name == "factored":
        assert _rel_close(resumed.losses(), straight.losses()[3:], TOL_FACTORED_RESUME), (resumed.losses(), straight.losses())
        assert _rel_close(resumed.grad_norms(), straight.grad_norms()[3:], 1e-3)
        bpp = _check_packed(straight, lo=0.3, hi=1.0)
    else:
        assert resumed.losses() == straight.losses()[3:], (resumed.losses(), straight.losses())
        assert resumed.grad_norms() == straight.grad_norms()[3:]
        for r in range(2):
            assert resumed.records[r]["local_losses"] == straight.records[r]["local_losses"][3:]
        bpp = _check_packed(straight, lo=0.8, hi=1.3)
    assert [o["bits"] for r in resumed.records for o in r["optimizers"]] == \
        [o["bits"] for r in straight.records for o in r["optimizers"]]  # fmt: skip
    stock = _stock(tmp_path_factory, bf16=bf16)
    assert _rel_close(straight.losses(), stock.losses(), TOL_4BIT), (straight.losses(), stock.losses())
    if name.startswith("sched"):
        # the scheduler decided (identically on both ranks), under the budget, and rank 0 kept the
        # history file next to the checkpoints
        opts = [r["optimizers"][0] for r in straight.records]
        sched = opts[0]["scheduler_bits"]
        assert opts[1]["scheduler_bits"] == sched and len(set(sched.values()) - {32}) > 1, opts
        for o in opts:  # each rank's packed units are at the widths the shared decision gave them
            assert all(sched[u] == b for u, b in o["bits"].items() if b != 32), (sched, o["bits"])
        assert opts[0]["decisions"] >= 2 and opts[0]["avg_bits"] <= 4.0 + 1e-9
        with open(os.path.join(ck, "stquant_history.jsonl")) as f:  # a header line, then one line per decision
            lines = [json.loads(line) for line in f]
        assert set(lines[0]["names"]) == set(sched) and len(lines) - 1 >= 2
    _record(f"GPT DP=2 {precision}, {_flags_text(flags)}, torch_dist save/resume", route, straight,
            (f"resumed iterations 4-6 within {TOL_FACTORED_RESUME:g}" if name == "factored" else
             "resumed iterations 4-6 identical (losses, grad norms, each rank's loss, widths)")
            + f"; within {TOL_4BIT:g} of stock" + ("; both ranks' widths equal" if name.startswith("sched") else ""))
    print(f"{name} {precision} via {route}: {bpp:.3f} B/param, losses {straight.losses()}; "
          f"wall straight {straight.wall_s:.1f} s, resumed {resumed.wall_s:.1f} s")  # fmt: skip


@pytest.mark.parametrize(
    "name,ga,route,flags,tol,bpp_range",
    [
        # TP=2 (DP=1) with RoPE (--no-rope-fusion): 8-bit, launch route. More tensors of a TP shard
        # fall under min_numel (fp32 moments), hence the higher B/param.
        pytest.param("tp2-rope", dict(tp=2, gbs=2, rope=True), "launch", ["--stquant-bits", "8", *PACKED], TOL_8BIT,
                     (2.0625, 2.7), marks=megatron_lm),
        # PP=2 (DP=1): scheduled 4-bit average through PYTHONPATH=patches; the two stages own
        # different units and must still take one decision.
        pytest.param("pp2-sched", dict(pp=2), "patches", SCHED, TOL_4BIT, (0.8, 1.3), marks=megatron_lm),
        # TP=2 (DP=1), scheduled (the default) with matrices' exp_avg_sq factored per TP shard (the DP=2
        # runs of test_gpt_save_resume_is_exact all-reduce them over data-parallel shards)
        pytest.param("tp2-factored", dict(tp=2, gbs=2), "launch", ["--stquant-exp-avg-sq-format", "factored"], TOL_4BIT,
                     (0.5, 1.3), marks=megatron_lm),
    ],
)  # fmt: skip
def test_gpt_model_parallel_tracks_stock(name, ga, route, flags, tol, bpp_range, tmp_path, tmp_path_factory):
    stock = _stock(tmp_path_factory, **ga)
    kw = dict(route="launch") if route == "launch" else dict(patches=True)
    ours = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, **ga) + ["--stquant", *flags],
                           workdir=str(tmp_path), **kw)  # fmt: skip
    bpp = _check_packed(ours, *bpp_range)
    assert ours.losses()[-1] < ours.losses()[0] - 0.2
    assert _rel_close(ours.losses(), stock.losses(), tol), (ours.losses(), stock.losses())
    local = [r["local_losses"] for r in ours.records]
    if ga.get("tp"):  # tensor-parallel ranks compute the same loss themselves
        assert local[0] == local[1] == ours.losses(), local
    if ga.get("pp"):  # only the last stage computes a loss (2 microbatches, summed here in fp64)
        assert local[0] == [] and _rel_close(local[1], ours.losses(), 1e-6), local
    if "--stquant-avg-bits" in flags:
        sched = [r["optimizers"][0]["scheduler_bits"] for r in ours.records]
        assert sched[0] == sched[1] and len(set(sched[0].values()) - {32}) > 1, sched
        owned = [{u for u, b in r["optimizers"][0]["bits"].items() if b != 32} for r in ours.records]
        # the stages' units differ, but for the tied word embedding: one unit, kept by both stages
        assert owned[0] and owned[1] and owned[0] & owned[1] == {f"embedding.word_embeddings.weight.{m}"
                                                                  for m in ("exp_avg", "exp_avg_sq")}, owned  # fmt: skip
        for r in ours.records:
            assert all(sched[0][u] == b for u, b in r["optimizers"][0]["bits"].items() if b != 32)
    shape = {"tp2-rope": "TP=2 bf16 RoPE (`--no-rope-fusion`)", "pp2-sched": "PP=2 bf16",
             "tp2-factored": "TP=2 bf16"}[name]  # fmt: skip
    _record(f"GPT {shape}, {_flags_text(flags)}", route, ours,
            f"within {tol:g} of stock" + ("; stages agree on widths" if ga.get("pp") else ""))
    print(f"{name}: {bpp:.3f} B/param (stock {stock.bytes_per_param():.3f}); losses stock {stock.losses()} "
          f"ours {ours.losses()}; wall {ours.wall_s:.1f} s")  # fmt: skip


@pytest.mark.megatron
@pytest.mark.megatron_lm
def test_gpt_checkpoints_interchange_with_stock(tmp_path):
    """torch_dist checkpoints both ways between stock Megatron-LM and ``--stquant-bits 8``: each
    resumed job continues the saving job's iterations 4-6 within the 8-bit tolerance (the first
    resumed loss exactly: the params are restored exactly). Stock resuming needs its torch AdamW
    state created first (workaround 6 of the runner)."""
    base = gpt_args(iters=ITERS) + ["--ckpt-format", "torch_dist"]
    st8 = ["--stquant", "--stquant-bits", "8", *PACKED]
    runs = {}
    for name, flags, route in (("stock", [], "script"), ("st8", st8, "launch")):
        runs[name] = run_megatron_lm("pretrain_gpt.py", base + flags + ["--save", str(tmp_path / name), "--save-interval", "3"],
                                     route=route, workdir=str(tmp_path / f"{name}-run"))  # fmt: skip
    into_ours = run_megatron_lm("pretrain_gpt.py", base + st8 + ["--load", str(tmp_path / "stock"), "--ckpt-step", "3"],
                                route="launch", workdir=str(tmp_path / "stock-to-st8"))  # fmt: skip
    into_stock = run_megatron_lm("pretrain_gpt.py", base + ["--load", str(tmp_path / "st8"), "--ckpt-step", "3"],
                                 workdir=str(tmp_path / "st8-to-stock"))  # fmt: skip
    for resumed, saver, inner in ((into_ours, runs["stock"], "STQuantAdamW"), (into_stock, runs["st8"], "AdamW")):
        assert resumed.iterations() == [4, 5, 6]
        assert all(o["inner"] == inner for r in resumed.records for o in r["optimizers"])
        ref = saver.losses()[3:]
        assert abs(resumed.losses()[0] - ref[0]) <= 1e-6 * ref[0], (resumed.losses(), ref)
        assert _rel_close(resumed.losses(), ref, TOL_8BIT), (resumed.losses(), ref)
        for r in range(2):  # each rank's own loss, before the all-reduce
            assert _rel_close(resumed.records[r]["local_losses"], saver.records[r]["local_losses"][3:], TOL_8BIT)
    _record("GPT DP=2 bf16, stock checkpoint → `--stquant-bits 8` job, and back", "launch / script", None,
            f"each resumed job within {TOL_8BIT:g} of the saving job (first loss within 1e-6)",
            losses=into_ours.losses())
    print(f"stock -> 8-bit: {into_ours.losses()} vs {runs['stock'].losses()[3:]}; "
          f"8-bit -> stock: {into_stock.losses()} vs {runs['st8'].losses()[3:]}")  # fmt: skip


@pytest.mark.megatron
@pytest.mark.megatron_lm
def test_gpt_packed_checkpoint_reshards_to_one_rank_and_stock_refuses_it(tmp_path):
    """A packed torch_dist checkpoint of a DP=2 job (scheduled, the default config) resumes on one rank
    (DP=1: shards re-coded from the saved codes; the same global batch in 2 micro-batches): the first
    resumed loss is the saving job's next one (the params are exact), the next two within 1e-3; a stock
    job pointed at it stops at load with the message that names the way back, and writes nothing."""
    from stquant_megatron.megatron.packed_checkpoint import PACKED_DP_RESHARDABLE
    from stquant_megatron.testing.megatron_lm import MegatronLMError

    ck = str(tmp_path / "ckpt")
    flags = ["--stquant", "--stquant-checkpoint-format", "packed", "--ckpt-format", "torch_dist"]
    saver = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS) + flags + ["--save", ck, "--save-interval", "3"],
                            route="launch", workdir=str(tmp_path / "save"))  # fmt: skip
    from megatron.core import dist_checkpointing

    saved = dist_checkpointing.load_content_metadata(os.path.join(ck, "iter_0000003"))
    assert saved["distrib_optim_sharding_type"] == PACKED_DP_RESHARDABLE, saved
    one = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, mbs=2, gbs=4) + flags + ["--load", ck, "--ckpt-step", "3"],
                          nproc=1, route="launch", workdir=str(tmp_path / "dp1"))  # fmt: skip
    ref = saver.losses()[3:]
    assert one.iterations() == [4, 5, 6]
    assert abs(one.losses()[0] - ref[0]) <= 1e-6 * ref[0], (one.losses(), ref)
    assert _rel_close(one.losses(), ref, 1e-3), (one.losses(), ref)  # observed: equal
    with pytest.raises(MegatronLMError) as info:
        run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS) + ["--ckpt-format", "torch_dist", "--load", ck,
                                                                   "--ckpt-step", "3"], workdir=str(tmp_path / "stock"))  # fmt: skip
    assert "stquant-megatron checkpoint convert" in str(info.value), str(info.value)[-3000:]
    # the way back offline: `stquant-megatron checkpoint convert` (this process, no ranks), then stock resumes
    dense = tmp_path / "dense"
    out = subprocess.run([sys.executable, "-m", "stquant_megatron.cli", "checkpoint", "convert",
                          os.path.join(ck, "iter_0000003"), str(dense / "iter_0000003"), "--to", "dense"],
                         capture_output=True, text=True)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (dense / "latest_checkpointed_iteration.txt").write_text("3")
    stock = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS) + ["--ckpt-format", "torch_dist", "--load", str(dense),
                                                                       "--ckpt-step", "3"], workdir=str(tmp_path / "stock2"))  # fmt: skip
    assert stock.iterations() == [4, 5, 6] and all(o["inner"] == "AdamW" for r in stock.records for o in r["optimizers"])
    assert abs(stock.losses()[0] - ref[0]) <= 1e-6 * ref[0], (stock.losses(), ref)
    assert _rel_close(stock.losses(), ref, 1e-3), (stock.losses(), ref)
    _record("GPT DP=2 bf16, `--stquant --stquant-checkpoint-format packed` → DP=1 job; → stock job; → converter → stock",
            "launch", saver, "DP=1 resume: first loss within 1e-6, then within 1e-3; stock job refused with the way back; "
            "converted offline (`stquant-megatron checkpoint convert`), a stock job resumes within 1e-3")
    print(f"packed DP=2 -> DP=1: {one.losses()} vs {ref}")


@pytest.mark.megatron
@pytest.mark.megatron_lm
def test_gpt_packed_checkpoint_of_one_rank_resumes_on_two(tmp_path):
    """DP 1 -> 2 through ``pretrain_gpt.py``: a packed torch_dist checkpoint of a one-rank job (the default
    config, 2 micro-batches per step) resumes on two data-parallel ranks (one micro-batch each, the same
    global batch): each loss within 1e-3 of the saving job's iterations 4-6."""
    ck = str(tmp_path / "ckpt")
    flags = ["--stquant", "--stquant-checkpoint-format", "packed", "--ckpt-format", "torch_dist"]
    saver = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, mbs=2, gbs=4) + flags + ["--save", ck, "--save-interval", "3"],
                            nproc=1, route="launch", workdir=str(tmp_path / "save"))  # fmt: skip
    two = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, mbs=2, gbs=4) + flags + ["--load", ck, "--ckpt-step", "3"],
                          route="launch", workdir=str(tmp_path / "dp2"))  # fmt: skip
    ref = saver.losses()[3:]
    assert two.iterations() == [4, 5, 6]
    assert _rel_close(two.losses(), ref, 1e-3), (two.losses(), ref)
    _record("GPT DP=1 bf16, `--stquant --stquant-checkpoint-format packed` → DP=2 job", "launch", saver,
            "resumed losses within 1e-3 of the saving job's", losses=two.losses())  # fmt: skip
    print(f"packed DP=1 -> DP=2: {two.losses()} vs {ref}")


@pytest.mark.megatron
@pytest.mark.megatron_lm
@pytest.mark.parametrize("layout", ["tp2", "pp2"])
def test_gpt_packed_fully_reshardable_checkpoint_loads_at_tp1_pp1(layout, tmp_path):
    """``--dist-ckpt-optim-fully-reshardable`` with packed moments (the default config: scheduled, stochastic
    rounding): a TP=2 (or PP=2) job's checkpoint holds no dense moment tensor, and a job at TP=1, PP=1 resumes
    from it (moments re-coded from the saved codes by global element index; the same data, DP=1 both): each
    loss within 1e-3 of the saving job's iterations 4-6. A stock job pointed at it stops with the way back."""
    from megatron.core import dist_checkpointing
    from torch.distributed.checkpoint import FileSystemReader

    from stquant_megatron.megatron.packed_checkpoint import PACKED_FULLY_RESHARDABLE
    from stquant_megatron.testing.megatron_lm import MegatronLMError

    ck = str(tmp_path / "ckpt")
    ga = dict(tp=2, gbs=2) if layout == "tp2" else dict(pp=2, layers=4)
    flags = ["--stquant", "--stquant-checkpoint-format", "packed", "--ckpt-format", "torch_dist",
             "--dist-ckpt-optim-fully-reshardable"]  # fmt: skip
    saver = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, **ga) + flags + ["--save", ck, "--save-interval", "3"],
                            route="launch", workdir=str(tmp_path / "save"))  # fmt: skip
    it3 = os.path.join(ck, "iter_0000003")
    assert dist_checkpointing.load_content_metadata(it3)["distrib_optim_sharding_type"] == PACKED_FULLY_RESHARDABLE
    stored = FileSystemReader(it3).read_metadata().state_dict_metadata
    assert not [k for k in stored if ".exp_avg" in k] and any("stquant_packed" in k for k in stored), sorted(stored)[:8]
    one_ga = dict(ga, tp=1, pp=1)
    one = run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, **one_ga) + flags + ["--load", ck, "--ckpt-step", "3"],
                          nproc=1, route="launch", workdir=str(tmp_path / "one"))  # fmt: skip
    ref = saver.losses()[3:]
    assert one.iterations() == [4, 5, 6]
    assert _rel_close(one.losses(), ref, 1e-3), (one.losses(), ref)
    with pytest.raises(MegatronLMError) as info:
        run_megatron_lm("pretrain_gpt.py", gpt_args(iters=ITERS, **ga) + ["--ckpt-format", "torch_dist", "--load", ck,
                                                                         "--ckpt-step", "3"], workdir=str(tmp_path / "stock"))  # fmt: skip
    assert "stquant-megatron checkpoint convert" in str(info.value), str(info.value)[-3000:]
    _record(f"GPT {layout.upper()} bf16, `--stquant --stquant-checkpoint-format packed --dist-ckpt-optim-fully-reshardable`"
            " → TP=1, PP=1 job", "launch", saver, "resumed losses within 1e-3 of the saving job's; no dense moments on "
            "disk; stock job refused with the way back", losses=one.losses())  # fmt: skip
    print(f"packed fully_reshardable {layout} -> 1 rank: {one.losses()} vs {ref}")


# --------------------------------------------------------------------------------------------- MoE
MOE = ["--num-experts", "4", "--moe-router-topk", "2", "--expert-model-parallel-size", "2",
       # the local (non-TE) SequentialMLP experts support a fused bias-activation only for
       # swiglu / quick-geglu (Megatron raises for gelu); not a CPU limitation
       "--no-bias-gelu-fusion"]  # fmt: skip


@pytest.mark.megatron
@pytest.mark.megatron_lm
@pytest.mark.parametrize("ckpt", ["dense", "packed"])
def test_moe_ep2_dense_and_expert_optimizers_pack_agree_and_resume(ckpt, tmp_path):
    """4 experts, top-2, EP=2 (x DP=2 for the dense part): Megatron builds a dense and an expert
    DistributedOptimizer; both get packed, scheduled state; each decides once for all its units
    (the experts of both EP ranks under their global index), and a torch_dist resume is exact, with the
    moments written dense or packed (then one packed tensor and layout per optimizer's data-parallel group)."""
    ck = str(tmp_path / "ckpt")
    base = gpt_args(iters=ITERS) + MOE + ["--stquant", *SCHED, "--ckpt-format", "torch_dist",
                                          "--stquant-checkpoint-format", ckpt]  # fmt: skip
    straight = run_megatron_lm("pretrain_gpt.py", base + ["--save", ck, "--save-interval", "3"], route="launch",
                               workdir=str(tmp_path / "straight"))  # fmt: skip
    resumed = run_megatron_lm("pretrain_gpt.py", base + ["--load", ck, "--ckpt-step", "3"], route="launch",
                              workdir=str(tmp_path / "resumed"))  # fmt: skip
    _check_packed(straight, 0.8, 1.3)
    assert straight.losses()[-1] < straight.losses()[0] - 0.2
    _check_local_losses(straight)
    for r in straight.records:
        assert [o["expert"] for o in r["optimizers"]] == [False, True], r["optimizers"]
    for k, kind in enumerate(("dense", "expert")):
        opts = [r["optimizers"][k] for r in straight.records]
        sched = opts[0]["scheduler_bits"]
        assert opts[1]["scheduler_bits"] == sched, kind
        assert len(set(sched.values()) - {32}) > 1 and opts[0]["decisions"] >= 2, (kind, sched)
        for o in opts:  # every rank's packed units sit at the shared decision's widths
            assert all(sched[u] == b for u, b in o["bits"].items() if b != 32), (kind, o["bits"])
        assert opts[0]["avg_bits"] <= 4.0 + 1e-9, (kind, opts[0]["avg_bits"])
        if kind == "expert":  # each EP rank owns two of the four experts; the scheduler knows all four
            owned = [{u.split(".local_experts.")[1].split(".")[0] for u in o["bits"]} for o in opts]
            assert owned == [{"0", "1"}, {"2", "3"}], owned
            assert {u.split(".local_experts.")[1].split(".")[0] for u in sched} == {"0", "1", "2", "3"}
        else:
            assert not any("experts" in u for u in sched)
    assert resumed.iterations() == [4, 5, 6]
    assert resumed.losses() == straight.losses()[3:], (resumed.losses(), straight.losses())
    assert resumed.grad_norms() == straight.grad_norms()[3:]
    assert [o["scheduler_bits"] for r in resumed.records for o in r["optimizers"]] == \
        [o["scheduler_bits"] for r in straight.records for o in r["optimizers"]]  # fmt: skip
    from torch.distributed.checkpoint import FileSystemReader

    stored = FileSystemReader(os.path.join(ck, "iter_0000003")).read_metadata().state_dict_metadata
    layouts = sorted(k for k in stored if k.endswith("stquant_layout") or "stquant_layout/" in k)
    moments = [k for k in stored if k.endswith((".exp_avg", ".exp_avg_sq"))]
    if ckpt == "packed":  # a layout per data-parallel group of each optimizer (dense: one; expert: one per EP
        # rank, whose expert-data-parallel groups differ), no dense moments
        groups = sorted(k.split("stquant_layout")[0] for k in layouts)
        assert groups == ["chained_0.optimizer.distributed.dp_group_idx_0.", "chained_1.optimizer.distributed.dp_group_idx_0.",
                          "chained_1.optimizer.distributed.dp_group_idx_1."] and not moments, (layouts, moments[:4])  # fmt: skip
    else:
        assert not layouts and moments
    _record(f"GPT MoE 4 experts top-2, EP=2, `--stquant-avg-bits 4.0`{', packed checkpoint' if ckpt == 'packed' else ''}",
            "launch", straight, "dense + expert optimizers packed, ranks agree; resume identical")  # fmt: skip
    print(f"MoE EP=2: {straight.bytes_per_param():.3f} B/param, losses {straight.losses()}; "
          f"wall straight {straight.wall_s:.1f} s, resumed {resumed.wall_s:.1f} s")  # fmt: skip


@pytest.mark.megatron
@pytest.mark.megatron_lm
def test_moe_packed_fully_reshardable_checkpoint_resumes_exactly(tmp_path):
    """4 experts, EP=2, packed fully_reshardable: the dense and the expert optimizer each write their moments
    under their own model-space key (Megatron does not prefix chained optimizers' model-space keys), no dense
    moments, and the resumed job repeats the saving job's iterations 4-6 exactly. (Loading it at EP=1 on these
    two ranks fails in Megatron itself, dense or packed: EP=1 builds one optimizer where the checkpoint has a
    chain of two, and ``ChainedOptimizer.load_state_dict`` cannot take that.)"""
    from torch.distributed.checkpoint import FileSystemReader

    ck = str(tmp_path / "ckpt")
    base = gpt_args(iters=ITERS) + MOE + ["--stquant", *SCHED, "--ckpt-format", "torch_dist",
                                          "--stquant-checkpoint-format", "packed", "--dist-ckpt-optim-fully-reshardable"]  # fmt: skip
    saver = run_megatron_lm("pretrain_gpt.py", base + ["--save", ck, "--save-interval", "3"], route="launch",
                            workdir=str(tmp_path / "save"))  # fmt: skip
    stored = FileSystemReader(os.path.join(ck, "iter_0000003")).read_metadata().state_dict_metadata
    assert sorted(k.split("/")[0] for k in stored if "stquant_layout" in k) == [
        "optimizer.fully_reshardable.dense.stquant_layout", "optimizer.fully_reshardable.expert.stquant_layout"]
    assert not [k for k in stored if ".exp_avg" in k]
    resumed = run_megatron_lm("pretrain_gpt.py", base + ["--load", ck, "--ckpt-step", "3"], route="launch",
                              workdir=str(tmp_path / "resumed"))  # fmt: skip
    assert resumed.iterations() == [4, 5, 6]
    assert resumed.losses() == saver.losses()[3:] and resumed.grad_norms() == saver.grad_norms()[3:]
    _record("GPT MoE 4 experts top-2, EP=2, `--stquant-avg-bits 4.0`, packed fully_reshardable checkpoint", "launch",
            saver, "dense + expert moments under their own keys; resume identical")  # fmt: skip
    print(f"MoE packed fully_reshardable EP=2: resumed {resumed.losses()} vs {saver.losses()[3:]}")


AUTO = ["--stquant-avg-bits", "2.5", "--stquant-exp-avg-sq-format", "auto", "--stquant-warmup-steps", "2",
        "--stquant-interval", "2", "--stquant-stats-steps", "1", "--stquant-min-numel", "1024"]  # fmt: skip


@pytest.mark.megatron
@pytest.mark.megatron_lm
def test_moe_ep2_format_choice_agrees_and_resumes(tmp_path):
    """``--stquant-exp-avg-sq-format auto`` through ``pretrain_gpt.py`` with 4 experts, EP=2: the dense and
    the expert optimizer each choose formats (0 = factored) for all their units, every rank holds the
    shared decision, and a torch_dist resume continues the saving job (factored statistics rebuilt from the
    dense checkpoint: to rounding)."""
    ck = str(tmp_path / "ckpt")
    base = gpt_args(iters=ITERS) + MOE + ["--stquant", *AUTO, "--ckpt-format", "torch_dist"]
    straight = run_megatron_lm("pretrain_gpt.py", base + ["--save", ck, "--save-interval", "3"], route="launch",
                               workdir=str(tmp_path / "straight"))  # fmt: skip
    resumed = run_megatron_lm("pretrain_gpt.py", base + ["--load", ck, "--ckpt-step", "3"], route="launch",
                              workdir=str(tmp_path / "resumed"))  # fmt: skip
    _check_packed(straight, 0.2, 1.3)
    factored = 0
    for k, kind in enumerate(("dense", "expert")):
        opts = [r["optimizers"][k] for r in straight.records]
        sched = opts[0]["scheduler_bits"]
        assert opts[1]["scheduler_bits"] == sched, kind
        for o in opts:  # every rank's units sit at the shared decision's widths and formats
            assert all(sched[u] == b for u, b in o["bits"].items() if b != 32), (kind, o["bits"])
        assert opts[0]["avg_bits"] <= 2.5 + 1e-9, (kind, opts[0]["avg_bits"])
        factored += sum(b == 0 for b in sched.values())
    assert factored > 0, "no unit was factored"
    assert resumed.iterations() == [4, 5, 6]
    # the first resumed loss on the restored params exactly; then the statistics' rounding (~1e-7) is
    # amplified by 2-bit codes that flip: observed 2e-6 and 8e-5 relative on the next two iterations
    assert resumed.losses()[0] == straight.losses()[3], (resumed.losses(), straight.losses())
    assert _rel_close(resumed.losses(), straight.losses()[3:], 5e-4), (resumed.losses(), straight.losses())
    assert [o["scheduler_bits"] for r in resumed.records for o in r["optimizers"]] == \
        [o["scheduler_bits"] for r in straight.records for o in r["optimizers"]]  # fmt: skip
    print(f"MoE EP=2 auto: {straight.bytes_per_param():.3f} B/param, {factored} factored units, losses "
          f"{straight.losses()}")


# ---------------------------------------------------------------------------------------------- VLM
@pytest.mark.megatron
@pytest.mark.megatron_lm
@pytest.mark.parametrize("ckpt", ["dense", "packed"])
def test_vlm_trains_packed_with_units_in_vision_projector_and_language(ckpt, tmp_path):
    """``pretrain_vlm.py`` (LLaVA: CLIP ViT + MLP projector + GPT, local specs, mock multimodal
    data), DP=2, scheduled through the launch route, legacy ``torch`` checkpoints (the only format
    the script allows): the scheduler's units cover all three parts, the ranks agree, the history
    renders as a heatmap, and a resume from iteration 3 reproduces iterations 4-6 exactly."""
    from stquant_megatron.testing.megatron_lm import vlm_args

    ck = str(tmp_path / "ckpt")
    base = vlm_args(iters=ITERS) + ["--stquant", *SCHED, "--stquant-checkpoint-format", ckpt]
    straight = run_megatron_lm("pretrain_vlm.py", base + ["--save", ck, "--save-interval", "3"], route="launch",
                               workdir=str(tmp_path / "straight"))  # fmt: skip
    # Resume from iteration 3 as a job that stopped there would: a save dir holding iteration 3 only.
    # (Not --ckpt-step 3: with --ckpt-format torch and the distributed optimizer, Megatron-LM
    # core_r0.19.0 reads the optimizer's distrib_optim.pt and the resumed iteration from the
    # tracker file, i.e. the newest checkpoint, whatever --ckpt-step says.)
    ck3 = tmp_path / "ckpt3"
    ck3.mkdir()
    os.symlink(os.path.join(ck, "iter_0000003"), ck3 / "iter_0000003")
    (ck3 / "latest_checkpointed_iteration.txt").write_text("3")
    resumed = run_megatron_lm("pretrain_vlm.py", base + ["--load", str(ck3)], route="launch",
                              workdir=str(tmp_path / "resumed"))  # fmt: skip
    bpp = _check_packed(straight, 0.8, 1.3)
    assert straight.losses()[-1] < straight.losses()[0] - 0.2
    _check_local_losses(straight)
    opts = [r["optimizers"][0] for r in straight.records]
    sched = opts[0]["scheduler_bits"]
    assert opts[1]["scheduler_bits"] == sched and opts[0]["decisions"] >= 2
    parts = {u.split(".")[0] for u in sched}
    assert parts == {"vision_model", "vision_projection", "language_model"}, parts
    for part in parts:  # each part has packed units of its own
        assert any(u.startswith(part + ".") and b != 32 for u, b in sched.items()), part
    assert opts[0]["avg_bits"] <= 4.0 + 1e-9
    assert resumed.iterations() == [4, 5, 6]
    assert resumed.losses() == straight.losses()[3:], (resumed.losses(), straight.losses())
    assert resumed.grad_norms() == straight.grad_norms()[3:]
    import torch

    from stquant_megatron.megatron.packed_checkpoint import PackedMoments

    with torch.serialization.safe_globals([PackedMoments]):
        saved = torch.load(os.path.join(ck, "iter_0000003", "mp_rank_00", "distrib_optim.pt"), weights_only=True)
    assert ("stquant" in saved) == (ckpt == "packed"), sorted(map(str, saved))
    png = tmp_path / "bits.png"
    out = subprocess.run([sys.executable, "-m", "stquant_megatron.cli", "report", os.path.join(ck, "stquant_history.jsonl"),
                          "--out", str(png)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0 and png.stat().st_size > 1000, out.stdout + out.stderr
    assert "vision_projection" in out.stdout and "vision_model" in out.stdout, out.stdout
    _record(f"VLM DP=2 bf16, `--stquant-avg-bits 4.0`, legacy torch save/resume{' (packed)' if ckpt == 'packed' else ''}",
            "launch", straight,
            "units in vision, projector and language; ranks agree; resume identical")
    print(f"VLM: {bpp:.3f} B/param, losses {straight.losses()}; wall straight {straight.wall_s:.1f} s, "
          f"resumed {resumed.wall_s:.1f} s\n{out.stdout}")  # fmt: skip


# ------------------------------------------------------------------------------ sitecustomize route
def test_sitecustomize_is_light():
    """``patches/`` on PYTHONPATH costs nothing in a process that never imports Megatron."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([PATCHES, os.environ.get("PYTHONPATH", "")])}
    env.pop("STQUANT_DISABLE", None)
    code = "import sys; print('torch' in sys.modules, 'megatron' in sys.modules, 'stquant_megatron' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.split() == ["False", "False", "False"], out.stdout + out.stderr
    code = ("import sys; assert any(type(f).__name__ == '_StquantImportHook' for f in sys.meta_path); "
            "print('hooked')")  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "hooked", out.stdout + out.stderr
