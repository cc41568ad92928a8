"""QA20's review of the session's changes: auto's move to reference, the outer optimizer's undo,
``all_finite``.  Each test failed on the code before its fix (704084f)."""
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import NonFiniteError, Reptile
from reptile_fast.core import OuterUpdate, all_finite
from reptile_fast.tasks.base import TaskBatch, sample_indices
from test_auto_fallback import DataDependentIf, _tasks  # (tests/ is on sys.path under pytest)


# ---------------------------------------------------------------- auto's move to reference
class DropoutThenIf(nn.Module):
    """Dropout (drawn from the global RNG) before an operation vmap refuses: backend torch draws
    the masks, then refuses."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        y = self.lin(nn.functional.dropout(x, 0.5, True))
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("call", ["meta_step", "evaluate"])
def test_the_move_reruns_on_the_rng_as_before_the_refused_call(call):
    """The rerun on reference drew the model's dropout masks after those backend torch had drawn
    (and thrown away) before refusing: φ differed from a reference run on the same RNG."""
    torch.manual_seed(0)
    model, twin = DropoutThenIf(), DropoutThenIf()
    twin.load_state_dict(model.state_dict())
    auto = Reptile(model, backend="auto", inner_steps=2, inner_batch_size=4)
    ref = Reptile(twin, backend="reference", inner_steps=2, inner_batch_size=4)
    assert auto.backend.name == "torch"
    g = torch.Generator().manual_seed(1)
    tasks, plan = _tasks(g), sample_indices(3, 2, 12, 4, generator=g)
    outs = []
    for trainer in (auto, ref):
        torch.manual_seed(7)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if call == "meta_step":
                trainer.meta_step(tasks, plan)
                outs.append([p.detach().clone() for p in trainer.model.parameters()])
            else:
                outs.append([trainer.evaluate(tasks, 2, plan)])
        outs[-1].append(torch.get_rng_state())
    assert auto.backend.name == "reference"
    for a, b in zip(*outs):
        assert torch.equal(a, b)


def test_after_the_move_a_new_batch_size_stays_on_reference():
    """Setting inner_batch_size after the move rebuilt auto's choice, backend torch: the next
    meta-step refused again and warned again (the move promised one warning)."""
    torch.manual_seed(0)
    model, twin = DataDependentIf(), DataDependentIf()
    twin.load_state_dict(model.state_dict())
    auto = Reptile(model, backend="auto", inner_steps=2, inner_batch_size=4)
    ref = Reptile(twin, backend="reference", inner_steps=2, inner_batch_size=4)
    g = torch.Generator().manual_seed(1)
    with pytest.warns(UserWarning, match="moves to backend 'reference'"):
        auto.meta_step(_tasks(g), sample_indices(3, 2, 12, 4, generator=torch.Generator().manual_seed(2)))
    ref.meta_step(_tasks(torch.Generator().manual_seed(1)),
                  sample_indices(3, 2, 12, 4, generator=torch.Generator().manual_seed(2)))
    auto.inner_batch_size = ref.inner_batch_size = 3
    tasks, plan = _tasks(g), sample_indices(3, 2, 12, 3, generator=g)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        auto.meta_step(tasks, plan)
    ref.meta_step(tasks, plan)
    assert auto.backend.name == "reference"
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_fit_stats_say_why_the_run_moved():
    class Family:
        def sample(self, n, *, generator=None, device=None):
            return _tasks(generator, n)

    torch.manual_seed(0)
    trainer = Reptile(DataDependentIf(), backend="auto", inner_steps=2, inner_batch_size=4)
    with pytest.warns(UserWarning, match="moves to backend 'reference'"):
        trainer.fit(Family(), 2, meta_batch_size=2, generator=torch.Generator().manual_seed(3), progress=False)
    stats = trainer.last_fit_stats
    assert stats["stepper"] == "reference" and "vmap" in (stats["fallback_reason"] or ""), stats


# ---------------------------------------------------------------- the outer optimizer's undo
class GroupStateSGD(torch.optim.Optimizer):
    """Keeps state in its param group (a step count k and a scale d, as D-Adaptation and Prodigy
    do) and a per-parameter momentum."""

    def __init__(self, params, lr):
        super().__init__(params, dict(lr=lr, k=0, d=1.0, scale=torch.ones(())))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            group["k"] += 1
            group["d"] = group["d"] * 2
            group["scale"].mul_(3)
            group.setdefault("added", 1)
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum", torch.zeros_like(p))
                buf.mul_(0.9).add_(p.grad)
                p.add_(buf, alpha=-group["lr"] * group["d"])


def _group_values(opt):
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in g.items() if k != "params"}
            for g in opt.param_groups]


def _same_groups(a, b):
    assert [sorted(x) for x in a] == [sorted(x) for x in b]
    for x, y in zip(a, b):
        for k in x:
            assert (torch.equal(x[k], y[k]) if isinstance(x[k], torch.Tensor) else x[k] == y[k]), k


@pytest.mark.parametrize("bad", ["nan-deltas", "overflow"])
def test_an_undone_step_puts_back_the_param_groups_state_too(bad):
    """Since the optimizer steps on every meta-step (NaN set to 0) and is undone after, a NaN
    meta-step changed an optimizer's param-group state (k, d, a tensor scale, an added key):
    before this session's change it did not step at all."""
    torch.manual_seed(0)
    p = nn.Parameter(torch.randn(4, 3))
    opt = GroupStateSGD([p], lr=0.1)
    outer = OuterUpdate([("p", p)], opt)
    outer.apply([torch.randn(4, 3)], torch.zeros(()), 0.1, 1)
    outer.check()
    if bad == "overflow":
        opt.param_groups[0]["lr"] = 100.0  # a finite pseudo-gradient that the step takes past float32's range
    groups, phi = _group_values(opt), p.detach().clone()
    momentum = opt.state[p]["momentum"].clone()
    deltas = torch.full((4, 3), float("nan")) if bad == "nan-deltas" else torch.full((4, 3), 3e38)
    outer.apply([deltas], torch.zeros(()), 0.1, 2)
    with pytest.raises(NonFiniteError):
        outer.check()
    _same_groups(groups, _group_values(opt))
    assert torch.equal(p, phi) and torch.equal(opt.state[p]["momentum"], momentum)


