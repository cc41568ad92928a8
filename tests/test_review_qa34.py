"""qa34's review of the session's changes: auto's per-call plan move (``Reptile._follow_plan``)
against fit, drawn plans and a new ``inner_batch_size``; the jobs' empty-folder cleanup."""
import pytest
import torch

pytest.importorskip("triton")

from reptile_fast import Sine, sample_indices  # noqa: E402
from reptile_fast.backends.torch_func import TorchBackend  # noqa: E402
from reptile_fast.backends.triton import TritonBackend  # noqa: E402
from reptile_fast.kernels.mlp_meta_step_v2 import MAX_BATCH_V2  # noqa: E402
from test_backend_triton_v2 import _auto_v2_trainers  # noqa: E402

BIG = MAX_BATCH_V2 + 1


def _moved_to_torch(trainer, gen):
    """Adapt with a plan beyond v2's limit: auto runs it (and, until a plan v2 takes, the next
    calls) on backend torch."""
    tasks = Sine(n_points=40).sample(2, generator=gen)
    trainer.adapt(tasks, 1, sample_indices(2, 1, tasks.n_points, BIG, generator=gen))
    assert isinstance(trainer.backend, TorchBackend)


def test_drawn_plans_and_fit_bring_auto_back_to_v2(monkeypatch):
    """A drawn plan (``meta_step``/``adapt`` without indices: inner_batch_size points) and ``fit``'s
    plans are plans v2 takes: each brings the trainer back to its own backend (they ran on torch
    until a user-given plan did, e.g. after one evaluation with a large plan every later fit)."""
    model, twin, trainer, ref = _auto_v2_trainers("cpu", monkeypatch)
    home = trainer.backend
    gen = torch.Generator().manual_seed(1)
    _moved_to_torch(trainer, gen)
    trainer.meta_step(Sine(n_points=40).sample(2, generator=gen), generator=gen)
    assert trainer.backend is home
    _moved_to_torch(trainer, gen)
    trainer.adapt(Sine(n_points=40).sample(2, generator=gen), 1, generator=gen)
    assert trainer.backend is home
    _moved_to_torch(trainer, gen)
    trainer.fit(Sine(n_points=20), trainer.iteration + 1, meta_batch_size=1, generator=gen, progress=False)
    assert trainer.backend is home and trainer.last_fit_stats["stepper"] != "torch"


def test_new_inner_batch_size_while_a_plan_ran_elsewhere(monkeypatch):
    """inner_batch_size set beyond v2's limit while a plan had moved auto to torch: a plan of that
    size must stay on torch (it went back to kernel v2, which refused it)."""
    model, twin, trainer, ref = _auto_v2_trainers("cpu", monkeypatch)
    gen = torch.Generator().manual_seed(1)
    _moved_to_torch(trainer, gen)
    trainer.inner_batch_size = BIG
    tasks = Sine(n_points=40).sample(2, generator=gen)
    indices = sample_indices(2, 2, tasks.n_points, BIG, generator=gen)
    trainer.meta_step(tasks, indices)
    ref.meta_step(tasks, indices)
    assert isinstance(trainer.backend, TorchBackend)
    for a, b in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-5, atol=1e-6)


def test_cleanup_keeps_a_folder_reached_through_a_missing_one(tmp_path, monkeypatch):
    """``--out new/../mine``, ``new`` missing and ``mine`` the user's (empty) folder: a failed job
    removed ``mine`` (the literal path did not exist at entry, so it counted as made by the job)."""
    from reptile_fast.checkpoint import prepare_directory, removed_if_left_empty

    monkeypatch.chdir(tmp_path)
    (tmp_path / "mine").mkdir()
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    for out in ["new/../mine", "link/x/y", "n1/n2", "mine", "."]:
        with pytest.raises(ValueError, match="a mistyped flag"):
            with removed_if_left_empty(out):
                prepare_directory(out, "output directory")
                raise ValueError("a mistyped flag")
        assert (tmp_path / "mine").is_dir() and (tmp_path / "link").is_symlink(), out
        assert not (tmp_path / "n1").exists() and list((tmp_path / "real").iterdir()) == [], out


def test_taskbatch_takes_a_0dim_numpy_integer_array():
    """``tasks[np.asarray(2)]`` selects task 2 like ``tasks[np.int64(2)]`` and ``tasks[torch.tensor(2)]``
    (it was an IndexError "must select one or more tasks"); a 0-dim bool array stays refused."""
    np = pytest.importorskip("numpy")
    tasks = Sine(n_points=5).sample(4, generator=torch.Generator().manual_seed(0))
    for i in (2, -1):
        for index in (np.asarray(i), np.asarray(i, dtype=np.int32), np.asarray(i, dtype=np.int64)[()]):
            got = tasks[index]
            assert got.n_tasks == 1 and torch.equal(got.x, tasks[i].x) and torch.equal(got.y, tasks[i].y)
    with pytest.raises(IndexError, match="out of range for 4 tasks"):
        tasks[np.asarray(4)]
    with pytest.raises(IndexError):
        tasks[np.asarray(True)]


def test_official_runs_of_other_ways_leave_no_empty_out(tmp_path, monkeypatch):
    """``omniglot-runs`` with runs of another number of ways than the model's: the error came after
    the cleanup's block, so the --out it had made stayed behind, empty."""
    from _fake_omniglot import make_runs
    from reptile_fast import fewshot_job
    from reptile_fast.fewshot_job import OmniglotConfig, run_omniglot_runs

    five_way = OmniglotConfig(train=["-"], test="-", ways=5)
    monkeypatch.setattr(fewshot_job, "load_trained", lambda model_dir: (five_way, None))
    runs = make_runs(tmp_path / "data", n_runs=1, ways=3)
    out = tmp_path / "new" / "out"
    with pytest.raises(ValueError, match="trained for 5-way tasks"):
        run_omniglot_runs(runs, tmp_path / "model", out)
    assert not (tmp_path / "new").exists()
