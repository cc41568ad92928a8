"""Backend "compiled" (the whole meta-step as one compiled program) through Reptile.fit and the
CLI: really compiled, equal to the reference on fed-in plans, checkpoints and exact resume."""
import json

import pytest
import torch

from reptile_fast import MLP, Reptile, Sine, TaskBatch, sample_indices
from reptile_fast.backends import UnsupportedModelError
from reptile_fast.cli import main
from reptile_fast.loop import PlanSampler

from _compiled import compiled_calls  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6  # fp32 paths against the fp32 reference backend


def _trainer(backend="compiled", **kw):
    torch.manual_seed(0)
    return Reptile(MLP(1, 16, 1), backend=backend, outer_lr=0.5, **kw)


class Replay:
    """A task distribution that hands out a fixed pool of tasks in order (so that paths drawing
    different chunk sizes see the same tasks)."""

    def __init__(self, tasks: TaskBatch):
        self.tasks, self.next = tasks, 0

    def sample(self, n, *, generator=None, device=None):
        out = self.tasks[self.next:self.next + n]
        self.next += n
        return out


def test_compiled_fit_resume_is_exact(tmp_path):
    full = _trainer()
    hist = full.fit(Sine(), 60, generator=torch.Generator().manual_seed(3), progress=False,
                    checkpoint_dir=tmp_path / "full", checkpoint_every=20)
    assert len(hist["loss"]) == 60 and full.iteration == 60
    assert full.last_fit_stats["stepper"] == "compiled"

    part = _trainer()
    part.fit(Sine(), 40, generator=torch.Generator().manual_seed(3), progress=False,
             checkpoint_dir=tmp_path / "part", checkpoint_every=20)
    resumed = _trainer()
    hist2 = resumed.fit(Sine(), 60, generator=torch.Generator(), progress=False,
                        checkpoint_dir=tmp_path / "part", checkpoint_every=20, resume_from=tmp_path / "part")
    for (name, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), name
    assert hist2["loss"] == hist["loss"]


@pytest.mark.parametrize("annealed", [False, True], ids=["constant", "annealed"])
@pytest.mark.parametrize("meta_batch", [1, 3])
@pytest.mark.parametrize("mode", ["native", "scan"])
def test_compiled_fit_equals_reference_on_fed_plans(mode, meta_batch, annealed):
    """20 meta-steps in chunks of 7 (a partial last chunk included), tasks and plans fed in:
    within fp32 rounding of the reference backend, with a constant and an annealed ε, at
    meta-batch 1 and 3; and the 3 chunks ran as compiled code (the profiler sees them)."""
    iterations, steps, batch = 20, 5, 10
    gen = torch.Generator().manual_seed(11)
    tasks = Sine().sample(iterations * meta_batch, generator=gen)
    plans = sample_indices(iterations * meta_batch, steps, 50, batch, generator=gen).view(
        iterations, meta_batch, steps, batch)
    kw = {"outer_lr_final": 0.0} if annealed else {}
    compiled = _trainer("compiled", backend_options={"chunk": 7, "mode": mode}, **kw)
    reference = _trainer("reference", **kw)
    before = [p.detach().clone() for p in compiled.model.parameters()]
    compiled.stepper(meta_batch).prepare()  # compile (once per shape and process) outside the count
    hist = {}
    for name, trainer in (("compiled", compiled), ("reference", reference)):
        hist[name], ran = compiled_calls(trainer.fit, Replay(tasks), iterations, meta_batch_size=meta_batch,
                                         progress=False, sampler=PlanSampler(Replay(tasks), plans))
        hist[name] = hist[name]["loss"]
        # scan: the profiler sees the 3 chunks (7, 7, 6) run as dynamo-compiled code; the native
        # program is a C library (no dynamo region), checked by its own report below
        expected = 3 if (name == "compiled" and mode == "scan") else 0
        assert ran == expected, f"{name}: {ran} compiled calls for chunks of 7, 7, 6"
    assert compiled.last_fit_stats["mode"] == mode and compiled.last_fit_stats["fallback_reason"] is None
    for (name, a), b, b0 in zip(compiled.model.named_parameters(), reference.model.parameters(), before):
        assert not torch.equal(b, b0), f"{name}: the reference did not train"
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"parameter {name}: {m}")
    torch.testing.assert_close(torch.tensor(hist["compiled"]), torch.tensor(hist["reference"]),
                               rtol=RTOL, atol=ATOL)


