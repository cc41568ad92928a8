"""``minibatches="epochs"``: the official supervised-reptile code's inner minibatches (each task's
points shuffled and read in order, reshuffled when used up), beside the seed's fresh draws.

The oracle for the plan is an independent re-statement of the official ``_mini_batches``: a
running batch filled point by point from successive shuffles, emitted when full (so a batch may
straddle two shuffles).  It is fed the same shuffles ``epoch_indices`` makes from its keys.
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from _fake_omniglot import job_data, make_runs
from reptile_fast import MLP, Reptile, Sine, TaskBatch, epoch_indices
from reptile_fast.cli import main
from reptile_fast.distributed.sampler import IndexedSampler
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.fewshot_job import OmniglotConfig
from reptile_fast.tasks import MINIBATCHES, Episodes, draw_plan, sample_indices


def official_batches(shuffles, batch_size: int, num_batches: int):
    """The official code's minibatches, restated: ``shuffles`` yields one shuffled list of the
    task's point indices each time the points run out."""
    batches, current = [], []
    while True:
        for point in next(shuffles):
            current.append(point)
            if len(current) < batch_size:
                continue
            batches.append(current)
            current = []
            if len(batches) == num_batches:
                return batches


@pytest.mark.parametrize("tasks,steps,n,batch", [(3, 5, 50, 10), (2, 4, 7, 3), (4, 50, 25, 5), (1, 3, 5, 5),
                                                 (2, 1, 9, 4), (3, 10, 6, 4)])
