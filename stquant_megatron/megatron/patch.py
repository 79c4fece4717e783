"""The patches: what each replaces, and ``patch`` / ``unpatch``.

Seams (all looked up at call time, so no Megatron file is edited):

- ``megatron.core.optimizer._get_megatron_optimizer_based_on_param_groups``: wrapped; after it has
  built a ``DistributedOptimizer`` (whose inner optimizer's param groups already hold the fp32
  main-param shards), the inner optimizer is replaced by ``STQuantAdamW`` over the same param-group
  dicts, units are named by global parameter name, and the packed state is created eagerly, so a
  checkpoint load never allocates fp32 dummies. Works whatever TE/apex/torch Adam was picked.
- ``megatron.core.optimizer.get_megatron_optimizer`` (and its binding in
  ``megatron.training.training`` when already imported): wrapped to reject unsupported setups at
  start-up with a message that says what to change.
- ``DistributedOptimizer._get_main_param_and_optimizer_states`` / ``_set_...``: every live
  checkpoint format (``dp_reshardable``, ``fully_reshardable``, legacy ``torch``) goes through
  them; ours return / accept dense fp32 moments, so checkpoints are interchangeable with stock runs.
- ``DistributedOptimizer.load_state_dict``: restores the scheduler (per-unit bits) from the small
  non-tensor ``optimizer.stquant`` entry before the moments are re-packed.
- ``DistributedOptimizer.load_parameter_state_from_*`` (every parameter-state format): afterwards,
  the factored ``exp_avg_sq`` statistics of sharded matrices are rebuilt from every rank's loaded
  shard (one all-reduce over the data-parallel group: ``STQuantAdamW.finish_factored_load``).
- ``DistributedOptimizer.load_parameter_state_from_dp_zero_legacy`` (pre-2024 checkpoints): refused,
  as it writes dense moments into ``optimizer.state`` past ``_set_``; convert with stock Megatron first.
- ``MegatronOptimizer.offload_to_cpu`` / ``restore_from_cpu`` (RL training): also move the packed and
  factored moments (the originals move plain tensors only), restored to their parameters' device.
- ``megatron.training.arguments.add_megatron_arguments`` (when Megatron-LM's ``megatron.training``
  exists, e.g. the 0.19.2 wheel): also registers the ``--stquant-*`` flags.

All wrappers fall back to the original when the inner optimizer is not ours.
"""

from __future__ import annotations

import functools
import importlib
import importlib.abc
import importlib.util
import os
import re
import sys
from typing import Any

import torch

from .. import checkpoint
from . import packed_checkpoint
from ..config import MOMENTS, STQuantConfig
from ..optim import STQuantAdamW
from ..state import QUANTIZED_STATES
from .args import add_stquant_args, config_from_args

SUPPORTED_VERSIONS = ((0, 16), (0, 20))
"""[min, max) of megatron-core (major, minor) versions; tested: 0.16.1 and 0.19.2."""

_ACTIVE: dict[str, Any] = {"patched": False, "config": None, "from_args": False, "checkpoint_format": None}
_ORIGINALS: list[tuple[Any, str, Any]] = []
_HOOKS: list[Any] = []


def megatron_version() -> tuple[int, ...]:
    from megatron.core import package_info

    parts = []
    for p in package_info.__version__.split("+")[0].split(".")[:3]:
        digits = "".join(ch for ch in p if ch.isdigit())
        parts.append(int(digits or 0))
    return tuple(parts)


def _check_version() -> None:
    try:
        version = megatron_version()
    except ImportError as e:
        raise ImportError(f"stquant_megatron.megatron needs megatron-core: pip install megatron-core ({e})") from e
    lo, hi = SUPPORTED_VERSIONS
    if not lo <= version[:2] < hi:
        raise RuntimeError(
            f"megatron-core {'.'.join(map(str, version))} is installed; stquant-megatron supports "
            f"{lo[0]}.{lo[1]} <= version < {hi[0]}.{hi[1]} (tested 0.16.1 and 0.19.2). Install a supported "
            "megatron-core, or upgrade stquant-megatron"
        )


def is_patched() -> bool:
    return _ACTIVE["patched"]


