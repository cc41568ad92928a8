"""Review of the CLI jobs: odd flag values end in a clear error before any work, not a crash."""
import os

import pytest

from reptile_fast.cli import main


@pytest.mark.parametrize("command", ["sine", "omniglot"])
def test_more_threads_than_cpus_is_an_error_not_a_crash(tmp_path, capsys, command, monkeypatch):
    """--threads 100000 made torch start 100000 OpenMP threads: the process died with SIGSEGV.
    Now any count above the machine's CPUs is refused (exit 2) before training."""
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    extra = ([] if command == "sine" else
             ["--train", str(tmp_path / "missing.zip"), "--test", str(tmp_path / "missing2.zip")])
    rc = main([command, "--iterations", "2", "--threads", "3", "--out", str(tmp_path / "run"), "--no-progress",
               *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert "threads" in err and "3" in err and "2 CPUs" in err
    assert not (tmp_path / "run" / "checkpoint.pt").exists()


@pytest.mark.parametrize("flags, inner_batch, eval_batch", [
    (["--ways", "3"], 10, 3),                        # 3-way 1-shot: a support set of 3 images
    (["--ways", "2", "--shots", "1", "5"], 10, 2),   # the smallest K's support set
    (["--ways", "5", "--train-shots", "1"], 5, 5),   # training tasks of 5 images
    (["--ways", "4", "--shots", "5"], 10, 5),        # the preset fits: unchanged
    (["--ways", "20"], 20, 10),
])
def test_omniglot_presets_fit_fewer_ways_or_shots(flags, inner_batch, eval_batch):
    """`reptile-fast omniglot --ways 3` stopped with "eval_batch_size 5 exceeds the support set of
    3 × 1 images", naming a flag that was never given: the preset's batch sizes are now capped at
    what a task holds (what the evaluation did with them anyway); a flag given is checked as given."""
    from reptile_fast.cli import build_parser
    from reptile_fast.fewshot_job import config_from_args

    config, _, _ = config_from_args(build_parser().parse_args(["omniglot", "--train", "x", "--test", "y", *flags]))
    assert (config.inner_batch_size, config.eval_batch_size) == (inner_batch, eval_batch)
    with pytest.raises(ValueError, match="eval_batch_size 4 exceeds"):
        config_from_args(build_parser().parse_args(["omniglot", "--train", "x", "--test", "y", *flags,
                                                    "--shots", "1", "--ways", "3", "--eval-batch-size", "4"]))


def test_extending_a_chunk_drawn_run_warns_that_it_differs(tmp_path):
    """fit(draw_chunks=True) draws a chunk's tasks at once (chunks end at multiples of
    checkpoint_every and at the total), so a run of 4 extended to 9 from its checkpoint trains on
    other draws than 9 at once: a warning says so.  A checkpoint on a chunk boundary resumes
    exactly, without one."""
    import warnings

    import torch

    from reptile_fast import MLP, Reptile, Sine

    def run(total, ckpt, every=None, resume=None):
        torch.manual_seed(0)
        t = Reptile(MLP(1, 8, 1), backend="compiled")
        t.fit(Sine(), total, generator=torch.Generator().manual_seed(1), progress=False, draw_chunks=True,
              checkpoint_dir=ckpt, checkpoint_every=every, resume_from=resume)
        return torch.cat([p.detach().reshape(-1) for p in t.model.parameters()])

    run(4, tmp_path / "a")
    with pytest.warns(UserWarning, match="differ from an uninterrupted run"):
        extended = run(9, tmp_path / "a", resume=tmp_path / "a")
    assert not torch.equal(extended, run(9, tmp_path / "b"))  # what the warning is about
    run(4, tmp_path / "c", every=2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        extended = run(8, tmp_path / "c", every=2, resume=tmp_path / "c")
    assert torch.equal(extended, run(8, tmp_path / "d", every=2))


def test_the_sine_job_is_exact_across_resume_and_checkpoint_intervals(tmp_path):
    """The sine job draws every meta-step as every backend does (on the CPU): its model does not
    depend on --checkpoint-every, extending a finished run with --resume equals running the total
    at once, and backend reference trains the same model within fp32 rounding."""
    import warnings

    import torch

    args = ["--eval-tasks", "1", "--eval-steps", "1", "--no-progress"]

    def model(name):
        return torch.load(tmp_path / name / "model.pt", weights_only=True)["state_dict"]

    assert main(["sine", "--iterations", "9", "--out", str(tmp_path / "a"), *args]) == 0
    assert main(["sine", "--iterations", "9", "--checkpoint-every", "2", "--out", str(tmp_path / "b"), *args]) == 0
    assert main(["sine", "--iterations", "4", "--out", str(tmp_path / "c"), *args]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        assert main(["sine", "--resume", str(tmp_path / "c"), "--iterations", "9", "--no-progress"]) == 0
    assert main(["sine", "--iterations", "9", "--backend", "reference", "--out", str(tmp_path / "r"), *args]) == 0
    a = model("a")
    for other in ("b", "c"):
        assert all(torch.equal(a[k], model(other)[k]) for k in a), other
    r = model("r")
    for k in a:
        torch.testing.assert_close(a[k], r[k], rtol=1e-5, atol=1e-6)


def test_resuming_another_jobs_checkpoint_names_that_job():
    from reptile_fast.jobs import sine_config_from_checkpoint

    with pytest.raises(ValueError, match="reptile-fast omniglot --resume"):
        sine_config_from_checkpoint({"extra": {"job": "omniglot", "job_config": {"ways": 5}}}, source="run/x")
    with pytest.raises(ValueError, match=r"Reptile.fit\(\.\.\., resume_from"):
        sine_config_from_checkpoint({"extra": {}}, source="run/x")


def test_a_meta_batch_beyond_memory_is_an_error_not_a_traceback(tmp_path, capsys):
    """``--meta-batch-size 10000000000000`` ended in the allocator's RuntimeError, wrapped by the
    compiled path's fallback; the CLI now names the flag and exits 2.  (4 PB is past any
    machine's address space, so the allocation fails at once everywhere.)"""
    code = main(["sine", "--out", str(tmp_path / "run"), "--meta-batch-size", "10000000000000",
                 "--iterations", "2", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2
    assert "out of memory" in err and "--meta-batch-size 10000000000000" in err and "Traceback" not in err


def test_out_of_memory_message_reads_the_whole_chain():
    from reptile_fast.validation import out_of_memory_message

    try:
        try:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 4096 bytes")
        except RuntimeError as inner:
            raise RuntimeError("no meta-step mode could run") from inner
    except RuntimeError as exc:
        assert out_of_memory_message(exc, "lower it") == "out of memory (tried to allocate 4096 bytes): lower it"
    assert out_of_memory_message(MemoryError(), "lower it") == "out of memory: lower it"
    assert out_of_memory_message(RuntimeError("shape mismatch"), "lower it") is None


def test_cross_setting_errors_name_the_flags(tmp_path, capsys):
    """An error about two settings together came in the library's words ("inner_batch_size 60
    exceeds ..."); the CLI now names the flag the user typed."""
    with pytest.raises(SystemExit) as info:  # (argparse's error: exit status 2)
        main(["sine", "--inner-batch-size", "60", "--iterations", "2", "--out", str(tmp_path / "run"),
              "--no-progress"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--inner-batch-size 60 exceeds the 50 points" in err and "inner_batch_size" not in err


def test_as_flags_changes_setting_names_only():
    from reptile_fast.validation import as_flags

    names = ["iterations", "outer_lr", "outer_lr_final", "shots", "inner_batch_size"]
    assert as_flags("beyond iterations=3; outer_lr_final and outer_lr; shots: give K; my_inner_batch_size; "
                    "--inner-batch-size 4", names) == (
        "beyond --iterations 3; --outer-lr-final and --outer-lr; shots: give K; my_inner_batch_size; "
        "--inner-batch-size 4")


def test_a_resume_that_changes_the_run_says_so_in_notes_not_python_warnings(tmp_path, capsys):
    """A resume whose flags make it differ from an uninterrupted run (another --meta-batch-size):
    the job's own note, then the library's warning printed as a note -- not a Python
    ``UserWarning`` with its file and line (the known nit of sessions 20-21).  torch's own
    warnings keep Python's format (only the library's become notes)."""
    import warnings

    args = ["--eval-tasks", "1", "--eval-steps", "1", "--no-progress"]
    assert main(["sine", "--iterations", "2", "--out", str(tmp_path / "a"), *args]) == 0
    capsys.readouterr()
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        assert main(["sine", "--resume", str(tmp_path / "a"), "--iterations", "3", "--meta-batch-size", "2",
                     "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert "note: the checkpoint's run drew 1 tasks per meta-step, this fit 2" in err, err
    assert "UserWarning" not in err


def test_other_warnings_during_a_job_keep_pythons_format(monkeypatch, capsys):
    """The notes are for the library's warnings only: another module's warning (here one raised from
    a stand-in 'torch' file) goes to Python's own display; rank > 0 prints no note."""
    import warnings

    from reptile_fast import jobs

    shown = []
    monkeypatch.setattr(warnings, "showwarning", lambda *a, **k: shown.append(a))
    for is_main in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            with jobs.library_warnings_as_notes(is_main):
                warnings.warn_explicit("from elsewhere", UserWarning, "/x/torch/nn/modules/module.py", 1)
                warnings.warn_explicit("from the library", UserWarning, jobs.__file__, 1)
        assert capsys.readouterr().err == ("note: from the library\n" if is_main else "")
    assert [str(a[0]) for a in shown] == ["from elsewhere"] * 2


def test_python_callers_of_the_jobs_keep_the_librarys_warnings(tmp_path):
    """``run_sine`` from Python (not the command line) keeps warnings as warnings: recorded by
    ``catch_warnings(record=True)`` / ``pytest.warns`` (QA52: a first version printed them as
    notes inside the job itself, where no Python caller could catch them)."""
    import pytest as _pytest

    from reptile_fast.jobs import SineConfig, run_sine

    small = dict(eval_tasks=1, eval_steps=1)
    run_sine(SineConfig(iterations=2, **small), tmp_path, progress=False)
    with _pytest.warns(UserWarning, match="drew 1 tasks per meta-step, this fit 2"):
        run_sine(SineConfig(iterations=3, meta_batch_size=2, **small), tmp_path, progress=False, resume=tmp_path)