def test_epoch_plan_is_the_official_mini_batches(tasks, steps, n, batch):
    plan = epoch_indices(tasks, steps, n, batch, generator=torch.Generator().manual_seed(7))
    assert plan.shape == (tasks, steps, batch) and plan.dtype == torch.long
    # the shuffles the plan is made of: argsorts of the float64 uniforms drawn from the generator
    epochs = -(-steps * batch // n)
    keys = torch.rand(tasks, epochs, n, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    for t in range(tasks):
        shuffles = iter(keys[t].argsort(dim=-1).tolist())
        assert plan[t].tolist() == official_batches(shuffles, batch, steps), f"task {t}"


def test_every_point_is_used_once_per_epoch():
    # 5-way 10-shot training, 5 steps of 10: each of the 50 images exactly once per inner loop
    plan = epoch_indices(64, 5, 50, 10, generator=torch.Generator().manual_seed(0))
    assert torch.equal(plan.flatten(1).sort(dim=1).values, torch.arange(50).expand(64, -1))
    # fresh draws leave some images unseen (what the option exists to change)
    fresh = sample_indices(64, 5, 50, 10, generator=torch.Generator().manual_seed(0))
    assert not torch.equal(fresh.flatten(1).sort(dim=1).values, torch.arange(50).expand(64, -1))
    # 5-way 5-shot evaluation, 50 steps of 5 on 25 support images: each used exactly 10 times
    counts = torch.stack([torch.bincount(p.flatten(), minlength=25)
                          for p in epoch_indices(8, 50, 25, 5, generator=torch.Generator().manual_seed(1))])
    assert torch.equal(counts, torch.full((8, 25), 10))


def test_shuffles_are_uniform():
    # each position of a shuffle takes each point with probability 1/n: counts within 5 standard
    # deviations of their mean (a fixed seed: the check is deterministic)
    n, rows = 5, 20000
    plan = epoch_indices(rows, 1, n, n, generator=torch.Generator().manual_seed(3))[:, 0]
    counts = torch.stack([torch.bincount(plan[:, j], minlength=n) for j in range(n)]).double()
    mean, sd = rows / n, (rows * (1 / n) * (1 - 1 / n)) ** 0.5
    assert (counts - mean).abs().max() < 5 * sd, counts


def test_plan_functions_check_their_arguments():
    with pytest.raises(ValueError, match="batch_size .6. must not exceed n_points .5."):
        epoch_indices(1, 2, 5, 6)
    with pytest.raises(ValueError, match="inner_steps"):
        epoch_indices(1, 0, 5, 2)
    with pytest.raises(ValueError, match="minibatches must be one of 'fresh', 'epochs', got 'epoch'"):
        draw_plan("epoch", 1, 1, 5, 2)
    with pytest.raises(TypeError, match="minibatches must be one of"):
        draw_plan(None, 1, 1, 5, 2)
    assert MINIBATCHES == ("fresh", "epochs")
    g1, g2 = torch.Generator().manual_seed(4), torch.Generator().manual_seed(4)
    assert torch.equal(draw_plan("fresh", 3, 2, 9, 4, generator=g1), sample_indices(3, 2, 9, 4, generator=g2))


def _fit(backend: str, minibatches: str, iterations: int = 12):
    torch.manual_seed(1)
    model = MLP(1, 32, 1)
    trainer = Reptile(model, backend=backend, minibatches=minibatches)
    trainer.fit(Sine(), iterations, meta_batch_size=3, generator=torch.Generator().manual_seed(0),
                progress=False)
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _by_hand(minibatches: str, iterations: int = 12):
    """The same run as ``_fit``: each meta-step's tasks then plan from one generator, on reference."""
    torch.manual_seed(1)
    model = MLP(1, 32, 1)
    trainer = Reptile(model, backend="reference")
    g = torch.Generator().manual_seed(0)
    for _ in range(iterations):
        tasks = Sine().sample(3, generator=g)
        trainer.meta_step(tasks, draw_plan(minibatches, 3, 5, tasks.n_points, 10, generator=g))
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("backend", ["reference", "torch", "compiled"])
def test_fit_trains_on_epoch_plans_on_every_backend(backend):
    by_hand = _by_hand("epochs")
    got = _fit(backend, "epochs")
    # reference: the same operations on the same plans, bitwise; the batched backends round
    # differently (fp32 sums in another order): float32's default tolerance
    if backend == "reference":
        assert torch.equal(got, by_hand)
    else:
        torch.testing.assert_close(got, by_hand)
    # the control: fresh plans train another model, far outside that tolerance
    assert (_by_hand("fresh") - by_hand).abs().max() > 1e-3


def test_meta_step_adapt_and_evaluate_draw_as_the_trainer_says():
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(5))
    seen = []
    for minibatches in MINIBATCHES:
        torch.manual_seed(0)
        trainer = Reptile(MLP(1, 16, 1), backend="torch", minibatches=minibatches)
        spy = trainer._inner
        trainer._inner = lambda kind, model, t, indices, config: seen.append(indices) or spy(kind, model, t, indices,
                                                                                             config)
        trainer.adapt(tasks, 5, generator=torch.Generator().manual_seed(9))
    assert torch.equal(seen[0], sample_indices(2, 5, 50, 10, generator=torch.Generator().manual_seed(9)))
    assert torch.equal(seen[1], epoch_indices(2, 5, 50, 10, generator=torch.Generator().manual_seed(9)))


def test_the_setting_is_checked_kept_and_refused_while_fitting():
    model = MLP(1, 8, 1)
    with pytest.raises(ValueError, match="minibatches must be one of"):
        Reptile(model, minibatches="official")
    with pytest.raises(TypeError, match="minibatches must be one of"):
        Reptile(model, minibatches=True)
    trainer = Reptile(model, backend="torch")
    assert trainer.minibatches == "fresh" and trainer.hparams()["minibatches"] == "fresh"
    trainer.minibatches = "epochs"
    assert trainer.hparams()["minibatches"] == "epochs"

    def change(iteration, metrics):
        trainer.minibatches = "fresh"

    with pytest.raises(ValueError, match="minibatches cannot change while fit runs"):
        trainer.fit(Sine(), 2, meta_batch_size=1, callback=change, progress=False)


def test_resuming_with_other_minibatches_warns():
    trainer = Reptile(MLP(1, 8, 1), backend="torch", minibatches="epochs")
    state = trainer.state_dict()
    other = Reptile(MLP(1, 8, 1), backend="torch")
    with pytest.warns(UserWarning, match="minibatches: saved 'epochs', now 'fresh'"):
        other.load_state_dict(state)
    # a checkpoint from before the setting existed drew its plans fresh
    old = dict(state, config={k: v for k, v in state["config"].items() if k != "minibatches"})
    with pytest.warns(UserWarning, match="minibatches: saved 'fresh', now 'epochs'"):
        Reptile(MLP(1, 8, 1), backend="torch", minibatches="epochs").load_state_dict(old)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        other.load_state_dict(dict(old, config=dict(old["config"])))


def test_indexed_sampler_draws_epoch_plans():
    common = dict(seed=3, plan_rows=5, batch_size=10, block_size=2)
    whole = IndexedSampler(Sine(), 5, minibatches="epochs", **common).draw_step(4)[1]
    assert torch.equal(whole.flatten(1).sort(dim=1).values, torch.arange(50).expand(5, -1))
    # ranks draw what one process draws
    halves = [IndexedSampler(Sine(), 5, minibatches="epochs", rank=r, world_size=2, **common).draw_step(4)[1]
              for r in range(2)]
    assert torch.equal(torch.cat(halves), whole)
    with pytest.raises(ValueError, match="minibatches must be one of"):
        IndexedSampler(Sine(), 5, minibatches="cycle", **common)


def _episodes(n_tasks: int = 3, ways: int = 3, shots: int = 4):
    g = torch.Generator().manual_seed(0)
    ys = torch.arange(ways).repeat_interleave(shots).expand(n_tasks, -1).contiguous()
    yq = torch.arange(ways).expand(n_tasks, -1).contiguous()
    return Episodes(TaskBatch(torch.rand(n_tasks, ways * shots, 4, generator=g), ys),
                    TaskBatch(torch.rand(n_tasks, ways, 4, generator=g), yq), ways)


def test_evaluate_episodes_follows_the_trainer_or_its_argument():
    episodes = _episodes()
    trainer = Reptile(torch.nn.Sequential(torch.nn.Linear(4, 3)), inner_lr=0.1, inner_batch_size=3,
                      loss="cross_entropy", backend="torch", minibatches="epochs")
    plans = []
    adapt = trainer.adapt
    trainer.adapt = lambda tasks, steps, indices: plans.append(indices) or adapt(tasks, steps, indices)
    a = evaluate_episodes(trainer, episodes, steps=8, batch_size=3, generator=torch.Generator().manual_seed(2))
    b = evaluate_episodes(trainer, episodes, steps=8, batch_size=3, generator=torch.Generator().manual_seed(2),
                          minibatches="fresh")
    # 8 steps of 3 on 12 support images: each used exactly twice
    assert torch.equal(plans[0].flatten(1).sort(dim=1).values, torch.arange(12).repeat_interleave(2).expand(3, -1))
    assert torch.equal(plans[0], epoch_indices(3, 8, 12, 3, generator=torch.Generator().manual_seed(2)))
    assert torch.equal(plans[1], sample_indices(3, 8, 12, 3, generator=torch.Generator().manual_seed(2)))
    assert a.predictions.shape == b.predictions.shape == (3, 3)
    with pytest.raises(ValueError, match="minibatches must be one of"):
        evaluate_episodes(trainer, episodes, steps=2, batch_size=3, minibatches="Epochs")


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("minibatches_job"))


