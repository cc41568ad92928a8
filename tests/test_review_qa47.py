"""QA47: held-out review of ``minibatches="fresh"|"epochs"`` (commit 4ca6517), written from the README.

Promises tested (README, "minibatches"): "epochs" reads each task's shuffled points in order,
``batch_size`` per inner step, reshuffling when they run out, a minibatch straddling two shuffles
(and then possibly holding a point twice, as the official ``_mini_batches``); every plan the
trainer draws (``fit``, ``meta_step``/``adapt``/``evaluate`` without a plan,
``evaluate_episodes``, the distributed sampler) follows the setting; every backend takes it;
checkpoints record it and resume exactly; bad values are refused by name.

Oracles: plans are built here with the public ``epoch_indices`` from the documented stream (a
meta-step's tasks, then its plan, from one generator; ``Sine(dtype=float64)`` draws the same
tasks in float64), and fed to (a) this file's own float64 SGD inner loop (``torch.func`` on a
float64 copy of the model) or (b) the ``reference`` backend in float64.  Float32 results are
compared with those within a tolerance derived from float32 rounding (below), far under the
differences a wrong plan makes (each test also checks that control).
"""
from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
from torch import nn
from torch.func import functional_call

from _fake_omniglot import job_data, make_runs
from reptile_fast import MLP, Reptile, Sine, TaskBatch, epoch_indices, sample_indices
from reptile_fast.checkpoint import load_checkpoint
from reptile_fast.cli import main
from reptile_fast.distributed import DistContext, distributed_fit
from reptile_fast.distributed.sampler import stream_seed
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.tasks import Episodes, draw_plan

#: float32 unit roundoff
U32 = 2.0 ** -24
#: float32 results after a few meta-steps against a float64 oracle: each inner step's values go
#: through a handful of dependent roundings (forward, backward, update; sums of <= 32 terms) and
#: the errors add up over (meta-steps x inner steps) <= 16 steps at lr·|H| < 1, so 2**8 u ~ 1.5e-5
#: (relative, and absolute for parameters of size ~1) bounds them with room to spare.  Measured:
#: ~1e-7.  A wrong plan moves the parameters by > 1e-3 (each test checks that control); counting a
#: repeated point once (de-duplicating a straddling minibatch) moves the Sine fit's by ~9e-4.
RTOL32 = 2 ** 8 * U32
ATOL32 = 2 ** 8 * U32


def g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def close64(got32: torch.Tensor, want64: torch.Tensor, what: str = "") -> None:
    torch.testing.assert_close(got32.double(), want64, rtol=RTOL32, atol=ATOL32, msg=lambda m: f"{what}: {m}")


def mlp(seed: int = 1, hidden: int = 16) -> MLP:
    torch.manual_seed(seed)
    return MLP(1, hidden, 1)


# --------------------------------------------------------------------------- independent oracles
def sgd_inner_f64(model: nn.Module, x: torch.Tensor, y: torch.Tensor, plan: torch.Tensor, lr: float, loss):
    """One task's inner loop in float64, written here: ``plan`` ``[steps, B]`` (repeats allowed: a
    repeated point counts twice in the minibatch mean).  Returns (params, per-step losses)."""
    m64 = copy.deepcopy(model).double()
    params = {n: p.detach().double().clone() for n, p in m64.named_parameters()}
    losses = []
    for rows in plan.tolist():
        idx = torch.tensor(rows)
        p = {n: v.requires_grad_(True) for n, v in params.items()}
        out = functional_call(m64, p, (x[idx].double(),))
        value = loss(out, y[idx].double() if y.is_floating_point() else y[idx])
        grads = torch.autograd.grad(value, list(p.values()))
        losses.append(value.item())
        params = {n: (v - lr * gr).detach() for (n, v), gr in zip(p.items(), grads)}
    return params, losses


def reptile_f64(model: nn.Module, draws, *, lr: float, eps: float) -> torch.Tensor:
    """Plain Reptile in float64 over ``draws`` (a list of (TaskBatch, plan)): φ ← φ + ε·mean(φ̃ − φ)."""
    phi = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    shadow = copy.deepcopy(model)
    for tasks, plan in draws:
        with torch.no_grad():
            for n, p in shadow.named_parameters():
                p.copy_(phi[n])
        adapted = [sgd_inner_f64(shadow, tasks.x[i], tasks.y[i], plan[i], lr, nn.functional.mse_loss)[0]
                   for i in range(tasks.n_tasks)]
        phi = {n: phi[n] + eps * torch.stack([a[n] - phi[n] for a in adapted]).mean(0) for n in phi}
    return torch.cat([phi[n].flatten() for n, _ in model.named_parameters()])


