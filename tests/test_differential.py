"""Differential testing across backends: random configurations, every backend variant that
accepts one, compared with backend "reference".

Extends ``tests/test_properties.py`` (plain ``MLP`` + plain SGD meta-steps) to what the trainer
promises beyond it: model forms (bare ``nn.Linear``, ``nn.Sequential`` with identity, the seed's
``reference.MLP``), inner Adam, FOMAML, ``inner_grad_weights``, outer optimizers, ``fit`` with an
annealed ε, checkpoint + resume, ``draw_chunks``, and ``adapt`` / ``evaluate`` on explicit plans.

Oracle and tolerance: every variant runs in float32 (TF32 off, see conftest) and must end within
rtol 1e-5 / atol 1e-6 of the float32 reference (the project's bound: a few short inner loops at
moderate rates accumulate ~1e-7 relative rounding, while a wrong plan, step count, rate or update
is off by orders of magnitude more) — or, in ill-conditioned cases where the float32 reference is
itself beyond that from a float64 run, no further from float64 than twice the reference's own
error (``assert_agrees``).  Torch, vmap and compiled-eager also run in float64 and must match the
float64 reference within rtol 1e-10.  Variants that
refuse a configuration must do so with ``UnsupportedModelError`` / ``ValueError`` / ``TypeError``
at construction — which ones refuse is predicted (``expected_refusal``) and checked, so a variant
cannot silently drop out.  Documented exceptions kept out of the draws: Dropout (agrees in
distribution only) and Adam on rounding-level gradients (inner Adam is drawn with tanh / sigmoid
hidden layers only, where no gradient is exactly zero in one order and ~1e-9 in another).

Examples are derandomized; ``REPTILE_DIFF_EXAMPLES=N`` runs more when exploring.
"""
import copy
import importlib.util
import os
import warnings

import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, TaskBatch, reference, sample_indices
from reptile_fast.backends import UnsupportedModelError

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

RTOL, ATOL = 1e-5, 1e-6
EXAMPLES = int(os.environ.get("REPTILE_DIFF_EXAMPLES", "0"))
SETTINGS = dict(deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "identity": nn.Identity}

#: variant name → (backend, backend_options)
VARIANTS = {
    "reference": ("reference", None),
    "torch": ("torch", None),
    "torch-vmap": ("torch", {"fast_mlp": False}),
    "compiled-native": ("compiled", {"mode": "native"}),
    "compiled-eager": ("compiled", {"mode": "eager"}),
    "triton-v1": ("triton", {"kernel": "v1"}),
    "triton-v2": ("triton", {"kernel": "v2"}),
    "triton-v2-fused": ("triton", {"kernel": "v2", "fused": True}),
}
CPU_VARIANTS = ("reference", "torch", "torch-vmap", "compiled-native", "compiled-eager")
TRITON_VARIANTS = ("triton-v1", "triton-v2", "triton-v2-fused")


def triton_runnable():
    if importlib.util.find_spec("triton") is None:
        return False
    return torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"


# ---------------------------------------------------------------------- configurations
@st.composite
def models(draw, *, max_width=16, max_depth=3):
    """A model description: ``kind`` in mlp / sequential / linear / seed."""
    kind = draw(st.sampled_from(["mlp", "sequential", "linear", "seed"]))
    d_in = draw(st.integers(1, 4))
    d_out = draw(st.integers(1, 3))
    if kind == "linear":
        return dict(kind=kind, d_in=d_in, d_out=d_out, hidden=[], acts=[])
    if kind == "seed":
        return dict(kind=kind, d_in=d_in, d_out=d_out, hidden=[draw(st.integers(1, max_width))] * 2,
                    acts=["tanh", "tanh"])
    depth = draw(st.integers(1 if kind == "sequential" else 0, max_depth))
    hidden = [draw(st.integers(1, max_width)) for _ in range(depth)]
    if kind == "mlp":
        acts = [draw(st.sampled_from(["tanh", "relu", "sigmoid", "identity"]))] * depth
    else:
        acts = [draw(st.sampled_from(list(ACTIVATIONS))) for _ in range(depth)]
    return dict(kind=kind, d_in=d_in, d_out=d_out, hidden=hidden, acts=acts)


