"""Review of "for any nn.Module": backends reference and torch on models beyond plain MLPs.

Each test is a defect found by swapping backends on one model family: a silent disagreement,
a crash deep inside torch, a model changed behind the user's back, or state left changed.
"""
import copy

import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile, TaskBatch, sample_indices
from reptile_fast.backends import UnsupportedModelError

RTOL, ATOL = 1e-5, 1e-6


def reg_tasks(T, in_shape, out, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, N, *in_shape, generator=g), torch.randn(T, N, out, generator=g))


def modes(model):
    return [(n, m.training) for n, m in model.named_modules()]


def test_meta_step_keeps_each_submodule_mode():
    """A train-mode model with a BatchNorm frozen in eval mode keeps that mix after a meta-step
    (the input probe used to call ``model.train(True)``, switching the BatchNorm to batch statistics)."""
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 2))
        model[1].eval()
        before = modes(model)
        trainer = Reptile(model, backend=backend, inner_steps=2, inner_batch_size=5)
        tasks = reg_tasks(2, (4,), 2)
        trainer.meta_step(tasks, generator=torch.Generator().manual_seed(0))
        trainer.evaluate(tasks, 1, generator=torch.Generator().manual_seed(1))
        assert modes(model) == before, backend


class _Recurrent(nn.Module):
    def __init__(self, cls):
        super().__init__()
        self.rnn, self.out = cls(3, 5, batch_first=True), nn.Linear(5, 2)

    def forward(self, x):
        return self.out(self.rnn(x)[0][:, -1])


def _bn_cumulative():
    return nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6, momentum=None), nn.Tanh(), nn.Linear(6, 2))


