"""QA48: a black-box review of ``Reptile(adam_state="carried")`` (commit d300dce).

The oracle below restates the official supervised-reptile structure independently of
reptile_fast (and of tests/test_adam_state.py): ONE model and ONE ``torch.optim.Adam`` for every
inner loop; each task starts by copying φ into the model (the optimizer's moments and step count
stay); the outer step is φ + ε·mean_i D_i; adaptation for evaluation saves the optimizer state,
adapts, and restores it after each task (the official ``evaluate``).  Where reptile_fast's own
definitions are used (its FOMAML meta-gradient: the raw gradient on a final minibatch; its
``inner_grad_weights``: D = −Σ w_s g_s) the oracle states them explicitly.

Each test says how it can fail.  The three bugs found (the first three below) are fixed.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from reptile_fast import MLP, NonFiniteError, Reptile, Sine, TaskBatch
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.tasks import sample_indices
from reptile_fast.tasks.episodes import Episodes

LR, EPS = 0.01, 0.5


# ----------------------------------------------------------------------------- the oracle
class OneAdam:
    """The official code's inner loops: one model, one Adam(β1 = 0) for all of them."""

    def __init__(self, model, lr=LR, outer=None):
        self.model = copy.deepcopy(model)
        self.opt = torch.optim.Adam(self.model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
        self.phi = [p.detach().clone() for p in self.model.parameters()]
        self.outer = outer  # None or ("adam", lr): an outer torch.optim.Adam fed −mean D

        if outer is not None:
            self.outer_params = [f.clone().requires_grad_(True) for f in self.phi]
            self.outer_opt = torch.optim.Adam(self.outer_params, lr=outer[1])

    def _load_phi(self):
        with torch.no_grad():
            for p, f in zip(self.model.parameters(), self.phi):
                p.copy_(f)

    def _task(self, x, y, rows, loss, *, weights=None, fomaml_row=None):
        """Adam steps on ``rows``; returns (adapted params, direction D or None)."""
        self._load_phi()
        params = list(self.model.parameters())
        acc = [torch.zeros_like(p) for p in params] if weights is not None else None
        for s, ind in enumerate(rows):
            value = loss(self.model(x[ind]), y[ind])
            self.opt.zero_grad()
            value.backward()
            if acc is not None:
                with torch.no_grad():
                    for a, p in zip(acc, params):
                        if p.grad is not None:
                            a += weights[s] * p.grad
            self.opt.step()
        adapted = [p.detach().clone() for p in params]
        if fomaml_row is not None:
            final = loss(self.model(x[fomaml_row]), y[fomaml_row])
            g = torch.autograd.grad(final, params, allow_unused=True, materialize_grads=True)
            return adapted, [-t.detach() for t in g]
        if acc is not None:
            return adapted, [-a for a in acc]
        return adapted, None

    def meta_step(self, tasks, plan, loss=F.mse_loss, *, eps=EPS, weights=None, fomaml=False):
        ds = []
        for i in range(tasks.n_tasks):
            rows = plan[i][:-1] if fomaml else plan[i]
            adapted, d = self._task(tasks.x[i], tasks.y[i], rows, loss, weights=weights,
                                    fomaml_row=plan[i][-1] if fomaml else None)
            ds.append(d if d is not None else [a - f for a, f in zip(adapted, self.phi)])
        mean = [torch.stack([d[k] for d in ds]).mean(0) for k in range(len(self.phi))]
        if self.outer is None:
            self.phi = [f + eps * m for f, m in zip(self.phi, mean)]
        else:
            for p, m in zip(self.outer_params, mean):
                p.grad = -m
            self.outer_opt.step()
            self.outer_opt.zero_grad(set_to_none=True)
            self.phi = [p.detach().clone() for p in self.outer_params]

    def adapt(self, tasks, plan, loss=F.mse_loss):
        kept = copy.deepcopy(self.opt.state_dict())
        out = []
        for i in range(tasks.n_tasks):
            out.append(self._task(tasks.x[i], tasks.y[i], plan[i], loss)[0])
            self.opt.load_state_dict(copy.deepcopy(kept))
        return out


def flat(params):
    return torch.cat([p.detach().flatten() for p in params])


def carried(model, **kw):
    kw = {"inner_lr": LR, "outer_lr": EPS, **kw}
    return Reptile(model, backend="reference", inner_optimizer="adam", adam_state="carried", **kw)


def draws(n_steps, T=2, seed=3, rows=4, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n_steps):
        tasks = Sine(dtype=dtype).sample(T, generator=g)
        out.append((tasks, sample_indices(T, rows, tasks.n_points, 10, generator=g)))
    return out


def same_state(a, b):
    """Two Adam state_dict()['state'] mappings hold bitwise-equal tensors under the same keys."""
    if a is None or b is None:
        return a is b
    if set(a) != set(b):
        return False
    return all(set(a[k]) == set(b[k]) and all(torch.equal(a[k][n], b[k][n]) for n in a[k]) for k in a)


# ----------------------------------------------------------------------------- findings (fixed)
def test_meta_steps_skipped_after_a_non_finite_one_leave_the_carried_state_as_phi():
    # The guard skips the bad meta-step AND every later one until check_finite ("no later meta-step was
    # applied"), rewinding iteration; the carried state must be the one after the last applied step.
    # Failed before the fix: the good meta-step 3 (skipped) advanced the state from step 10 to step 20.
    torch.manual_seed(0)
    trainer = carried(MLP(1, 8, 1), inner_steps=5)
    (tasks, plan), = draws(1, rows=5)
    trainer.meta_step(tasks, plan)
    kept = copy.deepcopy(trainer.carried_adam_state)
    trainer.meta_step(TaskBatch(tasks.x, torch.full_like(tasks.y, 3e38)), plan)  # non-finite: skipped
    trainer.meta_step(tasks, plan)  # skipped too (the guard is tripped until the read)
    with pytest.raises(NonFiniteError):
        trainer.check_finite()
    assert trainer.iteration == 1
    assert same_state(trainer.carried_adam_state["state"], kept["state"])


def test_a_non_finite_update_with_finite_moments_keeps_the_state_as_it_was():
    # Cross-entropy gradients are bounded, so Adam's moments stay finite while lr=3e38 steps push the
    # bias to ±inf: the outer guard skips the meta-step (NonFiniteError at meta-step 1, iteration 0);
    # the carried state must still be None (as before it).  Failed before the fix: it held step 2.
    torch.manual_seed(0)
    model = nn.Linear(2, 3)
    trainer = carried(model, inner_lr=3e38, inner_steps=2, inner_batch_size=6, loss="cross_entropy")
    x = torch.randn(1, 6, 2, generator=torch.Generator().manual_seed(0)) * 1e-20
    tasks = TaskBatch(x, torch.arange(6).remainder(3).reshape(1, 6))
    trainer.meta_step(tasks, torch.arange(6).repeat(1, 2, 1))
    with pytest.raises(NonFiniteError):
        trainer.check_finite()
    assert trainer.iteration == 0
    assert trainer.carried_adam_state is None


@pytest.mark.parametrize("bad_step", ["missing", "nan"])
def test_a_carried_state_with_a_bad_step_count_is_refused_on_load(bad_step):
    # Failed before the fix: load_state_dict accepted it.
    torch.manual_seed(1)
    a = carried(MLP(1, 8, 1), inner_steps=2)
    (tasks, plan), = draws(1, rows=2)
    a.meta_step(tasks, plan)
    state = copy.deepcopy(a.state_dict())
    for per in state["inner_optimizer"]["state"].values():
        if bad_step == "missing":
            del per["step"]
        else:
            per["step"] = torch.tensor(float("nan"))
    with pytest.raises(ValueError, match="inner_optimizer"):
        carried(MLP(1, 8, 1), inner_steps=2).load_state_dict(state)


# ----------------------------------------------------------------------------- passing checks
def test_fresh_default_is_a_new_adam_per_task_even_beside_a_carried_trainer():
    # The default must stay "a fresh Adam for every task" (bitwise against its own oracle), untouched by a
    # carried trainer built on the same model class and run in between (no shared backend or state).
    # Fails if the carried state leaked into the fresh path (class attribute, shared backend, ...).
    torch.manual_seed(2)
    model = MLP(1, 8, 1)
    fresh = Reptile(copy.deepcopy(model), backend="reference", inner_optimizer="adam", inner_lr=LR,
                    outer_lr=EPS, inner_steps=4)
    other = carried(copy.deepcopy(model), inner_steps=4)
    phi = [p.detach().clone() for p in model.parameters()]
    for tasks, plan in draws(2):
        other.meta_step(tasks, plan)
        fresh.meta_step(tasks, plan)
        news = []
        for i in range(tasks.n_tasks):
            oracle = OneAdam(model)  # a NEW optimizer per task
            oracle.phi = phi
            news.append(oracle._task(tasks.x[i], tasks.y[i], plan[i], F.mse_loss)[0])
        phi = [f + EPS * torch.stack([n[k] - f for n in news]).mean(0) for k, f in enumerate(phi)]
    assert torch.equal(flat(fresh.model.parameters()), flat(phi))
    assert fresh.carried_adam_state is None and fresh.state_dict()["inner_optimizer"] is None
    assert other.carried_adam_state is not None


def test_inner_lr_changed_between_fits_keeps_the_moments_and_uses_the_new_rate():
    # The official optimizer's moments and step count carry on; the rate is the trainer's current one.
    # Fails if the setter dropped the state (fresh moments) or the old rate stayed in the carried param_groups.
    torch.manual_seed(3)
    model = MLP(1, 8, 1)
    trainer, oracle = carried(copy.deepcopy(model), inner_steps=4), OneAdam(model)
    d = draws(4)
    for tasks, plan in d[:2]:
        trainer.meta_step(tasks, plan)
        oracle.meta_step(tasks, plan)
    trainer.inner_lr = 0.03
    for g in oracle.opt.param_groups:
        g["lr"] = 0.03
    for tasks, plan in d[2:]:
        trainer.meta_step(tasks, plan)
        oracle.meta_step(tasks, plan)
    assert torch.equal(flat(trainer.model.parameters()), flat(oracle.phi))
    assert same_state(trainer.carried_adam_state["state"], oracle.opt.state_dict()["state"])


def test_float64_model_matches_the_oracle_and_adapt_restores_the_state():
    # Fails if the state were cast to float32 somewhere, or adapt changed it.
    torch.manual_seed(4)
    model = MLP(1, 8, 1).double()
    trainer, oracle = carried(copy.deepcopy(model), inner_steps=4), OneAdam(model)
    for tasks, plan in draws(2, dtype=torch.float64):
        trainer.meta_step(tasks, plan)
        oracle.meta_step(tasks, plan)
    assert torch.equal(flat(trainer.model.parameters()), flat(oracle.phi))
    st = trainer.carried_adam_state["state"]
    assert all(v["exp_avg_sq"].dtype == torch.float64 for v in st.values())
    before = copy.deepcopy(st)
    (tasks, plan), = draws(1, T=3, seed=8, dtype=torch.float64)
    got = trainer.adapt(tasks, 4, plan).params
    want = oracle.adapt(tasks, plan)
    for k, v in enumerate(got.values()):
        assert torch.equal(v, torch.stack([w[k] for w in want]))
    assert same_state(trainer.carried_adam_state["state"], before)


class UnusedHead(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Linear(1, 8)
        self.head = nn.Linear(8, 1)
        self.spare = nn.Linear(8, 2)  # never used by the loss: Adam keeps no state for it

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))