def build_model(spec, out):
    """The module described by ``spec`` with ``out`` output features."""
    if spec["kind"] == "linear":
        return nn.Linear(spec["d_in"], out)
    if spec["kind"] == "seed":
        return reference.MLP(spec["d_in"], spec["hidden"][0], out)
    if spec["kind"] == "mlp":
        return MLP(spec["d_in"], output_dim=out, hidden_dims=spec["hidden"],
                   activation=spec["acts"][0] if spec["acts"] else "tanh")
    layers, d = [], spec["d_in"]
    for h, a in zip(spec["hidden"], spec["acts"]):
        layers += [nn.Linear(d, h), ACTIVATIONS[a]()]
        d = h
    return nn.Sequential(*layers, nn.Linear(d, out))


@st.composite
def cases(draw, *, max_width=16, max_tasks=9, max_steps=6, max_batch=8, fit=False, plain=False):
    """A configuration; ``plain``: SGD Reptile only (what the Triton kernels and compiled path run)."""
    model = draw(models(max_width=max_width))
    loss = draw(st.sampled_from(["mse", "cross_entropy"]))
    algorithm = "reptile" if plain else draw(st.sampled_from(["reptile", "reptile", "fomaml"]))
    steps = draw(st.integers(1, max_steps))
    smooth = all(a in ("tanh", "sigmoid", "identity") for a in model["acts"])
    # inner Adam only where no gradient can be exactly zero in one summation order and at rounding
    # level in another (the README's documented exception: ReLU's dead units)
    optimizer = draw(st.sampled_from(["sgd", "sgd", "adam"])) if smooth and not plain else "sgd"
    weights = None
    if algorithm == "reptile" and not plain and draw(st.booleans()) and draw(st.booleans()):
        weights = tuple(draw(st.floats(0.0, 1.0)) for _ in range(steps))
    batch = draw(st.integers(1, max_batch))
    outer = draw(st.sampled_from(["interp", "interp", "interp", "sgd-momentum", "adam"]))
    if plain:
        outer = draw(st.sampled_from(["interp", "interp", "interp", "sgd-momentum"]))
    betas = draw(st.sampled_from([(0.0, 0.999), (0.9, 0.999), (0.5, 0.9)])) if optimizer == "adam" else (0.0, 0.999)
    points = draw(st.integers(batch, batch + 5))
    # a user's plan may use another minibatch size than inner_batch_size (meta_step, adapt)
    plan_batch = draw(st.sampled_from([batch, batch, draw(st.integers(1, points))]))
    return dict(
        plan_batch=plan_batch, adam_betas=betas, model=model, loss=loss, algorithm=algorithm, inner_steps=steps, inner_optimizer=optimizer,
        inner_grad_weights=weights, batch=batch, points=points,
        tasks=draw(st.integers(1, max_tasks)),
        inner_lr=draw(st.floats(1e-3, 0.05)) if optimizer == "sgd" else draw(st.floats(1e-4, 2e-3)),
        outer_lr=draw(st.floats(0.05, 1.0)),
        outer_lr_final=draw(st.sampled_from([None, 0.0, 0.02])) if fit and outer == "interp" else None,
        outer=outer, meta_steps=draw(st.integers(1, 3)), seed=draw(st.integers(0, 2**31 - 1)),
    )


def out_features(case):
    return max(2, case["model"]["d_out"]) if case["loss"] == "cross_entropy" else case["model"]["d_out"]


def base_model(case):
    torch.manual_seed(case["seed"])
    return build_model(case["model"], out_features(case))


