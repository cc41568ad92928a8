"""QA27's mutation audit (the modules QA24's left aside: kernels, compiled_step, torch_func,
mlp_math, losses, models, signals, callbacks, distributed, tasks, plots): each test here fails
under a deliberate, realistic breakage of the library that the rest of the suite let through
(NOTES-qa27.md (folded into the README since; ``git show 67b5024:NOTES-qa27.md``) has the table).

Oracles are float64 loops written with torch.autograd, independent of the library's code paths;
fp32 results are compared at the project's rtol 1e-5 / atol 1e-6 (a few inner steps of a tiny
MLP: fp32 rounding is ~1e-7 relative)."""
import copy

import pytest
import torch
import torch.nn as nn

from reptile_fast import TaskBatch, sample_indices
from reptile_fast.mlp_spec import extract_mlp_spec

from test_review_qa24 import _mlp, _oracle_meta_step, _tasks  # noqa: E402  (the float64 oracle)

RTOL, ATOL = 1e-5, 1e-6


# ------------------------------------------------------------------------ compiled_step
@pytest.mark.parametrize("loss", ["mse", "cross_entropy"])
def test_compiled_formulation_equals_a_float64_oracle(loss):
    """``compiled_step.meta_step`` over ``fused_inner_loop`` (the formulation the "scan" and
    "step" modes hand to torch.compile; run uncompiled here, so no compiler is needed) against
    the float64 autograd oracle: two outputs / three classes, three tasks, annealed-size ε.

    Catches: ``mlp_math.loss_and_grad``'s cross-entropy gradient or its MSE loss (read only by
    this formulation: the native and eager modes do not use it) off by a factor."""
    from reptile_fast.compiled_step import fused_inner_loop, meta_step

    classes = 3 if loss == "cross_entropy" else None
    model, tasks = _mlp(d_out=3 if classes else 2), _tasks(T=3, n=9, classes=classes)
    g = torch.Generator().manual_seed(1)
    plan = sample_indices(3, 4, 9, 5, generator=g)
    spec = extract_mlp_spec(model)
    params = [p.detach() for p in model.parameters()]  # W0, b0, W1, b1
    xs = torch.stack([tasks.x[torch.arange(3)[:, None], plan[:, s]] for s in range(4)])
    ys = torch.stack([tasks.y[torch.arange(3)[:, None], plan[:, s]] for s in range(4)])
    new, losses = meta_step(fused_inner_loop, spec, 0.1, loss, params, xs, ys, torch.tensor(0.3))
    want, want_loss = _oracle_meta_step(model, tasks, plan, inner_lr=0.1, eps=0.3, loss=loss)
    for got, (name, exp) in zip(new, want.items()):
        torch.testing.assert_close(got.double(), exp, rtol=RTOL, atol=ATOL, msg=name)
    assert losses.shape == (3, 4)
    assert losses.double().mean().item() == pytest.approx(want_loss, rel=RTOL)


# ------------------------------------------------------------------------ backends
@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_fomaml_with_cross_entropy_equals_a_float64_oracle(backend):
    """FOMAML's meta-gradient with cross-entropy (the MLP path's ``mlp_math.output_grad`` on the
    plan's extra row), three classes, three tasks, against the float64 oracle.

    Catches: ``output_grad``'s cross-entropy label term off (−1/(n+1) for −1/n): the MLP path
    uses ``output_grad`` only for FOMAML's extra row, which no other test ran with classes."""
    from reptile_fast import Reptile

    model, tasks = _mlp(d_out=3), _tasks(T=3, n=9, classes=3)
    plan = sample_indices(3, 4, 9, 5, generator=torch.Generator().manual_seed(2))
    trainer = Reptile(model, inner_lr=0.1, inner_steps=3, inner_batch_size=5, outer_lr=0.3,
                      loss="cross_entropy", algorithm="fomaml", backend=backend)
    want, want_loss = _oracle_meta_step(model, tasks, plan, inner_lr=0.1, eps=0.3,
                                        algorithm="fomaml", loss="cross_entropy")
    out = trainer.meta_step(tasks, indices=plan)
    trainer.check_finite()
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach().double(), want[name], rtol=RTOL, atol=ATOL, msg=name)
    assert float(out["loss"]) == pytest.approx(want_loss, rel=RTOL)


