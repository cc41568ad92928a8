"""QA50: one ``Reptile`` API over every backend for models a researcher actually passes.

The README ("Python API", "Backends", 'Backend "torch"') promises that every backend gives
backend "reference"'s numbers on the same draws (fp32 rtol 1e-5 / atol 1e-6, float64 ~1e-12), or a
``ValueError``/``TypeError`` naming the problem -- never silently other numbers, never an error
from deep inside torch.

Part (a): each test under "Bugs" FAILS on the code reviewed (commit 1621a95) and says in its
docstring what is expected and which README line promises it.
Part (b): behaviours checked during the review that no test pinned yet (they pass).
"""
import copy

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrizations, prune

from reptile_fast import Reptile, TaskBatch, sample_indices

RTOL, ATOL = 1e-5, 1e-6
KW = dict(inner_steps=3, inner_batch_size=4, inner_lr=0.05, outer_lr=0.5)


def _tasks(T=3, n=12, fin=5, fout=2, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randn(T, n, fin, generator=g).to(dtype), torch.randn(T, n, fout, generator=g).to(dtype))


def _id_tasks(T=3, n=12, vocab=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TaskBatch(torch.randint(0, vocab, (T, n, 3), generator=g), torch.randn(T, n, 2, generator=g))


def _plans(count, T=3, rows=3, n=12, batch=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [sample_indices(T, rows, n, batch, generator=g) for _ in range(count)]


def _flat(model):
    return torch.cat([p.detach().reshape(-1).double() for p in model.parameters()])


def _mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))


def _train(model, backend, task_fn=_tasks, steps=2, rows=3, **kw):
    """φ (flat, float64) after ``steps`` meta-steps on fixed draws."""
    trainer = Reptile(model, backend=backend, **{**KW, **kw})
    for k, plan in enumerate(_plans(steps, rows=rows)):
        trainer.meta_step(task_fn(seed=k), plan)
    trainer.check_finite()
    return _flat(model)


def _first_line(exc):
    return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"


def _refused_by_name_or_equal(run, expected, words):
    """``run()`` either gives ``expected`` (fp32 tolerance) or raises ValueError/TypeError whose
    message contains one of ``words``; any other exception fails the test with its type."""
    failure = None
    try:
        got = run()
    except (ValueError, TypeError) as exc:
        assert any(w in str(exc) for w in words), f"refused, but without naming the problem: {exc}"
        return
    except Exception as exc:  # noqa: BLE001 - the failure names torch's error, first line only
        failure = f"an error from inside torch, not a ValueError/TypeError: {_first_line(exc)}"
    if failure:
        pytest.fail(failure, pytrace=False)
    torch.testing.assert_close(got, expected, rtol=RTOL, atol=ATOL)


# ====================================================================================== (a) bugs
# ---------------------------------------------------------------- 1. parameters frozen after Reptile(...)
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_parameter_frozen_after_construction_is_not_trained_silently(backend):
    """A researcher freezes the trunk mid-training (``model[0].weight.requires_grad_(False)``) after
    ``Reptile(...)`` was built.  Backend reference (the seed's deep copy + ``torch.optim``) leaves
    the frozen weight as it was; backends torch and compiled (and triton) go on training it: φ
    0.012 apart after two meta-steps, silently.

    Expected: either a ValueError naming the frozen parameters -- what the constructor raises
    ("model has frozen parameters ... rather than two answers, refuse", validation.py) and what
    the README promises for other changes after construction ("Parameters replaced after
    construction ... are refused with a ValueError") -- or reference's numbers.  README: "Results
    equal backend `reference` within rtol 1e-5 / atol 1e-6"; "never silently different maths".
    (``structure_key`` compares parameter ids, dtypes and devices, not ``requires_grad``.)"""
    torch.manual_seed(0)
    base = _mlp()
    # Fixed (session 22): every backend refuses the change by name before the meta-step, as the
    # constructor refuses frozen parameters -- reference too, so no backend gives a second answer.
    for name in ("reference", backend):
        model = copy.deepcopy(base)
        trainer = Reptile(model, backend=name, **KW)
        trainer.meta_step(_tasks(seed=0), _plans(1)[0])
        before = copy.deepcopy(model)
        model[0].weight.requires_grad_(False)
        with pytest.raises(ValueError, match=r"requires_grad of the model's parameters \['0.weight'\] changed"):
            trainer.meta_step(_tasks(seed=1), _plans(1)[0])
        assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before.parameters()))
        with pytest.raises(ValueError, match="requires_grad"):
            trainer.adapt(_tasks(seed=1), 3, _plans(1)[0])
        model[0].weight.requires_grad_(True)  # unfrozen again: it trains on
        trainer.meta_step(_tasks(seed=1), _plans(1)[0])


