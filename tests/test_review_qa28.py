"""QA28's review of the session's change (git diff 712596e..HEAD): regressions and
inconsistencies between backends that the new checks introduced."""
import pytest
import torch

from reptile_fast import MLP, Sine, sample_indices
from reptile_fast.backends import InnerConfig, get_backend

BACKENDS = ["reference", "torch", "triton"]

# (what, how a good plan is spoilt, error, words of its message)
BAD_PLANS = [
    ("int32 plan", lambda p: p.int(), TypeError, "torch.long"),
    ("float plan", lambda p: p.float(), TypeError, "torch.long"),
    ("a list", lambda p: p.tolist(), TypeError, "torch.long"),
    ("sparse plan", lambda p: p.to_sparse(), TypeError, "dense"),
    ("no rows", lambda p: p[:, :0], ValueError, "rows >= 1"),
    ("2-D plan", lambda p: p[:, 0], ValueError, "rows >= 1"),
]


@pytest.mark.parametrize("name", BACKENDS)
@pytest.mark.parametrize("what, bad, error, words", BAD_PLANS, ids=[c[0] for c in BAD_PLANS])
def test_every_backend_refuses_a_bad_plan_with_the_same_error(name, what, bad, error, words):
    """``Backend.check_plan`` (this session) gave reference and torch a TypeError for a plan of
    another dtype and a ValueError for a plan of no rows; backend triton, called directly, raised
    ValueError for the dtype (a list, an int32 or a float plan) and ran a ``[T, 0, B]`` plan as
    zero inner steps — one input, three behaviours.  A sparse plan failed inside torch
    (NotImplementedError at the value read) on every backend."""
    tasks = Sine(n_points=8).sample(3, generator=torch.Generator().manual_seed(0))
    plan = sample_indices(3, 2, 8, 4, generator=torch.Generator().manual_seed(1))
    with pytest.raises(error, match="indices") as info:
        get_backend(name).inner_loop(MLP(hidden_dim=4), tasks, bad(plan), InnerConfig(lr=0.1))
    assert words in str(info.value)


def test_triton_still_checks_plan_values_and_runs_a_good_plan():
    """The shared structural check leaves backend triton's own value check (one host read, with
    the labels) in place, and a good plan runs as before (equal to the torch backend's loop)."""
    tasks = Sine(n_points=8).sample(2, generator=torch.Generator().manual_seed(0))
    plan = sample_indices(2, 2, 8, 4, generator=torch.Generator().manual_seed(1))
    model = MLP(hidden_dim=4)
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 8\)"):
        get_backend("triton").inner_loop(model, tasks, plan + 8, InnerConfig(lr=0.1))
    got = get_backend("triton").inner_loop(model, tasks, plan, InnerConfig(lr=0.1))
    want = get_backend("reference").inner_loop(model, tasks, plan, InnerConfig(lr=0.1))
    for n, p in want.params.items():
        torch.testing.assert_close(got.params[n], p, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("error", [PermissionError(13, "Permission denied", "/data/run/checkpoint.pt"),
                                   OSError(18, "Invalid cross-device link", "/a/.tmp", None, "/b/checkpoint.pt")])
def test_an_os_error_on_rank_0_keeps_the_file_it_names(error):
    """``distributed_fit`` reads the checkpoint and checks ``checkpoint_dir`` on rank 0 and raises
    its error on every rank.  This session re-raised an errno-carrying ``OSError`` as
    ``OSError(errno, strerror)``: the OS's own errors keep the path in ``filename``, not in the
    message, so ``[Errno 13] Permission denied: '/data/run/checkpoint.pt'`` reached the user as
    ``[Errno 13] Permission denied``, naming no file (before the session: ``str(exc)``, path
    included)."""
    from reptile_fast.distributed.context import DistContext
    from reptile_fast.distributed.training import _on_main

    def fail():
        raise error

    with pytest.raises(type(error)) as info:
        _on_main(DistContext.single(), fail, "a test read")
    assert str(info.value) == str(error)
    assert info.value.errno == error.errno and info.value.filename == error.filename


def test_a_library_os_error_on_rank_0_is_raised_as_it_was():
    """The library's own errors (``OSError(errno, message naming the path)``, no filename) and
    the other kinds keep their kind and message."""
    from reptile_fast.distributed.context import DistContext
    from reptile_fast.distributed.training import _on_main

    for error in (FileNotFoundError(2, "cannot create checkpoint_dir /x: No such file or directory"),
                  FileNotFoundError("checkpoint /x does not exist"), ValueError("bad checkpoint /x")):
        def fail():
            raise error
        with pytest.raises(type(error)) as info:
            _on_main(DistContext.single(), fail, "a test read")
        assert str(info.value) == str(error)
