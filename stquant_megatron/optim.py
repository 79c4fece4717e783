"""``STQuantAdamW``: Adam/AdamW with packed variable-bit moments, for any PyTorch model.

Each parameter with at least ``config.min_numel`` elements keeps ``exp_avg`` and ``exp_avg_sq``
as ``PackedState`` (b-bit codes + block scales); smaller ones keep fp32 moments. A step is one
fused pass per parameter (``kernels``): unpack, dequantize, update, requantize, pack.
"""

from __future__ import annotations

import fnmatch
import logging
import math
import warnings
from collections.abc import Iterable
from typing import Any

import torch
import torch.distributed as dist

from . import checkpoint
from .config import MOMENTS, STQuantConfig
from .kernels import get_factored_step_fn, get_group_step_fn, rng_key, step_scalars, unit_id
from .kernels.common import GroupEntry, launch_shape, sampled_programs
from .kernels.torch_adam import (
    CHUNK_ELEMENTS,
    dense_adam_step,
    factored_ema,
    factored_partial_sums,
    matrix_partial_sums,
)
from .scheduler import PrecisionScheduler
from .state import _SCALE_DTYPES, QUANTIZED_STATES, FactoredState, PackedState

log = logging.getLogger("stquant_megatron")



def _codebook(cfg: STQuantConfig, moment: str, bits: int, device: torch.device):
    """The codebook a unit of ``moment`` would use at ``bits``, or None outside 2..8."""
    from .formats.codebooks import get_codebook

    if not 2 <= bits <= 8:
        return None
    return get_codebook(cfg.codebook(moment, bits), bits, moment == "exp_avg", device)


GRAD_LIMIT = 1.8e19
"""Largest gradient magnitude whose square is finite in fp32 (sqrt(3.4e38) = 1.84e19). Above it the
second moment overflows and, stored with a block-wise absmax scale, would ruin its whole block."""


def _stage_on_host(device: torch.device) -> bool:
    """Whether a re-coded unit's old codes wait in host memory (accelerators: keeps the device peak
    within the budget; on the CPU the host is the device and staging would only copy)."""
    return device.type != "cpu"


class NonFiniteGradError(ValueError):
    """A step saw NaN, Inf or overflowing gradients; nothing was changed."""


