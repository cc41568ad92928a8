"""QA88 (session 26): an audit of the library's error paths beyond the fuzz sweep's table.

* ``reptile_fast`` and ``kernels`` hold no ``assert`` statement (nothing vanishes under ``python -O``).
* ``distributed.stream_seed`` took anything: a numpy seed failed with "Python int too large to
  convert to C long", a float with "unsupported operand type(s) for &", and a negative meta-step
  or block, or a block beyond ``n_blocks``, gave the seed of another stream of the run.
* ``distributed.local_mean`` (the one-process reducer) checked nothing: losses of other tasks
  than the deltas were averaged silently, no task gave NaN, integer tensors failed inside torch.
  The reducers refused a meta-batch of no task nowhere (NaN mean).
* ``checkpoint.restore_checkpoint`` failed with KeyError 'trainer' for a dict source without one,
  and it, ``restore_rng_state`` and ``capture_rng_state`` failed with an AttributeError for a
  generator that is not a ``torch.Generator`` or a trainer that is not a ``Reptile``.
* ``save_checkpoint`` stored ``extra={1: "a", "1": "b"}`` as ``{"1": "b"}``: an entry lost.
* ``Sine.grid(device=)`` and ``meta_step_guard.new_state(device)`` raised torch's RuntimeError
  listing every device type for an unknown name; ``accept_step`` took a sparse loss into the
  launch (NotImplementedError under the interpreter).
"""
import ast
import pathlib

import numpy as np
import pytest
import torch

from reptile_fast import MLP, Reptile, Sine, load_checkpoint, save_checkpoint
from reptile_fast.checkpoint import capture_rng_state, restore_checkpoint, restore_rng_state
from reptile_fast.distributed import DistContext, MeanReducer, OrderedGather, local_mean, stream_seed

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_the_library_holds_no_assert_statement():
    """An assert vanishes under ``python -O``: every check of input is a raise."""
    found = []
    for folder in ("reptile_fast", "kernels"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            tree = ast.parse(path.read_text())
            found += [f"{path.relative_to(ROOT)}:{node.lineno}" for node in ast.walk(tree)
                      if isinstance(node, ast.Assert)]
    assert not found, found


# ---------------------------------------------------------------------- stream_seed
def test_stream_seed_takes_numpy_integers():
    assert stream_seed(np.int64(3), np.int64(5), np.int32(1), n_blocks=np.int64(4)) == stream_seed(3, 5, 1, n_blocks=4)
    assert type(stream_seed(np.int64(3), 0, 0)) is int


@pytest.mark.parametrize("kw, name", [
    ({"seed": 1.5}, "seed"), ({"seed": None}, "seed"), ({"seed": "3"}, "seed"), ({"seed": True}, "seed"),
    ({"iteration": 2.5}, "iteration"), ({"block": 0.0}, "block"), ({"n_blocks": 2.0}, "n_blocks"),
    ({"streams": True}, "streams"), ({"streams": 1.0}, "streams")])
def test_stream_seed_names_an_argument_of_the_wrong_type(kw, name):
    args = dict(seed=0, iteration=0, block=0)
    args.update(kw)
    with pytest.raises(TypeError, match=name):
        stream_seed(args.pop("seed"), args.pop("iteration"), args.pop("block"), **args)


@pytest.mark.parametrize("kw, name", [
    ({"seed": -1}, "seed"), ({"seed": 2 ** 64}, "seed"), ({"iteration": -1}, "iteration"), ({"block": -3}, "block"),
    ({"n_blocks": 0}, "n_blocks"), ({"n_blocks": -2}, "n_blocks"), ({"block": 5, "n_blocks": 5}, "block"),
    ({"streams": 3}, "streams")])
def test_stream_seed_refuses_a_value_that_names_no_stream_of_the_run(kw, name):
    args = dict(seed=0, iteration=0, block=0)
    args.update(kw)
    with pytest.raises(ValueError, match=name):
        stream_seed(args.pop("seed"), args.pop("iteration"), args.pop("block"), **args)


def test_a_block_beyond_n_blocks_was_another_meta_steps_stream():
    """The premise of the block < n_blocks check: stream k = t·n_blocks + b."""
    from reptile_fast.distributed.sampler import _stream_seed

    assert _stream_seed(0, 0, 5, n_blocks=5) == _stream_seed(0, 1, 0, n_blocks=5)


# ---------------------------------------------------------------------- local_mean and the reducers
def _d(t=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(t, 4, generator=g), torch.randn(t, generator=g)], torch.randn(t, 2, generator=g)


def test_local_mean_still_means_over_the_tasks():
    deltas, losses = _d()
    means, loss = local_mean(deltas, losses)
    assert all(torch.equal(m, d.mean(0)) for m, d in zip(means, deltas))
    assert torch.equal(loss, losses.mean())


@pytest.mark.parametrize("label", ["losses-1d", "losses-list", "losses-int", "tasks-mismatch", "no-task",
                                   "deltas-int", "deltas-tensor", "deltas-None", "deltas-empty"])
@pytest.mark.parametrize("reducer", ["local_mean", "MeanReducer", "OrderedGather"])
def test_a_reducer_refuses_what_is_not_one_meta_steps_updates(label, reducer):
    deltas, losses = _d()
    if label == "losses-1d":
        losses = losses[:, 0]
    elif label == "losses-list":
        losses = losses.tolist()
    elif label == "losses-int":
        losses = losses.long()
    elif label == "tasks-mismatch":
        deltas = [d[:2] for d in deltas]
    elif label == "no-task":
        deltas, losses = [d[:0] for d in deltas], losses[:0]
    elif label == "deltas-int":
        deltas = [deltas[0].long(), deltas[1]]
    elif label == "deltas-tensor":
        deltas = deltas[0]
    elif label == "deltas-None":
        deltas = None
    elif label == "deltas-empty":
        deltas = []
    fn = {"local_mean": local_mean, "MeanReducer": MeanReducer(DistContext.single()),
          "OrderedGather": OrderedGather(DistContext.single())}[reducer]
    with pytest.raises((ValueError, TypeError), match="deltas|losses"):
        fn(deltas, losses)


def test_training_with_the_public_local_mean_as_reducer_is_unchanged():
    """The stepper's default reducer is core.local_mean, unchecked: the public one checks, and
    gives the same numbers."""
    from reptile_fast import core

    deltas, losses = _d()
    a, b = local_mean(deltas, losses), core.local_mean(deltas, losses)
    assert all(torch.equal(x, y) for x, y in zip(a[0], b[0])) and torch.equal(a[1], b[1])


# ---------------------------------------------------------------------- checkpoints
def _trainer():
    torch.manual_seed(0)
    return Reptile(MLP(1, 8, 1), backend="torch")


def test_restore_checkpoint_names_a_dict_source_without_a_trainer(tmp_path):
    tr = _trainer()
    save_checkpoint(tmp_path, tr)
    ck = load_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="my dict has no 'trainer'"):
        restore_checkpoint(_trainer(), {k: v for k, v in ck.items() if k != "trainer"}, name="my dict")
    assert restore_checkpoint(_trainer(), ck)["trainer"]["iteration"] == 0


