"""QA55 (README as a contract): code defects found while checking the README's promises.

`reptile-fast omniglot-runs --threads N` (and `run_omniglot_runs(threads=N)`) takes any N: the
sine and omniglot jobs refuse a thread count beyond the machine's CPUs (`jobs.check_threads`,
whose docstring gives the reason: "far more than the machine has ended in a crash
(--threads 100000: SIGSEGV), not an error"), but `run_omniglot_runs` only checks that N >= 0 and
passes it to `torch.set_num_threads`.  Measured on the review machine (2 CPUs):

    reptile-fast omniglot-runs --runs all_runs.zip --model RUN --threads 100000
    -> Segmentation fault, exit 139, nothing written, no message

The tests below use cpu_count() + 1 (harmless on the current code: it runs, oversubscribed, and
returns 0), so they fail without crashing the test process and pass once the check is added.
Fast: a tiny fake Omniglot (tests/_fake_omniglot.py), a 3-way model trained for 2 meta-steps.
"""
from __future__ import annotations

import os

import pytest

pytest.importorskip("PIL")

from _fake_omniglot import make_folder, make_runs, make_zip  # noqa: E402
from reptile_fast.cli import main  # noqa: E402
from reptile_fast.fewshot_job import run_omniglot_runs  # noqa: E402


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa55")
    train = make_zip(make_folder(root / "a", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1"),
                     root / "small1.zip")
    test = make_folder(root / "b", {"Beta": 2, "Gamma": 3}, prefix="images_background_small2")
    out = root / "run"
    argv = ["omniglot", "--train", str(train), "--test", str(test), "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
            "--eval-batch-size", "2", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "2",
            "--checkpoint-every", "0", "--threads", "1", "--no-progress", "--out", str(out)]
    assert main(argv) == 0
    runs = make_runs(root, n_runs=1, ways=3)
    return {"model": out, "runs": runs, "root": root}


def too_many_threads() -> int:
    return (os.cpu_count() or 1) + 1


def test_omniglot_runs_cli_refuses_more_threads_than_cpus(trained, tmp_path, capsys):
    """As `reptile-fast sine/omniglot --threads N` do: exit 2 with a line naming --threads,
    before any work (no runs_metrics.json)."""
    n = too_many_threads()
    capsys.readouterr()
    rc = main(["omniglot-runs", "--runs", str(trained["runs"]), "--model", str(trained["model"]),
               "--out", str(tmp_path), "--threads", str(n)])
    err = capsys.readouterr().err
    assert rc == 2, f"omniglot-runs --threads {n} on a {os.cpu_count()}-CPU machine ran (exit {rc})"
    assert "threads" in err and str(n) in err, err  # ideally in the flag's words, "--threads N", as sine's
    assert not (tmp_path / "runs_metrics.json").exists()


def test_run_omniglot_runs_refuses_more_threads_than_cpus(trained, tmp_path):
    """The Python entry point, as `OmniglotConfig` / `SineConfig` threads are checked."""
    with pytest.raises(ValueError, match="threads"):
        run_omniglot_runs(trained["runs"], trained["model"], tmp_path, threads=too_many_threads(),
                          log=lambda m: None)


def test_a_model_from_a_bigger_machine_runs_with_this_machines_cpus(trained, tmp_path):
    """The default thread count is the model's run's: one trained with more threads than this
    machine has CPUs is run with this machine's CPUs, and a note says so (not refused: the
    user asked for no thread count here)."""
    import shutil

    import torch

    model = tmp_path / "model"
    shutil.copytree(trained["model"], model)
    saved = torch.load(model / "model.pt", weights_only=True)
    saved["config"]["threads"] = too_many_threads()
    torch.save(saved, model / "model.pt")
    notes = []
    metrics = run_omniglot_runs(trained["runs"], model, tmp_path / "out", log=notes.append)
    assert 0.0 <= metrics["error_rate"] <= 1.0
    cpus = os.cpu_count() or 1
    assert [n for n in notes if f"--threads {too_many_threads()}" in n and f"running with {cpus}" in n], notes


def test_a_samplers_draw_of_the_wrong_types_names_the_sampler():
    """README ("Python API", samplers): another shape of answer is a TypeError naming the sampler.
    A 2-tuple of the wrong types got the trainer's own words ("tasks must be a
    reptile_fast.TaskBatch, got int") without the sampler that made it."""
    from reptile_fast import MLP, Reptile, Sine

    class MySampler:
        def draw(self, first_iteration, m):
            return 3, 4

    trainer = Reptile(MLP(1, 8, 1), backend="reference")
    with pytest.raises(TypeError, match=r"MySampler\.draw\(first_iteration, m\) returned .*TaskBatch"):
        trainer.fit(Sine(), 2, sampler=MySampler(), progress=False)
