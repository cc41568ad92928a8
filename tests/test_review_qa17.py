"""QA17's review of session afe4347 (outer-optimizer undo, auto following inner_batch_size, fit's
draw errors, Sine.sample_steps' key buffer).  Each test failed on afe4347:

1. the undo's snapshot deep-copied every non-tensor value of the optimizer's state: a custom
   optimizer holding a lock (or any object that cannot be copied) failed every meta-step with
   "cannot pickle '_thread.lock' object", where it trained before; and tensors shared by several
   parameters' states (or a reference to the parameter itself) came back as separate copies;
2. only a RuntimeError from the step was undone: a custom optimizer's ValueError (or a Ctrl-C in
   a bare meta_step loop) left φ and the state half-stepped while ``iteration`` did not advance;
3. under backend="auto" a new inner_batch_size kept the trainer's backend whenever auto resolved
   the same class, without asking it: kernel v2 took 40 points when the environment had moved
   auto to v1, and the first meta-step failed (README: refused "when set, not at the first
   meta-step");
4. fit's wrapper of a task family's ValueError led with "meta_batch_size=N:" whatever the error
   was about: an inner_batch_size beyond the points on the compiled path, or a family's own
   check that has nothing to do with sizes;
5. Sine.sample_steps' buffer error named four sizes but printed three (n_steps · n_tasks as one).
"""
import copy
import threading

import pytest
import torch

from reptile_fast import MLP, NonFiniteError, Reptile, Sine


def _draw(g, n=2):
    tasks = Sine().sample(n, generator=g)
    plan = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(n)]).view(n, 1, 10)
    return tasks, plan


def _overflow(trainer, opt):
    """One meta-step whose outer step overflows φ (the largest float32 lr on a loud task)."""
    lr = opt.param_groups[0]["lr"]
    opt.param_groups[0]["lr"] = 3.4e38
    loud = Sine(amplitude=(1000.0, 1000.0)).sample(2, generator=torch.Generator().manual_seed(2))
    trainer.meta_step(loud, torch.arange(10).repeat(2, 1, 1))
    with pytest.raises(NonFiniteError):
        trainer.check_finite()
    opt.param_groups[0]["lr"] = lr


def test_an_optimizer_state_holding_an_uncopyable_object_still_trains():
    """A lock in the state (a custom optimizer's): afe4347's snapshot failed every meta-step."""

    class LockedSGD(torch.optim.SGD):
        def step(self, closure=None):
            for p in self.param_groups[0]["params"]:
                self.state[p].setdefault("lock", threading.Lock())
            return super().step(closure)

    torch.manual_seed(0)
    model = MLP()
    twin = copy.deepcopy(model)
    tr = Reptile(model, backend="torch", inner_steps=1,
                 outer_optimizer=LockedSGD(model.parameters(), lr=0.1, momentum=0.9))
    ref = Reptile(twin, backend="torch", inner_steps=1,
                  outer_optimizer=torch.optim.SGD(twin.parameters(), lr=0.1, momentum=0.9))
    g, g_twin = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(3):
        tr.meta_step(*_draw(g))
        ref.meta_step(*_draw(g_twin))
    tr.check_finite()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
    lock = tr.outer_optimizer.state[next(model.parameters())]["lock"]
    _overflow(tr, tr.outer_optimizer)  # the undo keeps the object it could not copy
    assert tr.outer_optimizer.state[next(model.parameters())]["lock"] is lock


def test_the_undo_keeps_shared_state_shared_and_parameter_references():
    """A state tensor shared by every parameter (a global step count) and a reference to the
    parameter itself: afe4347 restored a separate clone of each."""

    class Shared(torch.optim.SGD):
        def step(self, closure=None):
            ps = self.param_groups[0]["params"]
            if ps[0] not in self.state:
                count = torch.zeros(())
                for p in ps:
                    self.state[p]["count"] = count
                    self.state[p]["param"] = p
            self.state[ps[0]]["count"].add_(1)
            return super().step(closure)

    torch.manual_seed(0)
    model = MLP()
    opt = Shared(model.parameters(), lr=0.1)
    tr = Reptile(model, backend="torch", inner_steps=1, outer_optimizer=opt)
    g = torch.Generator().manual_seed(1)
    tr.meta_step(*_draw(g))
    _overflow(tr, opt)
    params = list(model.parameters())
    counts = [opt.state[p]["count"] for p in params]
    assert all(c is counts[0] for c in counts), "the shared step count came back as separate tensors"
    assert float(counts[0]) == 1.0  # the undone step's count was put back
    assert all(opt.state[p]["param"] is p for p in params), "a reference to the parameter became a copy"
    tr.meta_step(*_draw(g))
    tr.check_finite()
    assert float(opt.state[params[-1]]["count"]) == 2.0