def _check_group(group: dict[str, Any], where: str) -> None:
    """Reject Adam variants this optimizer does not implement (they would be silently ignored)."""
    for flag in ("amsgrad", "maximize", "capturable", "differentiable"):
        if group.get(flag):
            raise ValueError(
                f"{where} has {flag}=True; STQuantAdamW implements plain Adam/AdamW only. "
                f"Set {flag}=False (or use torch.optim.AdamW for {flag})"
            )
    for p in group.get("params", ()):
        if torch.is_tensor(p) and p.dtype == torch.float64:
            raise TypeError(
                f"{where} holds a float64 parameter of shape {tuple(p.shape)}; STQuantAdamW updates in fp32. "
                "Use fp32/bf16/fp16 parameters, or torch.optim.AdamW for float64"
            )


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
        self._names: dict[int, tuple[str, int]] = {}
        self._full_numel: dict[int, int] = {}
        self._full_shape: dict[int, tuple[int, ...]] = {}
        self._factor_group: Any = None  # set_factored_sharding: shards' statistics are all-reduced here
        self._factor_shards = 1
        self._factor_slots: dict[str, tuple[int, int, int]] = {}  # name -> (start, rows, cols) in the all-reduce
        self._factor_total = 0
        self._factor_device: torch.device | None = None
        self._factor_pending: dict[int, torch.Tensor] = {}  # loaded, not yet all-reduced (finish_factored_load)
        self._replicas: dict[int, int] = {}
        self._units_changed = False
        self.config = config or STQuantConfig()
        super().__init__(params, defaults)
        self.collect_stats = False
        """Whether the current step measures the scheduler's error statistics."""
        self.probe_neighbors = False
        """With ``collect_stats``: also measure each unit's error one width below and above."""
        self.sample_phase = 0
        """With ``collect_stats``: which programs of each unit measure (``PrecisionScheduler.sample_phase``)."""
        self.last_stats: dict[str, torch.Tensor] = {}
        """This rank's statistics of the last measuring step, per unit: ``[err, ref]``, or on a
        probe step ``[err, ref, err at b, err at b-1, err at b+1]`` (what the scheduler all-reduces)."""
        self.decision_callbacks: list = []
        """Called as ``cb(decision, optimizer)`` after every scheduler decision (e.g. loggers)."""
        self.global_step = 0
        """Steps taken (skipped steps excluded); the scheduler's clock."""
        self.group_step_authoritative = False
        """Hosts that keep the step in ``param_group["step"]`` (Megatron with TE/apex) set this:
        loading a state dict then sets every parameter's step from its group's."""
        self._peak_bytes = 0
        cfg = self.config
        self.scheduler: PrecisionScheduler | None = None
        if cfg.avg_bits is not None:
            self.scheduler = PrecisionScheduler(
                avg_bits=cfg.avg_bits, min_bits=cfg.min_bits, max_bits=cfg.max_bits, max_error=cfg.max_error,
                interval=cfg.interval, warmup_steps=cfg.warmup_steps, warmup_bits=cfg.warmup_bits,
                stats_steps=cfg.stats_steps, max_move=cfg.max_move, hysteresis=cfg.hysteresis,
                scale_bits=cfg.scale_bits(), group=process_group,
            )  # fmt: skip

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        try:
            _check_group(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")
        except (TypeError, ValueError):
            self.param_groups.pop()
            raise
        self._units_changed = True  # the scheduler learns the new units at the next step

    # ----------------------------------------------------------------------------- naming
    def set_param_name(
        self, param: torch.Tensor, name: str, index_offset: int = 0, full_numel: int | None = None, replicas: int = 1,
        full_shape: tuple[int, ...] | None = None,
    ) -> None:
        """Name ``param``'s units (``name.exp_avg``, ``name.exp_avg_sq``).

        When ``param`` is a shard, ``index_offset`` is the global index of its first element in
        the full tensor (so stochastic rounding does not depend on the sharding) and
        ``full_numel`` the full tensor's size (so every shard of a tensor is packed, or none).
        ``replicas``: how many ranks of the process group keep the same elements (e.g. the
        tensor-parallel size for a parameter that is not split by tensor parallelism); the
        scheduler counts them once in the unit's size. ``full_shape``: the full tensor's shape, which
        lets a shard's ``exp_avg_sq`` be factored (with ``set_factored_sharding``).
        """
        self._names[id(param)] = (name, index_offset)
        if full_numel is not None:
            self._full_numel[id(param)] = full_numel
        if full_shape is not None:
            self._full_shape[id(param)] = tuple(int(d) for d in full_shape)
        self._replicas[id(param)] = replicas

    def set_factored_sharding(self, group: Any, members: list[tuple[str, tuple[int, ...]]],
                              device: torch.device | str | None = None) -> None:
        """Let shards of matrices have a factored ``exp_avg_sq`` (Megatron's distributed optimizer).

        ``members``: ``(name, full shape)`` of every tensor whose shards the ranks of ``group`` hold,
        in the same order on every rank (a rank lists tensors it holds no element of, too). Each
        step, every rank adds its shards' row and column sums of g**2 into one buffer, which is
        all-reduced over ``group`` (one collective per step, 4 bytes per row and column), so every
        shard keeps the full matrix's statistics. Call before the state exists; every rank of
        ``group`` then takes part in each ``step`` and ``finish_factored_load``."""
        if any(self.state.values()):
            raise RuntimeError("set_factored_sharding must come before the optimizer state exists (init_state, step)")
        size = dist.get_world_size(group) if dist.is_available() and dist.is_initialized() else 1
        self._factor_group, self._factor_shards = group, max(1, size)
        self._factor_slots, total = {}, 0
        for name, shape in members:
            numel = math.prod(shape)
            dims = self._factor_dims(name, tuple(shape), numel)
            if dims is not None:
                self._factor_slots[name] = (total, *dims)
                total += dims[0] + dims[1] + 1  # row sums, column sums, a "loaded here" flag
        self._factor_total = total
        first = next((p for _, p in self._params()), None)
        self._factor_device = torch.device(device) if device is not None else (
            first.device if first is not None else torch.device("cpu"))  # fmt: skip

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

    def _factor_dims(self, name: str, shape: tuple[int, ...], numel: int) -> tuple[int, int] | None:
        """``(rows, cols)`` if a tensor of this full shape gets a factored exp_avg_sq: "factored", or
        "auto" when its statistics (4 bytes per row and column, kept by each of the ``shards`` ranks
        that hold a part) take less than the 4-bit packed exp_avg_sq they replace; "auto" with the
        scheduler: every matrix may be factored (the scheduler chooses, ``chooses_format``)."""
        fmt = self.config.exp_avg_sq_format
        if fmt == "packed" or numel < max(1, self.config.min_numel) or self._never_factor(name):
            return None
        dims = FactoredState.factor_shape(shape)
        if dims is None or fmt == "factored" or self.chooses_format:
            return dims
        return dims if 8 * (dims[0] + dims[1]) * self._factor_shards <= numel else None

    @property
    def chooses_format(self) -> bool:
        """Whether the scheduler chooses, per matrix, a factored or a packed exp_avg_sq
        (``exp_avg_sq_format="auto"`` with a budget)."""
        return self.scheduler is not None and self.config.exp_avg_sq_format == "auto"

    def _factored_now(self, param: torch.Tensor, bits: int | None = None) -> bool:
        """Whether ``param``'s exp_avg_sq is (to be) factored: a factorable matrix, and with
        ``chooses_format`` the scheduler's width for it (``bits``, default the planned one) is 0."""
        if not self._factor_shape(param):
            return False
        if not self.chooses_format:
            return True
        return (self._planned_bits(param, "exp_avg_sq") if bits is None else bits) == 0

    def _never_factor(self, name: str) -> bool:
        return any(fnmatch.fnmatchcase(name, pat) for pat in self.config.never_factor)

    def _factor_shape(self, param: torch.Tensor) -> tuple[int, int] | None:
        """``(rows, cols)`` of the full matrix if ``param``'s exp_avg_sq is factored: a matrix held whole,
        or a shard of one whose statistics are all-reduced (``set_factored_sharding``)."""
        name, offset = self._names.get(id(param), (None, 0))
        numel = self._full_numel.get(id(param), param.numel())
        if offset == 0 and numel == param.numel():
            return self._factor_dims(name or self.param_name(param), self._full_shape.get(id(param), tuple(param.shape)), numel)
        slot = self._factor_slots.get(name)
        return slot[1:] if slot is not None else None

    def init_state(self, param: torch.Tensor | None = None) -> None:
        """Create the (zero) state of ``param``, or of every parameter, now rather than at the first step.
        With the scheduler, ``init_state()`` (every parameter) first agrees on the units and their widths,
        a collective over the process group (every rank calls it), so the state is created at the widths
        the first step uses and is not re-coded then."""
        sched = self.scheduler
        if param is None and sched is not None and (sched.numel is None or self._units_changed):
            self._setup_scheduler()
        for _, p in self._params() if param is None else [(None, param)]:
            if not self.state[p]:
                self._init_state(p)
        self._note_bytes()

    def _new_packed(self, p: torch.Tensor, moment: str, bits: int) -> PackedState:
        cfg = self.config
        return PackedState.zeros(
            p.numel(), bits=bits, kind=cfg.codebook(moment, bits), signed=moment == "exp_avg",
            block_size=cfg.block_size, scale_dtype=_SCALE_DTYPES[cfg.scale_dtype], device=p.device,
        )  # fmt: skip

    def _new_factored(self, p: torch.Tensor) -> FactoredState:
        return FactoredState.zeros(self._factor_shape(p), p.device, self._naming(p)[1], p.numel())

    def _init_state(self, p: torch.Tensor) -> dict[str, Any]:
        st = self.state[p]
        st["step"] = torch.tensor(0.0, dtype=torch.float32)
        for moment in MOMENTS:
            if moment == "exp_avg_sq" and self._factored_now(p):
                st[moment] = self._new_factored(p)
            elif self._is_packed(p):
                st[moment] = self._new_packed(p, moment, self._planned_bits(p, moment))
            else:
                st[moment] = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
        return st

    def state_bytes(self) -> int:
        """Exact bytes of all optimizer-state storage allocated now (codes, scales, factored statistics,
        fp32 escapes, steps)."""
        total = 0
        for st in self.state.values():
            for v in st.values():
                if isinstance(v, QUANTIZED_STATES):
                    total += v.nbytes
                elif torch.is_tensor(v):
                    total += v.numel() * v.element_size()
        return total

    def peak_state_bytes(self) -> int:
        """High-water mark of ``state_bytes()`` since construction, transitions included (a unit
        being re-coded briefly holds its old and its new codes)."""
        return max(self._peak_bytes, self.state_bytes())

    def _note_bytes(self, extra: int = 0, now: int | None = None) -> int:
        now = self.state_bytes() if now is None else now
        self._peak_bytes = max(self._peak_bytes, now + extra)
        return now

    def unit_bits(self) -> dict[str, int]:
        """``{"<param name>.<moment>": bits}`` for every unit; fp32 escapes report 32, factored ones 0."""
        out = {}
        for _, p in self._params():
            name = self.param_name(p)
            st = self.state.get(p) or {}
            for moment in MOMENTS:
                v = st.get(moment)
                if isinstance(v, QUANTIZED_STATES):
                    out[f"{name}.{moment}"] = v.bits
                elif moment == "exp_avg_sq" and self._factored_now(p):
                    out[f"{name}.{moment}"] = 0
                elif v is not None or not self._is_packed(p):
                    out[f"{name}.{moment}"] = 32
                else:
                    out[f"{name}.{moment}"] = self._planned_bits(p, moment)
        return out

    def _planned_bits(self, p: torch.Tensor, moment: str) -> int:
        """Width of a unit whose state does not exist yet (or is being loaded)."""
        sched, cfg = self.scheduler, self.config
        if sched is None:
            return cfg.moment_bits(moment)
        if sched.names and sched.bits is not None:
            bits = sched.current().get(f"{self.param_name(p)}.{moment}")
            if bits is not None:
                return bits
            return cfg.min_bits if sched.numel is not None else cfg.warmup_bits or cfg.min_bits
        if cfg.warmup_bits is not None:
            return cfg.warmup_bits
        # before the scheduler is set up: the widest uniform width within the budget
        return max(cfg.min_bits, min(cfg.max_bits, int(cfg.avg_bits - cfg.scale_bits() + 1e-9)))

    # ----------------------------------------------------------------------------- scheduler
    def _scheduled_units(self):
        """(unit name, param, moment) of every unit the scheduler places, in a fixed order: packed
        units, and with ``chooses_format`` the matrices' exp_avg_sq whatever their format (always
        factored ones are not scheduled)."""
        for _, p in self._params():
            if self._is_packed(p):
                name = self.param_name(p)
                for moment in MOMENTS:
                    if moment == "exp_avg" or self.chooses_format or not self._factor_shape(p):
                        yield f"{name}.{moment}", p, moment

    def _setup_scheduler(self) -> None:
        """Agree on the units (collective) and bring existing packed state to the scheduler's widths."""
        sched = self.scheduler
        units = list(self._scheduled_units())
        factored_bits = {}
        if self.chooses_format:
            for u, p, moment in units:
                dims = self._factor_shape(p) if moment == "exp_avg_sq" else None
                if dims:
                    factored_bits[u] = 32.0 * (dims[0] + dims[1])
        sched.setup({u: p.numel() for u, p, _ in units}, {u: self._replicas.get(id(p), 1) for u, p, _ in units},
                    factored_bits)  # fmt: skip
        self._units_changed = False
        if not sched.within_budget() or not bool(sched.in_range().all()):
            # widths restored from a checkpoint that break this run's budget or range: start again
            warnings.warn(
                f"stquant: the restored widths ({sched.average_bits():.3f} bits on average, "
                f"{sched.rank_bits().max():.3f} on the fullest rank) break avg_bits={sched.avg_bits} or "
                f"[{sched.min_bits}, {sched.max_bits}]; the units start again at widths within the budget",
                RuntimeWarning, stacklevel=3,
            )  # fmt: skip
            sched.bits = sched._initial_bits()
        self._apply_widths(sched.current())

    def _apply_widths(self, bits: dict[str, int]) -> None:
        """Re-code scheduled units to ``bits`` (0: factored): the ones that shrink first, so that memory
        only grows after it has shrunk. On CUDA a unit's old codes are staged in host memory while it is
        re-coded, so the device never holds both; elsewhere (the host is the device) the peak counts both.
        A unit that becomes factored takes the row and column means of its dense exp_avg_sq (over every
        shard: one all-reduce, which every rank makes when ``bits`` factors any unit); one that stops
        being factored is packed from the factored estimate, chunk by chunk."""
        moves = []
        for unit, p, moment in self._scheduled_units():
            state = self.state[p].get(moment) if p in self.state else None
            if isinstance(state, QUANTIZED_STATES) and unit in bits and state.bits != bits[unit]:
                b = bits[unit]
                if b == 0:
                    new_bytes = self._new_factored_nbytes(p)
                elif isinstance(state, FactoredState):
                    new_bytes = self._packed_nbytes(p, b)
                else:
                    new_bytes = state.recoded_nbytes(b)
                moves.append((new_bytes - state.nbytes, unit, p, state, moment))
        now = self.state_bytes()
        for _, unit, p, state, moment in sorted(moves, key=lambda t: (t[0], t[1])):
            b = bits[unit]
            old_bytes = state.nbytes
            if b == 0:  # packed -> factored: statistics from the dense values, codes freed
                new = self._new_factored(p)
                rows, cols = new.shape
                sums = matrix_partial_sums(state.values, state.numel, rows, cols, new.offset, state.codes.device)
                self._note_bytes(extra=new.nbytes, now=now)
                if self.param_name(p) in self._factor_slots:
                    self._factor_pending[id(p)] = sums  # set by the all-reduce below, from every shard
                else:
                    new.row.copy_(sums[:rows] * (1.0 / cols))
                    new.col.copy_(sums[rows:] * (1.0 / rows))
                self.state[p][moment] = new
            elif isinstance(state, FactoredState):  # factored -> packed: the estimate, quantized
                new = self._new_packed(p, moment, b)
                self._note_bytes(extra=new.nbytes, now=now)
                new.fill_(state.values)
                self.state[p][moment] = new
            else:
                stage = _stage_on_host(state.codes.device)
                self._note_bytes(extra=(state.recoded_nbytes(b) - old_bytes) if stage else state.recoded_nbytes(b), now=now)
                state.requantize(b, self.config.codebook(moment, b), stage_on_host=stage)
                new = state
            now += new.nbytes - old_bytes
        if self._factor_slots and any(b == 0 for b in bits.values()):
            self.finish_factored_load()  # collective: every rank applies the same bits
        self._factor_pending.clear()

    def _new_factored_nbytes(self, p: torch.Tensor) -> int:
        rows, cols = self._factor_shape(p)
        return 4 * (rows + cols)

    def _packed_nbytes(self, p: torch.Tensor, bits: int) -> int:
        cfg = self.config
        nb = -(-p.numel() // cfg.block_size)
        return nb * bits * (cfg.block_size // 8) + nb * torch.empty((), dtype=_SCALE_DTYPES[cfg.scale_dtype]).element_size()

    def _schedule(self) -> None:
        """After a step: decide and re-code units when a decision is due."""
        sched, step = self.scheduler, self.global_step
        if not sched.due(step):
            return
        decision = sched.decide(step)
        self._apply_widths(decision.bits)
        if not dist.is_initialized() or dist.get_rank() == 0:
            nparams = sum(p.numel() for _, p in self._params())
            log.info(
                "stquant step %d: avg bits %.3f, state %.3f B/param (peak %.3f), %d of %d units moved",
                step, decision.avg_bits, self.state_bytes() / max(1, nparams),
                self.peak_state_bytes() / max(1, nparams), decision.moved, len(decision.bits),
            )  # fmt: skip
        for callback in self.decision_callbacks:
            callback(decision, self)

    # ----------------------------------------------------------------------------- step
    def _check_finite(self, work: list) -> bool:
        """True if every gradient is finite and below ``GRAD_LIMIT``. One host sync for all gradients."""
        by_key: dict[tuple, list[torch.Tensor]] = {}
        for _, _, g in work:
            by_key.setdefault((g.device, g.dtype), []).append(g)
        maxes = [n.float() for gs in by_key.values() for n in torch._foreach_norm(gs, math.inf)]
        top = torch.stack([m.cpu() for m in maxes])
        if bool((top <= GRAD_LIMIT).all()):  # False for NaN too
            return True
        bad = [self.param_name(p) for _, p, g in work if not bool((g.abs() <= GRAD_LIMIT).all())]
        what = "non-finite gradient (NaN or Inf)" if not bool(torch.isfinite(top).all()) else (
            f"gradient larger than {GRAD_LIMIT:.2g} in magnitude (its square overflows fp32)")  # fmt: skip
        msg = (
            f"{what} in {len(bad)} parameter(s): {bad[:5]}"
            f"{' ...' if len(bad) > 5 else ''}; the optimizer state and parameters were left unchanged"
        )
        if self.config.nonfinite == "raise":
            raise NonFiniteGradError(
                msg + ". Lower the learning rate, clip gradients, or set STQuantConfig(nonfinite='skip') to skip such steps"
            )
        warnings.warn(msg + "; step skipped (STQuantConfig.nonfinite='skip')", RuntimeWarning, stacklevel=3)
        return False

    def _validate_work(self, work: list) -> None:
        """Everything that can be checked before anything changes: dtypes, shapes, the step backend
        (resolved once per device: it raises for a backend that cannot run there)."""
        devices = set()
        for _, p, g in work:
            if g.is_sparse:
                raise RuntimeError(f"parameter {self.param_name(p)!r} has a sparse gradient; STQuantAdamW needs "
                                   "dense gradients (use torch.optim.SparseAdam)")  # fmt: skip
            if not p.is_floating_point() or p.dtype == torch.float64:
                raise TypeError(f"parameter {self.param_name(p)!r} has dtype {p.dtype}; STQuantAdamW needs an "
                                "fp32/bf16/fp16 parameter")  # fmt: skip
            if g.numel() != p.numel() or not g.is_floating_point():
                raise ValueError(f"gradient of {self.param_name(p)!r} has {g.numel()} elements of {g.dtype}; the "
                                 f"parameter has {p.numel()}: gradients must match their parameters")  # fmt: skip
            if self._is_packed(p):
                devices.add(p.device)
        for device in devices:
            get_group_step_fn(self.config.backend, device)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        work = [(group, p, p.grad) for group, p in self._params() if p.grad is not None and p.numel() > 0]
        self._validate_work(work)
        if self._factor_pending:
            raise RuntimeError("stquant: factored exp_avg_sq statistics were loaded but not all-reduced: call "
                               "finish_factored_load() on every rank of the group after loading")  # fmt: skip
        if not work or (self.config.nonfinite != "unchecked" and not self._check_finite(work)):
            return loss
        cfg = self.config
        sched = self.scheduler
        if sched is not None:
            if sched.numel is None or self._units_changed:
                self._setup_scheduler()
            self.collect_stats = sched.collecting(self.global_step + 1)
            self.probe_neighbors = sched.due(self.global_step + 1)
            self.sample_phase = sched.sample_phase(self.global_step + 1)
        # Packed units are stepped per width group: one launch for all units sharing (widths,
        # codebooks, dtypes, block size, rounding, statistics), O(groups) launches per step.
        created = False
        launches: dict[tuple, list] = {}
        factored: list[tuple] = []
        format_probe: list[tuple] = []  # packed exp_avg_sq units that may be factored (probe step)
        for group, p, g in work:
            if not self.state[p]:
                self._init_state(p)
                created = True
            st = self.state[p]
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
            if isinstance(v, FactoredState):
                factored.append((p, name, m, v, target, grad, scalars, rng_key(cfg.seed, step, uid), probe))
                continue
            if probe and self.chooses_format and self._factor_shape(p):
                format_probe.append((name, m, v, scalars, self._factor_shape(p), offset))
            key = (m.bits, m.codebook.kind, v.bits, v.codebook.kind, m.block_size, target.dtype, grad.dtype,
                   m.scale.dtype, v.scale.dtype, str(p.device), self.collect_stats, probe)  # fmt: skip
            entry = GroupEntry(
                target, grad, m.codes, m.scale, v.codes, v.scale, scalars,
                rng_key(cfg.seed, step, uid), offset,
            )  # fmt: skip
            launches.setdefault(key, []).append((p, name, m, v, entry))
        local_stats: dict[str, torch.Tensor] = {}
        for (_, _, _, _, block_size, *_, with_stats, probe), items in launches.items():
            _, _, m0, v0, entry0 = items[0]
            dev = entry0.param.device
            stats = torch.zeros(len(items), 3, dtype=torch.float32, device=dev) if with_stats else None
            nbr_stats = torch.zeros(len(items), 6, dtype=torch.float32, device=dev) if probe else None
            nbr_books = None
            if probe:
                nbr_books = tuple(
                    _codebook(cfg, key, b, dev) for key, st_ in (("exp_avg", m0), ("exp_avg_sq", v0))
                    for b in (st_.bits - 1, st_.bits + 1)
                )  # fmt: skip
            get_group_step_fn(cfg.backend, dev)(
                [it[4] for it in items], m0.codebook, v0.codebook, block_size=block_size,
                stochastic=cfg.stochastic_rounding, stats=stats, neighbor_codebooks=nbr_books,
                neighbor_stats=nbr_stats, sample_phase=self.sample_phase, compile=cfg.compile,
            )  # fmt: skip
            for i, (p, name, _, _, entry) in enumerate(items):
                if stats is not None:
                    for j, moment in enumerate(MOMENTS):
                        row = [stats[i, j], stats[i, 2]]
                        if nbr_stats is not None:  # err at b, b-1, b+1 on the probe's sampled blocks
                            row += [nbr_stats[i, 4 + j], nbr_stats[i, 2 * j], nbr_stats[i, 2 * j + 1]]
                        local_stats[f"{name}.{moment}"] = torch.stack(row)
                if entry.param is not p:
                    p.copy_(entry.param)
        if self.chooses_format and self.collect_stats and self.probe_neighbors:
            self._factored_probe(format_probe, local_stats)
        inv_means = self._factored_statistics(factored)
        for (p, name, m, v, target, grad, scalars, key, probe), inv_mean in zip(factored, inv_means):
            dev = p.device
            stats = torch.zeros(3, dtype=torch.float32, device=dev) if self.collect_stats else None
            nbr_stats = torch.zeros(6, dtype=torch.float32, device=dev) if probe else None
            nbr_books = (_codebook(cfg, "exp_avg", m.bits - 1, dev), _codebook(cfg, "exp_avg", m.bits + 1, dev),
                         None, None) if probe else None  # fmt: skip
            get_factored_step_fn(cfg.backend, dev)(
                target, grad, m.codes, m.scale, v.row, v.col, m.codebook, scalars, block_size=m.block_size,
                stochastic=cfg.stochastic_rounding, rng_key=key, stats=stats, neighbor_codebooks=nbr_books,
                neighbor_stats=nbr_stats, compile=cfg.compile, inv_mean=inv_mean, index_offset=v.offset,
                sample_phase=self.sample_phase,
            )  # fmt: skip
            if stats is not None:
                row = [stats[0], stats[2]]
                if nbr_stats is not None:
                    row += [nbr_stats[4], nbr_stats[0], nbr_stats[1]]
                local_stats[f"{name}.exp_avg"] = torch.stack(row)
            if target is not p:
                p.copy_(target)
        if created:
            self._note_bytes()
        self.global_step += 1
        for group in self.param_groups:  # the step also lives in the group, as in TE/apex FusedAdam
            steps = [self.state[p]["step"] for p in group["params"] if p in self.state and "step" in self.state[p]]
            if steps:
                group["step"] = int(max(float(s) for s in steps))
        if self.collect_stats:
            self.last_stats = local_stats
        # The launch entries hold every unit's codes and scales: drop them before a transition
        # re-codes units, or each re-coded unit's old codes stay alive until step() returns.
        launches.clear()
        items = entry0 = entry = None  # noqa: F841
        if sched is not None:
            if self.collect_stats:
                sched.accumulate(local_stats)
            self._schedule()
        return loss

    def _factored_probe(self, units: list, local_stats: dict[str, torch.Tensor]) -> None:
        """The probe step's measurement of what factoring would cost each packed exp_avg_sq unit that may
        be factored: the factored estimate is built from the row and column means of its dense (decoded)
        exp_avg_sq, which is what a factored state holds (the moving averages of g**2's row and column
        means are the row and column means of the moving average of g**2); then, on the probe's sampled
        programs, ``sum ||U(m, v_F) - U(m, v)||^2`` and ``sum ||U(m, v)||^2`` (U = m / (sqrt(v) / sqrt(1 -
        beta2**t) + eps), the update direction, as for every width) are appended to the unit's
        statistics. Cost: one decoding pass over these units' exp_avg_sq and one over the sampled quarter
        of both moments, once per decision; with ``set_factored_sharding`` one all-reduce of the row and
        column sums, which every rank of the group makes."""
        slots = self._factor_slots
        buf = torch.zeros(self._factor_total, dtype=torch.float32, device=self._factor_device) if slots else None
        sums = []
        for name, m, v, scalars, (rows, cols), offset in units:
            part = matrix_partial_sums(v.values, v.numel, rows, cols, offset, v.codes.device)
            if slots:
                start = slots[name][0]
                buf[start : start + rows + cols] += part.to(buf.device)
            sums.append(part)
        if slots and self._factor_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf, group=self._factor_group)
        for (name, m, v, scalars, (rows, cols), offset), part in zip(units, sums):
            total = buf[slots[name][0] : slots[name][0] + rows + cols].to(part.device) if slots else part
            row, col = total[:rows] * (1.0 / cols), total[rows:] * (1.0 / rows)
            mean = row.mean()
            inv_mean = torch.where(mean > 0, 1.0 / mean, torch.zeros_like(mean))
            err = torch.zeros((), dtype=torch.float64, device=part.device)
            ref = torch.zeros((), dtype=torch.float64, device=part.device)
            bs = v.block_size
            g = launch_shape(bs)[0]
            nb = v.codes.shape[0]
            programs = torch.tensor(list(sampled_programs(0, nb, bs, self.sample_phase)), dtype=torch.long)
            blocks = (programs[:, None] * g + torch.arange(g)[None, :]).reshape(-1)
            blocks = blocks[blocks < nb].to(v.codes.device)
            lanes = torch.arange(bs, device=v.codes.device)
            for chunk in blocks.split(max(1, CHUNK_ELEMENTS // bs)):
                elem = chunk[:, None] * bs + lanes[None, :]  # element index in the shard
                held = elem < v.numel
                glob = elem + offset
                vd, md = v.blocks(chunk), m.blocks(chunk)
                vf = (row[glob // cols] * col[glob % cols]) * inv_mean
                ibc = scalars.inv_bias_correction2_sqrt
                u = md / (vd.sqrt() * ibc + scalars.eps)
                uf = md / (vf.sqrt() * ibc + scalars.eps)
                err += torch.where(held, (uf - u) ** 2, 0.0).sum(dtype=torch.float64)
                ref += torch.where(held, u * u, 0.0).sum(dtype=torch.float64)
            key = f"{name}.exp_avg_sq"
            prev = local_stats.get(key)
            prev = torch.zeros(5, device=part.device) if prev is None else prev
            local_stats[key] = torch.cat([prev.to(torch.float64).reshape(-1)[:5],
                                          torch.stack([err, ref]).to(prev.device, torch.float64)])  # fmt: skip

    def _factored_statistics(self, factored: list) -> list[torch.Tensor | None]:
        """Pass 1 of the factored units whose statistics are all-reduced (``set_factored_sharding``):
        their row and column sums of g**2 in one buffer, one all-reduce, then each unit's moving
        averages; returns each unit's ``1 / mean(row)`` (None: a unit held whole, whose step runs pass 1)."""
        out: list[torch.Tensor | None] = [None] * len(factored)
        if not self._factor_slots:
            return out
        if self.chooses_format and not (self.scheduler.bits is not None and bool((self.scheduler.bits == 0).any())):
            return out  # no unit is factored (every rank holds the same widths): nothing to all-reduce
        buf = torch.zeros(self._factor_total, dtype=torch.float32, device=self._factor_device)
        mine = []
        for i, (p, name, m, v, target, grad, scalars, *_) in enumerate(factored):
            start, rows, cols = self._factor_slots[name]
            buf[start : start + rows + cols] += factored_partial_sums(target, grad, scalars, rows, cols, v.offset).to(buf.device)
            mine.append((i, start, rows, cols, v, scalars))
        if self._factor_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf, group=self._factor_group)
        for i, start, rows, cols, v, scalars in mine:
            out[i] = factored_ema(v.row, v.col, buf[start : start + rows + cols].to(v.row.device), scalars)
        return out

    def stage_factored_load(self, param: torch.Tensor, dense: torch.Tensor) -> None:
        """Loading: take the dense ``exp_avg_sq`` of a shard whose statistics are all-reduced; its
        statistics are set by ``finish_factored_load`` (which every rank of the group calls)."""
        v = self.state[param]["exp_avg_sq"]
        if not isinstance(v, FactoredState) or self.param_name(param) not in self._factor_slots:
            raise ValueError(f"{self.param_name(param)!r} has no all-reduced factored exp_avg_sq")
        flat = dense.reshape(-1)
        if flat.numel() != v.numel or not bool(torch.isfinite(flat).all()) or bool((flat < 0).any()):
            raise ValueError(f"exp_avg_sq of {self.param_name(param)!r}: expected {v.numel} finite values >= 0, got "
                             f"{flat.numel()} ({flat.dtype})")  # fmt: skip
        rows, cols = v.shape
        self._factor_pending[id(param)] = matrix_partial_sums(
            lambda a, b: flat[a:b].to(torch.float32), flat.numel(), rows, cols, v.offset, flat.device)

    def finish_factored_load(self) -> None:
        """Collective over the ``set_factored_sharding`` group: the staged shards' sums are all-reduced
        and every loaded matrix's statistics become the row and column means of its dense exp_avg_sq
        (what ``FactoredState.copy_`` does for a matrix held whole). Matrices nobody loaded keep theirs."""
        if not self._factor_slots:
            self._factor_pending.clear()
            return
        buf = torch.zeros(self._factor_total, dtype=torch.float32, device=self._factor_device)
        held = []
        for _, p in self._params():
            v = (self.state.get(p) or {}).get("exp_avg_sq")
            if isinstance(v, FactoredState) and self.param_name(p) in self._factor_slots:
                start, rows, cols = self._factor_slots[self.param_name(p)]
                held.append((start, rows, cols, v))
                sums = self._factor_pending.get(id(p))
                if sums is not None:
                    buf[start : start + rows + cols] += sums.to(buf.device)
                    buf[start + rows + cols] = 1.0
        if self._factor_group is not None and dist.is_available() and dist.is_initialized():
            dist.all_reduce(buf, group=self._factor_group)
        flags = buf.cpu()
        for start, rows, cols, v in held:
            if flags[start + rows + cols] > 0:
                sums = buf[start : start + rows + cols].to(v.row.device)
                v.row.copy_(sums[:rows] * (1.0 / cols))
                v.col.copy_(sums[rows:] * (1.0 / rows))
        self._factor_pending.clear()

    # ----------------------------------------------------------------------------- checkpoints
    def state_dict(self) -> dict[str, Any]:
        """Like ``torch.optim`` state dicts; packed moments become dicts of tensors and plain values
        (``stquant_megatron.checkpoint``)."""
        return checkpoint.state_dict(self)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict of this optimizer, or of ``torch.optim.AdamW`` / ``Adam`` (dense moments
        are quantized); validated first, on error nothing changes (``stquant_megatron.checkpoint``)."""
        checkpoint.load_state_dict(self, state_dict)

    def load_stquant_meta(self, meta: dict[str, Any]) -> None:
        """Restore the step counter and the scheduler saved in ``state_dict()["stquant"]``
        (``stquant_megatron.checkpoint.load_meta``)."""
        checkpoint.load_meta(self, meta)
