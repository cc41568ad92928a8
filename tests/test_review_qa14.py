"""QA14's review of the session's changes: regressions found in them, each checked against what the
code did before (the embedding-id check held every integer input to the *first* nn.Embedding's
range; the GPU check's and sweep's deadlines could be overwritten by the main thread)."""
import json
import threading
import time

import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile, TaskBatch


class UserItem(nn.Module):
    """Two id columns read by two embeddings of different sizes (a recommender's user and item)."""

    def __init__(self):
        super().__init__()
        self.user, self.item = nn.Embedding(4, 8), nn.Embedding(50, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, x):  # x: long [B, 2]
        return self.out(self.user(x[:, 0]) * self.item(x[:, 1]))


class PositionFirst(nn.Module):
    """A position embedding (registered first, fed torch.arange) and a token embedding fed x."""

    def __init__(self):
        super().__init__()
        self.pos, self.tok = nn.Embedding(3, 4), nn.Embedding(20, 4)
        self.out = nn.Linear(12, 1)

    def forward(self, x):  # x: long [B, 3]
        h = self.tok(x) + self.pos(torch.arange(x.shape[1]))
        return self.out(h.flatten(1))


class IdAndFeature(nn.Module):
    """An id column into an embedding and an integer feature (may be negative) used as a number."""

    def __init__(self):
        super().__init__()
        self.emb, self.lin = nn.Embedding(5, 1), nn.Linear(1, 1)

    def forward(self, x):  # x: long [B, 2]
        return self.emb(x[:, 0]) + self.lin(x[:, 1:].float())