def test_omniglot_job_takes_epoch_minibatches(data, tmp_path, capsys, monkeypatch):
    import reptile_fast.fewshot_job as job

    drawn = []  # the kind of every plan the job draws (training, then the test)
    real = job.Reptile

    class Spied(real):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            drawn.append(self.minibatches)

    monkeypatch.setattr(job, "Reptile", Spied)
    base = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "2",
            "--threads", "1", "--no-progress"]
    # the job's default is the official code's, and the flag chooses the other
    for flag, expected in (([], "epochs"), (["--minibatches", "fresh"], "fresh"), (["--minibatches", "epochs"],
                                                                                   "epochs")):
        out = tmp_path / f"run-{expected}-{len(flag)}"
        drawn.clear()
        assert main(base + flag + ["--out", str(out)]) == 0
        assert drawn == [expected], flag
        assert json.loads((out / "config.json").read_text())["minibatches"] == expected
        ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
        assert ckpt["trainer"]["config"]["minibatches"] == expected
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    model = tmp_path / "run-fresh-2"
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(model), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "runs_metrics.json").read_text())["minibatches"] == "fresh"
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(model), "--out", str(tmp_path),
                 "--minibatches", "epochs"]) == 0
    assert json.loads((tmp_path / "runs_metrics.json").read_text())["minibatches"] == "epochs"
    args = base + ["--out", str(tmp_path / "x")]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main(args[:-2] + ["--minibatches", "cycle", "--out", str(tmp_path / "x")])
    assert exc.value.code == 2 and "invalid choice: 'cycle'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="minibatches must be one of"):
        OmniglotConfig(train=[data["train"]], test=data["test"], minibatches="cycle")


def test_runs_saved_before_the_setting_existed_keep_fresh_minibatches(data, tmp_path, capsys):
    """A checkpoint or model.pt written before --minibatches existed has no such key: its run drew
    fresh minibatches, so a resume and omniglot-runs keep drawing them, whatever the default."""
    out = tmp_path / "old"
    args = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "2",
            "--checkpoint-every", "1", "--threads", "1", "--no-progress", "--minibatches", "fresh",
            "--out", str(out)]
    assert main(args) == 0
    for name in ("checkpoint.prev.pt", "model.pt"):  # as the old code wrote them
        saved = torch.load(out / name, weights_only=True)
        config = saved["extra"]["job_config"] if name != "model.pt" else saved["config"]
        del config["minibatches"]
        if name != "model.pt":
            del saved["trainer"]["config"]["minibatches"]
        torch.save(saved, out / name)
    resumed = tmp_path / "resumed"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "resuming with different hyper-parameters"
        assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--out", str(resumed),
                     "--no-progress"]) == 0
    assert json.loads((resumed / "config.json").read_text())["minibatches"] == "fresh"
    capsys.readouterr()
    assert main(["omniglot", "--resume", str(out / "checkpoint.prev.pt"), "--out", str(tmp_path / "r2"),
                 "--no-progress", "--minibatches", "epochs"]) == 0
    err = capsys.readouterr().err
    assert "note: --minibatches epochs overrides the checkpoint's 'fresh'" in err
    # the library's warning, printed by the command line as a note (session 22)
    assert "note: resuming with different hyper-parameters (minibatches: saved 'fresh', now 'epochs')" in err
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "runs_metrics.json").read_text())["minibatches"] == "fresh"