# ---------------------------------------------------------------- all_finite
@pytest.mark.parametrize("dtype", [torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e4m3fnuz,
                                   torch.float8_e5m2fnuz], ids=str)
def test_all_finite_takes_the_float8_formats(dtype):
    """``all_finite`` (public in reptile_fast.core) raised NotImplementedError ("aminmax_cpu" not
    implemented for 'Float8_e4m3fn') for a float8 tensor instead of answering."""
    t = torch.linspace(-2, 2, 33).to(dtype)
    assert bool(all_finite([t, torch.ones(2)]))
    bad = torch.tensor([1.0, float("nan"), 2.0]).to(dtype)
    assert not bool(all_finite([torch.ones(2), bad]))
    assert not bool(all_finite([bad]))


# ---------------------------------------------------------------- CLI errors in flag words
def test_as_flags_leaves_paths_as_they_are():
    """A folder named like a setting (``seed=3``, ``inner_lr``: hyper-parameter sweep folders) was
    rewritten in the error as if it were one: 'blocker/--seed 3/--inner-lr'."""
    from reptile_fast.validation import as_flags

    names = ["seed", "inner_lr", "inner_batch_size"]
    message = "cannot write runs/seed=3/inner_lr: it is a file; inner_batch_size=60 exceeds 50 points"
    assert as_flags(message, names) == ("cannot write runs/seed=3/inner_lr: it is a file; "
                                        "--inner-batch-size 60 exceeds 50 points")
    assert as_flags("output directory seed=3 exists; inner_lr", names, keep=["seed=3", None]) == (
        "output directory seed=3 exists; --inner-lr")


@pytest.mark.parametrize("command", ["sine", "omniglot"])
def test_the_jobs_name_their_paths_unchanged(tmp_path, capsys, monkeypatch, command):
    from reptile_fast.cli import main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "seed=3").write_text("a file")
    extra = [] if command == "sine" else ["--train", "inner_lr=1.zip", "--test", "inner_lr=1.zip"]
    rc = main([command, "--iterations", "1", "--out", "seed=3", "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and "seed=3" in err and "--seed 3" not in err and "--inner-lr" not in err, err


@pytest.mark.parametrize("make", [
    lambda ps: torch.optim.Adam(ps, lr=1e-3),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-3),
    lambda ps: torch.optim.Adagrad(ps, lr=1e-3),
], ids=["adam", "rmsprop", "adagrad"])
def test_an_eps_that_is_zero_in_float16_is_refused_by_name(make):
    """A float16 model with Adam's default eps=1e-8 (0 in float16): the first meta-step divided 0
    by 0 where a pseudo-gradient element was 0 and ended in NonFiniteError telling the user to
    lower inner_lr/outer_lr, which cannot help."""
    from reptile_fast.models import MLP

    torch.manual_seed(0)
    model = MLP().to(torch.float16)
    with pytest.raises(ValueError, match=r"\['eps'\] = 1e-(08|10) is 0 in torch.float16"):
        Reptile(model, backend="reference", inner_steps=1, outer_optimizer=make(model.parameters()))
    # eps=1e-4 trains; bfloat16 holds 1e-8
    opt = torch.optim.Adam(model.parameters(), lr=1e-3, eps=1e-4)
    trainer = Reptile(model, backend="reference", inner_steps=1, outer_optimizer=opt)
    g = torch.Generator().manual_seed(1)
    tasks = TaskBatch(torch.randn(2, 20, 1, generator=g).half(), torch.randn(2, 20, 1, generator=g).half())
    trainer.meta_step(tasks, sample_indices(2, 1, 20, 10, generator=g))
    trainer.check_finite()
    bf = MLP().to(torch.bfloat16)
    Reptile(bf, backend="reference", inner_steps=1, outer_optimizer=torch.optim.Adam(bf.parameters(), lr=1e-3))


def test_inner_adam_on_float16_parameters_is_refused_by_name():
    """inner_optimizer='adam' on a float16 model: Adam's eps 1e-8 is 0 in float16, and every run
    ended at meta-step 1 in NonFiniteError advising lower inner_lr/outer_lr (on every backend)."""
    from reptile_fast.models import MLP

    with pytest.raises(ValueError, match=r"inner_optimizer='adam' cannot train torch.float16 parameters: its eps"):
        Reptile(MLP().half(), backend="reference", inner_steps=2, inner_optimizer="adam")
    Reptile(MLP().to(torch.bfloat16), backend="reference", inner_steps=2, inner_optimizer="adam")
    Reptile(MLP().half(), backend="reference", inner_steps=2, inner_optimizer="sgd")
