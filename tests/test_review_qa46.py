"""QA46: black-box reviews against the issues' texts (session 20); each test failed before its fix.

1. Backend torch's generic path lost a buffer that the model's forward *reassigns*
   (``self.mu = ...``): ``functional_call`` puts its slots back after the call, so each task's next
   inner step saw the old value (φ 0.056 from reference's deep copies, silently).
2. A global module hook (``register_module_forward_hook``) registered after ``Reptile(...)`` was
   skipped by the hand-written MLP paths (backend torch's fast path, backend compiled).
3. With an ``outer_optimizer``, ``meta_step(outer_lr=...)`` and ``trainer.outer_lr = ...`` were
   accepted, ignored, and reported as the step taken.
4. The drop-in kept ``sample_task()``'s tensors before training on them: a ``sample_task`` that
   refills one buffer trained every kept task on the last one's data.
5. A plan with the same values in another memory layout (transposed strides) changed backend
   torch's and compiled's results by a rounding step.
6. ``Sine(amplitude="15")`` took the characters as the range (1.0, 5.0); strings, bytes and
   bools were numbers.
7. Small input checks: ``TaskBatch[1.0]`` / ``[::-1]`` gave torch's words; a rate that is 0 in
   the parameters' dtype trained nothing; ``fit(Sine, ...)`` (the class) failed inside
   ``sample``; cross-entropy on a 1-output model had loss 0 and never trained.
8. The CLI jobs under torchrun with one process drew from a generator and with two by global
   index: ``--nproc_per_node 1`` and ``2`` trained different models.  Under torchrun they now
   always draw by index, and ``--indexed-tasks`` does so in a plain run.
9. A ``--eval-tasks`` beyond memory was killed by the kernel's OOM killer after training (exit
   137, nothing written); it is now refused before training with the CLI's out-of-memory line.
10. The kernel launchers checked output overlaps against their contiguous copies of the inputs,
    so an output over a strided caller tensor was accepted and written into it.
11. Few-shot inputs: the official runs' folder with a missing file (a raw FileNotFoundError) or
    two copies (collapsed into one silently); Omniglot alphabets of non-strings ("unhashable");
    an image_size that the preloaded images silently overrode; Episodes.to had no dtype and gave
    a raw error on "meta"; score_predictions on empty inputs (accuracy NaN); Mini-ImageNet CSV
    fields with spaces (a shared class passed the disjointness check); an RGBA image's transparent
    background read as ink.

A review of these fixes added: the buffer-carrying wrapper runs no hooks itself (a global hook saw
its (output, buffers) pair); a shared buffer that a forward unties is refused on backend torch;
torchrun is recognised by TORCHELASTIC_RUN_ID (a WORLD_SIZE alone switched a plain run to indexed
draws and backend torch) and a resumed run draws as its checkpoint did; the memory estimate counts
only what evaluation surely holds; the drop-in's reference path copies nothing and draws each
task just before its inner loop; namedtuple tasks are copied; a class with a static ``sample``
is a task distribution.
"""
import copy

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, Sine, TaskBatch, reptile, sample_indices


def _flat(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])


