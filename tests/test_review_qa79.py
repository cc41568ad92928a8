"""QA79: the drop-in against the seed program's reptile(), run side by side.

* A ``sample_task`` that runs out (``lambda: next(it)`` over too few tasks) raises StopIteration
  from the seed's loop, after training on the tasks it had; the reference path raised
  ``RuntimeError: generator raised StopIteration`` (its lazy task draw was a generator).
* The reference path's progress bar showed ``loss=nan`` (the user's loop reports no loss): a run
  that reads as diverged.
* ``nb_iterations`` / ``k`` as 0-dim integer tensors: the seed's ``range()`` takes them (as its
  arithmetic takes a 0-dim tensor ε, which the drop-in accepts); the drop-in refused them.
"""
import copy
import warnings

import pytest
import torch

import reptile_fast
from reptile_fast import reference
from reptile_fast.dropin import ReferencePathWarning


def _custom(model, task, k):
    return reference.perform_k_training_steps(model, task, k)


def _finite(tasks):
    it = iter(tasks)
    return lambda: next(it)


def test_a_sample_task_that_runs_out_raises_stop_iteration_after_the_tasks_it_had():
    torch.manual_seed(0)
    tasks = [reference.sample_task() for _ in range(3)]
    model_seed = reference.MLP()
    model_drop = copy.deepcopy(model_seed)
    torch.manual_seed(1)
    with pytest.raises(StopIteration):  # the seed's loop (reference.reptile is its text)
        reference.reptile(model_seed, 5, _finite(tasks), _custom, progress=False)
    torch.manual_seed(1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferencePathWarning)
        with pytest.raises(StopIteration):
            reptile_fast.reptile(model_drop, 5, _finite(tasks), _custom, progress=False)
    for a, b in zip(model_seed.parameters(), model_drop.parameters()):
        assert torch.equal(a, b)  # trained on the three tasks, as the seed's loop


def test_a_stop_iteration_inside_a_meta_batch_is_not_a_shorter_meta_batch():
    """Five tasks for meta-batches of 2: the third meta-step's second draw raises, rather than the
    meta-step averaging over the one task it had."""
    torch.manual_seed(0)
    tasks = [reference.sample_task() for _ in range(5)]
    model = reference.MLP()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferencePathWarning)
        with pytest.raises(StopIteration):
            reptile_fast.reptile(model, 3, _finite(tasks), _custom, meta_batch_size=2, progress=False)


def test_the_reference_path_progress_bar_shows_no_loss(capsys):
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ReferencePathWarning)
        reptile_fast.reptile(reference.MLP(), 3, reference.sample_task, _custom, progress=True)
    err = capsys.readouterr().err
    assert "3/3" in err and "loss=" not in err


@pytest.mark.parametrize("name", ["nb_iterations", "k"])
def test_zero_dim_integer_tensor_counts_are_accepted_as_the_seed_accepts_them(name):
    torch.manual_seed(0)
    model_int, args = reference.MLP(), {"nb_iterations": 3, "k": 2}
    model_tensor = copy.deepcopy(model_int)
    torch.manual_seed(1)
    reptile_fast.reptile(model_int, sample_task=reference.sample_task, progress=False, **args)
    torch.manual_seed(1)
    args[name] = torch.tensor(args[name])
    reptile_fast.reptile(model_tensor, sample_task=reference.sample_task, progress=False, **args)
    for a, b in zip(model_int.parameters(), model_tensor.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("value, error", [(torch.tensor(2.0), TypeError), (torch.tensor(True), TypeError),
                                          (torch.tensor([2]), TypeError), (torch.tensor(-1), ValueError)])
def test_other_tensor_counts_are_still_refused(value, error):
    with pytest.raises(error, match="nb_iterations"):
        reptile_fast.reptile(reference.MLP(), value, reference.sample_task, progress=False)


# ---------------------------------------------------------------------- a loss that is not the plain one
def _zero_grad_hook(loss_fct):
    loss_fct.register_full_backward_hook(lambda module, grad_in, grad_out: (torch.zeros_like(grad_in[0]), None))


def _forward_of_its_own(loss_fct):
    loss_fct.forward = lambda output, target: 0.0 * ((output - target) ** 2).sum()


def _seed_draws(n, seed):
    torch.manual_seed(seed)
    tasks, plans = [], []
    for _ in range(n):
        tasks.append(reference.sample_task())
        plans.append(torch.stack([torch.randperm(50)[:10] for _ in range(5)]))
    return tasks, torch.stack(plans)


@pytest.mark.parametrize("change", [_zero_grad_hook, _forward_of_its_own], ids=["backward-hook", "instance-forward"])
def test_an_mse_loss_module_that_computes_something_else_runs_the_seeds_loop(change):
    """nn.MSELoss() with a backward hook on it (zeroing the gradient), or a forward set on the
    instance: the seed's loop runs them, so the model does not move. The fast paths took both for
    the plain MSE and trained (the compiled path's model moved)."""
    def sample_task():
        x, y, loss_fct = reference.sample_task()
        change(loss_fct)
        return x, y, loss_fct

    torch.manual_seed(0)
    model_seed = reference.MLP()
    model_drop = copy.deepcopy(model_seed)
    before = [p.detach().clone() for p in model_seed.parameters()]
    torch.manual_seed(1)
    reference.reptile(model_seed, 3, sample_task, reference.perform_k_training_steps, progress=False)
    torch.manual_seed(1)
    with pytest.warns(ReferencePathWarning, match="no hooks"):
        stats = reptile_fast.reptile(model_drop, 3, sample_task, reference.perform_k_training_steps, progress=False)
    assert stats["path"] == "reference"
    for a, b, c in zip(model_seed.parameters(), model_drop.parameters(), before):
        assert torch.equal(a, b) and torch.equal(a, c)


def test_global_module_hooks_make_an_mse_loss_module_the_users_own():
    """A global forward hook scaling every MSELoss's output (lr × 0 here): the seed's loop runs it
    on the loss too; the torch backend (picked because global hooks rule out compiled) computed
    F.mse_loss without it."""
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda module, inputs, output: output * 0.0 if isinstance(module, torch.nn.MSELoss) else None)
    try:
        tasks, _ = _seed_draws(3, 1)
        torch.manual_seed(0)
        model = reference.MLP()
        before = [p.detach().clone() for p in model.parameters()]
        with pytest.warns(ReferencePathWarning, match="no hooks"):
            stats = reptile_fast.reptile(model, 3, _finite(tasks), reference.perform_k_training_steps,
                                         progress=False)
    finally:
        hook.remove()
    assert stats["path"] == "reference"
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert reptile_fast.losses.loss_name(torch.nn.MSELoss()) == "mse"  # hook removed: the plain loss again