def _active_config() -> STQuantConfig | None:
    if _ACTIVE["config"] is not None:
        return _ACTIVE["config"]
    if _ACTIVE["from_args"]:
        from megatron.training.global_vars import get_args

        return config_from_args(get_args())
    return None


# ------------------------------------------------------------------------------------- validation
def validate_setup(opt_config: Any, model_chunks: Any = ()) -> None:
    """Raise ValueError listing every unsupported option, with what to change."""
    problems = []
    if getattr(opt_config, "optimizer", "adam") != "adam":
        problems.append(f"--optimizer {opt_config.optimizer}: STQuant packs Adam moments; use --optimizer adam")
    if getattr(opt_config, "use_precision_aware_optimizer", False):
        problems.append("--use-precision-aware-optimizer: STQuant replaces it; remove the flag")
    if getattr(opt_config, "optimizer_cpu_offload", False):
        problems.append("--optimizer-cpu-offload: not supported with packed moments; remove the flag")
    if not getattr(opt_config, "use_distributed_optimizer", False):
        problems.append("no distributed optimizer: add --use-distributed-optimizer")
    if getattr(opt_config, "use_layer_wise_distributed_optimizer", False):
        problems.append("--use-layer-wise-distributed-optimizer: not supported; use --use-distributed-optimizer")
    for chunk in model_chunks or ():
        ddp = getattr(chunk, "ddp_config", None)
        if getattr(ddp, "use_megatron_fsdp", False) or getattr(ddp, "use_custom_fsdp", False):
            problems.append("Megatron-FSDP: not supported; use --use-distributed-optimizer without --use-megatron-fsdp")
            break
    if problems:
        raise ValueError("stquant-megatron cannot run with this setup:\n  - " + "\n  - ".join(problems)
                         + "\n(or run without --stquant / stquant_megatron.megatron.patch)")  # fmt: skip


# ------------------------------------------------------------------------------------- naming
def _expert_offset(experts: Any) -> int | None:
    """Global index of the first local expert of an MoE experts module (SequentialMLP /
    TEGroupedMLP: ``num_local_experts`` per expert-parallel rank), or None for other modules."""
    n = getattr(experts, "num_local_experts", None)
    if not isinstance(n, int):
        return None
    group = getattr(experts, "ep_group", None)
    if group is not None:
        rank = torch.distributed.get_rank(group=group) if torch.distributed.is_initialized() else 0
    else:  # older megatron-core: the global expert-parallel state
        from megatron.core import parallel_state

        rank = parallel_state.get_expert_model_parallel_rank()
    return rank * n


def global_param_names(model_chunks) -> dict[torch.Tensor, str]:
    """Parameter -> name with the global layer number (``layers.<global>.``) and the global expert
    index (``local_experts.<global>.`` for SequentialMLP, ``weight<global>`` / ``bias<global>`` for
    grouped experts), identical on every pipeline, tensor and expert-parallel rank and distinct for
    different tensors; wrapper prefixes (``module.``) removed. The last pipeline stage's copy of a tied
    word embedding (Megatron keeps it equal to the first stage's by summing their gradients) is named as
    the embedding: one unit, the same width and stochastic-rounding stream, so the copies stay equal."""
    names = {}
    for chunk in model_chunks:
        modules = dict(chunk.named_modules())
        for name, p in chunk.named_parameters():
            parts = name.split(".")
            for i in range(len(parts) - 1):
                if parts[i] == "layers" and parts[i + 1].isdigit():
                    number = getattr(modules.get(".".join(parts[: i + 2])), "layer_number", None)
                    if isinstance(number, int):
                        parts[i + 1] = str(number - 1)  # Megatron's layer_number is global, 1-based
                elif parts[i] == "local_experts" and parts[i + 1].isdigit():
                    offset = _expert_offset(modules.get(".".join(name.split(".")[:i])))
                    if offset is not None:
                        parts[i + 1] = str(offset + int(parts[i + 1]))
            last = re.fullmatch(r"(weight|bias)(\d+)", parts[-1])
            if last and len(parts) >= 3:  # grouped experts: <experts>.linear_fc1.weight<local>
                offset = _expert_offset(modules.get(".".join(name.split(".")[:-2])))
                if offset is not None:
                    parts[-1] = f"{last.group(1)}{offset + int(last.group(2))}"
            while parts and parts[0] == "module":
                parts.pop(0)
            if getattr(p, "shared_embedding", False) and parts[-2:] == ["output_layer", "weight"]:
                parts[-2:] = ["embedding", "word_embeddings", "weight"]  # the tied copy: one unit with the embedding
            names[p] = ".".join(parts)
    return names


