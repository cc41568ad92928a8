"""QA16 review: defects found in the Triton-kernel, benchmark, few-shot, distributed and test-gate
areas, each with a test that failed on the code before its fix.

1. ``MeanReducer`` (``distributed_fit``'s default reduction) kept its per-rank sums in the model's
   dtype: for a float16 model the loss sum of a few tasks overflowed (Σ loss = inf, and the count
   of losses itself overflows above 65504), so the mean loss was NaN and every rank raised
   ``NonFiniteError`` where one process trains; bfloat16 cannot hold every task count (257 → 256),
   so the mean was divided by the wrong number of tasks.
2. ``bench.omniglot_meta_step_speed`` checked one inner SGD step and then timed the paper's inner
   Adam unchecked: a backend returning φ, or at half the learning rate, was timed.
3. ``reptile-fast omniglot --resume DIR --shots 1`` after a ``--shots 2`` run refused the
   checkpoint's evaluation batch size, which a new run caps at the support set.
"""
from __future__ import annotations

import multiprocessing
import os
import socket
from pathlib import Path

import pytest
import torch

WORLD = 2


# ------------------------------------------------------------------------- distributed helpers
class BigTargets:
    """Tasks whose targets are ~200: one task's MSE (~4e4) fits float16, a sum of two does not."""

    def __init__(self, dtype):
        self.dtype = dtype

    def sample(self, n, *, generator=None, device=None):
        from reptile_fast import TaskBatch

        x = torch.rand(n, 10, 1, generator=generator) * 2 - 1
        return TaskBatch(x.to(self.dtype), (200 + 3 * x).to(self.dtype))


def _half_trainer():
    from reptile_fast import MLP, Reptile

    torch.manual_seed(0)
    model = MLP(1, 8, 1).to(torch.float16)
    return Reptile(model, inner_steps=2, inner_batch_size=5, inner_lr=1e-6, outer_lr=0.5, backend="torch")


def _reducer_inputs(rank: int):
    """This rank's share of three reductions (see ``test_mean_reducer_sums_low_precision_in_float32``)."""
    # float16: 2 tasks per rank, losses 40000 each (their sum overflows float16)
    d16 = [torch.tensor([[0.5, -1.0, 2.0], [0.25, 1.0, -2.0]], dtype=torch.float16) * (rank + 1)]
    l16 = torch.full((2, 3), 40000.0, dtype=torch.float16)
    # float16: 4 tasks × 20000 steps per rank (the count of losses, 80000, overflows float16)
    lsteps = torch.ones(4, 20000, dtype=torch.float16)
    dsteps = [torch.zeros(4, 2, dtype=torch.float16)]
    # bfloat16: 257 tasks per rank (bfloat16 holds 256 or 258, not 257); one task's update is 256
    dbf = torch.zeros(257, 1, dtype=torch.bfloat16)
    dbf[0] = 256.0
    lbf = torch.ones(257, 1, dtype=torch.bfloat16)
    return [("float16 loss sum", d16, l16), ("float16 loss count", dsteps, lsteps),
            ("bfloat16 task count", [dbf], lbf)]


