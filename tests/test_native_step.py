"""The native (C) meta-step program: the reference's numbers per meta-step, the on-disk cache, the
fallbacks and bad input.

Tolerances: fp32 against the fp32 reference backend, the project's rtol 1e-5 / atol 1e-6 (the
program sums matrix products in another order than MKL and uses fused multiply-adds: a few ulps
per step, as the other fast paths); fp64 against the fp64 reference, rtol 1e-10 / atol 1e-12
(the same differences at fp64 rounding, over 10 meta-steps of ~100 operations per parameter).
"""
import copy

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, TaskBatch, compiled_step, native_build, native_step
from reptile_fast.mlp_spec import extract_mlp_spec
from reptile_fast.steppers import gather_chunk
from reptile_fast.tasks import Sine, sample_indices

pytestmark = pytest.mark.skipif(native_step.find_compiler() is None, reason="no C compiler here")


@pytest.fixture(autouse=True)
def _fresh_cache(tmp_path, monkeypatch):
    """Each test compiles into its own cache directory (and never reads the user's)."""
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))


def _tasks(kind, n_tasks, n_points, d_in, d_out, gen, dtype):
    if kind == "sine":
        tb = Sine().sample(n_tasks, generator=gen)
        return TaskBatch(tb.x.to(dtype), tb.y.to(dtype))
    x = torch.randn(n_tasks, n_points, d_in, generator=gen, dtype=dtype)
    if kind == "reg":
        return TaskBatch(x, torch.randn(n_tasks, n_points, d_out, generator=gen, dtype=dtype))
    return TaskBatch(x, torch.randint(0, d_out, (n_tasks, n_points), generator=gen))


def _run_both(model, *, kind, loss, M, T, S, B, lr, eps, dtype, seed=0):
    """``M`` meta-steps of ``T`` tasks on the reference backend (one ``meta_step`` each) and the
    native program (one chunk), from the same φ, tasks and plans; returns both φ and the losses."""
    gen = torch.Generator().manual_seed(seed)
    spec = extract_mlp_spec(model)
    d_in, d_out = spec.dims[0], spec.dims[-1]
    n_points = 20 if kind != "sine" else 50
    tasks = _tasks(kind, M * T, n_points, d_in, d_out, gen, dtype)
    plans = sample_indices(M * T, S, n_points, B, generator=gen)
    ref_model = copy.deepcopy(model)
    ref = Reptile(ref_model, backend="reference", inner_lr=lr, inner_steps=S, inner_batch_size=B,
                  outer_lr=eps, loss=loss)
    ref_losses = []
    for m in range(M):
        sl = slice(m * T, (m + 1) * T)
        ref_losses.append(float(ref.meta_step(TaskBatch(tasks.x[sl], tasks.y[sl]), plans[sl])["loss"]))
    program = native_step.NativeProgram(spec, lr=lr, loss=loss, steps=S, n_tasks=T, batch=B, dtype=dtype)
    names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    phi = [model.get_parameter(n).detach() for n in names]
    xs, ys = gather_chunk(tasks, plans, T)
    new, losses = program(phi, xs, ys, torch.full((M,), eps, dtype=dtype))
    ref_phi = [ref_model.get_parameter(n).detach() for n in names]
    return names, new, ref_phi, losses, ref_losses, program


CASES = {
    # the seed's MLP and setting (1-64-64-1 tanh, 5 steps of 10), meta-batch 1 and 3
    "seed-T1": dict(dims=(1, 64, 64, 1), act="tanh", kind="sine", loss="mse", T=1, S=5, B=10, lr=0.02, eps=0.1),
    "seed-T3": dict(dims=(1, 64, 64, 1), act="tanh", kind="sine", loss="mse", T=3, S=5, B=10, lr=0.02, eps=0.5),
    # widths that are not whole vectors, a narrow hidden layer, relu, cross-entropy
    "odd-relu-ce": dict(dims=(3, 20, 7, 5), act="relu", kind="cls", loss="cross_entropy", T=2, S=3, B=4,
                        lr=0.1, eps=0.3),
    "sigmoid-mse": dict(dims=(2, 33, 2), act="sigmoid", kind="reg", loss="mse", T=1, S=4, B=5, lr=0.05, eps=0.2),
}


def _model(dims, act):
    layers = []
    acts = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid}
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1]))
        if i < len(dims) - 2:
            layers.append(acts[act]())
    return nn.Sequential(*layers)