def sine_draws(iterations: int, T: int, rows: int, B: int, minibatches: str, seed: int = 0, n_points: int = 50,
               dtype=torch.float32):
    """The documented stream: per meta-step, ``Sine.sample(T)`` then the plan, from one generator."""
    gen, out = g(seed), []
    for _ in range(iterations):
        tasks = Sine(n_points=n_points, dtype=dtype).sample(T, generator=gen)
        out.append((tasks, draw_plan(minibatches, T, rows, n_points, B, generator=gen)))
    return out


# --------------------------------------------------------------------------- the plan itself
@pytest.mark.parametrize("tasks,steps,n,batch", [(4, 7, 5, 3), (3, 9, 7, 4), (2, 4, 6, 6), (5, 3, 1, 1),
                                                 (3, 11, 10, 7), (2, 3, 50, 10)])
def test_qa47_epoch_plan_reads_consecutive_shuffles(tasks, steps, n, batch):
    """Fails if a step's minibatch were drawn on its own (fresh, or each step from a new shuffle):
    the task's stream of indices, cut every ``n``, must be whole permutations, then a tail of
    distinct points."""
    plan = epoch_indices(tasks, steps, n, batch, generator=g(11))
    assert plan.shape == (tasks, steps, batch) and plan.dtype == torch.long
    for t in range(tasks):
        stream = plan[t].flatten().tolist()
        full = len(stream) // n
        for e in range(full):
            assert sorted(stream[e * n:(e + 1) * n]) == list(range(n)), (t, e, stream)
        tail = stream[full * n:]
        assert len(set(tail)) == len(tail) and all(0 <= p < n for p in tail), (t, stream)


def test_qa47_straddling_batch_repeats_a_point_at_the_official_rate():
    """3 points in batches of 2: the 2nd batch is [last of shuffle 1, first of shuffle 2], one point
    twice with probability 1/3 in the official code.  Fails if straddling batches were
    de-duplicated, never straddled, or if the reshuffle reused the first shuffle."""
    n_tasks = 3000
    plan = epoch_indices(n_tasks, 2, 3, 2, generator=g(0))
    assert (plan[:, 0, 0] != plan[:, 0, 1]).all()  # inside one shuffle: never a repeat
    dup = (plan[:, 1, 0] == plan[:, 1, 1]).double().mean().item()
    assert abs(dup - 1 / 3) < 5 * (1 / 3 * 2 / 3 / n_tasks) ** 0.5, dup
    # a new shuffle each epoch: both epochs of 5 points alike in ~1/120 of tasks, not always
    p = epoch_indices(n_tasks, 2, 5, 5, generator=g(1))
    same = (p[:, 0] == p[:, 1]).all(dim=1).double().mean().item()
    assert same < 0.03, same
    assert not (p[:, 0] == p[0, 0]).all()  # and each task its own shuffles


def test_qa47_batch_equal_to_points_makes_every_step_a_permutation():
    """batch == n_points: every step sees every point once (fails if refused or drawn with repeats)."""
    plan = epoch_indices(6, 4, 9, 9, generator=g(2))
    assert torch.equal(plan.sort(dim=-1).values, torch.arange(9).expand(6, 4, 9))
    assert not torch.equal(plan[:, 0], plan[:, 1])  # not one shuffle reused


def test_qa47_epoch_plan_generator_device_and_numpy_counts():
    """Fails if a seeded generator did not fix the plan, the global RNG were not the default,
    numpy counts drew another plan, draw_plan("epochs") were not epoch_indices, or an
    unavailable device passed."""
    a = epoch_indices(3, 4, 7, 3, generator=g(5))
    assert torch.equal(a, epoch_indices(3, 4, 7, 3, generator=g(5), device=torch.device("cpu")))
    assert not torch.equal(a, epoch_indices(3, 4, 7, 3, generator=g(6), device="cpu"))
    assert torch.equal(a, epoch_indices(np.int64(3), np.int32(4), np.int64(7), np.int16(3), generator=g(5)))
    assert torch.equal(a, draw_plan("epochs", 3, 4, 7, 3, generator=g(5)))
    torch.manual_seed(9)
    d = epoch_indices(3, 4, 7, 3)
    torch.manual_seed(9)
    assert torch.equal(d, epoch_indices(3, 4, 7, 3))
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            epoch_indices(1, 1, 2, 1, device="cuda")


