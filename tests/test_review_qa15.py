"""QA15 review: defects found acting as the held-out checks of issues 2, 3, 6, 8 and 11 would.

Each test failed on the code before its fix (named in NOTES-qa15.md (folded into the README since; ``git show 2a9d83a:NOTES-qa15.md``))."""
import warnings

import pytest
import torch

from reptile_fast import MLP, ReferencePathWarning, Reptile, Sine, reptile
from reptile_fast import reference as R


def _params(model):
    return [p.detach().clone() for p in model.parameters()]


def test_resume_beyond_the_total_is_refused_before_anything_changes(tmp_path):
    """fit(resume_from=..., iterations below the checkpoint's meta-step) raised its ValueError
    after restoring the checkpoint: the trainer kept the checkpoint's φ and iteration and torch's
    global RNG had moved to the checkpoint's state, although the call failed."""
    done = Reptile(MLP(hidden_dim=8), backend="torch")
    done.fit(Sine(), 5, generator=torch.Generator().manual_seed(0), checkpoint_dir=tmp_path, progress=False)

    torch.manual_seed(123)
    trainer = Reptile(MLP(hidden_dim=8), backend="torch")
    before, rng = _params(trainer.model), torch.get_rng_state()
    with pytest.raises(ValueError, match=r"meta-step 5, beyond iterations=3"):
        trainer.fit(Sine(), 3, generator=torch.Generator(), resume_from=tmp_path, progress=False)
    assert trainer.iteration == 0
    assert all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    assert torch.equal(rng, torch.get_rng_state())
    # the same trainer then resumes with a valid total, as an untouched one would
    trainer.fit(Sine(), 7, generator=torch.Generator(), resume_from=tmp_path, progress=False)
    assert trainer.iteration == 7


def test_unknown_backend_error_lists_every_choice_reptile_takes():
    """Reptile(backend="xx") answered "choose one of ['reference', 'torch', 'triton', 'auto']",
    leaving out "compiled", which Reptile takes."""
    with pytest.raises(ValueError, match="unknown backend 'xx'") as info:
        Reptile(MLP(hidden_dim=8), backend="xx")
    for name in ("auto", "compiled", "reference", "torch", "triton"):
        assert repr(name) in str(info.value)
    assert Reptile(MLP(hidden_dim=8), backend="compiled").backend_name == "compiled"


def test_dropin_reference_path_stats_hold_the_documented_keys():
    """reptile()'s docstring lists ``tasks`` among the returned stats; the reference path (a
    custom inner loop) returned no ``tasks`` key (KeyError)."""
    def my_loop(model, task, k):
        return R.perform_k_training_steps(model, task, k)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferencePathWarning)
        stats = reptile(MLP(hidden_dim=8), 2, R.sample_task, my_loop, progress=False)
    fast = reptile(MLP(hidden_dim=8), 2, R.sample_task, None, backend="torch", progress=False)
    documented = {"path", "mode", "reason", "tasks", "inner_steps", "inner_batch_size", "compile_seconds",
                  "train_seconds", "ms_per_iteration", "loss"}
    assert documented <= set(stats), documented - set(stats)
    assert documented <= set(fast), documented - set(fast)
    assert stats["path"] == "reference" and fast["path"] == "torch"


def _dense_tasks():
    from reptile_fast import TaskBatch

    return TaskBatch(torch.randn(2, 12, 1), torch.randn(2, 12, 1))


