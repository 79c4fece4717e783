"""Damaged checkpoints and the state paths beside Megatron's checkpoint contract.

- ``STQuantAdamW.load_state_dict`` with one damaged moment (packed, factored, fp32 escape, step):
  a ``ValueError`` naming the parameter and the moment, and the optimizer exactly as it was
  (every state tensor and object, step counters, the clock, param groups, the scheduler).
- ``checkpoint.move_state`` and the offload helper of the Megatron patch move every
  tensor of a quantized moment (the codebook's tables included).
- Megatron (CPU, gloo, 2 ranks; marker ``megatron``): the legacy dp_zero loader is refused and damaged
  tensors given to the ``_set_`` seam are rejected, both without change; ``offload_to_cpu`` /
  ``restore_from_cpu`` round-trip the packed state bit for bit and training continues as if they
  had not run.
"""

from __future__ import annotations

import copy
import io
import types
from typing import Any

import pytest
import torch

from stquant_megatron import STQuantAdamW, STQuantConfig
from stquant_megatron.checkpoint import move_state
from stquant_megatron.state import QUANTIZED_STATES, FactoredState, PackedState

# exp_avg packed (scheduled widths); exp_avg_sq factored, except for "2.weight" (packed); "4.weight"
# and the biases are fp32 escapes (below min_numel)
CONFIG = dict(avg_bits=4.0, min_numel=512, exp_avg_sq_format="factored", never_factor=["2.weight"],
              warmup_steps=2, interval=2, stats_steps=1)  # fmt: skip


def _train(model, opt, steps, start=0):
    gen = torch.Generator().manual_seed(1 + start)
    for _ in range(steps):
        opt.zero_grad()
        model(torch.randn(16, 64, generator=gen)).pow(2).mean().backward()
        opt.step()


def _model_and_optimizer(steps=3):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Tanh(), torch.nn.Linear(32, 32), torch.nn.Tanh(),
                                torch.nn.Linear(32, 8))  # fmt: skip
    opt = STQuantAdamW(model.named_parameters(), lr=1e-2, config=STQuantConfig(**CONFIG))
    _train(model, opt, steps)
    return model, opt


def _roundtrip(sd):
    """torch.save -> torch.load(weights_only=True), as a real checkpoint goes."""
    buf = io.BytesIO()
    torch.save(sd, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


def _snapshot(opt) -> dict[str, Any]:
    """Everything a load could change, as copies: per parameter its value, every state entry (codes,
    scales, width, codebook, factored statistics, fp32 escapes, step) and which objects hold them;
    the param groups (hyperparameters, which tensors they hold); the clock; the scheduler's state."""
    snap: dict[str, Any] = {"global_step": opt.global_step, "groups": [], "params": {}, "state": {}, "objects": {}}
    snap["scheduler"] = copy.deepcopy(opt.scheduler.state_dict()) if opt.scheduler is not None else None
    for g in opt.param_groups:
        snap["groups"].append({k: ([id(p) for p in v] if k == "params" else copy.deepcopy(v)) for k, v in g.items()})
        for p in g["params"]:
            name = opt.param_name(p)
            snap["params"][name] = p.detach().cpu().clone()
            st = opt.state.get(p, {})
            snap["objects"][name] = {k: id(v) for k, v in st.items()}
            entry = {}
            for k, v in st.items():
                if isinstance(v, PackedState):
                    entry[k] = ("packed", v.codes.cpu().clone(), v.scale.cpu().clone(), v.bits, v.codebook.kind,
                                v.numel, v.block_size)  # fmt: skip
                elif isinstance(v, FactoredState):
                    entry[k] = ("factored", v.row.cpu().clone(), v.col.cpu().clone(), v.offset, v.numel)
                elif torch.is_tensor(v):
                    entry[k] = ("tensor", v.cpu().clone(), v.device.type)
                else:
                    entry[k] = ("value", copy.deepcopy(v))
            snap["state"][name] = entry
    return snap


def _assert_same(a: Any, b: Any, where: str = "snapshot") -> None:
    """Recursive equality: tensors bit for bit (and dtype), everything else ``==``."""
    if torch.is_tensor(a):
        assert torch.is_tensor(b) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), (where, a.keys(), getattr(b, "keys", lambda: b)())
        for k in a:
            _assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, (where, a, b)


