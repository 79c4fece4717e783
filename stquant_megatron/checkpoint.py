"""Checkpoints of ``STQuantAdamW``: the one place where optimizer state leaves or enters memory.

The standalone ``state_dict()`` / ``load_state_dict()`` and the Megatron seams
(``stquant_megatron.megatron.patch``: ``get/set_main_param_and_optimizer_states``, the optimizer's
``load_state_dict``) go through these functions:

- ``state_dict`` / ``load_state_dict``: torch.optim-style state dicts; packed and factored moments as
  dicts of tensors (``PackedState.to_dict``), the scheduler and the step counter under ``"stquant"``.
- ``load_meta``: the ``"stquant"`` entry alone (hosts that load the moments themselves).
- ``moment_to_host`` / ``set_moments``: one parameter's moments as dense fp32 host tensors, and back.

Loading validates everything first (shapes, element counts, finiteness, formats, the scheduler's
entry): a rejected checkpoint raises ``ValueError`` naming the tensor and leaves the optimizer as it
was. Moments stored in another width, block size, scale type or codebook are re-coded to this run's.
"""

from __future__ import annotations

import copy
import math
import numbers
import warnings
from typing import TYPE_CHECKING, Any

import torch

from .config import MOMENTS
from .formats.codebooks import get_codebook
from .state import _SCALE_DTYPES, QUANTIZED_STATES, FactoredState, PackedState, state_from_dict

if TYPE_CHECKING:
    from .optim import STQuantAdamW

STATE_FORMAT_VERSION = 1


