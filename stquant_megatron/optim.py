"""``STQuantAdamW``: Adam/AdamW with packed variable-bit moments, for any PyTorch model.

Each parameter with at least ``config.min_numel`` elements keeps ``exp_avg`` and ``exp_avg_sq``
as ``PackedState`` (b-bit codes + block scales); smaller ones keep fp32 moments. A step is one
fused pass per parameter (``kernels``): unpack, dequantize, update, requantize, pack.
"""

from __future__ import annotations

import copy
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from .config import MOMENTS, STQuantConfig
from .kernels import get_group_step_fn, rng_key, step_scalars, unit_id
from .kernels.common import SALT_EXP_AVG, SALT_EXP_AVG_SQ, GroupEntry
from .kernels.torch_adam import dense_adam_step
from .scheduler import PrecisionScheduler
from .state import _SCALE_DTYPES, PackedState

log = logging.getLogger("stquant_megatron")

STATE_FORMAT_VERSION = 1
_SALTS = (SALT_EXP_AVG, SALT_EXP_AVG_SQ)


def _codebook(cfg: STQuantConfig, moment: str, bits: int, device: torch.device):
    """The codebook a unit of ``moment`` would use at ``bits``, or None outside 2..8."""
    from .formats.codebooks import get_codebook

    if not 2 <= bits <= 8:
        return None
    return get_codebook(cfg.codebook(moment, bits), bits, moment == "exp_avg", device)


class NonFiniteGradError(ValueError):
    """A step saw NaN or Inf gradients; nothing was changed."""