# --------------------------------------------------------------------- damaged standalone checkpoints
PACKED, FACT, ESCAPE = "2.weight", "0.weight", "4.weight"


def _set(**kw):
    return lambda e: e.update(kw)


def _edit(key, fn):
    return lambda e: e.update({key: fn(e[key])})


def _drop(key):
    return lambda e: e.pop(key)


def _nan_at(i):
    def f(t):
        t = t.clone()
        t.view(-1)[i] = float("nan")
        return t

    return f


def _replace_by(value):
    return lambda e: (e.clear(), e.update(value))


# id -> (parameter, moment, corrupt(entry dict), pattern the message must match besides naming the tensor)
DAMAGED = {
    # packed moment
    "codes_truncated": (PACKED, "exp_avg", _edit("codes", lambda t: t[:-1]), r"codes should be uint8 \(8, \d, 16\)"),
    "codes_flat": (PACKED, "exp_avg_sq", _edit("codes", lambda t: t.reshape(-1)), "codes should be uint8"),
    "codes_int8": (PACKED, "exp_avg_sq", _edit("codes", lambda t: t.to(torch.int8)), "torch.int8"),
    "codes_float": (PACKED, "exp_avg", _edit("codes", lambda t: t.float()), "torch.float32"),
    "codes_missing": (PACKED, "exp_avg", _drop("codes"), "malformed.*'codes'"),
    "codes_not_a_tensor": (PACKED, "exp_avg", _set(codes=[1, 2, 3]), "codes should be uint8"),
    "scale_short": (PACKED, "exp_avg", _edit("scale", lambda t: t[:-1]), r"scale should be fp32/bf16 \(8,\); got .*\(7,\)"),
    "scale_long": (PACKED, "exp_avg_sq", _edit("scale", lambda t: torch.cat([t, t[:1]])), r"\(9,\)"),
    "scale_2d": (PACKED, "exp_avg", _edit("scale", lambda t: t[:, None]), r"\(8, 1\)"),
    "scale_fp16": (PACKED, "exp_avg_sq", _edit("scale", lambda t: t.half()), "torch.float16"),
    "scale_nan": (PACKED, "exp_avg", _edit("scale", _nan_at(3)), r"finite and >= 0.*nan"),
    "scale_negative": (PACKED, "exp_avg_sq", _edit("scale", lambda t: t - t.max() - 1), "finite and >= 0"),
    "scale_inf": (PACKED, "exp_avg", _edit("scale", lambda t: torch.full_like(t, float("inf"))), "inf"),
    "scale_missing": (PACKED, "exp_avg_sq", _drop("scale"), "malformed.*'scale'"),
    "bits_9": (PACKED, "exp_avg", _set(bits=9), "bits=9; allowed widths are 2..8"),
    "bits_1": (PACKED, "exp_avg_sq", _set(bits=1), "bits=1; allowed widths are 2..8"),
    "bits_fractional": (PACKED, "exp_avg_sq", _edit("bits", lambda b: b + 0.5), r"bits=\d\.5 \(float\); it must be an int"),
    "bits_string": (PACKED, "exp_avg", _set(bits="four"), "bits='four'"),
    "bits_bool": (PACKED, "exp_avg", _set(bits=True), r"bits=True \(bool\)"),
    "bits_disagree_with_codes": (PACKED, "exp_avg", _edit("bits", lambda b: 5 if b != 5 else 4), "codes should be"),
    "bits_missing": (PACKED, "exp_avg", _drop("bits"), "malformed.*'bits'"),
    "numel_off_by_one": (PACKED, "exp_avg", _edit("numel", lambda n: n - 1), "numel=1023; the parameter has numel=1024"),
    "numel_negative": (PACKED, "exp_avg_sq", _set(numel=-1), "numel=-1"),
    "numel_string": (PACKED, "exp_avg_sq", _set(numel="1024"), "numel='1024'"),
    "block_size_not_power_of_two": (PACKED, "exp_avg", _set(block_size=24, codes=torch.zeros(43, 4, 3, dtype=torch.uint8),
                                                            scale=torch.ones(43), bits=4), "power of two"),  # fmt: skip
    "block_size_zero": (PACKED, "exp_avg", _set(block_size=0), "block_size=0"),
    "codebook_unknown": (PACKED, "exp_avg", _set(codebook="foo"), "codebook kind 'foo' is unknown"),
    "codebook_log_signed": (PACKED, "exp_avg", _set(codebook="log"), "'log' codebook exists for exp_avg_sq"),
    "codebook_none": (PACKED, "exp_avg_sq", _set(codebook=None), "codebook=None"),
    "signed_string": (PACKED, "exp_avg_sq", _set(signed="False"), "signed='False'"),
    "signed_flipped": (PACKED, "exp_avg_sq", _set(signed=True), "stored signed"),
    "moments_swapped": (PACKED, "exp_avg", None, "stored unsigned"),
    "not_a_dict": (PACKED, "exp_avg", None, "should be a float tensor"),
    # factored exp_avg_sq
    "row_short": (FACT, "exp_avg_sq", _edit("row", lambda t: t[:-1]), r"factored as \(31, 64\)"),
    "col_long": (FACT, "exp_avg_sq", _edit("col", lambda t: torch.cat([t, t[:1]])), r"factored as \(32, 65\)"),
    "rows_and_cols_swapped": (FACT, "exp_avg_sq", lambda e: e.update(row=e["col"], col=e["row"]), r"factored as \(64, 32\)"),
    "row_nan": (FACT, "exp_avg_sq", _edit("row", _nan_at(0)), "row statistics must be finite"),
    "col_negative": (FACT, "exp_avg_sq", _edit("col", lambda t: -t - 1), "col statistics must be finite"),
    "row_fp64": (FACT, "exp_avg_sq", _edit("row", lambda t: t.double()), "row should be a 1-D fp32 tensor"),
    "col_2d": (FACT, "exp_avg_sq", _edit("col", lambda t: t[:, None]), "col should be a 1-D fp32 tensor"),
    "col_missing": (FACT, "exp_avg_sq", _drop("col"), "malformed.*'col'"),
    "offset_fractional": (FACT, "exp_avg_sq", _set(offset=0.5, numel=100), r"offset=0.5 \(float\)"),
    "shard_outside_matrix": (FACT, "exp_avg_sq", _set(offset=2000, numel=100), "does not fit"),
    "shard_of_another_size": (FACT, "exp_avg_sq", _set(offset=0, numel=1000), "numel=1000; the parameter has numel=2048"),
    "factored_exp_avg": (FACT, "exp_avg", _replace_by({"factored": True, "row": torch.ones(32), "col": torch.ones(64)}),
                         "stored unsigned"),  # fmt: skip
    # fp32 escape (dense tensors in the checkpoint)
    "dense_nan": (ESCAPE, "exp_avg", None, "NaN or Inf"),
    "dense_negative_second_moment": (ESCAPE, "exp_avg_sq", None, "negative values"),
    "dense_transposed": (ESCAPE, "exp_avg", None, r"shape \(8, 32\)"),
    "dense_integer": (ESCAPE, "exp_avg_sq", None, "float tensor"),
    "dense_packed_of_another_size": (ESCAPE, "exp_avg", None, "numel=512; the parameter has numel=256"),
}


