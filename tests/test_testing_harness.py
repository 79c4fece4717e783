"""Tests of the CPU test harness (stquant_megatron.testing): real megatron-core on gloo CPU ranks.

Everything here runs stock megatron-core (torch AdamW fallback inner optimizer, no TE/apex):
DistributedDataParallel + DistributedOptimizer + grad clipping + pipeline schedules +
dist_checkpointing.  Works with the venv's megatron-core 0.16.1 and with 0.19.2 sources put first
on PYTHONPATH (``PYTHONPATH=$(python tests/fetch_megatron_019.py) pytest tests/test_testing_harness.py``).

Rank bodies are module-level functions (they are pickled by reference into the ranks).
"""

import importlib.util
import math
import os
import sys

import pytest
import torch

from stquant_megatron.testing import (
    DistributedRunError,
    RemoteTraceback,
    install_cpu_shim,
    is_cpu_shim_installed,
    run_distributed,
    uninstall_cpu_shim,
)

STEPS = 6


# ----------------------------------------------------------------------------------- rank bodies

def _allreduce_body(rank, world_size, offset):
    import torch.distributed as dist

    t = torch.full((3,), float(rank + offset), device="cuda")  # 'cuda' works under the shim
    dist.all_reduce(t)
    return {"rank": int(os.environ["RANK"]), "sum": t.tolist(), "type": t.type(), "tensor": t,
            "extra": os.environ.get("STQ_TEST_ENV")}


def _failing_body(rank, world_size):
    import torch.distributed as dist

    if rank == 1:
        raise ValueError("boom on rank 1")
    dist.barrier()  # rank 0 waits for a peer that never comes
    return rank


def _dying_body(rank, world_size):
    import time

    if rank == 1:
        os._exit(3)
    time.sleep(60)


def _hanging_body(rank, world_size):
    import time

    time.sleep(600)


def _train_body(rank, world_size, tp, pp, num_microbatches, model_kwargs):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from stquant_megatron.testing import gpt, init_megatron_parallel

    info = init_megatron_parallel(tp, pp)
    model, optimizer = gpt.build_gpt_and_optimizer(**model_kwargs)
    history = gpt.train(model, optimizer, STEPS, num_microbatches=num_microbatches)
    chained = getattr(optimizer, "chained_optimizers", [optimizer])
    import megatron.core

    return dict(
        info=info,
        megatron=(megatron.core.__version__, megatron.core.__file__),
        losses=[h["loss"] for h in history],
        grad_norms=[h["grad_norm"] for h in history],
        updated=[h["update_successful"] for h in history],
        distopt=all(isinstance(o, DistributedOptimizer) for o in chained),
        inner=type(chained[0].optimizer).__name__,
    )


def _rng_tracker_body(rank, world_size):
    import logging

    from megatron.core import tensor_parallel

    from stquant_megatron.testing import init_megatron_parallel

    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("megatron.core.tensor_parallel.random").addHandler(handler)
    init_megatron_parallel(tp=2, pp=1, seed=99)
    tracker = tensor_parallel.get_cuda_rng_tracker()
    state = torch.get_rng_state()
    default_draw = torch.rand(4)
    torch.set_rng_state(state)
    with tracker.fork():  # tensor-model-parallel stream: differs across TP ranks
        tp_draw = torch.rand(4)
    after_fork = torch.rand(4)  # the default stream is untouched by the fork
    return dict(tp=tp_draw, default=default_draw, after=after_fork, logged=[r.getMessage() for r in records])


def _checkpoint_roundtrip_body(rank, world_size, ckpt_dir, fmt):
    from stquant_megatron.testing import gpt, init_megatron_parallel

    init_megatron_parallel(1, 1)
    model, optimizer = gpt.build_gpt_and_optimizer()
    gpt.train(model, optimizer, 2)
    opt_before = gpt.optimizer_state_snapshot(optimizer)
    model_before = gpt.model_state_snapshot(model)
    gpt.save_checkpoint(model, optimizer, ckpt_dir, fmt)
    loss_continued = gpt.train(model, optimizer, 1, start_step=2)[0]["loss"]

    # A fresh model/optimizer with different weights, as a resumed job would build it.
    init_megatron_parallel(1, 1, seed=4321)
    model2, optimizer2 = gpt.build_gpt_and_optimizer()
    model_fresh = gpt.model_state_snapshot(model2)
    gpt.load_checkpoint(model2, optimizer2, ckpt_dir, fmt)
    opt_after = gpt.optimizer_state_snapshot(optimizer2)
    model_after = gpt.model_state_snapshot(model2)
    loss_resumed = gpt.train(model2, optimizer2, 1, start_step=2)[0]["loss"]

    assert opt_before.keys() == opt_after.keys() and len(opt_before) > 0
    return dict(
        state_keys=sorted({k for v in opt_before.values() for k in v}),
        opt_max_diff=max((opt_before[p][k] - opt_after[p][k]).abs().max().item()
                         for p in opt_before for k in opt_before[p]),
        model_max_diff=max((model_before[n] - model_after[n]).abs().max().item() for n in model_before),
        fresh_differs=any(not torch.equal(model_before[n], model_fresh[n]) for n in model_before),
        loss_continued=loss_continued,
        loss_resumed=loss_resumed,
    )