@pytest.mark.parametrize("case", ["fomaml, trunk frozen", "every parameter frozen"])
def test_freezing_after_construction_never_crashes_reference_inside_torch(case):
    """Same change on backend reference with ``algorithm="fomaml"``: ``torch.autograd.grad`` fails
    inside torch ("One of the differentiated Tensors does not require grad"); with every parameter
    frozen, ``loss.backward()`` does ("element 0 of tensors does not require grad").  README: bad
    input "raises `ValueError`/`TypeError` ... naming the problem", the constructor refuses frozen
    parameters by name -- so should the meta-step after they were frozen (or run it leaving the
    frozen parameters as they were, as SGD does)."""
    freeze, kw = {"fomaml, trunk frozen": (lambda m: m[0].requires_grad_(False),
                                           {"algorithm": "fomaml", "inner_steps": 2}),
                  "every parameter frozen": (lambda m: m.requires_grad_(False), {})}[case]
    torch.manual_seed(0)
    model = _mlp()
    trainer = Reptile(model, backend="reference", **{**KW, **kw})
    before = copy.deepcopy(model)
    freeze(model)
    failure = None
    try:
        trainer.meta_step(_tasks(), _plans(1, rows=3)[0])
    except ValueError as exc:
        assert "frozen" in str(exc) or "requires_grad" in str(exc), exc
    except Exception as exc:  # noqa: BLE001 - the failure names torch's error
        failure = f"{case}: an error from inside torch: {_first_line(exc)}"
    else:  # ran: then the frozen parameters must be as they were, as in the seed's loop
        trainer.check_finite()
        assert torch.equal(model[0].weight, before[0].weight)
    if failure:
        pytest.fail(failure, pytrace=False)


# ---------------------------------------------------------------- 2. a forward that keeps an activation
class _KeepsActivation(nn.Module):
    """Stores its hidden activation for later inspection (feature plots, attention maps): a plain
    attribute, as researchers write it."""

    def __init__(self):
        super().__init__()
        self.a, self.o = nn.Linear(5, 8), nn.Linear(8, 2)
        self.features = None

    def forward(self, x):
        h = torch.tanh(self.a(x))
        self.features = h
        return self.o(h)


class _Plain(_KeepsActivation):
    def forward(self, x):
        return self.o(torch.tanh(self.a(x)))


def test_reference_runs_a_model_that_keeps_an_activation_attribute():
    """The trainer's own input check (``InputChecker._check_differentiable``: "one extra forward on
    two points") runs the meta-model's forward with autograd on, which leaves ``self.features`` a
    non-leaf tensor on the meta-model; backend reference's per-task ``copy.deepcopy(model)`` then
    fails inside torch: "RuntimeError: Only Tensors created explicitly by the user (graph leaves)
    support the deepcopy protocol".  The same model deep-copies fine before the trainer's probe
    (the seed's loop runs it), and backend torch runs it.

    Expected: reference gives the numbers of the same model without the attribute (it does not
    change the maths).  README: reference is "anywhere; the oracle"; the probe is "on copies of the
    parameters and buffers, then no cost"; "never a crash deep in torch" (bad input is a
    ValueError/TypeError naming it)."""
    torch.manual_seed(0)
    keeps = _KeepsActivation()
    plain = _Plain()
    plain.load_state_dict(keeps.state_dict())
    expected = _train(plain, "reference")
    copy.deepcopy(keeps)  # the seed's deep copy takes the model as built
    failure = None
    try:
        got = _train(keeps, "reference")
    except Exception as exc:  # noqa: BLE001 - the failure names torch's error
        failure = f"an error from inside torch: {_first_line(exc)}"
    if failure:
        pytest.fail(failure, pytrace=False)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---------------------------------------------------------------- 3. Embedding(sparse=True)