def _damage(sd, case):
    """Apply DAMAGED[case] to the state entry it names (the cases without a corrupt function here)."""
    name, moment, corrupt, _ = DAMAGED[case]
    index = sd["param_groups"][0]["param_names"].index(name)
    st = sd["state"][index]
    if corrupt is not None:
        corrupt(st[moment])
    elif case == "moments_swapped":
        st["exp_avg"], st["exp_avg_sq"] = st["exp_avg_sq"], st["exp_avg"]
    elif case == "not_a_dict":
        st[moment] = [1, 2]
    elif case == "dense_nan":
        st[moment] = _nan_at(5)(st[moment])
    elif case == "dense_negative_second_moment":
        st[moment] = st[moment].clone()
        st[moment][1, 2] = -1e-3
    elif case == "dense_transposed":
        st[moment] = st[moment].t().contiguous()
    elif case == "dense_integer":
        st[moment] = st[moment].long()
    elif case == "dense_packed_of_another_size":
        st[moment] = PackedState.zeros(512, bits=4, kind="linear", signed=True, block_size=128).to_dict()
    else:
        raise AssertionError(case)


@pytest.fixture(scope="module")
def saved_state_dict():
    """A checkpoint after 3 steps, through torch.save / torch.load(weights_only=True)."""
    _, opt = _model_and_optimizer(steps=3)
    sd = _roundtrip(opt.state_dict())
    assert isinstance(sd["state"][0]["exp_avg_sq"], dict) and sd["state"][0]["exp_avg_sq"].get("factored")
    assert isinstance(sd["state"][2]["exp_avg_sq"], dict) and "codes" in sd["state"][2]["exp_avg_sq"]
    assert torch.is_tensor(sd["state"][4]["exp_avg"])
    return sd


