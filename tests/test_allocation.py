"""Bit allocation against brute force on small random instances: budgets (one rank and per rank),
error caps and move bounds."""

import itertools

import pytest
import torch

from stquant_megatron.allocation import CAP_PENALTY, allocate, total_error


def _instance(seed: int, ranks: int = 1):
    gen = torch.Generator().manual_seed(seed)
    u = int(torch.randint(1, 5, (), generator=gen))
    n = torch.randint(1, 100, (u,), generator=gen).double()
    base = torch.rand(u, 1, generator=gen) * torch.rand(u, 1, generator=gen) * 10
    err = base * torch.pow(4.0, -torch.arange(7.0))[None] * (1 + 0.3 * torch.rand(u, 7, generator=gen))
    err = torch.cummin(err, 1).values  # error curves non-increasing in bits
    avg = float(2.3 + 6 * torch.rand((), generator=gen))
    if ranks == 1:
        return n, err, avg, None
    # each unit split over the ranks in random proportions (some ranks hold none of it)
    share = torch.rand(ranks, u, generator=gen) * (torch.rand(ranks, u, generator=gen) > 0.3)
    share[0] += (share.sum(0) == 0).double()
    rank_numel = (share / share.sum(0)) * n[None, :]
    return n, err, avg, rank_numel


def _fits(bits, rank_numel, n, avg, s=0.25):
    a = n[None, :] if rank_numel is None else rank_numel
    return bool(((a @ bits.double()) <= (avg - s) * a.sum(1) + 1e-9).all())


def _brute_force(n, err, avg, rank_numel, cap=float("inf"), lower=None, upper=None, capped_lo=None):
    """Best plan: the least error among plans that fit and meet every cap (``b >= capped_lo``: a cap
    no allowed width meets counts as met at the widest); if none does, the least error with the
    same penalty for errors above the cap."""
    lo = [2] * len(n) if lower is None else lower.tolist()
    hi = [8] * len(n) if upper is None else upper.tolist()
    best_capped = best_pen = None
    pen = err + CAP_PENALTY * (err - cap).clamp_min(0)
    for combo in itertools.product(*[range(a, b + 1) for a, b in zip(lo, hi)]):
        c = torch.tensor(combo)
        if not _fits(c, rank_numel, n, avg):
            continue
        t = total_error(n, err, c)
        if capped_lo is None or bool((c >= capped_lo).all()):
            best_capped = t if best_capped is None else min(best_capped, t)
        tp = total_error(n, pen, c)
        best_pen = tp if best_pen is None else min(best_pen, tp)
    return best_capped, best_pen


def _one_step(n, err):
    """The largest single-step error drop of one unit: the discrete answer's allowed gap."""
    return max(float(n[u] * (err[u, b] - err[u, b + 1])) for u in range(len(n)) for b in range(6))


@pytest.mark.parametrize("seed", range(120))
def test_allocate_within_one_step_of_optimum(seed):
    n, err, avg, _ = _instance(seed)
    bits = allocate(n, err, avg_bits=avg, scale_bits=0.25)
    _, best = _brute_force(n, err, avg, None)
    if best is None:  # infeasible even at 2 bits: everything at the narrowest width
        assert (bits == 2).all()
        return
    assert _fits(bits, None, n, avg), "budget violated"
    assert total_error(n, err, bits) - best <= _one_step(n, err) + 1e-9


