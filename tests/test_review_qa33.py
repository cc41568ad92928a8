"""QA33's mutation audit (the modules the audits of QA24 and QA27 barely touched: checkpoint,
trainer_state, callbacks, hyperparams, model_watch, validation, compat, loop, jobs, fewshot_job,
cli, the task families, seed_recognition, native_select, native_build): each test here fails
under a deliberate, realistic breakage of the library that the rest of the suite let through
(NOTES-qa33.md has the table).  Tiny models, one to three meta-steps: the file runs in seconds."""
import random

import numpy as np
import pytest
import torch

from reptile_fast import MLP, Reptile, Sine
from reptile_fast.checkpoint import (CHECKPOINT_NAME, capture_rng_state, load_checkpoint, restore_checkpoint,
                                     save_checkpoint)


def _trainer(seed=0, **kwargs):
    torch.manual_seed(seed)
    return Reptile(MLP(1, 8, 1), backend="reference", **kwargs)


def _fit(trainer, iterations, seed=0, **kwargs):
    gen = torch.Generator().manual_seed(seed)
    trainer.fit(Sine(), iterations, meta_batch_size=2, generator=gen, progress=False, **kwargs)
    return gen


def _params(trainer):
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


# ------------------------------------------------------------------------------ checkpoint
def test_cached_gaussians_of_numpy_and_python_survive_a_checkpoint(tmp_path):
    """numpy's legacy RNG and Python's ``random`` each cache the second normal of a pair: a
    checkpoint taken between the two must give the same next normal after a restore.

    Catches: ``capture_rng_state`` storing numpy's ``has_gauss`` as 0, or Python's
    ``gauss_next`` as None (the resumed run then draws another number)."""
    trainer = _trainer()
    np.random.seed(3)
    np.random.standard_normal()
    random.seed(4)
    random.gauss(0, 1)
    assert np.random.get_state()[3] == 1 and random.getstate()[2] is not None  # a cached normal each
    save_checkpoint(tmp_path, trainer)
    expected = (np.random.standard_normal(), random.gauss(0, 1))
    np.random.seed(0)
    random.seed(0)
    restore_checkpoint(trainer, tmp_path)
    assert (np.random.standard_normal(), random.gauss(0, 1)) == expected


def test_a_generator_state_saved_on_another_device_is_refused_before_anything_changes():
    """A checkpoint whose generator state is a CUDA generator's, restored with a CPU generator:
    a ValueError naming both devices, and the trainer untouched.

    Catches: ``_check_generator_compatible`` without its device comparison (the restore then
    replaced the model and failed inside ``Generator.set_state`` with a RuntimeError)."""
    source = _trainer(seed=1)
    gen = torch.Generator().manual_seed(0)
    ckpt = {"trainer": source.state_dict(), "rng": capture_rng_state(gen)}
    ckpt["rng"]["generator"] = {"state": torch.zeros(16, dtype=torch.uint8), "device": "cuda:0"}
    target = _trainer(seed=2)
    before = _params(target)
    with pytest.raises(ValueError, match=r"generator on cuda:0.*on cpu"):
        restore_checkpoint(target, ckpt, generator=gen)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())


def test_a_state_that_loading_would_refuse_is_never_written(tmp_path):
    """``save_checkpoint`` of a trainer whose ``iteration`` was set to -1: a ValueError, and the
    last good checkpoint stays byte for byte (``load_checkpoint`` refuses a negative iteration).

    Catches: ``save_checkpoint`` without its ``_validate`` of the state (it wrote a checkpoint
    that no resume can load, over the good one)."""
    trainer = _trainer()
    save_checkpoint(tmp_path, trainer)
    good = (tmp_path / CHECKPOINT_NAME).read_bytes()
    trainer.iteration = -1
    with pytest.raises(ValueError, match="invalid iteration -1"):
        save_checkpoint(tmp_path, trainer)
    assert (tmp_path / CHECKPOINT_NAME).read_bytes() == good
    load_checkpoint(tmp_path)


