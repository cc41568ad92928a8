"""A systematic bad-input sweep of every public entry point (QA13).

Each argument of each entry point (README "Python API", ``reptile_fast.__all__``, the CLI, the
kernel launchers, ``distributed_fit``) is given values from one hostile palette: None, a bool
where a number is meant, floats where ints are, numpy scalars, 0-dim tensors, negative, zero,
NaN, inf, huge, strings, lists, tensors of the wrong dtype / device / shape, non-contiguous and
expanded views, tensors that require grad or hold NaN.  Every case states what the project's
standard expects:

* ``ACCEPT``: a valid value in an unusual form (numpy scalars, views, a tensor requiring grad):
  it must run, and its result must equal the same call with the plain value (``ref``);
* ``REJECT``: a ``ValueError``/``TypeError`` whose message names the argument (one of
  ``names``), raised at the entry point;
* ``EITHER``: accepted with finite results, or rejected as above.

Anything else — another exception type (RuntimeError, IndexError, AttributeError, ... from deep
inside torch or Triton), a message that does not name the problem, a hang, or an invalid value
silently accepted — is a defect.  The cases are a fixed, deterministic list (no random draws):
``python tests/test_fuzz_inputs.py`` prints the table of outcomes.
"""
from __future__ import annotations

import math
import signal
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

import numpy as np
import pytest
import torch

from reptile_fast import NonFiniteError

ACCEPT, REJECT, EITHER = "accept", "reject", "either"
TIMEOUT_S = 30


@dataclass
class Case:
    entry: str            # e.g. "Reptile(inner_lr=)"
    label: str            # the palette entry
    call: Callable[[], Any]
    expect: str
    names: Sequence[str] = ()          # a rejection's message must contain one of these (lowercase)
    ref: Optional[Callable[[], Any]] = None  # ACCEPT: the plain input's result
    also: tuple = ()      # other exception types that are a documented answer (NonFiniteError)
    id: str = field(default="")

    def __post_init__(self):
        self.id = f"{self.entry}[{self.label}]"


# ---------------------------------------------------------------------- helpers
def _flat(result) -> Optional[torch.Tensor]:
    """The numbers a call produced, flattened to one float64 tensor (None: nothing numeric)."""
    import reptile_fast

    if isinstance(result, torch.Tensor):
        return result.detach().reshape(-1).to(torch.float64) if not result.is_complex() else None
    if isinstance(result, reptile_fast.Reptile):
        return torch.cat([p.detach().reshape(-1).double() for p in result.model.parameters()])
    if isinstance(result, torch.nn.Module):
        return torch.cat([p.detach().reshape(-1).double() for p in result.parameters()])
    if isinstance(result, reptile_fast.TaskBatch):
        return torch.cat([result.x.reshape(-1).double(), result.y.reshape(-1).double()])
    if hasattr(result, "params") and hasattr(result, "loss") and not isinstance(result, dict):  # v2 MetaStepResult
        return torch.cat([result.params.reshape(-1).double(), result.loss.reshape(-1).double()])
    if hasattr(result, "params") and hasattr(result, "losses"):  # InnerResult
        params = result.params
        parts = list(params.values()) if isinstance(params, dict) else [params]
        return torch.cat([p.detach().reshape(-1).double() for p in parts] + [result.losses.reshape(-1).double()])
    if isinstance(result, (tuple, list)) and result and all(isinstance(r, torch.Tensor) for r in result):
        return torch.cat([r.detach().reshape(-1).double() for r in result])
    if isinstance(result, dict) and "loss" in result:
        loss = result["loss"]
        if isinstance(loss, torch.Tensor):
            return loss.detach().reshape(-1).double()
        if isinstance(loss, list) and loss and isinstance(loss[0], (int, float)):
            return torch.tensor(loss, dtype=torch.float64)
    if isinstance(result, (int, float)) and not isinstance(result, bool):
        return torch.tensor([float(result)], dtype=torch.float64)
    return None


class _Hang(Exception):
    pass


def _alarm(signum, frame):  # pragma: no cover - only on a hang
    raise _Hang(f"no answer within {TIMEOUT_S} s")


def outcome(case: Case) -> tuple:
    """``(verdict, detail)``: verdict "ok" or "DEFECT"."""
    torch.manual_seed(0)
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.alarm(TIMEOUT_S)
    try:
        try:
            result = case.call()
        finally:
            signal.alarm(0)
            signal.signal(signal.SIGALRM, old)
    except _Hang as exc:
        return "DEFECT", f"hang: {exc}"
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, PermissionError) as exc:
        # a path that is missing, not a directory or not writable: the OSError the README documents
        msg = str(exc)
        if case.expect == ACCEPT:
            return "DEFECT", f"valid input refused: {type(exc).__name__}: {msg[:300]}"
        if case.names and not any(n.lower() in msg.lower() for n in case.names):
            return "DEFECT", f"message does not name {list(case.names)}: {type(exc).__name__}: {msg[:300]}"
        if "\n" in msg.strip() and "Traceback" in msg:
            return "DEFECT", f"message holds a traceback: {msg[:300]}"
        return "ok", f"{type(exc).__name__}: {msg[:160]}"
    except case.also as exc:
        return "ok", f"{type(exc).__name__}: {str(exc)[:160]}"
    except SystemExit as exc:  # only the CLI cases expect it; they catch it themselves
        return "DEFECT", f"SystemExit({exc.code})"
    except BaseException as exc:  # noqa: BLE001 - the point of the sweep
        if isinstance(exc, KeyboardInterrupt):
            raise
        return "DEFECT", f"{type(exc).__name__}: {str(exc)[:300]}"
    if case.expect == REJECT:
        return "DEFECT", f"invalid input accepted (result {type(result).__name__})"
    got = _flat(result)
    if got is not None and got.numel() and not bool(torch.isfinite(got).all()):
        return "DEFECT", "accepted, but the result holds NaN/inf"
    if case.ref is not None:
        torch.manual_seed(0)
        want = _flat(case.ref())
        if got is None or want is None or got.shape != want.shape or not torch.equal(got, want):
            diff = (got - want).abs().max().item() if got is not None and want is not None \
                and got.shape == want.shape else "shape"
            return "DEFECT", f"accepted, but differs from the plain input's result (max diff {diff})"
    return "ok", "accepted"


# ---------------------------------------------------------------------- palettes
NAN, INF = float("nan"), float("inf")
HUGE_INT = 2 ** 62


def int_palette(good: int, minimum: int = 1):
    """``(label, value, expect, plain)`` for an int argument whose valid example is ``good``."""
    return [
        ("None", None, REJECT, None),
        ("True", True, REJECT, None),
        ("float", float(good) + 0.5, REJECT, None),
        ("float-integral", float(good), EITHER, good),
        ("np.int64", np.int64(good), ACCEPT, good),
        ("np.int32", np.int32(good), ACCEPT, good),
        ("np.bool_", np.bool_(True), REJECT, None),
        ("tensor0d", torch.tensor(good), EITHER, good),
        ("negative", -1, REJECT, None),
        ("below-min", minimum - 1, REJECT, None),
        ("nan", NAN, REJECT, None),
        ("inf", INF, REJECT, None),
        ("str", str(good), REJECT, None),
        ("list", [good], REJECT, None),
    ]


def float_palette(good: float, *, allow_zero: bool = False):
    return [
        ("None", None, REJECT, None),
        ("True", True, REJECT, None),
        ("int", int(math.ceil(good)), ACCEPT, float(math.ceil(good))),
        ("np.float32", np.float32(good), ACCEPT, float(np.float32(good))),
        ("np.float64", np.float64(good), ACCEPT, good),
        ("np.int64", np.int64(1), ACCEPT, 1.0),
        ("tensor0d", torch.tensor(good), EITHER, float(torch.tensor(good))),
        ("negative", -good, REJECT, None),
        *([] if allow_zero else [("zero", 0.0, REJECT, None)]),
        ("nan", NAN, REJECT, None),
        ("np.nan32", np.float32("nan"), REJECT, None),
        ("inf", INF, REJECT, None),
        ("str", str(good), REJECT, None),
        ("list", [good], REJECT, None),
        ("complex", complex(good, 1), REJECT, None),
    ]


def bool_palette():
    return [("None", None, REJECT, None), ("int1", 1, REJECT, None), ("str-no", "no", REJECT, None),
            ("np.bool_", np.bool_(False), ACCEPT, False), ("tensor", torch.tensor(True), EITHER, True)]


# ---------------------------------------------------------------------- fixtures (plain data)
def _model(width: int = 8, dtype=torch.float32):
    from reptile_fast import MLP

    torch.manual_seed(0)
    return MLP(1, width, 1).to(dtype)


def _tasks(n: int = 3, dtype=torch.float32):
    from reptile_fast import Sine

    return Sine().sample(n, generator=torch.Generator().manual_seed(0)).to(dtype=dtype)


def _plan(n: int = 3, steps: int = 5, batch: int = 10):
    from reptile_fast import sample_indices

    return sample_indices(n, steps, 50, batch, generator=torch.Generator().manual_seed(1))


def _trainer(backend: str = "torch", **kw):
    from reptile_fast import Reptile

    return Reptile(_model(), backend=backend, **kw)


def _one_step(plan: bool = True, **kw):
    """Build a trainer with ``kw`` and take one meta-step on fixed tasks and plan (drawn by the
    trainer without ``plan``): the trainer."""
    tr = _trainer(**kw)
    tr.meta_step(_tasks(), _plan(steps=tr.plan_rows(tr.inner_steps), batch=tr.inner_batch_size) if plan else None)
    tr.check_finite()
    return tr


