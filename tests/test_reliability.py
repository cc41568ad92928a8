"""The bad-input table: every row is one wrong input (Python API, checkpoint files, command line)
with the exception type it must raise and words the message must contain to name the problem.

Command-line rows run ``reptile_fast.cli.main`` and expect exit status 2 with the words on stderr
(wrapped as ``CLIFailed`` below); all of them fail before any training starts.
"""
import importlib
import math
import os
import pickle
import shutil
import tempfile
from pathlib import Path
from unittest import mock

import pytest
import torch

from reptile_fast import MLP, OmniglotConvNet, Reptile, Sine, TaskBatch, sample_indices
from reptile_fast.backends import UnsupportedModelError
from reptile_fast.checkpoint import load_checkpoint, save_checkpoint
from reptile_fast.cli import main
from reptile_fast.jobs import SineConfig, run_sine


class CLIFailed(Exception):
    """``main(argv)`` ended with a non-zero status; the message is ``"exit N: <stderr>"``."""


class Ctx:
    """Files the rows need, made on demand in the test's temporary directory."""

    def __init__(self, tmp: Path, capsys):
        self.tmp, self.capsys = tmp, capsys

    def trainer(self, width=8, **kw):
        torch.manual_seed(0)
        kw.setdefault("backend", "reference")
        return Reptile(MLP(1, width, 1), **kw)

    def checkpoint(self, name="ckpt", *, generator=True, width=8, job=False):
        """A directory holding a one-step checkpoint."""
        d = self.tmp / name
        gen = torch.Generator().manual_seed(0) if generator else None
        extra = {"job": "sine", "job_config": vars(SineConfig(iterations=1))} if job else None
        self.trainer(width).fit(Sine(), 1, generator=gen, progress=False, checkpoint_dir=d,
                                checkpoint_extra=extra)
        return d

    def file(self, name="file.txt", content="not a directory\n"):
        path = self.tmp / name
        path.write_text(content)
        return path

    def damaged(self, how):
        path = self.checkpoint() / "checkpoint.pt"
        data = bytearray(path.read_bytes())
        if how == "truncate":
            data = data[: len(data) * 2 // 3]
        else:  # overwrite bytes in the middle (the tensor records)
            mid = len(data) // 2
            data[mid:mid + 16] = bytes(16)
        path.write_bytes(bytes(data))
        return path

    def cli(self, *argv):
        argv = [str(a) for a in argv]
        self.capsys.readouterr()
        try:
            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code
        err = self.capsys.readouterr().err
        if rc != 0:
            raise CLIFailed(f"exit {rc}: {err}")


def sine_cli(c, *argv):
    """The sine command with fast evaluation settings."""
    return c.cli("sine", "--iterations", 2, "--backend", "reference", "--eval-tasks", 1,
                 "--eval-steps", 1, "--no-progress", *argv)


def nan_model():
    model = MLP(1, 8, 1)
    with torch.no_grad():
        model.network[0].weight[0, 0] = math.nan
    return model


def state_with(c, **changes):
    state = c.trainer().state_dict()
    state["model"] = dict(state["model"])
    for key, value in changes.items():
        if key == "model_entry":
            state["model"]["network.0.weight"] = value
        else:
            state[key] = value
    return state


class Evil:
    def __reduce__(self):
        return (os.getcwd, ())


def evil_file(c):
    path = c.tmp / "evil.pt"
    torch.save({"format": "reptile_fast.checkpoint", "payload": Evil()}, path)
    return path


def tensor_file(c):
    path = c.tmp / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return path


def model_pt(c):
    path = c.tmp / "model.pt"
    torch.save({"state_dict": MLP().state_dict(), "config": {}}, path)
    return path


TASKS = Sine().sample(2, generator=torch.Generator().manual_seed(0))


def triton_on_conv_net(c):
    try:
        importlib.import_module("reptile_fast.backends.triton")
    except ImportError as exc:
        pytest.skip(f"the triton backend is not importable here: {exc}")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # on the CPU it would fail earlier, for the device
    Reptile(OmniglotConvNet(n_classes=3, channels=4, image_size=8).to(device), backend="triton",
            loss="cross_entropy")


def triton_on_cpu_without_interpreter(c):
    try:
        importlib.import_module("reptile_fast.backends.triton")
    except ImportError as exc:
        pytest.skip(f"the triton backend is not importable here: {exc}")
    with mock.patch.dict(os.environ, {"TRITON_INTERPRET": "0"}):
        Reptile(MLP(), backend="triton")


def no_cuda(row):
    return pytest.param(*row, marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available"))


NOBODY = 65534  # the unprivileged uid/gid the permission rows drop to when the tests run as root


def unprivileged(setup, action):
    """A row's call for file-permission cases: ``setup(ctx)`` makes the file (as the test's user),
    then ``action(ctx, made)`` must fail for lack of permission.  Root ignores file permissions
    (and CI runs as root), so as root the action runs in a forked child that has dropped to
    uid/gid 65534 ("nobody"), in a directory it may traverse; the exception it raised is raised
    again here with the same type and message."""

    def call(c):
        if not (hasattr(os, "geteuid") and os.geteuid() == 0):
            return action(c, setup(c))
        shared = Path(tempfile.mkdtemp(prefix="reptile-fast-perm-"))
        try:
            shared.chmod(0o755)
            cu = Ctx(shared, c.capsys)
            made = setup(cu)
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:  # the child: drop privileges, run, report, exit without pytest's teardown
                outcome = None
                try:
                    os.close(read_end)
                    os.setgroups([])
                    os.setgid(NOBODY)
                    os.setuid(NOBODY)
                    action(cu, made)
                except BaseException as exc:  # noqa: BLE001 - reported to the parent
                    outcome = (type(exc).__name__, str(exc))
                os.write(write_end, pickle.dumps(outcome))
                os._exit(0)
            os.close(write_end)
            with os.fdopen(read_end, "rb") as f:
                data = f.read()
            os.waitpid(pid, 0)
        finally:
            shutil.rmtree(shared, ignore_errors=True)
        outcome = pickle.loads(data) if data else ("RuntimeError", "the unprivileged child died")
        if outcome is not None:
            kinds = {"PermissionError": PermissionError, "CLIFailed": CLIFailed}
            name, message = outcome
            raise kinds.get(name, RuntimeError)(message if name in kinds else f"{name}: {message}")

    return call


def unwritable_dir(c):
    d = c.tmp / "ro"
    d.mkdir()
    d.chmod(0o500)
    return d


def unreadable_checkpoint(c):
    path = c.checkpoint() / "checkpoint.pt"
    path.chmod(0o000)
    return path.parent


G = torch.Generator


TABLE = [
    # --------------------------------------------------------------- API: trainer and data
    ("model with NaN parameters", lambda c: Reptile(nan_model()), ValueError, r"network\.0\.weight contains NaN"),
    ("inner_lr infinite", lambda c: c.trainer(inner_lr=math.inf), ValueError, "inner_lr must be a finite"),
    ("inner_steps a float", lambda c: c.trainer(inner_steps=2.0), TypeError, "inner_steps must be an int"),
    ("unsupported model for a backend", triton_on_conv_net, UnsupportedModelError,
     r"backend 'triton'.*Conv2d.*not supported"),
    ("triton on a CPU model without the interpreter", triton_on_cpu_without_interpreter, UnsupportedModelError,
     r"backend 'triton' needs a CUDA device"),
    ("unknown backend", lambda c: c.trainer(backend="tpu"), ValueError, "unknown backend 'tpu'"),
    ("TaskBatch of int16", lambda c: TaskBatch(torch.zeros(1, 5, 1, dtype=torch.int16), torch.zeros(1, 5, 1)),
     TypeError, "floating-point"),
    ("TaskBatch with inf", lambda c: TaskBatch(torch.full((1, 5, 1), math.inf), torch.zeros(1, 5, 1)),
     ValueError, "NaN or infinite"),
    ("TaskBatch x without a task dim", lambda c: TaskBatch(torch.zeros(5, 1), torch.zeros(5, 1)),
     ValueError, r"\[tasks, points, \*features\]"),
    ("minibatch larger than the task", lambda c: sample_indices(1, 1, 5, 6), ValueError, "must not exceed n_points"),
    ("sine amplitude range reversed", lambda c: Sine(amplitude=(5.0, 1.0)), ValueError, "low <= high"),
    ("unknown activation", lambda c: MLP(activation="gelu"), ValueError, "activation must be one of"),
    ("plan of int32", lambda c: c.trainer().meta_step(TASKS, sample_indices(2, 5, 50, 10).int()),
     TypeError, "torch.long"),
    ("evaluate steps=True", lambda c: c.trainer().evaluate(TASKS, True), TypeError, "steps must be an int"),
    ("distribution yields no TaskBatch", lambda c: c.trainer().fit(type("D", (), {"sample": lambda s, n, **k: [1]})(), 1,
                                                                  progress=False), TypeError, "TaskBatch"),
    ("fit iterations=True", lambda c: c.trainer().fit(Sine(), True), TypeError, "iterations must be an int"),
    ("fit callback not callable", lambda c: c.trainer().fit(Sine(), 1, callback=3), TypeError, "callback must be callable"),
    # --------------------------------------------------------------- API: checkpoints in fit
    ("checkpoint_every=0", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=c.tmp, checkpoint_every=0),
     ValueError, "checkpoint_every must be >= 1"),
    ("checkpoint_every a float", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=c.tmp, checkpoint_every=1.5),
     TypeError, "checkpoint_every must be an int"),
    ("checkpoint_every without a directory", lambda c: c.trainer().fit(Sine(), 1, checkpoint_every=5),
     ValueError, "checkpoint_every needs checkpoint_dir"),
    ("checkpoint_dir is a file", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=c.file()),
     NotADirectoryError, r"checkpoint_dir .*file\.txt exists and is not a directory"),
    ("checkpoint_dir under a file", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=c.file() / "sub"),
     NotADirectoryError, r"file\.txt is a file"),
    ("checkpoint_dir an int", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=3), TypeError,
     "checkpoint_dir must be a path"),
    ("checkpoint_extra a list", lambda c: c.trainer().fit(Sine(), 1, checkpoint_dir=c.tmp, checkpoint_extra=[1]),
     TypeError, "checkpoint_extra must be a dict"),
    ("checkpoint_extra unsafe to load", lambda c: c.trainer().fit(Sine(), 1, progress=False, checkpoint_dir=c.tmp,
                                                                  checkpoint_extra={"x": object()}),
     TypeError, r"\['x'\] is a object"),
    ("resume_from missing path", lambda c: c.trainer().fit(Sine(), 2, resume_from=c.tmp / "nope"),
     FileNotFoundError, r"checkpoint .*nope does not exist"),
    ("resume_from a directory without one", lambda c: c.trainer().fit(Sine(), 2, resume_from=c.tmp),
     FileNotFoundError, "no checkpoint in directory"),
    ("resume without the generator", lambda c: c.trainer().fit(Sine(), 2, resume_from=c.checkpoint()),
     ValueError, "pass generator=torch.Generator"),
    ("resume global-RNG run with a generator",
     lambda c: c.trainer().fit(Sine(), 2, generator=G(), resume_from=c.checkpoint(generator=False)),
     ValueError, "global RNG"),
    ("resume into another model width", lambda c: c.trainer(16).fit(Sine(), 2, generator=G(), resume_from=c.checkpoint()),
     ValueError, r"network\.0\.weight has shape \(8, 1\), this model's is \(16, 1\)"),
    ("resume into a trainer with an outer optimizer", lambda c: _resume_with_adam(c), ValueError,
     "no outer_optimizer state but this trainer has one"),
    # --------------------------------------------------------------- API: state dicts
    ("load_state_dict of a string", lambda c: c.trainer().load_state_dict("state"), TypeError, "Reptile.state_dict"),
    ("load_state_dict of {}", lambda c: c.trainer().load_state_dict({}), ValueError, "missing"),
    ("state with NaN weights", lambda c: c.trainer().load_state_dict(state_with(c, model_entry=torch.full((8, 1), math.nan))),
     ValueError, r"network\.0\.weight contains NaN"),
    ("state with float64 weights", lambda c: c.trainer().load_state_dict(state_with(c, model_entry=torch.zeros(8, 1, dtype=torch.float64))),
     ValueError, "dtype torch.float64"),
    ("state with a negative iteration", lambda c: c.trainer().load_state_dict(state_with(c, iteration=-1)),
     ValueError, r"iteration.*>= 0"),
    # --------------------------------------------------------------- checkpoint files
    ("checkpoint path an int", lambda c: load_checkpoint(12), TypeError, "checkpoint path must be a path"),
    ("text file as checkpoint", lambda c: load_checkpoint(c.file()), ValueError, "not a torch checkpoint archive"),
    ("plain tensor file", lambda c: load_checkpoint(tensor_file(c)), ValueError, "not a reptile_fast checkpoint: it holds a Tensor"),
    ("bare model.pt", lambda c: load_checkpoint(model_pt(c)), ValueError, "model.pt holds only the weights"),
    ("code-carrying pickle", lambda c: load_checkpoint(evil_file(c)), ValueError, r"weights_only.*could run code"),
    ("empty checkpoint", lambda c: load_checkpoint(c.file("e.pt", "")), ValueError, r"is empty \(0 bytes\)"),
    ("truncated checkpoint", lambda c: load_checkpoint(c.damaged("truncate")), ValueError, "truncated"),
    ("overwritten bytes", lambda c: load_checkpoint(c.damaged("zero")), ValueError, r"corrupted|checksum"),
    ("save into a file's place", lambda c: save_checkpoint(c.file(), c.trainer()), NotADirectoryError, "not a directory"),
    ("unreadable checkpoint", unprivileged(unreadable_checkpoint, lambda c, d: load_checkpoint(d)), PermissionError,
     "not readable"),
    # --------------------------------------------------------------- the sine job
    ("SineConfig iterations=0", lambda c: SineConfig(iterations=0), ValueError, "iterations must be >= 1"),
    ("SineConfig batch beyond the grid", lambda c: SineConfig(inner_batch_size=60), ValueError, "exceeds the 50 points"),
    ("SineConfig outer_lr a string", lambda c: SineConfig(outer_lr="0.1"), TypeError, "outer_lr must be a number"),
    ("run_sine with a dict", lambda c: run_sine({"iterations": 1}, c.tmp), TypeError, "config must be a SineConfig"),
    ("run_sine into a file", lambda c: run_sine(SineConfig(iterations=1), c.file()), NotADirectoryError,
     "output directory .* not a directory"),
    # --------------------------------------------------------------- command line
    ("--checkpoint-every -1", lambda c: sine_cli(c, "--checkpoint-every", -1), CLIFailed, "exit 2: .*non-negative integer"),
    ("--checkpoint-every x", lambda c: sine_cli(c, "--checkpoint-every", "x"), CLIFailed, "exit 2: .*non-negative integer"),
    ("--eval-steps 0", lambda c: sine_cli(c, "--eval-steps", 0), CLIFailed, "exit 2: .*positive integer"),
    ("--inner-lr inf", lambda c: sine_cli(c, "--inner-lr", "inf"), CLIFailed, "exit 2: .*finite positive number"),
    ("--meta-batch-size 1.5", lambda c: sine_cli(c, "--meta-batch-size", "1.5"), CLIFailed, "exit 2: .*positive integer"),
    ("--device tpu9", lambda c: sine_cli(c, "--device", "tpu9"), CLIFailed, "exit 2: .*unknown device 'tpu9'"),
    no_cuda(("--device cuda without CUDA", lambda c: sine_cli(c, "--device", "cuda"), CLIFailed,
             "exit 2: .*CUDA is not available")),
    ("--out is a file", lambda c: sine_cli(c, "--out", c.file()), CLIFailed, "exit 2: .*file.txt exists and is not a directory"),
    ("--out under a file", lambda c: sine_cli(c, "--out", c.file() / "run"), CLIFailed, r"exit 2: .*file\.txt is a file"),
    ("--out not writable", unprivileged(unwritable_dir, lambda c, d: sine_cli(c, "--out", d)), CLIFailed,
     "exit 2: .*not writable"),
    ("--resume missing", lambda c: c.cli("sine", "--resume", c.tmp / "gone"), CLIFailed,
     "exit 2: .*--resume .*gone does not exist"),
    ("--resume empty directory", lambda c: c.cli("sine", "--resume", c.tmp), CLIFailed,
     "exit 2: .*no checkpoint in directory"),
    ("--resume a text file", lambda c: c.cli("sine", "--resume", c.file()), CLIFailed,
     "exit 2: .*not a torch checkpoint archive"),
    ("--resume a truncated checkpoint", lambda c: c.cli("sine", "--resume", c.damaged("truncate").parent), CLIFailed,
     "exit 2: .*truncated"),
    ("--resume an API checkpoint", lambda c: c.cli("sine", "--resume", c.checkpoint()), CLIFailed,
     "exit 2: .*not written by the sine job"),
    ("--resume with fewer --iterations", lambda c: _resume_beyond(c), CLIFailed,
     "exit 2: .*meta-step 2, beyond --iterations 1"),
    ("unknown command", lambda c: c.cli("mnist"), CLIFailed, "exit 2: .*invalid choice"),
]