def _integer(value: Any, field: str, where: str) -> int:
    """A whole-number field of a saved state (``to_dict`` writes Python ints): anything else, a float
    such as 3.5, a bool or a string, is a damaged entry, not something to round."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{where} has {field}={value!r} ({type(value).__name__}); it must be an int")
    return int(value)


def saved_state(d: Any, device: torch.device, where: str) -> PackedState | FactoredState:
    """A packed or factored moment from its ``to_dict()`` as read from a checkpoint: the plain fields'
    types first (``state_from_dict`` then checks shapes, dtypes, ranges and values), ValueError naming ``where``."""
    if isinstance(d, dict) and d.get("factored"):
        for k in ("offset", "numel"):
            if d.get(k) is not None:
                _integer(d[k], k, where)
    elif isinstance(d, dict):
        missing = [k for k in ("bits", "numel", "block_size", "codebook", "signed", "codes", "scale") if k not in d]
        if missing:
            raise ValueError(f"{where} is malformed (missing {missing}); keys found: {sorted(map(str, d))}")
        bits, numel, block_size = (_integer(d[k], k, where) for k in ("bits", "numel", "block_size"))
        if not isinstance(d["codebook"], str) or not isinstance(d["signed"], bool):
            raise ValueError(f"{where} has codebook={d['codebook']!r}, signed={d['signed']!r}; codebook must be a kind "
                             "name (str), signed a bool")  # fmt: skip
        if numel < 0 or block_size < 8 or block_size & (block_size - 1):
            raise ValueError(f"{where} has numel={numel}, block_size={block_size}; "
                             "need numel >= 0 and a block size that is a power of two >= 8")  # fmt: skip
    return state_from_dict(d, device, where)


def move_state(state: PackedState | FactoredState, device: torch.device | str) -> None:
    """Move a packed moment's codes, scales and codebook tables, or a factored one's statistics, to
    ``device`` in place (Megatron's ``offload_to_cpu`` / ``restore_from_cpu`` move plain tensors only)."""
    device = torch.device(device)
    if isinstance(state, FactoredState):
        state.row, state.col = state.row.to(device), state.col.to(device)
    else:
        state.codes, state.scale = state.codes.to(device), state.scale.to(device)
        state.codebook = get_codebook(state.codebook.kind, state.bits, state.signed, device)


def state_dict(self: STQuantAdamW) -> dict[str, Any]:
    """Like ``torch.optim`` state dicts; packed moments become dicts of tensors and plain values."""
    sd = torch.optim.Optimizer.state_dict(self)
    sd["state"] = {
        k: {key: (v.to_dict() if isinstance(v, QUANTIZED_STATES) else v) for key, v in st.items()}
        for k, st in sd["state"].items()
    }
    sd["stquant"] = {
        "format_version": STATE_FORMAT_VERSION, "config": self.config.to_dict(), "global_step": self.global_step,
        "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
    }  # fmt: skip
    return sd

def load_state_dict(self: STQuantAdamW, state_dict: dict[str, Any]) -> None:
    """Load a state dict of this optimizer, or of ``torch.optim.AdamW`` / ``Adam`` (dense moments
    are quantized).

    Widths: the config and the scheduler decide. Packed moments whose width, block size, scale
    type or codebook differ from what this optimizer would use are re-coded to it (one warning
    says how many); with the scheduler, a checkpoint's own scheduler entry sets the widths.
    Everything is validated first; on any error nothing has changed."""
    from .optim import _check_group  # (optim imports this module)

    meta = state_dict.get("stquant")
    if meta is not None and meta.get("format_version") != STATE_FORMAT_VERSION:
        raise ValueError(
            f"checkpoint has stquant format_version={meta.get('format_version')!r}; this version reads "
            f"{STATE_FORMAT_VERSION}. Load it with the stquant-megatron version that wrote it"
        )
    groups, saved_groups = self.param_groups, state_dict.get("param_groups", [])
    if len(groups) != len(saved_groups) or any(
        len(a["params"]) != len(b["params"]) for a, b in zip(groups, saved_groups)
    ):
        raise ValueError(
            f"checkpoint has {len(saved_groups)} param groups of sizes {[len(g['params']) for g in saved_groups]}, "
            f"this optimizer {len(groups)} of sizes {[len(g['params']) for g in groups]}: build the optimizer "
            "over the same parameters in the same order"
        )
    for i, g in enumerate(saved_groups):
        _check_group({k: v for k, v in g.items() if k != "params"}, f"checkpoint param group {i}")
    sched_sd = (meta or {}).get("scheduler")
    if self.scheduler is not None and sched_sd is not None:
        self.scheduler.validate_state_dict(sched_sd)
    planned = dict(zip(sched_sd["names"], sched_sd["bits"])) if sched_sd and sched_sd.get("bits") else {}
    global_step = _check_count("global_step", meta.get("global_step", 0)) if meta is not None else self.global_step
    id_map = {
        sid: p for a, b in zip(groups, saved_groups) for sid, p in zip(b["params"], a["params"])
    }  # fmt: skip
    moments: dict[tuple[torch.Tensor, str], Any] = {}
    stripped = {}
    recoded = []
    for k, st in state_dict.get("state", {}).items():
        if k not in id_map:
            raise ValueError(f"checkpoint state refers to parameter index {k!r}, which no param group lists")
        p = id_map[k]
        name = self.param_name(p)
        st = dict(st)
        missing = [key for key in ("step", *MOMENTS) if key not in st]
        if missing:
            raise ValueError(
                f"checkpoint state of {name!r} lacks {missing} (has {sorted(st)}): it is not an Adam state dict"
            )
        for flag in ("max_exp_avg_sq",):
            if flag in st:
                raise ValueError(f"checkpoint state of {name!r} has {flag!r}: it was saved with amsgrad=True, "
                                 "which STQuantAdamW does not implement")  # fmt: skip
        step = st["step"]
        value = float(step) if torch.is_tensor(step) and step.numel() == 1 else step
        st["step"] = torch.tensor(_check_count(f"step of {name!r}", value), dtype=torch.float32)
        for key in MOMENTS:
            bits = planned.get(f"{name}.{key}") if self.scheduler is not None else None
            moments[(p, key)] = _load_moment(self, p, key, st.pop(key), bits, recoded)
        stripped[k] = st
    if recoded:
        warnings.warn(
            f"stquant: {len(recoded)} checkpoint moment(s) were re-coded to this optimizer's format "
            f"(first: {recoded[:3]}); the config and the scheduler set widths, block size, scale type "
            "and codebook", RuntimeWarning, stacklevel=2,
        )  # fmt: skip
    old_groups = [dict(g) for g in self.param_groups]
    old = (copy.copy(self.state), self.global_step)
    old_sched = ({k: copy.deepcopy(v) for k, v in vars(self.scheduler).items() if k != "group"}
                 if self.scheduler is not None else None)  # fmt: skip
    try:
        torch.optim.Optimizer.load_state_dict(self, {**state_dict, "state": stripped})
        for (p, key), value in moments.items():
            self.state[p][key] = value
        for st in self.state.values():
            if "step" in st and torch.is_tensor(st["step"]):  # a host may share one tensor: copy
                st["step"] = st["step"].detach().to(device="cpu", dtype=torch.float32).clone()
        if self.group_step_authoritative:
            for group in self.param_groups:
                if "step" in group:
                    for p in group["params"]:
                        self.state[p]["step"] = torch.tensor(float(group["step"]), dtype=torch.float32)
        self.global_step = global_step
        if self.scheduler is not None and sched_sd is not None:
            self.scheduler.load_state_dict(sched_sd)
            self.scheduler.numel = None  # element counts and ranks are agreed again at the next step
    except Exception:
        self.state, self.global_step = old
        if old_sched is not None:
            self.scheduler.__dict__.update(old_sched)
        for g, saved in zip(self.param_groups, old_groups):
            g.clear()
            g.update(saved)
        raise
    self._note_bytes()

def _check_count(what: str, value: Any) -> int:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < 0 or value != int(value):
        raise ValueError(f"checkpoint {what} is {value!r}; it must be a whole number >= 0")
    return int(value)

def load_meta(self: STQuantAdamW, meta: dict[str, Any]) -> None:
    """Restore the step counter and the scheduler (per-unit bits, window statistics) saved in
    ``state_dict()["stquant"]`` (hosts that load moments themselves, such as Megatron); packed
    units are re-coded to the restored widths. Validated first: on error nothing changes."""
    global_step = _check_count("global_step", meta.get("global_step", 0))
    saved = meta.get("scheduler")
    if self.scheduler is not None and saved is not None and saved.get("bits") is not None:
        saved = scheduler_onto_units(saved, self.scheduler)  # a host may load at another TP/PP layout
        self.scheduler.validate_state_dict(saved)
        self.scheduler.load_state_dict(saved)
        self.scheduler.numel = None  # agreed again (collective) at the next step
        self._apply_widths(self.scheduler.current())
    self.global_step = global_step

def scheduler_onto_units(saved: dict[str, Any], scheduler: Any) -> dict[str, Any]:
    """A scheduler checkpoint saved with other units than ``scheduler``'s (another tensor- or pipeline-parallel
    layout makes some tensors units or not) mapped onto them: a unit of both keeps its width, moves and
    window statistics, a new one starts at ``min_bits`` (as the scheduler adds units: the budget keeps
    holding), the others are dropped, and so is the decision history (its rows name the old units).
    Unchanged when the units agree or this scheduler has none yet; the result is validated by the caller."""
    names, old = list(scheduler.names), saved.get("names")
    if not names or not isinstance(old, list) or old == names or not isinstance(saved.get("bits"), list):
        return saved
    at = {k: i for i, k in enumerate(old)}

    def per_unit(field: str, new: Any) -> list | None:
        values = saved.get(field)
        if not isinstance(values, list) or len(values) != len(old):
            return values if values is None else []  # a damaged field: validation names it
        return [values[at[k]] if k in at else new(values) for k in names]

    window = per_unit("window", lambda w: [0.0] * (len(w[0]) if w and isinstance(w[0], list) else 0))
    return {**saved, "names": names, "bits": per_unit("bits", lambda _: scheduler.min_bits),
            "moves": per_unit("moves", lambda _: 0), "window": window, "history": [],
            "factored_bits": per_unit("factored_bits", lambda _: 0.0)}  # fmt: skip


def _load_moment(self: STQuantAdamW, p: torch.Tensor, key: str, value: Any, bits: int | None, recoded: list) -> Any:
    """A validated moment in this optimizer's format (packed at ``bits`` or the planned width)."""
    name = self.param_name(p)
    if isinstance(value, dict):
        state = saved_state(value, p.device, where=f"checkpoint {key} of {name!r}")
        if state.signed != (key == "exp_avg"):
            raise ValueError(
                f"checkpoint {key} of {name!r} is stored {'signed' if state.signed else 'unsigned'}; exp_avg is "
                "stored signed and exp_avg_sq unsigned: the two moments are swapped or the entry is damaged"
            )
        if isinstance(state, FactoredState) and (
            state.shape != (self._factor_shape(p) or FactoredState.factor_shape(p.shape))
            or (state.sharded and state.offset != self._naming(p)[1])
        ):
            raise ValueError(f"checkpoint {key} of {name!r} is factored as {state.shape} at element "
                             f"{state.offset}; the parameter has shape {tuple(p.shape)}"
                             f"{'' if self._factor_shape(p) is None else f', a shard of {self._factor_shape(p)}'}: "
                             "the checkpoint belongs to another model or sharding")  # fmt: skip
        if state.numel != p.numel():
            raise ValueError(f"checkpoint {key} of {name!r} has numel={state.numel}; the parameter has numel="
                             f"{p.numel()}: the checkpoint belongs to another model")  # fmt: skip
        if not self._is_packed(p):
            return state.dequantize().reshape(p.shape)
        if key == "exp_avg_sq" and self._factored_now(p, bits):
            if isinstance(state, FactoredState):
                return state
            return self._new_factored(p).copy_(state.dequantize())
        if isinstance(state, FactoredState):  # this run packs it: from the dense estimate
            recoded.append(f"{name}.{key}: factored -> packed")
            value, state = state.dequantize(), None
    else:
        _check_dense(name, key, value, p)
        if not self._is_packed(p):
            return value.detach().to(device=p.device, dtype=torch.float32).reshape(p.shape).clone()
        if key == "exp_avg_sq" and self._factored_now(p, bits):
            return self._new_factored(p).copy_(value)
        state = None
    cfg = self.config
    bits = bits if bits is not None else self._planned_bits(p, key)
    if state is None:
        return self._new_packed(p, key, bits).copy_(value)
    want = (bits, cfg.block_size, _SCALE_DTYPES[cfg.scale_dtype], cfg.codebook(key, bits))
    have = (state.bits, state.block_size, state.scale.dtype, state.codebook.kind)
    if have != want:
        recoded.append(f"{name}.{key}: {have[0]} bits/block {have[1]} -> {want[0]} bits/block {want[1]}")
        return state.recode(bits, want[3], block_size=cfg.block_size, scale_dtype=want[2])
    return state


def _check_dense(name: str, key: str, value: Any, p: torch.Tensor) -> None:
    """A dense checkpoint tensor of ``p`` (a moment, or ``"param"``): a float tensor of ``p``'s shape
    or flat; moments finite, ``exp_avg_sq`` >= 0. Raises ValueError naming the tensor."""
    if not torch.is_tensor(value) or not value.is_floating_point() or value.numel() != p.numel() or (
        value.dim() > 1 and tuple(value.shape) != tuple(p.shape)
    ):
        got = (tuple(value.shape), value.dtype) if torch.is_tensor(value) else type(value).__name__
        raise ValueError(
            f"checkpoint {key} of {name!r} should be a float tensor of shape {tuple(p.shape)} (or flat, "
            f"{p.numel()} elements); got {got}: the checkpoint belongs to another model"
        )
    if key == "param":
        return
    if not bool(torch.isfinite(value).all()):
        raise ValueError(f"checkpoint {key} of {name!r} has NaN or Inf values")
    if key == "exp_avg_sq" and bool((value < 0).any()):
        raise ValueError(f"checkpoint exp_avg_sq of {name!r} has negative values: it is not a second moment")


def moment_to_host(value: Any) -> torch.Tensor:
    """A moment as a flat dense fp32 host tensor (what Megatron's dense checkpoint formats hold)."""
    if isinstance(value, QUANTIZED_STATES):
        return value.dequantize(device="cpu")
    return value.detach().float().cpu().view(-1)


@torch.no_grad()
def set_moments(self: STQuantAdamW, param: torch.Tensor, tensors: dict[str, Any]) -> None:
    """Set ``param``'s moments from dense tensors (each optional): packed ones are quantized at their
    current width, factored ones staged for ``finish_factored_load`` (their statistics are all-reduced
    over the shards), fp32 escapes copied. Every tensor of ``tensors`` (``"param"`` included, which the
    caller copies) is checked first: a damaged one raises ValueError naming it, and nothing changes."""
    name = self.param_name(param)
    for key in ("param", *MOMENTS):
        if torch.is_tensor(tensors.get(key)):
            _check_dense(name, key, tensors[key], param)
    self.init_state(param)
    st = self.state[param]
    for key in MOMENTS:
        value = tensors.get(key)
        if not torch.is_tensor(value):
            continue
        if isinstance(st[key], FactoredState):
            self.stage_factored_load(param, value)
        elif isinstance(st[key], QUANTIZED_STATES):
            st[key].copy_(value)
        else:
            st[key].copy_(value.view_as(st[key]))
