"""Property-based: over random MLP shapes and hyper-parameters, every available backend ends a
few meta-steps where the float64 reference does.

The oracle is the reference backend run in float64; each backend runs in float32 (TF32 off, see
conftest) and must agree within rtol 1e-5 / atol 1e-6: fp32 rounding (~6e-8 relative per op)
accumulated over a few short inner loops at moderate learning rates stays well inside that,
while a wrong minibatch, step count, learning rate or outer update is off by orders of magnitude
more.  Every example must run on exactly the backends expected for it (``EXPECTED``: all of
them support every plain MLP here); a backend that fails to import or refuses an example fails
the test instead of dropping out.  Triton runs where it can (CUDA, or the interpreter) and is
expected whenever the ``triton`` package is installed.  Examples are derandomized (the same on
every run) to keep CI deterministic.
"""
import copy
import importlib.util
import os

import pytest
import torch

from reptile_fast import MLP, Reptile, TaskBatch, sample_indices
from reptile_fast.backends import BACKENDS, get_backend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
META_STEPS = 2


#: the backends (and variants) every example below must run on, and match the oracle with:
#: backend "compiled" in its eager mode (the compiled program's maths without compiling a
#: program per example), and backend torch's generic path as well as its batched-MLP one.
EXPECTED = ("reference", "torch", "torch-vmap", "compiled-eager")


def test_expected_backends_are_the_registered_ones():
    """A backend added to the registry must be added here (or to the Triton test) too."""
    assert set(BACKENDS) == {"reference", "torch", "triton"}
    for name in BACKENDS:
        if name != "triton" or importlib.util.find_spec("triton") is not None:
            get_backend(name)  # importable: an ImportError fails this test


@st.composite
def cases(draw, *, max_width, max_tasks, max_steps, max_batch):
    depth = draw(st.integers(0, 3))
    batch = draw(st.integers(1, max_batch))
    return dict(
        in_features=draw(st.integers(1, 4)),
        out_features=draw(st.integers(1, 3)),
        hidden=[draw(st.integers(1, max_width)) for _ in range(depth)],
        activation=draw(st.sampled_from(["tanh", "relu", "sigmoid"])),
        tasks=draw(st.integers(1, max_tasks)),
        inner_steps=draw(st.integers(1, max_steps)),
        batch=batch,
        points=draw(st.integers(batch, batch + 6)),
        inner_lr=draw(st.floats(1e-3, 0.05)),
        outer_lr=draw(st.floats(0.05, 1.0)),
        loss=draw(st.sampled_from(["mse", "cross_entropy"])),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


def make_problem(case):
    g = torch.Generator().manual_seed(case["seed"])
    torch.manual_seed(case["seed"])
    classes = max(2, case["out_features"])  # cross-entropy: out_features are the classes
    out = classes if case["loss"] == "cross_entropy" else case["out_features"]
    model = MLP(case["in_features"], output_dim=out, hidden_dims=case["hidden"],
                activation=case["activation"])
    steps = []
    for _ in range(META_STEPS):
        x = torch.rand(case["tasks"], case["points"], case["in_features"], generator=g) * 4 - 2
        if case["loss"] == "cross_entropy":
            y = torch.randint(0, classes, (case["tasks"], case["points"]), generator=g)
        else:
            y = torch.rand(case["tasks"], case["points"], case["out_features"], generator=g) * 2 - 1
        idx = sample_indices(case["tasks"], case["inner_steps"], case["points"], case["batch"], generator=g)
        steps.append((TaskBatch(x, y), idx))
    return model, steps


#: variants run under a backend's name: (backend, backend_options)
VARIANTS = {"torch-vmap": ("torch", {"fast_mlp": False}), "compiled-eager": ("compiled", {"mode": "eager"})}


def run(model, steps, case, backend, dtype):
    # Triton runs on CUDA where there is one (on the CPU only under the interpreter).
    device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
    model = copy.deepcopy(model).to(device=device, dtype=dtype)
    name, options = VARIANTS.get(backend, (backend, None))
    trainer = Reptile(model, backend=name, backend_options=options, inner_lr=case["inner_lr"],
                      inner_steps=case["inner_steps"], inner_batch_size=case["batch"],
                      outer_lr=case["outer_lr"], loss=case["loss"])
    for tasks, idx in steps:
        trainer.meta_step(tasks.to(device=device, dtype=dtype), idx.to(device))
    return {k: v.detach().cpu() for k, v in model.named_parameters()}


def check_backends(case, backends):
    """Every backend in ``backends`` runs the case (an ImportError or UnsupportedModelError
    propagates and fails the test) and ends within RTOL/ATOL of the float64 reference; returns
    the names compared."""
    model, steps = make_problem(case)
    oracle = run(model, steps, case, "reference", torch.float64)
    # the comparison means something only if training moved φ (dead ReLUs may freeze a layer)
    assert any(not torch.equal(v, model.get_parameter(k).detach().double()) for k, v in oracle.items())
    compared = []
    for name in backends:
        got = run(model, steps, case, name, torch.float32)
        compared.append(name)
        for k, v in oracle.items():
            torch.testing.assert_close(got[k], v.float(), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k, name=name: f"backend {name!r}, {k}, case {case}: {m}")
    return compared


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=20, **SETTINGS)
@given(case=cases(max_width=48, max_tasks=4, max_steps=4, max_batch=8))
def test_every_backend_equals_the_float64_reference(case):
    assert check_backends(case, EXPECTED) == list(EXPECTED)


def triton_runnable():
    """Whether the Triton backend can run here; with the triton package installed, the backend
    module must import (an ImportError then fails the test rather than skip it)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return True


@pytest.mark.skipif(not triton_runnable(), reason="the triton package is not installed, or no CUDA and no interpreter")
@settings(max_examples=6, **SETTINGS)
@given(case=cases(max_width=8, max_tasks=2, max_steps=2, max_batch=4))
def test_triton_equals_the_float64_reference(case):
    # Under TRITON_INTERPRET=1 (no CUDA) the kernel runs on CPU tensors, slowly: tiny and few.
    assert check_backends(case, ["triton"]) == ["triton"]
