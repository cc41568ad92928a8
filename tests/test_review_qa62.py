"""QA62 (session 25): a review of the public API's first touch.

* A resume with the same loss class but other settings (a Huber loss's δ, a cross-entropy's label
  smoothing, another lambda) warned of nothing: ``hparams()["loss"]`` named only the class.
* Backend options refused numpy's bool ("fast_mlp must be a bool, got bool").
* The drop-in ran ``functools.partial(perform_k_training_steps, batch_size=np.int64(5))`` on the
  slow reference path, as "not the standard inner loop".
"""
import functools
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

import reptile_fast
from reptile_fast import MLP, Reptile, Sine, sample_indices
from reptile_fast import reference as R


# ----------------------------------------------------------------------------- loss settings
def _fit(loss, iterations, tmp_path, **kw):
    torch.manual_seed(0)
    trainer = Reptile(MLP(hidden_dim=8), backend="torch", loss=loss)
    trainer.fit(Sine(), iterations, progress=False, generator=torch.Generator().manual_seed(1),
                checkpoint_dir=tmp_path, **kw)
    return trainer


def _resume_warnings(first, second, tmp_path):
    _fit(first, 2, tmp_path)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(second, 4, tmp_path, resume_from=tmp_path)
    return [str(w.message) for w in caught if "different hyper-parameters" in str(w.message)]


def test_resume_with_another_huber_delta_warns_naming_it(tmp_path):
    got = _resume_warnings(nn.HuberLoss(delta=0.5), nn.HuberLoss(delta=5.0), tmp_path)
    assert got and "loss_settings" in got[0] and "HuberLoss(delta=0.5, reduction='mean')" in got[0] \
        and "HuberLoss(delta=5.0, reduction='mean')" in got[0], got


def test_resume_with_the_same_loss_settings_does_not_warn(tmp_path):
    assert _resume_warnings(nn.HuberLoss(delta=0.5), nn.HuberLoss(delta=0.5), tmp_path) == []


def test_resume_with_another_lambda_warns(tmp_path):
    got = _resume_warnings(lambda p, y: ((p - y) ** 2).mean(), lambda p, y: (p - y).abs().mean(), tmp_path)
    assert got and "loss_settings" in got[0], got


def test_loss_settings_tell_losses_apart_and_are_deterministic():
    def settings(loss):
        torch.manual_seed(0)
        return Reptile(MLP(hidden_dim=8), backend="torch", loss=loss).hparams()["loss_settings"]

    pairs = [(nn.HuberLoss(delta=0.5), nn.HuberLoss(delta=5.0)),
             (nn.CrossEntropyLoss(label_smoothing=0.2), nn.CrossEntropyLoss(label_smoothing=0.4)),
             (nn.CrossEntropyLoss(weight=torch.ones(3)), nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0, 1.0]))),
             (nn.CrossEntropyLoss(weight=torch.ones(40)), nn.CrossEntropyLoss(weight=torch.arange(40.0))),
             (nn.L1Loss(reduction="sum"), nn.L1Loss()),
             (functools.partial(torch.nn.functional.huber_loss, delta=2.0),
              functools.partial(torch.nn.functional.huber_loss, delta=3.0))]
    for a, b in pairs:
        assert settings(a) != settings(b), (a, b)
    assert settings(nn.HuberLoss(delta=0.5)) == settings(nn.HuberLoss(delta=0.5))
    assert settings(nn.CrossEntropyLoss(weight=torch.arange(40.0))) == settings(nn.CrossEntropyLoss(weight=torch.arange(40.0)))
    assert "0x" not in settings(functools.partial(torch.nn.functional.huber_loss, delta=2.0))
    # built-in losses are named by "loss" alone
    assert settings("mse") is None and settings(nn.MSELoss()) is None


def test_a_checkpoint_without_loss_settings_resumes_without_a_difference(tmp_path):
    """Checkpoints written before the key existed: no difference reported for it."""
    from reptile_fast.checkpoint import load_checkpoint

    _fit(nn.HuberLoss(delta=0.5), 2, tmp_path)
    ckpt = load_checkpoint(tmp_path)
    del ckpt["trainer"]["config"]["loss_settings"]
    torch.save(ckpt, tmp_path / "checkpoint.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _fit(nn.HuberLoss(delta=0.5), 4, tmp_path, resume_from=tmp_path)
    assert not [w for w in caught if "different hyper-parameters" in str(w.message)]


# ----------------------------------------------------------------------------- numpy's bool
@pytest.mark.parametrize("options", [{"fast_mlp": np.False_}, {"fast_mlp": np.bool_(True)},
                                     {"fast_tanh": np.False_}])
def test_torch_backend_bool_options_take_numpys_bool(options):
    torch.manual_seed(0)
    plain = {k: bool(v) for k, v in options.items()}
    ref_model = MLP(hidden_dim=8)
    np_model = MLP(hidden_dim=8)
    np_model.load_state_dict(ref_model.state_dict())
    tasks = Sine().sample(3, generator=torch.Generator().manual_seed(1))
    plan = sample_indices(3, 5, 50, 10, generator=torch.Generator().manual_seed(2))
    Reptile(ref_model, backend="torch", backend_options=plain).meta_step(tasks, plan)
    np_trainer = Reptile(np_model, backend="torch", backend_options=options)
    np_trainer.meta_step(tasks, plan)
    for a, b in zip(ref_model.parameters(), np_model.parameters()):
        assert torch.equal(a, b)
    for k, v in options.items():
        assert type(getattr(np_trainer.backend, k)) is bool


def test_bool_options_still_refuse_strings():
    with pytest.raises(TypeError, match="fast_mlp must be True or False"):
        Reptile(MLP(hidden_dim=8), backend="torch", backend_options={"fast_mlp": "no"})


def test_triton_bool_options_take_numpys_bool():
    pytest.importorskip("triton")
    from reptile_fast.backends.triton import TritonBackend
    from reptile_fast.kernels.mlp_meta_step_v2 import V2Config

    b = TritonBackend(kernel="v2", fused=np.False_, cuda_graphs=np.False_)
    assert b._fused_arg is False and b.cuda_graphs is False
    c = V2Config(stream=np.True_, flat=np.False_, transpose=np.True_, preload=np.False_)
    assert (c.stream, c.flat, c.transpose, c.preload) == (True, False, True, False)
    assert all(type(v) is bool for v in (c.stream, c.flat, c.transpose, c.preload))
    with pytest.raises(TypeError, match="fused must be True or False"):
        TritonBackend(kernel="v2", fused="yes")


# ----------------------------------------------------------------------------- drop-in partial
def _path(batch_size):
    torch.manual_seed(0)
    model = R.MLP()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = reptile_fast.reptile(model, 2, R.sample_task,
                                     functools.partial(R.perform_k_training_steps, batch_size=batch_size),
                                     progress=False)
    return stats["path"], stats["inner_batch_size"], [str(w.message) for w in caught]


def test_partial_with_numpy_batch_size_runs_the_fast_path_like_an_int():
    fast = _path(5)
    got = _path(np.int64(5))
    assert fast[0] != "reference" and fast[1] == 5
    assert got[:2] == fast[:2], got
    assert type(got[1]) is int
