"""QA22's review of the reference, the drop-in and the few-shot protocol (issues 2, 8 and 13)."""
from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F

import reptile_fast
from _fake_omniglot import make_folder
from reptile_fast import MiniImageNetConvNet, reference
from reptile_fast.cli import build_parser, main
from reptile_fast.dropin import ReferencePathWarning
from reptile_fast.fewshot_job import OmniglotConfig, config_from_args


# ---------------------------------------------------------------------- reference vs the seed program
def test_reference_is_the_seed_program_at_other_settings(seed_module):
    """Another width, k, epsilon, task size and minibatch size: reference.reptile (and its MLP)
    end bitwise where the seed's program does, and leave the global RNG in the same state."""
    def task(module):
        def sample_task():  # 23 points: k·N // batch = 2·23 // 7 = 6 steps of randperm(23)[:7]
            x, y, loss = module.sample_task()
            return x[:23], y[:23], loss
        return sample_task

    runs = []
    for module in (seed_module, reference):
        torch.manual_seed(2)
        model = module.MLP(1, 17, 1)
        inner = lambda m, t, k, f=module.perform_k_training_steps: f(m, t, k, batch_size=7)  # noqa: E731
        torch.manual_seed(9)
        kwargs = {} if module is seed_module else {"progress": False}
        module.reptile(model, 4, task(module), inner, 2, 0.37, **kwargs)
        runs.append((model, torch.get_rng_state()))
    (seed_model, seed_rng), (ours, our_rng) = runs
    for (name, a), b in zip(seed_model.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(seed_rng, our_rng)


# ---------------------------------------------------------------------- drop-in: frozen parameters
def _frozen_mlp():
    torch.manual_seed(0)
    model = reference.MLP(1, 8, 1)
    model.network[2].bias.requires_grad_(False)
    return model


def test_dropin_runs_a_frozen_parameter_model_as_the_seed_does(seed_module):
    """The seed's loop runs a model with a frozen parameter (torch.optim skips it, so it stays as it
    was); the drop-in raised the trainer's "model has frozen parameters" ValueError for the seed's
    own call.  It now runs the seed's loop (one ReferencePathWarning naming the parameter): the
    parameters and the global RNG state end bitwise where the seed's program leaves them."""
    seed_model, ours = _frozen_mlp(), _frozen_mlp()
    frozen_before = seed_model.network[2].bias.detach().clone()
    torch.manual_seed(4)
    seed_module.reptile(seed_model, 3, seed_module.sample_task, seed_module.perform_k_training_steps, 2, 0.3)
    seed_rng = torch.get_rng_state()
    torch.manual_seed(4)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        stats = reptile_fast.reptile(ours, 3, seed_module.sample_task, seed_module.perform_k_training_steps, 2, 0.3,
                                     progress=False)
    assert stats["path"] == "reference"
    messages = [str(w.message) for w in record if issubclass(w.category, ReferencePathWarning)]
    assert len(messages) == 1 and "network.2.bias" in messages[0] and "frozen" in messages[0]
    for (name, a), b in zip(seed_model.named_parameters(), ours.parameters()):
        assert torch.equal(a, b), name
    assert torch.equal(ours.network[2].bias, frozen_before)  # left as it was, as the seed leaves it
    assert torch.equal(torch.get_rng_state(), seed_rng)


def test_dropin_frozen_parameters_with_meta_batch_and_explicit_backend():
    """Any backend named, and meta-batches: the reference loop (the trainer would refuse the model)."""
    model = _frozen_mlp()
    frozen = model.network[2].bias.detach().clone()
    with pytest.warns(ReferencePathWarning, match="frozen"):
        stats = reptile_fast.reptile(model, 2, reference.sample_task, None, meta_batch_size=3, backend="torch",
                                     progress=False)
    assert stats["path"] == "reference" and stats["meta_batch_size"] == 3
    assert torch.equal(model.network[2].bias, frozen)
    assert not torch.equal(model.network[0].weight, _frozen_mlp().network[0].weight)


# ---------------------------------------------------------------------- Mini-ImageNet net
def test_miniimagenet_default_net_is_the_official_function():
    """The official MiniImageNetModel is conv → BatchNorm (batch statistics) → max-pool ('same') →
    ReLU per block.  The docstring and README said ``pool_first=True`` (conv → pool → BN → ReLU)
    was that order; it is another function.  The default net computes the official one."""
    torch.manual_seed(0)
    net = MiniImageNetConvNet(3, channels=4, image_size=21, n_blocks=2).train()
    x = torch.rand(5, 3, 21, 21, dtype=torch.float64)
    net = net.double()
    convs = [m for m in net.features if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in net.features if isinstance(m, torch.nn.BatchNorm2d)]
    h = x
    for conv, norm in zip(convs, norms):
        h = F.conv2d(h, conv.weight, conv.bias, padding=1)
        h = F.batch_norm(h, None, None, norm.weight, norm.bias, training=True, eps=norm.eps)
        h = F.max_pool2d(h, 2, ceil_mode=True)   # TF 'same' pooling: the last window is cut, not padded
        h = F.relu(h)
    official = F.linear(h.flatten(1), net.classifier.weight, net.classifier.bias)
    torch.testing.assert_close(net(x), official, rtol=1e-12, atol=1e-12)
    assert "conv → BatchNorm → max-pool → ReLU" in MiniImageNetConvNet.__doc__
    torch.manual_seed(0)
    other = MiniImageNetConvNet(3, channels=4, image_size=21, n_blocks=2, pool_first=True).double().train()
    with torch.no_grad():
        for a, b in zip(other.parameters(), net.parameters()):  # conv, BatchNorm, ..., classifier
            a.copy_(b)
    assert not torch.allclose(other(x), official)


# ---------------------------------------------------------------------- few-shot job: the test protocol
def test_omniglot_job_tests_on_the_official_number_of_episodes():
    """The official code scores 10000 test episodes (``--eval-samples``, which none of the paper's
    commands lowers); the job's default was 1000 while the README called its defaults the paper's."""
    assert OmniglotConfig(train=["x"], test="y").eval_tasks == 10000
    parser = build_parser()
    for ways in ("5", "20"):
        config, _, _ = config_from_args(parser.parse_args(["omniglot", "--train", "x", "--test", "y", "--ways", ways]))
        assert (config.eval_tasks, config.query_shots, config.eval_steps, config.transductive) == (10000, 1, 50, False)


def test_omniglot_job_draws_its_test_episodes_in_blocks(tmp_path, monkeypatch, capsys):
    """10000 episodes at once were 3.8 GB of images at 20-way 5-shot (and twice that for the 1-NN
    distances): the job draws and scores them a block at a time, every episode counted."""
    import reptile_fast.fewshot_job as job
    from reptile_fast.tasks import Omniglot

    sizes = []
    original = Omniglot.sample_episodes

    def spy(self, n_tasks, **kwargs):
        sizes.append(n_tasks)
        return original(self, n_tasks, **kwargs)

    monkeypatch.setattr(job, "EVAL_BLOCK", 2)
    monkeypatch.setattr(Omniglot, "sample_episodes", spy)
    train = make_folder(tmp_path / "a", {"Alpha": 3, "Beta": 2}, prefix="small1")
    test = make_folder(tmp_path / "b", {"Gamma": 3}, prefix="small2")
    out = tmp_path / "run"
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
                 "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
                 "--eval-batch-size", "2", "--eval-tasks", "5", "--validate-every", "0", "--iterations", "1",
                 "--threads", "1", "--no-progress", "--out", str(out)]) == 0
    capsys.readouterr()
    assert sizes == [2, 2, 1]
    result = json.loads((out / "metrics.json").read_text())["results"][0]
    assert result["n_tasks"] == 5 and 0.0 <= result["nearest_neighbour_accuracy"] <= 1.0


