"""QA19's review of issue 3 (backend "torch" for any nn.Module) and issue 15 (the CPU experience).

Each test here failed on the code before its fix (see NOTES-qa19.md (folded into the README since; ``git show f6653e3:NOTES-qa19.md``))."""
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


class _ReverseGrad(torch.autograd.Function):
    """A gradient-reversal layer (domain-adversarial training): identity forward, -g backward."""

    @staticmethod
    def forward(ctx, x):
        return x

    @staticmethod
    def backward(ctx, g):
        return -g


class _ReverseGradFunc(torch.autograd.Function):
    """The same, written for torch.func (setup_context, a generated vmap rule)."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x):
        return x.clone()

    @staticmethod
    def setup_context(ctx, inputs, output):
        pass

    @staticmethod
    def backward(ctx, g):
        return -g


class GradientReversal(FrozenTrunk):
    def __init__(self, function=_ReverseGrad):
        super().__init__()
        self.function = function

    def forward(self, x):
        return self.head(self.function.apply(torch.tanh(self.trunk(x))))


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
    RuntimeError from inside vmap.  A gradient-reversal autograd.Function: the MLP path ran the model
    as a plain chain, the trunk's gradient with the wrong sign.  A .numpy() read in forward raised "Cannot access data pointer"
    from inside vmap.  Both are now UnsupportedModelError (a ValueError) naming backend reference."""
    from reptile_fast.backends import UnsupportedModelError

    torch.manual_seed(0)
    for model, words in ((ReentrantCheckpoint(), "autograd.Function"), (NumpyInForward(), "data pointer"),
                         (GradientReversal(), "autograd.Function")):
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
    monkeypatch.setattr(cs, "_inductor_compiler_missing", lambda: None)  # as where g++ is installed
    program = cs.MetaStepProgram(extract_mlp_spec(MLP(1, 8, 1)), lr=0.02, loss="mse", steps=2, n_tasks=1,
                                 batch=3, dtype=torch.float32)
    said = []
    with pytest.warns(RuntimeWarning, match="compiled meta-step is unavailable"):
        program.prepare(progress=said.append)
    assert program.mode == "eager"
    first_compile = next(i for i, m in enumerate(said) if m.startswith("compiling the meta-step with torch.compile"))
    why = [i for i, m in enumerate(said) if "'native' meta-step is unavailable" in m and "no C compiler" in m]
    assert why and why[0] < first_compile, said


# ---------------------------------------------------------------------------- models a researcher passes
class _Counter(nn.Module):
    """A buffer written in forward (a call counter) that scales the output."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls += 1
        return self.lin(x) * (1 + 0.1 * self.calls)


class _Tied(nn.Module):
    """Encoder weight reused transposed by the decoder (an autoencoder's tie) and a layer tied to another."""

    def __init__(self):
        super().__init__()
        self.enc = nn.Linear(5, 8)
        self.mid = nn.Linear(5, 5)
        self.mid2 = nn.Linear(5, 5)
        self.mid2.weight = self.mid.weight
        self.dec_bias = nn.Parameter(torch.zeros(5))
        self.out = nn.Linear(5, 2)

    def forward(self, x):
        h = nn.functional.linear(torch.tanh(self.enc(x)), self.enc.weight.t(), self.dec_bias)
        return self.out(torch.tanh(self.mid2(torch.tanh(self.mid(h)))))


class _InPlace(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(5, 16), nn.Linear(16, 2)

    def forward(self, x):
        h = self.a(x)
        h.relu_()
        h = h * 2
        h.add_(1)
        return self.b(h)


class _Plist(nn.Module):
    def __init__(self):
        super().__init__()
        self.ws = nn.ParameterList([nn.Parameter(torch.randn(5, 8) * 0.3), nn.Parameter(torch.randn(8, 2) * 0.3)])
        self.bs = nn.ParameterDict({"out": nn.Parameter(torch.zeros(2))})

    def forward(self, x):
        return torch.tanh(x @ self.ws[0]) @ self.ws[1] + self.bs["out"]


class _LSTMCellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell, self.out = nn.LSTMCell(5, 6), nn.Linear(6, 2)

    def forward(self, x):  # x [B, 5]: three steps of the same input
        h = c = x.new_zeros(x.shape[0], 6)
        for _ in range(3):
            h, c = self.cell(x, (h, c))
        return self.out(h)


def _conv(norm):
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1),
                         norm(3), nn.ReLU(), nn.Flatten(), nn.Linear(48, 3))