class _Emb(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.e, self.o = nn.Embedding(10, 4, **kw), nn.Linear(12, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.e(x).flatten(1)))


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("backend, kw", [("torch", {}), ("auto", {}), ("reference", {"inner_optimizer": "adam"}),
                                         ("reference", {"algorithm": "fomaml", "inner_steps": 2})],
                         ids=["torch", "auto", "reference-adam", "reference-fomaml"])
def test_a_sparse_embedding_is_run_or_refused_by_name(backend, kw):
    """``nn.Embedding(..., sparse=True)`` (sparse gradients, common in NLP code) with integer ids,
    which the README says backends reference and torch take.  Backend torch and "auto" fail inside
    torch: ``NotImplementedError: Could not run 'aten::view' with arguments from the 'SparseCPU'
    backend``; reference with inner Adam: torch.optim's ``RuntimeError: Adam does not support
    sparse gradients``; reference with FOMAML: ``NotImplementedError`` ('aten::mean.dim' on
    SparseCPU) in the outer update.  (Reference with SGD runs it.)

    Expected: the numbers of the same model with dense gradients (sparse gradients are the same
    values), or a ValueError/TypeError naming the sparse embedding; "auto" should then move to a
    backend that runs it, as it does for other models vmap refuses.  README: "Bad input (... a
    model a backend cannot run ...) raises `ValueError`/`TypeError` (`UnsupportedModelError` is a
    `ValueError`) naming the problem"."""
    torch.manual_seed(0)
    sparse = _Emb(sparse=True)
    dense = _Emb()
    dense.load_state_dict(sparse.state_dict())
    rows = 3  # fomaml: inner_steps=2 and a final row
    expected = _train(dense, "reference", task_fn=_id_tasks, rows=rows, **kw)
    _refused_by_name_or_equal(lambda: _train(sparse, backend, task_fn=_id_tasks, rows=rows, **kw), expected,
                              ("sparse",))


# ---------------------------------------------------------------- 4. torch.nn.utils.prune
def _pruned():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    prune.l1_unstructured(model[0], "weight", amount=0.4)  # weight_orig (parameter) * weight_mask (buffer)
    return model


def test_reference_runs_a_pruned_model_or_refuses_it_by_name():
    """A model pruned with ``torch.nn.utils.prune`` (lottery-ticket style meta-learning): backend
    torch runs it, backend reference fails at the first meta-step inside ``copy.deepcopy``
    ("RuntimeError: Only Tensors created explicitly by the user (graph leaves) support the deepcopy
    protocol": prune keeps the masked ``weight`` as a computed, non-leaf attribute).  Under
    ``adam_state="carried"`` (reference only) or auto's move to reference, the same.

    Expected: reference gives backend torch's numbers (fp32 tolerance), or a ValueError/TypeError
    naming what it cannot copy.  README: reference is "anywhere; the oracle"; bad input is a
    `ValueError`/`TypeError` naming the problem, not an error from inside torch."""
    expected = _train(_pruned(), "torch")
    _refused_by_name_or_equal(lambda: _train(_pruned(), "reference"), expected, ("prun", "deepcopy", "deep copy", "copy"))