def test_a_parameter_the_loss_never_reaches_carries_resumes_and_adapts(tmp_path):
    # Fails if the absent state entries broke the chain, the checkpoint check, or a resume.
    torch.manual_seed(5)
    model = UnusedHead()
    whole, oracle = carried(copy.deepcopy(model), inner_steps=4), OneAdam(model)
    d = draws(4)
    for tasks, plan in d:
        whole.meta_step(tasks, plan)
        oracle.meta_step(tasks, plan)
    assert torch.equal(flat(whole.model.parameters()), flat(oracle.phi))
    assert set(whole.carried_adam_state["state"]) == {0, 1, 2, 3}  # spare.weight/bias (4, 5) have none
    part = carried(copy.deepcopy(model), inner_steps=4)
    for tasks, plan in d[:2]:
        part.meta_step(tasks, plan)
    torch.save(part.state_dict(), tmp_path / "s.pt")
    resumed = carried(copy.deepcopy(model), inner_steps=4)
    resumed.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True))
    for tasks, plan in d[2:]:
        resumed.meta_step(tasks, plan)
    assert torch.equal(flat(resumed.model.parameters()), flat(whole.model.parameters()))
    assert same_state(resumed.carried_adam_state["state"], whole.carried_adam_state["state"])


@pytest.mark.parametrize("mode", ["fomaml", "weights"])
def test_fomaml_and_inner_grad_weights_carry_the_state_through_their_own_directions(mode):
    # reptile_fast's FOMAML (raw gradient on a final minibatch, no Adam step for it) and weighted inner
    # gradients (D = -sum w_s g_s), each with the one carried Adam.  Fails if either path skipped the
    # carried state (fresh Adam per task) or stepped Adam on the FOMAML batch.
    torch.manual_seed(6)
    model = MLP(1, 8, 1)
    weights = (0.5, 1.0, 2.0)
    kw = {"algorithm": "fomaml"} if mode == "fomaml" else {"inner_grad_weights": weights}
    trainer, oracle = carried(copy.deepcopy(model), inner_steps=3, **kw), OneAdam(model)
    for tasks, plan in draws(3, rows=4 if mode == "fomaml" else 3):
        trainer.meta_step(tasks, plan)
        if mode == "fomaml":
            oracle.meta_step(tasks, plan, fomaml=True)
        else:
            oracle.meta_step(tasks, plan, weights=weights)
    assert torch.equal(flat(trainer.model.parameters()), flat(oracle.phi))
    assert same_state(trainer.carried_adam_state["state"], oracle.opt.state_dict()["state"])
    assert float(trainer.carried_adam_state["state"][0]["step"]) == 3 * 2 * 3