@pytest.mark.parametrize("error", [RuntimeError, ValueError, KeyboardInterrupt])
def test_any_exception_from_the_step_leaves_phi_and_state_as_before(error):
    """afe4347 undid a RuntimeError only: a custom optimizer's ValueError, or Ctrl-C in a bare
    meta_step loop (fit defers it), left φ half-stepped with iteration not advanced.  (ad53e0b
    left φ half-stepped for a RuntimeError too, as torch's Adam raised on an overflowing step.)"""

    class HalfWay(torch.optim.SGD):
        def step(self, closure=None):
            ps = self.param_groups[0]["params"]
            with torch.no_grad():
                ps[0].add_(1.0)
            self.state[ps[0]]["touched"] = torch.ones(())
            raise error("stopped half-way")

    model = MLP()
    tr = Reptile(model, backend="torch", inner_steps=1, outer_optimizer=HalfWay(model.parameters(), lr=1e-2))
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(error, match="stopped half-way"):
        tr.meta_step(*_draw(torch.Generator().manual_seed(0)))
    for i, (a, b) in enumerate(zip(before, model.parameters())):
        assert torch.equal(a, b), f"phi[{i}] was left half-updated"
    assert len(tr.outer_optimizer.state) == 0 and tr.iteration == 0
    assert all(p.grad is None for p in model.parameters())


def test_auto_asks_its_own_backend_about_a_new_inner_batch_size(monkeypatch):
    """Built under auto with kernel v2 (environment), the environment then back to v1: auto
    resolves TritonBackend again for 40 points, and afe4347 kept the v2 backend without asking
    it (the first meta-step then raised "kernel v2 supports inner batches up to 32")."""
    pytest.importorskip("triton")
    from reptile_fast.backends.triton import KERNEL_ENV, TritonBackend

    monkeypatch.setenv(KERNEL_ENV, "v2")
    monkeypatch.setattr(TritonBackend, "auto_candidate", lambda self, dev: True)
    trainer = Reptile(MLP(1, 8, 1, depth=1), backend="auto", inner_steps=1)
    assert isinstance(trainer.backend, TritonBackend) and trainer.backend.kernel == "v2"
    monkeypatch.delenv(KERNEL_ENV)  # the default kernel, "auto", from here on
    v2_backend = trainer.backend
    trainer.inner_batch_size = 40
    trainer.backend.check_batch_size(trainer.model, 40)  # the backend in use takes it
    assert trainer.backend is not v2_backend  # the named-v2 backend refused 40: replaced
    assert (trainer.backend.kernel_option, trainer.backend.kernel) == ("auto", "v1")  # what a trainer built now gets
    auto_backend = trainer.backend
    trainer.inner_batch_size = 10  # the auto-kernel backend takes 10 too: kept, and back on v2
    assert trainer.backend is auto_backend and trainer.backend.kernel == "v2"


def test_a_draw_error_about_inner_batch_size_does_not_blame_meta_batch_size():
    """Backend compiled draws through Sine.sample_steps: an inner_batch_size beyond the tasks'
    points was reported as "meta_batch_size=1: ... failed: batch_size (60; ...)"."""
    tr = Reptile(MLP(1, 8, 1, depth=1), backend="compiled", inner_batch_size=60,
                 backend_options={"mode": "eager"})
    with pytest.raises(ValueError) as info:
        tr.fit(Sine(), 3, progress=False)
    text = str(info.value)
    assert text.startswith("task_distribution.sample_steps(3, 1, 5, 60, ...) raised: batch_size (60"), text
    assert "inner_batch_size=60" in text and "meta_batch_size=1" in text