def test_compiled_path_really_compiles():
    """A shape no other test uses: dynamo must capture and compile a graph for it (a torch.compile
    that silently returned the function uncompiled would leave the counters unchanged)."""
    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 13, 1), backend="compiled", outer_lr=0.5, backend_options={"mode": "scan"})
    before = counters["stats"]["unique_graphs"]
    _, ran = compiled_calls(trainer.fit, Sine(), 4, progress=False, generator=torch.Generator().manual_seed(0))
    stats = trainer.last_fit_stats
    assert stats["mode"] == "scan" and stats["fallback_reason"] is None
    # one graph for the shape (the scan over a chunk); it ran for the compile's dummy chunk and
    # for the one chunk of 4 meta-steps
    assert counters["stats"]["unique_graphs"] == before + 1, "torch.compile captured no graph"
    assert ran == 2
    assert stats["compile_seconds"] > 0


def test_compiled_fallback_is_loud(monkeypatch):
    """When the compiler fails, the eager path runs with a RuntimeWarning saying why."""
    import reptile_fast.compiled_step as cs

    def broken(*args, **kwargs):
        raise RuntimeError("no compiler here")

    from reptile_fast import native_build

    monkeypatch.setattr(cs.torch, "compile", broken)
    monkeypatch.setattr(native_build, "find_compiler", lambda: None)  # and no C compiler
    monkeypatch.setattr(cs, "_PROGRAMS", {})
    torch.manual_seed(0)
    trainer = Reptile(MLP(1, 11, 1), backend="compiled", outer_lr=0.5)
    with pytest.warns(RuntimeWarning, match="compiled meta-step is unavailable"):
        _, ran = compiled_calls(trainer.fit, Sine(), 3, progress=False)
    reason = trainer.last_fit_stats["fallback_reason"]
    assert trainer.last_fit_stats["mode"] == "eager" and "no compiler here" in reason and "C compiler" in reason
    assert ran == 0


@pytest.mark.parametrize("mode", ["scan", "step"])
def test_a_compile_failing_with_the_cpp_wrapper_is_retried_without_it(monkeypatch, mode):
    """torch 2.11's inductor cannot generate the C++ wrapper of the scan's while_loop
    (InductorError in codegen_subgraph_prefix): the program fell back to "step" with a warning.
    It now compiles the same mode again without the wrapper (Python glue, same kernels)."""
    import warnings

    import reptile_fast.compiled_step as cs

    wrappers, real_compile = [], torch.compile

    def fake_compile(fn, **kwargs):
        options = kwargs.pop("options", {})
        wrappers.append(options.get("cpp_wrapper", False))
        if wrappers[-1]:
            def fails(*args, **kw):
                raise AssertionError("inductor: codegen_subgraph_prefix")
            return fails
        return real_compile(fn, backend="eager", **kwargs)  # dynamo's graph, run without inductor

    monkeypatch.setattr(cs.torch, "compile", fake_compile)
    monkeypatch.setattr(cs, "_PROGRAMS", {})
    g = torch.Generator().manual_seed(3)
    tasks = Sine().sample(6, generator=g)
    plans = sample_indices(6, 5, 50, 10, generator=g).view(6, 1, 5, 10)
    trainers = {}
    for backend, options in (("compiled", {"mode": mode, "chunk": 3}), ("reference", None)):
        trainers[backend] = _trainer(backend, backend_options=options)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)  # no fallback warning
            trainers[backend].fit(Replay(tasks), 6, meta_batch_size=1, progress=False,
                                  sampler=PlanSampler(Replay(tasks), plans))
    stats = trainers["compiled"].last_fit_stats
    assert stats["mode"] == mode and stats["fallback_reason"] is None
    assert wrappers == [True, False]
    for a, b in zip(trainers["compiled"].model.parameters(), trainers["reference"].model.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)


