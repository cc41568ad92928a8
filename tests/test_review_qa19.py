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