@pytest.mark.parametrize("case", list(DAMAGED))
def test_damaged_moment_is_rejected_naming_it_and_nothing_changes(case, saved_state_dict):
    name, moment, _, pattern = DAMAGED[case]
    model, opt = _model_and_optimizer(steps=3)
    _train(model, opt, 1, start=3)  # the live state differs from the checkpoint's in every unit
    opt.param_groups[0]["lr"] = 1.25e-3  # and so do the param groups
    sd = copy.deepcopy(saved_state_dict)
    _damage(sd, case)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=pattern) as err:
        opt.load_state_dict(sd)
    assert f"{moment} of '{name}'" in str(err.value), str(err.value)
    _assert_same(before, _snapshot(opt))
    # and it still trains: the next step runs on the untouched state
    _train(model, opt, 1, start=4)
    assert opt.global_step == 5


@pytest.mark.parametrize("case", ["step_nan", "step_negative", "moment_missing", "amsgrad_state"])
def test_damaged_entry_beside_the_moments_is_rejected_and_nothing_changes(case, saved_state_dict):
    model, opt = _model_and_optimizer(steps=3)
    sd = copy.deepcopy(saved_state_dict)
    st = sd["state"][2]
    pattern = {"step_nan": "step of '2.weight' is nan", "step_negative": "step of '2.weight' is -1",
               "moment_missing": r"'2.weight' lacks \['exp_avg'\]",
               "amsgrad_state": "'2.weight' has 'max_exp_avg_sq'"}[case]  # fmt: skip
    if case == "step_nan":
        st["step"] = torch.tensor(float("nan"))
    elif case == "step_negative":
        st["step"] = torch.tensor(-1.0)
    elif case == "moment_missing":
        del st["exp_avg"]
    else:
        st["max_exp_avg_sq"] = torch.zeros(32, 32)
    before = _snapshot(opt)
    with pytest.raises(ValueError, match=pattern):
        opt.load_state_dict(sd)
    _assert_same(before, _snapshot(opt))


def test_undamaged_checkpoint_loads_exactly(saved_state_dict):
    """The checks above do not refuse what ``state_dict()`` writes: the checkpoint loads into an optimizer
    that trained on, and the state is the saved one, bit for bit."""
    model, opt = _model_and_optimizer(steps=3)
    ref = _snapshot(opt)
    _train(model, opt, 2, start=3)
    opt.load_state_dict(copy.deepcopy(saved_state_dict))
    got = _snapshot(opt)
    for key in ("state", "global_step", "scheduler"):
        _assert_same(ref[key], got[key], key)


