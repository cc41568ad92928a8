"""The official code's Omniglot split by character (``--split official``).

openai/supervised-reptile lists every character of both official sets (one folder of all
alphabets, sorted by alphabet then character), seeds Python's ``random`` with ``--seed``, shuffles
the list once and trains on the first 1200 (with rotations), tests on the rest (without).  The
restatement below is that code's two lines, run on Python's global ``random``; the library must
give the same split without touching the global state.
"""
from __future__ import annotations

import json
import random

import pytest
import torch

from _fake_omniglot import ALPHABETS, job_data, make_folder, make_runs
from reptile_fast.cli import main
from reptile_fast.tasks import Omniglot, official_character_split
from reptile_fast.tasks.omniglot import OFFICIAL_TRAIN_CHARACTERS, load_omniglot_images


def _official(characters, seed, n_train):
    """The official ``random.seed(args.seed)`` then ``split_dataset`` (shuffle, first ``n_train``)."""
    state = random.getstate()
    try:
        random.seed(seed)
        all_data = list(characters)
        random.shuffle(all_data)
        return all_data[:n_train], all_data[n_train:]
    finally:
        random.setstate(state)


def _characters(n_alphabets=50, per=33):
    return sorted((f"Alphabet_{a:02d}", f"character{c + 1:02d}") for a in range(n_alphabets) for c in range(per))


@pytest.mark.parametrize("seed, n, n_train", [(0, 1623, OFFICIAL_TRAIN_CHARACTERS), (1, 1623, 1200), (7, 10, 3),
                                              (123456789, 2, 1)])
def test_split_is_the_official_codes(seed, n, n_train):
    chars = _characters()[:n]
    before = random.getstate()
    train, test = official_character_split(chars, seed=seed, n_train=n_train)
    assert random.getstate() == before  # the global stream is the user's
    assert (train, test) == _official(chars, seed, n_train)
    assert len(train) == n_train and sorted(train + test) == chars
    # given in another order, the characters are listed as the official code lists them (sorted)
    assert official_character_split(list(reversed(chars)), seed=seed, n_train=n_train) == (train, test)


def test_another_seed_gives_another_split():
    chars = _characters()
    assert official_character_split(chars, seed=0)[0] != official_character_split(chars, seed=1)[0]


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(characters=[("A", "character01")] * 2, n_train=1), ValueError, "twice"),
    (dict(characters=[("A", "character01"), ("A", "character02")], n_train=2), ValueError, "leaves no test"),
    (dict(characters=[("A", "character01"), ("A", "character02")], n_train=0), ValueError, "n_train must be >= 1"),
    (dict(characters=[("A", "character01"), ("A", "character02")], seed=-1), ValueError, "seed must be >= 0"),
    (dict(characters=[("A", "character01"), ("A", "character02")], seed=True), TypeError, "seed must be an int"),
    (dict(characters="A/character01"), TypeError, "not one string"),
    (dict(characters=[("A", 1), ("A", "character02")]), TypeError, "pairs of strings"),
    (dict(characters=[("A", "character01", "x")]), TypeError, "pairs"),
    (dict(characters=5), TypeError, "list of"),
])
def test_split_refuses_bad_input_by_name(kwargs, error, match):
    with pytest.raises(error, match=match):
        official_character_split(**kwargs)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("official_split"))


def test_omniglot_keeps_only_the_characters_given(folder):
    data = load_omniglot_images([folder])
    train, test = official_character_split(data.characters, seed=3, n_train=5)
    tr = Omniglot(data, ways=2, shots=1, rotations=(0, 90, 180, 270), characters=train)
    te = Omniglot(data, ways=2, shots=1, characters=test)
    assert tr.characters == sorted(train) and te.characters == sorted(test)
    assert tr.n_classes == 4 * len(train) and te.n_classes == len(test)
    assert te.alphabets == sorted({a for a, _ in test})
    # the images drawn are the kept characters' only: every image belongs to a test character
    owner = {}
    for ci, (a, c) in enumerate(data.characters):
        for i in data.table[ci][: int(data.counts[ci])].tolist():
            owner[i] = (a, c)
    episodes = te.sample_episodes(30, generator=torch.Generator().manual_seed(0))
    flat = data.images.reshape(len(data.images), -1)
    for x in episodes.support.x.reshape(-1, flat.shape[1]):
        hit = (flat == x).all(1).nonzero().flatten().tolist()
        assert hit and {owner[i] for i in hit} <= set(test)
    # a subset keeps the selection; alphabets= narrows it further
    assert te.subset(shots=2, query_shots=1).characters == te.characters
    alpha = Omniglot(data, ways=2, shots=1, characters=train, alphabets=["Alpha"])
    assert alpha.characters == sorted(c for c in train if c[0] == "Alpha")
    # Tuples or lists both name a character (a list of lists comes back from JSON)
    assert Omniglot(data, ways=2, characters=[list(c) for c in test]).characters == te.characters


