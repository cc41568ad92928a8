"""QA54: a black-box review of backend "triton" through the public API (the fused inner loop, kernels
v1 and v2, the fused meta-step), under the Triton interpreter on the CPU.

Checked (issues 4 and 12, README 'Backend "triton"' and 'Kernel v2'): results equal backend
"reference" within rtol 1e-5 / atol 1e-6 for task counts 1, 3 and 37 (37 on a small program
count: the last persistent round part-empty), through ``meta_step``, ``adapt``, ``fit`` and the
drop-in ``reptile(..., backend="triton")``; the kernels' launchers against an
independent float64 autograd oracle; unsupported models and options refused by name; bad data
(NaN tasks, out-of-range labels and plans that bypass ``TaskBatch``'s checks) refused or guarded
before any launch; checkpoints resumed across triton <-> torch.  No bug was found: every test here
passes, and they pin behaviours the suite did not cover at the public API's level.

Under the interpreter without CUDA (as conftest sets it up); tiny widths, a few tasks.
"""
import os

import torch

if not torch.cuda.is_available():  # as tests/conftest.py: before anything imports triton
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

pytest.importorskip("triton")

import reptile_fast  # noqa: E402
from reptile_fast import Reptile, Sine, TaskBatch, sample_indices  # noqa: E402
from reptile_fast.backends.base import UnsupportedModelError  # noqa: E402
from reptile_fast.core import NonFiniteError  # noqa: E402
from reptile_fast.kernels import meta_step_guard as G  # noqa: E402
from reptile_fast.kernels import mlp_inner_loop as K1  # noqa: E402
from reptile_fast.kernels import mlp_meta_step_v2 as V  # noqa: E402

pytestmark = pytest.mark.skipif(not K1.INTERPRETED, reason="CPU runs need TRITON_INTERPRET=1 at import")

RTOL, ATOL = 1e-5, 1e-6


def _mlp(width=16):
    return nn.Sequential(nn.Linear(1, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))


def _trainer(backend, options=None, model=_mlp, **kw):
    torch.manual_seed(0)
    settings = dict(inner_lr=0.02, inner_steps=3, inner_batch_size=10, outer_lr=0.1)
    settings.update(kw)
    return Reptile(model(), backend=backend, backend_options=options, **settings)


def _params(trainer):
    return [p.detach().clone() for p in trainer.model.parameters()]


def _assert_close(got, want):
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


# options that put 37 tasks on fewer programs than tasks (v2's persistent grid, v1's tiled grid)
OPTIONS_37 = [
    {"kernel": "v2", "launch": {"max_programs": 8}},
    {"kernel": "v2", "fused": True, "launch": {"max_programs": 8}},
    {"kernel": "v1", "launch": {"tasks_per_program": 8}},
]