def _researcher_models():
    from torch.nn.utils import parametrizations

    image = ("image", "cross_entropy")
    vector = ("vector", "mse")
    return {
        "conv+GroupNorm": (lambda: _conv(lambda c: nn.GroupNorm(1, c)), image),
        "conv+InstanceNorm(running stats)": (lambda: _conv(lambda c: nn.InstanceNorm2d(c, affine=True,
                                                                                         track_running_stats=True)), image),
        "conv+BatchNorm(no running stats)": (lambda: _conv(lambda c: nn.BatchNorm2d(c, track_running_stats=False)), image),
        "Linear+LayerNorm": (lambda: nn.Sequential(nn.Linear(5, 8), nn.LayerNorm(8), nn.Tanh(), nn.Linear(8, 2)), vector),
        "Linear+BatchNorm1d": (lambda: nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 2)), vector),
        "buffer written in forward": (_Counter, vector),
        "tied weights": (_Tied, vector),
        "in-place ops": (_InPlace, vector),
        "ReLU(inplace=True)": (lambda: nn.Sequential(nn.Linear(5, 8), nn.ReLU(inplace=True), nn.Linear(8, 2)), vector),
        "ParameterList/Dict": (_Plist, vector),
        "LSTMCell loop": (_LSTMCellLoop, vector),
        "weight_norm parametrization": (lambda: nn.Sequential(parametrizations.weight_norm(nn.Linear(5, 8)), nn.Tanh(),
                                                              nn.Linear(8, 2)), vector),
        "GELU/SiLU/PReLU": (lambda: nn.Sequential(nn.Linear(5, 8), nn.GELU(), nn.Linear(8, 8), nn.SiLU(), nn.Linear(8, 8),
                                                  nn.PReLU(), nn.Linear(8, 2)), vector),
    }


def _model_tasks(kind, T=3, n=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    if kind == "image":
        x = torch.randn(T, n, 1, 4, 4, generator=g, dtype=torch.float64).to(dtype)
        return TaskBatch(x, torch.arange(n).remainder(3).repeat(T, 1))
    return _tasks(T, n, seed, dtype)


@pytest.mark.parametrize("name", list(_researcher_models()))
def test_models_a_researcher_passes_match_reference(name):
    """Backend torch (generic path) against reference, fp32 at rtol 1e-5 / atol 1e-6 after 1 and 2
    meta-steps (FOMAML's last row included in the plans) and float64 within 1e-12; the meta-model's
    buffers (running statistics, counters) are left as they were on both backends."""
    make, (kind, loss) = _researcher_models()[name]
    torch.manual_seed(0)
    base = make()
    g = torch.Generator().manual_seed(1)
    steps = [(k, sample_indices(3, 3, 8, 4, generator=g)) for k in range(2)]
    buffers = {n: b.clone() for n, b in base.named_buffers()}
    got = {}
    for backend in ("reference", "torch"):
        for dtype in (torch.float32, torch.float64):
            model = copy.deepcopy(base).to(dtype)
            trainer = Reptile(model, backend=backend, loss=loss, inner_steps=3, inner_batch_size=4, inner_lr=0.05,
                              outer_lr=0.5)
            snaps = []
            for k, plan in steps:
                trainer.meta_step(_model_tasks(kind, seed=k, dtype=dtype), plan)
                snaps.append(torch.cat([p.detach().reshape(-1).double() for p in model.parameters()]))
            trainer.check_finite()
            got[backend, dtype] = snaps
            for n, b in model.named_buffers():
                assert torch.equal(b, buffers[n].to(b.dtype)), (backend, n)
    for k in range(2):
        torch.testing.assert_close(got["torch", torch.float32][k], got["reference", torch.float32][k], rtol=RTOL,
                                   atol=ATOL, msg=lambda m: f"fp32 after meta-step {k + 1}: {m}")
        torch.testing.assert_close(got["torch", torch.float64][k], got["reference", torch.float64][k], rtol=1e-12,
                                   atol=1e-12, msg=lambda m: f"float64 after meta-step {k + 1}: {m}")


def _bool_mask_model():
    class Clip(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(5, 2)

        def forward(self, x):
            y = self.lin(x)
            # selecting by a boolean mask: a data-dependent shape under vmap (torch 2.15 batches the
            # masked assignment y[y < 0] = 0, and then agrees with reference)
            return y + 0.1 * y[y > 0].sum()
    return Clip()


class _DataDependentIf(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(5, 2)

    def forward(self, x):
        y = self.lin(x)
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("case", ["spectral_norm", "bool mask", "data-dependent if", "BatchNorm momentum=None", "frozen",
                                  "mixed dtype"])
def test_models_backend_torch_cannot_run_are_refused_by_name(case):
    """What the torch backend cannot run is a ValueError/TypeError naming the problem, never other
    numbers and never a RuntimeError from inside torch."""
    from torch.nn.utils import parametrizations

    from reptile_fast.backends import UnsupportedModelError

    torch.manual_seed(0)
    if case == "spectral_norm":  # its power iteration writes with out= (no batching rule)
        model, error, words = nn.Sequential(parametrizations.spectral_norm(nn.Linear(5, 8)), nn.Tanh(),
                                            nn.Linear(8, 2)), UnsupportedModelError, "backend='reference'"
    elif case == "bool mask":
        model, error, words = _bool_mask_model(), UnsupportedModelError, "boolean mask.*backend='reference'"
    elif case == "data-dependent if":
        model, error, words = _DataDependentIf(), UnsupportedModelError, "data-dependent control flow.*backend='reference'"
    elif case == "BatchNorm momentum=None":
        model, error, words = (nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8, momentum=None), nn.Linear(8, 2)),
                               UnsupportedModelError, "momentum=None")
    elif case == "frozen":
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
        model[0].weight.requires_grad_(False)
        error, words = ValueError, "frozen parameters"
    else:
        model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2).double())
        error, words = TypeError, "share one floating-point dtype"
    with pytest.raises(error, match=words):
        _phi_after_one_step(model, "torch")


