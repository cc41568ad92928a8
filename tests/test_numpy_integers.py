"""Counts given as numpy integers (``np.arange``, ``np.int64`` read from an array, a sweep over
``np.logspace(...).astype(int)``) are taken as the Python ints they equal: same results, and
plain ints wherever they are stored (a numpy scalar in a checkpoint does not load under
``weights_only``).  Booleans stay refused: ``True`` is not a count."""
import numpy as np
import pytest
import torch

from reptile_fast import MLP, Reptile, Sine, sample_indices
from reptile_fast.checkpoint import load_checkpoint
from reptile_fast.jobs import SineConfig
from reptile_fast.models import OmniglotConvNet
from reptile_fast.validation import check_int


@pytest.mark.parametrize("value", [np.int64(3), np.int32(3), np.uint8(3), np.intp(3)])
def test_check_int_returns_a_python_int(value):
    out = check_int("n", value)
    assert type(out) is int and out == 3


@pytest.mark.parametrize("value, error", [(True, TypeError), (np.bool_(True), TypeError), (3.0, TypeError),
                                          (np.float32(3), TypeError), (torch.tensor(3), TypeError),
                                          (np.int64(0), ValueError)])
def test_check_int_still_refuses(value, error):
    with pytest.raises(error, match="n must be"):
        check_int("n", value)


def _fit(cast, tmp_path=None):
    torch.manual_seed(0)
    trainer = Reptile(MLP(), inner_steps=cast(2), inner_batch_size=cast(10), backend="torch")
    g = torch.Generator().manual_seed(1)
    kw = {}
    if tmp_path is not None:
        kw = dict(checkpoint_dir=tmp_path, checkpoint_every=cast(2))
    trainer.fit(Sine(), cast(4), meta_batch_size=cast(3), generator=g, log_every=cast(2), progress=False, **kw)
    return trainer


def test_fit_with_numpy_integers_equals_fit_with_ints(tmp_path):
    a = _fit(int)
    b = _fit(np.int64, tmp_path)
    for (n, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        assert torch.equal(p, q), n
    assert type(b.iteration) is int and type(b.total_iterations) is int
    # the checkpoint it wrote loads with weights_only (numpy scalars would be refused there)
    state = load_checkpoint(tmp_path)
    assert state["trainer"]["iteration"] == 4 and type(state["trainer"]["meta_batch_size"]) is int


def test_adapt_evaluate_and_sampling_take_numpy_integers():
    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch")
    g = torch.Generator().manual_seed(0)
    tasks = Sine().sample(np.int64(2), generator=g)
    assert tasks.n_tasks == 2
    r = trainer.adapt(tasks, np.int64(3), generator=torch.Generator().manual_seed(5))
    r_int = trainer.adapt(tasks, 3, generator=torch.Generator().manual_seed(5))
    assert r.losses.shape == (2, 3)
    assert torch.equal(r.losses, r_int.losses)
    e = trainer.evaluate(tasks, np.int64(0))
    assert e.shape == (2,)
    idx = sample_indices(np.int64(2), np.int64(3), np.int64(50), np.int64(10), generator=torch.Generator())
    assert idx.shape == (2, 3, 10)


def test_models_and_job_configs_store_python_ints():
    m = MLP(np.int64(1), np.int64(8), np.int64(1), depth=np.int64(2))
    assert [tuple(p.shape) for p in m.parameters()] == [(8, 1), (8,), (8, 8), (8,), (1, 8), (1,)]
    OmniglotConvNet(n_classes=np.int64(5), image_size=np.int64(28))
    cfg = SineConfig(iterations=np.int64(10), meta_batch_size=np.int32(2), seed=np.int64(3))
    assert all(type(getattr(cfg, k)) is int for k in ("iterations", "meta_batch_size", "seed"))

