"""Steady state reads nothing on the host: after the first meta-step of a shape, ``meta_step`` on
the torch backend (MLP fast path and vmap path) never turns a tensor value into a Python value,
and ``fit`` reads only every ``log_every`` meta-steps.  Tested by making every such conversion
raise while the meta-steps run."""
import contextlib

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, NonFiniteError, Reptile, Sine
from reptile_fast.loop import Callback

READS = ("item", "tolist", "numpy", "__bool__", "__int__", "__float__", "__index__", "__len__")


class HostRead(AssertionError):
    pass


@contextlib.contextmanager
def no_host_reads(monkeypatch, counter=None):
    """Every tensor-to-Python conversion raises ``HostRead`` (or is counted) inside the block."""
    originals = {name: getattr(torch.Tensor, name) for name in READS}
    armed = {"on": True}

    def make(name):
        def read(self, *args, **kwargs):
            if armed["on"] and (self.dim() > 0 or name != "__len__"):
                if counter is None:
                    raise HostRead(f"tensor.{name}() read a value on the host")
                counter.append(name)
            return originals[name](self, *args, **kwargs)
        return read

    for name in READS:
        if name == "__len__":
            continue  # len() of a tensor reads its shape, not a value
        monkeypatch.setattr(torch.Tensor, name, make(name))
    try:
        yield
    finally:
        armed["on"] = False
        for name in READS:
            if name != "__len__":
                monkeypatch.setattr(torch.Tensor, name, originals[name])


class ConvNet(nn.Module):
    """Not an MLP chain: the torch backend runs it on the vmap(grad(functional_call)) path."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1, 8), nn.Tanh(), nn.Linear(8, 1))
        self.scale = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.mark.parametrize("model_fn, fast", [(MLP, True), (ConvNet, False)])
@pytest.mark.parametrize("meta_batch", [1, 8])
def test_meta_step_reads_nothing(monkeypatch, model_fn, fast, meta_batch):
    torch.manual_seed(0)
    trainer = Reptile(model_fn(), backend="torch", outer_lr=0.5)
    dist, gen = Sine(), torch.Generator().manual_seed(1)
    trainer.meta_step(dist.sample(meta_batch, generator=gen), generator=gen)  # first sight: checks
    assert trainer.backend.uses_fast_path(trainer.model, dist.sample(1), trainer.config) == fast
    with no_host_reads(monkeypatch):
        for _ in range(5):
            out = trainer.meta_step(dist.sample(meta_batch, generator=gen), generator=gen)
    assert isinstance(out["loss"], torch.Tensor) and out["loss"].dim() == 0
    assert trainer.iteration == 6
    trainer.check_finite()  # reads, outside the steady state


class CountReads(Callback):
    def __init__(self):
        self.reads = []

    def on_read(self, loop, losses):
        self.reads.append((loop.iteration, len(losses)))


def test_fit_reads_only_every_log_every(monkeypatch):
    """fit with log_every=10 over 40 meta-steps: host reads happen only at the 4 reads (the loss
    history, finiteness), never between them."""
    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch", outer_lr=0.5)
    trainer.meta_step(Sine().sample(4))  # first sight of the shape
    counted, reads = [], CountReads()
    with no_host_reads(monkeypatch, counter=counted):
        history = trainer.fit(Sine(), 41, meta_batch_size=4, progress=False, log_every=10,
                              generator=torch.Generator().manual_seed(0), callbacks=[reads])
    assert reads.reads == [(11, 10), (21, 10), (31, 10), (41, 10)]
    assert len(history["loss"]) == 40
    # per read: the finiteness flag and the losses' tolist -> a handful, not one per meta-step
    assert 0 < len(counted) <= 4 * 3, counted


def test_fit_reports_the_first_non_finite_step_at_its_next_read():
    """A meta-step that overflows is skipped on the device; fit raises at the next read naming it,
    with φ and iteration as after the step before it."""

    class Spiky:
        """Sine tasks, except meta-step 13's, whose targets overflow the loss."""

        def __init__(self):
            self.calls = 0

        def sample(self, n, *, generator=None, device=None):
            self.calls += 1
            tasks = Sine().sample(n, generator=generator, device=device)
            if self.calls == 13:
                return type(tasks).trusted(tasks.x, tasks.y * 1e30)
            return tasks

    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend="torch", outer_lr=0.5)
    snapshots = {}

    class Snap(Callback):
        def on_chunk_end(self, loop, read):
            if loop.iteration == 12:
                snapshots[12] = [p.detach().clone() for p in trainer.model.parameters()]

    with pytest.raises(NonFiniteError, match="meta-step 13") as info:
        trainer.fit(Spiky(), 30, progress=False, log_every=10, callbacks=[Snap()])
    assert info.value.iteration == 13 and trainer.iteration == 12
    for a, b in zip(trainer.model.parameters(), snapshots[12]):
        assert torch.equal(a, b)


