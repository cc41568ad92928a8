"""Omniglot task family and the official-runs loader, on a tiny fake Omniglot (real PNGs and zips);
the real data in ../shared/data/omniglot is checked where present."""
from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from _fake_omniglot import ALPHABETS, IMAGES, drawing, make_folder, make_runs, make_zip
from reptile_fast.tasks import Episodes, Omniglot, TaskBatch, load_official_runs
from reptile_fast.tasks.omniglot import ROTATIONS, load_omniglot_images

# as tests/conftest.py's OMNIGLOT (not imported from it: bench/ has a conftest module too)
OMNIGLOT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "omniglot"


def as_tensor(img: np.ndarray) -> torch.Tensor:
    """The loader's convention for a file already at 28×28: strokes (black) 1, background 0."""
    return 1.0 - torch.from_numpy(img).float() / 255.0


@pytest.fixture(scope="module")
def fake(tmp_path_factory):
    root = tmp_path_factory.mktemp("omniglot")
    folder = make_folder(root)
    return {"folder": folder, "zip": make_zip(folder, root / "images_background.zip"), "root": root}


@pytest.fixture(scope="module")
def data(fake):
    return load_omniglot_images(fake["zip"])


def test_folder_and_zip_read_the_same_images(fake, data):
    from_folder = load_omniglot_images(fake["folder"])
    assert from_folder.characters == data.characters
    assert torch.equal(from_folder.images, data.images)
    assert data.alphabets == sorted(ALPHABETS)
    assert len(data.characters) == sum(ALPHABETS.values())
    assert data.images.shape == (sum(ALPHABETS.values()) * IMAGES, 1, 28, 28)
    # pixel convention: the file's black strokes are 1, white background 0, exactly for a 28×28 file
    first = data.images[data.table[0, 0], 0]
    assert torch.equal(first, as_tensor(drawing("Alpha", 0, 0)))


def test_sample_shapes_and_labels(data):
    dist = Omniglot(data, ways=3, shots=2, query_shots=1)
    tasks = dist.sample(4, generator=torch.Generator().manual_seed(0))
    assert isinstance(tasks, TaskBatch)
    assert tasks.x.shape == (4, 6, 1, 28, 28) and tasks.x.dtype == torch.float32
    assert torch.equal(tasks.y, torch.tensor([0, 0, 1, 1, 2, 2]).expand(4, 6))
    ep = dist.sample_episodes(4, generator=torch.Generator().manual_seed(0))
    assert isinstance(ep, Episodes) and ep.ways == 3
    assert ep.support.x.shape == (4, 6, 1, 28, 28) and ep.query.x.shape == (4, 3, 1, 28, 28)
    assert torch.equal(ep.query.y, torch.tensor([0, 1, 2]).expand(4, 3))


def _which_image(data, img: torch.Tensor):
    """(character index, image index, rotation k) of ``img`` among the stored images."""
    hits = []
    for k in range(4):
        turned = torch.rot90(data.images, k, dims=(-2, -1))
        same = (turned == img).flatten(1).all(1).nonzero().flatten().tolist()
        hits += [(i, k) for i in same]
    assert len(hits) == 1, hits
    i, k = hits[0]
    char = int((data.table == i).any(1).nonzero()[0])
    return char, i, k


