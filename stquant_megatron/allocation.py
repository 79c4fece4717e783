"""Bit allocation: choose a width per unit to minimise the total measured error under a budget.

Problem (see ``docs/scheduler.md`` for the derivation)::

    minimise    sum_u n_u * E_u(b_u)
    subject to  sum_u n_ru * (b_u + s) <= B * sum_u n_ru     for every rank r,   b_u in [lower_u, upper_u]
                E_u(b_u) <= max_error                         wherever the budget allows it

with ``n_ru`` the elements of unit u that rank r holds (``n_u = sum_r n_ru``), ``s`` the scale bits
per element and ``B`` the budget (``avg_bits``). The budget is a hard bound on every rank's state
(users size each GPU's memory by it); with one rank it is the global budget. The error cap is
honoured for every unit when the cheapest capped plan fits; otherwise units above the cap are
penalised so that the allocation spends the budget on meeting it first.

With one constraint the problem is separable and the Lagrangian relaxation decomposes per unit:
for a multiplier ``lam`` every unit picks ``argmin_b E_u(b) + lam * b``; bisection finds the
smallest feasible ``lam``. Per-rank constraints are then met by a repair pass (on the rank most
over its budget, narrow the unit that adds the least error per bit freed there), and a greedy pass
spends what is left on the best upgrades per bit that fit on every rank. On convex error curves and
one rank this is within one width step of one unit of the exact optimum. Cost: O(U * W * 60) for the
bisection plus O(R * U) per repair or upgrade step.

Formats: a unit may also be offered a factored option (``factored_error`` / ``factored_bits``), the
level below ``min_bits``: width 0, no codes and no scales, but row and column statistics that every
rank holding part of the unit keeps whole. The same three passes run over per-unit option costs (code
bits per element held, plus bits per holding rank); without factored options every number is as before.

Everything here is a pure, deterministic function of its inputs (ties broken by unit index), so
every rank that runs it on the same all-reduced numbers gets the same answer.
"""

from __future__ import annotations

import torch

