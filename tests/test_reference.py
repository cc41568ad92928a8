"""reptile_fast.reference reproduces the seed; the reference backend's meta_step is one seed iteration."""
import copy

import pytest
import torch

from reptile_fast import Reptile, TaskBatch, reference


def replay_seed_draws(n_iterations, torch_seed, k=1, n=50, batch=10):
    """The tasks and randperm plans the seed's loop draws from the global RNG, in its order."""
    torch.manual_seed(torch_seed)
    tasks, plans = [], []
    for _ in range(n_iterations):
        x, y, _ = reference.sample_task()
        tasks.append(TaskBatch(x[None, :, None], y[None, :, None]))
        plans.append(torch.stack([torch.randperm(n)[:batch] for _ in range(k * n // batch)])[None])
    return tasks, plans


@pytest.mark.parametrize("k, epsilon", [(None, None), (2, 0.3)])
def test_matches_seed_program_bitwise(seed_module, k, epsilon):
    """The seed's defaults, and k / epsilon passed (a reference that ignored them would pass with
    the defaults alone)."""
    kwargs = {} if k is None else {"k": k, "epsilon": epsilon}
    torch.manual_seed(3)
    seed_model = seed_module.MLP()
    torch.manual_seed(3)
    ours = reference.MLP()
    assert seed_model.state_dict().keys() == ours.state_dict().keys()
    for a, b in zip(seed_model.parameters(), ours.parameters()):
        assert torch.equal(a, b)
    torch.manual_seed(11)
    seed_module.reptile(seed_model, 30, seed_module.sample_task, seed_module.perform_k_training_steps, **kwargs)
    torch.manual_seed(11)
    reference.reptile(ours, 30, reference.sample_task, reference.perform_k_training_steps, progress=False,
                      **kwargs)
    for (name, a), b in zip(seed_model.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name


def test_seed_sample_task_and_training_steps(seed_module):
    torch.manual_seed(5)
    xs, ys, _ = seed_module.sample_task()
    torch.manual_seed(5)
    xr, yr, loss = reference.sample_task()
    assert torch.equal(xs, xr) and torch.equal(ys, yr)
    assert isinstance(loss, torch.nn.MSELoss)


def test_meta_step_equals_seed_iterations():
    """Reptile(backend='reference').meta_step fed the seed's own draws, 20 iterations, k=1 and k=2."""
    for k in (1, 2):
        torch.manual_seed(1)
        model_seed = reference.MLP()
        model_ours = copy.deepcopy(model_seed)
        torch.manual_seed(42)
        reference.reptile(model_seed, 20, reference.sample_task,
                          lambda m, t, kk: reference.perform_k_training_steps(m, t, kk), k=k,
                          progress=False)
        tasks, plans = replay_seed_draws(20, 42, k=k)
        trainer = Reptile(model_ours, backend="reference", inner_steps=5 * k)
        for t, p in zip(tasks, plans):
            trainer.meta_step(t, p)
        for (name, a), b in zip(model_seed.named_parameters(), model_ours.parameters()):
            assert torch.equal(a, b), f"{name} differs (k={k})"


def test_reference_progress_bar_can_be_silenced(capsys):
    model = reference.MLP()
    reference.reptile(model, 2, reference.sample_task, reference.perform_k_training_steps, progress=False)
    assert "it/s" not in capsys.readouterr().err


def test_seed_script_runs_with_reference_imports(tmp_path):
    """A seed script with only its imports switched runs unchanged (shortened iteration count)."""
    script = tmp_path / "script.py"
    script.write_text(
        "import torch\n"
        "from reptile_fast.reference import MLP, reptile, sample_task, perform_k_training_steps\n"
        "model = MLP()\n"
        "reptile(model, 3, sample_task, perform_k_training_steps)\n"
        "new_task = sample_task()\n"
        "perform_k_training_steps(model, new_task, 32)\n"
        "print('ok')\n"
    )
    import subprocess
    import sys

    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("ok")
