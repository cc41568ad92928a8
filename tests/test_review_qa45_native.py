"""QA45: a helper's review of backend "compiled" (the native C meta-step, its build cache) in
session 19; each test failed before its fix.  No wrong numbers were found.

1. ``REPTILE_FAST_CACHE_DIR=.``: the library was compiled into the folder but loaded by a bare
   file name, which dlopen looks up on the system's library path: every process compiled again
   and fell back to torch.compile.
2. A failure to create the temporary file in the cache folder (the folder removed meanwhile, no
   inodes) escaped as a bare OSError; ``fit`` crashed on every backend through the plan's C
   selection.  It is a ``NativeCompilerError`` now, which the callers fall back from.
3. ``NativeProgram`` given meta tensors for ``ys`` / ``eps`` / the parameters crashed the
   interpreter (a null pointer in C); refused by name now.
4. An MLP with a 0-wide layer crashed inside the MLP recogniser (``max()`` of an empty tensor).
"""
import copy
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, Sine, native_build

SOURCE = "int rf_qa45_answer(void) { return 42; }\n"

needs_cc = pytest.mark.skipif(native_build.find_compiler() is None, reason="no C compiler")


@needs_cc
def test_a_relative_cache_dir_loads_what_it_compiled(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", ".")
    lib, path, hit = native_build.load_library(SOURCE, "qa45")
    assert lib.rf_qa45_answer() == 42 and path.is_absolute() and path.parent == tmp_path.resolve()
    lib, path2, hit = native_build.load_library(SOURCE, "qa45")
    assert hit and path2 == path  # loaded from the cache, not compiled again


@needs_cc
def test_a_cache_folder_that_cannot_take_a_file_is_a_compiler_error(tmp_path, monkeypatch):
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path))

    def no_file(*args, **kwargs):
        raise FileNotFoundError(2, "No such file or directory", kwargs.get("dir"))

    monkeypatch.setattr(native_build.tempfile, "mkstemp", no_file)
    with pytest.raises(native_build.NativeCompilerError, match="cannot write in"):
        native_build.load_library(SOURCE + "/* another key */\n", "qa45")


@needs_cc
def test_native_program_refuses_tensors_without_cpu_memory():
    from reptile_fast import native_step
    from reptile_fast.mlp_spec import extract_mlp_spec

    spec = extract_mlp_spec(MLP(1, 8, 1))
    prog = native_step.NativeProgram(spec, lr=0.02, loss="mse", steps=1, n_tasks=1, batch=2,
                                     dtype=torch.float32).build()
    params = [p.detach() for p in MLP(1, 8, 1).parameters()]
    xs, ys, eps = torch.zeros(1, 1, 1, 2, 1), torch.zeros(1, 1, 1, 2, 1), torch.full((1,), 0.1)
    prog(params, xs, ys, eps)  # fine
    meta = lambda t: torch.empty_like(t, device="meta")  # noqa: E731
    for args, name in (((params, xs, meta(ys), eps), "ys"), ((params, xs, ys, meta(eps)), "eps"),
                       (([meta(params[0])] + params[1:], xs, ys, eps), "params\\[0\\]")):
        with pytest.raises(ValueError, match=f"{name} must be a dense CPU tensor"):
            prog(*args)


def test_a_zero_wide_layer_trains_on_every_backend_as_on_reference():
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch: initializing zero-element tensors
        model = nn.Sequential(nn.Linear(1, 0), nn.Tanh(), nn.Linear(0, 1))
    out = {}
    for backend in ("reference", "torch", "compiled"):
        trainer = Reptile(copy.deepcopy(model), backend=backend)
        trainer.fit(Sine(), 3, generator=torch.Generator().manual_seed(0), progress=False)
        out[backend] = [p.detach().clone() for p in trainer.model.parameters()]
    for backend in ("torch", "compiled"):
        for got, want in zip(out[backend], out["reference"]):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