# ---------------------------------------------------------------------- cases: Reptile(...)
def reptile_constructor_cases():
    cases = []
    numeric = [("inner_lr", float_palette(0.02), {}), ("outer_lr", float_palette(0.1), {}),
               ("outer_lr_final", float_palette(0.05, allow_zero=True), {}),
               ("inner_steps", int_palette(3), {}), ("inner_batch_size", int_palette(5), {})]
    for arg, palette, _ in numeric:
        for label, value, expect, plain in palette:
            if arg == "outer_lr_final" and label == "None":
                expect, plain = ACCEPT, None  # no schedule
            cases.append(Case(f"Reptile({arg}=)", label, lambda a=arg, v=value: _one_step(**{a: v}), expect,
                              (arg,), (lambda a=arg, p=plain: _one_step(**{a: p})) if expect != REJECT else None))
    # huge values: the constructor may take them, but a meta-step must not crash deep in torch
    cases += [Case("Reptile(inner_steps=)", "huge", lambda: _one_step(False, inner_steps=HUGE_INT), EITHER,
                   ("inner_steps", "memory", "plan", "indices")),
              Case("Reptile(inner_batch_size=)", "huge", lambda: _one_step(False, inner_batch_size=HUGE_INT), EITHER,
                   ("inner_batch_size",)),
              Case("Reptile(inner_lr=)", "huge", lambda: _one_step(inner_lr=1e300), EITHER,
                   ("inner_lr",), also=(NonFiniteError,)),
              Case("Reptile(outer_lr=)", "huge", lambda: _one_step(outer_lr=1e300), EITHER,
                   ("outer_lr",), also=(NonFiniteError,))]
    for backend in ("reference", "compiled"):  # each has its own outer update
        cases.append(Case(f"Reptile[{backend}](outer_lr=)", "huge", lambda b=backend: _one_step(
            backend=b, outer_lr=1e300), EITHER, ("outer_lr",), also=(NonFiniteError,)))
    cases.append(Case("Reptile(model=fp16, inner_lr=)", "beyond-fp16", lambda: _step_dtype(torch.float16, inner_lr=1e5),
                      EITHER, ("inner_lr",), also=(NonFiniteError,)))
    strs = [("loss", ["mse"], ["l2", "", None, 3, ["mse"], "MSE"]),
            ("backend", ["torch"], ["cuda", "", None, 1, ["torch"], "Torch", "compiled "]),
            ("inner_optimizer", ["sgd"], ["SGD", "adamw", None, 0, ""]),
            ("algorithm", ["reptile"], ["maml", None, 0, ""]),
            ("minibatches", ["fresh"], ["Epochs", "epoch", None, 1, "", ["epochs"], b"fresh"]),
            ("adam_state", ["fresh"], ["Carried", "shared", None, 0, "", ["carried"], "carried"])]
    for arg, _, bads in strs:
        for bad in bads:
            cases.append(Case(f"Reptile({arg}=)", repr(bad), lambda a=arg, v=bad: _trainer(**{a: v}) if a != "backend"
                              else _trainer(backend=v), REJECT, (arg,)))
    for label, value in [("str", "12345"), ("wrong-len", (1.0, 1.0)), ("nan", (1.0, NAN, 1.0)),
                         ("None-entry", (1.0, None, 1.0)), ("int", 3), ("tensor-nan", torch.tensor([1.0, NAN, 1.0]))]:
        cases.append(Case("Reptile(inner_grad_weights=)", label,
                          lambda v=value: _trainer(inner_steps=3, inner_grad_weights=v), REJECT,
                          ("inner_grad_weights",)))
    cases += [Case("Reptile(inner_grad_weights=)", "np.array",
                   lambda: _one_step(inner_steps=3, inner_grad_weights=np.array([1.0, 0.5, 0.25])), ACCEPT, (),
                   lambda: _one_step(inner_steps=3, inner_grad_weights=(1.0, 0.5, 0.25))),
              Case("Reptile(inner_grad_weights=)", "tensor",
                   lambda: _one_step(inner_steps=3, inner_grad_weights=torch.tensor([1.0, 0.5, 0.25])), ACCEPT, (),
                   lambda: _one_step(inner_steps=3, inner_grad_weights=(1.0, 0.5, 0.25)))]
    for label, value in [("one", (0.0,)), ("beta1", (1.0, 0.999)), ("neg", (-0.1, 0.9)), ("nan", (NAN, 0.9)),
                         ("None", None), ("str", "ab")]:
        cases.append(Case("Reptile(adam_betas=)", label,
                          lambda v=value: _trainer(inner_optimizer="adam", adam_betas=v), REJECT, ("adam_betas",)))
    cases.append(Case("Reptile(adam_betas=)", "np.array",
                      lambda: _one_step(inner_optimizer="adam", adam_betas=np.array([0.0, 0.999])), ACCEPT, (),
                      lambda: _one_step(inner_optimizer="adam", adam_betas=(0.0, 0.999))))
    for label, value in [("str", "adam"), ("class", torch.optim.SGD), ("list", [1]), ("other-params",
                         "other")]:
        def make(v=value):
            from reptile_fast import Reptile

            model = _model()
            if v == "other":
                v = torch.optim.SGD(torch.nn.Linear(1, 1).parameters(), lr=0.1)
            return Reptile(model, backend="torch", outer_optimizer=v)
        cases.append(Case("Reptile(outer_optimizer=)", label, make, REJECT, ("outer_optimizer",)))
    for label, lr in [("lr-huge", 1e300), ("lr-nan", NAN), ("lr-inf", INF)]:
        def make(lr=lr):
            from reptile_fast import Reptile

            model = _model()
            return Reptile(model, backend="torch", outer_optimizer=torch.optim.SGD(model.parameters(), lr=lr))
        cases.append(Case("Reptile(outer_optimizer=)", label, make, REJECT, ("outer_optimizer", "lr")))

    def lr_set_later():
        from reptile_fast import Reptile

        model = _model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        tr = Reptile(model, backend="torch", outer_optimizer=opt)
        opt.param_groups[0]["lr"] = NAN  # as a scheduler could
        tr.meta_step(_tasks(), _plan())
        return tr
    cases.append(Case("meta_step(outer_optimizer lr set later)", "nan", lr_set_later, REJECT,
                      ("outer_optimizer", "lr")))
    for label, value in [("list", [1]), ("str", "mode=eager"), ("unknown-key", {"bogus": 1}),
                         ("mode-bad", {"mode": "fast"}), ("chunk-0", {"chunk": 0}), ("chunk-bool", {"chunk": True}),
                         ("chunk-float", {"chunk": 2.5})]:
        cases.append(Case("Reptile(backend_options=)", label,
                          lambda v=value: _trainer(backend="compiled", backend_options=v), REJECT,
                          ("backend_options", "mode", "chunk", "bogus", "option")))
    cases.append(Case("Reptile(backend_options=)", "chunk-np.int64",
                      lambda: _trainer(backend="compiled", backend_options={"chunk": np.int64(7)}).stepper(1).chunk,
                      ACCEPT, (), lambda: _trainer(backend="compiled", backend_options={"chunk": 7}).stepper(1).chunk))
    for label, value in [("torch-unknown", {"bogus": 1}), ("torch-fast_mlp-str", {"fast_mlp": "no"}),
                         ("torch-task_block-neg", {"task_block": -1}), ("torch-task_block-str", {"task_block": "2"})]:
        cases.append(Case("Reptile(backend='torch', backend_options=)", label,
                          lambda v=value: _trainer(backend="torch", backend_options=v), REJECT,
                          ("bogus", "fast_mlp", "task_block", "option")))
    for label, value in [("triton-kernel", {"kernel": "v3"}), ("triton-precision", {"precision": "fp16"}),
                         ("triton-fused-str", {"fused": "no"}), ("triton-launch-str", {"launch": "x"}),
                         ("triton-chunk-0", {"chunk": 0})]:
        cases.append(Case("Reptile(backend='triton', backend_options=)", label,
                          lambda v=value: _trainer(backend="triton", backend_options=v), REJECT,
                          ("kernel", "precision", "fused", "launch", "chunk", "option", "triton", "cuda")))
    cases.append(Case("Reptile(backend='auto', backend_options=)", "any", lambda: _trainer(
        backend="auto", backend_options={"fast_mlp": False}), REJECT, ("backend_options",)))
    return cases


def model_cases():
    from reptile_fast import Reptile

    class NoParams(torch.nn.Module):
        def forward(self, x):
            return x

    def frozen():
        m = _model()
        m.network[0].weight.requires_grad_(False)
        return m

    def nan_model():
        m = _model()
        with torch.no_grad():
            m.network[0].weight[0, 0] = NAN
        return m

    def mixed():
        m = _model()
        m.network[2].double()
        return m

    def meta():
        return _model().to("meta")

    cases = [Case("Reptile(model=)", label, lambda f=f: Reptile(f(), backend="torch"), REJECT, names)
             for label, f, names in [
                 ("None", lambda: None, ("model",)), ("str", lambda: "mlp", ("model",)),
                 ("class", lambda: torch.nn.Linear, ("model",)),
                 ("no-params", NoParams, ("parameters",)), ("frozen", frozen, ("frozen",)),
                 ("nan-param", nan_model, ("nan",)), ("mixed-dtype", mixed, ("dtype",)),
                 ("meta", meta, ("meta",)), ("int-model", lambda: _model().to(torch.int32) if False else
                                             torch.nn.Embedding(3, 2).requires_grad_(False), ("frozen",))]]
    for dtype in (torch.float64, torch.float16, torch.bfloat16):
        cases.append(Case("Reptile(model=)", f"dtype-{dtype}", lambda d=dtype: _step_dtype(d), EITHER,
                          ("dtype",)))
    cases.append(Case("Reptile(model=)", "fp16-tasks-fp32", lambda: _one_step_model(_model(dtype=torch.float16),
                                                                                    _tasks()), REJECT, ("dtype",)))
    return cases


class _TupleOut(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(1, 1)

    def forward(self, x):
        return (self.lin(x),)


def _embedding_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Flatten(), torch.nn.Linear(4, 1))


def _ids(bad: Optional[int] = None):
    ids = torch.randint(0, 10, (3, 50, 1), generator=torch.Generator().manual_seed(0))
    if bad is not None:
        ids[2, 30, 0] = bad  # past the two points the model is probed on
    return ids


def loss_and_output_cases():
    """Model outputs and callable losses the inner loop cannot use, ids out of an embedding's range."""
    from reptile_fast import Reptile, TaskBatch

    cases = []
    losses = [("non-scalar", lambda p, y: (p - y) ** 2, ("loss",)), ("float", lambda p, y: 1.0, ("loss",)),
              ("raises", lambda p, y: 1 / 0, ("loss",)), ("int-tensor", lambda p, y: torch.tensor(1), ("loss",)),
              ("detached", lambda p, y: (p - y).detach().pow(2).mean(), ("loss",))]
    for backend in ("torch", "reference"):
        for label, fn, names in losses:
            cases.append(Case(f"Reptile[{backend}](loss=callable)", label, lambda f=fn, b=backend: _one_step(
                backend=b, loss=f), REJECT, names))
        # (a callable takes the generic path, "mse" the batched-matmul one: equal within rounding only)
        cases.append(Case(f"Reptile[{backend}](loss=callable)", "plain", lambda b=backend: _one_step(
            backend=b, loss=lambda p, y: (p - y).pow(2).mean()), ACCEPT, ()))
        cases.append(Case(f"meta_step[{backend}](model returns a tuple)", "tuple", lambda b=backend: Reptile(
            _TupleOut(), backend=b).meta_step(_tasks(), _plan()), REJECT, ("tensor", "model")))
        for label, bad in [("id-too-large", 100), ("id-negative", -1)]:
            cases.append(Case(f"meta_step[{backend}](tasks=ids)", label, lambda b=backend, v=bad: Reptile(
                _embedding_model(), backend=b).meta_step(TaskBatch(_ids(v), _tasks().y), _plan()), REJECT,
                ("ids", "embedding")))
        cases.append(Case(f"meta_step[{backend}](tasks=ids)", "in-range-int32", lambda b=backend: _emb_step(
            b, _ids().int()), ACCEPT, (), lambda b=backend: _emb_step(b, _ids())))
    return cases


def _emb_step(backend, ids):
    from reptile_fast import Reptile, TaskBatch

    tr = Reptile(_embedding_model(), backend=backend)
    tr.meta_step(TaskBatch(ids, _tasks().y), _plan())
    return tr


def _step_dtype(dtype, **kw):
    from reptile_fast import Reptile

    tr = Reptile(_model(dtype=dtype), backend="torch", **kw)
    tr.meta_step(_tasks(dtype=dtype), _plan())
    tr.check_finite()
    return tr


def _one_step_model(model, tasks):
    from reptile_fast import Reptile

    tr = Reptile(model, backend="torch")
    tr.meta_step(tasks, _plan())
    return tr


# ---------------------------------------------------------------------- cases: hyper-parameter setters
def setter_cases():
    cases = []
    for arg, palette in [("inner_lr", float_palette(0.02)), ("outer_lr", float_palette(0.1)),
                         ("inner_steps", int_palette(3)), ("inner_batch_size", int_palette(5)),
                         ("outer_lr_final", float_palette(0.05, allow_zero=True))]:
        for label, value, expect, plain in palette:
            if arg == "outer_lr_final" and label == "None":
                expect, plain = ACCEPT, None

            def run(a=arg, v=value):
                tr = _trainer()
                setattr(tr, a, v)
                tr.meta_step(_tasks(), _plan(steps=tr.inner_steps, batch=tr.inner_batch_size))
                tr.check_finite()
                return tr
            cases.append(Case(f"trainer.{arg} =", label, run, expect, (arg,),
                              (lambda r=run, p=plain: r(v=p)) if expect != REJECT else None))
    return cases