@pytest.mark.parametrize("options", OPTIONS_37, ids=["v2-8-programs", "v2-fused-8-programs", "v1-8-tasks-per-program"])
def test_37_tasks_on_few_programs_through_the_public_api(options):
    """Issue 12: "a task count that is not a multiple of the program count (e.g. 37 tasks on 8
    programs)" — checked at the kernel level by test_kernel_mlp_meta_step_v2; here through
    ``Reptile.meta_step``, ``adapt`` and ``evaluate`` with ``backend_options["launch"]``, against
    backend "reference" (README: rtol 1e-5 / atol 1e-6)."""
    drawn = Sine().sample(37, generator=torch.Generator().manual_seed(1))
    tasks = TaskBatch(drawn.x[:, :12], drawn.y[:, :12])
    plan = sample_indices(37, 2, tasks.n_points, 5, generator=torch.Generator().manual_seed(2))
    small = dict(model=lambda: _mlp(8), inner_steps=2, inner_batch_size=5)
    ref, tri = _trainer("reference", **small), _trainer("triton", options, **small)
    out_ref, out_tri = ref.meta_step(tasks, plan), tri.meta_step(tasks, plan)
    _assert_close(_params(tri), _params(ref))
    torch.testing.assert_close(out_tri["loss"], out_ref["loss"], rtol=RTOL, atol=ATOL)
    a_ref = ref.adapt(tasks, steps=2, indices=plan)
    a_tri = tri.adapt(tasks, steps=2, indices=plan)
    assert list(a_tri.params) == list(a_ref.params)
    for name in a_ref.params:
        torch.testing.assert_close(a_tri.params[name], a_ref.params[name], rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(a_tri.losses, a_ref.losses, rtol=RTOL, atol=ATOL)


def _oracle(x, y, idx, params, acts, lr, steps):
    """Each task's SGD inner loop by float64 autograd, one task at a time (independent of the library)."""
    fn = {"tanh": torch.tanh, "relu": torch.relu, "sigmoid": torch.sigmoid, "identity": lambda z: z}
    adapted, losses = [], []
    for t in range(x.shape[0]):
        ps = [p.double().clone().requires_grad_() for p in params]
        row = []
        for s in range(steps):
            h = x[t, idx[t, s]].double()
            for layer, act in enumerate(acts):
                h = fn[act](h @ ps[2 * layer].T + ps[2 * layer + 1])
            loss = F.mse_loss(h, y[t, idx[t, s]].double())
            grads = torch.autograd.grad(loss, ps)
            with torch.no_grad():
                for p, g in zip(ps, grads):
                    p -= lr * g
            row.append(loss.item())
        adapted.append(torch.cat([p.detach().reshape(-1) for p in ps]))
        losses.append(row)
    return torch.stack(adapted), torch.tensor(losses, dtype=torch.float64)


@pytest.mark.parametrize("T", [1, 3, 37])
def test_launchers_against_a_float64_oracle(T):
    """README "The fused meta-step is also a public function": ``meta_step`` gives φ + ε·mean_i(φ̃_i − φ)
    and the mean inner loss, ``guarded_meta_step`` applies the same φ in place (bitwise the
    one-launch and three-launch paths), ``inner_loop`` and v1's ``mlp_inner_loop`` the adapted
    parameters — for 1 and 3 tasks, and 37 tasks on 8 programs (the fused meta-step only, to stay
    fast), a non-power-of-two MLP with tanh / relu / identity, compared with float64 autograd (fp32
    rounding only)."""
    torch.manual_seed(0)
    dims, acts, lr, eps, steps = (1, 12, 5, 1), ("tanh", "relu", "identity"), 0.05, 0.5, 3
    params = []
    for i in range(3):
        params += [torch.randn(dims[i + 1], dims[i]) * 0.5, torch.randn(dims[i + 1]) * 0.1]
    x, y = torch.randn(T, 12, 1), torch.randn(T, 12, 1)
    idx = torch.stack([torch.stack([torch.randperm(12)[:6] for _ in range(steps)]) for _ in range(T)])
    want_adapted, want_losses = _oracle(x, y, idx, params, acts, lr, steps)
    phi = V.flat_params(params)
    n = phi.numel()
    want_phi = phi.double() + eps * (want_adapted - phi.double()).mean(0)

    if T < 37:  # (37 tasks: the fused meta-step below; test_37_tasks_on_few_programs_through_the_public_api)
        adapted, losses = V.inner_loop(x, y, idx, phi, dims, acts, lr=lr, config=V.V2Config(max_programs=8))
        assert (adapted[:, :n].double() - want_adapted).abs().max() < 2e-6
        assert (losses.double() - want_losses).abs().max() < 1e-5
        v1, _ = K1.mlp_inner_loop(x, y, idx, params, acts, lr=lr)
        assert (v1[:, :n].double() - want_adapted).abs().max() < 2e-6
    res = V.meta_step(x, y, idx, phi, dims, acts, lr=lr, eps=eps, config=V.V2Config(max_programs=8),
                      task_losses=True)
    assert (res.params.double() - want_phi).abs().max() < 2e-6
    assert abs(res.loss.item() - want_losses.mean().item()) < 1e-5
    for programs in ((8, 1) if T < 37 else ()):  # three launches (T > 1) and, with one program, one launch
        p = phi.clone()
        state, loss_out = G.new_state(p.device), torch.empty(1)
        V.guarded_meta_step(x, y, idx, p, dims, acts, lr=lr, eps=torch.tensor([eps]), state=state,
                            iteration=torch.tensor([7]), loss_out=loss_out, config=V.V2Config(max_programs=programs))
        assert state.tolist() == [1, 0]
        assert (p.double() - want_phi).abs().max() < 2e-6


@pytest.mark.parametrize("model, words", [
    (lambda: nn.Sequential(nn.Linear(1, 8, bias=False), nn.Tanh(), nn.Linear(8, 1)), "no bias"),
    (lambda: nn.Sequential(nn.Linear(1, 8), nn.GELU(), nn.Linear(8, 1)), "GELU"),
    (lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Dropout(0.0), nn.Linear(8, 1)), "Dropout"),
    (lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.ReLU(), nn.Linear(8, 1)), "two activations"),
    (lambda: nn.Sequential(*[m for _ in range(5) for m in (nn.Linear(1 if _ == 0 else 3, 3), nn.Tanh())],
                           nn.Linear(3, 1)), "at most 5 Linear"),
    (lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)).double(), "float32"),
    (lambda: nn.Sequential(nn.Linear(1, 300), nn.Tanh(), nn.Linear(300, 1)), "256"),
], ids=["bias-free", "gelu", "dropout", "two-acts", "six-layers", "float64", "width-300"])
def test_unsupported_models_are_refused_by_name_and_auto_keeps_torch(model, words):
    """README: "Anything else raises UnsupportedModelError naming the reason, and auto falls back to
    torch" (on the CPU auto never picks the interpreter)."""
    with pytest.raises(UnsupportedModelError, match=words):
        _trainer("triton", model=model, inner_batch_size=4)
    assert _trainer("auto", model=model, inner_batch_size=4).backend.name == "torch"