MIN_BITS, MAX_BITS = 2, 8
CAP_PENALTY = 1e6
"""Added (times the excess over the cap) to errors above ``max_error`` when not every cap fits."""


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
    rank_numel: torch.Tensor | None = None,
    factored_error: torch.Tensor | None = None,
    factored_bits: torch.Tensor | None = None,
    iterations: int = 60,
) -> torch.Tensor:
    """Widths per unit (0: factored).

    Args:
        numel: int/float ``[U]`` elements per unit (> 0).
        error: float ``[U, 7]``: E_u(b) for b = 2..8 (non-increasing in b is expected, not required).
        avg_bits: budget in bits per element, scale bits included; never exceeded on any rank
            unless the lower bounds alone exceed it (then the lower bounds are returned).
        min_bits / max_bits: allowed widths.
        max_error: per-unit error cap, met wherever the budget allows it.
        scale_bits: scale overhead per element (32 / block_size for fp32 scales).
        lower / upper: optional int ``[U]`` per-unit width bounds (e.g. at most ``max_move`` levels
            from the current width; 0 = factored, the level below ``min_bits``); they win over the
            budget and the cap.
        rank_numel: optional ``[R, U]`` elements of each unit held by each rank; the budget then
            holds on every rank. Default: one rank holding everything.
        factored_error / factored_bits: optional ``[U]``: a unit may also be factored (width 0: no
            codes, no scales), with error ``factored_error[u]`` (inf: not allowed) and
            ``factored_bits[u]`` bits of statistics on every rank that holds part of it.

    Returns:
        int64 ``[U]`` widths.
    """
    if numel.ndim != 1 or error.shape != (numel.numel(), MAX_BITS - MIN_BITS + 1):
        raise ValueError(f"numel [U] and error [U, 7] expected; got {tuple(numel.shape)} and {tuple(error.shape)}")
    if not MIN_BITS <= min_bits <= max_bits <= MAX_BITS:
        raise ValueError(f"need {MIN_BITS} <= min_bits={min_bits} <= max_bits={max_bits} <= {MAX_BITS}")
    if (factored_error is None) != (factored_bits is None):
        raise ValueError("give factored_error and factored_bits together")
    n = numel.to(torch.float64)
    u_count = n.numel()
    a = n[None, :] if rank_numel is None else rank_numel.to(torch.float64)
    if a.ndim != 2 or a.shape[1] != u_count:
        raise ValueError(f"rank_numel [R, U={u_count}] expected; got {tuple(a.shape)}")
    packed = torch.arange(min_bits, max_bits + 1, dtype=torch.float64)  # [W]
    e = error.to(torch.float64)[:, min_bits - MIN_BITS : max_bits - MIN_BITS + 1].clone()  # [U, W]
    # Options per unit (columns): [factored,] min_bits..max_bits. Costs: ``cw`` code bits per element
    # held, ``cf`` bits per rank holding part of the unit (the factored statistics).
    cw = packed.expand(u_count, -1).clone()
    cf = torch.zeros_like(cw)
    f = 0
    if factored_error is not None:
        f = 1
        fb = factored_bits.to(torch.float64)
        fe = torch.where(torch.isfinite(fb) & (fb >= 0), factored_error.to(torch.float64), torch.inf)
        e = torch.cat([fe[:, None], e], 1)
        cw = torch.cat([torch.full((u_count, 1), -scale_bits, dtype=torch.float64), cw], 1)  # no scales either
        cf = torch.cat([torch.nan_to_num(fb, nan=0.0, posinf=0.0).clamp_min(0)[:, None], cf], 1)
    opt_bits = torch.cat([torch.zeros(f, dtype=torch.float64), packed])  # [O]
    nopt = opt_bits.numel()
    h = (a > 0).to(torch.float64)  # [R, U] ranks holding part of each unit
    held, holders = a.sum(0).clamp_min(1e-300), h.sum(0)
    # global bits per element of each option (for packed widths: the width)
    c = cw + cf * (holders / held)[:, None] if f else cw
    col = torch.arange(nopt)[None, :]

    def to_col(bits: torch.Tensor) -> torch.Tensor:
        b = bits.long()
        return torch.where(b < min_bits, torch.zeros_like(b), b - min_bits + f).clamp(0, nopt - 1)

    lo_col = torch.zeros(u_count, dtype=torch.long) if lower is None else to_col(lower)
    hi_col = torch.full_like(lo_col, nopt - 1) if upper is None else to_col(upper)
    lo_col = torch.minimum(lo_col, hi_col)
    budget = (avg_bits - scale_bits) * a.sum(1)  # [R] code bits available per rank

    def pick_cost(cost: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return cost.gather(1, idx[:, None]).squeeze(1)

    def used(idx: torch.Tensor) -> torch.Tensor:  # [R] code bits per rank
        out = a @ pick_cost(cw, idx)
        return out + h @ pick_cost(cf, idx) if f else out

    def rank_cost(r: int, idx: torch.Tensor) -> torch.Tensor:  # [U] bits of each unit on rank r
        out = a[r] * pick_cost(cw, idx)
        return out + h[r] * pick_cost(cf, idx) if f else out

    def fits(idx: torch.Tensor) -> bool:
        return bool((used(idx) <= budget + 1e-9 * budget.abs().clamp_min(1)).all())

    # The error cap: the narrowest width meeting it, if that plan fits everywhere; else a penalty.
    ok = (e <= max_error) & torch.isfinite(e)  # an infinite error (option not offered) never meets it
    first_ok = torch.where(ok.any(1), ok.to(torch.int8).argmax(1), torch.full_like(lo_col, nopt - 1))
    capped = torch.minimum(torch.maximum(lo_col, first_ok), hi_col)
    if fits(capped):
        lo_col = capped
    else:
        e = e + CAP_PENALTY * torch.where(torch.isfinite(e), e - max_error, 0.0).clamp_min(0)
    forbidden = (col < lo_col[:, None]) | (col > hi_col[:, None])
    e = torch.where(forbidden, torch.inf, e)
    # the cheapest allowed plan (the lower bounds, unless factored statistics cost more than a width)
    cheapest = torch.where(forbidden | torch.isinf(e), torch.inf, c).argmin(1) if f else lo_col
    if not fits(cheapest):  # the bounds alone break the budget: nothing better is allowed
        return opt_bits[cheapest].long()

    # 1. Lagrangian relaxation on the global budget.
    def pick(lam: float) -> torch.Tensor:
        return (e + lam * c).argmin(1)  # first minimum: ties go to the narrower width

    total_budget = float(budget.sum())
    lo, hi = 0.0, 1.0
    while float(used(pick(hi)).sum()) > total_budget and hi < 1e30:
        hi *= 4.0
    if float(used(pick(0.0)).sum()) <= total_budget:
        idx = pick(0.0)
    else:
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            if float(used(pick(mid)).sum()) > total_budget:
                lo = mid
            else:
                hi = mid
        idx = pick(hi)
    idx = torch.maximum(idx, lo_col).clone()

    # 2. Repair: while a rank is over its budget, move (by one level) the unit that adds the least
    # error per code bit freed on that rank: one level narrower, or for a factored unit whose
    # statistics cost more there than the narrowest width, one level up.
    # A move must not raise any rank's overage: the summed overage then falls at every move, so the loop
    # ends (a factored unit's statistics cost on every rank holding part of it, so without this rule two
    # ranks could undo each other's moves forever: observed with MoE, EP=2, exp_avg_sq_format="auto").
    # With one rank the rule is the plain "frees bits on it". Stuck over budget: the cheapest plan (it fits).
    def all_costs(idx: torch.Tensor) -> torch.Tensor:  # [R, U] bits of each unit on each rank
        out = a * pick_cost(cw, idx)[None, :]
        return out + h * pick_cost(cf, idx)[None, :] if f else out

    tol = 1e-9 * budget.abs().clamp_min(1)
    now = used(idx)
    while bool((now - budget > tol).any()):
        r = int((now - budget).argmax())
        over_now = (now - budget).clamp_min(0)
        base = all_costs(idx)
        scores, moves = [], []
        for step in (-1, 1):  # narrower first: ties go to narrowing, then to the lowest unit index
            to = torch.minimum(torch.maximum(idx + step, lo_col), hi_col)
            delta = all_costs(to) - base  # [R, U]
            freed = -delta[r]
            raises = ((now[:, None] + delta - budget[:, None]).clamp_min(0) > over_now[:, None] + tol[:, None]).any(0)
            can = (to != idx) & (a[r] > 0) & (freed > 0) & ~raises
            loss = (e.gather(1, to[:, None]) - e.gather(1, idx[:, None])).squeeze(1) * n
            scores.append(torch.where(can, loss / freed.clamp_min(1e-300), torch.inf))
            moves.append(to)
        score = torch.cat(scores)
        k = int(score.argmin())
        if score[k] == torch.inf:
            idx = cheapest.clone()
            break
        u = k % u_count
        idx[u] = moves[k // u_count][u]
        now = used(idx)

    # 3. Greedy fill: spend what is left on single-step upgrades, best gain per bit first, each only
    # if it fits on every rank. Passes repeat while one upgraded something.
    left = budget - used(idx)
    while True:
        nxt = torch.minimum(idx + 1, hi_col)
        gain = (e.gather(1, idx[:, None]) - e.gather(1, nxt[:, None])).squeeze(1) * n
        step_bits = pick_cost(c, nxt) - pick_cost(c, idx)
        ratio = torch.where((nxt > idx) & (gain > 0), gain / (n * step_bits).clamp_min(1e-300), -torch.inf)
        order = sorted(range(u_count), key=lambda u: (-float(ratio[u]), u))  # ties: lowest unit index
        changed = False
        for u in order:
            if ratio[u] == -torch.inf:
                break
            cost = a[:, u] * (cw[u, nxt[u]] - cw[u, idx[u]])
            if f:
                cost = cost + h[:, u] * (cf[u, nxt[u]] - cf[u, idx[u]])
            if bool((cost <= left + 1e-9).all()):
                left -= cost
                idx[u] += 1
                changed = True
        if not changed:
            break
    return opt_bits[idx].long()


def total_error(numel: torch.Tensor, error: torch.Tensor, bits: torch.Tensor) -> float:
    """sum_u n_u * E_u(b_u) (packed widths only)."""
    return float((numel.double() * error.double().gather(1, (bits - MIN_BITS)[:, None]).squeeze(1)).sum())