def _adam_oracle(model, tasks, plan, *, lr, betas, eps):
    """Each task's Adam inner loop (fresh state per task) in float64, written out: ``{name: [T, ...]}``."""
    b1, b2 = betas
    out = {n: [] for n, _ in model.named_parameters()}
    m64 = copy.deepcopy(model).double()
    for i in range(tasks.n_tasks):
        params = {n: p.detach().double().clone() for n, p in model.named_parameters()}
        m = {n: torch.zeros_like(p) for n, p in params.items()}
        v = {n: torch.zeros_like(p) for n, p in params.items()}
        for s in range(plan.shape[1]):
            leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            ind = plan[i, s]
            value = nn.functional.mse_loss(torch.func.functional_call(m64, leaves, (tasks.x[i][ind].double(),)),
                                           tasks.y[i][ind].double())
            grads = dict(zip(leaves, torch.autograd.grad(value, list(leaves.values()))))
            t = s + 1
            for n in params:
                m[n] = b1 * m[n] + (1 - b1) * grads[n]
                v[n] = b2 * v[n] + (1 - b2) * grads[n] ** 2
                denom = v[n].sqrt() / (1 - b2 ** t) ** 0.5 + eps
                params[n] = params[n] - lr / (1 - b1 ** t) * m[n] / denom
        for n in params:
            out[n].append(params[n])
    return {n: torch.stack(v) for n, v in out.items()}


@pytest.mark.parametrize("backend", ["reference", "torch", "torch-generic"])
def test_inner_adam_follows_its_eps_and_betas(backend):
    """``InnerConfig(optimizer="adam", adam_eps=0.05, adam_betas=(0.5, 0.9))``: every backend's
    per-task Adam (fresh state per task) against Adam written out in float64.  An eps this large
    changes every step, so an inner optimizer built with torch's default eps is seen.

    Catches: the reference backend (the oracle of the others) building ``torch.optim.Adam``
    without ``eps=config.adam_eps``."""
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.reference import ReferenceBackend
    from reptile_fast.backends.torch_func import TorchBackend

    model, tasks = _mlp(), _tasks(T=2, n=9)
    plan = sample_indices(2, 3, 9, 4, generator=torch.Generator().manual_seed(3))
    config = InnerConfig(lr=0.05, loss="mse", optimizer="adam", adam_betas=(0.5, 0.9), adam_eps=0.05)
    be = {"reference": ReferenceBackend(), "torch": TorchBackend(),
          "torch-generic": TorchBackend(fast_mlp=False)}[backend]
    got = be.inner_loop(model, tasks, plan, config).params
    want = _adam_oracle(model, tasks, plan, lr=0.05, betas=(0.5, 0.9), eps=0.05)
    for n in want:
        torch.testing.assert_close(got[n].double(), want[n], rtol=RTOL, atol=ATOL, msg=n)


