"""``core.all_finite``: the finiteness guard every meta-step reads (φ, losses, an outer optimizer's
state).  It must say False for one NaN / +inf / −inf anywhere, in any floating dtype, at the
start, middle or end of a tensor of any length (vectorised reductions have tails), and True for
finite values, empty tensors, integer tensors and float64 values beyond float32's range."""
import math

import pytest
import torch

from reptile_fast.core import all_finite

DTYPES = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 16, 33, 1000, 70001])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf], ids=["nan", "inf", "-inf"])
def test_one_bad_value_anywhere_is_found(dtype, n, bad):
    g = torch.Generator().manual_seed(n)
    for pos in sorted({0, n // 2, n - 1}):
        t = torch.randn(n, generator=g).to(dtype)
        t[pos] = bad
        assert not bool(all_finite([torch.randn(3, generator=g), t])), f"{dtype} n={n} {bad} at {pos}"
        assert not bool(all_finite([t]))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_finite_values_pass(dtype):
    g = torch.Generator().manual_seed(0)
    tensors = [torch.randn(n, generator=g).to(dtype) * 1e3 for n in (1, 5, 300)]
    tensors += [torch.empty(0, dtype=dtype), torch.arange(4), torch.zeros(2, dtype=torch.bool)]
    assert bool(all_finite(tensors))


def test_mixed_dtypes_do_not_overflow_and_still_see_a_nan():
    big = torch.tensor([1e300], dtype=torch.float64)  # inf if it were read as float32
    assert bool(all_finite([torch.ones(2), big, torch.zeros((), dtype=torch.float16)]))
    assert not bool(all_finite([torch.ones(2), big, torch.tensor([math.nan], dtype=torch.float16)]))


def test_agrees_with_isfinite_on_random_patterns():
    g = torch.Generator().manual_seed(1)
    for _ in range(200):
        ts = [torch.randn(int(torch.randint(1, 50, (1,), generator=g)), generator=g) for _ in range(3)]
        for t in ts:
            if float(torch.rand((), generator=g)) < 0.2:
                t[int(torch.randint(0, t.numel(), (1,), generator=g))] = [math.nan, math.inf, -math.inf][
                    int(torch.randint(0, 3, (1,), generator=g))]
        expected = all(bool(torch.isfinite(t).all()) for t in ts)
        assert bool(all_finite(ts)) == expected
