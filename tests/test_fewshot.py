"""Few-shot evaluation (reptile_fast.fewshot) against hand-written oracles on tiny models."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

from reptile_fast import OmniglotConvNet, Reptile, TaskBatch
from reptile_fast.fewshot import (evaluate_episodes, mean_ci95, nearest_neighbour_predictions,
                                  query_logits, score_predictions)
from reptile_fast.tasks import Episodes, sample_indices

WAYS, SHOTS, QUERIES, T = 3, 2, 2, 4


def tiny_conv(bn: bool = True) -> nn.Module:
    torch.manual_seed(0)
    if bn:
        return OmniglotConvNet(WAYS, channels=4, image_size=8, n_blocks=2)
    return nn.Sequential(nn.Conv2d(1, 4, 3, stride=2, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, WAYS))


def episodes(seed: int = 0, n: int = T) -> Episodes:
    g = torch.Generator().manual_seed(seed)
    # class c images: a class pattern plus noise, so adaptation has something to learn
    proto = torch.rand(WAYS, 1, 8, 8, generator=g)
    ys = torch.arange(WAYS).repeat_interleave(SHOTS).expand(n, -1).contiguous()
    yq = torch.arange(WAYS).repeat_interleave(QUERIES).expand(n, -1).contiguous()
    xs = proto[ys] + 0.5 * torch.rand(n, WAYS * SHOTS, 1, 8, 8, generator=g)
    xq = proto[yq] + 0.5 * torch.rand(n, WAYS * QUERIES, 1, 8, 8, generator=g)
    return Episodes(TaskBatch(xs, ys), TaskBatch(xq, yq), WAYS)


def trainer_for(model) -> Reptile:
    return Reptile(model, inner_lr=0.05, inner_steps=2, inner_batch_size=3, loss="cross_entropy",
                   inner_optimizer="adam")


def oracle_predictions(model, ep: Episodes, steps: int, batch: int, transductive: bool, seed: int):
    """Per task: a deep copy of the model trained by torch.optim.Adam(β1 = 0) on the same
    minibatches, then each query image predicted in a batch with the support set (or all query
    images together), BatchNorm in train mode."""
    plan = sample_indices(ep.n_tasks, steps, ep.support.n_points, batch,
                          generator=torch.Generator().manual_seed(seed))
    preds = torch.empty(ep.query.y.shape, dtype=torch.long)
    for t in range(ep.n_tasks):
        m = copy.deepcopy(model).train()
        opt = torch.optim.Adam(m.parameters(), lr=0.05, betas=(0.0, 0.999))
        for s in range(steps):
            idx = plan[t, s]
            opt.zero_grad()
            nn.functional.cross_entropy(m(ep.support.x[t, idx]), ep.support.y[t, idx]).backward()
            opt.step()
        with torch.no_grad():
            if transductive:
                preds[t] = m(ep.query.x[t]).argmax(-1)
            else:
                for q in range(ep.query.n_points):
                    batch_x = torch.cat([ep.support.x[t], ep.query.x[t, q:q + 1]])
                    preds[t, q] = m(batch_x)[-1].argmax()
    return preds


@pytest.mark.parametrize("transductive", [False, True])
def test_accuracy_matches_a_hand_computed_oracle(transductive):
    model = tiny_conv(bn=True)
    ep = episodes()
    before = copy.deepcopy(model.state_dict())
    result = evaluate_episodes(trainer_for(model), ep, steps=3, batch_size=3, transductive=transductive,
                               generator=torch.Generator().manual_seed(7))
    expected = oracle_predictions(model, ep, 3, 3, transductive, 7)
    assert torch.equal(result.predictions, expected)
    per_task = (expected == ep.query.y).double().mean(1)
    assert torch.equal(result.per_task, per_task)
    assert result.accuracy == pytest.approx(float(per_task.mean()), abs=1e-12)
    assert result.ci95 == pytest.approx(1.96 * float(per_task.std()) / math.sqrt(T), abs=1e-12)
    # the model (φ and its BatchNorm buffers) is untouched, and its mode restored
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert model.training


def test_query_logits_match_a_per_query_loop():
    model = tiny_conv(bn=True)
    ep = episodes()
    params = trainer_for(model).adapt(ep.support, 3, generator=torch.Generator().manual_seed(0)).params
    for transductive in (False, True):
        got = query_logits(model, params, ep.support.x, ep.query.x, transductive=transductive)
        want = torch.empty_like(got)
        for t in range(T):
            m = copy.deepcopy(model).train()
            m.load_state_dict({**m.state_dict(), **{k: v[t] for k, v in params.items()}})
            with torch.no_grad():
                if transductive:
                    want[t] = m(ep.query.x[t])
                else:
                    for q in range(ep.query.n_points):
                        want[t, q] = m(torch.cat([ep.support.x[t], ep.query.x[t, q:q + 1]]))[-1]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_transduction_matters_only_with_batchnorm():
    ep = episodes()
    for bn in (True, False):
        model = tiny_conv(bn=bn)
        params = trainer_for(model).adapt(ep.support, 3, generator=torch.Generator().manual_seed(0)).params
        plain = query_logits(model, params, ep.support.x, ep.query.x, transductive=False)
        trans = query_logits(model, params, ep.support.x, ep.query.x, transductive=True)
        if bn:
            assert (plain - trans).abs().max() > 1e-3  # batch statistics differ
        else:
            torch.testing.assert_close(plain, trans, rtol=1e-5, atol=1e-6)


def test_non_transductive_predictions_ignore_the_other_queries():
    """Changing one query image never changes another query's prediction (it does transductively)."""
    model = tiny_conv(bn=True)
    ep = episodes()
    params = trainer_for(model).adapt(ep.support, 3, generator=torch.Generator().manual_seed(0)).params
    qx = ep.query.x.clone()
    qx[:, 0] = 10 * torch.rand_like(qx[:, 0])
    for transductive, same in ((False, True), (True, False)):
        a = query_logits(model, params, ep.support.x, ep.query.x, transductive=transductive)[:, 1:]
        b = query_logits(model, params, ep.support.x, qx, transductive=transductive)[:, 1:]
        assert torch.equal(a, b) == same