def _resume_with_adam(c):
    model = MLP(1, 8, 1)
    trainer = Reptile(model, backend="reference", outer_optimizer=torch.optim.Adam(model.parameters()))
    trainer.fit(Sine(), 2, generator=G(), resume_from=c.checkpoint())


def _resume_beyond(c):
    """A sine-job checkpoint at meta-step 2, resumed with --iterations 1."""
    d = c.tmp / "job"
    sine_cli(c, "--out", d, "--checkpoint-every", 1)
    c.cli("sine", "--resume", d, "--iterations", 1, "--no-progress")


def _id(row):
    return row.values[0] if hasattr(row, "values") else row[0]


@pytest.mark.parametrize("name, call, exc, words", TABLE, ids=[_id(r) for r in TABLE])
def test_bad_input(name, call, exc, words, tmp_path, capsys):
    if exc is CLIFailed:
        words = "(?s)" + words  # stderr spans lines (usage, then the error)
    with pytest.raises(exc, match=words) as info:
        call(Ctx(tmp_path, capsys))
    assert type(info.value) is exc, f"expected exactly {exc.__name__}, got {type(info.value).__name__}"


def test_table_rows():
    """Exactly these rows (names unique) with exactly these exception types: a row dropped or
    merged, or an expectation loosened to a base class, shows here."""
    from collections import Counter

    rows = [r.values if hasattr(r, "values") else r for r in TABLE]
    assert len({r[0] for r in rows}) == len(rows) == 68
    assert Counter(r[2].__name__ for r in rows) == {
        "ValueError": 27, "CLIFailed": 17, "TypeError": 15, "NotADirectoryError": 4,
        "UnsupportedModelError": 2, "FileNotFoundError": 2, "PermissionError": 1}
    assert all(r[3] for r in rows) and all(r[3].startswith("exit 2: ") for r in rows if r[2] is CLIFailed)


