"""Review items taken from earlier rounds (QA68, QA69, QA72, QA73) in session 26.

1. ``Episodes`` whose query set holds a class its task's support set lacks was accepted: that query
   point is scored against a class the learner never adapted on, and the accuracy came out lower
   with nothing said (QA69).
2. A TorchScript loss's settings were not recorded in ``hparams()["loss_settings"]`` (QA73): a
   resume with another scripted Huber δ warned of nothing.
3. ``MiniImageNet`` read only the CSV layout, not the class folders the official code reads (QA69).
4. A checkpoint folder holding only ``checkpoint.prev.pt`` was "no checkpoint in directory" (QA72).
5. A failed output write after training did not say the checkpoint holds the finished run (QA72).
6. ``adam_betas`` took a string ("09" as (0.0, 9.0)) or a dict (its keys) as a pair (QA76).
7. The omniglot job had no memory check before training (QA77): an oversized meta-batch was killed.
8. A huge ``--eval-steps`` was blamed on ``--inner-steps`` (QA82).
"""
import pytest
import torch

from reptile_fast.tasks import Episodes, TaskBatch


def _episodes(support_y, query_y, ways):
    g = torch.Generator().manual_seed(0)
    s = torch.tensor(support_y)
    q = torch.tensor(query_y)
    return Episodes(TaskBatch(torch.rand(*s.shape, 1, 4, 4, generator=g), s),
                    TaskBatch(torch.rand(*q.shape, 1, 4, 4, generator=g), q), ways)


def test_episodes_refuse_a_query_class_the_support_set_lacks():
    with pytest.raises(ValueError, match=r"query label 2 of task 1 \(point 0\).*support set \(its labels: \[0, 1\]\)"):
        _episodes([[0, 1, 2], [0, 1, 1]], [[2, 1, 0], [2, 0, 1]], 3)


def test_episodes_accept_queries_drawn_from_each_tasks_own_support_classes():
    # a task may use fewer classes than ``ways`` as long as its queries are among them
    ep = _episodes([[2, 0, 1], [1, 1, 0]], [[0, 1, 2], [0, 1, 1]], 3)
    assert ep.n_tasks == 2


# ----------------------------------------------------------------------------- scripted losses
# 2. A TorchScript loss's settings were not recorded (QA73): scripting folds a Huber loss's δ into
#    its code and keeps a module's attributes out of ``vars()``, so a resume with another δ, or ranks
#    with different scripted losses, compared equal settings.
import subprocess  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402

import torch.nn as nn  # noqa: E402

from reptile_fast import MLP, Reptile, Sine  # noqa: E402
from reptile_fast.trainer_state import loss_settings  # noqa: E402