@pytest.mark.parametrize("args,kwargs,exc,match", [
    ((True, 1, 5, 2), {}, TypeError, "n_tasks"),
    ((1, 2.0, 5, 2), {}, TypeError, "inner_steps"),
    ((1, 1, "5", 2), {}, TypeError, "n_points"),
    ((1, 1, 5, torch.tensor(2)), {}, TypeError, "batch_size"),
    ((0, 1, 5, 1), {}, ValueError, "n_tasks"),
    ((1, 0, 5, 1), {}, ValueError, "inner_steps"),
    ((1, 1, 5, -1), {}, ValueError, "batch_size"),
    ((1, 1, 5, 6), {}, ValueError, r"batch_size \(6\).*n_points \(5\)"),
    ((1, 2 ** 62, 5, 5), {}, ValueError, "cannot be drawn"),
    ((1, 1, 5, 2), {"generator": 3}, TypeError, "generator"),
    ((1, 1, 5, 2), {"device": "bogus"}, ValueError, "device"),
])
def test_qa47_epoch_indices_refuses_hostile_arguments_by_name(args, kwargs, exc, match):
    """Fails if a hostile argument is taken, or refused with another error type or without its name."""
    with pytest.raises(exc, match=match):
        epoch_indices(*args, **kwargs)


@pytest.mark.parametrize("value,exc", [(None, TypeError), (1, TypeError), (True, TypeError), (b"epochs", TypeError),
                                       (["epochs"], TypeError), ("Epochs", ValueError), ("epochs ", ValueError),
                                       ("", ValueError), ("fresh\x00", ValueError)])
def test_qa47_bad_minibatches_refused_by_name_and_the_setting_kept(value, exc):
    """Fails if a bad value is taken, refused without the word 'minibatches', or if a refused
    assignment changed the trainer's setting."""
    with pytest.raises(exc, match="minibatches"):
        Reptile(MLP(1, 4, 1), backend="torch", minibatches=value)
    t = Reptile(MLP(1, 4, 1), backend="torch", minibatches="epochs")
    with pytest.raises(exc, match="minibatches"):
        t.minibatches = value
    assert t.minibatches == "epochs" and t.hparams()["minibatches"] == "epochs"
    with pytest.raises(exc, match="minibatches"):
        draw_plan(value, 1, 1, 5, 2)


@pytest.mark.parametrize("name, value", [("minibatches", "epochs"), ("loss", "mse"), ("backend", "torch"),
                                         ("inner_optimizer", "adam"), ("algorithm", "fomaml")])
def test_qa47_numpy_string_options_are_stored_as_str(tmp_path, name, value):
    """A numpy string (e.g. read from an array of settings) is taken as the str it equals, so that
    checkpoints hold it (they load under weights_only).  Before QA47 the trainer kept np.str_ and
    ``fit(checkpoint_dir=...)`` raised at its first save, after the training had run."""
    kwargs = {"backend": "torch", name: np.str_(value)}
    t = Reptile(MLP(1, 4, 1), **kwargs)
    t.fit(Sine(), 2, progress=False, checkpoint_dir=tmp_path, generator=g(0))
    assert all(type(v) is str for v in t.hparams().values() if isinstance(v, str))
    assert load_checkpoint(tmp_path)["trainer"]["config"][name] == value


@pytest.mark.parametrize("name, value", [("minibatches", "epochs"), ("loss", "mse"), ("backend", "torch"),
                                         ("inner_optimizer", "adam"), ("algorithm", "fomaml")])
def test_str_valued_enum_options_are_taken_as_their_value(tmp_path, name, value):
    """A ``class Option(str, Enum)`` member equals its value; ``str()`` of it is its name
    ("Option.x"), which the first numpy-string fix stored (and then refused as unknown)."""
    import enum

    option = enum.Enum("Option", {"x": value}, type=str).x
    t = Reptile(MLP(1, 4, 1), **{"backend": "torch", name: option})
    t.fit(Sine(), 2, progress=False, checkpoint_dir=tmp_path, generator=g(0))
    assert load_checkpoint(tmp_path)["trainer"]["config"][name] == value
    assert type(t.hparams()[name]) is str


# --------------------------------------------------------------------------- fit on every backend
def _backend_or_skip(backend: str):
    if backend == "triton":
        pytest.importorskip("triton")