def _stock_failures_body(rank, world_size, ckpt_root):
    """What stock megatron (torch AdamW fallback) does on the other load paths."""
    from stquant_megatron.testing import gpt, init_megatron_parallel

    init_megatron_parallel(1, 1)
    model, optimizer = gpt.build_gpt_and_optimizer()
    gpt.train(model, optimizer, 1)
    out = {}
    for fmt in ("fully_reshardable", "torch"):
        path = os.path.join(ckpt_root, fmt)
        gpt.save_checkpoint(model, optimizer, path, fmt)  # saving works
        try:
            gpt.load_checkpoint(model, optimizer, path, fmt)
            out[fmt] = "ok"
        except KeyError as e:
            out[fmt] = f"KeyError({e.args[0]!r})"
    # Loading into a never-stepped stock optimizer without the harness' state initialisation.
    model2, optimizer2 = gpt.build_gpt_and_optimizer()
    gpt.save_checkpoint(model, optimizer, os.path.join(ckpt_root, "dp"), "dp_reshardable")
    try:
        gpt.load_checkpoint(model2, optimizer2, os.path.join(ckpt_root, "dp"), "dp_reshardable",
                            init_missing_state=False)
        out["fresh_no_init"] = "ok"
    except AssertionError:
        out["fresh_no_init"] = "AssertionError"
        torch.distributed.barrier()  # the failing load leaves no collective half-done
    return out


# ---------------------------------------------------------------------------------------- tests

def test_cpu_shim_install_uninstall():
    was_installed = is_cpu_shim_installed()
    uninstall_cpu_shim()
    assert not is_cpu_shim_installed()
    x = torch.ones(2)
    try:
        install_cpu_shim(patch_megatron=False)
        install_cpu_shim(patch_megatron=False)  # idempotent
        assert is_cpu_shim_installed()
        assert torch.zeros(2, device="cuda").device.type == "cpu"
        assert torch.empty(1, device=torch.device("cuda", 1)).device.type == "cpu"
        assert torch.tensor([1.0], device=0).device.type == "cpu"
        assert x.to("cuda:0").device.type == "cpu" and x.to(0, torch.float64).dtype == torch.float64
        assert x.cuda() is x
        assert x.type() == "torch.cuda.FloatTensor"
        assert x.bfloat16().type() == "torch.cuda.BFloat16Tensor"
        assert x.type("torch.cuda.HalfTensor").dtype == torch.float16
        assert torch.cuda.current_device() == torch.device("cpu")
        torch.cuda.synchronize()
        torch.cuda.set_device(0)
        with torch.cuda.stream(torch.cuda.Stream()):
            torch.cuda.current_stream().wait_stream(torch.cuda.Stream())
        torch.cuda.manual_seed(7)
        a = torch.rand(3)
        torch.cuda.set_rng_state(torch.cuda.get_rng_state())
        torch.manual_seed(7)  # calls torch.cuda.manual_seed_all internally: no recursion
        assert torch.equal(a, torch.rand(3))
    finally:
        uninstall_cpu_shim()
        uninstall_cpu_shim()  # idempotent
    assert not is_cpu_shim_installed()
    assert x.type() == "torch.FloatTensor"
    with pytest.raises((AssertionError, RuntimeError)):
        torch.zeros(1, device="cuda")
    if was_installed:
        install_cpu_shim()


@pytest.mark.megatron
def test_run_distributed_returns_per_rank_results():
    megatron_was_imported = "megatron.core" in sys.modules
    results = run_distributed(_allreduce_body, 2, 10, env={"STQ_TEST_ENV": "yes"})
    assert [r["rank"] for r in results] == [0, 1]
    assert all(r["sum"] == [21.0, 21.0, 21.0] for r in results)
    assert all(torch.equal(r["tensor"], torch.full((3,), 21.0)) for r in results)
    assert all(r["type"] == "torch.cuda.FloatTensor" and r["extra"] == "yes" for r in results)
    if not megatron_was_imported:  # results (tensors included) unpickle without megatron
        assert "megatron.core" not in sys.modules