class RandomTasks:
    """A task distribution for ``fit``: uniform inputs, random targets / labels."""

    def __init__(self, d_in, d_out, points, classes=None, dtype=torch.float32):
        self.d_in, self.d_out, self.points, self.classes, self.dtype = d_in, d_out, points, classes, dtype

    def sample(self, n_tasks, *, generator=None, device=None):
        x = torch.rand(n_tasks, self.points, self.d_in, generator=generator) * 4 - 2
        if self.classes:
            y = torch.randint(0, self.classes, (n_tasks, self.points), generator=generator)
        else:
            y = torch.rand(n_tasks, self.points, self.d_out, generator=generator) * 2 - 1
        y = y if self.classes else y.to(self.dtype)
        return TaskBatch(x.to(device or "cpu", self.dtype), y.to(device or "cpu"))


def distribution(case, dtype=torch.float32):
    classes = out_features(case) if case["loss"] == "cross_entropy" else None
    return RandomTasks(case["model"]["d_in"], case["model"]["d_out"], case["points"], classes, dtype)


def draws(case):
    """``meta_steps`` explicit (tasks, plan) pairs."""
    g = torch.Generator().manual_seed(case["seed"])
    rows = case["inner_steps"] + (case["algorithm"] == "fomaml")
    dist = distribution(case)
    return [(dist.sample(case["tasks"], generator=g),
             sample_indices(case["tasks"], rows, case["points"], case.get("plan_batch", case["batch"]), generator=g))
            for _ in range(case["meta_steps"])]


def expected_refusal(case, variant):
    """Why ``variant`` must refuse ``case`` (None: it must run it)."""
    backend = VARIANTS[variant][0]
    if backend == "compiled":
        if case["inner_optimizer"] != "sgd" or case["algorithm"] != "reptile" or case["inner_grad_weights"]:
            return "compiled: plain Reptile with SGD only"
        if case["outer"] != "interp":
            return "compiled: no outer optimizer"
    if backend == "triton":
        if case["inner_optimizer"] != "sgd" or case["algorithm"] != "reptile" or case["inner_grad_weights"]:
            return "triton: plain Reptile with SGD only"
        if variant == "triton-v2-fused" and case["outer"] != "interp":
            return "triton fused: no outer optimizer"
    return None


def make_trainer(model, case, variant, **extra):
    name, options = VARIANTS[variant]
    options = None if options is None else dict(options)
    outer = None
    if case["outer"] == "sgd-momentum":
        outer = torch.optim.SGD(model.parameters(), lr=case["outer_lr"], momentum=0.9)
    elif case["outer"] == "adam":
        # eps well above rounding: Adam's first step lr·g/(|g|+eps) is ~lr·sign(g) for |g| >> eps,
        # so a pseudo-gradient at rounding level would make its sign a coin flip (README's exception)
        outer = torch.optim.Adam(model.parameters(), lr=case["outer_lr"] * 0.1, eps=1e-2)
    return Reptile(model, backend=name, backend_options=options, inner_lr=case["inner_lr"],
                   inner_steps=case["inner_steps"], inner_batch_size=case["batch"], outer_lr=case["outer_lr"],
                   outer_lr_final=case["outer_lr_final"], loss=case["loss"],
                   inner_optimizer=case["inner_optimizer"], algorithm=case["algorithm"],
                   inner_grad_weights=case["inner_grad_weights"], outer_optimizer=outer,
                   adam_betas=case.get("adam_betas", (0.0, 0.999)), **extra)


def params(model):
    return {k: v.detach().cpu().clone() for k, v in model.named_parameters()}


