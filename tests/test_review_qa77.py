"""QA77 (session 26): the README read top to bottom by a newcomer and tried on the CPU."""
import pytest

TINY = ["--iterations", "2", "--hidden-dim", "8", "--eval-tasks", "2", "--eval-steps", "2",
        "--threads", "1", "--no-progress"]


def test_sine_meta_batch_beyond_memory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    """``reptile-fast sine --meta-batch-size 100000000`` on a 23 GiB machine: each of the draws'
    x and y (20 GB) fits in RAM, so Linux handed them out lazily and the kernel's out-of-memory
    killer ended the job while drawing (exit 137, no message), where the README promises exit 2
    and one line naming the flags.  The draws' lower bound is now checked before training, as the
    evaluation's is (QA46)."""
    from reptile_fast import jobs
    from reptile_fast.cli import main

    # 10 MiB "free": 100000 tasks' x, y and plans need 80 MB; the evaluation (2 tasks) fits
    monkeypatch.setattr(jobs, "available_memory", lambda: 10 << 20)
    out = tmp_path / "r"
    assert main(["sine", *TINY, "--meta-batch-size", "100000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--meta-batch-size 100000" in err
    assert not out.exists()  # refused before any training or output
    assert main(["sine", *TINY, "--meta-batch-size", "3", "--out", str(out)]) == 0  # what fits still runs


def test_sine_memory_check_counts_this_process_share_of_the_meta_batch(monkeypatch):
    """Under torchrun each process draws its share of the meta-batch: the bound is per share."""
    import torch
    from reptile_fast import jobs

    monkeypatch.setattr(jobs, "available_memory", lambda: 10 << 20)
    config = jobs.SineConfig(meta_batch_size=100000, eval_tasks=2)
    with pytest.raises(MemoryError, match="draws"):
        jobs.check_sine_memory(config, torch.device("cpu"))
    jobs.check_sine_memory(config, torch.device("cpu"), world_size=16)  # 6250 tasks: 5 MB