# Found in review: inputs that used to fail deep inside torch or give two different answers.
@pytest.mark.parametrize("call, exc, words", [
    (lambda: __import__("reptile_fast").sample_indices(2, 3, 10, 4, generator=3), TypeError, "torch.Generator"),
    (lambda: __import__("reptile_fast").sample_indices(2, 3, 10, 4, device="foo"), ValueError, "device"),
    (lambda: __import__("reptile_fast").Sine().sample(2, generator="g"), TypeError, "torch.Generator"),
    (lambda: __import__("reptile_fast").Sine().sample(2, device="nowhere"), ValueError, "device"),
    (lambda: __import__("reptile_fast").TaskBatch(torch.zeros(1, 2, 0), torch.zeros(1, 2, 1)), ValueError, "empty feature"),
    (lambda: __import__("reptile_fast").TaskBatch(torch.zeros(1, 2, 1), torch.zeros(1, 2, 0)), ValueError, "no output"),
    # "no" is truthy: it showed a bar and handled signals, the opposite of what it says
    (lambda: Reptile(MLP(1, 8, 1)).fit(Sine(), 1, progress="no"), TypeError, "progress must be True or False"),
    (lambda: Reptile(MLP(1, 8, 1)).fit(Sine(), 1, handle_signals="no"), TypeError, "handle_signals must be True"),
    (lambda: __import__("reptile_fast.distributed", fromlist=["distributed_fit"]).distributed_fit(
        Reptile(MLP(1, 8, 1)), Sine(), 1, meta_batch_size=1, seed=0, progress="no"), TypeError,
     "progress must be True"),
    (lambda: __import__("reptile_fast").reptile(MLP(1, 8, 1), 1, lambda: None, progress="no"), TypeError,
     "progress must be True or False"),
])
def test_review_bad_inputs(call, exc, words):
    with pytest.raises(exc, match=words):
        call()