def test_compiled_rejects_unsupported_model():
    model = torch.nn.Sequential(torch.nn.Linear(1, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 1))
    with pytest.raises(UnsupportedModelError):
        Reptile(model, backend="compiled")
    with pytest.raises(TypeError, match="does not accept options"):
        Reptile(MLP(), backend="compiled", backend_options={"precision": "tf32"})


@pytest.mark.parametrize("options, exc, words", [
    ({"mode": "jit"}, ValueError, "mode must be one of"),
    ({"chunk": 0}, ValueError, "chunk must be >= 1"),
    ({"chunk": 2.5}, TypeError, "chunk must be an int"),
])
def test_compiled_options_are_checked_at_construction(options, exc, words):
    """A bad mode was accepted until fit; chunk=0 was reported as 'n_tasks must be >= 1'."""
    with pytest.raises(exc, match=words):
        Reptile(MLP(1, 8, 1), backend="compiled", backend_options=options)


def test_cli_seed_setting_runs_compiled(tmp_path):
    out = tmp_path / "run"
    assert main(["sine", "--iterations", "30", "--hidden-dim", "16", "--eval-tasks", "3",
                 "--eval-steps", "5", "--checkpoint-every", "10", "--out", str(out), "--no-progress"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["backend"] == "compiled"
    assert metrics["ms_per_iteration"] > 0
    assert (out / "checkpoint.pt").exists() and (out / "figure.png").exists()


@pytest.mark.parametrize("meta_batch", [1, 3])
def test_compiled_fit_draws_as_the_other_backends(meta_batch):
    """``fit`` with a generator: backend compiled (chunks of 7, and chunks of 500 cut short)
    trains on the draws the reference backend makes meta-step by meta-step, so the results agree
    within fp32 rounding; ``draw_chunks=True`` (the CLI's and the drop-in's speed option) draws
    other tasks, so its result differs."""
    def run(backend, draw_chunks=False, **options):
        t = _trainer(backend, backend_options=options or None)
        hist = t.fit(Sine(), 20, meta_batch_size=meta_batch, generator=torch.Generator().manual_seed(5),
                     progress=False, draw_chunks=draw_chunks)["loss"]
        return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()]), torch.tensor(hist)

    ref_phi, ref_loss = run("reference")
    for options in ({"chunk": 7}, {}):
        phi, loss = run("compiled", **options)
        torch.testing.assert_close(phi, ref_phi, rtol=RTOL, atol=ATOL, msg=lambda m: f"phi {options}: {m}")
        torch.testing.assert_close(loss, ref_loss, rtol=RTOL, atol=ATOL, msg=lambda m: f"loss {options}: {m}")
    chunked_phi, _ = run("compiled", draw_chunks=True, chunk=7)
    assert (chunked_phi - ref_phi).abs().max() > 1e-4, "draw_chunks=True should draw other tasks"


def test_plan_sampler_draws_tasks_meta_step_by_meta_step():
    """A chunk of a PlanSampler's tasks is the tasks of its meta-steps drawn one at a time."""
    plans = sample_indices(12, 5, 50, 10, generator=torch.Generator().manual_seed(0)).reshape(4, 3, 5, 10)
    chunk = PlanSampler(Sine(), plans, generator=torch.Generator().manual_seed(1)).draw(1, 4)
    single = PlanSampler(Sine(), plans, generator=torch.Generator().manual_seed(1))
    steps = [single.draw(t, 1) for t in range(1, 5)]
    assert torch.equal(chunk[0].y, torch.cat([s[0].y for s in steps]))
    assert torch.equal(chunk[1], torch.cat([s[1] for s in steps]))


