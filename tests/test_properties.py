"""Property-based: over random MLP shapes and hyper-parameters, every available backend ends a
few meta-steps where the float64 reference does.

The oracle is the reference backend run in float64; each backend runs in float32 (TF32 off, see
conftest) and must agree within rtol 1e-5 / atol 1e-6: fp32 rounding (~6e-8 relative per op)
accumulated over a few short inner loops at moderate learning rates stays well inside that,
while a wrong minibatch, step count, learning rate or outer update is off by orders of magnitude
more.  Backends are taken from ``reptile_fast.backends.BACKENDS``; one that cannot be imported
or does not support an example is skipped for it, so this file works before and after a backend
lands.  Examples are derandomized (the same on every run) to keep CI deterministic.
"""
import copy
import os

import pytest
import torch

from reptile_fast import MLP, Reptile, TaskBatch, sample_indices
from reptile_fast.backends import BACKENDS, UnsupportedModelError, get_backend

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
META_STEPS = 2


def available_backends():
    names = []
    for name in sorted(BACKENDS):
        try:
            get_backend(name)
        except ImportError:
            continue
        names.append(name)
    return names


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
VARIANTS = {"torch-vmap": ("torch", {"fast_mlp": False})}


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
    model, steps = make_problem(case)
    oracle = run(model, steps, case, "reference", torch.float64)
    compared = 0
    for name in backends:
        try:
            got = run(model, steps, case, name, torch.float32)
        except UnsupportedModelError:
            continue
        compared += 1
        for k, v in oracle.items():
            torch.testing.assert_close(got[k], v.float(), rtol=RTOL, atol=ATOL,
                                       msg=lambda m, k=k, name=name: f"backend {name!r}, {k}, case {case}: {m}")
    return compared


SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])


@settings(max_examples=20, **SETTINGS)
@given(case=cases(max_width=48, max_tasks=4, max_steps=4, max_batch=8))
def test_every_backend_equals_the_float64_reference(case):
    backends = [b for b in available_backends() if b != "triton"]
    if "torch" in backends:
        backends.append("torch-vmap")  # the generic path as well as the batched-MLP one
    assert check_backends(case, backends) >= 1  # the fp32 reference at least


def triton_runnable():
    if "triton" not in available_backends():
        return False
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    return True


@pytest.mark.skipif(not triton_runnable(), reason="triton backend not importable or not runnable here")
@settings(max_examples=6, **SETTINGS)
@given(case=cases(max_width=8, max_tasks=2, max_steps=2, max_batch=4))
def test_triton_equals_the_float64_reference(case):
    # Under TRITON_INTERPRET=1 (no CUDA) the kernel runs on CPU tensors, slowly: tiny and few.
    assert check_backends(case, ["triton"]) == 1