@pytest.mark.parametrize("backend", ["reference", "torch", "compiled", "auto", "triton"])
def test_qa47_fit_with_straddling_epochs_matches_a_float64_oracle(backend):
    """Sine, 4 steps of 15 on 50 points (60 reads: the 4th minibatch straddles two shuffles and
    may repeat a point).  Fails if fit drew other plans than the documented stream, if a backend
    mishandled a repeated point, or ignored the setting (the fresh control is far off)."""
    _backend_or_skip(backend)
    T, steps, B, iters, lr, eps = 3, 4, 15, 4, 0.02, 0.5
    model = mlp()
    oracle = reptile_f64(model, sine_draws(iters, T, steps, B, "epochs", dtype=torch.float64), lr=lr, eps=eps)
    fresh = reptile_f64(model, sine_draws(iters, T, steps, B, "fresh", dtype=torch.float64), lr=lr, eps=eps)
    assert (fresh - oracle).abs().max() > 1e-3  # the control: other plans, another model
    trainer = Reptile(model, backend=backend, inner_lr=lr, inner_steps=steps, inner_batch_size=B, outer_lr=eps,
                      minibatches="epochs")
    trainer.fit(Sine(), iters, meta_batch_size=T, generator=g(0), progress=False)
    close64(flat(model), oracle, backend)
    if backend == "reference":  # the same operations as meta_step on hand-drawn plans: bitwise
        by_hand = Reptile(mlp(), backend="reference", inner_lr=lr, inner_steps=steps, inner_batch_size=B,
                          outer_lr=eps)
        for tasks, plan in sine_draws(iters, T, steps, B, "epochs"):
            by_hand.meta_step(tasks, plan)
        assert torch.equal(flat(model), flat(by_hand.model))


class Blobs:
    """A small classification family: ``ways`` classes x ``shots`` images of 1x6x6."""

    def __init__(self, ways: int = 3, shots: int = 2):
        self.ways, self.shots = ways, shots

    def sample(self, n_tasks, *, generator=None, device=None):
        x = torch.rand(n_tasks, self.ways * self.shots, 1, 6, 6, generator=generator)
        y = torch.arange(self.ways).repeat_interleave(self.shots).expand(n_tasks, -1).contiguous()
        return TaskBatch(x, y)


def convnet() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32, 3))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_qa47_conv_classifier_with_inner_adam_trains_on_epoch_plans(backend):
    """A conv net, cross-entropy, inner Adam, 3 steps of 4 on 6 images (straddling), against the
    float64 reference fed plans drawn here.  Fails if fit's plans were not epoch plans of the
    documented stream (the fresh control is far off) or a backend mishandled them."""
    T, steps, B, iters = 2, 3, 4, 3
    kw = dict(inner_optimizer="adam", inner_lr=0.05, inner_steps=steps, inner_batch_size=B, outer_lr=0.7,
              loss="cross_entropy")

    def by_hand(minibatches):
        m64 = convnet().double()
        ref = Reptile(m64, backend="reference", **kw)
        gen = g(4)
        for _ in range(iters):
            tasks = Blobs().sample(T, generator=gen)
            plan = draw_plan(minibatches, T, steps, tasks.n_points, B, generator=gen)
            ref.meta_step(TaskBatch(tasks.x.double(), tasks.y), plan)
        return flat(m64)

    oracle = by_hand("epochs")
    assert (by_hand("fresh") - oracle).abs().max() > 1e-3
    model = convnet()
    Reptile(model, backend=backend, minibatches="epochs", **kw).fit(Blobs(), iters, meta_batch_size=T,
                                                                     generator=g(4), progress=False)
    close64(flat(model), oracle, backend)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_qa47_fomaml_epoch_plans_have_the_extra_row(backend):
    """FOMAML: the plan has inner_steps + 1 rows, read from one epoch stream (4 steps of 10 on 50
    points plus the gradient row: every point exactly once).  Fails if FOMAML's plan were drawn
    with inner_steps rows, as two streams, or fresh."""
    T, steps, B, iters = 2, 4, 10, 3
    kw = dict(algorithm="fomaml", inner_steps=steps, inner_batch_size=B, outer_lr=0.5)
    # meta_step without a plan: the epoch plan of inner_steps + 1 rows from its generator
    tasks = Sine().sample(T, generator=g(0))
    plan = epoch_indices(T, steps + 1, 50, B, generator=g(1))
    assert torch.equal(plan.flatten(1).sort(dim=1).values, torch.arange(50).expand(T, -1))
    drawn = Reptile(mlp(), backend=backend, minibatches="epochs", **kw)
    drawn.meta_step(tasks, generator=g(1))
    given = Reptile(mlp(), backend=backend, **kw)
    given.meta_step(tasks, plan)
    assert torch.equal(flat(drawn.model), flat(given.model))
    two_streams = torch.cat([epoch_indices(T, steps, 50, B, generator=g(1)),
                             epoch_indices(T, 1, 50, B, generator=g(1))], dim=1)
    control = Reptile(mlp(), backend=backend, **kw)
    control.meta_step(tasks, two_streams)
    assert (flat(control.model) - flat(given.model)).abs().max() > 1e-4

    def by_hand(minibatches):
        ref = Reptile(mlp().double(), backend="reference", **kw)
        for tasks, plan in sine_draws(iters, T, steps + 1, B, minibatches, dtype=torch.float64):
            ref.meta_step(tasks, plan)
        return flat(ref.model)

    oracle = by_hand("epochs")
    assert (by_hand("fresh") - oracle).abs().max() > 1e-3
    model = mlp()
    Reptile(model, backend=backend, minibatches="epochs", **kw).fit(Sine(), iters, meta_batch_size=T,
                                                                     generator=g(0), progress=False)
    close64(flat(model), oracle, backend)