def test_an_outer_adam_and_the_carried_inner_adam_stay_apart():
    # Fails if the two optimizers' states were mixed up (or the inner one reset by the outer update).
    torch.manual_seed(7)
    model = MLP(1, 8, 1)
    mine = copy.deepcopy(model)
    trainer = carried(mine, inner_steps=3, outer_optimizer=torch.optim.Adam(mine.parameters(), lr=0.05))
    oracle = OneAdam(model, outer=("adam", 0.05))
    for tasks, plan in draws(3, rows=3):
        trainer.meta_step(tasks, plan)
        oracle.meta_step(tasks, plan)
    assert torch.allclose(flat(trainer.model.parameters()), flat(oracle.phi), rtol=0, atol=1e-6)
    assert same_state(trainer.carried_adam_state["state"], oracle.opt.state_dict()["state"])


def test_evaluation_between_meta_steps_does_not_change_the_training_run():
    # The official evaluate restores the full state after each test task: training with evaluations in
    # between must end bitwise where training without them ends.  Fails if adapt/evaluate wrote the state.
    torch.manual_seed(8)
    model = MLP(1, 8, 1)
    plain, probed = carried(copy.deepcopy(model), inner_steps=3), carried(copy.deepcopy(model), inner_steps=3)
    (etasks, eplan), = draws(1, T=3, seed=11, rows=6)
    for tasks, plan in draws(3, rows=3):
        plain.meta_step(tasks, plan)
        probed.meta_step(tasks, plan)
        probed.evaluate(etasks, 6, eplan)
        probed.adapt(etasks, 6, eplan)
    assert torch.equal(flat(plain.model.parameters()), flat(probed.model.parameters()))
    assert same_state(plain.carried_adam_state["state"], probed.carried_adam_state["state"])