def test_chunking_does_not_change_the_result():
    model = tiny_conv(bn=True)
    ep = episodes(n=3)  # 2 queries × (6 support + 1) = 42 images per task: chunks of 1, 2 and 3 tasks
    runs = [evaluate_episodes(trainer_for(model), ep, steps=2, batch_size=4, max_images=m,
                              generator=torch.Generator().manual_seed(1)) for m in (1, 84, 10_000)]
    for r in runs[1:]:
        assert torch.equal(r.predictions, runs[0].predictions)


def test_mean_ci95_and_scores():
    v = torch.tensor([0.2, 0.6, 1.0, 0.8])
    mean, half = mean_ci95(v)
    assert mean == pytest.approx(0.65)
    sd = math.sqrt(sum((x - 0.65) ** 2 for x in (0.2, 0.6, 1.0, 0.8)) / 3)
    assert half == pytest.approx(1.96 * sd / 2)
    assert math.isnan(mean_ci95(torch.tensor([1.0]))[1])
    r = score_predictions(torch.tensor([[0, 1, 2], [0, 0, 0]]), torch.tensor([[0, 1, 1], [0, 1, 2]]))
    assert torch.allclose(r.per_task, torch.tensor([2 / 3, 1 / 3], dtype=torch.float64))
    assert r.as_dict()["queries_per_task"] == 3
    assert score_predictions(torch.tensor([[1]]), torch.tensor([[1]])).as_dict()["ci95"] is None
    with pytest.raises(ValueError):
        score_predictions(torch.zeros(2, 3, dtype=torch.long), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ValueError):
        mean_ci95(torch.zeros(0))