def _rank_main(rank: int, port: int, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(WORLD))
    torch.set_num_threads(1)
    from reptile_fast.distributed import MeanReducer, distributed_fit, setup_from_env

    ctx = setup_from_env(device="cpu", timeout=60)
    result = {}
    try:
        reducer = MeanReducer(ctx)
        result["reducer"] = {name: reducer(d, l) for name, d, l in _reducer_inputs(rank)}
        trainer = _half_trainer()
        try:
            history = distributed_fit(trainer, BigTargets(torch.float16), 2, meta_batch_size=4, seed=1,
                                      context=ctx, progress=False, log_every=1)
            result["fit"] = ([p.detach().clone() for p in trainer.model.parameters()], history["loss"])
        except Exception as exc:  # noqa: BLE001 - reported to the test
            result["fit"] = f"{type(exc).__name__}: {exc}"
    finally:
        torch.save(result, Path(out) / f"rank{rank}.pt")
        ctx.close()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Two gloo processes over loopback; each saves what it computed."""
    out = tmp_path_factory.mktemp("qa16_dist")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp = multiprocessing.get_context("spawn")
    procs = [mp.Process(target=_rank_main, args=(r, port, str(out))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(180)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------------- 1. low-precision sums
def test_mean_reducer_sums_low_precision_in_float32(two_ranks):
    """The two ranks' reduction equals one process's ``local_mean`` over all tasks, bitwise, for
    float16 and bfloat16 updates (before: NaN loss for float16, a 1.0 instead of 512/514 for
    bfloat16)."""
    from reptile_fast.distributed import local_mean

    shares = [_reducer_inputs(r) for r in range(WORLD)]
    for i, (name, _, _) in enumerate(shares[0]):
        deltas = [torch.cat([s[i][1][k] for s in shares]) for k in range(len(shares[0][i][1]))]
        losses = torch.cat([s[i][2] for s in shares])
        want_d, want_l = local_mean(deltas, losses)
        for rank, res in enumerate(two_ranks):
            got_d, got_l = res["reducer"][name]
            assert torch.isfinite(got_l), f"{name}, rank {rank}: mean loss {got_l}"
            assert got_l.dtype == want_l.dtype and torch.equal(got_l, want_l), (name, rank, got_l, want_l)
            for g, w in zip(got_d, want_d):
                assert g.dtype == w.dtype and torch.equal(g, w), (name, rank, g, w)


def test_float16_model_trains_across_ranks_as_in_one_process(two_ranks):
    """distributed_fit of a float16 MLP on 2 ranks: no NonFiniteError, φ identical on both ranks
    and equal to one process (before: NonFiniteError at meta-step 1 on every rank)."""
    from reptile_fast.distributed import distributed_fit

    trainer = _half_trainer()
    history = distributed_fit(trainer, BigTargets(torch.float16), 2, meta_batch_size=4, seed=1, progress=False,
                              log_every=1)
    assert all(torch.isfinite(torch.tensor(history["loss"])))
    for rank, res in enumerate(two_ranks):
        assert not isinstance(res["fit"], str), f"rank {rank}: {res['fit']}"
        params, losses = res["fit"]
        for got, want in zip(params, trainer.model.parameters()):
            torch.testing.assert_close(got, want.detach(), rtol=1e-3, atol=1e-3)
        torch.testing.assert_close(torch.tensor(losses), torch.tensor(history["loss"]), rtol=1e-3, atol=0)
    for a, b in zip(two_ranks[0]["fit"][0], two_ranks[1]["fit"][0]):
        assert torch.equal(a, b)  # φ bitwise identical on every rank


# ------------------------------------------------------------------------- 2. the omniglot bench's gate
def _tiny_pair(lr_torch: float = 1e-3):
    from reptile_fast import OmniglotConvNet, Reptile

    trainers = {}
    for backend, lr in (("reference", 1e-3), ("torch", lr_torch)):
        torch.manual_seed(0)
        trainers[backend] = Reptile(OmniglotConvNet(3, channels=4, image_size=8, n_blocks=2), inner_lr=lr,
                                    inner_steps=3, inner_batch_size=4, loss="cross_entropy",
                                    inner_optimizer="adam", backend=backend)
    g = torch.Generator().manual_seed(2)
    from reptile_fast import TaskBatch
    from reptile_fast.tasks import sample_indices

    tasks = TaskBatch(torch.rand(3, 12, 1, 8, 8, generator=g), torch.arange(3).repeat_interleave(4).expand(3, -1).contiguous())
    return trainers, tasks, sample_indices(3, 3, 12, 4, generator=g)


def test_omniglot_speed_bench_checks_the_timed_adam_setting():
    """bench.omniglot_meta_step_speed timed the paper's inner Adam after checking only one inner
    SGD step: a torch backend whose Adam was wrong (half the learning rate) would have been timed.
    ``check_timed`` compares the timed configuration on every task with a float64 run."""
    from bench.omniglot_meta_step_speed import ADAM_GATE, check_timed

    trainers, tasks, plan = _tiny_pair()
    errors = check_timed(trainers, tasks, plan)
    assert errors["torch_vs_float64"] <= ADAM_GATE
    trainers, tasks, plan = _tiny_pair(lr_torch=5e-4)
    with pytest.raises(RuntimeError, match="not timed"):
        check_timed(trainers, tasks, plan)


def test_omniglot_speed_bench_refuses_a_backend_returning_phi(monkeypatch, tmp_path):
    """The bench's own run (5-way, meta-batch 1): a torch backend whose inner Adam returns φ is
    refused before any timing and nothing is written (before: timed and written)."""
    import sys

    import bench.omniglot_meta_step_speed as bench

    real_make = bench.make

    def make(ways, backend, optimizer="adam"):
        trainer = real_make(ways, backend, optimizer)
        if backend == "torch" and optimizer == "adam":
            real = trainer.backend.inner_loop

            def returns_phi(model, tasks, indices, config):
                out = real(model, tasks, indices, config)
                T = tasks.n_tasks
                out.params.update({n: p.detach().expand(T, *p.shape).clone() for n, p in model.named_parameters()})
                return out
            trainer.backend.inner_loop = returns_phi
        return trainer

    monkeypatch.setattr(bench, "make", make)
    out = tmp_path / "speed.json"
    monkeypatch.setattr(sys, "argv", ["omniglot_meta_step_speed", "--ways", "5", "--meta-batches", "1",
                                      "--repeats", "1", "--out", str(out)])
    with pytest.raises(RuntimeError, match="not timed"):
        bench.main()
    assert not out.exists()


# ------------------------------------------------------------------------- 3. omniglot --resume --shots
def test_omniglot_resume_with_fewer_shots_caps_the_stored_evaluation_batch(tmp_path, capsys):
    """A run made with --shots 2 (evaluation batch 5 of the 3 × 2 support images), resumed with
    --shots 1: a new run with --shots 1 caps the preset's evaluation batch at the 3 support images;
    the resume refused ("eval_batch_size 5 exceeds the support set of 3 × 1 images") although no
    batch size was given.  Training is unchanged by it (evaluation only)."""
    import json
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from _fake_omniglot import make_folder

    from reptile_fast.cli import main

    train = make_folder(tmp_path, {"Alpha": 3, "Beta": 2}, prefix="train")
    test = make_folder(tmp_path, {"Beta": 2, "Gamma": 3}, prefix="test")
    out = tmp_path / "run"
    common = ["--no-progress"]
    assert main(["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "2",
                 "--train-shots", "3", "--iterations", "2", "--checkpoint-every", "1", "--eval-tasks", "2",
                 "--eval-steps", "1", "--validate-every", "0", "--out", str(out), *common]) == 0
    assert json.loads((out / "config.json").read_text())["eval_batch_size"] == 5
    capsys.readouterr()
    assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--shots", "1", *common]) == 0, \
        capsys.readouterr().err
    config = json.loads((out / "config.json").read_text())
    assert config["shots"] == [1] and config["eval_batch_size"] == 3
    assert json.loads((out / "metrics.json").read_text())["results"][0]["shots"] == 1
    # a batch size given as a flag is still checked as given
    assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--shots", "1", "--eval-batch-size", "4",
                 *common]) == 2
    assert "--eval-batch-size 4 exceeds the support set of 3 × 1 images" in capsys.readouterr().err