@pytest.mark.parametrize("seed", range(60))
def test_allocate_with_caps_bounds_and_per_rank_budgets(seed):
    """Per-rank budgets are never exceeded; move bounds hold; the caps are met whenever some plan
    meets them all within the budget; the error is within two single-step drops of brute force."""
    gen = torch.Generator().manual_seed(1000 + seed)
    n, err, avg, rank_numel = _instance(seed, ranks=int(torch.randint(1, 4, (), generator=gen)))
    cap = float(err[:, 2].median()) if seed % 2 else float("inf")
    cur = torch.randint(2, 9, (len(n),), generator=gen)
    while not _fits((cur - 2).clamp(2, 8), rank_numel, n, avg):  # lower bounds alone over budget:
        cur = (cur - 1).clamp(2, 8)  # narrow the current plan until they fit (all at 2 always fits)
    lower, upper = (cur - 2).clamp(2, 8), (cur + 2).clamp(2, 8)
    assert _fits(lower, rank_numel, n, avg)
    bits = allocate(n, err, avg_bits=avg, scale_bits=0.25, max_error=cap, lower=lower, upper=upper,
                    rank_numel=rank_numel)  # fmt: skip
    assert _fits(bits, rank_numel, n, avg), ("over budget", bits)
    assert bool(((bits >= lower) & (bits <= upper)).all()), (bits, lower, upper)
    capped_lo = torch.minimum(torch.maximum(lower, torch.tensor([
        next((b for b in range(2, 9) if float(err[u, b - 2]) <= cap), 8) for u in range(len(n))
    ])), upper)  # fmt: skip
    best_capped, best_pen = _brute_force(n, err, avg, rank_numel, cap, lower, upper, capped_lo)
    if _fits(capped_lo, rank_numel, n, avg):  # the cheapest all-caps plan fits: every cap must hold
        assert bool((bits >= capped_lo).all()), (bits, capped_lo)
        assert total_error(n, err, bits) - best_capped <= 2 * _one_step(n, err) + 1e-9
    else:
        pen = err + CAP_PENALTY * (err - cap).clamp_min(0)
        assert total_error(n, pen, bits) - best_pen <= 2 * _one_step(n, pen) + 1e-9


def test_allocate_ties_are_deterministic():
    n = torch.full((6,), 10.0)
    err = torch.pow(4.0, -torch.arange(7.0)).expand(6, 7).clone()  # identical units
    a = allocate(n, err, avg_bits=4.75, scale_bits=0.25)
    b = allocate(n.clone(), err.clone(), avg_bits=4.75, scale_bits=0.25)
    assert torch.equal(a, b)
    assert float((n * a).sum()) <= 4.5 * 60 + 1e-9
    # ties go to the lowest unit index: widths are non-increasing along the units
    assert all(int(x) >= int(y) for x, y in zip(a, a[1:]))


def test_allocate_error_cap_is_met_where_the_budget_allows_and_never_breaks_it():
    n = torch.tensor([100.0, 100.0])
    err = torch.tensor([[1.0, 0.5, 0.2, 0.05, 0.01, 0.001, 0.0001], [1e-4] * 7])
    bits = allocate(n, err, avg_bits=4.0, scale_bits=0.25, max_error=0.06)
    assert bits.tolist() == [5, 2]  # 5 is the first width with E <= 0.06; 3.5 code bits fit in 3.75
    bits = allocate(n, err, avg_bits=2.25, scale_bits=0.25, max_error=0.06)
    assert bits.tolist() == [2, 2]  # the cap cannot be met within 2 code bits: the budget wins
    bits = allocate(n, err, avg_bits=3.25, scale_bits=0.25, max_error=0.06)
    assert float((n * bits).sum()) <= 3.0 * 200 and int(bits[0]) == 4  # as close to the cap as fits


def test_allocate_per_rank_budget_binds_on_the_fullest_rank():
    # unit 0 lives on rank 0 only, unit 1 on rank 1 only; unit 0 is far more sensitive. A global
    # budget gives unit 0 more bits than unit 1; per rank each must stay within 4.75 code bits.
    n = torch.tensor([100.0, 100.0])
    err = torch.stack([torch.pow(4.0, -torch.arange(7.0)) * 100, torch.pow(4.0, -torch.arange(7.0))])
    rank_numel = torch.tensor([[100.0, 0.0], [0.0, 100.0]])
    assert allocate(n, err, avg_bits=5.0, scale_bits=0.25).tolist() == [6, 3]
    assert allocate(n, err, avg_bits=5.0, scale_bits=0.25, rank_numel=rank_numel).tolist() == [4, 4]


def test_allocate_respects_bounds_and_rejects_bad_shapes():
    n = torch.tensor([10.0, 10.0])
    err = torch.pow(4.0, -torch.arange(7.0)).expand(2, 7).clone()
    bits = allocate(n, err, avg_bits=8.25, scale_bits=0.25, upper=torch.tensor([5, 6]), lower=torch.tensor([3, 3]))
    assert bits.tolist() == [5, 6]
    with pytest.raises(ValueError, match="error \\[U, 7\\]"):
        allocate(n, err[:, :5], avg_bits=4.0)
    with pytest.raises(ValueError, match="rank_numel"):
        allocate(n, err, avg_bits=4.0, rank_numel=torch.ones(2, 3))