def _regression(T=4, N=20, d_in=3, d_out=2, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    tasks = TaskBatch(torch.randn(T, N, d_in, generator=g) + shift, torch.randn(T, N, d_out, generator=g))
    return tasks, sample_indices(T, 5, N, 10, generator=g)


# ------------------------------------------------------------------ 1. reassigned buffers
class _RunningCentre(nn.Module):
    """Centres its input on a running mean that the forward reassigns (or writes in place)."""

    def __init__(self, in_place: bool):
        super().__init__()
        self.lin, self.in_place = nn.Linear(3, 2), in_place
        self.register_buffer("mu", torch.zeros(3))

    def forward(self, x):
        if self.training:
            new = 0.5 * self.mu + 0.5 * x.mean(0).detach()
            if self.in_place:
                self.mu.copy_(new)
            else:
                self.mu = new
        return self.lin(x - self.mu)


@pytest.mark.parametrize("in_place", [False, True], ids=["reassigned", "in-place"])
def test_a_buffer_the_forward_reassigns_carries_over_like_a_deep_copy(in_place):
    tasks, plan = _regression(shift=3.0)
    torch.manual_seed(0)
    m0 = _RunningCentre(in_place)
    out = {}
    for backend in ("reference", "torch"):
        m = copy.deepcopy(m0)
        tr = Reptile(m, backend=backend, inner_lr=0.1, outer_lr=0.5)
        tr.meta_step(tasks, plan)
        out[backend] = (_flat(m), tr.evaluate(tasks, 3, plan[:, :3]), m.mu.clone())
    (phi_r, ev_r, mu_r), (phi_t, ev_t, mu_t) = out["reference"], out["torch"]
    torch.testing.assert_close(phi_t, phi_r, rtol=1e-5, atol=1e-6)   # was 0.056 apart when reassigned
    torch.testing.assert_close(ev_t, ev_r, rtol=1e-5, atol=1e-6)
    assert torch.equal(mu_t, torch.zeros(3)) and torch.equal(mu_r, torch.zeros(3))  # the meta-model's stays


# ------------------------------------------------------------------ 2. global module hooks
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_global_hook_registered_after_construction_is_followed_or_refused(backend):
    tasks, plan = _regression()
    torch.manual_seed(0)
    m0 = nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 2))
    ref, fast = copy.deepcopy(m0), copy.deepcopy(m0)
    t_ref, t_fast = Reptile(ref, backend="reference", inner_lr=0.1), Reptile(fast, backend=backend, inner_lr=0.1)
    t_ref.meta_step(tasks, plan)
    t_fast.meta_step(tasks, plan)  # built and run without the hook
    handle = nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: 2 * out if isinstance(mod, nn.Linear) else out)
    try:
        t_ref.meta_step(tasks, plan)
        if backend == "compiled":  # its program cannot run a hook: refused, as at construction
            with pytest.raises(ValueError, match="global module hooks"):
                t_fast.meta_step(tasks, plan)
            return
        t_fast.meta_step(tasks, plan)  # followed: the generic path runs the hook
    finally:
        handle.remove()
    torch.testing.assert_close(_flat(fast), _flat(ref), rtol=1e-5, atol=1e-6)  # 0.053 apart before
    t_ref.meta_step(tasks, plan)
    t_fast.meta_step(tasks, plan)  # the hook removed: the fast path again, still equal
    torch.testing.assert_close(_flat(fast), _flat(ref), rtol=1e-5, atol=1e-6)


