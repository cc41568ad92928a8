"""QA65 (session 25): a model changed by a callback while ``fit`` runs.

Backend compiled (and triton's fused stepper) build their program when ``fit`` starts; an
activation swapped or a hook registered from a ``fit`` callback was then ignored for the rest of
the fit without a word, while backends reference and torch follow it from the next meta-step.
Now such a change is a ``ValueError`` at the end of the chunk in which it happened
(``callbacks.ModelWatchCallback``); the next ``fit`` rebuilds the program for the changed model.
"""
import pytest
import torch
import torch.nn as nn

from reptile_fast import Reptile, Sine
from reptile_fast import native_step


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(1, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 1))


def _fit(backend, options=None, change=None, at=3, iterations=8):
    model = _model()
    trainer = Reptile(model, backend=backend, backend_options=options, outer_lr=0.5, inner_steps=2,
                      inner_batch_size=5)

    def callback(iteration, metrics):
        if change is not None and iteration == at:
            change(model)

    trainer.fit(Sine(), iterations, progress=False, generator=torch.Generator().manual_seed(0), callback=callback)
    return trainer, [p.detach().clone() for p in model.parameters()]


def _swap(model):
    model[1] = nn.ReLU()
    model[3] = nn.ReLU()


def _hook(model):
    model[4].register_forward_hook(lambda mod, inp, out: out * 0.5)


needs_cc = pytest.mark.skipif(native_step.find_compiler() is None, reason="no C compiler here")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("REPTILE_FAST_CACHE_DIR", str(tmp_path / "cache"))


@needs_cc
@pytest.mark.parametrize("change", [_swap, _hook], ids=["activation swapped", "hook registered"])
def test_compiled_refuses_a_model_changed_during_fit(change):
    with pytest.raises(ValueError, match="the model changed during fit, before meta-step 4.*compiled program"):
        _fit("compiled", {"chunk": 1}, change)


@needs_cc
def test_after_the_refusal_the_next_fit_trains_the_changed_model():
    model = _model()
    trainer = Reptile(model, backend="compiled", backend_options={"chunk": 1}, outer_lr=0.5, inner_steps=2,
                      inner_batch_size=5)
    with pytest.raises(ValueError, match="changed during fit"):
        trainer.fit(Sine(), 8, progress=False, generator=torch.Generator().manual_seed(0),
                    callback=lambda i, m: _swap(model) if i == 3 else None)
    assert trainer.iteration == 3
    ref_model = _model()
    _swap(ref_model)
    ref = Reptile(ref_model, backend="reference", outer_lr=0.5, inner_steps=2, inner_batch_size=5)
    with torch.no_grad():
        for a, b in zip(ref_model.parameters(), model.parameters()):
            a.copy_(b)
    ref.iteration = trainer.iteration
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    trainer.fit(Sine(), 6 + 3, progress=False, generator=g1)
    ref.fit(Sine(), 6 + 3, progress=False, generator=g2)
    for a, b in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", [_swap, _hook], ids=["activation swapped", "hook registered"])
def test_eager_backends_follow_a_change_during_fit(change):
    _, want = _fit("reference", change=change)
    _, got = _fit("torch", change=change)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_triton_fused_refuses_an_activation_swapped_during_fit():
    pytest.importorskip("triton")
    with pytest.raises(ValueError, match="the model changed during fit.*triton-fused program"):
        _fit("triton", {"kernel": "v2", "fused": True}, _swap, iterations=5)


@pytest.mark.parametrize("backend,options", [("reference", None), ("torch", None), ("compiled", {"chunk": 1}),
                                             ("triton", {"kernel": "v2", "fused": True})],
                         ids=["reference", "torch", "compiled", "triton-fused"])
def test_a_callback_that_changes_nothing_changes_nothing(backend, options):
    if backend == "triton":
        pytest.importorskip("triton")
    if backend == "compiled" and native_step.find_compiler() is None:
        pytest.skip("no C compiler here")
    _, with_callback = _fit(backend, options, change=lambda model: None, iterations=5)
    model = _model()
    trainer = Reptile(model, backend=backend, backend_options=options, outer_lr=0.5, inner_steps=2,
                      inner_batch_size=5)
    trainer.fit(Sine(), 5, progress=False, generator=torch.Generator().manual_seed(0))
    for a, b in zip(with_callback, model.parameters()):
        assert torch.equal(a, b)