# ---------------------------------------------------------------------- cases: TaskBatch
def taskbatch_cases():
    from reptile_fast import TaskBatch

    x, y = _tasks().x, _tasks().y
    labels = torch.randint(0, 3, (3, 50))
    bad_x = [("None", None), ("np.array", x.numpy()), ("list", x.tolist()), ("2d", x[..., 0]),
             ("0-tasks", x[:0]), ("0-points", x[:, :0]), ("0-features", x[..., :0]),
             ("int8", x.to(torch.int8)), ("bool", x > 0), ("complex", x.to(torch.complex64)),
             ("uint8", x.to(torch.uint8)), ("nan", x.clone().index_fill_(1, torch.tensor([3]), NAN)),
             ("inf", x.clone().index_fill_(1, torch.tensor([3]), INF)), ("meta", x.to("meta")),
             ("fp16-y32", x.half())]
    cases = [Case("TaskBatch(x=)", label, lambda v=v: TaskBatch(v, y), REJECT, ("taskbatch.x", "x ", "x.", "tasks"))
             for label, v in bad_x]
    bad_y = [("None", None), ("1d", y[:, :, 0].reshape(-1)), ("4d", y.unsqueeze(-1)), ("0-out", y[..., :0]),
             ("int32-labels", labels.int()), ("bool", y > 0), ("complex", y.to(torch.complex64)),
             ("neg-label", labels - 5), ("labels-3d", labels.unsqueeze(-1)), ("nan", y.clone().fill_(NAN)),
             ("wrong-T", y[:2]), ("wrong-N", y[:, :10]), ("meta", y.to("meta")), ("f64", y.double())]
    cases += [Case("TaskBatch(y=)", label, lambda v=v: TaskBatch(x, v), REJECT, ("taskbatch.y", "y ", "y.", "tasks"))
              for label, v in bad_y]
    for label, value in [("True", True), ("float", 3.0), ("too-small", 2), ("str", "3"), ("neg", -1),
                         ("tensor", torch.tensor(2))]:
        cases.append(Case("TaskBatch(n_classes=)", label, lambda v=value: TaskBatch(x, labels, v), REJECT,
                          ("n_classes",)))
    cases.append(Case("TaskBatch(n_classes=)", "np.int64", lambda: TaskBatch(x, labels, np.int64(5)), ACCEPT, (),
                      lambda: TaskBatch(x, labels, 5)))
    cases.append(Case("TaskBatch(n_classes=)", "float-targets", lambda: TaskBatch(x, y, 3), REJECT, ("n_classes",)))
    t = _tasks()
    for label, value in [("bogus", "gpu"), ("list", ["cpu"]), ("cuda", "cuda:3")]:
        cases.append(Case("TaskBatch.to(device=)", label, lambda v=value: t.to(device=v), REJECT, ("device",)))
    # indexing answers IndexError for what selects no task (Python's protocol: iteration stops on it)
    for label, value in [("str", "a"), ("float", 1.5), ("None", None), ("out-of-range", 5), ("list-out", [5])]:
        cases.append(Case("TaskBatch[item]", label, lambda v=value: t[v], REJECT, ("taskbatch", "tasks", "ind"),
                          also=(IndexError,)))
    cases.append(Case("TaskBatch[item]", "np.int64", lambda: t[np.int64(1)], ACCEPT, (), lambda: t[1]))
    cases.append(Case("TaskBatch[item]", "tensor-index", lambda: t[torch.tensor([0, 2])], ACCEPT, (),
                      lambda: t[[0, 2]]))
    return cases


# ---------------------------------------------------------------------- cases: meta_step / adapt / evaluate
def _views():
    """Valid tasks in unusual layouts: ``(label, TaskBatch)``; each equals ``_tasks()``."""
    from reptile_fast import TaskBatch

    t = _tasks()
    x, y = t.x, t.y
    xt = x.transpose(0, 1).contiguous().transpose(0, 1)          # non-contiguous, same values
    big = torch.zeros(3, 50, 3)
    big[..., 1:2] = x
    xs = big[..., 1:2]                                            # a strided slice
    xe = x[:1].expand(3, -1, -1) if bool((x == x[:1]).all()) else None  # sine grids are shared
    out = [("transposed-x", TaskBatch(xt, y)), ("sliced-x", TaskBatch(xs, y)),
           ("transposed-y", TaskBatch(x, y.transpose(0, 1).contiguous().transpose(0, 1))),
           ("requires-grad", TaskBatch(x.clone().requires_grad_(), y.clone().requires_grad_()))]
    if xe is not None:
        out.append(("expanded-x", TaskBatch(xe, y)))
    return out


def meta_step_cases():
    from reptile_fast import TaskBatch

    cases = []

    def step(tasks, indices="plan", backend="torch", **kw):
        tr = _trainer(backend=backend)
        tr.meta_step(tasks() if callable(tasks) else tasks, _plan() if isinstance(indices, str) else indices, **kw)
        tr.check_finite()
        return tr

    for backend in ("torch", "reference", "compiled", "triton"):
        for label, tasks in _views():
            cases.append(Case(f"meta_step[{backend}](tasks=)", label, lambda t=tasks, b=backend: step(t, backend=b),
                              ACCEPT, (), lambda b=backend: step(_tasks, backend=b)))
    t = _tasks()
    bad_tasks = [("None", None), ("tuple", (t.x, t.y)), ("dict", {"x": t.x, "y": t.y}),
                 ("f64", TaskBatch(t.x.double(), t.y.double())),
                 ("labels", lambda: TaskBatch(t.x, torch.zeros(3, 50).long())),
                 ("2-features", TaskBatch(t.x.expand(-1, -1, 2), t.y)),
                 ("3-outputs", TaskBatch(t.x, t.y.expand(-1, -1, 3))),
                 ("5-points", TaskBatch(t.x[:, :5], t.y[:, :5])),
                 ("meta", lambda: TaskBatch.trusted(t.x.to("meta"), t.y.to("meta"))),
                 ("int-ids", TaskBatch(torch.zeros(3, 50, 1, dtype=torch.long), t.y))]
    for backend in ("torch", "reference", "compiled"):
        for label, tasks in bad_tasks:
            cases.append(Case(f"meta_step[{backend}](tasks=)", label, lambda v=tasks, b=backend: step(v, backend=b),
                              REJECT, ("tasks", "dtype", "inner_batch_size", "model", "float", "device",
                                       "label", "targets", "meta", "indices")))
    p = _plan()
    bad_plans = [("list", p.tolist()), ("np", p.numpy()), ("int32", p.int()), ("float", p.float()),
                 ("bool", p > 3), ("2d", p[0]), ("4d", p.unsqueeze(0)), ("wrong-T", p[:2]), ("wrong-steps", p[:, :2]),
                 ("0-batch", p[..., :0]), ("negative", p - 60), ("too-big", p + 50), ("meta", p.to("meta")),
                 ("huge", torch.full_like(p, HUGE_INT))]
    for backend in ("torch", "reference", "compiled", "triton"):
        for label, plan in bad_plans:
            cases.append(Case(f"meta_step[{backend}](indices=)", label,
                              lambda v=plan, b=backend: step(_tasks, v, backend=b), REJECT, ("indices",)))
        for label, plan in [("transposed", p.transpose(0, 1).contiguous().transpose(0, 1)),
                            ("strided", torch.stack([p, p], -1)[..., 0]),
                            ("expanded", p[:1].expand(3, -1, -1))]:
            ref_plan = plan.contiguous()
            cases.append(Case(f"meta_step[{backend}](indices=)", label,
                              lambda v=plan, b=backend: step(_tasks, v, backend=b), ACCEPT, (),
                              lambda v=ref_plan, b=backend: step(_tasks, v, backend=b)))
    for label, value, expect, plain in float_palette(0.1):
        if value is None:
            expect, plain = ACCEPT, None  # outer_lr=None: the schedule's
        cases.append(Case("meta_step(outer_lr=)", label, lambda v=value: step(_tasks, outer_lr=v), expect,
                          ("outer_lr",), (lambda p=plain: step(_tasks, outer_lr=p)) if expect != REJECT else None))
    for label, value in [("str", "0"), ("int", 0), ("cuda-gen", "cudagen")]:
        cases.append(Case("meta_step(generator=)", label,
                          lambda v=value: step(_tasks, None, generator=v), REJECT, ("generator",)))
    return cases


def adapt_evaluate_cases():
    cases = []
    for meth, minimum in (("adapt", 1), ("evaluate", 0)):
        for label, value, expect, plain in int_palette(3, minimum):
            cases.append(Case(f"{meth}(steps=)", label, lambda m=meth, v=value: getattr(_trainer(), m)(_tasks(), v),
                              expect, ("steps",),
                              (lambda m=meth, p=plain: getattr(_trainer(), m)(_tasks(), p))
                              if expect != REJECT else None))
        cases.append(Case(f"{meth}(steps=)", "huge", lambda m=meth: getattr(_trainer(), m)(_tasks(), HUGE_INT),
                          EITHER, ("steps", "memory")))
        p = _plan(steps=3)
        for label, plan in [("wrong-rows", _plan(steps=2)), ("negative", p - 60), ("int32", p.int()),
                            ("float", p.float()), ("list", p.tolist())]:
            cases.append(Case(f"{meth}(indices=)", label,
                              lambda m=meth, v=plan: getattr(_trainer(), m)(_tasks(), 3, v), REJECT, ("indices",)))
        for backend in ("torch", "reference", "triton"):
            for label, tasks in _views():
                cases.append(Case(f"{meth}[{backend}](tasks=)", label, lambda m=meth, t=tasks, b=backend: getattr(
                    _trainer(b), m)(t, 3, _plan(steps=3)), ACCEPT, (),
                    lambda m=meth, b=backend: getattr(_trainer(b), m)(_tasks(), 3, _plan(steps=3))))
            for label, plan in [("transposed", p.transpose(0, 1).contiguous().transpose(0, 1)),
                                ("expanded", p[:1].expand(3, -1, -1))]:
                cases.append(Case(f"{meth}[{backend}](indices=)", label, lambda m=meth, v=plan, b=backend: getattr(
                    _trainer(b), m)(_tasks(), 3, v), ACCEPT, (),
                    lambda m=meth, v=plan.contiguous(), b=backend: getattr(_trainer(b), m)(_tasks(), 3, v)))
        cases.append(Case(f"{meth}(tasks=)", "None", lambda m=meth: getattr(_trainer(), m)(None, 3), REJECT,
                          ("tasks",)))
    return cases


# ---------------------------------------------------------------------- cases: fit
def _fit(**kw):
    from reptile_fast import Sine

    tr = _trainer()
    args = dict(iterations=2, meta_batch_size=2, generator=torch.Generator().manual_seed(0), progress=False)
    args.update(kw)
    task_distribution = args.pop("task_distribution", Sine())
    tr.fit(task_distribution, args.pop("iterations"), **args)
    return tr