# --------------------------------------------------------------------- device moves of quantized states
def test_move_state_moves_every_tensor_of_a_quantized_state():
    """``checkpoint.move_state`` moves codes, scales and the codebook's tables (packed) or the statistics (factored), in place.
    This machine has no accelerator: "meta" stands for the other device (it keeps no values, so the
    values' round trip is tested on CPU below and, where CUDA exists, in the CUDA test)."""
    packed = PackedState.zeros(300, bits=3, kind="pow2", signed=True, block_size=64)
    packed.copy_(torch.randn(300))
    fact = FactoredState.zeros((8, 16), offset=3, numel=100)
    move_state(packed, "meta")
    move_state(fact, torch.device("meta"))
    tensors = [packed.codes, packed.scale, packed.codebook.qmap, packed.codebook.bounds, fact.row, fact.col]
    assert all(t.device.type == "meta" for t in tensors), [t.device for t in tensors]
    assert (packed.bits, packed.codebook.kind, packed.numel) == (3, "pow2", 300)
    assert (fact.shape, fact.offset, fact.numel) == ((8, 16), 3, 100)
    # on the device they are already on: nothing is copied
    cpu = PackedState.zeros(300, bits=3, kind="pow2", signed=True, block_size=64).copy_(torch.randn(300))
    codes, scale = cpu.codes, cpu.scale
    move_state(cpu, "cpu")
    assert cpu.codes is codes and cpu.scale is scale


def _inner_holder(opt):
    """What ``patch._move_states`` reads of a Megatron optimizer: its ``.optimizer``."""
    return types.SimpleNamespace(optimizer=opt)


def test_offload_helper_moves_every_quantized_state_and_keeps_steps_on_the_host():
    from stquant_megatron.megatron.patch import _move_states

    model, opt = _model_and_optimizer(steps=3)
    _move_states(_inner_holder(opt), "meta")
    n = 0
    for p, st in opt.state.items():
        assert st["step"].device.type == "cpu"
        for key in ("exp_avg", "exp_avg_sq"):
            v = st[key]
            if isinstance(v, QUANTIZED_STATES):
                packed = isinstance(v, PackedState)
                ts = [v.codes, v.scale, v.codebook.qmap, v.codebook.bounds] if packed else [v.row, v.col]
                assert all(t.device.type == "meta" for t in ts), (opt.param_name(p), key)
                n += 1
            else:  # fp32 escapes: plain tensors, which Megatron's own offload moves
                assert v.device.type == "cpu"
    assert n == 4  # exp_avg of both matrices, the packed exp_avg_sq of "2.weight", the factored one of "0.weight"


def test_offload_helper_round_trip_on_this_device_changes_nothing():
    """The restore direction (each state to its parameter's device): on this CPU-only machine it is the
    identity, which must leave the state and the training exactly as they were."""
    from stquant_megatron.megatron.patch import _move_states

    model_a, opt_a = _model_and_optimizer(steps=3)
    model_b, opt_b = _model_and_optimizer(steps=3)
    before = _snapshot(opt_b)
    _move_states(_inner_holder(opt_b), "cpu")
    _move_states(_inner_holder(opt_b))
    _assert_same(before, _snapshot(opt_b))
    _train(model_a, opt_a, 2, start=3)
    _train(model_b, opt_b, 2, start=3)
    _assert_same(_snapshot(opt_a)["state"], _snapshot(opt_b)["state"])


# --------------------------------------------------------------------- Megatron (CPU, gloo, 2 ranks)
# exp_avg packed at 4 bits; exp_avg_sq factored (statistics all-reduced over the DP shards), except for the
# word embeddings (packed); norms and biases fp32 escapes
MEGATRON = dict(bits=4, exp_avg_sq_format="factored", never_factor=["embedding.word_embeddings.weight"])


