"""An outer ``torch.optim`` optimizer: its hyper-parameters are checked where torch does not
check them, and a step that overflows φ is undone whole (φ and the optimizer's state).

Session 7 left two holes: NaN momentum or weight decay turned φ into NaN with no error, and
after an overflowing step φ was restored but the optimizer's state (momentum buffer, Adam
moments, step count) kept the skipped step, so training on after the ``NonFiniteError`` (at a
lower learning rate) differed from a run that never tried it.
"""
import pytest
import torch

from reptile_fast import NonFiniteError, Reptile
from reptile_fast.models import MLP
from reptile_fast.tasks import Sine


def _draw(g, n=2, steps=1):
    tasks = Sine().sample(n, generator=g)
    plan = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(n * steps)]).view(n, steps, 10)
    return tasks, plan


def _state(opt, model):
    params = model.parameters() if isinstance(model, torch.nn.Module) else model
    return [{k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in opt.state[p].items()}
            if p in opt.state else None for p in params]


def _assert_same_state(a, b):
    assert len(a) == len(b)
    for i, (sa, sb) in enumerate(zip(a, b)):
        assert (sa is None) == (sb is None), f"parameter {i}: state present in one only"
        if sa is None:
            continue
        assert sa.keys() == sb.keys(), f"parameter {i}: state keys {sorted(sa)} vs {sorted(sb)}"
        for k in sa:
            va, vb = sa[k], sb[k]
            same = torch.equal(va, vb) if isinstance(va, torch.Tensor) else va == vb
            assert same, f"parameter {i}: state[{k!r}] differs"


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
], ids=["sgd-momentum", "adam"])
def test_an_overflowing_outer_step_is_undone_with_the_optimizer_state(backend, make_opt):
    torch.manual_seed(0)
    model, twin = MLP(), MLP()
    twin.load_state_dict(model.state_dict())
    opt, twin_opt = make_opt(model.parameters()), make_opt(twin.parameters())
    tr = Reptile(model, backend=backend, inner_steps=1, outer_optimizer=opt)
    ref = Reptile(twin, backend=backend, inner_steps=1, outer_optimizer=twin_opt)
    g, g_twin = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(2):
        tr.meta_step(*_draw(g))
        ref.meta_step(*_draw(g_twin))
    tr.check_finite()
    state_before = _state(opt, model)
    phi_before = [p.detach().clone() for p in model.parameters()]

    # a finite step that overflows φ: the largest float32 learning rate on a loud task
    opt.param_groups[0]["lr"] = 3.4e38
    loud = Sine(amplitude=(1000.0, 1000.0)).sample(2, generator=torch.Generator().manual_seed(2))
    tr.meta_step(loud, torch.arange(10).repeat(2, 1, 1))
    with pytest.raises(NonFiniteError) as info:
        tr.check_finite()
    assert info.value.iteration == 3
    for i, (a, b) in enumerate(zip(phi_before, model.parameters())):
        assert torch.equal(a, b), f"phi[{i}] was not restored"
    _assert_same_state(state_before, _state(opt, model))

    # training on at the old rate equals the twin that never tried the overflowing step
    opt.param_groups[0]["lr"] = 1e-2
    for _ in range(2):
        tr.meta_step(*_draw(g))
        ref.meta_step(*_draw(g_twin))
    tr.check_finite()
    for i, (a, b) in enumerate(zip(model.parameters(), twin.parameters())):
        assert torch.equal(a, b), f"phi[{i}] differs from the twin's after training on"
    _assert_same_state(_state(twin_opt, twin), _state(opt, model))