class _Drifting(nn.Module):
    """A model whose forward reads and then moves a buffer (as a running statistic does when it
    is used, e.g. a BatchNorm-like layer in a custom module): its inner steps depend on the
    buffer's value after the previous steps."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(2, 2)
        self.register_buffer("shift", torch.zeros(2))

    def forward(self, x):
        out = self.lin(x - self.shift)
        self.shift.add_(0.25)
        return out


def test_generic_path_carries_buffers_through_the_inner_steps():
    """The vmap path gives each task its own copy of the buffers and carries it from one inner
    step to the next, as the reference backend's deep-copied module does (three steps: the third
    sees ``shift`` = 0.5).

    Catches: the buffers a step's ``functional_call`` wrote being dropped between steps (every
    step would see ``shift`` = 0)."""
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.reference import ReferenceBackend
    from reptile_fast.backends.torch_func import TorchBackend

    model, tasks = _Drifting(), _tasks(T=2, n=9)
    plan = sample_indices(2, 3, 9, 4, generator=torch.Generator().manual_seed(4))
    config = InnerConfig(lr=0.1, loss="mse")
    ref = ReferenceBackend().inner_loop(model, tasks, plan, config)
    got = TorchBackend().inner_loop(model, tasks, plan, config)
    for n in ref.params:
        torch.testing.assert_close(got.params[n], ref.params[n], rtol=RTOL, atol=ATOL, msg=n)
    torch.testing.assert_close(got.losses, ref.losses, rtol=RTOL, atol=ATOL)
    assert torch.equal(model.shift, torch.zeros(2))  # the meta-model's own buffer is untouched


def test_generic_path_draws_each_tasks_dropout_independently():
    """Two identical tasks (same points, same plan) through a model with dropout: as in the
    reference backend (one module copy per task, masks drawn one after another), their masks are
    independent, so their adapted parameters differ.

    Catches: ``vmap(..., randomness="same")``: every task of a meta-batch would share one dropout
    mask per step (identical tasks adapt identically; a meta-batch's noise is not averaged)."""
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.torch_func import TorchBackend

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(2, 16), nn.Dropout(0.5), nn.Linear(16, 2))
    one = _tasks(T=1, n=9)
    tasks = TaskBatch(one.x.expand(2, -1, -1).contiguous(), one.y.expand(2, -1, -1).contiguous())
    plan = sample_indices(1, 2, 9, 4, generator=torch.Generator().manual_seed(5)).expand(2, -1, -1).contiguous()
    got = TorchBackend().inner_loop(model, tasks, plan, InnerConfig(lr=0.1, loss="mse")).params
    assert not torch.equal(got["0.weight"][0], got["0.weight"][1])


# ------------------------------------------------------------------------ signals, callbacks
def test_fit_gives_back_the_callers_own_signal_handlers():
    """``fit`` defers SIGINT/SIGTERM while it runs and afterwards puts back the handlers that
    were there before (a notebook's or a server's own), not the default ones.

    Catches: ``DeferredSignals._restore`` installing ``SIG_DFL`` (after one fit, SIGTERM would
    kill a server that had its own graceful handler, and SIGINT would lose a custom one)."""
    import signal

    from reptile_fast import MLP, Reptile, Sine

    def mine(signum, frame):  # pragma: no cover - never delivered
        pass

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in before:
            signal.signal(s, mine)
        torch.manual_seed(0)
        Reptile(MLP(hidden_dim=4), backend="reference").fit(Sine(), 2, progress=False)
        assert signal.getsignal(signal.SIGINT) is mine and signal.getsignal(signal.SIGTERM) is mine
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def test_a_checkpoint_never_holds_nan_and_the_error_names_the_last_good_one_once(tmp_path):
    """A callback that writes a NaN into φ after meta-step 2 (``checkpoint_every=1``): the
    checkpoint of meta-step 2 is refused, the one of meta-step 1 is kept, and the error names it
    once.

    Catches: ``CheckpointCallback.save`` writing parameters without its finiteness check (a
    checkpoint to resume from that holds NaN).  Found with it: the error's last sentence came
    twice (``save`` and ``fit`` both added it)."""
    from reptile_fast import MLP, Reptile, Sine
    from reptile_fast.checkpoint import load_checkpoint
    from reptile_fast.core import NonFiniteError

    torch.manual_seed(0)
    model = MLP(hidden_dim=4)

    def poison(iteration, info):
        if iteration == 2:
            with torch.no_grad():
                model.network[0].weight[0, 0] = float("nan")

    with pytest.raises(NonFiniteError) as info:
        Reptile(model, backend="reference").fit(Sine(), 4, progress=False, callback=poison,
                                                checkpoint_dir=tmp_path, checkpoint_every=1)
    assert info.value.checkpoint_iteration == 1
    assert str(info.value).count("The last good checkpoint") == 1
    ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert ckpt["trainer"]["iteration"] == 1
    assert all(bool(torch.isfinite(t).all()) for t in ckpt["trainer"]["model"].values()
               if isinstance(t, torch.Tensor))


