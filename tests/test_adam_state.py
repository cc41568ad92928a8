"""``adam_state="carried"``: one inner Adam state carried from task to task and meta-step to
meta-step, as the official supervised-reptile code keeps one optimizer for all its inner loops.

The oracle restates that structure with no reptile_fast code: one model and ONE
``torch.optim.Adam`` for every inner loop; each task starts by copying φ into the model's
parameters (the optimizer's moments and step count stay); the outer step is φ + ε·mean(φ̃ − φ);
adaptation for evaluation starts from a copy of the optimizer state and puts it back after.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from _fake_omniglot import job_data, make_runs
from reptile_fast import MLP, NonFiniteError, Reptile, Sine, TaskBatch
from reptile_fast.cli import main
from reptile_fast.tasks import sample_indices

LR, EPS = 0.01, 0.5


class Official:
    """The official code's inner loops: one model, one Adam (β1 = 0) for everything."""

    def __init__(self, model):
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=LR, betas=(0.0, 0.999), eps=1e-8)
        self.phi = [p.detach().clone() for p in self.model.parameters()]

    def _inner(self, x, y, plan_rows, loss):
        with torch.no_grad():
            for p, f in zip(self.model.parameters(), self.phi):
                p.copy_(f)
        for ind in plan_rows:
            value = loss(self.model(x[ind]), y[ind])
            self.opt.zero_grad()
            value.backward()
            self.opt.step()
        return [p.detach().clone() for p in self.model.parameters()]

    def meta_step(self, tasks, plan, loss=F.mse_loss):
        news = [self._inner(tasks.x[i], tasks.y[i], plan[i], loss) for i in range(tasks.n_tasks)]
        self.phi = [f + EPS * torch.stack([n[k] - f for n in news]).mean(0) for k, f in enumerate(self.phi)]

    def adapt(self, tasks, plan, loss=F.mse_loss):
        kept = copy.deepcopy(self.opt.state_dict())
        out = []
        for i in range(tasks.n_tasks):
            out.append(self._inner(tasks.x[i], tasks.y[i], plan[i], loss))
            self.opt.load_state_dict(copy.deepcopy(kept))  # the official evaluate restores it
        return out

    def flat(self):
        return torch.cat([f.flatten() for f in self.phi])