def _megatron_run(rank, world, spec):
    """One rank: patched GPT + DistributedOptimizer, trained, then what ``spec`` asks; returns what the test checks."""
    import megatron.core.optimizer.distrib_optimizer as dopt
    from megatron.core.optimizer.optimizer import MegatronOptimizer

    from stquant_megatron.megatron import patch, unpatch
    from stquant_megatron.testing import gpt, init_megatron_parallel

    wrapped = ((dopt.DistributedOptimizer, "load_parameter_state_from_dp_zero_legacy"),
               (MegatronOptimizer, "offload_to_cpu"), (MegatronOptimizer, "restore_from_cpu"))  # fmt: skip
    stock = [vars(cls)[name] for cls, name in wrapped]
    init_megatron_parallel(1, 1)
    patch(STQuantConfig(**MEGATRON))
    res: dict[str, Any] = {"wrapped": all(vars(cls)[name] is not orig for (cls, name), orig in zip(wrapped, stock))}
    model, opt = gpt.build_gpt_and_optimizer(lr=3e-3, num_layers=2, hidden_size=64, bf16=True)
    (d,) = gpt.distributed_optimizers(opt)
    inner = d.optimizer
    res["losses"] = [h["loss"] for h in gpt.train(model, opt, 3)]
    kinds = {type(v).__name__ for st in inner.state.values() for v in st.values()}
    res["kinds"] = sorted(kinds)
    res["sharded"] = sum(isinstance(v, FactoredState) and v.sharded for st in inner.state.values() for v in st.values())
    before = _snapshot(inner)
    if spec.get("refuse"):
        # the legacy loader, reached as Megatron-LM reaches it (--ckpt-convert-update-legacy-dist-opt-format):
        # only DP rank 0 reads the file; every rank refuses before any collective
        path = f"{spec['dir']}/legacy_distrib_optim.pt"
        if rank == 0:
            torch.save({}, path)
        torch.distributed.barrier()
        try:
            opt.load_parameter_state(path, update_legacy_format=True)
            res["legacy"] = None
        except ValueError as e:
            res["legacy"] = str(e)
        _assert_same(before, _snapshot(inner), "after the legacy loader")
        # damaged dense tensors through the _set_ seam (what every current format calls per parameter): a
        # perturbed "param" next to a damaged moment must not be written either
        model_param = next(p for p in d.model_param_group_index_map if p.dim() == 2 and p.numel() >= 4096)
        good = d._get_main_param_and_optimizer_states(model_param)
        res["seam_param"] = inner.param_name(good["param"])
        res["seam_factored"] = isinstance(inner.state[good["param"]]["exp_avg_sq"], FactoredState)
        damages = {
            "nan_exp_avg": ("exp_avg", lambda t: torch.full_like(t, float("nan"))),
            "negative_exp_avg_sq": ("exp_avg_sq", lambda t: t - 1.0),
            "short_exp_avg": ("exp_avg", lambda t: t[:-1]),
            "short_param": ("param", lambda t: t[:-1]),
        }
        res["seam"] = {}
        for case, (key, damage) in damages.items():
            tensors = {k: v.detach().float().cpu().clone() for k, v in good.items()}
            tensors["param"] += 1.0
            tensors[key] = damage(tensors[key])
            try:
                d._set_main_param_and_optimizer_states(model_param, tensors)
                res["seam"][case] = None
            except ValueError as e:
                res["seam"][case] = str(e)
            _assert_same(before, _snapshot(inner), f"after the seam's {case}")
        inner.finish_factored_load()  # collective, as after any load: nothing staged, nothing changes
        _assert_same(before, _snapshot(inner), "after finish_factored_load")
    if spec.get("offload"):
        # Megatron's offload_to_cpu / restore_from_cpu (RL training), through the ChainedOptimizer. On this
        # CPU-only machine the CPU shim makes .cuda() the identity, so the moves themselves are identities
        # here: what is checked is that every quantized state goes through checkpoint.move_state with the right device (to the
        # host, then back to its parameter's), that nothing changes and that training goes on as without
        # them. The real GPU -> CPU -> GPU move is not tested here (no GPU; see the closing note of issue 18).
        moves = []
        from stquant_megatron import checkpoint as ckpt_mod

        original = ckpt_mod.move_state

        def move_and_record(state, device):
            moves.append((id(state), torch.device(device).type))
            return original(state, device)

        ckpt_mod.move_state = move_and_record
        try:
            opt.offload_to_cpu()
            res["offloaded"] = sorted(moves)
            res["on_host"] = all(t.device.type == "cpu" for st in inner.state.values() for v in st.values()
                                 for t in ([v.codes, v.scale, v.codebook.qmap] if isinstance(v, PackedState) else
                                           [v.row, v.col] if isinstance(v, FactoredState) else [v]))  # fmt: skip
            moves.clear()
            opt.restore_from_cpu()
            res["restored"] = sorted(moves)
        finally:
            ckpt_mod.move_state = original
        res["quantized"] = sorted(id(v) for st in inner.state.values() for v in st.values()
                                  if isinstance(v, QUANTIZED_STATES))  # fmt: skip
        res["param_devices"] = sorted({p.device.type for p in inner.state})
        _assert_same(before, _snapshot(inner), "after offload_to_cpu + restore_from_cpu")
    res["continued"] = [h["loss"] for h in gpt.train(model, opt, spec.get("more", 0), start_step=3)]
    unpatch()
    res["unpatched"] = all(vars(cls)[name] is orig for (cls, name), orig in zip(wrapped, stock))
    return res