def install(distopt: Any, config: STQuantConfig) -> STQuantAdamW:
    """Replace ``distopt``'s inner optimizer by ``STQuantAdamW`` over the same shard param groups."""
    oc = distopt.config
    group = distopt.get_grad_stats_parallel_group() if hasattr(distopt, "get_grad_stats_parallel_group") else None
    # With fp32 model params (no --bf16/--fp16) the shard "main" params are views of the model
    # params, i.e. non-leaf tensors, which torch.optim.Optimizer refuses ("can't optimize a
    # non-leaf Tensor"). Megatron itself swaps them into its inner optimizer's param groups after
    # construction; do the same: construct over leaf stand-ins, then put the real shards back into
    # the same group dicts (the step updates them in place under no_grad, like Megatron's).
    groups = distopt.optimizer.param_groups
    shards = [list(g["params"]) for g in groups]
    for g in groups:
        g["params"] = [p if p.is_leaf else p.detach() for p in g["params"]]
    try:
        inner = STQuantAdamW(
            groups, lr=oc.lr, betas=(oc.adam_beta1, oc.adam_beta2), eps=oc.adam_eps,
            weight_decay=oc.weight_decay, config=config, decoupled_weight_decay=oc.decoupled_weight_decay,
            process_group=group,
        )  # fmt: skip
    finally:
        for g, params in zip(groups, shards):
            g["params"] = params
    if len(inner.param_groups) != len(shards) or any(
        a is not b for g, params in zip(inner.param_groups, shards) for a, b in zip(g["params"], params)
    ):  # the same dicts, holding the real shards
        raise RuntimeError("stquant-megatron: STQuantAdamW did not keep Megatron's param-group dicts")
    inner.group_step_authoritative = True
    names = global_param_names(distopt.model_chunks)
    for model_param, (gi, go) in distopt.model_param_group_index_map.items():
        main = inner.param_groups[gi]["params"][go]
        offset = distopt._get_model_param_range_map(model_param)["param"].start
        inner.set_param_name(main, names[model_param], offset, full_numel=model_param.numel(),
                             replicas=_replicas(distopt, model_param), full_shape=tuple(model_param.shape))  # fmt: skip
    # factored exp_avg_sq of sharded matrices: every data-parallel rank lists every tensor of the
    # buffers in the same order; the shards' row and column sums are all-reduced over the group the
    # buffers are sharded across
    buffers = list(getattr(distopt, "buffers", []))
    dp_groups = {id(b.data_parallel_group): b.data_parallel_group for b in buffers}
    if len(dp_groups) > 1:
        raise RuntimeError("stquant-megatron: the distributed optimizer's buffers are sharded over different groups")
    members = [(names[p], tuple(p.shape)) for b in buffers for p in b.params]
    dp_group = next(iter(dp_groups.values()), None) or getattr(distopt, "data_parallel_group", None)
    inner.set_factored_sharding(dp_group, members, device=buffers[0].grad_data.device if buffers else None)
    inner.history_file = "stquant_history_expert.jsonl" if any(
        g.get("is_expert_parallel") for g in inner.param_groups) else "stquant_history.jsonl"  # fmt: skip
    inner.init_state()
    inner.decision_callbacks.append(log_to_megatron_writers)
    distopt.optimizer = inner
    return inner