def flat(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def draws(n_steps, T=3, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        tasks = Sine().sample(T, generator=g)
        out.append((tasks, sample_indices(T, 5, tasks.n_points, 10, generator=g)))
    return out


def carried_trainer(model, **kw):
    return Reptile(model, backend="reference", inner_optimizer="adam", inner_lr=LR, outer_lr=EPS,
                   adam_state="carried", **kw)


def test_meta_steps_are_the_official_codes_bitwise():
    torch.manual_seed(0)
    model = MLP(1, 16, 1)
    official, trainer = Official(model), carried_trainer(copy.deepcopy(model))
    for tasks, plan in draws(4):
        official.meta_step(tasks, plan)
        trainer.meta_step(tasks, plan)
    assert torch.equal(flat(trainer.model), official.flat())
    # the same moments and step count as the official optimizer's
    mine, theirs = trainer.carried_adam_state["state"], official.opt.state_dict()["state"]
    for k in theirs:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(mine[k][name], theirs[k][name]), (k, name)
    assert float(mine[0]["step"]) == 4 * 3 * 5
    # the control: a fresh Adam per task trains another model
    fresh = Reptile(copy.deepcopy(model), backend="reference", inner_optimizer="adam", inner_lr=LR, outer_lr=EPS)
    for tasks, plan in draws(4):
        fresh.meta_step(tasks, plan)
    assert (flat(fresh.model) - official.flat()).abs().max() > 1e-3


def test_fit_draws_as_meta_step_and_adapt_starts_from_the_state_training_left():
    torch.manual_seed(1)
    model = MLP(1, 16, 1)
    trainer = carried_trainer(copy.deepcopy(model))
    trainer.fit(Sine(), 3, meta_batch_size=3, generator=torch.Generator().manual_seed(3), progress=False)
    official = Official(model)
    for tasks, plan in draws(3):
        official.meta_step(tasks, plan)
    assert torch.equal(flat(trainer.model), official.flat())
    kept = copy.deepcopy(trainer.carried_adam_state)
    tasks, plan = draws(1, T=4, seed=9)[0]
    adapted = trainer.adapt(tasks, 5, plan).params
    want = official.adapt(tasks, plan)
    for k, (name, v) in enumerate(adapted.items()):
        assert torch.equal(v, torch.stack([w[k] for w in want])), name
    # adaptation leaves the carried state as training left it
    for k in kept["state"]:
        for name, v in kept["state"][k].items():
            assert torch.equal(trainer.carried_adam_state["state"][k][name], v)
    trainer.evaluate(tasks, 5, plan)
    assert float(trainer.carried_adam_state["state"][0]["step"]) == 3 * 3 * 5


def test_classification_with_cross_entropy():
    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 12, 4, generator=g)
    y = torch.randint(0, 3, (2, 12), generator=g)
    tasks = TaskBatch(x, y)
    plan = sample_indices(2, 5, 12, 4, generator=g)
    official = Official(model)
    trainer = Reptile(copy.deepcopy(model), backend="reference", inner_optimizer="adam", inner_lr=LR,
                      outer_lr=EPS, loss="cross_entropy", inner_batch_size=4, adam_state="carried")
    for _ in range(2):
        official.meta_step(tasks, plan, loss=F.cross_entropy)
        trainer.meta_step(tasks, plan)
    assert torch.equal(flat(trainer.model), official.flat())


def test_settings_that_cannot_carry_are_refused_by_name():
    model = MLP(1, 4, 1)
    with pytest.raises(ValueError, match="inner_optimizer='adam'"):
        Reptile(model, backend="reference", adam_state="carried")
    for backend in ("torch", "compiled", "triton"):
        with pytest.raises(ValueError, match="pass backend='reference'"):
            Reptile(model, backend=backend, inner_optimizer="adam", adam_state="carried")
    # auto picks the one backend that carries the state
    auto = Reptile(model, inner_optimizer="adam", adam_state="carried")
    assert auto.backend.name == "reference" and auto.backend_name == "reference"
    with pytest.raises(ValueError, match="adam_state must be one of 'fresh', 'carried', got 'shared'"):
        Reptile(model, adam_state="shared")
    with pytest.raises(TypeError, match="adam_state must be one of"):
        Reptile(model, adam_state=None)
    t = Reptile(model, inner_optimizer="adam")
    assert t.adam_state == "fresh" and t.carried_adam_state is None and t.hparams()["adam_state"] == "fresh"
    assert t.state_dict()["inner_optimizer"] is None


def test_checkpoints_resume_exactly_and_refuse_a_state_that_does_not_fit(tmp_path):
    torch.manual_seed(4)
    model = MLP(1, 16, 1)
    whole = carried_trainer(copy.deepcopy(model))
    whole.fit(Sine(), 6, meta_batch_size=2, generator=torch.Generator().manual_seed(5), progress=False)
    part = carried_trainer(copy.deepcopy(model))
    part.fit(Sine(), 3, meta_batch_size=2, generator=torch.Generator().manual_seed(5), progress=False,
             checkpoint_dir=tmp_path)
    resumed = carried_trainer(copy.deepcopy(model))
    resumed.fit(Sine(), 6, meta_batch_size=2, generator=torch.Generator().manual_seed(123), progress=False,
                checkpoint_dir=tmp_path, resume_from=tmp_path)
    assert torch.equal(flat(resumed.model), flat(whole.model))
    assert resumed.hparams()["adam_state"] == "carried"
    state = whole.state_dict()
    bad = copy.deepcopy(state)
    bad["inner_optimizer"]["state"][0]["exp_avg_sq"] = torch.zeros(3)
    other = carried_trainer(copy.deepcopy(model))
    with pytest.raises(ValueError, match=r"inner_optimizer.*exp_avg_sq.*parameter 0"):
        other.load_state_dict(bad)
    bad["inner_optimizer"]["state"][0]["exp_avg_sq"] = torch.full_like(state["inner_optimizer"]["state"][0]
                                                                       ["exp_avg_sq"], float("nan"))
    with pytest.raises(ValueError, match="not finite"):
        other.load_state_dict(bad)
    assert other.carried_adam_state is None and other.iteration == 0  # nothing changed
    with pytest.warns(UserWarning, match="adam_state: saved 'carried', now 'fresh'"):
        Reptile(copy.deepcopy(model), backend="reference", inner_optimizer="adam").load_state_dict(state)


def test_a_non_finite_meta_step_keeps_the_carried_state():
    torch.manual_seed(5)
    trainer = carried_trainer(MLP(1, 8, 1))
    tasks, plan = draws(1)[0]
    trainer.meta_step(tasks, plan)
    kept = copy.deepcopy(trainer.carried_adam_state)
    huge = TaskBatch(tasks.x, torch.full_like(tasks.y, 3e38))
    trainer.meta_step(huge, plan)
    with pytest.raises(NonFiniteError):
        trainer.check_finite()
    for k in kept["state"]:
        for name, v in kept["state"][k].items():
            assert torch.equal(trainer.carried_adam_state["state"][k][name], v), (k, name)


def test_one_process_distributed_fit_carries_the_state():
    from reptile_fast.distributed import distributed_fit

    trainer = carried_trainer(MLP(1, 8, 1))
    distributed_fit(trainer, Sine(), 2, meta_batch_size=2, seed=0, progress=False)
    assert float(trainer.carried_adam_state["state"][0]["step"]) == 2 * 2 * 5


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("adam_state_job"))


def test_omniglot_job_carries_the_state_resumes_exactly_and_tests_from_it(data, tmp_path, capsys):
    from reptile_fast.fewshot_job import load_trained

    base = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "4",
            "--checkpoint-every", "2", "--threads", "1", "--no-progress", "--adam-state", "carried"]
    out = tmp_path / "run"
    assert main(base + ["--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "reference" and "the Adam state training left" in metrics["protocol"]
    assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--out", str(tmp_path / "res"),
                 "--no-progress"]) == 0
    a = torch.load(out / "model.pt", weights_only=True)
    b = torch.load(tmp_path / "res" / "model.pt", weights_only=True)
    for k in a["state_dict"]:
        assert torch.equal(a["state_dict"][k], b["state_dict"][k]), k
    assert float(a["inner_optimizer"]["state"][0]["step"]) == 4 * 5 * 2  # meta-steps x tasks x steps
    config, trainer = load_trained(out)
    assert config.adam_state == "carried"
    for k, per in a["inner_optimizer"]["state"].items():
        for name, v in per.items():
            assert torch.equal(trainer.carried_adam_state["state"][k][name], v)
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(base + ["--backend", "torch", "--out", str(tmp_path / "bad")]) == 2
    assert "backend reference" in capsys.readouterr().err