def test_compiled_programs_of_two_inner_lrs_are_not_shared():
    """Two trainers on backend "compiled" (mode "eager": no compiler needed) with the same model
    shape but another ``inner_lr``, one after the other in one process: each meta-step equals the
    float64 oracle at its own inner learning rate.

    Catches: ``compiled_step.get_program``'s cache key without the inner lr (the second trainer
    would run the first one's program, lr baked in)."""
    from reptile_fast import Reptile

    tasks = _tasks(T=3, n=9)
    plan = sample_indices(3, 3, 9, 4, generator=torch.Generator().manual_seed(6))
    for lr in (0.02, 0.1):
        model = _mlp()
        want, _ = _oracle_meta_step(model, tasks, plan, inner_lr=lr, eps=0.5)
        trainer = Reptile(model, backend="compiled", backend_options={"mode": "eager"}, inner_lr=lr,
                          inner_steps=3, inner_batch_size=4, outer_lr=0.5)
        trainer.meta_step(tasks, plan)
        trainer.check_finite()
        for name, p in model.named_parameters():
            torch.testing.assert_close(p.detach().double(), want[name], rtol=RTOL, atol=ATOL, msg=f"{lr} {name}")


def test_scan_mode_one_meta_step_chunk_takes_its_eps():
    """The "scan" program's chunk of one meta-step (run uncompiled, by design: torch.compile
    would specialise on size 1) with ε = 0.37, against the float64 oracle.  The program is built
    with ``_build("scan")`` and called with a one-step chunk, so nothing is compiled here.

    Catches: that path reading another ε than ``eps[0]``."""
    from reptile_fast.compiled_step import MetaStepProgram

    model, tasks = _mlp(), _tasks(T=2, n=9)
    plan = sample_indices(2, 3, 9, 4, generator=torch.Generator().manual_seed(7))
    spec = extract_mlp_spec(model)
    program = MetaStepProgram(spec, lr=0.1, loss="mse", steps=3, n_tasks=2, batch=4, dtype=torch.float32,
                              mode="scan")
    run = program._build("scan")
    xs = torch.stack([tasks.x[torch.arange(2)[:, None], plan[:, s]] for s in range(3)])[None]
    ys = torch.stack([tasks.y[torch.arange(2)[:, None], plan[:, s]] for s in range(3)])[None]
    with torch.no_grad():
        new, losses = run([p.detach() for p in model.parameters()], xs, ys, torch.tensor([0.37]))
    want, want_loss = _oracle_meta_step(model, tasks, plan, inner_lr=0.1, eps=0.37)
    for got, (name, exp) in zip(new, want.items()):
        torch.testing.assert_close(got.double(), exp, rtol=RTOL, atol=ATOL, msg=name)
    assert losses.shape == (1, 2, 3)


# ------------------------------------------------------------------------ distributed
def test_an_indexed_run_with_another_block_size_is_not_resumed():
    """The indexed sampler's draws depend on ``block_size`` (tasks per random stream): a
    checkpoint drawn with another one is refused, naming it.

    Catches: ``check_resumable`` comparing only seed and meta-batch size (the resumed run would
    continue with other tasks than the uninterrupted one, silently)."""
    from reptile_fast import Sine
    from reptile_fast.distributed.sampler import IndexedSampler

    def sampler(block):
        return IndexedSampler(Sine(), 8, seed=3, plan_rows=2, batch_size=4, block_size=block)

    a, b = sampler(4), sampler(8)
    assert not torch.equal(a.draw_step(0)[0].y, b.draw_step(0)[0].y)  # the draws do differ
    a.check_resumable(sampler(4).state_dict())
    with pytest.raises(ValueError, match="block_size"):
        a.check_resumable(b.state_dict())


def test_a_signal_after_the_last_periodic_agreement_still_stops_every_rank():
    """``distributed_fit``'s rank callback agrees once more when the run ends on its own: another
    rank's SIGTERM received after the last periodic agreement makes this rank stop too (one
    rank's view: the all-reduce returns the other rank's signal number).

    Catches: that last agreement skipped (the rank that got the signal returned normally and a
    job under torchrun carried on past the SIGTERM)."""
    import signal

    from reptile_fast.distributed import training as T
    from reptile_fast.signals import DeferredSignals

    class Ctx:  # the other rank received SIGTERM: the max over ranks is its number
        is_distributed, device = True, torch.device("cpu")

        def all_reduce_(self, t, what, op="sum"):
            assert op == "max"
            t[0] = max(float(t[0]), float(signal.SIGTERM))
            return t

    class Loop:
        iteration, iterations, stopped = 7, 7, False

        def stop(self):
            self.stopped = True

    cb = T._RankCallback(Ctx(), DeferredSignals(), None, 10, agree=True)
    cb.on_start(Loop())
    cb.on_end(Loop())
    assert cb.stopped and cb.signum == signal.SIGTERM and cb.agreements == 1