# --------------------------------------------------------------------------- chunks, draw_chunks, resume
def test_qa47_compiled_chunks_and_draw_chunks_with_epochs(tmp_path):
    """Backend compiled in chunks of 3 meta-steps over 7 (the last chunk short): step-by-step draws
    by default, a chunk's tasks then its plans in one call each with draw_chunks=True.  Fails if a
    chunked run drew other epoch plans than the documented order, or fresh ones."""
    T, steps, B, iters, chunk, lr, eps = 2, 3, 20, 7, 3, 0.02, 0.5  # 60 reads of 50: straddles

    def fit(**kwargs):
        model = mlp()
        Reptile(model, backend="compiled", inner_lr=lr, inner_steps=steps, inner_batch_size=B, outer_lr=eps,
                minibatches="epochs").fit(Sine(), iters, meta_batch_size=T, generator=g(3), progress=False,
                                          **kwargs)
        return flat(model)

    step_by_step = reptile_f64(mlp(), sine_draws(iters, T, steps, B, "epochs", seed=3, dtype=torch.float64),
                               lr=lr, eps=eps)
    close64(fit(checkpoint_dir=tmp_path / "a", checkpoint_every=chunk), step_by_step, "chunks of 3")

    gen, draws = g(3), []
    for first in range(0, iters, chunk):
        m = min(chunk, iters - first)
        tasks = Sine(dtype=torch.float64).sample(m * T, generator=gen)
        plans = epoch_indices(m * T, steps, 50, B, generator=gen)
        draws += [(tasks[i * T:(i + 1) * T], plans[i * T:(i + 1) * T]) for i in range(m)]
    chunk_drawn = reptile_f64(mlp(), draws, lr=lr, eps=eps)
    assert (chunk_drawn - step_by_step).abs().max() > 1e-3  # the control: other draws
    close64(fit(checkpoint_dir=tmp_path / "b", checkpoint_every=chunk, draw_chunks=True), chunk_drawn,
            "draw_chunks")


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_qa47_resume_with_epochs_is_exact_and_another_setting_warns(backend, tmp_path):
    """6 meta-steps at once vs 4 then resumed to 6 (checkpoints every 2): bitwise the same model and
    losses.  Fails if the generator's state after epoch draws were not restored (the resumed
    run would draw other plans); a resume with minibatches="fresh" must warn naming it."""
    T, steps, B = 2, 3, 20
    kw = dict(inner_steps=steps, inner_batch_size=B, outer_lr=0.5)

    def trainer(minibatches="epochs"):
        return Reptile(mlp(), backend=backend, minibatches=minibatches, **kw)

    whole = trainer()
    h_whole = whole.fit(Sine(), 6, meta_batch_size=T, generator=g(8), progress=False,
                        checkpoint_dir=tmp_path / "whole", checkpoint_every=2)
    first = trainer()
    first.fit(Sine(), 4, meta_batch_size=T, generator=g(8), progress=False, checkpoint_dir=tmp_path / "part",
              checkpoint_every=2)
    assert load_checkpoint(tmp_path / "part")["trainer"]["config"]["minibatches"] == "epochs"
    resumed = trainer()
    h_resumed = resumed.fit(Sine(), 6, meta_batch_size=T, generator=g(999), progress=False,
                            checkpoint_dir=tmp_path / "part", checkpoint_every=2, resume_from=tmp_path / "part")
    assert torch.equal(flat(resumed.model), flat(whole.model))
    assert [float(v) for v in h_resumed["loss"]] == [float(v) for v in h_whole["loss"]]
    # the control: a fresh-drawing run is another model
    other = trainer("fresh")
    other.fit(Sine(), 6, meta_batch_size=T, generator=g(8), progress=False)
    assert (flat(other.model) - flat(whole.model)).abs().max() > 1e-3
    with pytest.warns(UserWarning, match="minibatches: saved 'epochs', now 'fresh'"):
        trainer("fresh").fit(Sine(), 6, meta_batch_size=T, generator=g(8), progress=False,
                             resume_from=tmp_path / "whole" / "checkpoint.prev.pt")