def test_a_global_hook_on_the_generic_path_sees_the_models_modules_only():
    """The buffer-carrying wrapper is not a hooked module: a global hook that handles a tensor
    output (``o.clone()``) met the wrapper's (output, buffers) pair (review of QA46's first fix)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten(), nn.Linear(8, 2))
    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.randn(2, 12, 1, 4, 4, generator=g), torch.randn(2, 12, 2, generator=g))
    plan = sample_indices(2, 5, 12, 4, generator=g)
    ref = copy.deepcopy(model)
    calls = []
    fwd = nn.modules.module.register_module_forward_hook(lambda m, a, o: (calls.append(type(m)), o.clone())[1])
    pre = nn.modules.module.register_module_forward_pre_hook(lambda m, a: (a[0] * 1.0,))
    try:
        Reptile(ref, backend="reference", inner_batch_size=4).meta_step(tasks, plan)
        Reptile(model, backend="torch", inner_batch_size=4).meta_step(tasks, plan)
    finally:
        fwd.remove()
        pre.remove()
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-5, atol=1e-6)
    assert not any("Capture" in t.__name__ for t in calls)


class _TiedBuffer(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = _RunningCentre(in_place=False)
        self.register_buffer("alias", self.c.mu)  # one tensor, two names

    def forward(self, x):
        return self.c(x) + 0 * self.alias.sum()


def test_a_reassigned_buffer_shared_by_two_names_is_refused_on_backend_torch():
    tasks, plan = _regression(shift=3.0)
    with pytest.raises(ValueError, match="share one tensor"):
        Reptile(_TiedBuffer(), backend="torch", inner_lr=0.1).meta_step(tasks, plan)
    Reptile(_TiedBuffer(), backend="reference", inner_lr=0.1).meta_step(tasks, plan)  # the deep copy unties them


# ------------------------------------------------------------------ 3. outer_lr with an outer optimizer
def test_outer_lr_with_an_outer_optimizer_is_refused_and_the_reported_step_is_the_optimizers():
    tasks, plan = _regression(T=2, d_in=1, d_out=1)
    model = MLP(hidden_dim=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.3)
    tr = Reptile(model, backend="torch", outer_optimizer=opt)
    with pytest.raises(ValueError, match="optimizer's lr"):
        tr.meta_step(tasks, plan, outer_lr=5.0)
    with pytest.raises(ValueError, match="outer_optimizer replaces"):
        tr.outer_lr = 5.0
    assert tr.meta_step(tasks, plan)["outer_lr"] == 0.3  # reported 0.1 (the unused default) before
    opt.param_groups[0]["lr"] = 0.05
    seen = []
    tr.fit(Sine(), 3, generator=torch.Generator().manual_seed(0), progress=False,
           callback=lambda i, m: seen.append(m["outer_lr"]))
    assert seen == [0.05, 0.05]
    # without an optimizer nothing changes
    plain = Reptile(MLP(hidden_dim=8), backend="torch", outer_lr=0.2)
    assert plain.meta_step(tasks, plan, outer_lr=0.7)["outer_lr"] == 0.7 and plain.outer_lr_at(0) == 0.2


# ------------------------------------------------------------------ 4. drop-in: a reused buffer
def test_the_dropin_copies_what_sample_task_returns():
    grid = torch.linspace(-5, 5, 50)
    buffer = torch.empty(50)

    def refilled():  # the seed's distribution written into one tensor that every call reuses
        a, b = torch.rand(()).item() * 4.9 + 0.1, torch.rand(()).item() * 6.283
        buffer.copy_(a * torch.sin(grid + b))
        return grid, buffer, nn.MSELoss()

    def fresh():
        x, y, loss = refilled()
        return x, y.clone(), loss

    for backend, T in (("auto", 1), ("torch", 3)):
        results = []
        for fn in (refilled, fresh):
            torch.manual_seed(0)
            model = reference_mlp()
            reptile(model, 12, fn, _seed_inner_loop(), meta_batch_size=T, backend=backend, progress=False,
                    chunk_size=4)
            results.append(_flat(model))
        assert torch.equal(*results), backend   # 0.2 (auto) / 6e-3 (torch, meta-batch 3) apart before


def test_the_dropin_reference_path_draws_each_task_before_its_inner_loop():
    """A custom inner loop takes tasks as they are (nothing copied: a loop may write into its
    task), each drawn just before its inner loop, as the seed does, so a refilled buffer is right
    at any meta-batch."""
    grid = torch.linspace(-5, 5, 50)
    buffer = torch.empty(50)
    order = []

    def refilled():
        buffer.copy_(torch.rand(()) * torch.sin(grid + torch.rand(()) * 6.283))
        order.append("draw")
        return grid, buffer, nn.MSELoss()

    def fresh():
        x, y, loss = refilled()
        return x, y.clone(), loss

    def my_inner_loop(model, task, k):  # a custom loop: the reference path
        order.append("inner")
        return _seed_inner_loop()(model, task, k)

    results = []
    for fn in (refilled, fresh):
        torch.manual_seed(0)
        model = reference_mlp()
        order.clear()
        with pytest.warns(Warning):
            reptile(model, 3, fn, my_inner_loop, meta_batch_size=3, progress=False)
        results.append(_flat(model))
        assert order == ["draw", "inner"] * 9
    assert torch.equal(*results)


def test_the_dropin_copies_a_namedtuple_task():
    from collections import namedtuple

    Task = namedtuple("Task", "x y loss")
    grid, buffer = torch.linspace(-5, 5, 50), torch.empty(50)

    def refilled():
        buffer.copy_(torch.rand(()) * torch.sin(grid + torch.rand(()) * 6.283))
        return Task(grid, buffer, nn.MSELoss())

    def fresh():
        t = refilled()
        return Task(t.x, t.y.clone(), t.loss)

    results = []
    for fn in (refilled, fresh):
        torch.manual_seed(0)
        model = reference_mlp()
        reptile(model, 6, fn, _seed_inner_loop(), meta_batch_size=3, backend="torch", progress=False)
        results.append(_flat(model))
    assert torch.equal(*results)


def reference_mlp():
    from reptile_fast import reference
    return reference.MLP()


def _seed_inner_loop():
    from reptile_fast import reference
    return reference.perform_k_training_steps


# ------------------------------------------------------------------ 5. plan layouts
@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_plans_memory_layout_does_not_change_the_result(backend):
    torch.manual_seed(0)
    m0 = MLP()
    g = torch.Generator().manual_seed(0)
    tasks = Sine().sample(4, generator=g)
    plan = sample_indices(4, 5, 50, 10, generator=g)
    plan_t = plan.mT.contiguous().mT  # the same values, transposed strides
    assert torch.equal(plan, plan_t) and not plan_t.is_contiguous()
    a, b = copy.deepcopy(m0), copy.deepcopy(m0)
    Reptile(a, backend=backend).meta_step(tasks, plan)
    Reptile(b, backend=backend).meta_step(tasks, plan_t)
    assert torch.equal(_flat(a), _flat(b))
    tr = Reptile(copy.deepcopy(m0), backend=backend)
    p1, p2 = tr.adapt(tasks, 5, plan).params, tr.adapt(tasks, 5, plan_t).params
    assert all(torch.equal(p1[k], p2[k]) for k in p1)


def test_a_samplers_plan_layout_does_not_change_fit():
    """fit(sampler=...) hands its plans to the backend as drawn: the gather itself is layout-free."""
    g = torch.Generator().manual_seed(0)
    tasks = Sine().sample(6, generator=g)
    plan = sample_indices(6, 5, 50, 10, generator=g)

    class Draws:
        def __init__(self, transpose):
            self.plan = plan.mT.contiguous().mT if transpose else plan

        def draw(self, first_iteration, m):
            rows = slice((first_iteration - 1) * 3, (first_iteration - 1 + m) * 3)
            return tasks[rows], self.plan[rows]

    out = []
    for transpose in (False, True):
        torch.manual_seed(0)
        model = MLP()
        Reptile(model, backend="torch").fit(None, 2, meta_batch_size=3, sampler=Draws(transpose), progress=False)
        out.append(_flat(model))
    assert torch.equal(*out)


# ------------------------------------------------------------------ 6. Sine's ranges
@pytest.mark.parametrize("value", ["15", "06", ("0.1", "5"), (b"1", b"3"), (True, True), 5, (1, 2, 3),
                                   torch.tensor([0.1, 5.0])], ids=repr)
def test_sine_ranges_take_pairs_of_numbers_only(value):
    with pytest.raises(TypeError, match="pair of numbers"):
        Sine(amplitude=value)
    with pytest.raises(TypeError, match="pair of numbers"):
        Sine(phase=value)


def test_sine_ranges_still_take_numpy_numbers_and_lists():
    np = pytest.importorskip("numpy")
    assert Sine(amplitude=(np.float32(0.5), np.int64(3))).amplitude == (0.5, 3.0)
    assert Sine(x_range=[-1, 1]).x_range == (-1.0, 1.0)


# ------------------------------------------------------------------ 7. small input checks
def test_taskbatch_float_index_and_reversed_slice_name_taskbatch():
    tasks = Sine().sample(4, generator=torch.Generator().manual_seed(0))
    with pytest.raises(TypeError, match=r"TaskBatch\[1.0\].*not a task index"):
        tasks[1.0]
    with pytest.raises(ValueError, match=r"TaskBatch\[.*step must be positive"):
        tasks[::-1]
    assert tasks[::2].n_tasks == 2


@pytest.mark.parametrize("kwargs", [{"outer_lr": 1e-46}, {"inner_lr": 1e-320}], ids=["outer", "inner"])
def test_a_rate_that_is_zero_in_float32_is_refused(kwargs):
    with pytest.raises(ValueError, match="is 0 in torch.float32"):
        Reptile(MLP(), **kwargs)
    Reptile(MLP(), **{k: 1e-44 for k in kwargs})  # a float32 subnormal: accepted
    Reptile(MLP().double(), **kwargs)  # float64 holds both


def test_a_float16_model_takes_rates_that_float32_holds():
    Reptile(MLP().half(), inner_lr=1e-8, backend="torch")  # torch multiplies float16 steps in float32


def test_fit_with_the_class_instead_of_an_instance_names_the_argument():
    with pytest.raises(TypeError, match="task_distribution must be an instance.*Sine"):
        Reptile(MLP(), backend="torch").fit(Sine, 2, progress=False)


def test_fit_takes_a_class_whose_sample_needs_no_instance():
    class Tasks:
        @staticmethod
        def sample(n, *, generator=None, device=None):
            return Sine().sample(n, generator=generator, device=device)

    Reptile(MLP(hidden_dim=8), backend="torch").fit(Tasks, 2, progress=False)


def test_cross_entropy_on_one_output_is_refused():
    g = torch.Generator().manual_seed(0)
    tasks = TaskBatch(torch.randn(2, 10, 3, generator=g), torch.zeros(2, 10, dtype=torch.long))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    with pytest.raises(ValueError, match="at least 2 outputs"):
        Reptile(model, loss="cross_entropy", backend="torch", inner_batch_size=5).meta_step(tasks)


# ------------------------------------------------------------------ 8. indexed tasks in the CLI jobs
TINY = ["--iterations", "4", "--meta-batch-size", "3", "--hidden-dim", "8", "--eval-tasks", "2",
        "--eval-steps", "2", "--threads", "1", "--no-progress", "--backend", "torch"]


def _sine_run(out, *extra, env=None, monkeypatch=None):
    from reptile_fast.cli import main

    if env:
        for k, v in env.items():
            monkeypatch.setenv(k, v)
    try:
        assert main(["sine", *TINY, "--out", str(out), *extra]) == 0
    finally:
        if env:
            for k in env:
                monkeypatch.delenv(k)
    import json
    metrics = json.loads((out / "metrics.json").read_text())
    state = torch.load(out / "model.pt", weights_only=True)
    state = state.get("state_dict", state)
    return metrics["task_sampler"], torch.cat([v.reshape(-1) for v in state.values()])


TORCHRUN_1 = {"WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "TORCHELASTIC_RUN_ID": "none"}


def test_sine_job_draws_by_index_under_torchrun_and_with_indexed_tasks(tmp_path, monkeypatch):
    """torchrun --nproc_per_node 1 (its agent sets TORCHELASTIC_RUN_ID, WORLD_SIZE=1): a new run
    draws by global index there, as with 2 processes (tests/test_distributed.py holds N ranks
    equal to one indexed process).  A WORLD_SIZE alone (a cluster's shell) changes nothing."""
    kind, plain = _sine_run(tmp_path / "plain")
    assert kind == "generator"
    kind, flagged = _sine_run(tmp_path / "flag", "--indexed-tasks")
    assert kind == "indexed"
    kind, one_rank = _sine_run(tmp_path / "torchrun1", env=TORCHRUN_1, monkeypatch=monkeypatch)
    assert kind == "indexed"
    assert torch.equal(flagged, one_rank) and not torch.equal(flagged, plain)
    kind, exported = _sine_run(tmp_path / "exported", env={"WORLD_SIZE": "1"}, monkeypatch=monkeypatch)
    assert kind == "generator" and torch.equal(exported, plain)
    # the choice is stored: a resumed run goes on drawing by index without the flag
    import json
    assert json.loads((tmp_path / "flag" / "config.json").read_text())["indexed_tasks"] is True


def test_a_generator_run_resumed_under_one_process_torchrun_goes_on_from_its_generator(tmp_path, monkeypatch):
    from reptile_fast.cli import main

    args = [a if a != "4" else "2" for a in TINY]  # 2 meta-steps, then 2 more
    full = tmp_path / "full"
    assert main(["sine", *TINY, "--out", str(full)]) == 0
    part = tmp_path / "part"
    assert main(["sine", *args, "--out", str(part)]) == 0
    for k, v in TORCHRUN_1.items():
        monkeypatch.setenv(k, v)
    assert main(["sine", "--resume", str(part), "--iterations", "4", "--no-progress"]) == 0
    for k in TORCHRUN_1:
        monkeypatch.delenv(k)
    state = [torch.load(d / "model.pt", weights_only=True) for d in (full, part)]
    state = [s.get("state_dict", s) for s in state]
    assert all(torch.equal(state[0][k], state[1][k]) for k in state[0])


def test_indexed_tasks_and_the_compiled_backend_are_refused_together(tmp_path, capsys):
    from reptile_fast.cli import main

    args = [a if a != "torch" else "compiled" for a in TINY]
    assert main(["sine", *args, "--indexed-tasks", "--out", str(tmp_path / "r")]) == 2
    assert "--indexed-tasks" in capsys.readouterr().err


def test_omniglot_job_takes_indexed_tasks(tmp_path):
    from _fake_omniglot import make_folder

    from reptile_fast.cli import main

    train = make_folder(tmp_path / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1")
    test = make_folder(tmp_path / "b", {"Gamma": 3}, prefix="images_background_small2")
    run = tmp_path / "run"
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
                 "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
                 "--eval-batch-size", "2", "--eval-tasks", "2", "--iterations", "2", "--meta-batch-size", "2",
                 "--threads", "1", "--indexed-tasks", "--no-progress", "--out", str(run)]) == 0
    import json
    assert json.loads((run / "metrics.json").read_text())["task_sampler"] == "indexed"