def test_omniglot_refuses_bad_characters_by_name(folder):
    data = load_omniglot_images([folder])
    with pytest.raises(ValueError, match=r"characters \[\('Alpha', 'character09'\)\] \(1 in all\) are not in the data"):
        Omniglot(data, ways=2, characters=[("Alpha", "character01"), ("Alpha", "character09")])
    with pytest.raises(TypeError, match="not one string"):
        Omniglot(data, ways=2, characters="Alpha/character01")
    with pytest.raises(TypeError, match="pairs of strings"):
        Omniglot(data, ways=2, characters=["Alpha/character01"])
    with pytest.raises(ValueError, match="no characters left"):
        Omniglot(data, ways=2, characters=[("Alpha", "character01")], alphabets=["Beta"])
    with pytest.raises(ValueError, match="2-way tasks need 2 classes"):
        Omniglot(data, ways=2, characters=[("Alpha", "character01")])


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return job_data(tmp_path_factory.mktemp("official_split_job"))


_TINY = ["--ways", "2", "--shots", "1", "--train-shots", "2", "--inner-batch-size", "2", "--inner-steps", "2",
         "--eval-steps", "2", "--eval-batch-size", "2", "--eval-tasks", "2", "--validate-every", "0",
         "--threads", "1", "--no-progress"]


def test_job_splits_train_and_test_together_as_the_official_code(data, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["omniglot", "--train", data["train"], "--test", data["test"], "--split", "official",
                 "--split-seed", "5", "--train-characters", "5", "--iterations", "2", "--checkpoint-every", "1",
                 "--out", str(out)] + _TINY) == 0
    err = capsys.readouterr().err
    assert "official split (split_seed 5): 5 training characters and 3 test characters of 8" in err
    metrics = json.loads((out / "metrics.json").read_text())
    everything = load_omniglot_images([data["train"], data["test"]]).characters
    assert len(everything) == sum(ALPHABETS.values())
    _, test = _official(everything, 5, 5)
    assert metrics["test_character_names"] == sorted("/".join(c) for c in test)
    assert (metrics["split"], metrics["split_seed"], metrics["train_characters"], metrics["test_characters"]) == \
        ("official", 5, 5, 3)
    assert "held-out characters" in err
    config = json.loads((out / "config.json").read_text())
    assert (config["split"], config["split_seed"], config["train_characters"]) == ("official", 5, 5)
    # a resume keeps the split: another seed, count or split is refused before any work
    for flag, value in (("--split-seed", "6"), ("--train-characters", "4"), ("--split", "alphabets")):
        assert main(["omniglot", "--resume", str(out), "--out", str(tmp_path / "r"), flag, value,
                     "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert f"{flag} {value}:" in err and "split its characters" in err and "resume without" in err
    assert main(["omniglot", "--resume", str(out), "--no-progress"]) == 0
    assert json.loads((out / "metrics.json").read_text())["test_character_names"] == metrics["test_character_names"]
    # the official runs come from evaluation alphabets, which this split trains on too: said
    runs = make_runs(tmp_path, n_runs=1, ways=2)
    capsys.readouterr()
    assert main(["omniglot-runs", "--runs", str(runs), "--model", str(out)]) == 0
    assert "trained with --split official" in capsys.readouterr().err
    assert json.loads((out / "runs_metrics.json").read_text())["split"] == "official"


def test_job_split_with_train_alone_and_its_errors(data, tmp_path, capsys):
    # --split official reads every alphabet from --train alone: --test may be left out
    out = tmp_path / "one"
    assert main(["omniglot", "--train", data["train"], "--split", "official", "--train-characters", "3",
                 "--iterations", "1", "--out", str(out)] + _TINY) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["test_characters"] == 2 and set(metrics["test_alphabets"]) <= {"Alpha", "Beta"}
    capsys.readouterr()
    # the default count (1200) leaves nothing to test on 8 characters: said with the flag
    assert main(["omniglot", "--train", data["train"], "--test", data["test"], "--split", "official",
                 "--iterations", "1", "--out", str(tmp_path / "bad")] + _TINY) == 2
    err = capsys.readouterr().err
    assert "--train-characters 1200" in err and "leaves no test character: the data has 8 characters" in err
    assert not (tmp_path / "bad").exists()
    # without --split official, --test is still needed
    assert main(["omniglot", "--train", data["train"], "--iterations", "1", "--out", str(tmp_path / "t")] + _TINY) == 2
    assert "omniglot needs --train PATH and --test PATH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["omniglot", "--train", data["train"], "--split", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