# --------------------------------------------------------------------------- adapt / evaluate / meta_step
def test_qa47_adapt_evaluate_and_meta_step_draw_epoch_plans_with_repeats():
    """adapt, evaluate and meta_step without a plan draw epoch plans from their generator (or the
    global RNG); 4 steps of 3 on 5 points repeat points across shuffles.  Checked against this
    file's float64 SGD loop.  Fails if a default plan were fresh, the global RNG ignored, a
    repeated point counted once, or evaluate(steps=0) drew (and refused) a minibatch."""
    lr = 0.05
    tasks = Sine(n_points=5).sample(3, generator=g(2))
    t = Reptile(mlp(), backend="torch", inner_lr=lr, inner_steps=4, inner_batch_size=3, minibatches="epochs")
    plan = epoch_indices(3, 4, 5, 3, generator=g(7))
    got = t.adapt(tasks, 4, generator=g(7))
    for i in range(3):
        params, losses = sgd_inner_f64(t.model, tasks.x[i], tasks.y[i], plan[i], lr, nn.functional.mse_loss)
        for n, p in params.items():
            close64(got.params[n][i], p, f"task {i} {n}")
        close64(got.losses[i], torch.tensor(losses, dtype=torch.float64), f"task {i} losses")
    # the control: the same loop on fresh plans adapts elsewhere
    fresh = sample_indices(3, 4, 5, 3, generator=g(7))
    p_fresh, _ = sgd_inner_f64(t.model, tasks.x[0], tasks.y[0], fresh[0], lr, nn.functional.mse_loss)
    p_epoch, _ = sgd_inner_f64(t.model, tasks.x[0], tasks.y[0], plan[0], lr, nn.functional.mse_loss)
    assert max((p_fresh[n] - p_epoch[n]).abs().max() for n in p_epoch) > 1e-3
    # the global RNG when no generator is given
    torch.manual_seed(21)
    a = t.adapt(tasks, 4)
    torch.manual_seed(21)
    b = t.adapt(tasks, 4, epoch_indices(3, 4, 5, 3))
    assert all(torch.equal(a.params[n], b.params[n]) for n in a.params)
    # evaluate draws the same plan as adapt; steps=0 draws none (tasks smaller than the batch)
    assert torch.equal(t.evaluate(tasks, 4, generator=g(7)), t.evaluate(tasks, 4, plan))
    small = Sine(n_points=2).sample(2, generator=g(3))
    at_phi = t.evaluate(small, 0, generator=g(1))
    with torch.no_grad():
        want = ((t.model(small.x.flatten(0, 1)).view(2, 2, 1) - small.y) ** 2).mean(dim=(1, 2))
    torch.testing.assert_close(at_phi, want)
    # meta_step without a plan: the epoch plan of its generator
    before = copy.deepcopy(t.model)
    t.meta_step(tasks, generator=g(5))
    ref = Reptile(before, backend="torch", inner_lr=lr, inner_steps=4, inner_batch_size=3)
    ref.meta_step(tasks, epoch_indices(3, 4, 5, 3, generator=g(5)))
    assert torch.equal(flat(t.model), flat(ref.model))