def _replicas(distopt: Any, model_param: torch.Tensor) -> int:
    """Ranks of the optimizer's group that keep the same elements of ``model_param`` apart from
    data-parallel sharding: the tensor-parallel size for a parameter that TP does not split (norms,
    routers, ...), 1 for a TP-split one, times 2 for a word embedding tied across pipeline stages. The
    scheduler counts such copies once in the budget."""
    copies = 2 if getattr(model_param, "shared_embedding", False) else 1  # a tied embedding: first and last stage
    if getattr(model_param, "tensor_model_parallel", False):
        return copies
    expert = not getattr(model_param, "allreduce", True)
    group = getattr(distopt, "expert_tp_group" if expert else "tp_group", None)
    if group is not None:
        return copies * torch.distributed.get_world_size(group)
    from megatron.core import parallel_state as ps

    return copies * (ps.get_expert_tensor_parallel_world_size() if expert else ps.get_tensor_model_parallel_world_size())


def _save_history(optimizer: STQuantAdamW, decision: Any, get_args) -> None:
    """Rank 0 appends each decision to ``<--save>/stquant_history.jsonl`` (one JSON line per decision;
    ``stquant_history_expert.jsonl`` for the MoE expert optimizer), the input of ``stquant-megatron
    report``: torch_dist dp_reshardable checkpoints keep the optimizer's non-tensor state inside .distcp."""
    try:
        save_dir = getattr(get_args(), "save", None)
    except (AssertionError, AttributeError):  # Megatron-LM args not initialized (megatron-core use)
        return
    if save_dir and (not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0):
        name = getattr(optimizer, "history_file", "stquant_history.jsonl")
        optimizer.scheduler.append_history(decision, os.path.join(save_dir, name))


def log_to_megatron_writers(decision: Any, optimizer: STQuantAdamW) -> None:
    """Per-unit bits and errors, average bits and state bytes to Megatron-LM's TensorBoard / W&B
    writers, on the rank that holds them (Megatron creates them on the last rank only)."""
    try:
        from megatron.training.global_vars import get_args, get_tensorboard_writer, get_wandb_writer
    except ImportError:  # megatron-core without Megatron-LM's training package
        return
    _save_history(optimizer, decision, get_args)
    tb, wb = get_tensorboard_writer(), get_wandb_writer()
    if tb is None and wb is None:
        return
    nparams = sum(p.numel() for g in optimizer.param_groups for p in g["params"])
    scalars = {"stquant/avg_bits": decision.avg_bits, "stquant/units_moved": decision.moved,
               "stquant/state_bytes_per_param": optimizer.state_bytes() / max(1, nparams)}  # fmt: skip
    scalars.update({f"stquant/bits/{u}": b for u, b in decision.bits.items()})
    scalars.update({f"stquant/error/{u}": e for u, e in decision.errors.items()})
    if tb is not None:
        for k, v in scalars.items():
            tb.add_scalar(k, v, decision.step)
    if wb is not None:
        wb.log(scalars, step=decision.step)


# ------------------------------------------------------------------------------------- patches
def _factory(orig):
    @functools.wraps(orig)
    def patched_get_megatron_optimizer_based_on_param_groups(*args, **kwargs):
        result = orig(*args, **kwargs)
        config = _active_config()
        if config is None:
            return result
        from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

        if isinstance(result, DistributedOptimizer):
            install(result, config)
        elif isinstance(result, tuple) or kwargs.get("skip_megatron_wrapping"):
            raise ValueError("stquant-megatron needs Megatron's DistributedOptimizer wrapping "
                             "(skip_megatron_wrapping / Megatron-FSDP paths are not supported)")  # fmt: skip
        else:
            validate_setup(result.config if hasattr(result, "config") else args[0])
        return result

    return patched_get_megatron_optimizer_based_on_param_groups


def _entry(orig):
    @functools.wraps(orig)
    def patched_get_megatron_optimizer(config, model_chunks, *args, **kwargs):
        if _active_config() is not None:
            validate_setup(config, model_chunks)
        return orig(config, model_chunks, *args, **kwargs)

    return patched_get_megatron_optimizer


def _get(orig):
    @functools.wraps(orig)
    def patched_get_main_param_and_optimizer_states(self, model_param):
        inner = self.optimizer
        if not isinstance(inner, STQuantAdamW):
            return orig(self, model_param)
        main = packed_checkpoint.main_param(self, model_param)
        if getattr(self, "_stquant_params_only", False):  # a packed checkpoint: the moments go separately
            return {"param": main}
        inner.init_state(main)
        st = inner.state[main]
        # dense fp32 on the CPU: no accelerator-memory spike while saving
        return {"param": main, **{key: checkpoint.moment_to_host(st[key]) for key in MOMENTS}}

    return patched_get_main_param_and_optimizer_states