def test_draw_chunks_is_checked():
    t = _trainer("reference")
    with pytest.raises(TypeError, match="draw_chunks"):
        t.fit(Sine(), 1, progress=False, draw_chunks="yes")
    plans = sample_indices(1, 5, 50, 10).reshape(1, 1, 5, 10)
    with pytest.raises(ValueError, match="draw_chunks"):
        t.fit(Sine(), 1, progress=False, draw_chunks=True, sampler=PlanSampler(Sine(), plans))
def test_compiled_meta_step_takes_a_plan_of_another_batch_size():
    """A user's plan may hold minibatches of another size than inner_batch_size (every backend
    takes it): the compiled meta-step builds its program for the plan's size and matches the
    reference; a sampler whose plans disagree with the built program gets a clear ValueError."""
    g = torch.Generator().manual_seed(5)
    tasks = Sine().sample(3, generator=g)
    plans = [sample_indices(3, 5, 50, 7, generator=g) for _ in range(2)]
    ref, got = _trainer("reference"), _trainer()
    for plan in plans:
        ref.meta_step(tasks, plan)
        got.meta_step(tasks, plan)
    for a, b in zip(got.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL)
    with pytest.raises(ValueError, match="inner_batch_size=10"):
        _trainer().fit(Sine(), 2, meta_batch_size=3, progress=False,
                       sampler=PlanSampler(Replay(Sine().sample(6, generator=g)),
                                           sample_indices(6, 5, 50, 7, generator=g).view(2, 3, 5, 7)))


def test_compiled_non_finite_names_the_first_bad_meta_step():
    """A non-finite meta-step in the middle of a compiled chunk: NonFiniteError names it (not the
    chunk's first meta-step), and φ and the trainer's iteration are exactly those after the
    meta-step before it (bitwise those of a clean run that stops there), as on every backend."""
    from reptile_fast import NonFiniteError

    T, iterations = 2, 12
    gen = torch.Generator().manual_seed(13)
    pool = Sine().sample(iterations * T, generator=gen)
    plans = sample_indices(iterations * T, 5, 50, 10, generator=gen).view(iterations, T, 5, 10)
    y = pool.y.clone()
    y[6 * T + 1] *= 1e30  # a task of meta-step 7: its inner loss overflows to inf
    poisoned = TaskBatch(pool.x, y)
    clean = _trainer()
    clean.fit(Replay(pool), 6, meta_batch_size=T, progress=False, sampler=PlanSampler(Replay(pool), plans))
    trainer = _trainer()
    with pytest.raises(NonFiniteError, match="meta-step 7") as info:
        trainer.fit(Replay(poisoned), iterations, meta_batch_size=T, progress=False,
                    sampler=PlanSampler(Replay(poisoned), plans))
    assert trainer.last_fit_stats["stepper"] == "compiled"
    assert info.value.iteration == 7 and trainer.iteration == 6
    for a, b in zip(trainer.model.parameters(), clean.model.parameters()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("T,asked,want", [(1, None, 500), (256, None, 125), (4096, None, 5), (4096, 1000, 8),
                                          (70000, None, 1), (64, 997, 1)])
def test_compiled_chunk_holds_a_bounded_number_of_tasks(T, asked, want):
    """A chunk's draws are held at once: at most CHUNK_MAX_TASKS tasks per chunk, cut to the
    largest divisor of the chunk asked for (the default 500, or checkpoint_every)."""
    from reptile_fast.steppers import CHUNK_MAX_TASKS

    stepper = _trainer().stepper(T, chunk=asked)
    assert stepper.chunk == want
    assert stepper.chunk * T <= max(CHUNK_MAX_TASKS, T) and (asked or 500) % stepper.chunk == 0