def test_pruning_a_layer_after_construction_is_refused_not_a_keyerror():
    """Iterative magnitude pruning during meta-training: ``prune.l1_unstructured(model[2], "weight")``
    after ``Reptile(...)`` on a bias-less last layer renames the parameter ``2.weight`` ->
    ``2.weight_orig`` (the same ``nn.Parameter`` object, same place in ``parameters()``), so the
    trainer's change check (parameter ids only) lets it through, and the next meta-step on backend
    torch fails with ``KeyError: '2.weight'`` in ``core.per_task_deltas``.  (With a bias the order
    of the parameters changes and the README's ValueError comes.)

    Expected: the README's "Parameters replaced after construction ... are refused with a
    `ValueError`: build a new `Reptile`", or a correct meta-step -- not a KeyError."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2, bias=False))
    trainer = Reptile(model, backend="torch", **KW)
    plans = _plans(2)
    trainer.meta_step(_tasks(seed=0), plans[0])
    prune.l1_unstructured(model[2], "weight", amount=0.4)
    failure = None
    try:
        trainer.meta_step(_tasks(seed=1), plans[1])
    except ValueError:
        return
    except Exception as exc:  # noqa: BLE001 - the test reports which
        failure = _first_line(exc)
    if failure:
        pytest.fail(failure, pytrace=False)
    # it ran: then it must be the maths of the pruned model, as reference would run it
    trainer.check_finite()


# ====================================================================================== (b) verified
class _TinyTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(1, 8)
        self.enc = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.o = nn.Linear(8, 2)

    def forward(self, x):  # the 5 features as a sequence of 5 tokens
        return self.o(self.enc(self.inp(x.unsqueeze(-1))).mean(1))


class _Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.att, self.o = nn.Linear(1, 8), nn.MultiheadAttention(8, 2, batch_first=True), nn.Linear(8, 2)

    def forward(self, x):
        h = self.inp(x.unsqueeze(-1))
        return self.o(self.att(h, h, h)[0].mean(1))


class _Bag(nn.Module):
    def __init__(self):
        super().__init__()
        self.e, self.o = nn.EmbeddingBag(10, 4, mode="mean"), nn.Linear(4, 2)

    def forward(self, x):
        return self.o(torch.tanh(self.e(x)))


def _eval_mode(make):
    def build():
        model = make()
        model.eval()
        return model
    return build


_MODELS = {
    "TransformerEncoderLayer": (_TinyTransformer, _tasks),
    "TransformerEncoderLayer(eval: fused fast path in evaluate)": (_eval_mode(_TinyTransformer), _tasks),
    "MultiheadAttention": (_Attention, _tasks),
    "orthogonal parametrization": (lambda: nn.Sequential(nn.Linear(5, 8), nn.Tanh(),
                                                         parametrizations.orthogonal(nn.Linear(8, 8)), nn.Tanh(),
                                                         nn.Linear(8, 2)), _tasks),
    "EmbeddingBag ids": (_Bag, _id_tasks),
    "Embedding padding_idx": (lambda: _Emb(padding_idx=0), _id_tasks),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(_MODELS))
def test_more_researcher_models_match_reference(name):
    """Attention layers, an orthogonal parametrization and bag-of-ids embeddings: backend torch's
    generic path equals reference after two meta-steps and in ``evaluate`` (whose gradient-free
    forward takes torch's fused transformer path in eval mode)."""
    make, task_fn = _MODELS[name]
    torch.manual_seed(0)
    base = make()
    phis, evals = {}, {}
    for backend in ("reference", "torch"):
        model = copy.deepcopy(base)
        phis[backend] = _train(model, backend, task_fn=task_fn)
        trainer = Reptile(model, backend=backend, **KW)
        evals[backend] = trainer.evaluate(task_fn(seed=7), 3, indices=_plans(1, seed=3)[0])
    torch.testing.assert_close(phis["torch"], phis["reference"], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(evals["torch"], evals["reference"], rtol=RTOL, atol=ATOL)


def test_channels_last_conv_net_matches_reference():
    """A conv net moved to ``channels_last`` (non-contiguous parameters in the default sense) with
    BatchNorm in train mode: torch equals reference and the running statistics stay untouched."""
    def image_tasks(seed=0):
        g = torch.Generator().manual_seed(seed)
        return TaskBatch(torch.randn(3, 12, 2, 6, 6, generator=g), torch.arange(12).remainder(3).repeat(3, 1))

    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(144, 3)).to(memory_format=torch.channels_last)
    assert not base[0].weight.is_contiguous()
    got = {}
    for backend in ("reference", "torch"):
        model = copy.deepcopy(base)
        got[backend] = _train(model, backend, task_fn=image_tasks, loss="cross_entropy")
        for b, b0 in zip(model.buffers(), base.buffers()):
            assert torch.equal(b, b0)
    torch.testing.assert_close(got["torch"], got["reference"], rtol=RTOL, atol=ATOL)


def test_state_dict_moves_between_backends():
    """``state_dict()`` of a trainer on one backend loaded into a fresh trainer on another (an outer
    Adam's state included) continues with the same φ as staying on reference."""
    def make():
        return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))

    results = {}
    for src, dst in [("reference", "reference"), ("reference", "torch"), ("torch", "reference")]:
        torch.manual_seed(0)
        model = make()
        trainer = Reptile(model, backend=src, outer_optimizer=torch.optim.Adam(model.parameters(), lr=0.01), **KW)
        plans = _plans(3)
        for k in range(2):
            trainer.meta_step(_tasks(seed=k), plans[k])
        state = copy.deepcopy(trainer.state_dict())
        torch.manual_seed(5)
        other = make()
        resumed = Reptile(other, backend=dst, outer_optimizer=torch.optim.Adam(other.parameters(), lr=0.01), **KW)
        resumed.load_state_dict(state)
        resumed.meta_step(_tasks(seed=9), plans[2])
        resumed.check_finite()
        assert resumed.iteration == 3
        results[src, dst] = _flat(other)
    for key, phi in results.items():
        torch.testing.assert_close(phi, results["reference", "reference"], rtol=RTOL, atol=ATOL, msg=str(key))