@pytest.mark.parametrize("options", [{}, {"kernel": "v1"}, {"kernel": "v2", "fused": True, "chunk": 2}],
                         ids=["auto", "v1", "fused-chunk-2"])
def test_bad_data_that_bypasses_taskbatch_never_reaches_a_launch(options):
    """README (triton): the trainer checks "each task batch's labels, and the draws of any
    fit(sampler=...) that is not one of the library's own checked samplers", so that the kernels
    (which then skip their own check) never read outside a task's rows: an out-of-range label in a
    ``TaskBatch.trusted`` batch and a custom sampler's out-of-range plan are ValueErrors; a NaN that
    the plan reads is a skipped meta-step reported by NonFiniteError, φ unchanged."""
    x = torch.randn(3, 10, 1)
    labels = torch.randint(0, 3, (3, 10))
    labels[1, 4] = 7
    plan = sample_indices(3, 3, 10, 4, generator=torch.Generator().manual_seed(0))
    ce = lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 3))  # noqa: E731
    trainer = _trainer("triton", options, model=ce, inner_batch_size=4, loss="cross_entropy")
    with pytest.raises(ValueError, match="class label 7"):
        trainer.meta_step(TaskBatch.trusted(x, labels), plan)

    class OutOfRange:
        checked = False

        def draw(self, first_iteration, m):
            return (TaskBatch(torch.randn(3 * m, 10, 1), torch.randint(0, 3, (3 * m, 10))),
                    torch.full((3 * m, 3, 4), 12, dtype=torch.long))

    with pytest.raises(ValueError, match="indices must lie in"):
        trainer.fit(None, 2, meta_batch_size=3, sampler=OutOfRange(), progress=False, handle_signals=False)
    assert trainer.iteration == 0

    y = torch.randn(3, 10, 1)
    mse = _trainer("triton", options, model=lambda: nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1)),
                   inner_batch_size=4)
    mse.meta_step(TaskBatch(x, y), plan)
    before = _params(mse)
    poisoned = x.clone()
    poisoned[2, plan[2, 1, 0], 0] = float("nan")
    mse.meta_step(TaskBatch.trusted(poisoned, y), plan)
    with pytest.raises(NonFiniteError) as err:
        mse.check_finite()
    assert err.value.iteration == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _params(mse)))


@pytest.mark.parametrize("first, second", [
    (("triton", {"kernel": "v2", "fused": True, "chunk": 2}), ("torch", None)),
    (("torch", None), ("triton", {"kernel": "v2", "fused": True, "chunk": 2})),
    (("triton", {"kernel": "v2"}), ("triton", {"kernel": "v1"})),
], ids=["fused-to-torch", "torch-to-fused", "v2-to-v1"])
def test_checkpoint_resume_across_backends(tmp_path, first, second):
    """A run checkpointed on one backend and resumed (``fit(resume_from=...)``) on another ends where an
    uninterrupted backend-"reference" run ends (same draws: fit draws meta-step by meta-step on
    every backend), within rtol 1e-5 / atol 1e-6."""
    def fit(trainer, n, **kw):
        trainer.fit(Sine(), n, meta_batch_size=3, generator=torch.Generator().manual_seed(5), progress=False,
                    handle_signals=False, **kw)
        return trainer

    ref = fit(_trainer("reference"), 6)
    fit(_trainer(*first), 4, checkpoint_dir=tmp_path, checkpoint_every=2)
    resumed = fit(_trainer(*second), 6, checkpoint_dir=tmp_path, resume_from=tmp_path)
    assert resumed.iteration == 6
    _assert_close(_params(resumed), _params(ref))


def test_dropin_triton_cross_entropy_matches_backend_torch():
    """README "Drop-in": ``backend=`` takes "triton"; with ``nn.CrossEntropyLoss()`` tasks (long labels
    [N], a 3-16-4 relu MLP, meta-batch 3) its parameters equal backend torch's on the same draws,
    and the path says "triton"."""
    def sample_task():
        return torch.randn(20, 3), torch.randint(0, 4, (20,)), nn.CrossEntropyLoss()

    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
    b = nn.Sequential(nn.Linear(3, 16), nn.ReLU(), nn.Linear(16, 4))
    b.load_state_dict(a.state_dict())
    torch.manual_seed(5)
    stats = reptile_fast.reptile(a, 3, sample_task, None, meta_batch_size=3, backend="triton", progress=False)
    torch.manual_seed(5)
    reptile_fast.reptile(b, 3, sample_task, None, meta_batch_size=3, backend="torch", progress=False)
    assert stats["path"] == "triton"
    _assert_close(list(a.parameters()), list(b.parameters()))