def test_chunked_evaluate_episodes_starts_every_task_from_the_same_state():
    # Every test task starts from the state training left (not from the previous test task's), whatever
    # the chunking; the state is unchanged after.  Fails if a chunk or a task within a chunk saw another
    # task's Adam state (task i alone would then differ from task i among others).
    torch.manual_seed(9)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    trainer = carried(copy.deepcopy(model), inner_steps=3, inner_batch_size=3, loss="cross_entropy")
    oracle = OneAdam(model)
    g = torch.Generator().manual_seed(0)
    train = TaskBatch(torch.randn(2, 9, 4, generator=g), torch.randint(0, 3, (2, 9), generator=g))
    tplan = sample_indices(2, 3, 9, 3, generator=g)
    trainer.meta_step(train, tplan)
    oracle.meta_step(train, tplan, loss=F.cross_entropy)
    kept = copy.deepcopy(trainer.carried_adam_state)
    support = TaskBatch(torch.randn(4, 6, 4, generator=g), torch.arange(6).remainder(3).repeat(4, 1))
    query = TaskBatch(torch.randn(4, 3, 4, generator=g), torch.arange(3).repeat(4, 1))
    ep = Episodes(support, query, 3)
    small = evaluate_episodes(trainer, ep, steps=4, batch_size=3, generator=torch.Generator().manual_seed(1),
                              max_images=1)
    big = evaluate_episodes(trainer, ep, steps=4, batch_size=3, generator=torch.Generator().manual_seed(1))
    assert torch.equal(small.predictions, big.predictions)
    assert same_state(trainer.carried_adam_state["state"], kept["state"])
    plan = sample_indices(4, 4, 6, 3, generator=g)
    together = trainer.adapt(support, 4, plan).params
    want = oracle.adapt(support, plan, loss=F.cross_entropy)
    for i in range(4):
        alone = trainer.adapt(support[i:i + 1], 4, plan[i:i + 1]).params
        for k, name in enumerate(together):
            assert torch.equal(together[name][i], alone[name][0])
            assert torch.equal(together[name][i], want[i][k])