# ------------------------------------------------------------------------ tasks
def test_episode_picks_stay_inside_each_class_and_classes_come_in_random_order():
    """``draw_episode_plan`` with classes of unequal sizes (2, 5, 3 images): every pick lies in
    ``range(counts[class])``, and the classes of a task come in random order (position = label),
    not sorted.

    Catches: the "missing images" mask off by one (a pick equal to a small class's count: an
    out-of-range image, or another class's); the classes returned sorted (label 0 always the
    lowest class index: a bias a learner can exploit)."""
    from reptile_fast.tasks.episodes import draw_episode_plan

    counts = torch.tensor([2, 5, 3])
    classes, picks = draw_episode_plan(counts, 400, 3, 2, generator=torch.Generator().manual_seed(8))
    assert bool((picks < counts[classes].unsqueeze(-1)).all())
    assert bool((picks[..., 0] != picks[..., 1]).all())
    ascending = (classes[:, 1:] > classes[:, :-1]).all(1)
    assert 0 < int(ascending.sum()) < 400  # 1 in 6 orders is ascending: ~67 of 400


def test_miniimagenet_pixels_are_scaled_to_exactly_0_and_1(tmp_path):
    """Mini-ImageNet tensors are the images' bytes / 255: a white pixel is 1.0, a black one 0.0,
    and 51 is 0.2 (to fp32 rounding).

    Catches: another scale (/ 256: white would be 0.996)."""
    import numpy as np
    from PIL import Image

    from reptile_fast.tasks import MiniImageNet

    (tmp_path / "images").mkdir()
    lines = ["filename,label"]
    for c, value in (("n01", 255), ("n02", 51)):
        img = np.zeros((4, 4, 3), dtype=np.uint8)
        img[:2] = value  # top half: value, bottom half: black
        Image.fromarray(img).save(tmp_path / "images" / f"{c}.png")
        lines.append(f"{c}.png,{c}")
    (tmp_path / "train.csv").write_text("\n".join(lines) + "\n")
    data = MiniImageNet(tmp_path, "train", ways=2, shots=1, query_shots=0, image_size=4)
    tb = data.sample(1, generator=torch.Generator().manual_seed(0))
    tops = sorted(float(tb.x[0, j, :, :2].mean()) for j in range(2))
    assert tops == pytest.approx([0.2, 1.0], abs=1e-7)
    assert float(tb.x[0, :, :, 2:].abs().max()) == 0.0


# ------------------------------------------------------------------------ plots
def test_learning_curve_envelope_and_scale(monkeypatch, tmp_path):
    """The learning curve of 10 losses in 5 buckets spans each bucket's min and max, and with a
    loss of 0 among them the axis stays linear (a log axis would drop that point).

    Catches: the envelope's low edge taken as a maximum (a band of zero width at the top); the
    log scale chosen when a loss is not positive."""
    import numpy as np

    from reptile_fast import plots

    figs = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path: figs.append(fig))
    y = np.array([5.0, 1.0, 4.0, 2.0, 3.0, 3.5, 0.5, 6.0, 2.5, 2.0])
    steps, low, high = plots._envelope(y, 5)
    assert steps.tolist() == [1, 3, 5, 7, 9]
    assert low.tolist() == [1.0, 2.0, 3.0, 0.5, 2.0] and high.tolist() == [5.0, 4.0, 3.5, 6.0, 2.5]
    plots.plot_learning_curve(y, tmp_path / "a.png", max_points=5)
    assert figs[-1].axes[0].get_yscale() == "log"
    plots.plot_learning_curve(np.append(y, 0.0), tmp_path / "b.png", max_points=5)
    assert figs[-1].axes[0].get_yscale() == "linear"


