"""Bit allocation against brute force on small random instances."""

import itertools

import pytest
import torch

from stquant_megatron.allocation import allocate, total_error


def _instance(seed: int):
    gen = torch.Generator().manual_seed(seed)
    u = int(torch.randint(1, 5, (), generator=gen))
    n = torch.randint(1, 100, (u,), generator=gen).double()
    base = torch.rand(u, 1, generator=gen) * torch.rand(u, 1, generator=gen) * 10
    err = base * torch.pow(4.0, -torch.arange(7.0))[None] * (1 + 0.3 * torch.rand(u, 7, generator=gen))
    err = torch.cummin(err, 1).values  # error curves non-increasing in bits
    avg = float(2.3 + 6 * torch.rand((), generator=gen))
    return n, err, avg


def _brute_force(n, err, budget):
    best = None
    for combo in itertools.product(range(2, 9), repeat=len(n)):
        c = torch.tensor(combo)
        if float((n * c).sum()) <= budget + 1e-9:
            t = total_error(n, err, c)
            if best is None or t < best:
                best = t
    return best


@pytest.mark.parametrize("seed", range(120))
def test_allocate_within_one_step_of_optimum(seed):
    n, err, avg = _instance(seed)
    bits = allocate(n, err, avg_bits=avg, scale_bits=0.25)
    budget = (avg - 0.25) * float(n.sum())
    best = _brute_force(n, err, budget)
    if best is None:  # infeasible even at 2 bits: everything at the narrowest width
        assert (bits == 2).all()
        return
    assert float((n * bits).sum()) <= budget + 1e-9, "budget violated"
    # "within one unit-level step": the gap is at most the largest single-step error drop of one unit
    one_step = max(float(n[u] * (err[u, b] - err[u, b + 1])) for u in range(len(n)) for b in range(6))
    assert total_error(n, err, bits) - best <= one_step + 1e-9


def test_allocate_ties_are_deterministic():
    n = torch.full((6,), 10.0)
    err = torch.pow(4.0, -torch.arange(7.0)).expand(6, 7).clone()  # identical units
    a = allocate(n, err, avg_bits=4.75, scale_bits=0.25)
    b = allocate(n.clone(), err.clone(), avg_bits=4.75, scale_bits=0.25)
    assert torch.equal(a, b)
    assert float((n * a).sum()) <= 4.5 * 60 + 1e-9
    # ties go to the lowest unit index: widths are non-increasing along the units
    assert all(int(x) >= int(y) for x, y in zip(a, a[1:]))


def test_allocate_error_cap_wins_over_budget():
    n = torch.tensor([100.0, 100.0])
    err = torch.tensor([[1.0, 0.5, 0.2, 0.05, 0.01, 0.001, 0.0001], [1e-4] * 7])
    bits = allocate(n, err, avg_bits=2.25, scale_bits=0.25, max_error=0.06)
    assert int(bits[0]) == 5  # first width with E <= 0.06, even though the budget says 2
    assert int(bits[1]) == 2


def test_allocate_respects_bounds_and_rejects_bad_shapes():
    n = torch.tensor([10.0, 10.0])
    err = torch.pow(4.0, -torch.arange(7.0)).expand(2, 7).clone()
    bits = allocate(n, err, avg_bits=8.25, scale_bits=0.25, upper=torch.tensor([5, 6]), lower=torch.tensor([3, 3]))
    assert bits.tolist() == [5, 6]
    with pytest.raises(ValueError, match="error \\[U, 7\\]"):
        allocate(n, err[:, :5], avg_bits=4.0)