def _set(orig):
    @functools.wraps(orig)
    @torch.no_grad()
    def patched_set_main_param_and_optimizer_states(self, model_param, tensors):
        inner = self.optimizer
        if not isinstance(inner, STQuantAdamW):
            return orig(self, model_param, tensors)
        main = packed_checkpoint.main_param(self, model_param)
        checkpoint.set_moments(inner, main, tensors)  # checks every tensor first ("param" too): a bad one changes nothing
        if torch.is_tensor(tensors.get("param")):
            main.copy_(tensors["param"].view_as(main))

    return patched_set_main_param_and_optimizer_states


def _load(orig):
    @functools.wraps(orig)
    def patched_load_state_dict(self, state_dict):
        inner = self.optimizer
        meta = (state_dict.get("optimizer") or {}).get("stquant") if isinstance(state_dict, dict) else None
        packed = isinstance(state_dict, dict) and packed_checkpoint.is_packed_type(state_dict.get("param_state_sharding_type"))
        if packed and not isinstance(inner, STQuantAdamW):
            raise ValueError(f"this checkpoint's optimizer state is {state_dict['param_state_sharding_type']}; this "
                             f"optimizer is {type(inner).__name__}, not stquant's")  # fmt: skip
        if packed:
            loaded = state_dict["param_state"].get("stquant")
            decoded = packed_checkpoint.validate(loaded)  # sizes and CRC32 of every entry before anything changes
        if isinstance(inner, STQuantAdamW) and meta is not None:
            inner.load_stquant_meta(meta)  # bits first: the moments are then packed at those widths
        if not packed:
            return orig(self, state_dict)
        self._stquant_prepared = packed_checkpoint.prepare(self, loaded, decoded)  # in this run's format; committed after the params
        try:
            base = packed_checkpoint.packed_kind(state_dict["param_state_sharding_type"])
            return orig(self, {**state_dict, "param_state_sharding_type": base})
        finally:
            self._stquant_prepared = None

    return patched_load_state_dict


def _finish_load(orig):
    @functools.wraps(orig)
    def patched_load_parameter_state(self, *args, **kwargs):
        result = orig(self, *args, **kwargs)
        if isinstance(self.optimizer, STQuantAdamW):  # collective: every rank of the data-parallel group loads
            prepared = getattr(self, "_stquant_prepared", None)
            if prepared is not None:  # a packed checkpoint's moments (``_load``), after Megatron set the params
                packed_checkpoint.commit(self, prepared)
                self._stquant_prepared = None
            self.optimizer.finish_factored_load()
        return result

    return patched_load_parameter_state


def _sharded(orig):
    @functools.wraps(orig)
    def patched_sharded_state_dict(self, model_sharded_state_dict=None, is_loading=False, sharding_type=None,
                                   metadata=None):  # fmt: skip
        model_sd = {} if model_sharded_state_dict is None else model_sharded_state_dict
        kind = sharding_type if sharding_type is not None else (metadata or {}).get("distrib_optim_sharding_type")
        base = packed_checkpoint.packed_kind(kind)
        if base is None:
            return orig(self, model_sd, is_loading, sharding_type, metadata)
        if not isinstance(self.optimizer, STQuantAdamW):
            raise ValueError(f"optimizer state of sharding type {kind!r} needs stquant's optimizer; this one is "
                             f"{type(self.optimizer).__name__}")  # fmt: skip
        with packed_checkpoint.params_only(self):  # Megatron's own form of the params; the moments go separately
            sd = orig(self, model_sd, is_loading, None, {**(metadata or {}), "distrib_optim_sharding_type": base})
        if sd.get("param_state") is None:  # fully_reshardable's memory-efficient save: params on DP rank 0 only
            sd["param_state"] = {}
        if base == "fully_reshardable":
            sd["param_state"]["stquant"] = (packed_checkpoint.load_request_model_space(self, model_sd) if is_loading
                                            else packed_checkpoint.save_entries_model_space(self, model_sd))  # fmt: skip
        else:
            sd["param_state"]["stquant"] = (packed_checkpoint.load_request(self) if is_loading
                                            else packed_checkpoint.save_entries(self))  # fmt: skip
        sd["param_state_sharding_type"] = packed_checkpoint.packed_type(base)
        return sd

    return patched_sharded_state_dict