def _scripted(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.script is deprecated, still served
        return torch.jit.script(module)


def _resume_warnings(first, second, tmp_path):
    def fit(loss, iterations, **kw):
        torch.manual_seed(0)
        trainer = Reptile(MLP(hidden_dim=8), backend="torch", loss=loss)
        trainer.fit(Sine(), iterations, progress=False, generator=torch.Generator().manual_seed(1),
                    checkpoint_dir=tmp_path, **kw)
    fit(first, 2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(second, 4, resume_from=tmp_path)
    return [str(w.message) for w in caught if "different hyper-parameters" in str(w.message)]


def test_resume_with_another_scripted_huber_delta_warns(tmp_path):
    got = _resume_warnings(_scripted(nn.HuberLoss(delta=0.5)), _scripted(nn.HuberLoss(delta=5.0)), tmp_path)
    assert got and "loss_settings" in got[0], got


def test_resume_with_the_same_scripted_loss_does_not_warn(tmp_path):
    assert _resume_warnings(_scripted(nn.HuberLoss(delta=0.5)), _scripted(nn.HuberLoss(delta=0.5)), tmp_path) == []


_SETTINGS_IN_A_NEW_PROCESS = """
import warnings, torch
warnings.simplefilter("ignore", FutureWarning)
from reptile_fast.trainer_state import loss_settings
print(loss_settings(torch.jit.script(torch.nn.HuberLoss(delta=0.5))))
"""


def test_scripted_loss_settings_are_the_same_in_another_process():
    # ranks compare them: a digest that moved with the process would refuse every scripted loss
    _scripted(nn.HuberLoss(delta=3.0))  # TorchScript renames a class it compiles again in a process
    here = loss_settings(_scripted(nn.HuberLoss(delta=0.5)))
    there = subprocess.run([sys.executable, "-c", _SETTINGS_IN_A_NEW_PROCESS], capture_output=True, text=True,
                           check=True).stdout.strip()
    assert here == there and "HuberLoss" in here


def test_scripted_functions_are_told_apart_by_their_code():
    def a(x, y):
        return ((x - y) ** 2).mean()

    def b(x, y):
        return ((x - y) ** 2).mean() * 2.0
    sa, sb = _scripted(a), _scripted(b)
    assert loss_settings(sa) != loss_settings(sb)
    assert loss_settings(sa) == loss_settings(_scripted(a))


class _ScaledSquares(nn.Module):
    def __init__(self, scale: float):
        super().__init__()
        self.scale = scale  # an attribute, not a constant: read at run time by the scripted code

    def forward(self, prediction, target):
        return ((prediction - target) ** 2).mean() * self.scale


def test_scripted_modules_are_told_apart_by_their_attributes():
    two, three = _scripted(_ScaledSquares(2.0)), _scripted(_ScaledSquares(3.0))
    assert loss_settings(two) != loss_settings(three)
    assert loss_settings(two) == loss_settings(_scripted(_ScaledSquares(2.0)))
    assert "scale=2.0" in loss_settings(two)


# ----------------------------------------------------------------------------- Mini-ImageNet class folders
# 3. Only the CSV layout was read (QA69): the class-folder layout the official supervised-reptile code
#    reads (ROOT/{train,val,test}/<class>/<image>, as its fetch_data.sh writes it) was refused as
#    "ROOT/train.csv does not exist".
import numpy as np  # noqa: E402

from reptile_fast.tasks import MiniImageNet  # noqa: E402

_SPLITS = {"train": ["n01", "n02", "n03"], "val": ["n04", "n05"], "test": ["n06", "n07", "n08"]}


def _write_both_layouts(root, suffix=".JPEG"):
    """The same images in both layouts: ``csv/`` (CSV, images/) and ``folders/`` (class folders)."""
    from PIL import Image

    (root / "csv" / "images").mkdir(parents=True)
    for split, classes in _SPLITS.items():
        lines = ["filename,label"]
        for cls in classes:
            (root / "folders" / split / cls).mkdir(parents=True)
            for k in range(3):
                # PNG data under either name: decoded exactly, so the layouts' images compare bitwise
                img = Image.fromarray(np.full((6, 6, 3), (10 * int(cls[1:]), 40 * k, 7), dtype=np.uint8))
                name = f"{cls}_{k}"
                img.save(root / "csv" / "images" / f"{name}.png")
                img.save(root / "folders" / split / cls / f"{name}{suffix}", format="PNG")
                lines.append(f"{name}.png,{cls}")
        (root / "csv" / f"{split}.csv").write_text("\n".join(lines) + "\n")


def test_class_folders_give_the_episodes_the_csv_layout_gives(tmp_path):
    _write_both_layouts(tmp_path)
    (tmp_path / "folders" / "train" / "n01" / "Thumbs.db").write_bytes(b"not an image")  # ignored
    for split in _SPLITS:
        a = MiniImageNet(tmp_path / "csv", split, ways=2, shots=2, query_shots=1, image_size=6)
        b = MiniImageNet(tmp_path / "folders", split, ways=2, shots=2, query_shots=1, image_size=6)
        assert a.classes == b.classes == _SPLITS[split]
        ea = a.sample_episodes(4, generator=torch.Generator().manual_seed(3))
        eb = b.sample_episodes(4, generator=torch.Generator().manual_seed(3))
        for name in ("support", "query"):
            assert torch.equal(getattr(ea, name).x, getattr(eb, name).x), (split, name)
            assert torch.equal(getattr(ea, name).y, getattr(eb, name).y), (split, name)


def test_class_folders_are_checked_as_the_csv_layout_is(tmp_path):
    _write_both_layouts(tmp_path, suffix=".jpg")
    root = tmp_path / "folders"
    (root / "test" / "n02").mkdir()  # a training class in the test split
    for name in ("a.jpg", "b.jpg"):
        (root / "test" / "n02" / name).write_bytes((root / "train" / "n02" / "n02_0.jpg").read_bytes())
    with pytest.raises(ValueError, match=r"test/ and train/ share 1 classes \(e.g. n02\)"):
        MiniImageNet(root, "test", ways=2, shots=1, query_shots=1, image_size=6)
    (root / "val" / "n09").mkdir()  # an empty class folder
    with pytest.raises(ValueError, match=r"class folder .*n09 holds no image"):
        MiniImageNet(root, "val", ways=2, shots=1, query_shots=1, image_size=6)
    with pytest.raises(FileNotFoundError, match=r"neither val\.csv \(with images/\) nor a val/ folder"):
        MiniImageNet(tmp_path / "nowhere", "val")


# ----------------------------------------------------------------------------- a folder with only the previous checkpoint
# 4. ``--resume DIR`` / ``resume_from=DIR`` where only ``checkpoint.prev.pt`` is left (the latest
#    deleted, or lost in a crash between the two files' renames) said only "no checkpoint in
#    directory" (QA72): the user had to find the run's newest save by hand.
from reptile_fast.checkpoint import CHECKPOINT_NAME, PREVIOUS_NAME  # noqa: E402


def test_a_folder_with_only_the_previous_checkpoint_names_it(tmp_path):
    def fit(iterations, **kw):
        torch.manual_seed(0)
        trainer = Reptile(MLP(hidden_dim=8), backend="torch")
        trainer.fit(Sine(), iterations, progress=False, generator=torch.Generator().manual_seed(1),
                    checkpoint_dir=tmp_path, checkpoint_every=2, **kw)
        return trainer
    fit(4)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(FileNotFoundError, match=f"no {CHECKPOINT_NAME} in directory .* but .*{PREVIOUS_NAME} "
                                                f"is there .*resume from that file"):
        fit(6, resume_from=tmp_path)
    assert fit(6, resume_from=tmp_path / PREVIOUS_NAME).iteration == 6  # what the message says works


# ----------------------------------------------------------------------------- outputs after training
# 5. A job whose outputs could not be written after training (a full disk, an unwritable file) named
#    only the file (QA72): nothing said the training was safe in the checkpoint, nor how to write the
#    outputs without training again.
import errno  # noqa: E402

from reptile_fast.cli import main as cli_main  # noqa: E402


def test_a_failed_output_write_after_training_says_the_checkpoint_holds_the_run(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "metrics.json").mkdir(parents=True)  # the last output's name taken by a folder: its write fails
    args = ["sine", "--out", str(out), "--iterations", "6", "--eval-tasks", "2", "--eval-steps", "2", "--no-progress",
            "--backend", "torch"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err
    assert "metrics.json" in err and "[Errno 21] [Errno" not in err, err
    assert f"{out / 'checkpoint.pt'} holds meta-step 6" in err and f"reptile-fast sine --resume {out}" in err, err
    (out / "metrics.json").rmdir()
    # what the message says: the outputs are written without training again
    assert cli_main(["sine", "--resume", str(out), "--no-progress"]) == 0
    assert (out / "metrics.json").is_file() and "resumed_from_iteration\": 6" in (out / "metrics.json").read_text()


def test_the_outputs_error_keeps_the_errors_kind_and_errno(tmp_path):
    from reptile_fast.jobs import outputs_after_training

    with pytest.raises(PermissionError) as info:
        with outputs_after_training(tmp_path, 3, "omniglot"):
            raise PermissionError(errno.EACCES, "Permission denied", str(tmp_path / "model.pt"))
    assert info.value.errno == errno.EACCES and "model.pt" in str(info.value) and "omniglot --resume" in str(info.value)


# ----------------------------------------------------------------------------- adam_betas
# 6. ``adam_betas="09"`` was read as the pair (0.0, 9.0) and a dict as its keys (QA76); a string is
#    refused as ``inner_grad_weights`` refuses one.
@pytest.mark.parametrize("betas", ["09", b"09", {0.9: 1, 0.99: 2}, (True, 0.999), ("0.9", "0.999")])
def test_adam_betas_refuse_strings_dicts_and_bools(betas):
    with pytest.raises(TypeError, match="adam_betas must be a pair of numbers"):
        Reptile(MLP(hidden_dim=4), inner_optimizer="adam", adam_betas=betas)


def test_adam_betas_take_numbers_of_any_kind():
    import numpy as np

    for betas in ((0.5, 0.9), [np.float32(0.5), np.float64(0.9)], torch.tensor([0.5, 0.9], dtype=torch.float64)):
        assert Reptile(MLP(hidden_dim=4), inner_optimizer="adam", adam_betas=betas).config.adam_betas == (0.5, 0.9)


# ----------------------------------------------------------------------------- omniglot memory
# 7. The omniglot job had no memory check before training (QA77, found and not fixed there): a
#    --meta-batch-size whose allocations each fit but not together was killed by the out-of-memory
#    killer (exit 137, no message) where the sine job says "out of memory" and exits 2.
from _fake_omniglot import job_data  # noqa: E402


def test_omniglot_meta_batch_beyond_memory_is_refused_before_training(tmp_path, monkeypatch, capsys):
    from reptile_fast import jobs

    data = job_data(tmp_path / "data")
    monkeypatch.setattr(jobs, "available_memory", lambda: 64 << 20)  # 64 MiB "free"
    base = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "1", "--eval-steps", "1",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--iterations", "1",
            "--threads", "1", "--no-progress"]
    out = tmp_path / "r"
    # 1000 tasks: their images and one copy of the net's ~110k parameters each, ~0.45 GB
    assert cli_main([*base, "--meta-batch-size", "1000", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "out of memory" in err and "--meta-batch-size 1000" in err, err
    assert not out.exists()  # refused before loading, training or writing anything
    assert cli_main([*base, "--meta-batch-size", "2", "--out", str(out)]) == 0  # what fits still runs


def test_omniglot_memory_check_counts_this_process_share(monkeypatch):
    from reptile_fast import jobs
    from reptile_fast.fewshot_job import OmniglotConfig, check_omniglot_memory

    monkeypatch.setattr(jobs, "available_memory", lambda: 64 << 20)
    config = OmniglotConfig(train=["t.zip"], test="t", meta_batch_size=1000)
    with pytest.raises(MemoryError, match="a meta-step needs at least"):
        check_omniglot_memory(config, torch.device("cpu"))
    check_omniglot_memory(config, torch.device("cpu"), world_size=100)  # 10 tasks each


# ----------------------------------------------------------------------------- --eval-steps beyond memory
# 8. ``--eval-steps 10**30`` was reported as "... --inner-steps x n_points ... more bytes than a 64-bit
#    size holds" (QA82): the held-out evaluation's plan was left out of the job's memory check, and
#    the plan's own size check names the library's inner_steps.
def test_a_huge_eval_steps_is_refused_naming_the_evaluation_flags(tmp_path, capsys):
    code = cli_main(["sine", "--iterations", "2", "--eval-tasks", "2", "--eval-steps", str(10 ** 30), "--no-progress",
                     "--backend", "torch", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2, err
    assert f"--eval-steps {10 ** 30}" in err and "--inner-steps 5 (training)" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