# ------------------------------------------------------------------ 9. memory, before training
def test_eval_tasks_beyond_memory_are_refused_before_training(tmp_path, monkeypatch, capsys):
    from reptile_fast import jobs
    from reptile_fast.cli import main

    # 1 MiB "free": 10000 tasks of the width-8 MLP need ~12 MB (and, unrefused, run quickly here)
    monkeypatch.setattr(jobs, "available_memory", lambda: 1 << 20)
    out = tmp_path / "r"
    assert main(["sine", *TINY, "--eval-tasks", "10000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--eval-tasks 10000" in err
    assert not (out / "checkpoint.pt").exists()  # refused before any training
    assert main(["sine", *TINY, "--out", str(out)]) == 0  # what fits still runs


def test_available_memory_reads_this_machine():
    from reptile_fast.jobs import available_memory

    avail = available_memory()
    assert avail is None or avail > 0


# ------------------------------------------------------------------ 10. kernel outputs over strided inputs
def test_kernel_outputs_may_not_overlap_a_strided_input():
    """The launchers checked overlaps against their contiguous copies of x, y, plan and φ, so an
    output over the caller's strided tensor was accepted and written into it (QA46)."""
    from reptile_fast.kernels import mlp_inner_loop as K1
    from reptile_fast.kernels import mlp_meta_step_v2 as V
    from reptile_fast.kernels.meta_step_guard import new_state

    torch.manual_seed(0)
    T, N, B, R, dims, acts = 2, 6, 3, 2, (1, 4, 1), ("tanh", "identity")
    ps = [torch.randn(4, 1), torch.randn(4), torch.randn(1, 4), torch.randn(1)]
    phi = V.flat_params(ps)
    n = phi.numel()
    idx = torch.randint(0, N, (T, R, B))
    y = torch.randn(T, N, 1)
    buf = torch.randn(4096)
    x = buf[:2 * T * N].view(T, N, 2)[:, :, :1]  # every other element of buf
    x0 = x.clone()
    over_x = buf[:T * n].view(T, n)
    with pytest.raises(ValueError, match="out must not overlap"):
        V.inner_loop(x, y, idx, phi, dims, acts, lr=0.1, out=over_x)
    with pytest.raises(ValueError, match="out must not overlap"):
        K1.mlp_inner_loop(x, y, idx, ps, acts, lr=0.1, out=over_x)
    with pytest.raises(ValueError, match="params_flat must not overlap"):
        V.guarded_meta_step(x, y, idx, buf[:n], dims, acts, lr=0.1, eps=0.1, state=new_state("cpu"),
                            iteration=torch.tensor([1]), loss_out=torch.zeros(1))
    ys = buf[1000:1000 + 2 * T * N].view(T, N, 2)[:, :, :1]  # a strided y
    with pytest.raises(ValueError, match="out_losses must not overlap"):
        V.inner_loop(x0, ys, idx, phi, dims, acts, lr=0.1, out_losses=buf[1000:1000 + T * R].view(T, R))
    with pytest.raises(ValueError, match="partials must not overlap"):
        V.meta_step(x0, ys, idx, phi, dims, acts, lr=0.1, eps=0.1, partials=buf[1000:1000 + 2 * n].view(2, n))
    phis = buf[2000:2000 + 2 * n][::2]  # a strided φ
    with pytest.raises(ValueError, match="out must not .*overlap params_flat"):
        V.meta_step(x0, y, idx, phis, dims, acts, lr=0.1, eps=0.1, out=buf[2000:2000 + n])
    with pytest.raises(ValueError, match="out must not overlap params_flat"):
        V.inner_loop(x0, y, idx, phis, dims, acts, lr=0.1, out=buf[2000:2000 + T * n].view(T, n))
    with pytest.raises(ValueError, match="out must not overlap x"):
        V.meta_step(x, y, idx, phi, dims, acts, lr=0.1, eps=0.1, out=buf[:n])
    with pytest.raises(ValueError, match="out_losses must not overlap"):
        K1.mlp_inner_loop(x0, ys, idx, ps, acts, lr=0.1, out_losses=buf[1000:1000 + T * R].view(T, R))
    ibuf = torch.randint(0, N, (4096,))
    idx_s = ibuf[:T * R * 2 * B].view(T, R, 2 * B)[:, :, ::2]  # a strided plan
    with pytest.raises(ValueError, match="out must not overlap"):
        V.inner_loop(x0, y, idx_s, phi, dims, acts, lr=0.1, out=ibuf.view(torch.float32)[:T * n].view(T, n))
    # guarded_meta_step's outputs against a strided x
    state_over_x = buf.view(torch.int64)[:new_state("cpu").numel()]  # x's memory seen as int64
    for name, kwargs in (("loss_out", dict(loss_out=buf[:1])), ("state", dict(state=state_over_x))):
        args = dict(lr=0.1, eps=0.1, state=new_state("cpu"), iteration=torch.tensor([1]), loss_out=torch.zeros(1))
        args.update(kwargs)
        with pytest.raises(ValueError, match=f"{name} must not overlap"):
            V.guarded_meta_step(x, y, idx, phi.clone(), dims, acts, **args)
    # v1: out over the caller's weights (it copies them into one φ first)
    wbuf = torch.randn(4096)
    pv = [wbuf[0:4].view(4, 1), wbuf[4:8], wbuf[8:12].view(1, 4), wbuf[12:13]]
    with pytest.raises(ValueError, match="out must not overlap .*params"):
        K1.mlp_inner_loop(x0, y, idx, pv, acts, lr=0.1, out=wbuf[:T * n].view(T, n))
    assert torch.equal(x, x0)  # nothing was written


# ------------------------------------------------------------------ 11. few-shot inputs (QA46i)
def test_official_runs_missing_file_in_a_folder_and_two_copies_are_named(tmp_path):
    from _fake_omniglot import make_runs

    from reptile_fast.tasks.omniglot import load_official_runs

    base = make_runs(tmp_path / "a")
    (base / "run01" / "test" / "item02.png").unlink()  # a raw FileNotFoundError before
    with pytest.raises(ValueError, match="missing"):
        load_official_runs(base)
    both = tmp_path / "both"
    make_runs(both / "copyA")
    make_runs(both / "copyB")  # two copies collapsed silently into one set of runs
    with pytest.raises(ValueError, match="twice"):
        load_official_runs(both)


def test_omniglot_alphabets_of_non_strings_and_a_conflicting_image_size_are_named(tmp_path):
    from _fake_omniglot import make_folder

    from reptile_fast.tasks.omniglot import Omniglot, load_omniglot_images

    root = make_folder(tmp_path, {"Alpha": 3, "Beta": 2})
    with pytest.raises(TypeError, match="alphabets must be a list of alphabet names .strings., got a list"):
        Omniglot(root, ways=2, shots=1, alphabets=[["Alpha"]])
    images = load_omniglot_images(root)
    with pytest.raises(ValueError, match="image_size=105 but the preloaded images are 28"):
        Omniglot(images, ways=2, shots=1, image_size=105)
    assert Omniglot(images, ways=2, shots=1, image_size=28).sample(1).x.shape[-1] == 28


def test_episodes_to_casts_and_refuses_the_meta_device(tmp_path):
    from _fake_omniglot import make_folder

    from reptile_fast.tasks.omniglot import Omniglot

    eps = Omniglot(make_folder(tmp_path, {"Alpha": 3}), ways=2, shots=1).sample_episodes(
        2, generator=torch.Generator().manual_seed(0))
    cast = eps.to(dtype=torch.float64)
    assert cast.support.x.dtype == cast.query.x.dtype == torch.float64 and cast.support.y.dtype == torch.long
    with pytest.raises(ValueError, match="meta device holds no data"):
        eps.to("meta")


def test_score_predictions_refuses_empty_and_non_tensor_inputs():
    np = pytest.importorskip("numpy")
    from reptile_fast.fewshot import score_predictions

    p = torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="at least one task and one query"):
        score_predictions(p[:, :0], p[:, :0])
    with pytest.raises(ValueError, match="at least one task and one query"):
        score_predictions(p[:0], p[:0])
    with pytest.raises(TypeError, match="a torch.Tensor. of class labels .*got ndarray"):
        score_predictions(np.zeros((2, 3), dtype=np.int64), p)
    assert score_predictions(p, p).accuracy == 1.0


def test_miniimagenet_csv_fields_are_stripped(tmp_path):
    from PIL import Image

    from reptile_fast.tasks import MiniImageNet

    (tmp_path / "images").mkdir()
    rows = {"train": ["n001", "n002"], "test": ["n001", "n003"]}  # n001 in both, written " n001" in test
    for split, classes in rows.items():
        lines = ["filename,label"]
        for cls in classes:
            for k in range(2):
                name = f"{split}{cls}{k}.png"
                Image.new("RGB", (8, 8)).save(tmp_path / "images" / name)
                lines.append(f"{name}, {cls}" if split == "test" else f"{name},{cls}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="share 1 classes"):
        MiniImageNet(tmp_path, "test", ways=2, shots=1, image_size=8)


def test_a_transparent_background_decodes_as_background():
    from PIL import Image
    import io

    from reptile_fast.tasks.images import decode_grey

    img = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black: a viewer shows white
    for i in range(5, 15):
        img.putpixel((i, 10), (0, 0, 0, 255))  # an opaque black stroke
    buf = io.BytesIO()
    img.save(buf, "PNG")
    x = decode_grey(buf.getvalue(), 20)
    assert float(x[10, 5:15].min()) == 1.0 and float(x[0].max()) == 0.0  # ink 1, background 0