def _dist_load(orig):
    @functools.wraps(orig)
    def patched_dist_checkpointing_load(sharded_state_dict, checkpoint_dir, *args, **kwargs):
        packed_checkpoint.resolve_requests(sharded_state_dict, checkpoint_dir, orig)
        return orig(sharded_state_dict, checkpoint_dir, *args, **kwargs)

    return patched_dist_checkpointing_load


def checkpoint_format() -> str:
    """``dense`` or ``packed``: how this process writes the optimizer moments of torch_dist checkpoints."""
    if _ACTIVE["checkpoint_format"] is not None:
        return _ACTIVE["checkpoint_format"]
    if _ACTIVE["from_args"]:
        try:
            from megatron.training.global_vars import get_args

            return packed_checkpoint.check_format(getattr(get_args(), "stquant_checkpoint_format", "dense"),
                                                  "--stquant-checkpoint-format")  # fmt: skip
        except (ImportError, AssertionError):
            pass
    return packed_checkpoint.default_format()


def _metadata(orig):
    @functools.wraps(orig)
    def patched_build_sharded_state_dict_metadata(args, *a, **kw):
        metadata = orig(args, *a, **kw)
        kind = metadata.get("distrib_optim_sharding_type")
        if (_active_config() is not None and checkpoint_format() == "packed"
                and kind in ("dp_reshardable", "fully_reshardable")):  # fmt: skip
            metadata["distrib_optim_sharding_type"] = packed_checkpoint.packed_type(kind)
        return metadata

    return patched_build_sharded_state_dict_metadata

_LEGACY_SAVE = {"depth": 0}  # > 0 while a save_parameter_state (legacy torch checkpoint) runs


def _legacy_save_scope(orig):
    @functools.wraps(orig)
    def patched_save_parameter_state(self, *args, **kwargs):
        _LEGACY_SAVE["depth"] += 1
        try:
            return orig(self, *args, **kwargs)
        finally:
            _LEGACY_SAVE["depth"] -= 1

    return patched_save_parameter_state


def _dp_zero_state(orig):
    @functools.wraps(orig)
    def patched_get_parameter_state_dp_zero(self, *args, **kwargs):
        if getattr(self, "_stquant_params_only", False):  # a packed torch_dist checkpoint (fully_reshardable)
            return packed_checkpoint.params_dp_zero(self, *args, **kwargs, buffer_space=True)
        # the legacy torch save (DistributedOptimizer / ChainedOptimizer.save_parameter_state, default
        # arguments); the torch_dist dp_zero and fully_reshardable forms call it with arguments: dense
        if (_LEGACY_SAVE["depth"] and not args and not kwargs and isinstance(self.optimizer, STQuantAdamW)
                and checkpoint_format() == "packed"):  # fmt: skip
            return packed_checkpoint.legacy_state(self)
        return orig(self, *args, **kwargs)

    return patched_get_parameter_state_dp_zero


def _legacy_load(orig):
    @functools.wraps(orig)
    def patched_load_parameter_state_from_dp_zero(self, state_dict, *args, **kwargs):
        if (isinstance(self.optimizer, STQuantAdamW) and not kwargs.get("update_legacy_format")
                and packed_checkpoint.legacy_load(self, state_dict)):  # fmt: skip
            self.optimizer.finish_factored_load()  # collective, as after every load
            return None
        return orig(self, state_dict, *args, **kwargs)

    return patched_load_parameter_state_from_dp_zero


