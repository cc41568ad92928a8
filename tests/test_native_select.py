"""The plan's selection in C (``reptile_fast.native_select``): the same indices as ``topk``.

Exact comparisons only (indices are integers; keys are compared, never computed), so every test
asserts equality.
"""
import pytest
import torch

from reptile_fast import native_build, native_select, sample_indices

needs_cc = pytest.mark.skipif(native_build.find_compiler() is None, reason="no C compiler here")


@pytest.fixture(autouse=True)
def _fresh(tmp_path, monkeypatch):
    """Each test compiles into its own cache directory and starts with no loaded function."""
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(native_select, "_functions", {})


def _topk(keys, k):
    return keys.topk(k, dim=-1, largest=False, sorted=True).indices


@needs_cc
@pytest.mark.parametrize("shape,k", [((1, 1), 1), ((3, 7), 3), ((9, 50), 10), ((2, 5, 50), 10),
                                     ((6, 3, 50), 49), ((5, 20), 1), ((4, 100), 64), ((13, 64), 64)])
def test_equals_topk(shape, k):
    """Row counts that are not a multiple of the 4 lanes, k = 1, k = n − 1, k = MAX_K, batch dims."""
    keys = torch.rand(*shape, generator=torch.Generator().manual_seed(sum(shape) + k), dtype=torch.float64)
    got = native_select.smallest_k(keys, k)
    assert got is not None and got.dtype == torch.long and got.shape == (*shape[:-1], k)
    assert torch.equal(got, _topk(keys, k))


@needs_cc
def test_many_rows_equal_topk():
    keys = torch.rand(4099, 50, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert torch.equal(native_select.smallest_k(keys, 10), _topk(keys, 10))


@needs_cc
def test_equal_keys_come_lowest_index_first():
    keys = torch.tensor([[0.5, 0.1, 0.5, 0.1, 0.9, 0.5], [0.3] * 6], dtype=torch.float64)
    want = torch.argsort(keys, dim=-1, stable=True)[:, :4]
    assert torch.equal(native_select.smallest_k(keys, 4), want)


@needs_cc
def test_non_contiguous_keys():
    keys = torch.rand(50, 9, generator=torch.Generator().manual_seed(1), dtype=torch.float64).t()
    assert torch.equal(native_select.smallest_k(keys, 5), _topk(keys, 5))


def test_shapes_it_does_not_take_return_none():
    keys = torch.rand(3, 10, dtype=torch.float64)
    assert native_select.smallest_k(keys.float(), 2) is None
    assert native_select.smallest_k(keys, 0) is None
    assert native_select.smallest_k(keys, 11) is None
    wide = torch.rand(2, native_select.MAX_K + 5, dtype=torch.float64)
    assert native_select.smallest_k(wide, native_select.MAX_K + 1) is None


def test_without_a_compiler_sample_indices_uses_topk(monkeypatch):
    """No C compiler: ``smallest_k`` says None and ``sample_indices`` gives the same plan via topk."""
    want = sample_indices(20, 5, 50, 10, generator=torch.Generator().manual_seed(3))
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(native_select, "_functions", {})
    assert native_select.smallest_k(torch.rand(2, 50, dtype=torch.float64), 10) is None
    got = sample_indices(20, 5, 50, 10, generator=torch.Generator().manual_seed(3))
    assert torch.equal(got, want)


@needs_cc
def test_sample_indices_plan_is_topk_of_its_keys():
    """The plan is exactly the topk of the keys the generator gives (the draw the docs describe)."""
    g = torch.Generator().manual_seed(4)
    keys = torch.rand(33, 5, 50, generator=g, dtype=torch.float64)
    plan = sample_indices(33, 5, 50, 10, generator=torch.Generator().manual_seed(4))  # 165 rows: the C path
    assert torch.equal(plan, _topk(keys, 10))
    assert native_select._functions.get(10) is not None, "the C path was not used"
