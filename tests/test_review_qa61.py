"""QA61 (session 25): an activation held as a plain function attribute (``self.act = torch.tanh``)
and reassigned after the first meta-step (``model.act = torch.relu``) kept the MLP paths —
backend torch's batched MLP, compiled, and triton's kernels v1/v2 and fused stepper — on tanh
while backend reference trained ReLU: the traced spec was cached on module identities only
(``mlp_spec.cached_mlp_spec``) and the trainer's structure key (``model_watch.structure_key``)
did not see the change.  Both now include the modules' plain attributes
(``mlp_spec.module_attributes``).  Tolerance: rtol 1e-5 / atol 1e-6 (fp32 paths that differ in
summation order, the project's)."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn as nn  # noqa: E402

from reptile_fast import Reptile, TaskBatch, sample_indices  # noqa: E402
from reptile_fast.mlp_spec import cached_mlp_spec  # noqa: E402


class Net(nn.Module):
    """A user's MLP whose activation is a function attribute (fx traces it as call_function)."""

    def __init__(self):
        super().__init__()
        self.l1, self.l2 = nn.Linear(1, 8), nn.Linear(8, 1)
        self.act = torch.tanh

    def forward(self, x):
        return self.l2(self.act(self.l1(x)))


def _run(backend, options, call):
    torch.manual_seed(0)
    model = Net()
    g = torch.Generator().manual_seed(1)
    tasks = TaskBatch(torch.randn(3, 10, 1, generator=g), torch.randn(3, 10, 1, generator=g))
    plan = sample_indices(3, 2, 10, 4, generator=torch.Generator().manual_seed(0))
    trainer = Reptile(model, backend=backend, backend_options=options, inner_lr=0.1, inner_steps=2,
                      inner_batch_size=4, outer_lr=0.5)
    trainer.meta_step(tasks, plan)  # the spec is traced (and programs built) with tanh
    model.act = torch.relu          # the user changes the activation
    if call == "meta_step":
        trainer.meta_step(tasks, plan)
        return [p.detach().clone() for p in model.parameters()]
    return list(trainer.adapt(tasks, steps=2, indices=plan).params.values())


def _triton():
    pytest.importorskip("triton")


CASES = [("torch", None, None), ("compiled", None, None),
         ("triton", {"kernel": "v2"}, _triton), ("triton", {"kernel": "v2", "fused": True}, _triton),
         ("triton", {"kernel": "v1"}, _triton)]


@pytest.mark.parametrize("call", ["meta_step", "adapt"])
@pytest.mark.parametrize("backend,options,needs", CASES, ids=["torch", "compiled", "v2", "v2-fused", "v1"])
def test_a_reassigned_function_activation_is_followed(backend, options, needs, call):
    if needs:
        needs()
    want = _run("reference", None, call)
    got = _run(backend, options, call)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m, i=i: f"parameter {i}: {m}")


def test_the_spec_follows_a_reassigned_function_and_is_cached_otherwise():
    model = Net()
    first = cached_mlp_spec(model)
    assert first.activations[0] == "tanh"
    assert cached_mlp_spec(model) is first  # nothing changed: the cached spec
    model.act = torch.relu
    assert cached_mlp_spec(model).activations[0] == "relu"
    model.act = torch.tanh
    assert cached_mlp_spec(model).activations[0] == "tanh"