def fit_cases(tmp):
    cases = []
    for arg, palette in [("iterations", int_palette(2)), ("meta_batch_size", int_palette(2)),
                         ("log_every", int_palette(1)), ("checkpoint_every", int_palette(1))]:
        for label, value, expect, plain in palette:
            extra = {"checkpoint_dir": str(tmp / f"ck-{arg}-{label}")} if arg == "checkpoint_every" else {}
            if arg in ("checkpoint_every", "log_every") and label == "None":  # None: none / the default
                expect, plain = ACCEPT, None
            cases.append(Case(f"fit({arg}=)", label, lambda a=arg, v=value, e=extra: _fit(**{a: v}, **e), expect,
                              (arg,), (lambda a=arg, p=plain, e=extra: _fit(**{a: p}, **e)) if expect != REJECT
                              else None))
    # the task family's draw refuses it; fit's message names meta_batch_size, then the draw's words
    cases.append(Case("fit(meta_batch_size=)", "huge", lambda: _fit(meta_batch_size=HUGE_INT), EITHER,
                      ("meta_batch_size",)))
    cases.append(Case("fit(iterations=)", "huge-1-step", lambda: _fit(iterations=HUGE_INT, callback=_stop_after_one),
                      EITHER, ("iterations",)))
    for arg in ("progress", "draw_chunks", "handle_signals"):
        for label, value, expect, plain in bool_palette():
            cases.append(Case(f"fit({arg}=)", label, lambda a=arg, v=value: _fit(**{a: v}), expect, (arg,),
                              (lambda a=arg, p=plain: _fit(**{a: p})) if expect != REJECT else None))
    for label, value in [("str", "0"), ("int", 0), ("np-rng", np.random.default_rng(0))]:
        cases.append(Case("fit(generator=)", label, lambda v=value: _fit(generator=v), REJECT, ("generator",)))
    for label, value in [("None", None), ("str", "sine"), ("class", type("Sine", (), {})),
                         ("sample-not-callable", type("D", (), {"sample": 3})()),
                         ("returns-tuple", _Returns(lambda n: (torch.zeros(n, 50, 1), torch.zeros(n, 50, 1)))),
                         ("returns-f64", _Returns(lambda n: _tasks(n, torch.float64))),
                         ("returns-wrong-count", _Returns(lambda n: _tasks(n + 1))),
                         ("returns-None", _Returns(lambda n: None))]:
        cases.append(Case("fit(task_distribution=)", label, lambda v=value: _fit(task_distribution=v), REJECT,
                          ("task_distribution", "sample", "tasks", "dtype", "meta_batch_size")))
    for label, value in [("str", "print"), ("int", 3)]:
        cases.append(Case("fit(callback=)", label, lambda v=value: _fit(callback=v), REJECT, ("callback",)))
    for label, value in [("str", "x"), ("list", [1])]:
        cases.append(Case("fit(checkpoint_extra=)", label,
                          lambda v=value: _fit(checkpoint_extra=v, checkpoint_dir=str(tmp / "ce")), REJECT,
                          ("checkpoint_extra",)))
    for label, value in [("int", 3), ("file", "FILE"), ("list", ["a"])]:
        def run(v=value):
            if v == "FILE":
                (tmp / "afile").write_text("x")
                v = str(tmp / "afile")
            return _fit(checkpoint_dir=v, checkpoint_every=1)
        cases.append(Case("fit(checkpoint_dir=)", label, run, EITHER, ("checkpoint_dir", "directory")))
    for label, value in [("int", 3), ("missing", "MISSING"), ("dict", {"a": 1}), ("file-garbage", "GARBAGE")]:
        def run(v=value):
            if v == "MISSING":
                v = str(tmp / "nope")
            elif v == "GARBAGE":
                (tmp / "garbage.pt").write_bytes(b"not a checkpoint")
                v = str(tmp / "garbage.pt")
            return _fit(resume_from=v)
        cases.append(Case("fit(resume_from=)", label, run, REJECT, ("resume_from", "checkpoint", "nope", "garbage")))
    for label, value in [("str", "x"), ("no-draw", object()), ("draw-returns-None", _Draws(lambda i, m: None)),
                         ("draw-short", _Draws(lambda i, m: (_tasks(1), _plan(1))))]:
        cases.append(Case("fit(sampler=)", label, lambda v=value: _fit(sampler=v), REJECT, ("sampler", "draw")))
    for label, value in [("str", "x"), ("list-of-str", ["x"]), ("dict", {})]:
        cases.append(Case("fit(callbacks=)", label, lambda v=value: _fit(callbacks=v), REJECT, ("callbacks",)))
    cases.append(Case("fit(reducer=)", "str", lambda: _fit(reducer="mean"), REJECT, ("reducer",)))
    return cases


def _stop_after_one(i, info):
    raise ValueError("callback stops the fit after one meta-step (iterations)")


class _Returns:
    def __init__(self, fn):
        self.fn = fn

    def sample(self, n, *, generator=None, device=None):
        return self.fn(n)


class _Draws:
    checked = False

    def __init__(self, fn):
        self.fn = fn

    def draw(self, first_iteration, m):
        return self.fn(first_iteration, m)


# ---------------------------------------------------------------------- cases: state, checkpoints
def state_cases(tmp):
    cases = []

    def load(mutate):
        tr = _trainer()
        state = _trainer().state_dict()
        state = mutate(state)
        tr.load_state_dict(state)
        return tr

    def set_model(key, value):
        def mutate(s):
            s = dict(s)
            s["model"] = dict(s["model"])
            s["model"][key] = value
            return s
        return mutate

    w = "network.0.weight"
    muts = [("None", lambda s: None), ("str", lambda s: "state"), ("empty", lambda s: {}),
            ("no-model", lambda s: {k: v for k, v in s.items() if k != "model"}),
            ("iteration-str", lambda s: {**s, "iteration": "3"}), ("iteration-neg", lambda s: {**s, "iteration": -1}),
            ("iteration-float", lambda s: {**s, "iteration": 2.5}),
            ("iteration-None", lambda s: {**s, "iteration": None}),
            ("w-shape", set_model(w, torch.zeros(3, 3))),
            ("w-f64", set_model(w, torch.zeros(8, 1, dtype=torch.float64))),
            ("w-nan", set_model(w, torch.full((8, 1), NAN))), ("w-list", set_model(w, [[0.0]] * 8)),
            ("w-meta", set_model(w, torch.zeros(8, 1, device="meta"))),
            ("w-int", set_model(w, torch.zeros(8, 1).long())),
            ("extra-key", set_model("bogus", torch.zeros(1))),
            ("config-str", lambda s: {**s, "config": "x"})]
    for label, mut in muts:
        cases.append(Case("load_state_dict(state=)", label, lambda m=mut: load(m), REJECT,
                          ("state", "model", "iteration", w, "bogus", "config", "network")))
    cases.append(Case("load_state_dict(state=)", "iteration-np.int64",
                      lambda: load(lambda s: {**s, "iteration": np.int64(3)}).iteration, EITHER, ("iteration",)))
    cases.append(Case("load_state_dict(state=)", "w-noncontiguous",
                      lambda: load(set_model(w, torch.ones(1, 8).t())), ACCEPT, (),
                      lambda: load(set_model(w, torch.ones(8, 1)))))

    from reptile_fast import load_checkpoint, save_checkpoint
    for label, value in [("int", 3), ("None", None), ("file", "FILE"), ("list", ["a"])]:
        def run(v=value):
            if v == "FILE":
                (tmp / "plainfile").write_text("x")
                v = str(tmp / "plainfile")
            return save_checkpoint(v, _trainer())
        cases.append(Case("save_checkpoint(directory=)", label, run, REJECT,
                          ("directory", "checkpoint", "plainfile", "path")))
    for label, value in [("model", "MODEL"), ("None", None), ("str", "trainer")]:
        cases.append(Case("save_checkpoint(trainer=)", label,
                          lambda v=value: save_checkpoint(str(tmp / "sv"), _model() if v == "MODEL" else v), REJECT,
                          ("trainer",)))
    for label, kw, names in [("generator-str", {"generator": "g"}, ("generator",)),
                             ("history-str", {"history": "x"}, ("history",)),
                             ("history-nan-list", {"history": {"loss": ["a"]}}, ("history", "loss")),
                             ("extra-list", {"extra": [1, 2]}, ("extra",)),
                             ("extra-object", {"extra": {"o": object()}}, ("extra", "o"))]:
        cases.append(Case("save_checkpoint(...)", label, lambda k=kw: save_checkpoint(str(tmp / f"sv-{label}"),
                                                                                      _trainer(), **k),
                          REJECT, names))
    for label, value in [("int", 3), ("None", None), ("missing", "MISSING"), ("empty-file", "EMPTY"),
                         ("garbage", "GARBAGE"), ("dir-without", "DIR")]:
        def run(v=value):
            if v == "MISSING":
                v = str(tmp / "missing.pt")
            elif v == "EMPTY":
                (tmp / "empty.pt").write_bytes(b"")
                v = str(tmp / "empty.pt")
            elif v == "GARBAGE":
                (tmp / "garb.pt").write_bytes(b"\x00" * 100)
                v = str(tmp / "garb.pt")
            elif v == "DIR":
                (tmp / "emptydir").mkdir(exist_ok=True)
                v = str(tmp / "emptydir")
            return load_checkpoint(v)
        cases.append(Case("load_checkpoint(path=)", label, run, REJECT,
                          ("path", "checkpoint", "missing", "empty", "garb", "emptydir")))
    return cases


# ---------------------------------------------------------------------- cases: task families, samplers
def task_family_cases(tmp):
    from reptile_fast import Omniglot, Sine, sample_indices

    cases = []
    for arg, good in [("n_tasks", 3), ("inner_steps", 2), ("n_points", 10), ("batch_size", 4)]:
        for label, value, expect, plain in int_palette(good):
            def run(a=arg, v=value):
                kw = dict(n_tasks=3, inner_steps=2, n_points=10, batch_size=4)
                kw[a] = v
                return sample_indices(kw.pop("n_tasks"), kw.pop("inner_steps"), kw.pop("n_points"),
                                      kw.pop("batch_size"), generator=torch.Generator().manual_seed(0))
            cases.append(Case(f"sample_indices({arg}=)", label, run, expect, (arg,),
                              (lambda r=run, p=plain: r(v=p)) if expect != REJECT else None))
    for label, value in [("str", "cpu"), ("int", 0)]:
        cases.append(Case("sample_indices(generator=)", label,
                          lambda v=value: sample_indices(1, 1, 10, 2, generator=v), REJECT, ("generator",)))
    for label, value in [("bogus", "gpu"), ("int-neg", -1), ("list", ["cpu"]), ("cuda", "cuda")]:
        cases.append(Case("sample_indices(device=)", label,
                          lambda v=value: sample_indices(1, 1, 10, 2, device=v), REJECT, ("device",)))
    for label, value, expect, plain in int_palette(3):
        cases.append(Case("Sine.sample(n_tasks=)", label,
                          lambda v=value: Sine().sample(v, generator=torch.Generator().manual_seed(0)), expect,
                          ("n_tasks",), (lambda p=plain: Sine().sample(p, generator=torch.Generator().manual_seed(0)))
                          if expect != REJECT else None))
    for label, value in [("bogus", "gpu"), ("list", [0]), ("cuda", "cuda:0")]:
        cases.append(Case("Sine.sample(device=)", label, lambda v=value: Sine().sample(2, device=v), REJECT,
                          ("device",)))
    for arg in ("amplitude", "phase", "x_range"):
        for label, value in [("None", None), ("scalar", 1.0), ("triple", (0, 1, 2)), ("nan", (0, NAN)),
                             ("inf", (0, INF)), ("reversed", (2.0, 1.0)), ("str", "ab")]:
            cases.append(Case(f"Sine({arg}=)", label, lambda a=arg, v=value: Sine(**{a: v}).sample(2), REJECT, (arg,)))
        cases.append(Case(f"Sine({arg}=)", "np.array", lambda a=arg: Sine(**{a: np.array([0.5, 1.5])}).sample(
            2, generator=torch.Generator().manual_seed(0)), ACCEPT, (),
            lambda a=arg: Sine(**{a: (0.5, 1.5)}).sample(2, generator=torch.Generator().manual_seed(0))))
        cases.append(Case(f"Sine({arg}=)", "huge", lambda a=arg: Sine(**{a: (0.0, 1e300)}).sample(
            2, generator=torch.Generator().manual_seed(0)), EITHER, (arg,)))
    for label, value, expect, plain in int_palette(20):
        cases.append(Case("Sine(n_points=)", label, lambda v=value: Sine(n_points=v).sample(
            2, generator=torch.Generator().manual_seed(0)), expect, ("n_points",),
            (lambda p=plain: Sine(n_points=p).sample(2, generator=torch.Generator().manual_seed(0)))
            if expect != REJECT else None))
    for label, a, b in [("nan", [NAN], [0.0]), ("len-mismatch", [1.0, 2.0], [0.0]), ("str", "a", "b"),
                        ("None", None, None), ("huge", [1e300], [0.0])]:
        cases.append(Case("Sine.make(amplitude=, phase=)", label, lambda a=a, b=b: Sine().make(a, b), REJECT,
                          ("amplitude", "phase", "nan", "infinite", "taskbatch")))
    cases.append(Case("Sine.make(amplitude=, phase=)", "np.arrays",
                      lambda: Sine().make(np.array([1.0, 2.0]), np.array([0.0, 0.5])), ACCEPT, (),
                      lambda: Sine().make(torch.tensor([1.0, 2.0]), torch.tensor([0.0, 0.5]))))

    import tests._fake_omniglot as fake

    data = fake.make_folder(tmp / "omni")
    for arg, good in [("ways", 2), ("shots", 1), ("query_shots", 1)]:
        minimum = {"ways": 2, "query_shots": 0}.get(arg, 1)
        for label, value, expect, plain in int_palette(good, minimum):
            cases.append(Case(f"Omniglot({arg}=)", label,
                              lambda a=arg, v=value: Omniglot(data, **{a: v}, **({"ways": 2} if a != "ways" else {}))
                              .sample(2, generator=torch.Generator().manual_seed(0)), expect, (arg,),
                              (lambda a=arg, p=plain: Omniglot(data, **{a: p}, **({"ways": 2} if a != "ways" else {}))
                               .sample(2, generator=torch.Generator().manual_seed(0))) if expect != REJECT else None))
    for label, value, expect, plain in int_palette(28):
        if label == "None":  # image_size=None is the default (28, or the preloaded images' size; QA53)
            expect, plain = ACCEPT, None
        cases.append(Case("Omniglot(image_size=)", label, lambda v=value: Omniglot(data, ways=2, image_size=v).sample(
            2, generator=torch.Generator().manual_seed(0)), expect, ("image_size",),
            (lambda p=plain: Omniglot(data, ways=2, image_size=p).sample(2, generator=torch.Generator().manual_seed(0)))
            if expect != REJECT else None))
    for label, value in [("bad-angle", (0, 45)), ("str", "0"), ("None", None), ("dup", (0, 0)), ("neg", (-90,))]:
        cases.append(Case("Omniglot(rotations=)", label, lambda v=value: Omniglot(data, ways=2, rotations=v), REJECT,
                          ("rotations",)))
    for label, value in [("None", None), ("int", 3), ("missing", str(tmp / "nowhere")), ("empty-list", [])]:
        cases.append(Case("Omniglot(sources=)", label, lambda v=value: Omniglot(v, ways=2), REJECT,
                          ("sources", "omniglot", "nowhere")))
    for label, value in [("too-many-ways", 99)]:
        cases.append(Case("Omniglot(ways=)", label, lambda v=value: Omniglot(data, ways=v), REJECT, ("ways", "way")))
    for label, value in [("str", "Alpha"), ("unknown", ["Zeta"])]:
        cases.append(Case("Omniglot(alphabets=)", label, lambda v=value: Omniglot(data, ways=2, alphabets=v), REJECT,
                          ("alphabets",)))
    for label, value, expect, plain in int_palette(2):
        cases.append(Case("Omniglot.sample(n_tasks=)", label,
                          lambda v=value: Omniglot(data, ways=2).sample(v, generator=torch.Generator().manual_seed(0)),
                          expect, ("n_tasks",),
                          (lambda p=plain: Omniglot(data, ways=2).sample(p, generator=torch.Generator().manual_seed(0)))
                          if expect != REJECT else None))
        cases.append(Case("Omniglot.sample_episodes(n_tasks=)", label,
                          lambda v=value: Omniglot(data, ways=2).sample_episodes(
                              v, generator=torch.Generator().manual_seed(0)).support, expect, ("n_tasks",),
                          (lambda p=plain: Omniglot(data, ways=2).sample_episodes(
                              p, generator=torch.Generator().manual_seed(0)).support) if expect != REJECT else None))
    from reptile_fast.tasks.omniglot import load_official_runs

    runs = fake.make_runs(tmp / "runs")
    for label, value in [("None", None), ("int", 3), ("missing", str(tmp / "no-runs")), ("omniglot-folder", data)]:
        cases.append(Case("load_official_runs(path=)", label, lambda v=value: load_official_runs(v), REJECT,
                          ("official runs", "path must")))
    for label, value, expect, plain in int_palette(28):
        cases.append(Case("load_official_runs(image_size=)", label, lambda v=value: load_official_runs(runs, v)[0].support,
                          expect, ("image_size",),
                          (lambda p=plain: load_official_runs(runs, p)[0].support) if expect != REJECT else None))
    cases.append(Case("Omniglot.sample(generator=)", "str", lambda: Omniglot(data, ways=2).sample(2, generator="g"),
                      REJECT, ("generator",)))
    cases.append(Case("Omniglot.sample(device=)", "bogus", lambda: Omniglot(data, ways=2).sample(2, device="gpu"),
                      REJECT, ("device",)))
    return cases