def test_an_overflowing_first_step_leaves_no_optimizer_state():
    """Before its first step the optimizer has no state: a skipped first step leaves none."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=3.4e38, momentum=0.5)
    tr = Reptile(model, backend="torch", inner_steps=1, outer_optimizer=opt)
    loud = Sine(amplitude=(1000.0, 1000.0)).sample(1, generator=torch.Generator().manual_seed(0))
    tr.meta_step(loud, torch.arange(10).view(1, 1, 10))
    with pytest.raises(NonFiniteError):
        tr.check_finite()
    assert len(opt.state) == 0


@pytest.mark.parametrize("make_opt, name", [
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=float("nan")), "momentum"),
    (lambda ps: torch.optim.SGD(ps, lr=1e-2, weight_decay=float("inf")), "weight_decay"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, weight_decay=float("nan")), "weight_decay"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, eps=float("inf")), "eps"),
], ids=["sgd-nan-momentum", "sgd-inf-weight-decay", "adam-nan-weight-decay", "adam-inf-eps"])
def test_a_non_finite_optimizer_hyperparameter_is_refused_at_construction(make_opt, name):
    model = MLP()
    try:
        opt = make_opt(model.parameters())
    except ValueError:
        pytest.skip("this torch refuses the value itself")
    with pytest.raises(ValueError, match=rf"outer_optimizer's param_groups\[0\]\['{name}'\] must be finite"):
        Reptile(model, backend="torch", outer_optimizer=opt)


def test_a_non_finite_hyperparameter_set_later_is_refused_before_phi_changes():
    """A scheduler or the user may change a param group between meta-steps: NaN Adam betas (torch
    takes them) made φ NaN; the meta-step now refuses them with φ unchanged."""
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tr = Reptile(model, backend="torch", inner_steps=1, outer_optimizer=opt)
    g = torch.Generator().manual_seed(0)
    tr.meta_step(*_draw(g))
    opt.param_groups[0]["betas"] = (float("nan"), 0.999)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['betas'\] must be finite"):
        tr.meta_step(*_draw(g))
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_inf_in_a_custom_optimizers_own_setting_is_taken_nan_is_not():
    """A custom optimizer may use inf for "no limit"; only torch.optim's own hyper-parameters
    (momentum, weight decay, betas, eps, ...) must be finite, and NaN nowhere."""

    class Clipped(torch.optim.SGD):
        def __init__(self, params, lr, max_norm):
            super().__init__(params, lr=lr)
            for group in self.param_groups:
                group["max_norm"] = max_norm

    model = MLP()
    tr = Reptile(model, backend="torch", inner_steps=1,
                 outer_optimizer=Clipped(model.parameters(), lr=1e-2, max_norm=float("inf")))
    tr.meta_step(*_draw(torch.Generator().manual_seed(0)))
    tr.check_finite()
    model = MLP()
    with pytest.raises(ValueError, match=r"param_groups\[0\]\['max_norm'\] must be finite"):
        Reptile(model, backend="torch", outer_optimizer=Clipped(model.parameters(), lr=1e-2, max_norm=float("nan")))


@pytest.mark.parametrize("make_opt, words", [
    (lambda ps: torch.optim.LBFGS(ps, lr=1e-2), "needs a closure"),
    (lambda ps: torch.optim.SparseAdam(ps, lr=1e-2), "sparse gradients only"),
    (lambda ps: torch.optim.Adam(ps, lr=1e-2, capturable=True), "capturable=True"),
], ids=["lbfgs", "sparse-adam", "capturable-on-cpu"])
def test_optimizers_that_cannot_take_the_pseudo_gradient_are_refused_at_construction(make_opt, words):
    """QA15: these failed at the first meta-step with torch's own TypeError ("missing 1 required
    positional argument: 'closure'"), RuntimeError ("SparseAdam does not support dense gradients")
    or AssertionError (capturable on the CPU)."""
    model = MLP()
    try:
        opt = make_opt(model.parameters())
    except (ValueError, TypeError, RuntimeError):
        pytest.skip("this torch refuses the optimizer itself")
    with pytest.raises(ValueError, match=words):
        Reptile(model, backend="torch", outer_optimizer=opt)


def test_huge_integers_and_asgds_infinite_t0_are_taken():
    """QA17: math.isnan(10**400) raised OverflowError from the check; ASGD's t0=inf ("never
    average") is harmless and was refused."""
    model = MLP()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    opt.param_groups[0]["my_counter"] = 10 ** 400
    Reptile(model, backend="torch", outer_optimizer=opt)
    model = MLP()
    Reptile(model, backend="torch", outer_optimizer=torch.optim.ASGD(model.parameters(), lr=1e-2, t0=float("inf")))


@pytest.mark.parametrize("make_opt", [
    lambda ps: torch.optim.Adam(ps, lr=1e-2),
    lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
], ids=["adam", "rmsprop"])
def test_a_step_that_overflows_only_the_optimizer_state_is_undone(make_opt):
    """A finite pseudo-gradient whose square times (1 − β2) passes float32's largest value
    (|g| > 5.8e20 with Adam's defaults) makes Adam's (RMSprop's) second moment inf while φ stays finite: the update of that weight is then 0 at every later step, a
    silent freeze.  It is reported as a non-finite meta-step and undone, state included, so that
    training on equals a run that never tried the step."""
    from reptile_fast.core import OuterUpdate

    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(3, 2))
    twin = torch.nn.Parameter(w.detach().clone())
    opt, twin_opt = make_opt([w]), make_opt([twin])
    update, twin_update = OuterUpdate([("w", w)], opt), OuterUpdate([("w", twin)], twin_opt)
    good = torch.full((3, 2), 0.5)
    update.apply([good], torch.zeros(()), 1.0, 1)
    twin_update.apply([good], torch.zeros(()), 1.0, 1)
    state_before, phi_before = _state(opt, [w]), w.detach().clone()

    huge = torch.full((3, 2), 1e30)
    assert torch.isfinite(huge).all() and torch.isinf(1e-3 * huge * huge).all()  # the premise, in float32
    update.apply([huge], torch.zeros(()), 1.0, 2)
    with pytest.raises(NonFiniteError, match="meta-step 2") as info:
        update.check()
    assert info.value.iteration == 2
    assert torch.equal(w.detach(), phi_before), "φ"
    _assert_same_state(_state(opt, [w]), state_before)

    update.apply([good], torch.zeros(()), 1.0, 3)
    twin_update.apply([good], torch.zeros(()), 1.0, 2)
    update.check()
    assert torch.equal(w.detach(), twin.detach()), "φ after training on"
    _assert_same_state(_state(opt, [w]), _state(twin_opt, [twin]))


