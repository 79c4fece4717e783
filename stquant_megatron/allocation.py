"""Bit allocation: choose a width per unit to minimise the total measured error under a budget.

Problem (see ``docs/scheduler.md`` for the derivation)::

    minimise    sum_u n_u * E_u(b_u)
    subject to  sum_u n_u * (b_u + s) <= B * sum_u n_u,      b_u in [min_bits, max_bits]
                E_u(b_u) <= max_error  (when some width of u meets it)

with ``n_u`` the unit's element count, ``s`` the scale bits per element and ``B`` the budget
(``avg_bits``). It is separable, so the Lagrangian relaxation decomposes per unit: for a
multiplier ``lam`` every unit independently picks ``argmin_b E_u(b) + lam * b``. The budget used
falls monotonically as ``lam`` grows; bisection finds the smallest feasible ``lam``; a greedy pass
then spends what budget is left on the best upgrades per bit. On the convex hull of each unit's
error curve this is optimal; the discrete answer is within one width step of one unit of the
exact optimum. Cost: O(U * W * iterations) with W = 7 widths, linear in the number of units.

Everything here is a pure, deterministic function of its inputs (ties broken by unit index), so
every rank that runs it on the same all-reduced numbers gets the same answer.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8


def allocate(
    numel: torch.Tensor,
    error: torch.Tensor,
    *,
    avg_bits: float,
    min_bits: int = MIN_BITS,
    max_bits: int = MAX_BITS,
    max_error: float = float("inf"),
    scale_bits: float = 0.25,
    lower: torch.Tensor | None = None,
    upper: torch.Tensor | None = None,
    iterations: int = 60,
) -> torch.Tensor:
    """Widths per unit.

    Args:
        numel: int/float ``[U]`` elements per unit (> 0).
        error: float ``[U, 7]``: E_u(b) for b = 2..8 (non-increasing in b is expected, not required).
        avg_bits: budget in bits per element, scale bits included.
        min_bits / max_bits: allowed widths.
        max_error: per-unit error cap; a unit's lowest width is raised until E_u(b) <= max_error
            (or max_bits), and the cap wins over the budget.
        scale_bits: scale overhead per element (32 / block_size for fp32 scales).
        lower / upper: optional int ``[U]`` per-unit width bounds (e.g. at most one level away
            from the current width); they win over the budget and the cap.

    Returns:
        int64 ``[U]`` widths.
    """
    if numel.ndim != 1 or error.shape != (numel.numel(), MAX_BITS - MIN_BITS + 1):
        raise ValueError(f"numel [U] and error [U, 7] expected; got {tuple(numel.shape)} and {tuple(error.shape)}")
    if not MIN_BITS <= min_bits <= max_bits <= MAX_BITS:
        raise ValueError(f"need {MIN_BITS} <= min_bits={min_bits} <= max_bits={max_bits} <= {MAX_BITS}")
    n = numel.to(torch.float64)
    widths = torch.arange(min_bits, max_bits + 1, dtype=torch.float64)  # [W]
    e = error.to(torch.float64)[:, min_bits - MIN_BITS : max_bits - MIN_BITS + 1]  # [U, W]
    # The error cap: widths below a unit's first acceptable width are forbidden.
    ok = e <= max_error
    first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(n, len(widths) - 1, dtype=torch.long))
    col = torch.arange(len(widths))[None, :]
    lo_col = first_ok if lower is None else torch.maximum(first_ok, lower.long() - min_bits)
    hi_col = torch.full_like(lo_col, len(widths) - 1) if upper is None else (upper.long() - min_bits)
    lo_col = torch.minimum(lo_col.clamp(0, len(widths) - 1), hi_col.clamp(0, len(widths) - 1))
    hi_col = hi_col.clamp(0, len(widths) - 1)
    forbidden = (col < lo_col[:, None]) | (col > hi_col[:, None])
    e = torch.where(forbidden, torch.inf, e)
    total = float(n.sum())
    budget = avg_bits * total - scale_bits * total  # code bits available

    def pick(lam: float) -> torch.Tensor:
        cost = e + lam * widths[None, :]
        return cost.argmin(1)  # first minimum: ties go to the narrower width

    def used(idx: torch.Tensor) -> float:
        return float((n * widths[idx]).sum())

    lo_idx = lo_col  # narrowest allowed widths: cheapest possible
    if used(lo_idx) >= budget:
        return widths[lo_idx].long()
    lo, hi = 0.0, 1.0
    while used(pick(hi)) > budget and hi < 1e30:
        hi *= 4.0
    if used(pick(0.0)) <= budget:
        idx = pick(0.0)
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if used(pick(mid)) > budget:
                lo = mid
            else:
                hi = mid
        idx = pick(hi)
    # Greedy fill: spend the remaining budget on single-step upgrades, best gain per bit first.
    # Each pass sorts the units once (O(U log U)); a unit whose upgrade no longer fits is skipped;
    # passes repeat while one upgraded something (in practice one or two passes).
    idx = idx.clone()
    left = budget - used(idx)
    while True:
        nxt = torch.minimum(idx + 1, hi_col)
        gain = (e.gather(1, idx[:, None]) - e.gather(1, nxt[:, None])).squeeze(1) * n
        cost = n * (widths[nxt] - widths[idx])
        ratio = torch.where((nxt > idx) & (gain > 0), gain / cost.clamp_min(1e-300), -torch.inf)
        order = sorted(range(len(n)), key=lambda u: (-float(ratio[u]), u))  # ties: lowest unit index
        changed = False
        for u in order:
            if ratio[u] == -torch.inf:
                break
            if float(cost[u]) <= left:
                left -= float(cost[u])
                idx[u] += 1
                changed = True
        if not changed:
            break
    return widths[idx].long()


def total_error(numel: torch.Tensor, error: torch.Tensor, bits: torch.Tensor) -> float:
    """sum_u n_u * E_u(b_u)."""
    return float((numel.double() * error.double().gather(1, (bits - MIN_BITS)[:, None]).squeeze(1)).sum())