def miniimagenet_cases(tmp):
    from PIL import Image

    from reptile_fast import MiniImageNet

    root = tmp / "mini"
    (root / "images").mkdir(parents=True)
    lines = ["filename,label"]
    for c in ("n001", "n002", "n003"):
        for k in range(3):
            name = f"{c}{k:08d}.png"
            Image.fromarray(np.full((8, 8, 3), 10 * k, dtype=np.uint8)).save(root / "images" / name)
            lines.append(f"{name},{c}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    cases = []
    for arg, good, minimum in [("ways", 2, 2), ("shots", 1, 1), ("query_shots", 1, 0), ("image_size", 8, 1)]:
        for label, value, expect, plain in int_palette(good, minimum):
            kw = {"ways": 2} if arg != "ways" else {}
            cases.append(Case(f"MiniImageNet({arg}=)", label,
                              lambda a=arg, v=value, kw=kw: MiniImageNet(root, "train", **{"image_size": 8, **kw, a: v})
                              .sample(2, generator=torch.Generator().manual_seed(0)), expect, (arg,),
                              (lambda a=arg, p=plain, kw=kw: MiniImageNet(root, "train",
                                                                          **{"image_size": 8, **kw, a: p})
                               .sample(2, generator=torch.Generator().manual_seed(0))) if expect != REJECT else None))
    for label, value, expect, plain in bool_palette():
        cases.append(Case("MiniImageNet(cache=)", label, lambda v=value: MiniImageNet(
            root, "train", ways=2, image_size=8, cache=v).sample(2, generator=torch.Generator().manual_seed(0)), expect,
            ("cache",), (lambda p=plain: MiniImageNet(root, "train", ways=2, image_size=8, cache=p).sample(
                2, generator=torch.Generator().manual_seed(0))) if expect != REJECT else None))
    for label, value in [("None", None), ("bogus", "holdout"), ("int", 0)]:
        cases.append(Case("MiniImageNet(split=)", label, lambda v=value: MiniImageNet(root, v, ways=2), REJECT,
                          ("split",)))
    for label, value in [("None", None), ("int", 3), ("missing", str(tmp / "nomini"))]:
        cases.append(Case("MiniImageNet(root=)", label, lambda v=value: MiniImageNet(v, "train", ways=2), REJECT,
                          ("root", "csv", "nomini")))
    for label, value, expect, plain in int_palette(2):
        cases.append(Case("MiniImageNet.sample(n_tasks=)", label, lambda v=value: MiniImageNet(
            root, "train", ways=2, image_size=8).sample(v, generator=torch.Generator().manual_seed(0)), expect,
            ("n_tasks",), (lambda p=plain: MiniImageNet(root, "train", ways=2, image_size=8).sample(
                p, generator=torch.Generator().manual_seed(0))) if expect != REJECT else None))
    return cases


# ---------------------------------------------------------------------- cases: the drop-in
def _seed_task():
    from reptile_fast.reference import sample_task

    return sample_task()


def _dropin(**kw):
    from reptile_fast import reptile

    model = _model()
    args = dict(nb_iterations=2, sample_task=_seed_task, perform_k_training_steps=None, k=1, epsilon=0.1,
                meta_batch_size=1, backend="torch", progress=False, generator=torch.Generator().manual_seed(0))
    args.update(kw)
    reptile(model, args.pop("nb_iterations"), args.pop("sample_task"), args.pop("perform_k_training_steps"),
            args.pop("k"), args.pop("epsilon"), **args)
    return model


def dropin_cases():
    cases = []
    # 0 iterations, k = 0 and ε = 0 run in the seed as no-ops, and so in the drop-in (test_dropin_noops)
    for arg, palette in [("nb_iterations", int_palette(2, 0)), ("k", int_palette(1, 0)),
                         ("meta_batch_size", int_palette(2)), ("chunk_size", int_palette(2)),
                         ("epsilon", float_palette(0.1, allow_zero=True))]:
        for label, value, expect, plain in palette:
            cases.append(Case(f"reptile({arg}=)", label, lambda a=arg, v=value: _dropin(**{a: v}), expect, (arg,),
                              (lambda a=arg, p=plain: _dropin(**{a: p})) if expect != REJECT else None))
    for label, value, expect, plain in bool_palette():
        cases.append(Case("reptile(progress=)", label, lambda v=value: _dropin(progress=v), expect, ("progress",),
                          (lambda p=plain: _dropin(progress=p)) if expect != REJECT else None))
    for label, value in [("None", None), ("bogus", "fast"), ("int", 1)]:
        cases.append(Case("reptile(backend=)", label, lambda v=value: _dropin(backend=v), REJECT, ("backend",)))
    for label, value in [("None", None), ("str", "sine"), ("returns-None", lambda: None),
                         ("returns-pair", lambda: (torch.zeros(5), torch.zeros(5))),
                         ("nan-x", lambda: (torch.full((50,), NAN), torch.zeros(50), torch.nn.MSELoss())),
                         ("int-x", lambda: (torch.zeros(50, dtype=torch.long), torch.zeros(50), torch.nn.MSELoss())),
                         ("mismatch", lambda: (torch.zeros(50), torch.zeros(40), torch.nn.MSELoss())),
                         ("meta", lambda: (torch.zeros(50, device="meta"), torch.zeros(50, device="meta"),
                                           torch.nn.MSELoss())),
                         ("x-f64", lambda: (torch.zeros(50, dtype=torch.float64), torch.zeros(50), torch.nn.MSELoss())),
                         ("x-3d", lambda: (torch.zeros(50, 1, 1), torch.zeros(50), torch.nn.MSELoss()))]:
        cases.append(Case("reptile(sample_task=)", label, lambda v=value: _dropin(sample_task=v), REJECT,
                          ("sample_task", "x", "y", "nan", "dtype")))
    for label, change in [("x-requires-grad", lambda x, y, f: (x.clone().requires_grad_(), y, f)),
                          ("x-strided", lambda x, y, f: (torch.stack([x, x], 1)[:, 0], y, f)),
                          ("x-column", lambda x, y, f: (x[:, None], y[:, None], f))]:
        cases.append(Case("reptile(sample_task=)", label, lambda c=change: _dropin(sample_task=lambda: c(
            *_seed_task())), ACCEPT, (), lambda: _dropin()))
    for label, value in [("str", "x"), ("wrong-return", lambda m, t, k: None)]:
        cases.append(Case("reptile(perform_k_training_steps=)", label,
                          lambda v=value: _dropin_warned(perform_k_training_steps=v), REJECT,
                          ("perform_k_training_steps",)))
    plan = torch.zeros(2, 1, 5, 10, dtype=torch.long)
    for label, value in [("list", plan.tolist()), ("wrong-shape", plan[0]), ("negative", plan - 1),
                         ("too-big", plan + 50), ("int32", plan.int())]:
        cases.append(Case("reptile(indices=)", label, lambda v=value: _dropin(indices=v), REJECT, ("indices",)))
    cases.append(Case("reptile(model=)", "None", lambda: _dropin_model(None), REJECT, ("model",)))
    cases.append(Case("reptile(model=)", "frozen", lambda: _dropin_model(_model().requires_grad_(False)), REJECT,
                      ("frozen", "model")))
    return cases


def _dropin_warned(**kw):
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return _dropin(**kw)


def _dropin_model(model):
    from reptile_fast import reptile

    reptile(model, 2, _seed_task, progress=False, backend="torch")
    return model


# ---------------------------------------------------------------------- cases: get_backend
def get_backend_cases():
    from reptile_fast.backends import get_backend

    cases = []
    for label, name, opts in [("None", None, {}), ("int", 1, {}), ("bogus", "jax", {}),
                              ("torch-unknown-opt", "torch", {"bogus": 1}),
                              ("torch-fast_mlp-str", "torch", {"fast_mlp": "yes"}),
                              ("torch-task_block-0", "torch", {"task_block": 0}),
                              ("torch-task_block-float", "torch", {"task_block": 2.5}),
                              ("triton-kernel", "triton", {"kernel": 2}),
                              ("triton-precision", "triton", {"precision": "fp8"}),
                              ("triton-validate-str", "triton", {"validate": "yes"}),
                              ("triton-chunk-neg", "triton", {"chunk": -1}),
                              ("triton-launch-bogus", "triton", {"launch": {"bogus": 1}}),
                              ("triton-launch-warps-str", "triton", {"launch": {"num_warps": "4"}}),
                              ("reference-opt", "reference", {"x": 1})]:
        cases.append(Case("get_backend(...)", label, lambda n=name, o=opts: get_backend(n, **o), REJECT,
                          ("backend", "bogus", "fast_mlp", "task_block", "kernel", "precision", "validate", "chunk",
                           "launch", "num_warps", "x")))
    for var, value in [("REPTILE_FAST_TRITON_KERNEL", "v3"), ("REPTILE_FAST_TRITON_PRECISION", "fp8"),
                       ("REPTILE_FAST_TRITON_FUSED", "yes"), ("REPTILE_FAST_TRITON_CUDA_GRAPHS", "true")]:
        cases.append(Case("get_backend('triton') with $" + var, value,
                          lambda n=var, v=value: _with_env(n, v, lambda: get_backend("triton")), REJECT, (var,)))
    cases.append(Case("get_backend('triton') with $REPTILE_FAST_TRITON_FUSED", "0",
                      lambda: _with_env("REPTILE_FAST_TRITON_FUSED", "0", lambda: get_backend("triton").fused), EITHER))
    cases.append(Case("get_backend(...)", "torch-task_block-np.int64",
                      lambda: get_backend("torch", task_block=np.int64(2)).task_block, EITHER, ("task_block",)))
    return cases


def _with_env(name: str, value: str, fn):
    import os

    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn()
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# ---------------------------------------------------------------------- cases: kernels (interpreter)
def kernel_cases():
    from reptile_fast.kernels import mlp_inner_loop as K
    from reptile_fast.kernels import mlp_meta_step_v2 as V

    torch.manual_seed(0)
    dims, acts = (1, 8, 1), ("tanh", "identity")
    W0, b0, W1, b1 = torch.randn(8, 1) * 0.5, torch.randn(8) * 0.1, torch.randn(1, 8) * 0.5, torch.randn(1) * 0.1
    params = [W0, b0, W1, b1]
    t = _tasks(2)
    x, y = t.x, t.y
    idx = _plan(2, 2, 4)
    phi = V.flat_params(params)

    def v1(x=x, y=y, idx=idx, params=params, acts=acts, **kw):
        kw.setdefault("lr", 0.02)
        adapted, losses = K.mlp_inner_loop(x, y, idx, params, acts, **kw)
        return adapted[:, :K.n_flat_params(dims)], losses  # the row's padding is not written

    def v2(x=x, y=y, idx=idx, phi=phi, dims=dims, acts=acts, **kw):
        kw.setdefault("lr", 0.02)
        kw.setdefault("eps", 0.1)
        return V.meta_step(x, y, idx, phi, dims=dims, activations=acts, **kw)

    cases = []
    bad_tensors = {
        "x": [("f64", x.double()), ("f16", x.half()), ("int", x.long()), ("2d", x[..., 0]), ("meta", x.to("meta")),
              ("list", x.tolist()), ("wrong-features", x.expand(-1, -1, 2)), ("0-points", x[:, :0])],
        "y": [("f64", y.double()), ("bf16", y.bfloat16()), ("2d-float", y[..., 0]), ("wrong-T", y[:1]),
              ("wrong-out", y.expand(-1, -1, 2)), ("None", None)],
        "idx": [("int32", idx.int()), ("float", idx.float()), ("2d", idx[0]), ("neg", idx - 60), ("big", idx + 50),
                ("wrong-T", idx[:1]), ("meta", idx.to("meta"))],
    }
    for arg, values in bad_tensors.items():
        for label, value in values:
            cases.append(Case(f"mlp_inner_loop({arg}=)", label, lambda a=arg, v=value: v1(**{a: v}), REJECT,
                              (arg, "indices", "x", "y", "labels", "dtype", "shape", "device")))
            cases.append(Case(f"v2.meta_step({arg}=)", label, lambda a=arg, v=value: v2(**{a: v}), REJECT,
                              (arg, "indices", "x", "y", "labels", "dtype", "shape", "device")))
    # a negative or zero rate is plain arithmetic for a raw kernel (the trainer refuses it)
    for label, value in [("nan", NAN), ("inf", INF), ("str", "0.1"), ("None", None), ("tensor0d", torch.tensor(0.02))]:
        cases.append(Case("mlp_inner_loop(lr=)", label, lambda v=value: v1(lr=v), REJECT if label != "tensor0d"
                          else EITHER, ("lr",)))
        cases.append(Case("v2.meta_step(lr=)", label, lambda v=value: v2(lr=v), REJECT if label != "tensor0d"
                          else EITHER, ("lr",)))
    for label, value in [("nan", NAN), ("str", "0.1"), ("None", None), ("2-elem", torch.tensor([0.1, 0.2])),
                         ("f64-tensor", torch.tensor([0.1], dtype=torch.float64))]:
        cases.append(Case("v2.meta_step(eps=)", label, lambda v=value: v2(eps=v), REJECT, ("eps",)))
    for label, value in [("f64", [p.double() for p in params]), ("wrong-shape", [W0.t(), b0, W1, b1]),
                         ("too-few", params[:2]), ("None", None)]:
        cases.append(Case("mlp_inner_loop(params=)", label, lambda v=value: v1(params=v), REJECT,
                          ("param", "shape", "dtype", "layer", "weight")))
    for label, value in [("f64", phi.double()), ("short", phi[:-1]), ("2d", phi[None]), ("None", None)]:
        cases.append(Case("v2.meta_step(params_flat=)", label, lambda v=value: v2(phi=v), REJECT,
                          ("param", "phi", "flat", "shape", "dtype")))
    for label, value in [("bogus", ("tanh", "gelu")), ("short", ("tanh",)), ("str", "tanh")]:
        cases.append(Case("mlp_inner_loop(activations=)", label, lambda v=value: v1(acts=v), REJECT,
                          ("activation",)))
        cases.append(Case("v2.meta_step(activations=)", label, lambda v=value: v2(acts=v), REJECT,
                          ("activation",)))
    for label, value in [("wrong", (1, 4, 1)), ("np", tuple(np.int64(d) for d in dims))]:
        cases.append(Case("v2.meta_step(dims=)", label, lambda v=value: v2(dims=v),
                          REJECT if label == "wrong" else ACCEPT, ("dims", "param", "shape"),
                          None if label == "wrong" else (lambda: v2())))
    # valid views must give the plain inputs' numbers
    for label, kw in [("x-strided", {"x": torch.stack([x, x], -1)[..., 0]}),
                      ("idx-transposed", {"idx": idx.transpose(0, 1).contiguous().transpose(0, 1)}),
                      ("y-expanded", {"y": y[:1].expand(2, -1, -1)})]:
        ref_kw = {k: v.contiguous() for k, v in kw.items()}
        cases.append(Case("mlp_inner_loop(views)", label, lambda kw=kw: v1(**kw), ACCEPT, (), lambda r=ref_kw: v1(**r)))
        cases.append(Case("v2.meta_step(views)", label, lambda kw=kw: v2(**kw), ACCEPT, (), lambda r=ref_kw: v2(**r)))
    return cases


# ---------------------------------------------------------------------- cases: CLI
def cli_case(argv, tmp, names=()):
    """The CLI with ``argv``: exit status 2 and one ``reptile-fast: error`` line, no traceback."""
    import contextlib
    import io

    from reptile_fast.cli import main

    def run():
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(list(argv) + (["--out", str(tmp / "cli-out")] if argv and argv[0] == "sine"
                                         and "--out" not in argv else []))
            except SystemExit as exc:
                code = exc.code
        text = err.getvalue()
        lines = [ln for ln in text.strip().splitlines() if "error" in ln.lower()]
        if code != 2:
            raise RuntimeError(f"exit status {code} (expected 2); stderr: {text[-300:]}")
        if "Traceback" in text:
            raise RuntimeError(f"traceback on stderr: {text[-300:]}")
        if len(lines) != 1:
            raise RuntimeError(f"expected one error line, got {len(lines)}: {text[-300:]}")
        raise ValueError(lines[0])
    return run


def cli_cases(tmp):
    cases = []
    sine_bad = {
        "--iterations": ["0", "-1", "2.5", "nan", "inf", "x", "1e3", ""],
        "--meta-batch-size": ["0", "-3", "1.5", "x"],
        "--outer-lr": ["0", "-0.1", "nan", "inf", "x"],
        "--outer-lr-final": ["-1", "nan", "x"],
        "--inner-lr": ["0", "nan", "-inf"],
        "--inner-steps": ["0", "1.0"],
        "--inner-batch-size": ["0", "51", "1000"],
        "--hidden-dim": ["0", "-2"],
        "--backend": ["jax", "Torch", ""],
        "--device": ["gpu", "cuda", "cuda:7", "meta", "mps", ""],
        "--threads": ["-1", "100000"],
        "--seed": ["-1", str(2 ** 64), "x"],
        "--eval-tasks": ["0"],
        "--eval-steps": ["0", "-5"],
        "--checkpoint-every": ["-1", "x"],
        "--resume": ["NOWHERE", "EMPTYDIR"],
    }
    for flag, values in sine_bad.items():
        for v in values:
            if v == "NOWHERE":
                v = str(tmp / "no-such-run")
            elif v == "EMPTYDIR":
                (tmp / "empty-run").mkdir(exist_ok=True)
                v = str(tmp / "empty-run")
            names = (flag.lstrip("-"), flag.lstrip("-").replace("-", "_"), "argument", "device", "resume", "seed",
                     "threads", "batch", "cuda")
            cases.append(Case(f"cli sine {flag}", repr(v), cli_case(["sine", flag, v, "--no-progress"], tmp),
                              REJECT, names))
    cases.append(Case("cli", "no-command", cli_case([], tmp), REJECT, ("command", "required", "argument")))
    cases.append(Case("cli", "unknown-command", cli_case(["cosine"], tmp), REJECT, ("command", "choice", "invalid")))
    cases.append(Case("cli sine --out", "a-file", _cli_out_file(tmp), REJECT, ("out", "directory", "file")))
    import tests._fake_omniglot as fake

    data = fake.make_folder(tmp / "cli-omni", images=12)  # the job's default tasks take 10 per class
    test_data = fake.make_folder(tmp / "cli-omni-test", {"Delta": 3, "Epsilon": 3}, images=12)
    om_bad = {
        "--ways": ["0", "1", "x", "100"],
        "--shots": ["0", "-1", "x"],
        "--iterations": ["0", "x"],
        "--meta-batch-size": ["0"],
        "--inner-lr": ["0", "nan"],
        "--outer-lr": ["-1", "inf"],
        "--inner-steps": ["0"],
        "--device": ["gpu", "cuda"],
        "--train": ["NOWHERE"],
        "--seed": ["-1", str(2 ** 64)],
        "--threads": ["100000", "-1"],
        "--train-shots": ["0", "100"],
        "--query-shots": ["0", "100"],
        "--inner-batch-size": ["0", "1000"],
        "--eval-batch-size": ["0", "1000"],
        "--eval-steps": ["0"],
        "--eval-tasks": ["0"],
        "--validation-tasks": ["0"],
        "--validate-every": ["-1"],
        "--checkpoint-every": ["-1"],
        "--outer-lr-final": ["nan", "-1"],
        "--backend": ["compiled", "jax"],
        "--resume": ["NOWHERE"],
        "--test": ["NOWHERE"],
    }
    for flag, values in om_bad.items():
        for v in values:
            if v == "NOWHERE":
                v = str(tmp / "no-omniglot")
            argv = ["omniglot", "--train", str(data), "--test", str(test_data), "--no-progress", "--out",
                    str(tmp / "om-out"), flag, v]
            if flag in ("--train", "--test", "--resume"):
                argv = ["omniglot", "--train", str(data), "--test", str(test_data), "--no-progress", "--out",
                        str(tmp / "om-out"), flag, v]
                if flag == "--resume":
                    argv = ["omniglot", "--resume", v, "--no-progress"]
            names = (flag.lstrip("-"), flag.lstrip("-").replace("-", "_"), "argument", "device", "no-omniglot",
                     "cuda", "ways", "classes", "shots", "images", "support", "seed", "threads", "backend")
            cases.append(Case(f"cli omniglot {flag}", repr(v), cli_case(argv, tmp), REJECT, names))
    runs = fake.make_runs(tmp / "cli-runs")
    for label, argv in [("runs-missing", ["omniglot-runs", "--runs", str(tmp / "no-runs"), "--model", str(tmp)]),
                        ("model-missing", ["omniglot-runs", "--runs", str(runs), "--model", str(tmp / "no-model")]),
                        ("model-not-a-run", ["omniglot-runs", "--runs", str(runs), "--model", str(data)]),
                        ("seed-negative", ["omniglot-runs", "--runs", str(runs), "--model", str(tmp), "--seed", "-1"]),
                        ("no-runs-flag", ["omniglot-runs", "--model", str(tmp)])]:
        cases.append(Case("cli omniglot-runs", label, cli_case(argv, tmp), REJECT,
                          ("runs", "model", "seed", "required", "argument")))
    return cases


def _cli_out_file(tmp):
    (tmp / "out-is-a-file").write_text("x")
    return cli_case(["sine", "--iterations", "1", "--no-progress", "--out", str(tmp / "out-is-a-file")], tmp)


# ---------------------------------------------------------------------- cases: distributed_fit
def distributed_cases():
    from reptile_fast import Sine
    from reptile_fast.distributed import DistContext, distributed_fit

    def dfit(**kw):
        tr = _trainer()
        args = dict(iterations=2, meta_batch_size=2, seed=0, context=DistContext.single(), progress=False)
        args.update(kw)
        trainer = args.pop("trainer", tr)
        distributed_fit(trainer, Sine(), args.pop("iterations"), **args)
        return trainer

    cases = []
    for arg, palette in [("iterations", int_palette(2)), ("meta_batch_size", int_palette(2)),
                         ("seed", int_palette(3, 0)), ("block_size", int_palette(2)),
                         ("stop_check_every", int_palette(2)), ("log_every", int_palette(1))]:
        for label, value, expect, plain in palette:
            cases.append(Case(f"distributed_fit({arg}=)", label, lambda a=arg, v=value: dfit(**{a: v}), expect, (arg,),
                              (lambda a=arg, p=plain: dfit(**{a: p})) if expect != REJECT else None))
    cases.append(Case("distributed_fit(seed=)", "2**64", lambda: dfit(seed=2 ** 64), REJECT, ("seed",)))
    for label, value in [("None", None), ("bogus", "max"), ("int", 1)]:
        cases.append(Case("distributed_fit(reduction=)", label, lambda v=value: dfit(reduction=v), REJECT,
                          ("reduction",)))
    for label, value in [("str", "gloo"), ("int", 0)]:
        cases.append(Case("distributed_fit(context=)", label, lambda v=value: dfit(context=v), REJECT, ("context",)))
    for label, value in [("model", "MODEL"), ("None", None)]:
        cases.append(Case("distributed_fit(trainer=)", label,
                          lambda v=value: dfit(trainer=_model() if v == "MODEL" else v), REJECT, ("trainer",)))
    for label, value, expect, plain in bool_palette():
        cases.append(Case("distributed_fit(progress=)", label, lambda v=value: dfit(progress=v), expect,
                          ("progress",), (lambda p=plain: dfit(progress=p)) if expect != REJECT else None))
    return cases


# ---------------------------------------------------------------------- cases: models, few-shot evaluation, contexts
def models_fewshot_cases():
    from reptile_fast import MLP, Episodes, MiniImageNetConvNet, OmniglotConvNet, TaskBatch
    from reptile_fast.distributed import DistContext
    from reptile_fast.fewshot import evaluate_episodes

    cases = []
    for arg, good, minimum in [("input_dim", 2, 1), ("hidden_dim", 4, 1), ("output_dim", 3, 1), ("depth", 2, 0)]:
        for label, value, expect, plain in int_palette(good, minimum):
            cases.append(Case(f"MLP({arg}=)", label, lambda a=arg, v=value: _seeded(lambda: MLP(**{a: v})), expect,
                              (arg, "layer sizes", "depth"),
                              (lambda a=arg, p=plain: _seeded(lambda: MLP(**{a: p}))) if expect != REJECT else None))
    for label, value in [("bogus", "gelu"), ("None", None), ("module", torch.nn.Tanh())]:
        cases.append(Case("MLP(activation=)", label, lambda v=value: MLP(activation=v), REJECT, ("activation",)))
    for label, value in [("zero", [4, 0]), ("str", "44"), ("float", [4.5]), ("None-entry", [None])]:
        cases.append(Case("MLP(hidden_dims=)", label, lambda v=value: MLP(hidden_dims=v), REJECT,
                          ("hidden_dims", "layer sizes")))
    for cls in (OmniglotConvNet, MiniImageNetConvNet):
        for arg, good in [("n_classes", 3), ("in_channels", 1), ("channels", 4)]:
            for label, value, expect, plain in int_palette(good):
                cases.append(Case(f"{cls.__name__}({arg}=)", label, lambda c=cls, a=arg, v=value: _seeded(
                    lambda: c(**{a: v})), expect, (arg,),
                    (lambda c=cls, a=arg, p=plain: _seeded(lambda: c(**{a: p}))) if expect != REJECT else None))
    for label, value, expect, plain in bool_palette():
        cases.append(Case("MiniImageNetConvNet(pool_first=)", label, lambda v=value: _seeded(
            lambda: MiniImageNetConvNet(3, channels=4, pool_first=v)), expect, ("pool_first",),
            (lambda p=plain: _seeded(lambda: MiniImageNetConvNet(3, channels=4, pool_first=p)))
            if expect != REJECT else None))

    # few-shot episodes of a tiny image task, and the evaluation
    g = torch.Generator().manual_seed(0)
    sx, qx = torch.rand(2, 6, 1, 28, 28, generator=g), torch.rand(2, 3, 1, 28, 28, generator=g)
    sy, qy = torch.arange(3).repeat(2, 2), torch.arange(3).repeat(2, 1)
    support, query = TaskBatch(sx, sy), TaskBatch(qx, qy)

    def conv_trainer():
        from reptile_fast import Reptile

        torch.manual_seed(0)
        return Reptile(OmniglotConvNet(3, channels=4), loss="cross_entropy", backend="torch", inner_lr=0.1)

    def ev(**kw):
        args = dict(steps=2, batch_size=3, generator=torch.Generator().manual_seed(1))
        args.update(kw)
        episodes = args.pop("episodes", Episodes(support, query, 3))
        trainer = args.pop("trainer", None) or conv_trainer()
        return evaluate_episodes(trainer, episodes, **args).accuracy

    for arg, good in [("steps", 2), ("batch_size", 3), ("max_images", 4)]:
        for label, value, expect, plain in int_palette(good):
            cases.append(Case(f"evaluate_episodes({arg}=)", label, lambda a=arg, v=value: ev(**{a: v}), expect, (arg,),
                              (lambda a=arg, p=plain: ev(**{a: p})) if expect != REJECT else None))
    cases.append(Case("evaluate_episodes(batch_size=)", "above-support", lambda: ev(batch_size=7), REJECT,
                      ("batch_size",)))
    for label, value, expect, plain in bool_palette():
        cases.append(Case("evaluate_episodes(transductive=)", label, lambda v=value: ev(transductive=v), expect,
                          ("transductive",), (lambda p=plain: ev(transductive=p)) if expect != REJECT else None))
    for label, value in [("None", None), ("taskbatch", support), ("tuple", (support, query))]:
        cases.append(Case("evaluate_episodes(episodes=)", label, lambda v=value: ev(episodes=v), REJECT,
                          ("episodes",)))
    cases.append(Case("evaluate_episodes(trainer=)", "model", lambda: ev(trainer=OmniglotConvNet(3, channels=4)),
                      REJECT, ("trainer",)))
    cases.append(Case("evaluate_episodes(episodes=)", "4-way-labels-3-outputs", lambda: ev(
        episodes=Episodes(TaskBatch(sx, sy.clamp(max=2) + (sy == 2).long()), query, 4)), REJECT,
        ("label", "out", "class", "ways")))
    for label, kw in [("ways-0", dict(ways=0)), ("ways-str", dict(ways="3")), ("label>=ways", dict(ways=2)),
                      ("query-float", dict(query=TaskBatch(qx, qy.float().unsqueeze(-1)))),
                      ("support-None", dict(support=None)),
                      ("image-mismatch", dict(query=TaskBatch(torch.rand(2, 3, 1, 27, 27), qy))),
                      ("tasks-mismatch", dict(query=query[0:1]))]:
        args = dict(support=support, query=query, ways=3)
        args.update(kw)
        cases.append(Case("Episodes(...)", label, lambda a=args: Episodes(a["support"], a["query"], a["ways"]),
                          REJECT, ("ways", "label", "query", "support", "episodes")))
    cases.append(Case("Episodes(ways=)", "np.int64", lambda: Episodes(support, query, np.int64(3)).ways, ACCEPT, (),
                      lambda: Episodes(support, query, 3).ways))
    for label, value in [("bogus", "gpu"), ("None", None), ("list", ["cpu"])]:
        cases.append(Case("DistContext.single(device=)", label, lambda v=value: DistContext.single(v), REJECT,
                          ("device",)))
    # "meta" and an absent "cuda" became ValueErrors on main (check_device) while this sweep was written
    for label, value in [("meta", "meta"), ("cuda", "cuda")]:
        cases.append(Case("DistContext.single(device=)", label, lambda v=value: DistContext.single(v), EITHER,
                          ("device",)))
    return cases


def _seeded(make):
    torch.manual_seed(0)
    return make()


# ---------------------------------------------------------------------- cases: settings that meet at their edges
def interaction_cases():
    """Every backend × Reptile/FOMAML × SGD/Adam × tasks of 1, 2 or 10 points × a minibatch of
    N - 1, N or N + 1 points × 1 or 3 inner steps × meta-batches of 1 or 2, through ``fit``,
    ``evaluate``: finite results, or a named refusal (a backend that cannot run the setting says
    so; a minibatch above the task's points names inner_batch_size on every backend)."""
    import itertools

    cases = []
    for be, alg, opt, n, delta, steps, t in itertools.product(
            ("torch", "reference", "compiled", "triton"), ("reptile", "fomaml"), ("sgd", "adam"), (1, 2, 10),
            (-1, 0, 1), (1, 3), (1, 2)):
        b = n + delta
        if b < 1:
            continue

        def run(be=be, alg=alg, opt=opt, n=n, b=b, steps=steps, t=t):
            from reptile_fast import Reptile, Sine

            torch.manual_seed(0)
            tr = Reptile(_model(4), backend=be, algorithm=alg, inner_optimizer=opt, inner_steps=steps,
                         inner_batch_size=b)
            tr.fit(Sine(n_points=n), 2, meta_batch_size=t, generator=torch.Generator().manual_seed(0), progress=False)
            return tr.evaluate(Sine(n_points=n).sample(t, generator=torch.Generator().manual_seed(1)), 2)
        label = f"{be},{alg},{opt},N={n},B={b},S={steps},T={t}"
        cases.append(Case("fit+evaluate", label, run, REJECT if b > n else EITHER,
                          # (a setting the backend cannot run is refused first, naming the backend)
                          ("inner_batch_size", "backend 'triton' supports", "compiled meta-step runs") if b > n
                          else ()))
    return cases


# ---------------------------------------------------------------------- the sweep
GROUPS = {"constructor": reptile_constructor_cases, "model": model_cases, "setters": setter_cases,
          "taskbatch": taskbatch_cases, "meta_step": meta_step_cases, "adapt_evaluate": adapt_evaluate_cases,
          "get_backend": get_backend_cases, "dropin": dropin_cases, "distributed": distributed_cases,
          "kernels": kernel_cases, "fit": fit_cases, "state": state_cases, "task_families": task_family_cases,
          "miniimagenet": miniimagenet_cases, "cli": cli_cases, "models_fewshot": models_fewshot_cases,
          "loss_output": loss_and_output_cases, "interactions": interaction_cases}
NEEDS_TMP = {"fit", "state", "task_families", "miniimagenet", "cli"}


def group_cases(name: str, tmp) -> list:
    return GROUPS[name](tmp) if name in NEEDS_TMP else GROUPS[name]()


def all_cases(tmp):
    return [c for name in GROUPS for c in group_cases(name, tmp)]


@pytest.mark.parametrize("group", list(GROUPS))
def test_sweep(group, tmp_path):
    """Every case of ``group`` is answered as the standard says (see the module docstring)."""
    if group == "kernels":
        pytest.importorskip("triton")
        from reptile_fast.kernels import mlp_inner_loop as K

        if not K.INTERPRETED:  # the cases' tensors are on the CPU
            pytest.skip("the kernel cases run under TRITON_INTERPRET=1 (set by tests/conftest.py)")
    if group == "miniimagenet" or group == "task_families" or group == "cli":
        pytest.importorskip("PIL")
    cases = group_cases(group, tmp_path)
    assert len(cases) >= 10
    defects = []
    for case in cases:
        verdict, detail = outcome(case)
        if verdict != "ok":
            defects.append(f"{case.id}: {detail}")
    assert not defects, f"{len(defects)} of {len(cases)} cases are defects:\n" + "\n".join(defects)


if __name__ == "__main__":  # the table of outcomes
    import os
    import tempfile
    import time
    from pathlib import Path

    os.environ.setdefault("TRITON_INTERPRET", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    pattern = sys.argv[1] if len(sys.argv) > 1 else ""
    with tempfile.TemporaryDirectory() as d:
        cases = [c for c in all_cases(Path(d)) if pattern in c.id]
        defects = 0
        t0 = time.time()
        for c in cases:
            t1 = time.time()
            verdict, detail = outcome(c)
            defects += verdict != "ok"
            if verdict != "ok" or "-v" in sys.argv:
                print(f"{verdict:6s} {c.id}: {detail}  ({time.time() - t1:.1f}s)", flush=True)
        print(f"{len(cases)} cases, {defects} defects, {time.time() - t0:.0f} s")


# ---------------------------------------------------------------------- regressions (the sweep's finds)
# Each failed on the code before the fix (the sweep's table named them); kept as plain tests so a
# failure says what broke without reading the table.
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_an_outer_step_that_overflows_is_skipped_and_reported(backend):
    """ε = 1e300 times a finite φ̃ − φ is inf in fp32: φ became inf silently on the eager backends
    (the guard read only φ̃ − φ); now the meta-step is skipped and reported like any NaN step."""
    tr = _trainer(backend=backend, outer_lr=1e300)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.meta_step(_tasks(), _plan())
    with pytest.raises(NonFiniteError, match="meta-step 1"):
        tr.check_finite()
    assert all(torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))


def test_inner_lr_beyond_the_models_dtype_is_refused():
    """1e300 failed inside the inner step ("value cannot be converted to type float without overflow")."""
    with pytest.raises(ValueError, match="inner_lr"):
        _trainer(inner_lr=1e300)
    tr = _trainer()
    with pytest.raises(ValueError, match="inner_lr"):
        tr.inner_lr = 1e39
    from reptile_fast import Reptile

    with pytest.raises(ValueError, match="inner_lr.*float16"):
        Reptile(_model(dtype=torch.float16), inner_lr=1e5)
    assert Reptile(_model(dtype=torch.float16), inner_lr=6e4).inner_lr == 6e4


def test_counts_too_large_to_draw_are_value_errors():
    """2**62 inner steps / adaptation steps / tasks: torch's RuntimeError "Storage size calculation
    overflowed" from inside the draw."""
    from reptile_fast import Sine, sample_indices

    with pytest.raises(ValueError, match="inner_steps"):
        sample_indices(3, HUGE_INT, 50, 10)
    with pytest.raises(ValueError, match="inner_steps"):
        _trainer(inner_steps=HUGE_INT).meta_step(_tasks())
    for method in ("adapt", "evaluate"):
        with pytest.raises(ValueError, match="inner_steps"):  # steps -> the plan's inner_steps
            getattr(_trainer(), method)(_tasks(), HUGE_INT)
    with pytest.raises(ValueError, match="n_tasks"):
        Sine().sample(HUGE_INT)
    with pytest.raises(ValueError, match=rf"n_tasks.*\(fit's arguments to it: n_tasks = meta_batch_size={HUGE_INT}\)"):
        _fit(meta_batch_size=HUGE_INT)


@pytest.mark.parametrize("backend", ["torch", "compiled"])
def test_a_meta_batch_beyond_memory_is_a_value_error_naming_meta_batch_size(backend):
    """2**40 tasks per meta-step: backend torch's draw ran out of memory with the draw's own words
    (n_tasks), and the compiled path raised "no meta-step mode could run" with four allocator
    tracebacks, one per mode it tried."""
    from reptile_fast import Sine

    tr = _trainer(backend=backend)
    with pytest.raises(ValueError, match=r"out of memory.*meta_batch_size=1099511627776|1099511627776 tasks.*out of memory"):
        tr.fit(Sine(), 2, meta_batch_size=2 ** 40, progress=False)
    assert tr.iteration == 0


def test_numpy_bools_are_taken_for_flags():
    """numpy 2 names its bool type "bool", not "bool_": np.False_ was refused as not True/False."""
    tr = _fit(progress=np.False_, draw_chunks=np.bool_(False), handle_signals=np.True_)
    assert tr.iteration == 2
    model = _dropin(progress=np.False_)
    assert isinstance(model, torch.nn.Module)
    with pytest.raises(TypeError, match="progress"):
        _fit(progress="no")


def test_taskbatch_takes_a_numpy_class_count():
    from reptile_fast import TaskBatch

    tb = TaskBatch(_tasks().x, torch.zeros(3, 50, dtype=torch.long), np.int64(4))
    assert tb.n_classes == 4 and type(tb.n_classes) is int


def test_resume_from_a_dict_that_is_not_a_checkpoint():
    """fit(resume_from=dict) (rank 0's checkpoint, sent) failed with KeyError 'extra' for another dict."""
    with pytest.raises(ValueError, match="resume_from"):
        _fit(resume_from={"a": 1})


def test_a_sampler_drawing_another_count_is_refused_on_every_backend():
    """The eager stepper trained a short draw as a smaller meta-batch without a word; the compiled
    one refused it: both refuse now, as the README says."""
    for backend in ("torch", "reference"):
        tr = _trainer(backend=backend)
        with pytest.raises(ValueError, match="meta_batch_size"):
            tr.fit(None, 2, meta_batch_size=2, sampler=_Draws(lambda i, m: (_tasks(m), _plan(m))), progress=False)
        assert tr.iteration == 0


def test_load_state_dict_refuses_meta_tensors_and_a_config_of_another_kind():
    tr = _trainer()
    state = dict(_trainer().state_dict())
    state["model"] = {k: v.to("meta") for k, v in state["model"].items()}
    with pytest.raises(ValueError, match="meta device"):
        tr.load_state_dict(state)
    with pytest.raises(TypeError, match="config"):
        tr.load_state_dict({**_trainer().state_dict(), "config": "x"})


@pytest.mark.parametrize("kw, match", [({"history": "x"}, "history"), ({"history": {"loss": ["a"]}}, "history"),
                                       ({"extra": [1, 2]}, "extra")])
def test_save_checkpoint_names_a_bad_history_or_extra(tmp_path, kw, match):
    from reptile_fast import save_checkpoint

    with pytest.raises(TypeError, match=match):
        save_checkpoint(tmp_path, _trainer(), **kw)
    assert not (tmp_path / "checkpoint.pt").exists()


@pytest.mark.parametrize("arg", ["amplitude", "phase", "x_range"])
def test_sine_ranges_must_be_finite_in_float32(arg):
    """(0, 1e300) became inf amplitudes, NaN targets (sin of an inf phase) or a RuntimeError."""
    from reptile_fast import Sine

    with pytest.raises(ValueError, match=arg):
        Sine(**{arg: (0.0, 1e300)})
    with pytest.raises(ValueError, match="x_range"):
        Sine(x_range=(-3e38, 3e38))


def test_sine_make_names_its_arguments():
    from reptile_fast import Sine

    with pytest.raises(TypeError, match="amplitude"):
        Sine().make("a", [0.0])
    with pytest.raises(TypeError, match="phase"):
        Sine().make([1.0], None)


def test_miniimagenet_root_of_another_type(tmp_path):
    from reptile_fast import MiniImageNet

    with pytest.raises(TypeError, match="root"):
        MiniImageNet(None)


def test_kernel_v1_params_of_another_type():
    pytest.importorskip("triton")
    from reptile_fast.kernels import mlp_inner_loop as K

    t = _tasks(2)
    with pytest.raises(TypeError, match="params"):
        K.mlp_inner_loop(t.x, t.y, _plan(2, 2, 4), None, ("tanh", "identity"), lr=0.02)


def test_outer_optimizer_learning_rates_torch_cannot_use():
    """torch.optim took lr=1e300 and failed inside its step (RuntimeError), and lr=NaN, which turned
    φ into NaN without a NonFiniteError; both are named now, at construction and at each step."""
    from reptile_fast import Reptile

    for lr in (1e300, NAN):
        model = _model()
        with pytest.raises(ValueError, match="outer_optimizer"):
            Reptile(model, outer_optimizer=torch.optim.SGD(model.parameters(), lr=lr))
    case = next(c for c in reptile_constructor_cases() if c.entry.startswith("meta_step(outer_optimizer"))
    assert outcome(case)[0] == "ok"


def test_taskbatch_to_and_indexing():
    t = _tasks()
    with pytest.raises(ValueError, match="device"):
        t.to(device="gpu")  # RuntimeError listing torch's device types before
    assert torch.equal(t[np.int64(1)].x, t[1].x)  # IndexError before: the task dimension was dropped
    with pytest.raises(TypeError, match="TaskBatch"):
        t["a"]


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_ids_outside_the_embedding_are_refused(backend):
    """An id past the probed points: IndexError inside the inner loop (reference) or, negative, taken
    silently under vmap (torch: other rows than the reference's)."""
    from reptile_fast import Reptile, TaskBatch

    for bad in (100, -1):
        tr = Reptile(_embedding_model(), backend=backend)
        with pytest.raises(ValueError, match="nn.Embedding has 10 rows"):
            tr.meta_step(TaskBatch(_ids(bad), _tasks().y), _plan())
        assert tr.iteration == 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_a_detached_callable_loss_is_refused(backend):
    """Backend torch trained with a zero gradient (the model never moved); reference failed inside
    backward with a RuntimeError."""
    with pytest.raises(ValueError, match="does not depend on the prediction"):
        _one_step(backend=backend, loss=lambda p, y: (p - y).detach().pow(2).mean())


def test_dropin_tasks_without_data_or_in_another_dtype():
    """Meta-device tasks failed inside the stacking (NotImplementedError); float64 inputs with float32
    targets went to the reference path (their dtypes differ) and failed in the model's first Linear."""
    import warnings

    with pytest.raises(ValueError, match="meta device"):
        _dropin(sample_task=lambda: (torch.zeros(50, device="meta"), torch.zeros(50, device="meta"),
                                     torch.nn.MSELoss()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # refused before any path is chosen (no ReferencePathWarning)
        with pytest.raises(TypeError, match="dtype"):
            _dropin(sample_task=lambda: (torch.zeros(50, dtype=torch.float64), torch.zeros(50), torch.nn.MSELoss()))


def test_numpy_bools_for_model_and_evaluation_flags():
    """MiniImageNetConvNet(pool_first=np.True_) and evaluate_episodes(transductive=np.False_) were
    refused as "must be a bool, got bool" (isinstance(np.bool_, bool) is False)."""
    from reptile_fast import MiniImageNetConvNet

    torch.manual_seed(0)
    got = MiniImageNetConvNet(3, channels=4, pool_first=np.True_)
    torch.manual_seed(0)
    want = MiniImageNetConvNet(3, channels=4, pool_first=True)
    assert str(got) == str(want)
    cases = [c for c in models_fewshot_cases() if c.entry == "evaluate_episodes(transductive=)"
             and c.label == "np.bool_"]
    assert cases and outcome(cases[0]) == ("ok", "accepted")