class _RecordsGradients(torch.optim.SGD):
    """SGD that keeps every gradient it was given (to check that no NaN reached it)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.seen = []

    def step(self, closure=None):
        self.seen += [p.grad.clone() for g in self.param_groups for p in g["params"] if p.grad is not None]
        return super().step(closure)


def test_one_host_read_per_meta_step_and_no_nan_reaches_the_optimizer(monkeypatch):
    """With an outer optimizer the step always runs (on zeros where the meta-step is not finite)
    and one flag is read after it (there were two per good meta-step: before the step and after
    it): a NaN delta is reported as the bad meta-step, with φ and the state as before it, and
    the optimizer never sees the NaN."""
    from reptile_fast.core import OuterUpdate

    w = torch.nn.Parameter(torch.randn(4))
    opt = _RecordsGradients([w], lr=0.1, momentum=0.9)
    update = OuterUpdate([("w", w)], opt)
    update.apply([torch.ones(4)], torch.zeros(()), 1.0, 1)

    reads = []
    real_bool = torch.Tensor.__bool__
    monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(1) or real_bool(t))
    update.apply([torch.full((4,), 0.5)], torch.zeros(()), 1.0, 2)
    state_before, phi_before = _state(opt, [w]), w.detach().clone()
    update.apply([torch.full((4,), float("nan"))], torch.zeros(()), 1.0, 3)
    update.apply([torch.ones(4)], torch.zeros(()), 1.0, 4)  # after a bad one: skipped until the check
    monkeypatch.undo()
    assert len(reads) == 3, f"{len(reads)} host reads for 3 meta-steps"
    with pytest.raises(NonFiniteError, match="meta-step 3"):
        update.check()
    assert torch.equal(w.detach(), phi_before), "φ"
    _assert_same_state(_state(opt, [w]), state_before)
    assert all(torch.isfinite(g).all() for g in opt.seen), "a NaN gradient reached the optimizer"


class _AppendsToItsGroup(torch.optim.SGD):
    """SGD that records each step's size in a list held by its param group (changed in place)."""

    def __init__(self, params, lr):
        super().__init__(params, lr=lr)
        for group in self.param_groups:
            group["history"] = []

    def step(self, closure=None):
        for group in self.param_groups:
            group["history"].append(len(group["history"]))
        return super().step(closure)


def test_an_undone_step_puts_back_a_param_group_list_changed_in_place():
    """The param-group snapshot was shallow: a list the step appended to kept the undone step's
    entry."""
    from reptile_fast.core import OuterUpdate

    w = torch.nn.Parameter(torch.randn(3))
    opt = _AppendsToItsGroup([w], lr=0.1)
    update = OuterUpdate([("w", w)], opt)
    update.apply([torch.ones(3)], torch.zeros(()), 1.0, 1)
    update.check()
    assert opt.param_groups[0]["history"] == [0]
    update.apply([torch.full((3,), float("nan"))], torch.zeros(()), 1.0, 2)
    with pytest.raises(NonFiniteError, match="meta-step 2"):
        update.check()
    assert opt.param_groups[0]["history"] == [0], "the undone step's entry was kept"
    update.apply([torch.ones(3)], torch.zeros(()), 1.0, 3)
    update.check()
    assert opt.param_groups[0]["history"] == [0, 1]


@pytest.mark.parametrize("where", ["optimizer", "global"])
def test_step_hooks_never_see_a_step_with_non_finite_deltas(where):
    """The step ran on every meta-step (NaN set to 0) and was undone after: a post-step hook (an EMA
    of the weights, a step counter) saw the undone step.  With hooks, bad deltas skip the step."""
    from reptile_fast.core import OuterUpdate

    w = torch.nn.Parameter(torch.randn(3))
    opt = torch.optim.SGD([w], lr=0.1, momentum=0.9)
    seen = []
    hook = lambda optimizer, args, kwargs: seen.append(w.detach().clone())  # noqa: E731
    if where == "optimizer":
        handle = opt.register_step_post_hook(hook)
    else:
        from torch.optim.optimizer import register_optimizer_step_post_hook
        handle = register_optimizer_step_post_hook(hook)
    try:
        update = OuterUpdate([("w", w)], opt)
        update.apply([torch.ones(3)], torch.zeros(()), 1.0, 1)
        update.check()
        assert len(seen) == 1
        state_before, phi_before = _state(opt, [w]), w.detach().clone()
        update.apply([torch.full((3,), float("nan"))], torch.zeros(()), 1.0, 2)
        update.apply([torch.ones(3)], torch.zeros(()), 1.0, 3)  # skipped until the check
        assert len(seen) == 1, f"hooks ran on {len(seen) - 1} skipped step(s)"
        with pytest.raises(NonFiniteError, match="meta-step 2"):
            update.check()
        assert torch.equal(w.detach(), phi_before), "φ"
        _assert_same_state(_state(opt, [w]), state_before)
        update.apply([torch.ones(3)], torch.zeros(()), 1.0, 4)
        update.check()
        assert len(seen) == 2 and torch.equal(seen[-1], w.detach())
    finally:
        handle.remove()