def _refuse_legacy(orig):
    @functools.wraps(orig)
    def patched_load_parameter_state_from_dp_zero_legacy(self, *args, **kwargs):
        if isinstance(self.optimizer, STQuantAdamW):  # every rank raises, before any collective
            raise ValueError(
                "stquant-megatron cannot load a pre-2024 legacy distributed-optimizer checkpoint "
                "(load_parameter_state_from_dp_zero_legacy, --ckpt-convert-update-legacy-dist-opt-format): that "
                "loader writes dense fp32 moments straight into optimizer.state, past the packed store. Nothing was "
                "loaded. Convert it once with stock Megatron (without --stquant): load it with "
                "--ckpt-convert-update-legacy-dist-opt-format and save it in a current format (--ckpt-convert-format "
                "torch_dist --ckpt-convert-save DIR), then resume from DIR with --stquant"
            )  # fmt: skip
        return orig(self, *args, **kwargs)

    return patched_load_parameter_state_from_dp_zero_legacy


def _move_states(self, device: Any = None) -> None:
    """Packed and factored moments of ``self``'s STQuantAdamW to ``device`` (None: each to its parameter's
    device); per-parameter step counters stay on the host, where the optimizer keeps them. The scheduler's
    few KB of statistics stay where they are."""
    for p, st in self.optimizer.state.items():
        for key, v in st.items():
            if isinstance(v, QUANTIZED_STATES):
                checkpoint.move_state(v, p.device if device is None else device)
            elif key == "step" and torch.is_tensor(v) and v.device.type != "cpu":
                st[key] = v.cpu()


def _offload(orig):
    @functools.wraps(orig)
    def patched_offload_to_cpu(self):
        if isinstance(getattr(self, "optimizer", None), STQuantAdamW) and not getattr(self, "is_stub_optimizer", False):
            _move_states(self, "cpu")  # first: the original then frees the accelerator's cache
        return orig(self)  # parameters and plain tensors (fp32 escapes)

    return patched_offload_to_cpu


def _restore(orig):
    @functools.wraps(orig)
    def patched_restore_from_cpu(self):
        result = orig(self)  # parameters and plain tensors back to the accelerator
        if isinstance(getattr(self, "optimizer", None), STQuantAdamW) and not getattr(self, "is_stub_optimizer", False):
            _move_states(self)  # the moments follow their parameters
        return result

    return patched_restore_from_cpu


def _add_args(orig):
    @functools.wraps(orig)
    def patched_add_megatron_arguments(parser):
        return add_stquant_args(orig(parser))

    return patched_add_megatron_arguments


def _replace(owner: Any, name: str, make) -> None:
    orig = getattr(owner, name)
    _ORIGINALS.append((owner, name, orig))
    setattr(owner, name, make(orig))


def _replace_defined(cls: type, name: str, make) -> None:
    """``_replace`` on the class of ``cls``'s MRO that defines ``name`` (nothing where no version has it)."""
    owner = next((c for c in cls.__mro__ if name in vars(c)), None)
    if owner is not None:
        _replace(owner, name, make)