def test_without_any_compiler_the_torch_compile_modes_are_not_tried(monkeypatch):
    """Issue 15 on a machine without C or C++ compilers (a slim container image): after the C
    program, "scan" and "step" were each compiled twice (with and without the C++ wrapper) and each
    failed only at inductor's codegen, 29 s in all on this machine, before the eager path ran.
    Inductor's compiler is now asked first (one --version call) and the two modes are skipped."""
    import torch._inductor.cpp_builder as cpp_builder

    import reptile_fast.compiled_step as cs
    from reptile_fast import MLP, native_build
    from reptile_fast.mlp_spec import extract_mlp_spec

    calls = []

    def compile_spy(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("torch.compile must not be tried without a C++ compiler")

    def no_cxx():
        raise RuntimeError("No working C++ compiler found in torch._inductor.config.cpp.cxx: (None, 'g++')")

    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(cs.torch, "compile", compile_spy)
    monkeypatch.setattr(cpp_builder, "get_cpp_compiler", no_cxx)
    program = cs.MetaStepProgram(extract_mlp_spec(MLP(1, 8, 1)), lr=0.02, loss="mse", steps=2, n_tasks=1,
                                 batch=3, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler for torch.compile"):
        program.prepare()
    assert program.mode == "eager" and calls == []
    assert "install g++" in program.fallback_reason and "install gcc or clang" in program.fallback_reason


def test_a_gradient_reversal_written_for_torch_func_matches_reference():
    """The MLP recogniser refuses a gradient-reversal layer (the trunk's gradient is reversed), where it
    used to run the model as a plain chain; written for torch.func (setup_context,
    generate_vmap_rule), the layer runs on backend torch's generic path and equals reference."""
    from reptile_fast.mlp_spec import extract_mlp_spec
    from reptile_fast.backends import UnsupportedModelError

    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="'trunk.weight' another gradient"):
        extract_mlp_spec(GradientReversal())  # fx traces through the identity forward
    model = GradientReversal(_ReverseGradFunc)
    _, ref = _phi_after_one_step(model, "reference")
    _, got = _phi_after_one_step(model, "torch")
    for n in ref:
        torch.testing.assert_close(got[n], ref[n], rtol=RTOL, atol=ATOL, msg=n)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("whole", [True, False])
def test_a_torchscript_model_is_refused_by_name(whole):
    """A scripted model (or submodule) failed in the input check with AttributeError "'OrderedDictWrapper'
    object has no attribute 'update'" from inside torch (functional_call cannot swap a ScriptModule's
    tensors).  It is a TypeError at construction now, saying to pass the module before scripting."""
    net = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    model = torch.jit.script(net) if whole else nn.Sequential(torch.jit.script(net[0]), net[1], net[2])
    for backend in ("reference", "torch"):
        with pytest.raises(TypeError, match=("the model" if whole else "submodule '0'") + " is a TorchScript module"):
            Reptile(model, backend=backend)