def test_restore_checkpoint_names_a_trainer_that_is_not_a_reptile(tmp_path):
    save_checkpoint(tmp_path, _trainer())
    for bad in ("x", MLP(1, 8, 1), None):
        with pytest.raises(TypeError, match="trainer"):
            restore_checkpoint(bad, tmp_path)


def test_the_rng_functions_name_a_generator_that_is_not_one(tmp_path):
    with pytest.raises(TypeError, match="generator"):
        capture_rng_state("g")
    g = torch.Generator().manual_seed(0)
    save_checkpoint(tmp_path, _trainer(), generator=g)
    ck = load_checkpoint(tmp_path)
    with pytest.raises(TypeError, match="generator"):
        restore_rng_state(ck["rng"], "g")
    with pytest.raises(TypeError, match="generator"):
        restore_checkpoint(_trainer(), tmp_path, generator=0)
    restore_checkpoint(_trainer(), tmp_path, generator=torch.Generator())  # a real one still restores


def test_save_checkpoint_refuses_keys_that_are_one_as_strings(tmp_path):
    """Keys are stored as strings: {1: "a", "1": "b"} came back as {"1": "b"}."""
    with pytest.raises(ValueError, match="extra"):
        save_checkpoint(tmp_path, _trainer(), extra={1: "a", "1": "b"})
    with pytest.raises(ValueError, match="history"):
        save_checkpoint(tmp_path, _trainer(), history={1: [1.0], "1": [2.0]})
    assert not (tmp_path / "checkpoint.pt").exists()
    save_checkpoint(tmp_path, _trainer(), extra={1: "a"})
    assert load_checkpoint(tmp_path)["extra"] == {"1": "a"}
    tr = _trainer()  # fit refuses them before its first meta-step, not at its first save
    with pytest.raises(ValueError, match="checkpoint_extra"):
        tr.fit(Sine(), 2, meta_batch_size=1, checkpoint_dir=tmp_path / "run", checkpoint_every=1,
               checkpoint_extra={1: "a", "1": "b"}, progress=False)
    assert tr.iteration == 0


# ---------------------------------------------------------------------- devices, the guard kernel
def test_sine_grid_names_an_unknown_device():
    with pytest.raises(ValueError, match="device"):
        Sine().grid(device="gpu")
    assert torch.equal(Sine().grid(device="cpu"), Sine().grid())


def test_the_guard_state_names_an_unknown_device():
    pytest.importorskip("triton")
    from reptile_fast.kernels import meta_step_guard as G

    with pytest.raises(ValueError, match="device"):
        G.new_state("gpu")
    assert G.new_state("cpu").tolist() == [1, 0]


def test_accept_step_refuses_a_sparse_loss():
    pytest.importorskip("triton")
    from reptile_fast.kernels import meta_step_guard as G
    from reptile_fast.kernels import mlp_inner_loop as K

    if not K.INTERPRETED:
        pytest.skip("CPU tensors: the guard runs under TRITON_INTERPRET=1")
    phi = torch.zeros(5)
    with pytest.raises(TypeError, match="loss"):
        G.accept_step(phi, torch.ones(5), torch.ones(1).to_sparse(), G.new_state("cpu"),
                      torch.ones(1, dtype=torch.long), torch.zeros(1))
    assert torch.equal(phi, torch.zeros(5))