def test_a_familys_own_value_error_is_not_presented_as_a_meta_batch_size_problem():
    class Broken(Sine):
        def sample(self, n_tasks, *, generator=None, device=None):
            raise ValueError("amplitude range (5, 1) is empty")

    tr = Reptile(MLP(1, 8, 1, depth=1), backend="torch")
    with pytest.raises(ValueError) as info:
        tr.fit(Broken(), 2, meta_batch_size=4, progress=False)
    text = str(info.value)
    assert text.startswith("task_distribution.sample(4, ...) raised: amplitude range (5, 1) is empty"), text
    assert "n_tasks = meta_batch_size=4" in text
    assert tr.iteration == 0


def test_sample_steps_names_each_size_of_a_buffer_it_cannot_hold():
    """Four names, four sizes (afe4347 printed "n_steps x n_tasks x plan_rows x n_points =
    1152921504606846976 x 5 x 50").  No memory is touched: the count overflows 64 bits."""
    with pytest.raises(ValueError, match=r"n_steps x n_tasks x plan_rows x n_points = 1099511627776 x 1048576 x 5 x 50:"):
        Sine().sample_steps(2 ** 40, 2 ** 20, 5, 10)


def test_sample_steps_still_equals_rounds_of_sample_and_sample_indices():
    """The 4-d key buffer gives the numbers the rounds draw (CPU, bitwise)."""
    from reptile_fast import sample_indices

    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    tasks, plans = Sine().sample_steps(3, 2, 4, 7, generator=g1)
    for i in range(3):
        t = Sine().sample(2, generator=g2)
        p = sample_indices(2, 4, t.n_points, 7, generator=g2)
        assert torch.equal(tasks.x[2 * i:2 * i + 2], t.x) and torch.equal(tasks.y[2 * i:2 * i + 2], t.y)
        assert torch.equal(plans[2 * i:2 * i + 2], p)


def test_the_undo_puts_the_state_back_into_the_optimizers_own_tensors():
    """Adam's moments after an undone step are the same tensor objects, with their old values
    (afe4347 swapped in clones: anything holding the optimizer's tensors, such as a compiled or
    captured step, kept the stepped values).  The snapshot's buffers are reused, not reallocated."""
    torch.manual_seed(0)
    model = MLP()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    tr = Reptile(model, backend="torch", inner_steps=1, outer_optimizer=opt)
    g = torch.Generator().manual_seed(1)
    tr.meta_step(*_draw(g))
    tr.meta_step(*_draw(g))
    objects = {id(p): dict(opt.state[p]) for p in model.parameters()}
    values = {id(p): {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    _overflow(tr, opt)
    for p in model.parameters():
        for k, v in opt.state[p].items():
            assert v is objects[id(p)][k], f"state[{k!r}] is a new tensor"
            assert torch.equal(v, values[id(p)][k]), f"state[{k!r}] keeps the undone step"
    before = [b for _, b in tr._eager.outer._snapshot._buffers.values()]
    tr.meta_step(*_draw(g))
    after = [b for _, b in tr._eager.outer._snapshot._buffers.values()]
    assert len(after) == len(before) and all(a is b for a, b in zip(before, after))


def test_an_inner_loop_out_of_memory_in_fit_is_a_value_error(monkeypatch):
    """README (afe4347): "a meta-batch beyond memory is a ValueError saying 'out of memory' on
    every backend" held for the draws and the compiled program only: draws that fit with inner
    loops that do not (a task's parameters and activations outgrow its points) raised torch's
    allocator error from deep inside fit."""
    model = MLP(1, 8, 1, depth=1)
    tr = Reptile(model, backend="torch", inner_steps=1)
    before = [p.detach().clone() for p in model.parameters()]

    def inner_loop(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr(tr.backend, "inner_loop", inner_loop)
    with pytest.raises(ValueError, match=r"meta-step 1: out of memory \(tried to allocate 20.00 GiB\): lower "
                                         r"meta_batch_size \(3\) or inner_batch_size \(10\)"):
        tr.fit(Sine(), 2, meta_batch_size=3, progress=False)
    assert tr.iteration == 0
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)

    def broken(*args, **kwargs):
        raise RuntimeError("some other failure")

    monkeypatch.setattr(tr.backend, "inner_loop", broken)
    with pytest.raises(RuntimeError, match="some other failure"):  # not an allocation failure: as it was
        tr.fit(Sine(), 2, meta_batch_size=3, progress=False)