# ------------------------------------------------------------------------ kernels (Triton interpreter on CPU)
def test_kernel_v2_refuses_an_eps_tensor_of_another_dtype():
    """``mlp_meta_step_v2.meta_step`` reads ε from a device tensor as float32: a float64 (or
    float16) tensor is refused, naming ε.

    Catches: the dtype check dropped (the kernel would read 4 of the float64's 8 bytes as a
    float32: a silently wrong step size)."""
    pytest.importorskip("triton")
    from reptile_fast import MLP
    from reptile_fast.kernels import mlp_meta_step_v2 as V
    from reptile_fast.mlp_spec import extract_mlp_spec

    model = MLP(2, 8, 1)
    spec = extract_mlp_spec(model)
    phi = torch.cat([p.detach().reshape(-1) for pair in zip(spec.weight_names, spec.bias_names)
                     for p in (model.get_parameter(pair[0]), model.get_parameter(pair[1]))])
    tasks = _tasks(T=2, n=8, d_in=2, d_out=1)
    plan = sample_indices(2, 2, 8, 4, generator=torch.Generator().manual_seed(9))
    for dtype in (torch.float64, torch.float16):
        with pytest.raises(ValueError, match="eps as a tensor"):
            V.meta_step(tasks.x, tasks.y, plan, phi, spec.dims, list(spec.activations), lr=0.02,
                        eps=torch.tensor([0.5], dtype=dtype))


def test_guard_keeps_the_first_bad_meta_step_through_a_second_bad_one():
    """The accept-or-skip kernel: meta-step 12 is bad, 13 is bad too (no host check between):
    the state still names 12, the first one, and φ is as before 12.

    Catches: the "newly bad" flag ignoring ``healthy`` (the state would name 13, and
    ``NonFiniteError`` the wrong meta-step)."""
    pytest.importorskip("triton")
    import math

    from reptile_fast.kernels import meta_step_guard as G

    n = G.BLOCK + 5
    phi, state = torch.zeros(n), G.new_state("cpu")
    bad = torch.ones(n)
    bad[3] = math.nan
    out = torch.empty(1)
    for iteration, new in ((12, bad), (13, bad.clone())):
        G.accept_step(phi, new, torch.tensor([0.5]), state, torch.tensor([iteration]), out)
    assert state.tolist() == [0, 12]
    assert torch.equal(phi, torch.zeros(n))


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_a_callable_loss_is_the_loss_minimised(backend):
    """A custom callable loss (mean absolute error, plus a squared term so the gradient is not
    sign-only): every task's SGD inner loop against the same loop in float64 with autograd.

    Catches: ``resolve_loss`` handing back a built-in loss for a callable (the MSE minimised
    instead, silently)."""
    from reptile_fast.backends import InnerConfig
    from reptile_fast.backends.reference import ReferenceBackend
    from reptile_fast.backends.torch_func import TorchBackend

    def l1_plus(pred, target):
        d = pred - target
        return d.abs().mean() + 0.1 * d.square().mean()

    model, tasks = _mlp(), _tasks(T=2, n=9)
    plan = sample_indices(2, 3, 9, 4, generator=torch.Generator().manual_seed(10))
    be = ReferenceBackend() if backend == "reference" else TorchBackend()
    got = be.inner_loop(model, tasks, plan, InnerConfig(lr=0.1, loss=l1_plus)).params
    m64 = copy.deepcopy(model).double()
    for i in range(2):
        params = {n: p.detach().double() for n, p in model.named_parameters()}
        for s in range(3):
            leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
            ind = plan[i, s]
            value = l1_plus(torch.func.functional_call(m64, leaves, (tasks.x[i][ind].double(),)),
                            tasks.y[i][ind].double())
            grads = torch.autograd.grad(value, list(leaves.values()))
            params = {n: p - 0.1 * g for (n, p), g in zip(params.items(), grads)}
        for n, want in params.items():
            torch.testing.assert_close(got[n][i].double(), want, rtol=RTOL, atol=ATOL, msg=f"task {i} {n}")


