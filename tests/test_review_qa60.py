"""QA60 (session 25): a review of the few-shot job.

* A folder whose name starts with "character" *above* the ``alphabet/characterNN`` layout
  (``datasets/omniglot/characters/images_background/…``) was taken for an empty character and
  the whole source refused, folder or zip.
* ``--transductive`` could only be switched on: a transductive run's model could not be tested
  non-transductively from the CLI (``omniglot-runs``, ``omniglot --resume``).
"""
from __future__ import annotations

import json
import shutil
import zipfile

import pytest

from _fake_omniglot import job_data, make_folder, make_runs
from reptile_fast.cli import main
from reptile_fast.tasks import Omniglot, load_omniglot_images


def _zip_with_folder_entries(top, zpath):
    """Explicit folder entries, as ``zip -r`` writes them."""
    with zipfile.ZipFile(zpath, "w") as zf:
        for f in sorted(top.rglob("*")):
            zf.write(f, f.relative_to(top.parent).as_posix() + ("/" if f.is_dir() else ""))
    return zpath


def test_a_wrapping_folder_named_characters_is_not_an_empty_character(tmp_path):
    root = tmp_path / "datasets"
    make_folder(root / "omniglot" / "characters")  # datasets/omniglot/characters/images_background/...
    data = load_omniglot_images(root)
    assert len(data.characters) == 8
    assert Omniglot(data, ways=3).n_characters == 8


def test_a_zip_with_a_wrapping_folder_named_characters_is_read(tmp_path):
    make_folder(tmp_path / "x" / "characters")  # x/characters/images_background/...
    data = load_omniglot_images(_zip_with_folder_entries(tmp_path / "x", tmp_path / "omni.zip"))
    assert len(data.characters) == 8


@pytest.mark.parametrize("kind", ["folder", "zip"])
def test_an_empty_character_under_a_wrapping_folder_is_still_refused(tmp_path, kind):
    base = make_folder(tmp_path / "x" / "characters")
    empty = next(base.glob("*/character01"))
    shutil.rmtree(empty)
    empty.mkdir()
    source = tmp_path / "x" if kind == "folder" else _zip_with_folder_entries(tmp_path / "x", tmp_path / "o.zip")
    with pytest.raises(ValueError, match=f"character folder {empty.parent.name}/character01 .* holds no .png"):
        load_omniglot_images(source)


@pytest.fixture(scope="module")
def transductive_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("qa60_td")
    data = job_data(root)
    out = root / "run"
    args = ["omniglot", "--train", data["train"], "--test", data["test"], "--ways", "3", "--shots", "1",
            "--train-shots", "2", "--inner-batch-size", "3", "--inner-steps", "2", "--eval-steps", "2",
            "--eval-batch-size", "3", "--eval-tasks", "2", "--validate-every", "0", "--threads", "1",
            "--no-progress"]
    assert main([*args, "--iterations", "2", "--checkpoint-every", "1", "--transductive", "--out", str(out)]) == 0
    return args, out


def test_official_runs_of_a_transductive_model_can_be_non_transductive(transductive_run, tmp_path):
    _, out = transductive_run
    runs = make_runs(tmp_path, n_runs=1, ways=3)
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path / "a")]) == 0
    assert json.loads((tmp_path / "a" / "runs_metrics.json").read_text())["transductive"] is True
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out), "--out", str(tmp_path / "b"),
                 "--no-transductive"]) == 0
    assert json.loads((tmp_path / "b" / "runs_metrics.json").read_text())["transductive"] is False


def test_a_resumed_transductive_run_can_be_turned_back(transductive_run, tmp_path):
    _, out = transductive_run
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    assert main(["omniglot", "--resume", str(copy), "--iterations", "3", "--no-transductive", "--no-progress"]) == 0
    assert json.loads((copy / "config.json").read_text())["transductive"] is False
    assert "non-transductive" in json.loads((copy / "metrics.json").read_text())["protocol"]