@pytest.mark.parametrize("rotations", [(0,), (90,), (180, 270), ROTATIONS])
def test_rotations_are_extra_classes(data, rotations):
    dist = Omniglot(data, ways=4, shots=2, query_shots=1, rotations=rotations)
    assert dist.n_classes == len(dist.characters) * len(rotations)
    ep = dist.sample_episodes(6, generator=torch.Generator().manual_seed(1))
    seen_k = set()
    for t in range(6):
        classes = {}
        for x, y in [*zip(ep.support.x[t], ep.support.y[t]), *zip(ep.query.x[t], ep.query.y[t])]:
            char, _, k = _which_image(data, x)
            seen_k.add(k)
            # every image of one label: the same character at the same rotation
            assert classes.setdefault(int(y), (char, k)) == (char, k)
        assert len(set(classes.values())) == 4  # four distinct classes in the task
    assert seen_k <= {r // 90 for r in rotations}
    if rotations == ROTATIONS:
        assert seen_k == {0, 1, 2, 3}


def test_support_and_query_are_disjoint(data):
    dist = Omniglot(data, ways=3, shots=2, query_shots=2)
    ep = dist.sample_episodes(8, generator=torch.Generator().manual_seed(2))
    for t in range(8):
        s = {_which_image(data, x)[1] for x in ep.support.x[t]}
        q = {_which_image(data, x)[1] for x in ep.query.x[t]}
        assert len(s) == 6 and len(q) == 6 and not (s & q)


def test_sampling_is_deterministic_under_a_generator(data):
    dist = Omniglot(data, ways=3, shots=1, query_shots=2, rotations=ROTATIONS)
    a = dist.sample_episodes(5, generator=torch.Generator().manual_seed(3))
    b = dist.sample_episodes(5, generator=torch.Generator().manual_seed(3))
    c = dist.sample_episodes(5, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
    assert not torch.equal(a.support.x, c.support.x)
    # the global RNG plays no part
    torch.manual_seed(123)
    d = dist.sample(5, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(456)
    e = dist.sample(5, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d.x, e.x)


def test_alphabet_split(data):
    only = Omniglot(data, ways=2, shots=1, alphabets=["Beta"])
    assert only.alphabets == ["Beta"] and {a for a, _ in only.characters} == {"Beta"}
    rest = Omniglot(data, ways=2, shots=1, exclude_alphabets=["Beta"])
    assert rest.alphabets == ["Alpha", "Gamma"] and rest.n_characters == 6
    ep = rest.sample_episodes(10, generator=torch.Generator().manual_seed(0))
    beta = {i for i, (a, _) in enumerate(data.characters) if a == "Beta"}
    for t in range(10):
        for x in ep.support.x[t]:
            assert _which_image(data, x)[0] not in beta
    # subset shares the images and keeps the selection
    sub = rest.subset(ways=3, shots=2)
    assert sub.data is data and sub.alphabets == rest.alphabets and sub.ways == 3


def test_merging_sources_reads_shared_alphabets_once(tmp_path):
    a = make_folder(tmp_path / "a", {"Alpha": 2, "Beta": 2}, prefix="images_background_small1")
    b = make_folder(tmp_path / "b", {"Beta": 2, "Gamma": 1}, prefix="images_background_small2")
    merged = load_omniglot_images([make_zip(a, tmp_path / "s1.zip"), b])
    assert [x for x, _ in merged.characters] == ["Alpha", "Alpha", "Beta", "Beta", "Gamma"]
    assert merged.images.shape[0] == 5 * IMAGES
    assert torch.equal(merged.counts, torch.full((5,), IMAGES))


def test_bad_input(fake, data, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_omniglot_images(tmp_path / "missing.zip")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="neither a folder nor a zip"):
        load_omniglot_images(tmp_path / "notes.txt")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no alphabet/characterNN"):
        load_omniglot_images(tmp_path / "empty")
    with pytest.raises(ValueError, match="sources is empty"):
        load_omniglot_images([])
    with pytest.raises(ValueError, match="need 9 classes"):
        Omniglot(data, ways=9, shots=1)
    with pytest.raises(ValueError, match="has 4 images"):
        Omniglot(data, ways=2, shots=4, query_shots=1)
    with pytest.raises(ValueError, match="rotations"):
        Omniglot(data, rotations=(45,))
    with pytest.raises(ValueError, match="rotations"):
        Omniglot(data, rotations=(0, 0))
    with pytest.raises(ValueError, match="not in the data"):
        Omniglot(data, alphabets=["Klingon"])
    with pytest.raises(TypeError, match="list of alphabet names"):
        Omniglot(data, alphabets="Alpha")
    with pytest.raises(ValueError, match="no characters left"):
        Omniglot(data, exclude_alphabets=list(ALPHABETS))
    with pytest.raises(TypeError, match="ways must be an int"):
        Omniglot(data, ways=2.0)
    with pytest.raises(ValueError, match="query_shots >= 1"):
        Omniglot(data, ways=2, query_shots=0).sample_episodes(1)
    with pytest.raises(TypeError, match="generator"):
        Omniglot(data, ways=2).sample(1, generator=0)
    debris = tmp_path / "debris.zip"
    with zipfile.ZipFile(debris, "w") as zf:
        zf.write(fake["folder"] / "Alpha" / "character01" / "0000_01.png", "bg/Alpha/character01/0000_01.png")
        zf.writestr("__MACOSX/bg/Alpha/character01/._0000_01.png", b"resource fork")
        zf.writestr("bg/Alpha/character01/._0000_02.png", b"resource fork")
    assert load_omniglot_images(debris).images.shape[0] == 1
    bad = tmp_path / "bad.zip"
    with zipfile.ZipFile(bad, "w") as zf:
        zf.writestr("X/character01/a.png", b"not a png")
    with pytest.raises(ValueError, match="cannot decode"):
        load_omniglot_images(bad)


# ---------------------------------------------------------------------- the official runs
@pytest.mark.parametrize("as_zip", [False, True])
def test_official_runs_loader(tmp_path, as_zip):
    folder = make_runs(tmp_path, n_runs=2, ways=3)
    path = make_zip(folder, tmp_path / "all_runs.zip") if as_zip else folder
    episodes, names = load_official_runs(path)
    assert names == ["run01", "run02"] and episodes.ways == 3
    assert episodes.support.x.shape == (2, 3, 1, 28, 28) and episodes.query.x.shape == (2, 3, 1, 28, 28)
    for r in range(2):
        perm = np.random.default_rng(r).permutation(3)
        assert torch.equal(episodes.support.y[r], torch.arange(3))
        assert torch.equal(episodes.query.y[r], torch.from_numpy(perm))
        for c in range(3):
            assert torch.equal(episodes.support.x[r, c, 0], as_tensor(drawing("Runs", 10 * r + c, 0)))
        for k in range(3):
            assert torch.equal(episodes.query.x[r, k, 0], as_tensor(drawing("Runs", 10 * r + int(perm[k]), 1)))


def test_official_runs_bad_input(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_official_runs(tmp_path / "nope.zip")
    (tmp_path / "x").mkdir()
    with pytest.raises(ValueError, match="no runNN/class_labels.txt"):
        load_official_runs(tmp_path / "x")
    folder = make_runs(tmp_path / "r", n_runs=1, ways=3)
    (folder / "run01" / "training" / "class03.png").unlink()
    with pytest.raises(ValueError, match="class_labels.txt names"):
        load_official_runs(folder)
    folder = make_runs(tmp_path / "s", n_runs=1, ways=3)
    (folder / "run01" / "class_labels.txt").write_text("just-one-field\n")
    with pytest.raises(ValueError, match="expected"):
        load_official_runs(folder)


# ---------------------------------------------------------------------- the real data
real = pytest.mark.skipif(not (OMNIGLOT / "images_background_small1.zip").exists(),
                          reason="../shared/data/omniglot is not present")


@real
def test_real_small_background_sets():
    d1 = load_omniglot_images(OMNIGLOT / "images_background_small1.zip")
    assert d1.alphabets == ["Balinese", "Early_Aramaic", "Greek", "Korean", "Latin"]
    assert len(d1.characters) == 136 and torch.equal(d1.counts, torch.full((136,), 20))
    assert 0.0 <= float(d1.images.min()) and float(d1.images.max()) <= 1.0
    assert float(d1.images.mean()) < 0.2  # strokes are 1 on a 0 background
    train = Omniglot(d1, ways=5, shots=10, query_shots=0, rotations=ROTATIONS)
    assert train.n_classes == 544
    assert train.sample(2, generator=torch.Generator().manual_seed(0)).x.shape == (2, 50, 1, 28, 28)


@real
def test_real_official_runs():
    episodes, names = load_official_runs(OMNIGLOT / "all_runs.zip")
    assert len(names) == 20 and episodes.ways == 20
    assert episodes.support.x.shape == (20, 20, 1, 28, 28) and episodes.query.x.shape == (20, 20, 1, 28, 28)
    # every run's test items use each of its 20 classes exactly once
    assert torch.equal(episodes.query.y.sort(1).values, torch.arange(20).expand(20, 20))


def test_excluding_every_alphabet_names_what_the_data_has(data):
    """The error lists the data's alphabets (the kept set aliased them: it said "data has []")."""
    with pytest.raises(ValueError, match=r"no characters left .*data has \['") as info:
        Omniglot(data, ways=2, shots=1, exclude_alphabets=list(data.alphabets))
    assert all(a in str(info.value) for a in data.alphabets)


def test_ways_rotations_and_exclusions_are_checked_as_given(data, tmp_path):
    """A 1-way task was accepted (every prediction is right whatever the model); rotations "0"
    (a string) and 90.5 were read as (0,) and 90 by int(); exclude_alphabets=None failed with
    "'NoneType' object is not iterable"."""
    for ways in (1, 0):
        with pytest.raises(ValueError, match="ways must be >= 2"):
            Omniglot(data, ways=ways)
    for rotations in ("0", "90", (90.5,), (0, True), 90, (0.0, 90.0)):
        with pytest.raises(TypeError, match="rotations must be a sequence of int degrees"):
            Omniglot(data, ways=2, rotations=rotations)
    assert Omniglot(data, ways=2, rotations=(np.int64(0), 90)).rotations == (0, 90)
    assert Omniglot(data, ways=2, rotations=iter((0, 180))).rotations == (0, 180)
    assert Omniglot(data, ways=2, exclude_alphabets=None).alphabets == sorted(ALPHABETS)


@pytest.mark.parametrize("as_zip", [False, True])
def test_an_empty_character_folder_is_refused(tmp_path, as_zip):
    """A character folder without images (an empty class) was skipped silently: the data then
    had one class fewer than the folders say."""
    folder = make_folder(tmp_path, {"Alpha": 2})
    (folder / "Alpha" / "character03").mkdir()
    source = make_zip(folder, tmp_path / "bg.zip") if as_zip else folder
    with pytest.raises(ValueError, match="character folder Alpha/character03 .* holds no .png image"):
        load_omniglot_images(source)
    with pytest.raises(ValueError, match="Alpha/character03"):
        Omniglot(source, ways=2)