def test_a_loss_module_changed_after_construction_is_followed_or_refused():
    """``crit = nn.MSELoss(); Reptile(..., loss=crit)``, then ``crit.reduction = "sum"``: backend
    torch follows the change (reference's numbers: its fast MLP path specialised on "mse" is left),
    backend compiled refuses the no-longer-built-in loss by name at the next meta-step."""
    torch.manual_seed(0)
    base = _mlp()
    got = {}
    for backend in ("reference", "torch", "compiled"):
        crit = nn.MSELoss()
        model = copy.deepcopy(base)
        trainer = Reptile(model, backend=backend, loss=crit, **KW)
        crit.reduction = "sum"
        if backend == "compiled":
            with pytest.raises(ValueError, match="loss"):
                trainer.meta_step(_tasks(), _plans(1)[0])
            continue
        trainer.meta_step(_tasks(), _plans(1)[0])
        got[backend] = _flat(model)
    torch.testing.assert_close(got["torch"], got["reference"], rtol=RTOL, atol=ATOL)


def test_an_output_holding_none_with_a_callable_loss_says_what_is_wrong():
    """QA50 (minor, fixed): ``(out, None)`` with a callable loss was refused saying it "needs a
    callable loss" -- one was given; the message now names what the output holds."""
    class TwoHeads(nn.Module):
        def __init__(self):
            super().__init__()
            self.l = nn.Linear(5, 2)

        def forward(self, x):
            return self.l(x), None

    trainer = Reptile(TwoHeads(), backend="torch", loss=lambda out, y: ((out[0] - y) ** 2).mean(), **KW)
    with pytest.raises(TypeError, match="holds something other than tensors") as info:
        trainer.meta_step(_tasks(), _plans(1)[0])
    assert "needs a callable loss" not in str(info.value)
    # with a named loss the older message stays: a named loss takes one tensor
    trainer = Reptile(TwoHeads(), backend="torch", loss="mse", **KW)
    with pytest.raises(TypeError, match="needs a callable loss"):
        trainer.meta_step(_tasks(), _plans(1)[0])