# --------------------------------------------------------------------------- distributed
def test_qa47_distributed_fit_one_process_draws_indexed_epoch_plans():
    """distributed_fit in one process with minibatches="epochs": block b of meta-step t drawn from
    a generator seeded by stream_seed(seed, t, b, n_blocks=⌈T/block⌉), tasks then the epoch plan (README, "Which tasks
    go where").  Fails if the distributed sampler ignored the trainer's setting."""
    T, steps, B, iters, seed, block = 5, 3, 20, 3, 4, 2
    kw = dict(inner_steps=steps, inner_batch_size=B, outer_lr=0.5)

    def by_hand(minibatches):
        ref = Reptile(mlp(), backend="torch", **kw)
        ref.total_iterations = iters
        for t in range(iters):
            parts = []
            for b in range(0, T, block):
                gen = g(stream_seed(seed, t, b // block, n_blocks=-(-T // block)))
                tasks = Sine().sample(min(block, T - b), generator=gen)
                parts.append((tasks, draw_plan(minibatches, tasks.n_tasks, steps, 50, B, generator=gen)))
            tasks = TaskBatch(torch.cat([p[0].x for p in parts]), torch.cat([p[0].y for p in parts]))
            ref.meta_step(tasks, torch.cat([p[1] for p in parts]))
        return flat(ref.model)

    want = by_hand("epochs")
    assert (by_hand("fresh") - want).abs().max() > 1e-3
    t = Reptile(mlp(), backend="torch", minibatches="epochs", **kw)
    distributed_fit(t, Sine(), iters, meta_batch_size=T, seed=seed, block_size=block, context=DistContext.single(),
                    progress=False)
    torch.testing.assert_close(flat(t.model), want, rtol=RTOL32, atol=ATOL32)


# --------------------------------------------------------------------------- evaluate_episodes
def _episodes(n_tasks=8, ways=3, shots=4, queries=3, dim=4):
    gen = g(0)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n_tasks, -1).contiguous()
    yq = torch.arange(ways).repeat_interleave(queries).expand(n_tasks, -1).contiguous()
    centres = torch.randn(n_tasks, ways, dim, generator=gen)
    xs = centres.repeat_interleave(shots, dim=1) + 1.5 * torch.randn(n_tasks, ways * shots, dim, generator=gen)
    xq = centres.repeat_interleave(queries, dim=1) + 1.5 * torch.randn(n_tasks, ways * queries, dim, generator=gen)
    return Episodes(TaskBatch(xs, ys), TaskBatch(xq, yq), ways)


def _episode_oracle(model, episodes, plan, lr):
    preds = []
    for i in range(episodes.n_tasks):
        params, _ = sgd_inner_f64(model, episodes.support.x[i], episodes.support.y[i], plan[i], lr,
                                  nn.functional.cross_entropy)
        logits = functional_call(copy.deepcopy(model).double(), params, (episodes.query.x[i].double(),))
        preds.append(logits.argmax(-1))
    return torch.stack(preds)


def test_qa47_evaluate_episodes_default_and_override_against_an_oracle():
    """A linear classifier, inner SGD, 7 steps of 5 on 12 support images (straddling).  The
    predictions must be those of this file's float64 loop on the plan the README names: the
    trainer's setting by default, the argument's when given.  Fails if the override or the
    default were ignored (the plans' predictions differ: checked), or a bad value passed."""
    lr, steps, B = 1.0, 7, 5
    episodes = _episodes()
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    trainer = Reptile(model, inner_lr=lr, inner_batch_size=5, loss="cross_entropy", backend="torch")
    epochs_plan = epoch_indices(episodes.n_tasks, steps, 12, B, generator=g(2))
    fresh_plan = sample_indices(episodes.n_tasks, steps, 12, B, generator=g(2))
    want_epochs = _episode_oracle(model, episodes, epochs_plan, lr)
    want_fresh = _episode_oracle(model, episodes, fresh_plan, lr)
    assert not torch.equal(want_epochs, want_fresh)  # the control: the plan shows in the predictions

    def run(**kw):
        return evaluate_episodes(trainer, episodes, steps=steps, batch_size=B, generator=g(2), **kw).predictions

    assert torch.equal(run(), want_fresh)  # the trainer's default, "fresh"
    assert torch.equal(run(minibatches="epochs"), want_epochs)
    assert trainer.minibatches == "fresh"  # an override leaves the trainer alone
    trainer.minibatches = "epochs"
    assert torch.equal(run(), want_epochs)
    assert torch.equal(run(minibatches=None), want_epochs)
    assert torch.equal(run(minibatches="fresh"), want_fresh)
    for bad, exc in ((1, TypeError), (True, TypeError), ("epoch", ValueError), ("", ValueError)):
        with pytest.raises(exc, match="minibatches"):
            run(minibatches=bad)


# --------------------------------------------------------------------------- the omniglot CLI
@pytest.fixture(scope="module")
def omniglot_data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("qa47_omniglot"))