def test_dropin_refuses_a_model_with_every_parameter_frozen():
    """The seed's loop fails inside loss.backward() on such a model; the drop-in names it."""
    model = reference.MLP(1, 4, 1).requires_grad_(False)
    with pytest.raises(ValueError, match="every model parameter is frozen"):
        reptile_fast.reptile(model, 2, reference.sample_task, reference.perform_k_training_steps, progress=False)


@pytest.mark.parametrize("flags, named, not_named", [
    # training set too small for --train-shots: it said "tasks need shots + --query-shots = 5"
    (["--train-shots", "5"], ["training tasks from --train", "--train-shots 5", "need shots = 5"], ["--query-shots"]),
    (["--train-shots", "1", "--inner-batch-size", "2", "--shots", "1", "4"],
     ["4-shot test tasks from --test", "--shots 4", "--query-shots 1", "4 + 1 = 5"], ["training tasks"]),
    (["--ways", "4", "--train-shots", "1", "--inner-batch-size", "2"],
     ["test tasks from --test's held-out alphabets", "--ways 4", "give 3"], ["training tasks"]),
])
def test_omniglot_job_says_which_task_set_is_too_small(tmp_path, capsys, flags, named, not_named):
    train = make_folder(tmp_path / "a", {"Alpha": 3, "Beta": 2}, prefix="small1")  # 4 images per character
    test = make_folder(tmp_path / "b", {"Gamma": 3}, prefix="small2")
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--iterations", "1",
                 "--eval-tasks", "1", "--validate-every", "0", "--threads", "1", "--no-progress",
                 "--out", str(tmp_path / "run"), *flags]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert all(w in err for w in named) and not any(w in err for w in not_named), err