def test_state_dict_snapshots_are_not_aliased_with_the_live_optimizers():
    # A state_dict() taken, then more training and adaptation: the snapshot's Adam tensors must not move
    # (Adam updates its moments in place); a dict loaded into two trainers must train both identically
    # and stay as it was.  Fails on any shared tensor between the carried state and a live optimizer.
    torch.manual_seed(10)
    model = MLP(1, 8, 1)
    a = carried(copy.deepcopy(model), inner_steps=3)
    d = draws(3, rows=3)
    a.meta_step(*d[0])
    snap = a.state_dict()
    frozen = copy.deepcopy(snap["inner_optimizer"])
    a.meta_step(*d[1])
    a.adapt(d[2][0], 3, d[2][1])
    assert same_state(snap["inner_optimizer"]["state"], frozen["state"])
    b, c = carried(copy.deepcopy(model), inner_steps=3), carried(copy.deepcopy(model), inner_steps=3)
    b.load_state_dict(snap)
    c.load_state_dict(snap)
    b.meta_step(*d[2])
    assert same_state(snap["inner_optimizer"]["state"], frozen["state"])
    c.meta_step(*d[2])
    assert torch.equal(flat(b.model.parameters()), flat(c.model.parameters()))
    assert same_state(b.carried_adam_state["state"], c.carried_adam_state["state"])


def test_loading_a_state_without_an_adam_state_resets_a_trained_trainer():
    # A state_dict of a carried trainer that has not trained yet holds None: a trained trainer loading it
    # must continue exactly as that one (a fresh Adam), not with its own leftover moments.
    torch.manual_seed(11)
    model = MLP(1, 8, 1)
    untrained = carried(copy.deepcopy(model), inner_steps=3)
    trained = carried(copy.deepcopy(model), inner_steps=3)
    d = draws(2, rows=3)
    trained.meta_step(*d[0])
    trained.load_state_dict(untrained.state_dict())
    assert trained.carried_adam_state is None
    trained.meta_step(*d[1])
    untrained.meta_step(*d[1])
    assert torch.equal(flat(trained.model.parameters()), flat(untrained.model.parameters()))


def test_adam_state_cannot_be_switched_after_construction():
    # Fails if a plain attribute were accepted (and recorded in hparams) while the backend stayed as built.
    trainer = carried(MLP(1, 4, 1))
    with pytest.raises(AttributeError):
        trainer.adam_state = "fresh"
    assert trainer.hparams()["adam_state"] == "carried"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_carried_state_round_trips_through_a_cpu_checkpoint():
    # Fails if the CPU-loaded state were not moved to the device (a device error) or lost.
    torch.manual_seed(12)
    model = MLP(1, 8, 1)
    dev = torch.device("cuda")
    a = carried(copy.deepcopy(model).to(dev), inner_steps=3)
    d = [(t.to(device=dev), p.to(dev)) for t, p in draws(2, rows=3)]
    a.meta_step(*d[0])
    state = {k: (copy.deepcopy(v) if k != "model" else {n: t.cpu() for n, t in v.items()})
             for k, v in a.state_dict().items()}
    state["inner_optimizer"] = {"state": {k: {n: t.cpu() for n, t in per.items()}
                                          for k, per in state["inner_optimizer"]["state"].items()},
                                "param_groups": state["inner_optimizer"]["param_groups"]}
    b = carried(copy.deepcopy(model).to(dev), inner_steps=3)
    b.load_state_dict(state)
    a.meta_step(*d[1])
    b.meta_step(*d[1])
    assert torch.equal(flat(a.model.parameters()), flat(b.model.parameters()))