class STQuantAdamW(torch.optim.Optimizer):
    """AdamW (or Adam with L2 decay) whose moments live in packed 2-8 bit buffers.

    Args:
        params: parameters, ``named_parameters()`` (names then key the units), or param groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``; per-group values work the same.
        config: ``STQuantConfig`` (bits, block size, rounding, scheduler, ...); default ``STQuantConfig()``.
        decoupled_weight_decay: True = AdamW; False = Adam with L2 weight decay added to the grad.
        process_group: with the scheduler on, the ranks whose statistics are all-reduced and which
            must agree on the bits (e.g. the data-parallel group); None = no communication.
    """

    def __init__(
        self,
        params: Iterable,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.01,
        *,
        config: STQuantConfig | None = None,
        decoupled_weight_decay: bool = True,
        process_group: Any = None,
    ):
        if not (isinstance(lr, float | int) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr!r} (must be a float >= 0)")
        if not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"Invalid betas: {betas!r} (each must be in [0, 1))")
        if not eps >= 0.0:
            raise ValueError(f"Invalid eps: {eps!r} (must be >= 0)")
        if not weight_decay >= 0.0:
            raise ValueError(f"Invalid weight_decay: {weight_decay!r} (must be >= 0)")
        if config is not None and not isinstance(config, STQuantConfig):
            raise TypeError(f"config must be an STQuantConfig, got {type(config).__name__}")
        defaults = dict(
            lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay
        )
        super().__init__(params, defaults)
        self.config = config or STQuantConfig()
        self._names: dict[int, tuple[str, int]] = {}
        self._full_numel: dict[int, int] = {}
        self.stats: dict[torch.Tensor, torch.Tensor] = {}
        """Per-parameter fp32 [3] sums (err exp_avg, err exp_avg_sq, |U|^2) while ``collect_stats``."""
        self.collect_stats = False
        self.probe_neighbors = False
        """With ``collect_stats``: also measure each unit's error one width below and above."""
        self.last_stats: dict[torch.Tensor, torch.Tensor] = {}
        """Per-parameter fp32 [9] of the last probing step: its [3] sums and the 6 probe sums."""
        self.decision_callbacks: list = []
        """Called as ``cb(decision, optimizer)`` after every scheduler decision (e.g. loggers)."""
        self.global_step = 0
        """Steps taken (skipped steps excluded); the scheduler's clock."""
        self.group_step_authoritative = False
        """Hosts that keep the step in ``param_group["step"]`` (Megatron with TE/apex) set this:
        loading a state dict then sets every parameter's step from its group's."""
        cfg = self.config
        self.scheduler: PrecisionScheduler | None = None
        if cfg.avg_bits is not None:
            self.scheduler = PrecisionScheduler(
                avg_bits=cfg.avg_bits, min_bits=cfg.min_bits, max_bits=cfg.max_bits, max_error=cfg.max_error,
                interval=cfg.interval, warmup_steps=cfg.warmup_steps, warmup_bits=cfg.warmup_bits,
                stats_steps=cfg.stats_steps, max_move=cfg.max_move, hysteresis=cfg.hysteresis,
                scale_bits=cfg.scale_bits(), group=process_group,
            )  # fmt: skip

    # ----------------------------------------------------------------------------- naming
    def set_param_name(self, param: torch.Tensor, name: str, index_offset: int = 0, full_numel: int | None = None) -> None:
        """Name ``param``'s units (``name.exp_avg``, ``name.exp_avg_sq``).

        When ``param`` is a shard, ``index_offset`` is the global index of its first element in
        the full tensor (so stochastic rounding does not depend on the sharding) and
        ``full_numel`` the full tensor's size (so every shard of a tensor is packed, or none).
        """
        self._names[id(param)] = (name, index_offset)
        if full_numel is not None:
            self._full_numel[id(param)] = full_numel

    def param_name(self, param: torch.Tensor) -> str:
        return self._naming(param)[0]

    def _naming(self, param: torch.Tensor) -> tuple[str, int]:
        if id(param) in self._names:
            return self._names[id(param)]
        index = 0
        for group in self.param_groups:
            names = group.get("param_names")
            for i, p in enumerate(group["params"]):
                if p is param:  # remembered: the position of a parameter does not change
                    self._names[id(param)] = ((names[i] if names else f"param{index}"), 0)
                    return self._names[id(param)]
                index += 1
        raise KeyError("parameter is not managed by this optimizer")

    def _params(self):
        for group in self.param_groups:
            yield from ((group, p) for p in group["params"])

    # ----------------------------------------------------------------------------- state
    def _is_packed(self, param: torch.Tensor) -> bool:
        return self._full_numel.get(id(param), param.numel()) >= max(1, self.config.min_numel)

    def init_state(self, param: torch.Tensor | None = None) -> None:
        """Create the (zero) state of ``param``, or of every parameter, now rather than at the first step."""
        for _, p in self._params() if param is None else [(None, param)]:
            if not self.state[p]:
                self._init_state(p)

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        cfg, st = self.config, self.state[p]
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        for moment in MOMENTS:
            if self._is_packed(p):
                bits = self._planned_bits(p, moment)
                st[moment] = PackedState.zeros(
                    p.numel(), bits=bits, kind=cfg.codebook(moment, bits), signed=moment == "exp_avg",
                    block_size=cfg.block_size, scale_dtype=_SCALE_DTYPES[cfg.scale_dtype], device=p.device,
                )  # fmt: skip
            else:
                st[moment] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    def state_bytes(self) -> int:
        """Exact bytes of all optimizer-state storage allocated now (codes, scales, fp32 escapes, steps)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, PackedState):
                    total += v.nbytes
                elif torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    def unit_bits(self) -> dict[str, int]:
        """``{"<param name>.<moment>": bits}`` for every unit; fp32 escapes report 32."""
        out = {}
        for _, p in self._params():
            name = self.param_name(p)
            st = self.state.get(p) or {}
            for moment in MOMENTS:
                v = st.get(moment)
                if isinstance(v, PackedState):
                    out[f"{name}.{moment}"] = v.bits
                elif v is not None or not self._is_packed(p):
                    out[f"{name}.{moment}"] = 32
                else:
                    out[f"{name}.{moment}"] = self._planned_bits(p, moment)
        return out

    def _planned_bits(self, p: torch.Tensor, moment: str) -> int:
        """Width of a unit whose state does not exist yet."""
        if self.scheduler is None:
            return self.config.moment_bits(moment)
        if self.scheduler.names:
            return self.scheduler.current().get(f"{self.param_name(p)}.{moment}", self.config.warmup_bits)
        return self.config.warmup_bits

    # ----------------------------------------------------------------------------- scheduler
    def _packed_units(self):
        """(unit name, param, moment) of every packed unit, in a fixed order."""
        for _, p in self._params():
            if self._is_packed(p):
                name = self.param_name(p)
                for moment in MOMENTS:
                    yield f"{name}.{moment}", p, moment

    def _schedule(self) -> None:
        """After a step: decide and re-code units when a decision is due."""
        sched, step = self.scheduler, self.global_step
        if not sched.due(step):
            return
        local = {}
        for unit, p, moment in self._packed_units():
            st, last = self.stats.get(p), self.last_stats.get(p)
            if st is not None:
                i = 0 if moment == "exp_avg" else 1
                # error at b, b-1, b+1, all on the probe's sampled blocks
                probe = last[[7 + i, 2, 3 + 2 * i, 4 + 2 * i]] if last is not None else torch.zeros(4, device=st.device)
                local[unit] = torch.cat([st[[i, 2]], probe])
        decision = sched.decide(step, local)
        self.stats.clear()
        self.last_stats.clear()
        for unit, p, moment in self._packed_units():
            state = self.state[p].get(moment) if p in self.state else None
            bits = decision.bits[unit]
            if isinstance(state, PackedState) and state.bits != bits:
                state.requantize(bits, self.config.codebook(moment, bits))
        if not dist.is_initialized() or dist.get_rank() == 0:
            nparams = sum(p.numel() for _, p in self._params())
            log.info(
                "stquant step %d: avg bits %.3f, state %.3f B/param, %d of %d units moved",
                step, decision.avg_bits, self.state_bytes() / max(1, nparams), decision.moved, len(decision.bits),
            )  # fmt: skip
        for callback in self.decision_callbacks:
            callback(decision, self)

    # ----------------------------------------------------------------------------- step
    def _check_finite(self, work: list) -> bool:
        """True if every gradient is finite. One host sync for all gradients."""
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for _, _, g in work:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        maxes = [n.float() for gs in by_key.values() for n in torch._foreach_norm(gs, math.inf)]
        if bool(torch.isfinite(torch.stack([m.cpu() for m in maxes])).all()):
            return True
        bad = [self.param_name(p) for _, p, g in work if not bool(torch.isfinite(g).all())]
        msg = (
            f"non-finite gradient (NaN or Inf) in {len(bad)} parameter(s): {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}; the optimizer state and parameters were left unchanged"
        )
        if self.config.nonfinite == "raise":
            raise NonFiniteGradError(
                msg + ". Lower the learning rate, clip gradients, or set STQuantConfig(nonfinite='skip') to skip such steps"
            )
        warnings.warn(msg + "; step skipped (STQuantConfig.nonfinite='skip')", RuntimeWarning, stacklevel=3)
        return False

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = []
        for group, p in self._params():
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise RuntimeError("STQuantAdamW does not support sparse gradients; use torch.optim.SparseAdam")
            if not p.is_floating_point():
                raise TypeError(f"parameter {self.param_name(p)!r} has dtype {p.dtype}; STQuantAdamW needs a float parameter")
            work.append((group, p, p.grad))
        if not work or (self.config.nonfinite != "unchecked" and not self._check_finite(work)):
            return loss
        cfg = self.config
        sched = self.scheduler
        if sched is not None:
            if sched.numel is None:
                sched.setup({unit: p.numel() for unit, p, _ in self._packed_units()})
            self.collect_stats = sched.collecting(self.global_step + 1)
            self.probe_neighbors = sched.due(self.global_step + 1)
        # Packed units are stepped per width group: one launch for all units sharing (widths,
        # codebooks, dtypes, block size, rounding, statistics), O(groups) launches per step.
        launches: dict[tuple, list] = {}
        for group, p, g in work:
            st = self.state[p] or self._init_state(p)
            st["step"] += 1
            step = int(st["step"].item())  # a CPU tensor: no device sync
            beta1, beta2 = group["betas"]
            scalars = step_scalars(
                lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"], weight_decay=group["weight_decay"],
                step=step, adamw=group.get("decoupled_weight_decay", True),
            )  # fmt: skip
            m, v = st["exp_avg"], st["exp_avg_sq"]
            if not isinstance(m, PackedState):
                dense_adam_step(p, g, m, v, scalars)
                continue
            name, offset = self._naming(p)
            uid = unit_id(name)
            target = p if p.is_contiguous() else p.contiguous()
            grad = g.contiguous()
            probe = self.collect_stats and self.probe_neighbors
            key = (m.bits, m.codebook.kind, v.bits, v.codebook.kind, m.block_size, target.dtype, grad.dtype,
                   m.scale.dtype, v.scale.dtype, str(p.device), self.collect_stats, probe)  # fmt: skip
            entry = GroupEntry(
                target, grad, m.codes, m.scale, v.codes, v.scale, scalars,
                tuple(rng_key(cfg.seed, step, uid, s) for s in _SALTS), offset,
            )  # fmt: skip
            launches.setdefault(key, []).append((p, m, v, entry))
        for (_, _, _, _, block_size, *_, with_stats, probe), items in launches.items():
            p0, m0, v0, _ = items[0]
            dev = p0.device
            stats = torch.zeros(len(items), 3, dtype=torch.float32, device=dev) if with_stats else None
            nbr_stats = torch.zeros(len(items), 6, dtype=torch.float32, device=dev) if probe else None
            nbr_books = None
            if probe:
                nbr_books = tuple(
                    _codebook(cfg, key, b, dev) for key, st_ in (("exp_avg", m0), ("exp_avg_sq", v0))
                    for b in (st_.bits - 1, st_.bits + 1)
                )  # fmt: skip
            get_group_step_fn(cfg.backend, dev)(
                [it[3] for it in items], m0.codebook, v0.codebook, block_size=block_size,
                stochastic=cfg.stochastic_rounding, stats=stats, neighbor_codebooks=nbr_books,
                neighbor_stats=nbr_stats, compile=cfg.compile,
            )  # fmt: skip
            for i, (p, _, _, entry) in enumerate(items):
                if stats is not None:
                    acc = self.stats.get(p)
                    self.stats[p] = stats[i].clone() if acc is None else acc.add_(stats[i])
                    if nbr_stats is not None:
                        self.last_stats[p] = torch.cat([stats[i], nbr_stats[i]])
                if entry.param is not p:
                    p.copy_(entry.param)
        self.global_step += 1
        for group in self.param_groups:  # the step also lives in the group, as in TE/apex FusedAdam
            steps = [self.state[p]["step"] for p in group["params"] if p in self.state and "step" in self.state[p]]
            if steps:
                group["step"] = int(max(float(s) for s in steps))
        if sched is not None:
            self._schedule()
        return loss

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Like ``torch.optim`` state dicts; packed moments become dicts of tensors and plain values."""
        sd = super().state_dict()
        sd["state"] = {
            k: {key: (v.to_dict() if isinstance(v, PackedState) else v) for key, v in st.items()}
            for k, st in sd["state"].items()
        }
        sd["stquant"] = {
            "format_version": STATE_FORMAT_VERSION, "config": self.config.to_dict(), "global_step": self.global_step,
            "scheduler": self.scheduler.state_dict() if self.scheduler is not None else None,
            "stats": {self.param_name(p): s.tolist() for p, s in self.stats.items()},
        }  # fmt: skip
        return sd

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of ``torch.optim.AdamW`` / ``Adam`` (dense moments
        are quantized). Everything is validated first: on error the optimizer is left as it was."""
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
        id_map = {
            sid: p for a, b in zip(groups, saved_groups) for sid, p in zip(b["params"], a["params"])
        }  # fmt: skip
        moments: dict[tuple[torch.Tensor, str], Any] = {}
        stripped = {}
        for k, st in state_dict.get("state", {}).items():
            if k not in id_map:
                raise ValueError(f"checkpoint state refers to parameter index {k!r}, which no param group lists")
            p = id_map[k]
            st = dict(st)
            missing = [key for key in ("step", *MOMENTS) if key not in st]
            if missing:
                raise ValueError(
                    f"checkpoint state of {self.param_name(p)!r} lacks {missing} (has {sorted(st)}): "
                    "it is not an Adam state dict"
                )
            if not torch.is_tensor(st["step"]):  # torch < 1.12 saved the step as a number
                st["step"] = torch.tensor(float(st["step"]), dtype=torch.float32)
            for key in MOMENTS:
                moments[(p, key)] = self._load_moment(p, key, st.pop(key))
            stripped[k] = st
        old_groups = [dict(g) for g in self.param_groups]
        old = (copy.copy(self.state), self.global_step, dict(self.stats))
        old_sched = self.scheduler.state_dict() if self.scheduler is not None and self.scheduler.names else None
        by_name = {self.param_name(p): p for _, p in self._params()}
        try:
            super().load_state_dict({**state_dict, "state": stripped})
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
            if meta is not None:
                self.load_stquant_meta(meta, by_name)
        except Exception:
            self.state, self.global_step, self.stats = old
            if old_sched is not None:
                self.scheduler.load_state_dict(old_sched)
            for g, saved in zip(self.param_groups, old_groups):
                g.clear()
                g.update(saved)
            raise

    def load_stquant_meta(self, meta: dict[str, Any], by_name: dict[str, torch.Tensor] | None = None) -> None:
        """Restore the step counter, scheduler (per-unit bits) and statistics saved in
        ``state_dict()["stquant"]``; packed units are re-coded to the restored widths."""
        by_name = by_name or {self.param_name(p): p for _, p in self._params()}
        self.global_step = int(meta.get("global_step", 0))
        saved = meta.get("scheduler")
        if self.scheduler is not None and saved is not None and saved.get("bits") is not None:
            self.scheduler.load_state_dict(meta["scheduler"])
            bits = self.scheduler.current()
            for unit, p, moment in self._packed_units():
                st = self.state.get(p, {}).get(moment)
                if isinstance(st, PackedState) and unit in bits and st.bits != bits[unit]:
                    st.requantize(bits[unit], self.config.codebook(moment, bits[unit]))
        self.stats = {
            by_name[k]: torch.tensor(v, dtype=torch.float32, device=by_name[k].device)
            for k, v in (meta.get("stats") or {}).items() if k in by_name
        }  # fmt: skip

    def _load_moment(self, p: torch.Tensor, key: str, value: Any):
        name = self.param_name(p)
        if isinstance(value, dict):
            state = PackedState.from_dict(value, p.device)
            if state.numel != p.numel() or state.signed != (key == "exp_avg"):
                raise ValueError(
                    f"checkpoint {key} of {name!r} has numel={state.numel}, signed={state.signed}; "
                    f"the parameter has numel={p.numel()}: the checkpoint belongs to another model"
                )
            return state
        if not torch.is_tensor(value) or value.numel() != p.numel() or not value.is_floating_point():
            got = (tuple(value.shape), value.dtype) if torch.is_tensor(value) else type(value).__name__
            raise ValueError(f"checkpoint {key} of {name!r} should be a float tensor of {p.numel()} elements; got {got}")
        if not self._is_packed(p):
            return value.detach().to(device=p.device, dtype=torch.float32).reshape(p.shape).clone()
        if key == "exp_avg_sq" and bool((value < 0).any()):
            raise ValueError(f"checkpoint exp_avg_sq of {name!r} has negative values: it is not a second moment")
        cfg, bits = self.config, self._planned_bits(p, key)
        state = PackedState.zeros(
            p.numel(), bits=bits, kind=cfg.codebook(key, bits), signed=key == "exp_avg",
            block_size=cfg.block_size, scale_dtype=_SCALE_DTYPES[cfg.scale_dtype], device=p.device,
        )  # fmt: skip
        return state.copy_(value)