def patch(config: STQuantConfig | None = None, *, from_args: bool = False, checkpoint_format: str | None = None) -> None:
    """Install the patches (idempotent: a second call only updates the config).

    Args:
        config: how to pack; with ``from_args=True`` and no config, the ``--stquant-*`` flags of
            Megatron-LM's parsed args decide when the optimizer is built (``--stquant`` off: stock).
        checkpoint_format: ``"dense"`` (Megatron's own fp32 moments) or ``"packed"`` (the moments as in
            memory; ``packed_checkpoint``) in the checkpoints Megatron-LM saves as torch_dist with
            dp_reshardable and as legacy torch (``save_parameter_state``); None:
            ``--stquant-checkpoint-format`` with ``from_args``, else the
            ``STQUANT_CHECKPOINT_FORMAT`` environment variable, else dense. (megatron-core callers choose
            per save: ``metadata={"distrib_optim_sharding_type": packed_checkpoint.PACKED_DP_RESHARDABLE}``.)
    """
    if checkpoint_format is not None:
        packed_checkpoint.check_format(checkpoint_format)
    if config is not None and not isinstance(config, STQuantConfig):
        raise TypeError(f"patch(config) needs an STQuantConfig, got {type(config).__name__}")
    if config is None and not from_args:
        config = STQuantConfig()
    if _ACTIVE["patched"]:
        _ACTIVE.update(config=config, from_args=from_args, checkpoint_format=checkpoint_format)
        return
    _check_version()
    import megatron.core.optimizer as mco
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    _replace(mco, "_get_megatron_optimizer_based_on_param_groups", _factory)
    _replace(mco, "get_megatron_optimizer", _entry)
    training = sys.modules.get("megatron.training.training")
    if training is not None and hasattr(training, "get_megatron_optimizer"):
        _replace(training, "get_megatron_optimizer", _entry)
    _replace(DistributedOptimizer, "_get_main_param_and_optimizer_states", _get)
    _replace(DistributedOptimizer, "_set_main_param_and_optimizer_states", _set)
    _replace(DistributedOptimizer, "load_state_dict", _load)
    _replace(DistributedOptimizer, "sharded_state_dict", _sharded)
    import megatron.core.dist_checkpointing as dist_checkpointing
    import megatron.core.dist_checkpointing.serialization as serialization

    _replace(serialization, "load", _dist_load)
    _replace(dist_checkpointing, "load", _dist_load)
    for name in sorted(vars(DistributedOptimizer)):  # every way parameter state is loaded (dp_zero, dp_reshardable, ...)
        if name.startswith("load_parameter_state_from_") and callable(getattr(DistributedOptimizer, name)):
            _replace(DistributedOptimizer, name, _finish_load)
    _replace_defined(DistributedOptimizer, "load_parameter_state_from_dp_zero_legacy", _refuse_legacy)
    # packed legacy torch checkpoints (distrib_optim.pt): the outermost wrapper of the dp_zero loader
    from megatron.core.optimizer.optimizer import ChainedOptimizer

    _replace(DistributedOptimizer, "load_parameter_state_from_dp_zero", _legacy_load)
    _replace(DistributedOptimizer, "get_parameter_state_dp_zero", _dp_zero_state)
    _replace_defined(DistributedOptimizer, "save_parameter_state", _legacy_save_scope)
    _replace_defined(ChainedOptimizer, "save_parameter_state", _legacy_save_scope)
    torch.serialization.add_safe_globals([packed_checkpoint.PackedMoments])
    # Megatron-LM loads a checkpoint at another TP/PP size only for the model-space formats it lists
    formats = getattr(DistributedOptimizer, "checkpoint_fully_reshardable_formats", None)
    if isinstance(formats, set):
        _replace(DistributedOptimizer, "checkpoint_fully_reshardable_formats",
                 lambda orig: orig | {packed_checkpoint.PACKED_FULLY_RESHARDABLE})  # fmt: skip
    _replace_defined(DistributedOptimizer, "offload_to_cpu", _offload)  # RL training
    _replace_defined(DistributedOptimizer, "restore_from_cpu", _restore)
    # Megatron-LM's parser: patched now if imported, else the moment it is imported (importing it
    # here would pull in all of megatron.training at interpreter start).
    _when_imported("megatron.training.arguments", lambda m: _replace(m, "add_megatron_arguments", _add_args))
    _when_imported("megatron.training.checkpointing",
                   lambda m: _replace(m, "_build_sharded_state_dict_metadata", _metadata))  # fmt: skip
    _ACTIVE.update(patched=True, config=config, from_args=from_args, checkpoint_format=checkpoint_format)


class _PostImportHook(importlib.abc.MetaPathFinder):
    """Runs ``action(module)`` right after ``name`` is first imported (once)."""

    def __init__(self, name: str, action):
        self.name, self.action = name, action

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None:
            return spec
        exec_module, action = spec.loader.exec_module, self.action

        def exec_and_patch(module):
            exec_module(module)
            if _ACTIVE["patched"]:
                action(module)

        spec.loader.exec_module = exec_and_patch
        return spec


def _when_imported(name: str, action) -> None:
    if name in sys.modules:
        action(sys.modules[name])
    else:
        hook = _PostImportHook(name, action)
        _HOOKS.append(hook)
        sys.meta_path.insert(0, hook)


def unpatch() -> None:
    """Restore every original (optimizers built while patched keep their packed state)."""
    for hook in _HOOKS:
        if hook in sys.meta_path:
            sys.meta_path.remove(hook)
    _HOOKS.clear()
    while _ORIGINALS:
        owner, name, orig = _ORIGINALS.pop()
        setattr(owner, name, orig)
    _ACTIVE.update(patched=False, config=None, from_args=False, checkpoint_format=None)