@pytest.mark.parametrize("case", list(CASES))
def test_native_equals_reference_per_meta_step(case):
    """After 1 and after 20 meta-steps the native program's φ equals the reference backend's."""
    c = CASES[case]
    torch.manual_seed(1)
    model = MLP(1, 64, 1) if case.startswith("seed") else _model(c["dims"], c["act"])
    for M in (1, 20):
        names, new, ref_phi, losses, ref_losses, _ = _run_both(
            model, kind=c["kind"], loss=c["loss"], M=M, T=c["T"], S=c["S"], B=c["B"], lr=c["lr"],
            eps=c["eps"], dtype=torch.float32)
        for n, a, b in zip(names, new, ref_phi):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=lambda m: f"{case} M={M} {n}: {m}")
        torch.testing.assert_close(losses.mean(dim=(1, 2)), torch.tensor(ref_losses), rtol=1e-5, atol=1e-6)


def test_native_float64_matches_float64_reference():
    torch.manual_seed(2)
    model = MLP(1, 64, 1).double()
    names, new, ref_phi, losses, ref_losses, _ = _run_both(
        model, kind="sine", loss="mse", M=10, T=2, S=5, B=10, lr=0.02, eps=0.1, dtype=torch.float64)
    for n, a, b in zip(names, new, ref_phi):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=lambda m: f"{n}: {m}")


def test_cache_across_programs_and_progress_messages():
    """The second program of the same shape loads the library from the disk cache (as a second
    process does) and says nothing; the first one announces its compile."""
    spec = extract_mlp_spec(MLP(1, 16, 1))
    said = []
    first = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                      dtype=torch.float32).build(said.append)
    assert first.cache_hit is False and len(said) == 1 and "compiling" in said[0]
    assert first.library.exists() and first.library.parent == native_step.cache_dir()
    second = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                       dtype=torch.float32).build(said.append)
    assert second.cache_hit is True and len(said) == 1 and second.library == first.library
    other_lr = native_step.NativeProgram(spec, lr=0.03, loss="mse", steps=2, n_tasks=1, batch=3,
                                         dtype=torch.float32)
    assert other_lr.cached_library() is None  # the learning rate is part of the program


def test_meta_step_program_reports_progress_and_uses_native():
    spec = extract_mlp_spec(MLP(1, 8, 1))
    said = []
    program = compiled_step.MetaStepProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                            dtype=torch.float32).prepare(progress=said.append)
    assert program.mode == "native" and program.fallback_reason is None
    assert program.cache_hit is False and said and program.compile_seconds > 0


def test_no_compiler_falls_back_loudly(monkeypatch):
    """Without a C compiler (and so without inductor), the program warns and runs eagerly."""
    def broken_compile(*args, **kwargs):
        raise RuntimeError("inductor needs a compiler too")

    monkeypatch.setattr(native_build, "find_compiler", lambda: None)
    monkeypatch.setattr(torch, "compile", broken_compile)
    spec = extract_mlp_spec(MLP(1, 8, 1))
    program = compiled_step.MetaStepProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                            dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="no C compiler found"):
        program.prepare()
    assert program.mode == "eager" and "native: NativeCompilerError" in program.fallback_reason


def test_compiler_error_is_reported(monkeypatch, tmp_path):
    fake = tmp_path / "cc"
    fake.write_text("#!/bin/sh\necho 'fake compiler: broken' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("CC", str(fake))
    spec = extract_mlp_spec(MLP(1, 8, 1))
    program = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                        dtype=torch.float32)
    with pytest.raises(native_step.NativeCompilerError, match="fake compiler: broken"):
        program.build()


def test_bad_input_and_nan():
    spec = extract_mlp_spec(_model((2, 8, 3), "relu"))
    program = native_step.NativeProgram(spec, lr=0.1, loss="cross_entropy", steps=2, n_tasks=1, batch=4,
                                        dtype=torch.float32)
    phi = [torch.zeros(8, 2), torch.zeros(8), torch.zeros(3, 8), torch.zeros(3)]
    xs = torch.randn(3, 2, 1, 4, 2)
    ys = torch.zeros(3, 2, 1, 4, dtype=torch.long)
    eps = torch.full((3,), 0.5)
    program(phi, xs, ys, eps)
    bad = ys.clone()
    bad[1, 0, 0, 2] = 3
    with pytest.raises(ValueError, match="class label"):
        program(phi, xs, bad, eps)
    with pytest.raises(ValueError, match="xs must be"):
        program(phi, xs[:, :1], ys, eps)
    with pytest.raises(ValueError, match="ys must be"):
        program(phi, xs, ys.float(), eps)
    with pytest.raises(ValueError, match="eps must"):
        program(phi, xs, ys, eps[:2])
    with pytest.raises(ValueError, match="params must"):
        program(phi[:2], xs, ys, eps)
    nan_x = xs.clone()
    nan_x[2, 1, 0, 0, 0] = float("nan")
    new, losses = program(phi, nan_x, ys, eps)
    assert torch.isfinite(losses[:2]).all() and not torch.isfinite(losses[2, 0, 1])
    assert not all(torch.isfinite(p).all() for p in new)  # NaN reaches φ: the callers' check sees it