def test_nearest_neighbour_baseline_by_hand():
    s = torch.tensor([[[0.0, 0.0]], [[1.0, 1.0]], [[5.0, 5.0]]]).reshape(1, 3, 1, 1, 2)
    q = torch.tensor([[0.9, 0.8], [4.0, 4.5], [0.1, 0.0]]).reshape(1, 3, 1, 1, 2)
    ep = Episodes(TaskBatch(s, torch.tensor([[2, 0, 1]])), TaskBatch(q, torch.tensor([[0, 1, 2]])), 3)
    assert nearest_neighbour_predictions(ep).tolist() == [[0, 1, 2]]


def test_episodes_validation():
    ep = episodes()
    with pytest.raises(ValueError, match="out of range"):
        Episodes(ep.support, ep.query, 2)
    with pytest.raises(ValueError, match="tasks"):
        Episodes(ep.support, ep.query[0:2], WAYS)
    with pytest.raises(TypeError, match="TaskBatch"):
        Episodes(ep.support.x, ep.query, WAYS)
    regression = TaskBatch(ep.query.x, torch.zeros(T, ep.query.n_points, 1))
    with pytest.raises(TypeError, match="class labels"):
        Episodes(ep.support, regression, WAYS)
    assert ep[1:3].n_tasks == 2


def test_bad_input():
    model = tiny_conv(bn=True)
    tr = trainer_for(model)
    ep = episodes()
    with pytest.raises(ValueError, match="exceeds the support set"):
        evaluate_episodes(tr, ep, steps=2, batch_size=7)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        evaluate_episodes(tr, ep, steps=0, batch_size=2)
    with pytest.raises(TypeError, match="Reptile"):
        evaluate_episodes(model, ep, steps=1, batch_size=2)
    with pytest.raises(TypeError, match="Episodes"):
        evaluate_episodes(tr, ep.support, steps=1, batch_size=2)
    with pytest.raises(TypeError, match="transductive"):
        evaluate_episodes(tr, ep, steps=1, batch_size=2, transductive="yes")
    small = Reptile(OmniglotConvNet(2, channels=4, image_size=8, n_blocks=2), inner_batch_size=2,
                    loss="cross_entropy")
    with pytest.raises(ValueError, match="out of range"):  # labels 0..2 for a 2-output model
        evaluate_episodes(small, ep, steps=1, batch_size=2)


def test_query_logits_bad_input():
    model = tiny_conv(bn=True)
    ep = episodes()
    params = {n: p.detach().expand(T, *p.shape) for n, p in model.named_parameters()}
    with pytest.raises(TypeError, match="params"):
        query_logits(model, [], ep.support.x, ep.query.x)
    with pytest.raises(ValueError, match="tasks"):
        query_logits(model, params, ep.support.x[:2], ep.query.x[:2])
    with pytest.raises(ValueError, match=r"\[T, S, \*image\]"):
        query_logits(model, params, ep.support.x, ep.query.x[0])


def test_a_model_with_more_outputs_predicts_among_the_tasks_classes():
    torch.manual_seed(0)
    wide = OmniglotConvNet(WAYS + 4, channels=4, image_size=8, n_blocks=2)
    with torch.no_grad():
        wide.classifier.bias[WAYS:] = 100.0  # the extra outputs would win every argmax
    result = evaluate_episodes(trainer_for(wide), episodes(), steps=1, batch_size=3,
                               generator=torch.Generator().manual_seed(0))
    assert int(result.predictions.max()) < WAYS


@pytest.mark.parametrize("kwargs, name", [({"n_classes": 2.5}, "n_classes"), ({"n_classes": True}, "n_classes"),
                                          ({"channels": 0}, "channels"), ({"image_size": "28"}, "image_size"),
                                          ({"n_blocks": 1.0}, "n_blocks")])
def test_omniglot_convnet_names_a_bad_size(kwargs, name):
    """Sizes that are not positive ints get a ValueError naming the argument (a float reached
    torch's tensor constructor, a string failed on '<')."""
    with pytest.raises(ValueError, match=f"OmniglotConvNet {name} must be a positive int"):
        OmniglotConvNet(**kwargs)