def test_mean_reducer_sums_a_float16_meta_batch_in_float32():
    """``MeanReducer`` across processes with a float16 model (one rank's view: the collectives
    are the identity): three tasks whose inner losses are 30000 each sum past float16's 65504,
    yet the mean loss is 30000 and the mean update that of ``local_mean``.

    Catches: the sums travelling in the model's dtype (an inf/inf NaN meta-step in float16)."""
    from reptile_fast.core import local_mean
    from reptile_fast.distributed.context import DistContext
    from reptile_fast.distributed.reducers import MeanReducer

    class OneRankView(DistContext):
        is_distributed = True

        def all_reduce_(self, tensor, what, op="sum"):
            return tensor

        def all_gather(self, tensor, what):
            return [tensor]

    g = torch.Generator().manual_seed(12)
    deltas = [torch.randn(3, 4, 2, generator=g).half(), torch.randn(3, 4, generator=g).half()]
    losses = torch.full((3, 2), 30000.0, dtype=torch.float16)
    for collective in ("all_reduce", "all_gather"):
        mean, loss = MeanReducer(OneRankView(), collective)(deltas, losses)
        assert loss.dtype == torch.float16 and float(loss) == 30000.0
        want, _ = local_mean(deltas, losses)
        for a, b in zip(mean, want):
            assert a.dtype == torch.float16
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_the_compiled_backend_gives_back_the_thread_count():
    """Backend "compiled" runs its programs on one thread and restores the caller's count
    afterwards (here 2, set by the test), for ``meta_step`` and ``fit`` alike.

    Catches: ``single_thread`` not restoring it (every later torch op of the process would run on
    one thread)."""
    from reptile_fast import MLP, Reptile, Sine

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        trainer = Reptile(MLP(1, 8, 1), backend="compiled", backend_options={"mode": "eager"})
        trainer.meta_step(Sine().sample(1, generator=torch.Generator().manual_seed(0)))
        assert torch.get_num_threads() == 2
        trainer.fit(Sine(), 2, progress=False)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_kernel_v2_two_streamed_padded_layers_in_a_row():
    """``V2Config(stream=True)`` on 1-40-40-40-1: two streamed 40 x 40 layers (padded to 64) in a
    row (the suite streams one at a time).  The fused meta-step equals the float64 oracle.

    (Written for mutation K17, the scratch copy padded with 1e-3 instead of zeros, which it does
    not catch: the streamed K-loops read only ``k < D_IN`` and every write is masked, so padding
    never reaches a real unit; kept as coverage of a streamed chain against an independent oracle.)"""
    pytest.importorskip("triton")
    from reptile_fast import MLP
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    torch.manual_seed(46)
    model = MLP(1, 40, 1, depth=3)
    spec = extract_mlp_spec(model)
    names = [n for pair in zip(spec.weight_names, spec.bias_names) for n in pair]
    phi = torch.cat([model.get_parameter(n).detach().reshape(-1) for n in names])
    tasks = _tasks(T=2, n=12, d_in=1, d_out=1)
    plan = sample_indices(2, 2, 12, 5, generator=torch.Generator().manual_seed(47))
    want, _ = _oracle_meta_step(model, tasks, plan, inner_lr=0.05, eps=0.5)
    res = V.meta_step(tasks.x, tasks.y, plan, phi, spec.dims, list(spec.activations), lr=0.05, eps=0.5,
                      config=V.V2Config(stream=True, max_programs=1, accumulate="memory"))
    torch.testing.assert_close(res.params.double(), torch.cat([want[n].reshape(-1) for n in names]),
                               rtol=RTOL, atol=ATOL)


# ------------------------------------------------------------------------ hyper-parameters
def test_outer_lr_final_cannot_be_set_beside_an_outer_optimizer():
    """``outer_lr_final`` anneals the interpolation step; with an outer ``torch.optim`` optimizer
    it would be ignored, so setting it is refused — at construction and as a property later.

    Catches: the property's check dropped (a schedule set between fits silently did nothing)."""
    from reptile_fast import Reptile

    model = _mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(ValueError, match="outer_lr_final"):
        Reptile(model, outer_optimizer=opt, outer_lr_final=0.01)
    trainer = Reptile(model, outer_optimizer=opt)
    with pytest.raises(ValueError, match="lr_scheduler"):
        trainer.outer_lr_final = 0.01
    assert trainer.outer_lr_final is None