@pytest.mark.megatron
def test_megatron_refuses_legacy_loader_and_damaged_seam_tensors_without_change(tmp_path):
    from stquant_megatron.testing import run_distributed

    for r in run_distributed(_megatron_run, 2, dict(refuse=True, dir=str(tmp_path), more=1), timeout=400):
        assert r["kinds"] == ["FactoredState", "PackedState", "Tensor"] and r["sharded"] > 0, r
        msg = r["legacy"]
        assert msg and "legacy" in msg and "Nothing was loaded" in msg and "--ckpt-convert-save" in msg, msg
        assert "without --stquant" in msg, msg
        assert r["seam_factored"]
        for case, msg in r["seam"].items():
            key = {"nan_exp_avg": "exp_avg", "negative_exp_avg_sq": "exp_avg_sq", "short_exp_avg": "exp_avg",
                   "short_param": "param"}[case]  # fmt: skip
            assert msg and f"{key} of '{r['seam_param']}'" in msg, (case, msg)
        assert r["wrapped"] and r["unpatched"]
        assert len(r["continued"]) == 1 and r["continued"][0] == r["continued"][0]


@pytest.mark.megatron
def test_megatron_offload_and_restore_move_packed_state_and_training_goes_on():
    from stquant_megatron.testing import run_distributed

    straight = run_distributed(_megatron_run, 2, dict(more=2), timeout=400)
    moved = run_distributed(_megatron_run, 2, dict(offload=True, more=2), timeout=400)
    for r, s in zip(moved, straight):
        assert r["kinds"] == ["FactoredState", "PackedState", "Tensor"] and r["sharded"] > 0, r
        assert r["on_host"]
        quantized = r["quantized"]
        assert len(quantized) > 4
        # offload: every quantized state to the host; restore: every one to its parameter's device
        assert r["offloaded"] == sorted((q, "cpu") for q in quantized), (r["offloaded"], quantized)
        assert r["restored"] == sorted((q, dev) for q in quantized for dev in r["param_devices"]), r["restored"]
        assert r["losses"] == s["losses"] and r["continued"] == s["continued"], (r, s)
        assert r["unpatched"]