def _omniglot_args(data, out, *extra):
    return ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "4", "--inner-steps", "2", "--eval-steps", "3",
            "--eval-batch-size", "2", "--eval-tasks", "2", "--validate-every", "0", "--threads", "1",
            "--no-progress", "--out", str(out), *extra]


@pytest.mark.filterwarnings("ignore:the checkpoint's run annealed the outer step")
def test_qa47_omniglot_cli_resume_keeps_epochs_and_an_override_warns(omniglot_data, tmp_path, capsys):
    """--minibatches epochs is kept by --resume (stored settings) and an override with fresh warns
    naming it; --indexed-tasks with epochs runs; a bad choice is exit 2 naming it.  Fails if a
    resume fell back to the default, or a changed setting resumed silently."""
    out = tmp_path / "run"
    assert main(_omniglot_args(omniglot_data, out, "--iterations", "2", "--checkpoint-every", "1",
                               "--minibatches", "epochs")) == 0
    assert main(["omniglot", "--resume", str(out), "--iterations", "3", "--no-progress", "--threads", "1"]) == 0
    assert json.loads((out / "config.json").read_text())["minibatches"] == "epochs"
    assert load_checkpoint(out)["trainer"]["config"]["minibatches"] == "epochs"
    capsys.readouterr()
    assert main(["omniglot", "--resume", str(out), "--iterations", "4", "--no-progress", "--threads", "1",
                 "--minibatches", "fresh"]) == 0
    # the job prints the library's warning as one of its notes (session 22: it was a Python
    # UserWarning with a file and line, after the job's own note)
    err = capsys.readouterr().err
    assert "note: resuming with different hyper-parameters (minibatches: saved 'epochs', now 'fresh')" in err
    assert "UserWarning" not in err
    assert json.loads((out / "config.json").read_text())["minibatches"] == "fresh"
    assert load_checkpoint(out)["trainer"]["config"]["minibatches"] == "fresh"

    idx = tmp_path / "indexed"
    assert main(_omniglot_args(omniglot_data, idx, "--iterations", "2", "--indexed-tasks",
                               "--minibatches", "epochs")) == 0
    metrics = json.loads((idx / "metrics.json").read_text())
    assert metrics["task_sampler"] == "indexed"
    assert load_checkpoint(idx)["trainer"]["config"]["minibatches"] == "epochs"

    runs = make_runs(tmp_path, n_runs=1, ways=3)
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(["omniglot-runs", "--runs", str(runs), "--model", str(idx), "--minibatches", "Epochs"])
    assert exc.value.code == 2 and "minibatches" in capsys.readouterr().err


def test_qa47_omniglot_test_evaluation_uses_the_runs_minibatches(omniglot_data, tmp_path, monkeypatch):
    """README: --minibatches applies "for training and the tests alike".  Every plan the job draws
    (training steps, test adaptation) must be an epoch plan.  Fails if the test evaluation drew
    fresh plans (or training did)."""
    import reptile_fast.tasks.base as base

    drawn = []
    real_epochs, real_fresh = base.epoch_indices, base.sample_indices

    def spy_epochs(*a, **k):
        drawn.append(("epochs", a[2]))
        return real_epochs(*a, **k)

    def spy_fresh(*a, **k):
        drawn.append(("fresh", a[2]))
        return real_fresh(*a, **k)

    monkeypatch.setattr(base, "epoch_indices", spy_epochs)
    monkeypatch.setattr(base, "sample_indices", spy_fresh)
    assert main(_omniglot_args(omniglot_data, tmp_path / "r", "--iterations", "2", "--minibatches", "epochs")) == 0
    kinds = {k for k, _ in drawn}
    points = {n for _, n in drawn}
    assert kinds == {"epochs"}, drawn
    assert {6, 3} <= points, drawn  # training tasks (3 ways x 2 shots) and 1-shot test episodes (3 images)


def test_job_configs_take_numpy_and_enum_strings_as_str():
    """The jobs' configs store backend/device as the plain str (their checkpoints hold them)."""
    import enum

    from reptile_fast.fewshot_job import OmniglotConfig
    from reptile_fast.jobs import SineConfig

    backend = enum.Enum("Backend", {"t": "torch"}, type=str).t
    for config in (SineConfig(backend=backend, device=np.str_("cpu")),
                   OmniglotConfig(train=["a.zip"], test="b.zip", backend=backend, device=np.str_("cpu"),
                                  minibatches=np.str_("fresh"))):
        assert (config.backend, config.device) == ("torch", "cpu")
        assert type(config.backend) is str and type(config.device) is str
    assert type(config.minibatches) is str
