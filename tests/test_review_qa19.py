"""QA19's review of issue 3 (backend "torch" for any nn.Module) and issue 15 (the CPU experience).

Each test here failed on the code before its fix (see NOTES-qa19.md)."""
import copy

import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile, TaskBatch, sample_indices

RTOL, ATOL = 1e-5, 1e-6


class UnusedHead(nn.Module):
    """A trunk with two heads of which forward (and so the loss) uses one: ``aux`` has no gradient.
    A researcher's multi-task model trained on one task family looks like this."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 16)
        self.head = nn.Linear(16, 2)
        self.aux = nn.Linear(16, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.trunk(x)))


def _tasks(T=3, n=12, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, n, 5, generator=g).to(dtype), torch.randn(T, n, 2, generator=g).to(dtype))


def _plain_meta_grads(model, tasks, plan, lr, weights=None):
    """Per-task outer directions written out with torch.autograd, an unused parameter's gradient
    taken as zero: FOMAML's (``weights`` None: the gradient on the plan's last row at φ̃) or
    Σ w_s g_s of the inner SGD gradients.  ``name -> [T, *shape]``."""
    names = [n for n, _ in model.named_parameters()]
    out = {n: [] for n in names}
    for i in range(tasks.n_tasks):
        params = {n: p.detach().clone() for n, p in model.named_parameters()}
        acc = {n: torch.zeros_like(p) for n, p in params.items()}
        steps = plan.shape[1] - (1 if weights is None else 0)

        def grads(row):
            leaves = {n: p.requires_grad_(True) for n, p in params.items()}
            ind = plan[i, row]
            loss = nn.functional.mse_loss(torch.func.functional_call(model, leaves, (tasks.x[i][ind],)),
                                          tasks.y[i][ind])
            g = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
            return {n: torch.zeros_like(params[n]) if gi is None else gi for n, gi in zip(names, g)}

        for s in range(steps):
            g = grads(s)
            if weights is not None:
                for n in names:
                    acc[n] += weights[s] * g[n]
            params = {n: (params[n] - lr * g[n]).detach() for n in names}
        final = grads(steps) if weights is None else acc
        for n in names:
            out[n].append(final[n])
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("backend", ["reference", "torch"])
@pytest.mark.parametrize("algo", ["fomaml", "weights"])
def test_a_parameter_the_loss_does_not_use_has_gradient_zero(backend, algo):
    """FOMAML and inner_grad_weights with a parameter the loss never reaches: backend reference
    raised from inside torch (FOMAML: autograd's "appears to not have been used in the graph";
    weights: "unsupported operand type(s) for *: 'float' and 'NoneType'"), while backend torch
    (torch.func.grad: zeros) ran.  Both now take its gradient as zero, equal to a plain loop."""
    torch.manual_seed(0)
    model = UnusedHead()
    tasks = _tasks()
    kw = {"algorithm": "fomaml"} if algo == "fomaml" else {"inner_grad_weights": (0.5, 1.0, 2.0)}
    rows = 4 if algo == "fomaml" else 3
    plan = sample_indices(3, rows, 12, 4, generator=torch.Generator().manual_seed(1))
    trainer = Reptile(copy.deepcopy(model), backend=backend, inner_steps=3, inner_batch_size=4, inner_lr=0.05, **kw)
    got = trainer.backend.inner_loop(trainer.model, tasks, plan, trainer.config).meta_grads
    expected = _plain_meta_grads(model, tasks, plan, 0.05, None if algo == "fomaml" else (0.5, 1.0, 2.0))
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=RTOL, atol=ATOL, msg=n)
    assert got["aux.weight"].abs().max() == 0
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.meta_step(tasks, plan)
    trainer.check_finite()
    assert torch.equal(trainer.model.aux.weight, before["aux.weight"])  # no gradient: φ stays


class TwoHeads(nn.Module):
    """A shared trunk and two heads: forward returns a tuple (or a dict), the loss weighs both."""

    def __init__(self, as_dict=False):
        super().__init__()
        self.as_dict = as_dict
        self.trunk = nn.Linear(5, 16)
        self.main = nn.Linear(16, 2)
        self.aux = nn.Linear(16, 1)

    def forward(self, x):
        h = torch.tanh(self.trunk(x))
        a, b = self.main(h), self.aux(h)
        return {"y": a, "aux": b} if self.as_dict else (a, b)


def _two_head_loss(pred, y):
    a, b = (pred["y"], pred["aux"]) if isinstance(pred, dict) else pred
    return nn.functional.mse_loss(a, y) + 0.1 * b.square().mean()


@pytest.mark.parametrize("as_dict", [False, True])
def test_a_model_with_several_heads_trains_with_a_callable_loss(as_dict):
    """Issue 3's "any nn.Module" with "a callable loss": a multi-head model returning a tuple or dict
    was refused by the input check ("the model must return a tensor ... got tuple") although both
    backends run it.  Now torch equals reference (fp32, rtol 1e-5 / atol 1e-6) after 1 and 3
    meta-steps, and in adapt / evaluate; a named loss still needs a tensor (TypeError)."""
    torch.manual_seed(0)
    base = TwoHeads(as_dict)
    g = torch.Generator().manual_seed(1)
    steps = [(_tasks(seed=k), sample_indices(3, 3, 12, 4, generator=g)) for k in range(3)]
    held = _tasks(seed=9)
    got = {}
    for backend in ("reference", "torch"):
        model = copy.deepcopy(base)
        trainer = Reptile(model, backend=backend, loss=_two_head_loss, inner_steps=3, inner_batch_size=4)
        snaps = []
        for tasks, plan in steps:
            trainer.meta_step(tasks, plan)
            snaps.append(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
        trainer.check_finite()
        post = trainer.evaluate(held, 3, generator=torch.Generator().manual_seed(2))
        got[backend] = (snaps[0], snaps[-1], post)
    for a, b in zip(got["torch"], got["reference"]):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    with pytest.raises(TypeError, match="needs a callable loss"):
        Reptile(TwoHeads(as_dict), backend="torch").meta_step(_tasks())


def test_several_heads_with_a_detached_or_integer_output_are_refused():
    """The input check's guards hold for several heads too: a loss that does not depend on any
    head, or a model whose heads are all integers, is refused by name, not trained with zero gradients."""

    class IntHeads(TwoHeads):
        def forward(self, x):
            a, b = super().forward(x)
            return a.argmax(-1), b.long()

    with pytest.raises(ValueError, match="does not depend on the prediction"):
        Reptile(TwoHeads(), backend="torch",
                loss=lambda p, y: nn.functional.mse_loss(p[0].detach(), y)).meta_step(_tasks())
    with pytest.raises(TypeError, match="must be floating point"):
        Reptile(IntHeads(), backend="torch", loss=lambda p, y: p[0].float().mean()).meta_step(_tasks())


def test_few_shot_evaluation_of_a_model_with_several_heads_names_the_problem():
    """query_logits (evaluate_episodes) predicts from logits: a tuple output failed inside it
    ("tuple indices must be integers or slices, not tuple")."""
    from reptile_fast.fewshot import query_logits

    model = TwoHeads()
    params = {n: p.detach().unsqueeze(0).expand(2, *p.shape).clone() for n, p in model.named_parameters()}
    for transductive in (False, True):
        with pytest.raises(TypeError, match="returns a tuple"):
            query_logits(model, params, torch.randn(2, 3, 5), torch.randn(2, 2, 5), transductive=transductive)


class FrozenTrunk(nn.Module):
    """A trunk run under ``torch.no_grad()`` in forward (a frozen feature extractor): ``torch.fx``
    traces Linear → tanh → Linear, but autograd gives the trunk no gradient."""

    def __init__(self):
        super().__init__()
        self.trunk = nn.Linear(5, 16)
        self.head = nn.Linear(16, 2)

    def forward(self, x):
        with torch.no_grad():
            h = self.trunk(x)
        return self.head(torch.tanh(h))


class ReentrantCheckpoint(FrozenTrunk):
    def forward(self, x):
        import torch.utils.checkpoint as cp

        return self.head(cp.checkpoint(lambda h: torch.tanh(self.trunk(h)), x, use_reentrant=True))


class NumpyInForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        return self.lin(x) * float(x.detach().numpy().std())


def _phi_after_one_step(model, backend, **kw):
    model = copy.deepcopy(model)
    tasks, plan = _tasks(), sample_indices(3, 3, 12, 4, generator=torch.Generator().manual_seed(1))
    trainer = Reptile(model, backend=backend, inner_steps=3, inner_batch_size=4, inner_lr=0.05, **kw)
    trainer.meta_step(tasks, plan)
    trainer.check_finite()
    return trainer, {n: p.detach().clone() for n, p in model.named_parameters()}


def test_a_trunk_under_no_grad_is_not_trained_by_the_mlp_paths():
    """The batched-MLP path trained the no_grad trunk (fx saw a plain chain) while reference left it
    alone: 6e-4 apart after one meta-step, silently.  The MLP recogniser now checks autograd through
    the model's forward: the model takes the generic path (equal to reference), and backend
    'compiled' refuses it by name."""
    from reptile_fast.backends import UnsupportedModelError

    torch.manual_seed(0)
    model = FrozenTrunk()
    _, ref = _phi_after_one_step(model, "reference")
    trainer, got = _phi_after_one_step(model, "torch")
    assert not trainer.backend.uses_fast_path(trainer.model, _tasks(), trainer.config)
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=RTOL, atol=ATOL, msg=n)
    assert torch.equal(ref["trunk.weight"], model.trunk.weight.detach())  # the reference's own answer
    with pytest.raises(UnsupportedModelError, match="'trunk.weight' no gradient"):
        Reptile(copy.deepcopy(model), backend="compiled")


@pytest.mark.filterwarnings("ignore:None of the inputs have requires_grad")
@pytest.mark.parametrize("fast_mlp", [True, False])
def test_models_torch_func_cannot_transform_are_refused_by_name(fast_mlp):
    """A reentrant torch.utils.checkpoint: the MLP path trained the checkpointed layer (reference,
    eager autograd, gives it no gradient: 1.2e-3 apart, silently), the generic path raised torch.func's
    RuntimeError from inside vmap.  A .numpy() read in forward raised "Cannot access data pointer"
    from inside vmap.  Both are now UnsupportedModelError (a ValueError) naming backend reference."""
    from reptile_fast.backends import UnsupportedModelError

    torch.manual_seed(0)
    for model, words in ((ReentrantCheckpoint(), "autograd.Function"), (NumpyInForward(), "data pointer")):
        _phi_after_one_step(model, "reference")  # the seed's way runs it
        with pytest.raises(UnsupportedModelError, match=f"{words}.*backend='reference'"):
            _phi_after_one_step(model, "torch", backend_options={"fast_mlp": fast_mlp})


def test_the_fallback_reason_is_announced_before_the_slow_compile(monkeypatch):
    """Issue 15, a machine without a C compiler: the main job said "compiling the meta-step with
    torch.compile (scan mode; 10-25 s ...)" and only after that wait (80 s on this loaded machine)
    warned why ("no C compiler found (set CC, or install gcc or clang)").  The reason now comes
    through ``progress`` before the slower path starts."""
    import reptile_fast.compiled_step as cs
    from reptile_fast import MLP, native_build
    from reptile_fast.mlp_spec import extract_mlp_spec

    def broken(*args, **kwargs):
        raise RuntimeError("no inductor here")

    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(cs.torch, "compile", broken)
    program = cs.MetaStepProgram(extract_mlp_spec(MLP(1, 8, 1)), lr=0.02, loss="mse", steps=2, n_tasks=1,
                                 batch=3, dtype=torch.float32)
    said = []
    with pytest.warns(RuntimeWarning, match="compiled meta-step is unavailable"):
        program.prepare(progress=said.append)
    assert program.mode == "eager"
    first_compile = next(i for i, m in enumerate(said) if m.startswith("compiling the meta-step with torch.compile"))
    why = [i for i, m in enumerate(said) if "'native' meta-step is unavailable" in m and "no C compiler" in m]
    assert why and why[0] < first_compile, said