def _user_item_ids(T=3, N=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.stack([torch.randint(0, 4, (T, N), generator=g), torch.randint(0, 50, (T, N), generator=g)], -1)


def _adapt(model_fn, x, backend, steps=3, batch=5):
    torch.manual_seed(0)
    tr = Reptile(model_fn(), backend=backend, inner_batch_size=batch, inner_steps=steps)
    y = torch.randn(x.shape[0], x.shape[1], 1, generator=torch.Generator().manual_seed(1))
    plan = torch.stack([torch.randperm(x.shape[1], generator=torch.Generator().manual_seed(i))[:batch]
                        for i in range(x.shape[0] * steps)]).view(x.shape[0], steps, batch)
    return tr.adapt(TaskBatch(x, y), steps=steps, indices=plan)


@pytest.mark.parametrize("model_fn, x", [
    (UserItem, _user_item_ids()),
    (PositionFirst, torch.randint(0, 20, (3, 20, 3), generator=torch.Generator().manual_seed(2))),
    (IdAndFeature, torch.stack([torch.randint(0, 5, (3, 20), generator=torch.Generator().manual_seed(3)),
                                torch.randint(-9, 9, (3, 20), generator=torch.Generator().manual_seed(4))], -1)),
])
def test_valid_ids_of_a_model_with_several_embeddings_or_features_train_on_both_backends(model_fn, x):
    """Each held every integer input to the model's first nn.Embedding (4, 3, 5 rows): item ids,
    token ids and a negative feature were refused though the model takes them."""
    ref, fast = _adapt(model_fn, x, "reference"), _adapt(model_fn, x, "torch")
    assert set(ref.params) == set(fast.params)
    for k in ref.params:
        torch.testing.assert_close(fast.params[k], ref.params[k], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(fast.losses, ref.losses, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_ids_out_of_the_range_of_the_embedding_that_reads_them_are_refused(backend):
    for column, bad, name in ((1, 50, "item"), (0, 4, "user"), (0, -1, "user")):
        x = _user_item_ids()
        x[2, 15, column] = bad  # past the two points the model is probed on
        with pytest.raises(ValueError, match=f"nn.Embedding '{name}'.*has {50 if name == 'item' else 4} rows"):
            _adapt(UserItem, x, backend)
        x = _user_item_ids()
        x[0, 0, column] = bad  # among the probed points: the same words, not torch's IndexError
        with pytest.raises(ValueError, match=f"nn.Embedding '{name}'"):
            _adapt(UserItem, x, backend)


def _fire_and_hold(deadline, lock):
    """Run ``deadline._fire`` on a thread as its timer would, with an exit that (instead of
    ending the process) waits for ``go`` and then lets ``lock`` go (os._exit would free it)."""
    go, exits = threading.Event(), []

    def fake_exit(code):
        exits.append(code)
        go.wait(10)
        try:
            lock.release()
        except RuntimeError:  # the old code took no lock
            pass

    deadline._exit = fake_exit
    t = threading.Thread(target=deadline._fire, daemon=True)
    t.start()
    for _ in range(200):
        if exits:
            break
        time.sleep(0.01)
    return t, go, exits


def _write_is_held_back(write, path, mark):
    """Whether ``write`` (the main thread's next save) waits while the deadline is ending the
    process, leaving the deadline's file (which holds ``mark``) in place."""
    w = threading.Thread(target=write, daemon=True)
    w.start()
    w.join(0.5)
    return w, w.is_alive() and mark in path.read_text()


def test_gpu_check_deadline_files_are_not_replaced_by_the_main_thread(tmp_path, monkeypatch):
    """The main thread of a slow (not hung) stage went on between the deadline's write and its
    exit: its next save replaced results.json with one without the "cut short" mark."""
    pytest.importorskip("triton")
    from bench import gpu_check as GC

    lock = threading.RLock()
    monkeypatch.setattr(GC, "SAVE_LOCK", lock, raising=False)
    results = {"stages": {"timing": {"status": "running", "rows": [{"T": 1}]}}, "seconds": {}}
    deadline = GC.Deadline(60, tmp_path, results, log=lambda *a: None)
    deadline.stage = "timing"
    t, go, exits = _fire_and_hold(deadline, lock)
    assert exits == [3]
    assert json.loads((tmp_path / "results.json").read_text())["stages"]["timing"]["status"] == "cut short"
    w, held = _write_is_held_back(lambda: GC.save(tmp_path, results), tmp_path / "results.json", "cut short")
    go.set()
    t.join(5), w.join(5)
    assert held, "the main thread's save replaced the deadline's results.json before the exit"


def test_gpu_check_deadline_after_the_final_files_leaves_the_run_be(tmp_path, monkeypatch):
    """Timer.cancel does not stop a callback already running: a deadline firing as main wrote its
    last files marked a finished run "cut short" and ended it with exit code 3."""
    pytest.importorskip("triton")
    from bench import gpu_check as GC

    lock = threading.RLock()
    monkeypatch.setattr(GC, "SAVE_LOCK", lock, raising=False)
    deadline = GC.Deadline(60, tmp_path, {"stages": {}, "seconds": {}}, log=lambda *a: None)
    deadline.done = True  # what main sets, holding the lock, after its final save
    t, go, exits = _fire_and_hold(deadline, lock)
    go.set()
    t.join(5)
    assert exits == [] and not (tmp_path / "results.json").exists()


def test_gpu_sweep_deadline_file_is_not_replaced_by_the_main_thread(tmp_path, monkeypatch):
    """The sweep's deadline and main thread wrote the same sweep.json.tmp: interleaved, or the
    main thread's later file without the "cut short" row replacing the deadline's."""
    pytest.importorskip("triton")
    from bench import gpu_sweep as S

    lock = threading.RLock()
    monkeypatch.setattr(S, "_WRITE_LOCK", lock, raising=False)
    results = {"rows": [{"T": 1, "config": {}, "ok": True, "ms": 1.0, "tasks_per_s": 1e3}]}
    deadline = S._Deadline(60, tmp_path, results, log=lambda *a: None)
    deadline.T = 1
    t, go, exits = _fire_and_hold(deadline, lock)
    assert exits == [3]
    w, held = _write_is_held_back(lambda: S._write(tmp_path, results), tmp_path / "sweep.json", "cut short")
    go.set()
    t.join(5), w.join(5)
    assert held, "the main thread's write replaced the deadline's sweep.json before the exit"


def test_numpy_counts_for_backend_task_block_and_seconds_for_the_distributed_timeout():
    """task_block=np.int64(4) was refused as "must be 'auto', None or a positive int, got 4", and
    a numpy integer timeout as "timeout must be seconds (a number)"."""
    import datetime

    import numpy as np

    from reptile_fast.backends.torch_func import TorchBackend
    from reptile_fast.distributed.context import _timeout

    backend = TorchBackend(task_block=np.int64(4))
    assert backend.task_block == 4 and type(backend.task_block) is int
    assert _timeout(np.int64(60)) == datetime.timedelta(seconds=60)
    with pytest.raises(ValueError, match="task_block"):
        TorchBackend(task_block=np.int64(0))


def test_ranks_with_different_clocks_enter_the_same_stop_agreements(monkeypatch):
    """The time-aware stop agreement (distributed_fit): two ranks on threads, one 2.3x slower and with
    another clock origin, resumed at meta-step 7; every rank must enter the same all-reduces at
    the same meta-steps (a rank entering one more would wait in it until the timeout), and a
    signal on one rank stops both after the same meta-step."""
    import types

    from reptile_fast.distributed import training as T
    from reptile_fast.signals import DeferredSignals

    local = threading.local()
    monkeypatch.setattr(T, "time", types.SimpleNamespace(monotonic=lambda: local.clock))
    barrier, slots = threading.Barrier(2, timeout=10), {}

    class Ctx:  # an all-reduce between the two threads (op max), as gloo/NCCL would do it
        is_distributed, device = True, torch.device("cpu")

        def __init__(self, rank):
            self.rank, self.seen = rank, []

        def all_reduce_(self, t, what, op="sum"):
            assert op == "max" and t.dtype == torch.float64 and t.device == self.device
            self.seen.append(what)
            slots[self.rank] = t.clone()
            barrier.wait()
            out = torch.maximum(slots[0], slots[1])
            barrier.wait()
            return t.copy_(out)

    class Loop:
        def __init__(self, start):
            self.iteration, self._stop = start, False

        def stop(self):
            self._stop = True

    results = {}

    def rank(r, seconds_per_step, origin, signal_at):
        local.clock = origin
        signals = DeferredSignals()
        ctx, loop = Ctx(r), Loop(7)
        cb = T._RankCallback(ctx, signals, None, 10, agree=True)
        cb.on_start(loop)
        while loop.iteration < 400 and not loop._stop:
            local.clock += seconds_per_step
            loop.iteration += 1
            if loop.iteration == signal_at:
                signals.received = 15  # SIGTERM, as DeferredSignals records it
            cb.on_chunk_end(loop, read=False)
        results[r] = (ctx.seen, loop.iteration, cb.signum)

    threads = [threading.Thread(target=rank, args=(0, 0.3, 0.0, None)),
               threading.Thread(target=rank, args=(1, 0.7, 1e6, 250))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert set(results) == {0, 1}, "a rank waited in an all-reduce the other never entered"
    assert results[0] == results[1]
    seen, stopped_at, signum = results[0]
    assert 250 <= stopped_at < 257 and signum == 15
    # the slow rank sets the pace: 5 s / 0.7 s per step -> an agreement every 7 meta-steps
    steps = [int(w.rsplit(" ", 1)[1]) for w in seen]
    assert steps[0] == 8 and {b - a for a, b in zip(steps, steps[1:])} == {7}


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_an_outer_optimizer_step_that_overflows_phi_is_a_skipped_meta_step(backend):
    """QA13 guarded the interpolation's new φ (outer_lr=1e300), not an outer optimizer's step: a
    finite pseudo-gradient (|D| ~ 12 here) times an accepted lr of 3e38 made φ inf with no
    NonFiniteError at that meta-step (the next one then failed on the inf φ)."""
    from reptile_fast import NonFiniteError
    from reptile_fast.models import MLP
    from reptile_fast.tasks import Sine

    torch.manual_seed(0)
    model = MLP()
    before = [p.detach().clone() for p in model.parameters()]
    tasks = Sine(amplitude=(1000.0, 1000.0)).sample(1, generator=torch.Generator().manual_seed(0))
    plan = torch.arange(10).view(1, 1, 10)
    tr = Reptile(model, backend=backend, inner_steps=1,
                 outer_optimizer=torch.optim.SGD(model.parameters(), lr=3e38))
    tr.meta_step(tasks, plan)
    with pytest.raises(NonFiniteError) as info:
        tr.check_finite()
    assert info.value.iteration == 1
    for a, b in zip(before, model.parameters()):
        assert torch.equal(a, b)


def test_the_outer_optimizer_guard_leaves_valid_steps_bitwise_unchanged():
    """The guard's select must not change a finite step: φ after 3 meta-steps with Adam equals the
    optimizer's own update computed by hand, bit for bit."""
    from reptile_fast.models import MLP
    from reptile_fast.tasks import Sine

    torch.manual_seed(0)
    model, twin = MLP(), MLP()
    twin.load_state_dict(model.state_dict())
    tr = Reptile(model, backend="torch", inner_steps=2, outer_optimizer=torch.optim.Adam(model.parameters(), lr=1e-2))
    ref = Reptile(twin, backend="torch", inner_steps=2)
    opt = torch.optim.Adam(twin.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        tasks = Sine().sample(4, generator=g)
        plan = torch.stack([torch.randperm(50, generator=g)[:10] for _ in range(8)]).view(4, 2, 10)
        tr.meta_step(tasks, plan)
        res = ref.adapt(tasks, steps=2, indices=plan)
        for n, p in twin.named_parameters():
            p.grad = -(res.params[n] - p.detach()).mean(0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    tr.check_finite()
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)


def test_gpu_check_deadline_counts_from_the_budget_start_not_after_import_torch(tmp_path, monkeypatch):
    """main's budget starts before `import torch`; the deadline's timer started after it with the
    whole budget + grace: on a fresh GPU machine (torch's import takes seconds) the run's end moved
    past the 355 s the README gives, towards the device tool's 360 s limit."""
    pytest.importorskip("triton")
    import os

    from bench import gpu_check as GC

    made = []

    class Recorded(GC.Deadline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, exit_fn=lambda code: None, **kwargs)
            made.append(self)

    class SlowStart(GC.Budget):
        def elapsed(self):  # as if `import torch` had taken 7 s
            return super().elapsed() + 7.0

    monkeypatch.setattr(GC, "Deadline", Recorded)
    monkeypatch.setattr(GC, "Budget", SlowStart)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))  # main sets it
    threads = torch.get_num_threads()
    try:
        assert GC.main(["--cpu-smoke", "--budget", "100", "--stages", "", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    interval = made[0]._timer.interval
    assert 100 + GC.DEADLINE_GRACE - 7.5 < interval <= 100 + GC.DEADLINE_GRACE - 7.0


def test_gpu_sweep_deadline_counts_from_the_budget_start(tmp_path, monkeypatch):
    pytest.importorskip("triton")
    import os

    from bench import gpu_check as GC
    from bench import gpu_sweep as S

    made = []

    class Recorded(S._Deadline):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, exit_fn=lambda code: None, **kwargs)
            made.append(self)

    class SlowStart(GC.Budget):
        def elapsed(self):
            return super().elapsed() + 7.0

    def no_sweep(T, device, width, smoke, budget, log, rows=None, **kw):
        return rows

    monkeypatch.setattr(S, "_Deadline", Recorded)
    monkeypatch.setattr(GC, "Budget", SlowStart)
    monkeypatch.setattr(S, "sweep_T", no_sweep)
    monkeypatch.setenv("TRITON_INTERPRET", os.environ.get("TRITON_INTERPRET", "0"))
    threads = torch.get_num_threads()
    try:
        assert S.main(["--cpu-smoke", "--budget", "50", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    interval = made[0]._timer.interval
    assert 50 + GC.DEADLINE_GRACE - 7.5 < interval <= 50 + GC.DEADLINE_GRACE - 7.0