class _Draws:
    """A sampler of fixed tasks and plans (not ``checked``): fit must check its draws itself."""

    def __init__(self, plans):
        self.tasks, self.plans = Sine().sample(plans.shape[0], generator=torch.Generator().manual_seed(3)), plans

    def draw(self, first_iteration, m):
        return self.tasks, self.plans


def test_fit_checks_the_draws_of_an_unchecked_sampler():
    """A custom sampler's plans are range-checked by fit (the backends no longer check per call)."""
    trainer = Reptile(MLP(1, 8, 1, depth=1), backend="torch", inner_steps=2)
    bad = torch.zeros(2, 2, 10, dtype=torch.long)
    bad[1, 1, 3] = 50  # Sine tasks have 50 points: 50 is out of range
    with pytest.raises(ValueError, match=r"indices must lie in \[0, 50\)"):
        trainer.fit(None, 1, meta_batch_size=2, sampler=_Draws(bad), progress=False)
    assert trainer.iteration == 0
    from reptile_fast.loop import PlanSampler

    plans = torch.zeros(1, 2, 2, 10, dtype=torch.long)
    plans[0, 0, 0, 0] = -1
    with pytest.raises(ValueError, match="indices must lie in"):
        trainer.fit(Sine(), 1, meta_batch_size=2, sampler=PlanSampler(Sine(), plans), progress=False)


def test_the_trainer_turns_the_triton_backends_own_check_off():
    """The trainer validates where data enters, so backend "triton" skips its per-call device read,
    unless the user asks for it."""
    pytest.importorskip("triton")
    from reptile_fast.backends.triton import TritonBackend

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        from reptile_fast.kernels import mlp_inner_loop as K
        if not K.INTERPRETED:
            pytest.skip("needs TRITON_INTERPRET=1 at import")
    model = MLP(1, 8, 1, depth=1).to(device)
    assert Reptile(model, backend="triton").backend.validate is False
    assert Reptile(model, backend="triton", backend_options={"validate": True}).backend.validate is True
    assert TritonBackend().validate is True, "the backend alone still checks"
    trainer = Reptile(model, backend="triton", inner_steps=2)
    tasks = Sine().sample(2).to(device)
    bad = torch.full((2, 2, 10), 50, dtype=torch.long, device=device)
    with pytest.raises(ValueError, match="indices must lie in"):
        trainer.meta_step(tasks, bad)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the Triton interpreter itself reads tensors")
@pytest.mark.parametrize("options", [{}, {"kernel": "v2"}, {"kernel": "v2", "fused": True}])
def test_triton_meta_step_reads_nothing(monkeypatch, options):
    torch.manual_seed(0)
    trainer = Reptile(MLP().cuda(), backend="triton", outer_lr=0.5, backend_options=options or None)
    dist, gen = Sine(), torch.Generator("cuda").manual_seed(1)
    trainer.meta_step(dist.sample(4, generator=gen, device="cuda"), generator=gen)  # first sight: checks
    with no_host_reads(monkeypatch):
        for _ in range(5):
            trainer.meta_step(dist.sample(4, generator=gen, device="cuda"), generator=gen)
    trainer.check_finite()