@pytest.mark.parametrize("make, error, match", [
    (lambda x, y: (x.to_sparse(), y), TypeError, "TaskBatch.x must be a dense tensor"),
    (lambda x, y: (x, y.to_sparse()), TypeError, "TaskBatch.y must be a dense tensor"),
    (lambda x, y: (x.to_mkldnn(), y), TypeError, "TaskBatch.x must be a dense tensor"),
    (lambda x, y: (x.to("meta"), y.to("meta")), ValueError, "TaskBatch.x is on the meta device"),
    (lambda x, y: (x.to("meta"), torch.zeros(2, 12, dtype=torch.long, device="meta")), ValueError, "meta device"),
], ids=["sparse-x", "sparse-y", "mkldnn-x", "meta-both", "meta-labels"])
def test_taskbatch_of_sparse_or_meta_tensors_is_refused_by_name(make, error, match):
    """Sparse / mkldnn tensors failed inside torch (NotImplementedError "Could not run
    'aten::ne.Scalar' ... 'SparseCPU'"); x and y both on the meta device failed at the value read
    (RuntimeError "Tensor.item() cannot be called on meta tensors")."""
    from reptile_fast import TaskBatch

    t = _dense_tasks()
    with pytest.raises(error, match=match):
        TaskBatch(*make(t.x, t.y))


def test_sparse_plans_are_refused_by_name_on_every_entry_point():
    """A sparse plan failed inside torch (NotImplementedError "Could not run 'aten::min' ...
    'SparseCPU'") in meta_step, adapt, evaluate and the drop-in's ``indices=``; a meta plan in the
    drop-in at the value read."""
    from reptile_fast import sample_indices

    tasks = _dense_tasks()
    trainer = Reptile(MLP(hidden_dim=8), inner_steps=2, inner_batch_size=4)
    plan = sample_indices(2, 2, 12, 4, generator=torch.Generator().manual_seed(0))
    for call in (lambda: trainer.meta_step(tasks, plan.to_sparse()), lambda: trainer.adapt(tasks, 2, plan.to_sparse()),
                 lambda: trainer.evaluate(tasks, 2, plan.to_sparse())):
        with pytest.raises(TypeError, match="indices must be a dense tensor"):
            call()
    assert trainer.iteration == 0
    drop = sample_indices(2, 5, 50, 10, generator=torch.Generator().manual_seed(0)).reshape(2, 1, 5, 10)
    with pytest.raises(TypeError, match="indices must be a dense tensor"):
        reptile(MLP(hidden_dim=8), 2, R.sample_task, None, indices=drop.to_sparse(), progress=False)
    with pytest.raises(ValueError, match="indices are on the meta device"):
        reptile(MLP(hidden_dim=8), 2, R.sample_task, None, indices=drop.to("meta"), progress=False)


@pytest.mark.parametrize("layout", ["sparse-x", "mkldnn-x", "sparse-y"])
def test_dropin_sample_task_of_non_dense_tensors_is_named(layout):
    """The drop-in's mkldnn x failed inside torch ("Could not run 'aten::as_strided'"); a sparse one
    was named as a ``TaskBatch`` the seed script never built."""
    x, y = torch.linspace(-5, 5, 50), torch.sin(torch.linspace(-5, 5, 50))
    x = x.to_sparse() if layout == "sparse-x" else x.to_mkldnn() if layout == "mkldnn-x" else x
    y = y.to_sparse() if layout == "sparse-y" else y
    with pytest.raises(TypeError, match=r"sample_task\(\) \(call 1\): x and y must be dense tensors"):
        reptile(MLP(hidden_dim=8), 2, lambda: (x, y, torch.nn.MSELoss()), None, progress=False)


@pytest.mark.parametrize("value", ["no", 0, None])
def test_reference_reptile_progress_flag_is_checked(value):
    """README: a flag such as ``progress`` given as anything but True/False raises, for every
    public entry point.  ``reference.reptile(..., progress="no")`` showed the bar (a truthy string)."""
    model = R.MLP(hidden_dim=4)
    before = _params(model)
    with pytest.raises(TypeError, match="progress must be True or False"):
        R.reptile(model, 1, R.sample_task, R.perform_k_training_steps, progress=value)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


class _PointsVaryBetweenDraws:
    """A task family whose number of points changes from one ``sample`` call to the next."""

    def __init__(self):
        self.calls = 0

    def sample(self, n, *, generator=None, device=None):
        self.calls += 1
        return Sine(n_points=(50, 40, 12)[self.calls % 3]).sample(n, generator=generator, device=device)