def test_generate_source_validates():
    spec = extract_mlp_spec(MLP(1, 8, 1))
    with pytest.raises(ValueError, match="float32 or float64"):
        native_step.generate_source(spec, lr=0.1, loss="mse", steps=1, n_tasks=1, batch=1, dtype=torch.float16)
    with pytest.raises(ValueError, match="losses"):
        native_step.generate_source(spec, lr=0.1, loss="l1", steps=1, n_tasks=1, batch=1, dtype=torch.float32)


def test_unwritable_cache_dir_falls_back_to_temp(tmp_path, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(blocker / "cache"))
    monkeypatch.setattr(native_build.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    spec = extract_mlp_spec(MLP(1, 8, 1))
    program = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                        dtype=torch.float32).build()
    assert program.library.parent.parent == tmp_path / "tmp"


def test_damaged_cache_entry_is_rebuilt():
    """A cache file that does not load (e.g. damaged on disk) is dropped and compiled afresh.
    (The junk is written before this process loads anything from that path: rewriting a loaded
    library in place would break the running process, which the atomic rename prevents.)"""
    model = MLP(1, 9, 1)
    spec = extract_mlp_spec(model)
    program = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=2, n_tasks=1, batch=3,
                                        dtype=torch.float32)
    path = native_step._usable_cache_dir() / f"meta_step_{program._key(native_step.find_compiler(), native_step._FLAGS)}.so"
    path.write_bytes(b"not a shared library")
    program.build()
    assert program.cache_hit is False and program.library == path
    phi = [p.detach() for p in model.parameters()]
    new, losses = program(phi, torch.zeros(1, 2, 1, 3, 1), torch.ones(1, 2, 1, 3, 1), torch.ones(1))
    assert torch.isfinite(losses).all()


@pytest.mark.parametrize("vec_bytes", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_block_transpose_equals_a_second_gradient_product(vec_bytes, dtype):
    """A layer kept in both layouts (W and Wᵀ): copying the updated W into Wᵀ by in-register block
    transposes gives bitwise the numbers of applying the gradient to Wᵀ by its own product, at
    every vector width, for widths that are not whole vectors (37 → 29: partial blocks and rows
    past the matrix), and both agree with the reference backend."""
    dims = (3, 37, 29, 2)
    torch.manual_seed(3)
    model = _model(dims, "tanh").to(dtype)
    gen = torch.Generator().manual_seed(4)
    M, T, S, B = 3, 2, 3, 4
    tasks = _tasks("reg", M * T, 20, dims[0], dims[-1], gen, dtype)
    plans = sample_indices(M * T, S, 20, B, generator=gen)
    xs, ys = gather_chunk(tasks, plans, T)
    spec = extract_mlp_spec(model)
    names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    phi = [model.get_parameter(n).detach().clone() for n in names]
    eps = torch.full((M,), 0.5, dtype=dtype)
    out = {}
    for transpose in (True, False):
        program = native_step.NativeProgram(spec, lr=0.1, loss="mse", steps=S, n_tasks=T, batch=B,
                                            dtype=dtype, vec_bytes=vec_bytes, transpose=transpose)
        assert ("transpose(" in program.source) == transpose
        out[transpose] = program(phi, xs, ys, eps)
    for n, a, b in zip(names, out[True][0], out[False][0]):
        assert torch.equal(a, b), f"{n}: the transposed Wᵀ differs from the second product's"
    assert torch.equal(out[True][1], out[False][1]), "losses differ"
    _, new, ref_phi, _, _, _ = _run_both(model, kind="reg", loss="mse", M=M, T=T, S=S, B=B, lr=0.1, eps=0.5,
                                         dtype=dtype, seed=4)
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=1e-10, atol=1e-12)
    for n, a, b in zip(names, out[True][0], ref_phi):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{n} vs reference: {m}")


def test_vec_bytes_is_checked():
    spec = extract_mlp_spec(MLP(1, 8, 1))
    with pytest.raises(ValueError, match="vec_bytes"):
        native_step.generate_source(spec, lr=0.1, loss="mse", steps=1, n_tasks=1, batch=2,
                                    dtype=torch.float32, vec_bytes=24)