def _flip_a_data_bit(path):
    """One bit of a tensor record's bytes flipped: the archive reads, its CRC-32 does not match."""
    import zipfile

    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if "/data/" in i.filename and i.file_size >= 64)
    data = bytearray(path.read_bytes())
    name_len = int.from_bytes(data[info.header_offset + 26:info.header_offset + 28], "little")
    extra_len = int.from_bytes(data[info.header_offset + 28:info.header_offset + 30], "little")
    data[info.header_offset + 30 + name_len + extra_len + 17] ^= 0x04
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["truncated", "bit flip"])
def test_a_damaged_latest_checkpoint_never_replaces_the_previous_one(tmp_path, damage):
    """Save, save, damage the latest, save again: ``checkpoint.prev.pt`` is still a loadable
    checkpoint (the first one), not a copy of the damaged file.

    Catches: ``save_checkpoint`` keeping the latest as the previous one without checking it is
    intact, or ``_intact`` not comparing the records' CRC-32 (a failure of the next write then
    left no loadable checkpoint at all)."""
    from reptile_fast.checkpoint import PREVIOUS_NAME

    trainer = _trainer()
    save_checkpoint(tmp_path, trainer)
    trainer.iteration = 1
    save_checkpoint(tmp_path, trainer)
    latest = tmp_path / CHECKPOINT_NAME
    if damage == "truncated":
        latest.write_bytes(latest.read_bytes()[:200])
    else:
        _flip_a_data_bit(latest)
    trainer.iteration = 2
    save_checkpoint(tmp_path, trainer)
    assert load_checkpoint(tmp_path / PREVIOUS_NAME)["trainer"]["iteration"] == 0
    assert load_checkpoint(tmp_path)["trainer"]["iteration"] == 2


def test_a_history_that_is_not_one_curve_per_name_is_refused(tmp_path):
    """A checkpoint dict whose ``history['loss']`` is 2-D: ``validate_checkpoint`` (and so
    ``fit(resume_from=dict)``) names the entry.

    Catches: ``_validate`` accepting any tensor as a history entry (the resume then failed with
    "float() argument must be ... not 'list'" after the trainer was restored)."""
    from reptile_fast.checkpoint import validate_checkpoint

    trainer = _trainer()
    ckpt = load_checkpoint(save_checkpoint(tmp_path, trainer, history={"loss": [0.5, 0.25]}))
    assert validate_checkpoint(ckpt)["history"]["loss"].tolist() == [0.5, 0.25]
    ckpt["history"]["loss"] = torch.zeros(2, 2, dtype=torch.float64)
    with pytest.raises(ValueError, match="malformed history entry 'loss'"):
        validate_checkpoint(ckpt)
    with pytest.raises(ValueError, match="malformed history entry 'loss'"):
        _fit(_trainer(), 2, resume_from=ckpt)


def test_fit_removes_a_killed_writers_temporary_of_the_previous_checkpoint(tmp_path):
    """A ``.checkpoint.prev.pt.<pid>.tmp`` left by a writer killed while it kept the previous
    checkpoint is removed by the next ``fit`` into that folder, as the latest's temporaries are.

    Catches: ``remove_stale_temporaries`` matching only ``.checkpoint.pt.*.tmp``."""
    stale = tmp_path / ".checkpoint.prev.pt.4242.tmp"
    stale.write_bytes(b"half a copy")
    _fit(_trainer(), 1, checkpoint_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT_NAME]


@pytest.mark.parametrize("part, bad", [("torch", torch.zeros(10, dtype=torch.uint8)), ("numpy pos", 700)])
def test_a_malformed_rng_state_is_refused_before_the_trainer_changes(tmp_path, part, bad):
    """A checkpoint dict whose torch CPU RNG state has the wrong size, or whose numpy position
    lies past MT19937's 624 words: ``restore_checkpoint`` raises a ValueError naming that RNG and
    leaves the trainer as it was.

    Catches: ``rng_state_problem`` without its size check of the torch state (the restore then
    replaced the model and failed inside ``torch.set_rng_state``) or without its range check of
    numpy's ``pos`` (numpy took 700 silently and read past its key array)."""
    ckpt = {"trainer": _trainer(seed=1).state_dict(), "rng": capture_rng_state()}
    if part == "torch":
        ckpt["rng"]["torch"] = bad
    else:
        ckpt["rng"]["numpy"]["pos"] = bad
    target = _trainer(seed=2)
    before = _params(target)
    with pytest.raises(ValueError, match=f"malformed {part.split()[0]} RNG state"):
        restore_checkpoint(target, ckpt)
    assert all(torch.equal(before[k], v) for k, v in target.model.state_dict().items())