@pytest.mark.megatron
def test_run_distributed_reraises_child_exception():
    with pytest.raises(ValueError, match="boom on rank 1") as info:
        run_distributed(_failing_body, 2, grace=3)
    assert isinstance(info.value.__cause__, RemoteTraceback)
    assert "_failing_body" in str(info.value.__cause__)
    assert any("rank 1 of 2" in note for note in getattr(info.value, "__notes__", []))


@pytest.mark.megatron
def test_run_distributed_dead_rank_and_timeout():
    with pytest.raises(DistributedRunError, match="exited with code 3"):
        run_distributed(_dying_body, 2, grace=2)
    with pytest.raises(TimeoutError, match="did not finish"):
        run_distributed(_hanging_body, 2, timeout=4)


@pytest.mark.megatron
def test_rng_tracker_forks_on_cpu():
    r0, r1 = run_distributed(_rng_tracker_body, 2)
    assert torch.equal(r0["default"], r1["default"])  # data-parallel seed: same on TP peers
    assert not torch.equal(r0["tp"], r1["tp"])  # model-parallel seed: differs across TP ranks
    for r in (r0, r1):
        assert torch.equal(r["after"], r["default"])
        assert not torch.equal(r["tp"], r["default"])
        assert r["logged"] == []  # "CPU RNG state changed within GPU RNG context" filtered


@pytest.fixture(scope="module")
def dp2_run():
    return run_distributed(_train_body, 2, 1, 1, 1, {})


def _check_training(results):
    losses = results[0]["losses"]
    for r in results:  # every rank reports the same (DP-averaged, PP-broadcast) loss
        assert r["losses"] == losses
        assert r["distopt"] and all(r["updated"])
        assert all(g is not None and math.isfinite(g) and g > 0 for g in r["grad_norms"])
    assert all(math.isfinite(x) for x in losses)
    assert abs(losses[0] - math.log(256)) < 0.3, losses  # untrained byte-level model
    assert losses[-1] < losses[0] - 0.5, losses
    return losses


@pytest.mark.megatron
def test_gpt_trains_dp2(dp2_run):
    _check_training(dp2_run)
    assert [r["info"]["dp_rank"] for r in dp2_run] == [0, 1]
    # The ranks run the megatron-core this process would import (PYTHONPATH shadowing included).
    version, path = dp2_run[0]["megatron"]
    assert path == importlib.util.find_spec("megatron.core").origin, (version, path)
    assert dp2_run[0]["inner"] in ("AdamW", "Adam", "FusedAdam")


@pytest.mark.megatron
def test_gpt_trains_tp2_dp2(dp2_run):
    results = run_distributed(_train_body, 4, 2, 1, 1, {})
    losses = _check_training(results)
    assert [(r["info"]["tp_rank"], r["info"]["dp_rank"]) for r in results] == [(0, 0), (1, 0), (0, 1), (1, 1)]
    # use_cpu_initialization makes the initial weights independent of TP: same run as DP=2.
    assert losses == pytest.approx(dp2_run[0]["losses"], abs=2e-2)


@pytest.mark.megatron
def test_gpt_trains_pp2():
    results = run_distributed(_train_body, 2, 1, 2, 2, {})  # 1F1B over 2 microbatches, gloo p2p
    _check_training(results)
    assert [r["info"]["pp_rank"] for r in results] == [0, 1]


@pytest.mark.megatron
def test_checkpoint_dp_reshardable_roundtrip(tmp_path):
    results = run_distributed(_checkpoint_roundtrip_body, 2, str(tmp_path / "ckpt"), "dp_reshardable")
    for r in results:
        assert r["state_keys"] == ["exp_avg", "exp_avg_sq", "param"]
        assert r["fresh_differs"]
        assert r["opt_max_diff"] == 0.0 and r["model_max_diff"] == 0.0
        assert r["loss_resumed"] == r["loss_continued"]


@pytest.mark.megatron
def test_stock_checkpoint_load_failures_with_torch_adamw(tmp_path):
    """Characterises stock megatron-core (0.16.1 and 0.19.2) with the torch-AdamW fallback:
    saving works in every format, but ``_set_main_param_and_optimizer_states`` copies every key of
    the live per-param state and the dp_zero / fully_reshardable paths carry no 'step' ->
    ``KeyError('step')``; and ``state_dict()`` on a never-stepped optimizer asserts (hence
    ``gpt.init_stock_adam_state``).  If this test fails, upstream changed these paths: update
    the harness docs (and the patch's assumptions)."""
    results = run_distributed(_stock_failures_body, 2, str(tmp_path))
    for r in results:
        assert r == {"fully_reshardable": "KeyError('step')", "torch": "KeyError('step')",
                     "fresh_no_init": "AssertionError"}