class _GRUNet(nn.Module):
    """A recurrent layer reads each 8×8 image row by row: its gradient-free forward is one fused
    op without a vmap batching rule."""

    def __init__(self):
        super().__init__()
        self.rnn = nn.GRU(8, 6, batch_first=True)
        self.head = nn.Linear(6, WAYS)

    def forward(self, x):
        out, _ = self.rnn(x.reshape(x.shape[0], 8, 8))
        return self.head(out[:, -1])


@pytest.mark.parametrize("transductive", [False, True])
def test_models_vmap_cannot_batch_are_evaluated_one_by_one(transductive):
    """BatchNorm with momentum=None (trained on backend "reference", as "auto" picks) and a GRU
    crashed in query_logits with vmap's RuntimeError; they now match the per-task oracle."""
    model = tiny_conv(bn=True)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = None  # cumulative average: vmap cannot read its batch count
    trainer = trainer_for(model)
    assert trainer.backend.name == "reference"
    ep = episodes()
    result = evaluate_episodes(trainer, ep, steps=3, batch_size=3, transductive=transductive,
                               generator=torch.Generator().manual_seed(7))
    assert torch.equal(result.predictions, oracle_predictions(model, ep, 3, 3, transductive, 7))

    torch.manual_seed(1)
    gru = _GRUNet()
    params = trainer_for(gru).adapt(ep.support, 2, generator=torch.Generator().manual_seed(0)).params
    got = query_logits(gru, params, ep.support.x, ep.query.x, transductive=transductive)
    want = torch.empty_like(got)
    for t in range(T):
        m = copy.deepcopy(gru)
        m.load_state_dict({k: v[t] for k, v in params.items()})
        with torch.no_grad():
            want[t] = m(ep.query.x[t])  # no BatchNorm: the batch does not matter
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_with_dropout_is_evaluated():
    """Dropout (train mode, as evaluation runs the model) crashed query_logits' vmap ("random
    operation while in randomness error mode"); masks are now drawn per task and query."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, WAYS))
    ep = episodes()
    for transductive in (False, True):
        result = evaluate_episodes(trainer_for(model), ep, steps=2, batch_size=3, transductive=transductive,
                                   generator=torch.Generator().manual_seed(0))
        assert result.predictions.shape == ep.query.y.shape
        assert 0 <= int(result.predictions.min()) and int(result.predictions.max()) < WAYS


def test_query_logits_and_scores_name_bad_arguments():
    """A params dict missing a parameter was completed silently with φ's own tensor by
    functional_call; lists and mismatched image shapes failed with AttributeError/RuntimeError;
    float predictions were scored as labels."""
    model = tiny_conv(bn=True)
    ep = episodes()
    params = {n: p.detach().expand(T, *p.shape) for n, p in model.named_parameters()}
    partial = {n: v for n, v in params.items() if n != "classifier.bias"}
    with pytest.raises(ValueError, match=r"missing \['classifier.bias'\], unknown \[\]"):
        query_logits(model, partial, ep.support.x, ep.query.x)
    with pytest.raises(ValueError, match=r"unknown \['extra'\]"):
        query_logits(model, {**params, "extra": params["classifier.bias"]}, ep.support.x, ep.query.x)
    with pytest.raises(TypeError, match="support_x and query_x must be tensors"):
        query_logits(model, params, ep.support.x.tolist(), ep.query.x)
    for transductive in (False, True):
        with pytest.raises(ValueError, match="same image shape"):
            query_logits(model, params, ep.support.x, ep.query.x[..., :6, :6], transductive=transductive)
    with pytest.raises(TypeError, match="predictions must be an integer tensor"):
        score_predictions([[0, 1]], torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="predictions must be an integer tensor"):
        score_predictions(torch.tensor([[0.0, 1.0]]), torch.tensor([[0, 1]]))
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        score_predictions(torch.tensor([[0, 1]]), torch.tensor([[True, False]]))