def test_points_that_vary_within_a_compiled_chunk_are_named():
    """fit on backend "compiled" stacks a chunk's meta-step-by-meta-step draws; tasks whose number
    of points changes between meta-steps failed inside torch.cat ("Sizes of tensors must match
    except in dimension 0").  The eager backends take such a distribution one meta-step at a time."""
    trainer = Reptile(MLP(hidden_dim=8), backend="compiled", inner_steps=2, inner_batch_size=10)
    before = _params(trainer.model)
    with pytest.raises(ValueError, match=r"x \(2, 40, 1\).*x \(2, 12, 1\).*points and features must agree"):
        trainer.fit(_PointsVaryBetweenDraws(), 6, meta_batch_size=2, generator=torch.Generator().manual_seed(0),
                    progress=False)
    assert trainer.iteration == 0 and all(torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))
    eager = Reptile(MLP(hidden_dim=8), backend="torch", inner_steps=2, inner_batch_size=10)
    eager.fit(_PointsVaryBetweenDraws(), 6, meta_batch_size=2, generator=torch.Generator().manual_seed(0),
              progress=False)
    assert eager.iteration == 6


def test_native_cache_fallback_in_the_shared_temp_directory_must_be_private(tmp_path, monkeypatch):
    """When the cache directory is unusable, compiled programs went to ``$TMPDIR/reptile_fast-<uid>``
    whenever it was writable: a directory another user created first (world-writable, or theirs)
    was used, and the shared libraries in it are loaded into this process (their names are
    predictable)."""
    import os
    import tempfile

    from reptile_fast import native_build
    from reptile_fast.native_build import NativeCompilerError

    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(blocker / "cache"))  # under a file: unusable
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    shared = tmp_path / f"reptile_fast-{os.getuid()}"
    shared.mkdir()
    shared.chmod(0o777)  # planted: anyone may write into it
    with pytest.raises(NativeCompilerError, match="no writable cache directory"):
        native_build._usable_cache_dir()
    shared.chmod(0o700)
    assert native_build._usable_cache_dir() == shared
    if os.getuid() == 0:  # root can give it away: a directory owned by someone else
        os.chown(shared, 65534, 65534)
        with pytest.raises(NativeCompilerError):
            native_build._usable_cache_dir()
    shared.rmdir()
    assert native_build._usable_cache_dir() == shared and (shared.stat().st_mode & 0o777) == 0o700


class _IntegerOutput(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(1, 1)

    def forward(self, x):
        return self.layer(x).round().long()


class _DetachedOutput(_IntegerOutput):
    def forward(self, x):
        return self.layer(x).detach()


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("model_cls, error, match", [
    (_IntegerOutput, TypeError, "predictions; they must be floating point"),
    (_DetachedOutput, ValueError, "output does not depend on its parameters"),
], ids=["integer", "detached"])
def test_a_model_whose_output_has_no_gradient_is_refused(backend, model_cls, error, match):
    """A model whose predictions do not depend on its parameters: backend torch trained with zero
    gradients (the model never moved, no error), reference failed inside backward
    ("element 0 of tensors does not require grad")."""
    from reptile_fast import TaskBatch

    trainer = Reptile(model_cls(), backend=backend, inner_batch_size=5)
    with pytest.raises(error, match=match):
        trainer.meta_step(TaskBatch(torch.randn(2, 10, 1), torch.randn(2, 10, 1)))
    assert trainer.iteration == 0


def test_models_built_under_inference_mode_still_train():
    """The check above runs a forward with autograd on copies of the parameters: a model built
    (and trained) under the caller's inference_mode keeps working."""
    with torch.inference_mode():
        trainer = Reptile(MLP(hidden_dim=8), backend="torch")
        trainer.fit(Sine(), 2, generator=torch.Generator().manual_seed(0), progress=False)
    assert trainer.iteration == 2