@pytest.mark.parametrize("loss, exc, words", [
    (lambda p, t: ((p - t) ** 2).mean(dim=1), TypeError, "0-dim"),
    (lambda p, t: 1.0, TypeError, "0-dim"),
    (lambda p, t: p.unknown(), ValueError, "loss callable failed"),
])
def test_callable_loss_checked_before_training(loss, exc, words):
    from reptile_fast import MLP, Reptile, Sine

    trainer = Reptile(MLP(1, 8, 1), backend="reference", loss=loss)
    with pytest.raises(exc, match=words):
        trainer.meta_step(Sine().sample(2))


def test_frozen_parameters_are_refused():
    from reptile_fast import MLP, Reptile

    model = MLP(1, 8, 1)
    model.network[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen"):
        Reptile(model, backend="reference")


def test_fit_total_already_reached_is_refused():
    from reptile_fast import MLP, Reptile, Sine

    trainer = Reptile(MLP(1, 8, 1), backend="reference")
    trainer.fit(Sine(), 2, progress=False)
    with pytest.raises(ValueError, match="already taken 2"):
        trainer.fit(Sine(), 2, progress=False)


def test_hooks_and_swapped_layers_leave_the_fused_paths():
    """A forward hook or a layer replaced in place must not be skipped by a cached MLP spec."""
    from reptile_fast import MLP
    from reptile_fast.backends import UnsupportedModelError
    from reptile_fast.mlp_spec import cached_mlp_spec

    model = MLP(1, 8, 1)
    assert cached_mlp_spec(model).activations[0] == "tanh"
    model.network[1] = torch.nn.ReLU()
    assert cached_mlp_spec(model).activations[0] == "relu"
    handle = model.network[0].register_forward_hook(lambda m, i, o: o * 2)
    with pytest.raises(UnsupportedModelError, match="hooks"):
        cached_mlp_spec(model)
    handle.remove()
    assert cached_mlp_spec(model).activations[0] == "relu"


class _ReturnsTuple(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = MLP(1, 8, 1)

    def forward(self, x):
        return (self.mlp(x),)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_model_returning_a_non_tensor_is_named(backend):
    """A model whose forward returns a tuple got "'tuple' object has no attribute 'shape'" from
    the input check; it is a TypeError saying what the model must return."""
    trainer = Reptile(_ReturnsTuple(), backend=backend)
    with pytest.raises(TypeError, match="model must return a tensor .* got tuple"):
        trainer.meta_step(Sine().sample(2))