def assert_close(got, want, what, adam_steps=None, lr=None):
    """rtol/atol per element.  ``adam_steps``: the README's Adam exception — an element whose
    gradient sits at rounding level gets a step of ~lr whose sign rounding decides, so up to 1 %
    of elements (at least one) may differ by at most 2·lr per Adam step taken."""
    assert got.keys() == want.keys(), what
    for k in want:
        g, w = got[k].to(want[k].dtype), want[k]
        if adam_steps:
            off = (g - w).abs() > ATOL + RTOL * w.abs()
            assert int(off.sum()) <= max(1, off.numel() // 100), f"{what}, {k}: {int(off.sum())} elements off"
            assert ((g - w).abs()[off] <= 2 * lr * adam_steps).all(), f"{what}, {k}: beyond 2·lr per Adam step"
            g = torch.where(off, w, g)
        torch.testing.assert_close(g, w, rtol=RTOL, atol=ATOL, msg=lambda m, k=k: f"{what}, {k}: {m}")


def adam_args(case, steps):
    """``assert_close``'s Adam allowance for ``steps`` Adam steps (none for SGD)."""
    return dict(adam_steps=steps, lr=case["inner_lr"]) if case["inner_optimizer"] == "adam" else {}


def assert_agrees(got, ref, oracle64, what, **adam):
    """A float32 variant against the float32 reference and the float64 one.

    Each element must lie within rtol/atol of the float32 reference, or — where the case is
    ill-conditioned, i.e. the float32 reference is itself beyond that tolerance from float64
    (meta-steps of order-one parameter changes, as large ε with ``inner_grad_weights`` make,
    amplify rounding ~10× per meta-step) — no further from float64 than twice the float32
    reference's own error plus the tolerance: never worse than the reference's rounding.
    """
    if adam:  # the Adam allowance is against each reference alone
        assert_close(got, ref, what, **adam)
        assert_close(got, oracle64, what, **adam)
        return
    for k in ref:
        g, r, o = got[k].double(), ref[k].double(), oracle64[k]
        own = (r - o).abs()
        near32 = (g - r).abs() <= ATOL + RTOL * r.abs()
        near64 = (g - o).abs() <= ATOL + RTOL * o.abs() + 2 * own
        if not near32.all():
            note("ill-conditioned case: compared with float64")
        ok = near32 | near64
        assert ok.all(), (f"{what}, {k}: {int((~ok).sum())} elements beyond both bounds; max |got − ref32| "
                          f"{(g - r).abs().max().item():.3g}, |got − ref64| {(g - o).abs().max().item():.3g}, "
                          f"|ref32 − ref64| {own.max().item():.3g}")


def note(text):
    """A hypothesis event (statistics with --hypothesis-show-statistics); nothing outside a test."""
    try:
        event(text)
    except hypothesis.errors.InvalidArgument:
        pass


def try_trainer(model, case, variant, **extra):
    """The trainer, or None when the variant refuses the case as predicted; a refusal that was not
    predicted, or a prediction not honoured, fails."""
    why = expected_refusal(case, variant)
    try:
        trainer = make_trainer(model, case, variant, **extra)
    except (UnsupportedModelError, ValueError, TypeError) as exc:
        if why is None:
            raise AssertionError(f"variant {variant} refused a case it should run ({exc}): {case}") from exc
        note(f"{variant} refused")
        return None
    note(f"{variant} ran")
    if why is not None:
        raise AssertionError(f"variant {variant} accepted a case it should refuse ({why}): {case}")
    return trainer


# ---------------------------------------------------------------------- scenarios
def run_meta_steps(case, variant, dtype=torch.float32):
    # Triton runs on CUDA where there is one (on the CPU only under the interpreter)
    device = "cuda" if VARIANTS[variant][0] == "triton" and torch.cuda.is_available() else "cpu"
    model = base_model(case).to(device, dtype)
    trainer = try_trainer(model, case, variant)
    if trainer is None:
        return None
    for tasks, plan in draws(case):
        y = tasks.y if tasks.y.dtype == torch.long else tasks.y.to(dtype)
        trainer.meta_step(TaskBatch(tasks.x.to(device, dtype), y.to(device)), plan.to(device))
    trainer.check_finite()
    return params(model)


def check_meta_steps(case, variants):
    oracle64 = run_meta_steps(case, "reference", torch.float64)
    ref = run_meta_steps(case, "reference")
    ran = []
    for v in variants:
        got = run_meta_steps(case, v)
        if got is None:
            continue
        ran.append(v)
        adam = adam_args(case, case["inner_steps"] * case["meta_steps"])
        assert_agrees(got, ref, oracle64, f"{v} vs reference (float32, float64), {case}", **adam)
        if VARIANTS[v][0] != "triton" and v != "compiled-native":
            # float64 through the same code: a formula off by 1e-6 relative hides in fp32's
            # tolerance, not here (float64 rounding over a few short loops: ~1e-14)
            got64 = run_meta_steps(case, v, torch.float64)
            for k in oracle64:
                torch.testing.assert_close(got64[k], oracle64[k], rtol=1e-10, atol=1e-12,
                                           msg=lambda m, k=k: f"{v} float64 vs reference float64, {k}, {case}: {m}")
    return ran


def run_fit(case, variant, iterations, *, draw_chunks=False, ckpt=None, split=None, dtype=torch.float32):
    """``fit`` from the case's seed; with ``split``, stop at ``split`` with a checkpoint and resume
    in a fresh trainer (the documented way) to ``iterations``."""
    model = base_model(case).to(dtype)
    trainer = try_trainer(model, case, variant)
    if trainer is None:
        return None
    dist = distribution(case, dtype)
    kw = dict(meta_batch_size=case["tasks"], progress=False, draw_chunks=draw_chunks)
    if split is None:
        trainer.fit(dist, iterations, generator=torch.Generator().manual_seed(case["seed"]), **kw)
        return params(model)
    class Crash(Exception):
        pass

    def crash(iteration, _):
        if iteration > split:  # after the checkpoint at ``split`` was written
            raise Crash

    with pytest.raises(Crash):
        trainer.fit(dist, iterations, generator=torch.Generator().manual_seed(case["seed"]), checkpoint_dir=ckpt,
                    checkpoint_every=split, callback=crash, **kw)
    # resumed in a new trainer built the same way (a new process would)
    model = base_model(case).to(dtype)
    trainer = make_trainer(model, case, variant)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same settings: nothing to warn about
        trainer.fit(dist, iterations, generator=torch.Generator(), checkpoint_dir=ckpt, resume_from=ckpt, **kw)
    return params(model)


# ---------------------------------------------------------------------- tests
@settings(max_examples=EXAMPLES or 25, **SETTINGS)
@given(case=st.one_of(cases(), cases(plain=True)))
def test_meta_steps_agree_across_cpu_backends(case):
    ran = check_meta_steps(case, CPU_VARIANTS[1:])
    assert "torch" in ran and "torch-vmap" in ran


@settings(max_examples=EXAMPLES or 15, **SETTINGS)
@given(case=st.one_of(cases(fit=True, max_tasks=5, max_steps=4), cases(fit=True, max_tasks=5, max_steps=4, plain=True)),
       data=st.data())
def test_fit_agrees_across_cpu_backends_and_with_resume(case, data, tmp_path_factory):
    iterations = data.draw(st.integers(2, 5))
    ref = run_fit(case, "reference", iterations)
    oracle64 = run_fit(case, "reference", iterations, dtype=torch.float64)
    adam = adam_args(case, case["inner_steps"] * iterations)
    for other in CPU_VARIANTS[1:]:  # the refusals are checked for every variant (cheap) ...
        if expected_refusal(case, other) is not None:
            assert try_trainer(base_model(case), case, other) is None
    # ... and one accepting variant is compared
    variant = data.draw(st.sampled_from([v for v in CPU_VARIANTS if expected_refusal(case, v) is None]))
    note(f"fit compared: {variant}")
    got = ref if variant == "reference" else run_fit(case, variant, iterations)
    assert_agrees(got, ref, oracle64, f"fit: {variant} vs reference (float32, float64), {case}", **adam)
    split = data.draw(st.integers(1, iterations - 1))
    ckpt = tmp_path_factory.mktemp("ckpt")
    resumed = run_fit(case, variant, iterations, ckpt=ckpt, split=split)
    # bitwise on the CPU: a resumed run is the uninterrupted one
    assert_close(resumed, got, f"fit resumed at {split}: {variant}, {case}")
    for k in got:
        assert torch.equal(resumed[k], got[k]), (variant, k, split, case)


@settings(max_examples=EXAMPLES or 15, **SETTINGS)
@given(case=cases(max_tasks=6), data=st.data())
def test_adapt_and_evaluate_agree_across_cpu_backends(case, data):
    steps = data.draw(st.integers(1, 6))
    g = torch.Generator().manual_seed(case["seed"] + 1)
    tasks = distribution(case).sample(case["tasks"], generator=g)
    plan = sample_indices(case["tasks"], steps, case["points"], data.draw(st.integers(1, case["points"])),
                          generator=g)
    out = {}
    for variant in ("reference", *CPU_VARIANTS[1:]):
        trainer = try_trainer(base_model(case), case, variant)
        if trainer is None:
            continue
        res = trainer.adapt(tasks, steps, plan)
        out[variant] = ({k: v.detach() for k, v in res.params.items()}, res.losses.detach(),
                        trainer.evaluate(tasks, steps, plan).detach(), trainer.evaluate(tasks, 0).detach())
    ref = out.pop("reference")
    for variant, (p, losses, post, pre) in out.items():
        assert_close(p, ref[0], f"adapt params: {variant}, {case}", **adam_args(case, steps))
        if case["inner_optimizer"] == "sgd":  # Adam's rounding-level elements move the losses a little
            torch.testing.assert_close(losses, ref[1], rtol=RTOL, atol=ATOL, msg=lambda m: f"adapt losses {variant}: {m}")
            torch.testing.assert_close(post, ref[2], rtol=RTOL, atol=ATOL, msg=lambda m: f"evaluate {variant}: {m}")
        torch.testing.assert_close(pre, ref[3], rtol=RTOL, atol=ATOL, msg=lambda m: f"evaluate(0) {variant}: {m}")


#: launch settings that make programs loop over tasks (meta-batches that are not a multiple of
#: the program count leave a part-empty last round), per kernel
TRITON_LAUNCHES = {
    "triton-v1": [None, {"mode": "registers", "num_warps": 4, "tasks_per_program": 2},
                  {"mode": "registers", "num_warps": 4, "tasks_per_program": 3},
                  {"mode": "tiled", "num_warps": 4, "max_programs": 2}],
    "triton-v2": [None, {"max_programs": 2}, {"max_programs": 4, "accumulate": "memory"},
                  {"max_programs": 3, "stream": True}, {"preload": False, "max_programs": 2}],
}


@pytest.mark.skipif(not triton_runnable(), reason="triton not installed, or no CUDA and no interpreter")
@settings(max_examples=EXAMPLES or 6, **SETTINGS)
@given(case=cases(max_width=8, max_tasks=9, max_steps=2, max_batch=4, plain=True), data=st.data())
def test_meta_steps_agree_on_triton(case, data):
    case = dict(case, meta_steps=min(case["meta_steps"], 2))
    saved = dict(VARIANTS)
    try:
        for variant in TRITON_VARIANTS:
            launch = data.draw(st.sampled_from(TRITON_LAUNCHES[variant.replace("-fused", "")]), label=variant)
            if launch is not None:
                VARIANTS[variant] = (VARIANTS[variant][0], dict(VARIANTS[variant][1], launch=launch))
        check_meta_steps(case, TRITON_VARIANTS)
    finally:
        VARIANTS.clear()
        VARIANTS.update(saved)


# ---------------------------------------------------------------------- the drop-in
DROPIN_VARIANTS = ("compiled-native", "compiled-eager", "torch", "torch-vmap", "reference")


@settings(max_examples=EXAMPLES or 10, **SETTINGS)
@given(model=models(max_width=12), data=st.data())
def test_dropin_equals_the_seed_loop_on_the_same_draws(model, data):
    """``reptile_fast.reptile(model, n, sample_task, partial(perform_k_training_steps,
    batch_size=b), k, epsilon)`` fed the seed loop's own task and randperm draws (``indices=``, the
    documented way to compare) ends where ``reference.reptile`` does, on every backend.  The seed's
    inner loop reads 1-D tasks (it unsqueezes the last dimension): one input, one output."""
    import functools

    import reptile_fast

    spec = dict(model, d_in=1, d_out=1)
    n = data.draw(st.integers(1, 6), label="iterations")
    points = data.draw(st.integers(1, 12), label="points")
    batch = data.draw(st.integers(1, points), label="batch_size")
    k = data.draw(st.integers(1, 2), label="k")
    epsilon = data.draw(st.floats(0.05, 1.0), label="epsilon")
    variant = data.draw(st.sampled_from(DROPIN_VARIANTS), label="variant")
    seed = data.draw(st.integers(0, 2**31 - 1), label="seed")
    gen = torch.Generator().manual_seed(seed)
    tasks = [(torch.rand(points, generator=gen) * 10 - 5, torch.rand(points, generator=gen) * 2 - 1, nn.MSELoss())
             for _ in range(n)]
    steps = k * points // batch
    torch.manual_seed(seed + 1)
    plans = torch.stack([torch.randperm(points)[:batch] for _ in range(n * steps)]).view(n, 1, steps, batch)
    inner = functools.partial(reference.perform_k_training_steps, batch_size=batch)

    torch.manual_seed(seed)
    want = build_model(spec, 1)
    got = copy.deepcopy(want)
    torch.manual_seed(seed + 1)  # the seed loop draws its randperms from the global RNG
    reference.reptile(want, n, iter(tasks).__next__, inner, k=k, epsilon=epsilon, progress=False)
    name, options = VARIANTS[variant]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the standard inner loop: no ReferencePathWarning
        stats = reptile_fast.reptile(got, n, iter(tasks).__next__, inner, k=k, epsilon=epsilon, backend=name,
                                     backend_options=options, progress=False, indices=plans)
    assert stats["path"] == name and stats["inner_steps"] == steps and stats["inner_batch_size"] == batch
    assert_close(params(got), params(want), f"drop-in {variant} vs reference.reptile, {spec}, n={n} "
                                            f"points={points} batch={batch} k={k} eps={epsilon}")


# ---------------------------------------------------------------------- fit(draw_chunks=True)
@settings(max_examples=EXAMPLES or 10, **SETTINGS)
@given(case=cases(fit=True, max_tasks=4, max_steps=3, plain=True), data=st.data())
def test_draw_chunks_trains_on_the_chunks_draws(case, data):
    """``fit(draw_chunks=True)`` on backend "compiled" with chunk ``c`` draws each chunk's ``m·T``
    tasks in one ``sample`` call and their plans in one ``sample_indices`` call (``m = c``, the
    last chunk cut at the total).  Replaying exactly those draws through the reference backend's
    ``meta_step`` with the annealed ε must give the same φ; and with ``c = 1`` the draws are
    ``fit``'s default ones."""
    case = dict(case, outer="interp")
    iterations = data.draw(st.integers(1, 7), label="iterations")
    chunk = data.draw(st.integers(1, 4), label="chunk")
    variant = data.draw(st.sampled_from(["compiled-native", "compiled-eager"]), label="variant")
    dist = distribution(case)
    model = base_model(case)
    name, options = VARIANTS[variant]
    trainer = make_trainer(model, case, variant)
    trainer.compiled_options["chunk"] = chunk
    trainer.fit(dist, iterations, meta_batch_size=case["tasks"], generator=torch.Generator().manual_seed(case["seed"]),
                progress=False, draw_chunks=True)
    got = params(model)

    ref_model = base_model(case)
    ref = make_trainer(ref_model, case, "reference")
    g = torch.Generator().manual_seed(case["seed"])
    T, done = case["tasks"], 0
    while done < iterations:
        m = min(chunk, iterations - done)
        tasks = dist.sample(m * T, generator=g)
        plans = sample_indices(m * T, case["inner_steps"], case["points"], case["batch"], generator=g)
        for j in range(m):
            rows = slice(j * T, (j + 1) * T)
            ref.meta_step(TaskBatch(tasks.x[rows], tasks.y[rows]), plans[rows],
                          outer_lr=ref.outer_lr_at(done + j, iterations))
        done += m
    assert_close(got, params(ref_model), f"draw_chunks {variant} chunk={chunk} iterations={iterations}, {case}")
    if chunk == 1:
        default = run_fit(case, "reference", iterations)
        assert_close(got, default, f"draw_chunks chunk=1 vs default draws, {case}")