def test_a_model_vmap_cannot_run_is_refused_and_auto_falls_back():
    """BatchNorm's cumulative average (momentum=None) in training mode reads its batch count as a
    float, which torch.func.vmap cannot: backend "torch" refuses it by name (it used to crash inside
    vmap at the first meta-step) and "auto" runs it on "reference"."""
    torch.manual_seed(0)
    model = _bn_cumulative()
    with pytest.raises(UnsupportedModelError, match="reference"):
        Reptile(copy.deepcopy(model), backend="torch")
    auto = Reptile(copy.deepcopy(model), backend="auto", inner_steps=2, inner_batch_size=5)
    assert auto.backend.name == "reference"
    tasks = reg_tasks(2, (4,), 2)
    auto.meta_step(tasks, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(auto.evaluate(tasks, 1, generator=torch.Generator().manual_seed(1))).all()


@pytest.mark.parametrize("cls", [nn.GRU, nn.LSTM, nn.RNN], ids=["gru", "lstm", "rnn"])
def test_recurrent_models_train_and_evaluate_on_backend_torch(cls):
    """Recurrent layers run under vmap(grad(...)) (they decompose into batchable ops), but their
    gradient-free forward is one fused op without a batching rule: evaluate crashed inside vmap.
    It now takes those losses one task at a time; fit, adapt and evaluate agree with reference."""
    torch.manual_seed(0)
    base = _Recurrent(cls)
    tasks = reg_tasks(3, (4, 3), 2)
    got = {}
    for backend in ("reference", "torch"):
        model = copy.deepcopy(base)
        trainer = Reptile(model, backend=backend, inner_steps=2, inner_batch_size=5)
        trainer.meta_step(tasks, generator=torch.Generator().manual_seed(0))
        got[backend] = (torch.cat([p.detach().reshape(-1) for p in model.parameters()]),
                        trainer.evaluate(tasks, 2, generator=torch.Generator().manual_seed(1)),
                        trainer.evaluate(tasks, 0))
    for a, b in zip(got["torch"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


class _Counter(nn.Module):
    """A Linear whose forward counts its training calls in a buffer."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        if self.training:
            self.calls.add_(1)
        return self.lin(x)


def test_buffers_of_the_meta_model_are_untouched_on_every_backend():
    """Buffers are not meta-learned: the model's own stay as they were on every backend (the
    MLP recogniser's fx trace used to run the forward on the real buffers, and then took the
    hand-written MLP path for a model that has state)."""
    tasks = reg_tasks(2, (4,), 2)
    plan = sample_indices(2, 2, 20, 5, generator=torch.Generator().manual_seed(0))
    params = {}
    for backend in ("reference", "torch"):
        torch.manual_seed(0)
        model = _Counter()
        trainer = Reptile(model, backend=backend, inner_steps=2, inner_batch_size=5)
        trainer.meta_step(tasks, plan)
        assert model.calls.item() == 0, backend
        params[backend] = {n: p.detach().clone() for n, p in model.named_parameters()}
    for n in params["reference"]:
        torch.testing.assert_close(params["torch"][n], params["reference"][n], rtol=RTOL, atol=ATOL)


class _ModeDependent(nn.Module):
    """Python control flow on ``self.training``: tanh in training mode, relu in eval mode."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 2)

    def forward(self, x):
        h = self.a(x)
        return self.b(torch.tanh(h) if self.training else torch.relu(h))


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_forward_depending_on_train_mode_follows_a_mode_switch(backend):
    """The MLP recogniser traces one branch of a mode-dependent forward; after ``model.eval()``
    the fast paths must follow the other branch, as the reference does (they kept the traced one)."""
    tasks = reg_tasks(2, (3,), 2)
    out = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = _ModeDependent()
        trainer = Reptile(model, backend=name, inner_steps=3, inner_batch_size=5)
        trainer.meta_step(tasks, generator=torch.Generator().manual_seed(0))
        model.eval()
        trainer.meta_step(tasks, generator=torch.Generator().manual_seed(1))
        out[name] = ([p.detach().clone() for p in model.parameters()],
                     trainer.evaluate(tasks, 2, generator=torch.Generator().manual_seed(2)))
    for got, ref in zip(out[backend][0], out["reference"][0]):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out[backend][1], out["reference"][1], rtol=RTOL, atol=ATOL)


def test_few_shot_evaluation_restores_each_submodule_mode():
    """``evaluate_episodes`` runs the model in train mode and puts back each submodule's own mode
    (it used to restore only the top module's, with ``model.train(was_training)``)."""
    from reptile_fast import OmniglotConvNet
    from reptile_fast.fewshot import evaluate_episodes
    from reptile_fast.tasks import Episodes

    torch.manual_seed(0)
    model = OmniglotConvNet(3, channels=4, image_size=8, n_blocks=2)
    model.features[1].eval()  # one BatchNorm frozen on its running statistics
    before = modes(model)
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(3).repeat_interleave(2).expand(2, -1).contiguous()
    ep = Episodes(TaskBatch(torch.rand(2, 6, 1, 8, 8, generator=g), ys),
                  TaskBatch(torch.rand(2, 6, 1, 8, 8, generator=g), ys), 3)
    trainer = Reptile(model, inner_steps=2, inner_batch_size=3, loss="cross_entropy")
    evaluate_episodes(trainer, ep, steps=2, batch_size=3, generator=torch.Generator().manual_seed(1))
    assert modes(model) == before


def test_a_vmap_refusal_after_construction_is_a_clear_error():
    """BatchNorm(momentum=None) in eval mode runs on backend "torch"; switched to train mode
    afterwards, the meta-step raises UnsupportedModelError (a ValueError) naming the way out."""
    torch.manual_seed(0)
    model = _bn_cumulative().eval()
    trainer = Reptile(model, backend="torch", inner_steps=2, inner_batch_size=5)
    tasks = reg_tasks(2, (4,), 2)
    trainer.meta_step(tasks, generator=torch.Generator().manual_seed(0))
    model.train()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(UnsupportedModelError, match="reference"):
        trainer.meta_step(tasks, generator=torch.Generator().manual_seed(1))
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_bare_linear_is_a_one_layer_mlp_on_the_fast_paths(backend):
    """``nn.Linear`` itself (not wrapped in a Sequential) is the simplest MLP; the recogniser
    traced its own forward (F.linear on get_attr nodes) and refused it, so backend compiled
    failed with "not a single chain" and torch fell back to its generic vmap path."""
    tasks = reg_tasks(3, (4,), 2)
    out = {}
    for name in ("reference", backend):
        torch.manual_seed(0)
        model = nn.Linear(4, 2)
        trainer = Reptile(model, backend=name, inner_steps=3, inner_batch_size=5)
        for s in range(2):
            trainer.meta_step(tasks, generator=torch.Generator().manual_seed(s))
        out[name] = ([p.detach().clone() for p in model.parameters()],
                     trainer.evaluate(tasks, 2, generator=torch.Generator().manual_seed(5)))
    for got, ref in zip(out[backend][0], out["reference"][0]):
        torch.testing.assert_close(got, ref, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out[backend][1], out["reference"][1], rtol=RTOL, atol=ATOL)
