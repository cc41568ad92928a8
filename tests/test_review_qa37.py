"""QA37: held-out-style checks of issues 13 (few-shot Omniglot / Mini-ImageNet), 14 (torchrun)
and 8 (the drop-in ``reptile()``), written from the issues' texts and the README, against
independent computations: a float64 re-implementation of the paper's conv net, its inner Adam
(β1 = 0, fresh state per task) and the few-shot protocol; one process against a 2-rank gloo job;
the seed program's own loop fed the same draws."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import _fake_omniglot as fake
from conftest import OMNIGLOT

from reptile_fast import (MLP, MiniImageNet, MiniImageNetConvNet, Omniglot, OmniglotConvNet,
                          ReferencePathWarning, Reptile, TaskBatch, reptile, sample_indices)
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.tasks import Episodes
from reptile_fast.tasks.omniglot import ROTATIONS, load_official_runs

ROOT = Path(__file__).resolve().parents[1]


# ====================================================================== oracles
def conv_forward(p, x, *, pools=False):
    """The paper's nets with plain functional ops (BatchNorm on batch statistics), from ``p``:
    a dict ``name -> tensor`` of an ``OmniglotConvNet`` (``pools=False``: stride-2 convs) or a
    ``MiniImageNetConvNet`` (``pools=True``: stride-1 convs, max-pool 2 rounding up)."""
    h = x
    for i in range(4):
        c, b = f"features.{(4 if pools else 3) * i}", f"features.{(4 if pools else 3) * i + 1}"
        h = F.conv2d(h, p[c + ".weight"], p[c + ".bias"], stride=1 if pools else 2, padding=1)
        h = F.batch_norm(h, None, None, p[b + ".weight"], p[b + ".bias"], training=True, eps=1e-5)
        h = F.relu(h)
        if pools:
            h = F.max_pool2d(h, 2, ceil_mode=True)
    return F.linear(h.flatten(1), p["classifier.weight"], p["classifier.bias"])


def adam_adapt(p0, x, y, plan, lr, beta2=0.999, eps=1e-8, pools=False):
    """One task's inner loop: Adam with β1 = 0 and a fresh state, mean cross-entropy, on the
    minibatches ``plan`` [steps, batch] of (x [N, ...], y [N]); returns the adapted dict."""
    p = {k: v.clone() for k, v in p0.items()}
    v2 = {k: torch.zeros_like(v) for k, v in p.items()}
    for t, rows in enumerate(plan, start=1):
        names = list(p)
        leaves = [p[k].detach().requires_grad_(True) for k in names]
        loss = F.cross_entropy(conv_forward(dict(zip(names, leaves)), x[rows], pools=pools), y[rows])
        grads = torch.autograd.grad(loss, leaves)
        with torch.no_grad():
            for k, g, leaf in zip(names, grads, leaves):
                v2[k] = beta2 * v2[k] + (1 - beta2) * g * g
                denom = (v2[k] / (1 - beta2 ** t)).sqrt() + eps
                p[k] = leaf.detach() - lr * g / denom
    return p


#: how far inner Adam (lr 0.01, eps 1e-8, 3 steps) and the outer step (0.7) can move a parameter
#: whose gradient is exactly 0 but computes as float64 rounding noise: |g| <= 1e-13 (a sum of
#: <= 1e3 terms of size <= 1, u = 1.1e-16) moves it by <= lr·|g|/eps per step
CANCELLED_ATOL = 3 * 0.01 * 1e-13 / 1e-8 * 0.7


def cancelled_by_batchnorm(name: str, pools: bool) -> bool:
    """A conv bias feeding BatchNorm: its gradient is 0 in exact arithmetic, so Adam moves it by
    its rounding noise, either way (``CANCELLED_ATOL``; the two computations' noise differs by
    machine: 1.2e-9 on session 16's AMD EPYC, where 1e-9 was the bound)."""
    parts = name.split(".")
    return parts[0] == "features" and parts[-1] == "bias" and int(parts[1]) % (4 if pools else 3) == 0


def params_of(model):
    return {n: q.detach().clone() for n, q in model.named_parameters()}


@pytest.fixture(scope="module")
def fake_data(tmp_path_factory):
    """Two fake Omniglot zips sharing the alphabet Beta, a folder copy of the first, and runs."""
    root = tmp_path_factory.mktemp("omni")
    folder1 = fake.make_folder(root / "f1", {"Alpha": 3, "Beta": 2}, prefix="images_background_small1")
    folder2 = fake.make_folder(root / "f2", {"Beta": 2, "Gamma": 3}, prefix="images_background_small2")
    return {"folder1": folder1,
            "zip1": fake.make_zip(folder1, root / "images_background_small1.zip"),
            "zip2": fake.make_zip(folder2, root / "images_background_small2.zip"),
            "runs3": fake.make_zip(fake.make_runs(root / "r3", n_runs=2, ways=3), root / "runs3.zip"),
            "runs2": fake.make_runs(root / "r2", n_runs=2, ways=2),
            "root": root}


# ====================================================================== issue 13: models
@pytest.mark.parametrize("kind", ["omniglot", "miniimagenet"])
def test_paper_nets_are_the_papers_architecture(kind):
    """4 × [conv 3×3, BatchNorm, ReLU (, max-pool 2)] + linear, computed with functional ops."""
    torch.manual_seed(1)
    if kind == "omniglot":
        model, x = OmniglotConvNet(5).double(), torch.rand(7, 1, 28, 28, dtype=torch.float64)
        convs, width = [m for m in model.modules() if isinstance(m, nn.Conv2d)], 64
        assert model.classifier.in_features == 64 * 2 * 2
    else:
        model, x = MiniImageNetConvNet(5).double(), torch.rand(3, 3, 84, 84, dtype=torch.float64)
        convs, width = [m for m in model.modules() if isinstance(m, nn.Conv2d)], 32
        assert model.classifier.in_features == 32 * 6 * 6
    assert len(convs) == 4 and all(c.kernel_size == (3, 3) and c.out_channels == width for c in convs)
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4
    model.train()
    out = model(x)
    assert out.shape == (x.shape[0], 5)
    torch.testing.assert_close(out, conv_forward(params_of(model), x, pools=kind != "omniglot"),
                               rtol=1e-12, atol=1e-12)


# ====================================================================== issue 13: one meta-step
def _generated_miniimagenet(root: Path, size: int = 10) -> Path:
    from PIL import Image

    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    lines = ["filename,label"]
    for c in ("n01", "n02", "n03", "n04"):
        for k in range(3):
            Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(root / "images" / f"{c}{k}.png")
            lines.append(f"{c}{k}.png,{c}")
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("net", ["omniglot", "miniimagenet"])
def test_one_reptile_meta_step_of_the_papers_nets_equals_a_float64_oracle(fake_data, tmp_path, backend, net):
    """Inner Adam (β1 = 0, fresh state per task) on the paper's conv nets, tasks drawn by the
    task families (Omniglot with rotations; Mini-ImageNet's layout), then φ + ε·mean(φ̃ − φ)."""
    pools = net == "miniimagenet"
    if pools:
        family = MiniImageNet(_generated_miniimagenet(tmp_path), "train", ways=3, shots=2, query_shots=0,
                              image_size=10)
    else:
        family = Omniglot(fake_data["zip1"], ways=3, shots=2, query_shots=0, rotations=ROTATIONS)
    g = torch.Generator().manual_seed(3)
    t32 = family.sample(3, generator=g)
    tasks = TaskBatch(t32.x.double(), t32.y)
    plan = sample_indices(3, 3, 6, 4, generator=g)
    torch.manual_seed(2)
    model = (MiniImageNetConvNet(3, channels=4, image_size=10) if pools else OmniglotConvNet(3, channels=4)).double()
    phi = params_of(model)
    trainer = Reptile(model, inner_lr=0.01, inner_steps=3, inner_batch_size=4, outer_lr=0.7,
                      loss="cross_entropy", inner_optimizer="adam", backend=backend)
    trainer.meta_step(tasks, plan)
    adapted = [adam_adapt(phi, tasks.x[i], tasks.y[i], plan[i], 0.01, pools=pools) for i in range(3)]
    for name, value in model.named_parameters():
        want = phi[name] + 0.7 * torch.stack([a[name] - phi[name] for a in adapted]).mean(0)
        torch.testing.assert_close(value.detach(), want, rtol=1e-10,
                                   atol=CANCELLED_ATOL if cancelled_by_batchnorm(name, pools) else 1e-12, msg=name)
    # buffers are not meta-learned (the seed's deep copy)
    assert torch.equal(model.features[1].running_mean, torch.zeros(4, dtype=torch.float64))


# ====================================================================== issue 13: the protocol
@pytest.mark.parametrize("transductive", [False, True])
def test_evaluate_episodes_is_the_papers_protocol(fake_data, transductive):
    """Adapt on the support set only, predict each query with the support set (or all queries in
    one batch), BatchNorm on batch statistics; accuracy per task, CI 1.96·std/√T."""
    test = Omniglot(fake_data["zip2"], ways=3, shots=2, query_shots=2)
    episodes = test.sample_episodes(4, generator=torch.Generator().manual_seed(4))
    episodes = Episodes(TaskBatch(episodes.support.x.double(), episodes.support.y),
                        TaskBatch(episodes.query.x.double(), episodes.query.y), 3)
    torch.manual_seed(5)
    model = OmniglotConvNet(3, channels=4).double()
    model.eval()  # the protocol runs train mode regardless, and restores the mode after
    trainer = Reptile(model, inner_lr=0.05, inner_steps=5, inner_batch_size=4, loss="cross_entropy",
                      inner_optimizer="adam", backend="torch")
    phi = params_of(model)
    res = evaluate_episodes(trainer, episodes, steps=4, batch_size=3, transductive=transductive,
                            generator=torch.Generator().manual_seed(6))
    assert not model.training and all(torch.equal(v, phi[k]) for k, v in params_of(model).items())
    plan = sample_indices(4, 4, 6, 3, generator=torch.Generator().manual_seed(6))
    preds = []
    for t in range(4):
        p = adam_adapt(phi, episodes.support.x[t], episodes.support.y[t], plan[t], 0.05)
        sx, qx = episodes.support.x[t], episodes.query.x[t]
        with torch.no_grad():
            if transductive:
                logits = conv_forward(p, qx)
            else:
                logits = torch.stack([conv_forward(p, torch.cat([sx, qx[q:q + 1]]))[-1] for q in range(len(qx))])
        preds.append(logits.argmax(-1))
    preds = torch.stack(preds)
    assert torch.equal(res.predictions, preds)
    per_task = (preds == episodes.query.y).double().mean(1)
    torch.testing.assert_close(res.per_task, per_task)
    assert res.accuracy == pytest.approx(float(per_task.mean()), abs=1e-15)
    assert res.ci95 == pytest.approx(1.96 * float(per_task.std()) / 2.0, abs=1e-12)


# ====================================================================== issue 13: data
def _decoded(path: Path) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as img:
        a = np.asarray(img.convert("L"), dtype=np.float32) / 255.0
    return 1.0 - torch.from_numpy(a)


def test_omniglot_reads_folder_and_zip_alike_with_strokes_one(fake_data):
    a = Omniglot(fake_data["folder1"], ways=2)
    b = Omniglot(fake_data["zip1"], ways=2)
    assert a.data.characters == b.data.characters and torch.equal(a.data.images, b.data.images)
    assert a.alphabets == ["Alpha", "Beta"] and a.n_characters == 5
    files = sorted(fake_data["folder1"].rglob("*.png"))
    assert a.data.images.shape == (len(files), 1, 28, 28) and a.data.images.dtype == torch.float32
    want = torch.stack([_decoded(f) for f in files]).unsqueeze(1)
    torch.testing.assert_close(a.data.images, want, rtol=0, atol=1e-6)


def _which(img, bank):
    d = (bank - img).flatten(1).abs().amax(1)
    return int(d.argmin()) if float(d.min()) < 1e-6 else None


@pytest.mark.parametrize("rot", [90, 180, 270])
def test_rotations_are_extra_classes_of_rotated_images(fake_data, rot):
    train = Omniglot(fake_data["zip1"], ways=3, shots=2, query_shots=0, rotations=(rot,))
    assert train.n_classes == 5
    bank = train.data.images[:, 0]
    rotated = torch.rot90(bank, rot // 90, dims=(-2, -1))
    tasks = train.sample(4, generator=torch.Generator().manual_seed(7))
    assert tasks.x.shape == (4, 6, 1, 28, 28) and tasks.y.shape == (4, 6)
    assert torch.equal(tasks.y, torch.arange(3).repeat_interleave(2).expand(4, 6))  # class-major
    for t in range(4):
        chars = []
        for i in range(6):
            j = _which(tasks.x[t, i, 0], rotated)
            assert j is not None and _which(tasks.x[t, i, 0], bank) is None
            chars.append(int((train.data.table == j).nonzero()[0, 0]))
        assert chars[0::2] == chars[1::2] and len(set(chars)) == 3  # one character per class


def test_episodes_support_and_query_are_disjoint_images_of_the_same_classes(fake_data):
    test = Omniglot(fake_data["zip2"], ways=3, shots=2, query_shots=2, alphabets=["Gamma"])
    ep = test.sample_episodes(5, generator=torch.Generator().manual_seed(8))
    assert ep.support.x.shape == (5, 6, 1, 28, 28) and ep.query.x.shape == (5, 6, 1, 28, 28)
    bank = test.data.images[:, 0]
    for t in range(5):
        s = [_which(ep.support.x[t, i, 0], bank) for i in range(6)]
        q = [_which(ep.query.x[t, i, 0], bank) for i in range(6)]
        assert None not in s + q and not set(s) & set(q)
        char = lambda j: int((test.data.table == j).nonzero()[0, 0])  # noqa: E731
        for c in range(3):
            cs = {char(s[i]) for i in range(6) if ep.support.y[t, i] == c}
            cq = {char(q[i]) for i in range(6) if ep.query.y[t, i] == c}
            assert len(cs) == 1 and cs == cq
            assert test.data.characters[cs.pop()][0] == "Gamma"


@pytest.mark.skipif(not (OMNIGLOT / "all_runs.zip").is_file(), reason="../shared/data/omniglot is absent")
def test_real_official_runs_and_background_set():
    """The 20 official runs: 20-way 1-shot, query labels as each run's class_labels.txt says;
    small1: 5 alphabets, 136 characters of 20 drawings, 105×105 read as 28×28 strokes-one."""
    episodes, names = load_official_runs(OMNIGLOT / "all_runs.zip")
    assert names == [f"run{r:02d}" for r in range(1, 21)] and episodes.ways == 20
    assert episodes.support.x.shape == (20, 20, 1, 28, 28) == episodes.query.x.shape
    with zipfile.ZipFile(OMNIGLOT / "all_runs.zip") as zf:
        for r, name in enumerate(names):
            lines = zf.read(f"{name}/class_labels.txt").decode().split()
            want = [int(lines[i + 1].split("class")[-1].split(".")[0]) - 1 for i in range(0, len(lines), 2)]
            assert episodes.query.y[r].tolist() == want
    assert episodes.support.y.tolist() == [list(range(20))] * 20
    assert float(episodes.support.x.mean()) < 0.2  # ink 1 on a 0 background: mostly background
    # the README's pixel 1-NN error on the runs: 79.3 % at 28×28, 81.0 % at 105×105
    from reptile_fast.fewshot import nearest_neighbour_predictions, score_predictions

    nn_acc = score_predictions(nearest_neighbour_predictions(episodes), episodes.query.y).accuracy
    assert 1 - nn_acc == pytest.approx(0.7925, abs=1e-12)
    full, _ = load_official_runs(OMNIGLOT / "all_runs.zip", image_size=105)
    assert 1 - score_predictions(nearest_neighbour_predictions(full), full.query.y).accuracy == pytest.approx(0.81)
    # the README's split: small1's 5 alphabets (544 classes with rotations) against small2's three others
    small1 = Omniglot(OMNIGLOT / "images_background_small1.zip", ways=20, rotations=ROTATIONS)
    assert len(small1.alphabets) == 5 and small1.n_characters == 136 and small1.n_classes == 544
    assert small1.data.images.shape == (2720, 1, 28, 28)
    test = Omniglot(OMNIGLOT / "images_background_small2.zip", ways=20, exclude_alphabets=small1.alphabets)
    assert test.alphabets == ["Japanese_(katakana)", "Sanskrit", "Tagalog"] and test.n_characters == 106


def test_miniimagenet_standard_layout_on_generated_images(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for split, classes in (("train", ["n01", "n02", "n03"]), ("test", ["n07", "n08"])):
        lines = ["filename,label"]
        for c in classes:
            for k in range(3):
                name = f"{c}_{k}.jpg"
                Image.fromarray(rng.integers(0, 256, (84, 84, 3), dtype=np.uint8)).save(tmp_path / "images" / name)
                lines.append(f"{name},{c}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    mi = MiniImageNet(tmp_path, "test", ways=2, shots=1, query_shots=2)
    ep = mi.sample_episodes(3, generator=torch.Generator().manual_seed(0))
    assert ep.support.x.shape == (3, 2, 3, 84, 84) and ep.query.x.shape == (3, 4, 3, 84, 84)
    assert ep.support.x.dtype == torch.float32 and 0 <= float(ep.support.x.min()) and float(ep.support.x.max()) <= 1
    tb = MiniImageNet(tmp_path, "train", ways=3, shots=3, query_shots=0).sample(2, generator=torch.Generator())
    assert tb.x.shape == (2, 9, 3, 84, 84) and torch.equal(tb.y[0], torch.arange(3).repeat_interleave(3))
    # 3-way from 3 classes: every training image is drawn, each its file decoded
    flat = tb.x[0]
    for k in range(3):
        with Image.open(tmp_path / "images" / f"n01_{k}.jpg") as im:
            img = torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1).float() / 255
        assert any(torch.equal(x, img) for x in flat)
    (tmp_path / "val.csv").write_text("filename,label\nn01_0.jpg,n01\nn07_0.jpg,n07\n")
    with pytest.raises(ValueError, match="share"):
        MiniImageNet(tmp_path, "val", ways=2, shots=1, query_shots=0)
    logits = MiniImageNetConvNet(2)(ep.query.x[0])
    assert logits.shape == (4, 2)


# ====================================================================== issue 13: the jobs
def _cli(args):
    from reptile_fast.cli import main

    return main([str(a) for a in args])


def test_omniglot_jobs_end_to_end_on_fake_data(fake_data, tmp_path, capsys):
    """Both jobs straight from zips (train, test and the runs), every K of --shots reported,
    the inner loop the paper's Adam with β1 = 0, the runs' errors per run and refused other ways."""
    out = tmp_path / "run"
    rc = _cli(["omniglot", "--train", fake_data["zip1"], "--test", fake_data["zip2"], "--ways", 3,
               "--shots", 1, 2, "--iterations", 3, "--train-shots", 2, "--eval-tasks", 3, "--eval-steps", 2,
               "--validate-every", 0, "--checkpoint-every", 2, "--no-progress", "--out", out])
    err = capsys.readouterr().err
    assert rc == 0, err
    assert "Alpha" in err and "Beta" in err and "Gamma" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["train_alphabets"] == ["Alpha", "Beta"] and m["test_alphabets"] == ["Gamma"]
    assert 0.0 <= m["test_accuracy"] <= 1.0 and m["test_accuracy_ci95"] is not None
    assert m["train_seconds"] > 0 and [r["shots"] for r in m["results"]] == [1, 2]
    assert m["test_accuracy"] == m["results"][0]["accuracy"]
    assert (out / "model.pt").is_file() and (out / "learning_curve.png").is_file()
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["trainer"]["iteration"] == 3 and m["world_size"] == 1
    hp = ckpt["trainer"]["config"]
    assert (hp["inner_optimizer"], list(hp["adam_betas"]), hp["outer_lr"], hp["outer_lr_final"]) == \
        ("adam", [0.0, 0.999], 1.0, 0.0)
    assert hp["inner_batch_size"] == 6  # the preset's 10, capped at a task's 3 ways × 2 training shots

    # omniglot-runs: 3-way model on 3-way runs; a 2-way set of runs is refused naming both
    rc = _cli(["omniglot-runs", "--runs", fake_data["runs3"], "--model", out, "--out", tmp_path / "r"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    rm = json.loads((tmp_path / "r" / "runs_metrics.json").read_text())
    assert set(rm["per_run_error"]) == {"run01", "run02"} and 0 <= rm["error_rate"] <= 1
    assert rm["error_rate"] == pytest.approx(sum(rm["per_run_error"].values()) / 2)
    assert all(abs(3 * e - round(3 * e)) < 1e-9 for e in rm["per_run_error"].values())  # 3 test items per run
    assert "run01" in captured.err and "run02" in captured.err  # each run's error is printed
    rc = _cli(["omniglot-runs", "--runs", fake_data["runs2"], "--model", out, "--out", tmp_path / "r2"])
    err = capsys.readouterr().err
    assert rc == 2 and "3-way" in err and "2-way" in err



# ====================================================================== issue 8: the drop-in
def _record_seed_run(seed_module, monkeypatch, n_iter, k=1, batch=10, epsilon=0.1):
    """The seed's own loop under manual_seed(0), with its tasks and randperm draws recorded."""
    tasks, perms = [], []
    real_randperm = torch.randperm

    def randperm(*a, **kw):
        out = real_randperm(*a, **kw)
        perms.append(out.clone())
        return out

    def sample_task():
        task = seed_module.sample_task()
        tasks.append(task)
        return task

    torch.manual_seed(0)
    model = seed_module.MLP()
    start = copy.deepcopy(model)
    monkeypatch.setattr(torch, "randperm", randperm)
    inner = seed_module.perform_k_training_steps
    if batch != 10:
        import functools

        inner = functools.partial(inner, batch_size=batch)
    seed_module.reptile(model, n_iter, sample_task, inner, k=k, epsilon=epsilon)
    monkeypatch.setattr(torch, "randperm", real_randperm)
    steps = k * 50 // batch
    indices = torch.stack([p[:batch] for p in perms]).reshape(n_iter, 1, steps, batch)
    return start, model, tasks, indices, inner


@pytest.mark.parametrize("backend,batch", [("auto", 10), ("torch", 10), ("reference", 10), ("auto", 5)])
def test_dropin_fed_the_seeds_draws_equals_the_seeds_program(seed_module, monkeypatch, backend, batch):
    """The issue's check: meta-batch 1, the seed's own task and randperm draws fed, 20 iterations;
    also the seed's function with another batch_size (functools.partial), k·N // batch steps."""
    start, want, tasks, indices, inner = _record_seed_run(seed_module, monkeypatch, 20, batch=batch)
    replay = iter(tasks)
    model = copy.deepcopy(start)
    stats = reptile(model, 20, lambda: next(replay), inner, indices=indices, backend=backend, progress=False)
    assert stats["path"] == ("compiled" if backend == "auto" else backend)
    assert stats["inner_batch_size"] == batch and stats["inner_steps"] == 50 // batch
    assert {"compile_seconds", "train_seconds", "ms_per_iteration"} <= set(stats)
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_dropin_k2_and_epsilon_follow_the_seed(seed_module, monkeypatch):
    start, want, tasks, indices, _ = _record_seed_run(seed_module, monkeypatch, 6, k=2, epsilon=0.35)
    replay = iter(tasks)
    model = copy.deepcopy(start)
    reptile(model, 6, lambda: next(replay), seed_module.perform_k_training_steps, 2, 0.35,
            indices=indices, progress=False)
    for p, q in zip(model.parameters(), want.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_custom_inner_loop_runs_the_seeds_loop_with_one_warning(seed_module):
    custom = lambda m, t, k: seed_module.perform_k_training_steps(m, t, k)  # noqa: E731
    torch.manual_seed(0)
    model = seed_module.MLP()
    start = copy.deepcopy(model)
    torch.manual_seed(1)
    seed_module.reptile(model, 8, seed_module.sample_task, custom, epsilon=0.3)
    mine = copy.deepcopy(start)
    torch.manual_seed(1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        stats = reptile(mine, 8, seed_module.sample_task, custom, epsilon=0.3, progress=False)
    refs = [w for w in caught if issubclass(w.category, ReferencePathWarning)]
    assert len(refs) == 1 and stats["path"] == "reference"
    for p, q in zip(mine.parameters(), model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_dropin_meta_batch_and_cross_entropy_against_an_sgd_oracle():
    """Tasks stacked when meta_batch_size > 1; cross-entropy on class labels; fed plans."""
    g = torch.Generator().manual_seed(9)
    n_iter, mb, N, B = 3, 3, 20, 10
    tasks = [(torch.randn(N, 2, generator=g), torch.randint(0, 3, (N,), generator=g), nn.CrossEntropyLoss())
             for _ in range(n_iter * mb)]
    steps = 2 * N // B
    indices = torch.stack([torch.randperm(N, generator=g)[:B] for _ in range(n_iter * mb * steps)])
    indices = indices.reshape(n_iter, mb, steps, B)
    torch.manual_seed(0)
    model = MLP(2, 16, 3)
    oracle = copy.deepcopy(model).double()
    replay = iter(tasks)
    reptile(model, n_iter, lambda: next(replay), None,
            k=2, epsilon=0.5, meta_batch_size=mb, indices=indices, progress=False, backend="torch")
    for it in range(n_iter):
        deltas = []
        for j in range(mb):
            x, y, _ = tasks[it * mb + j]
            m = copy.deepcopy(oracle)
            for s in range(steps):
                rows = indices[it, j, s]
                loss = F.cross_entropy(m(x[rows].double()), y[rows])
                grads = torch.autograd.grad(loss, list(m.parameters()))
                with torch.no_grad():
                    for p, gr in zip(m.parameters(), grads):
                        p -= 0.02 * gr
            deltas.append([q.detach() - p.detach() for q, p in zip(m.parameters(), oracle.parameters())])
        with torch.no_grad():
            for i, p in enumerate(oracle.parameters()):
                p += 0.5 * torch.stack([d[i] for d in deltas]).mean(0)
    for p, q in zip(model.parameters(), oracle.parameters()):
        torch.testing.assert_close(p.double(), q, rtol=1e-5, atol=1e-6)


# ====================================================================== issue 14: torchrun
_DIST_SCRIPT = textwrap.dedent(r'''
    import json, os, sys, torch
    sys.path.insert(0, {root!r})
    from reptile_fast import MLP, Reptile, Sine
    from reptile_fast.cli import main
    from reptile_fast.distributed import setup_from_env, distributed_fit
    out = {out!r}
    rank = int(os.environ["RANK"])
    torch.set_num_threads(1)
    # one process group for the whole script: the jobs use an initialised default group as it is
    ctx = setup_from_env(device="cpu")
    # 1. the CLI's sine job under torchrun (uneven split: 3 tasks over 2 ranks)
    rc = main(["sine", "--backend", "torch", "--meta-batch-size", "3", "--iterations", "3",
               "--eval-tasks", "2", "--eval-steps", "1", "--checkpoint-every", "2", "--no-progress",
               "--out", os.path.join(out, "cli")])
    res = {{"cli_rc": rc}}
    # the few-shot job under torchrun too (3 tasks over 2 ranks). Every rank validates (rank 0
    # alone writes): a rank waiting in a collective for rank 0's validation failed after the
    # timeout, as if rank 0 had hung. Counted here: rank 0 also runs the final test.
    import reptile_fast.fewshot_job as J
    calls, real = [], J.evaluate_episodes
    J.evaluate_episodes = lambda *a, **k: (calls.append(1), real(*a, **k))[1]
    res["omniglot_rc"] = main(["omniglot", "--train", {zip1!r}, "--test", {zip2!r}, "--ways", "3",
                               "--train-shots", "2", "--iterations", "2", "--meta-batch-size", "3",
                               "--inner-steps", "2", "--eval-tasks", "2", "--eval-steps", "1",
                               "--validate-every", "1", "--validation-tasks", "2", "--no-progress",
                               "--out", os.path.join(out, "omni")])
    J.evaluate_episodes = real
    res["omniglot_evaluations"] = len(calls)
    # 2. the Python API: ordered reduction (reference backend) and a meta-batch below the ranks
    torch.manual_seed(10 + rank)  # other initial seeds: rank 0's φ is broadcast
    trainer = Reptile(MLP(1, 8, 1), backend="reference", inner_steps=2, outer_lr=0.3)
    distributed_fit(trainer, Sine(), 2, meta_batch_size=5, seed=4, context=ctx, reduction="ordered",
                    progress=False)
    torch.save({{n: p.detach() for n, p in trainer.model.named_parameters()}},
               os.path.join(out, f"ordered{{rank}}.pt"))
    try:
        distributed_fit(Reptile(MLP(1, 8, 1), backend="torch"), Sine(), 1, meta_batch_size=1, seed=0,
                        context=ctx, progress=False)
    except ValueError as exc:
        res["small"] = str(exc)
    ctx.close()
    with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
        json.dump(res, f)
''')


def _indexed_oracle(n_iter, meta_batch, seed, make_trainer, plan_rows, batch):
    """One process, meta-step by meta-step, on the indexed sampler's global draws."""
    from reptile_fast.distributed import IndexedSampler

    trainer = make_trainer()
    sampler = IndexedSampler(Sine(n_points=50), meta_batch, seed=seed, plan_rows=plan_rows, batch_size=batch)
    for t in range(n_iter):
        tasks, plan = sampler.draw_step(t)
        trainer.meta_step(tasks, plan)
    return trainer.model


from reptile_fast import Sine  # noqa: E402


def test_torchrun_two_ranks_equal_one_process(tmp_path, fake_data):
    script = tmp_path / "job.py"
    script.write_text(_DIST_SCRIPT.format(root=str(ROOT), out=str(tmp_path), zip1=str(fake_data["zip1"]),
                                          zip2=str(fake_data["zip2"])))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "REPTILE_FAST_DIST_TIMEOUT": "60"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "--log-dir", str(tmp_path / "torchrun_logs"), str(script)], env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert r0["cli_rc"] == r1["cli_rc"] == r0["omniglot_rc"] == r1["omniglot_rc"] == 0
    # two validations on every rank (so none waits for rank 0's), and rank 0's final test
    assert (r0["omniglot_evaluations"], r1["omniglot_evaluations"]) == (3, 2)
    # a meta-batch below the number of ranks: refused on every rank, saying so
    assert "smaller than the number of processes" in r0["small"] and r0["small"] == r1["small"]

    # the CLI job: rank 0 wrote everything, with world_size; the model is one process's
    cli = tmp_path / "cli"
    for name in ("metrics.json", "config.json"):
        assert json.loads((cli / name).read_text())["world_size"] == 2
    got = torch.load(cli / "model.pt", weights_only=True)["state_dict"]

    def sine_trainer():
        torch.manual_seed(0)
        return Reptile(MLP(1, 64, 1), backend="reference", inner_lr=0.02, inner_steps=5, inner_batch_size=10,
                       outer_lr=0.1, loss="mse")

    want = _indexed_oracle(3, 3, 0, sine_trainer, 5, 10)
    for n, p in want.named_parameters():
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)

    # the omniglot job: world_size recorded, validation written by rank 0, the model one process's
    omni = tmp_path / "omni"
    m = json.loads((omni / "metrics.json").read_text())
    assert m["world_size"] == 2 and json.loads((omni / "config.json").read_text())["world_size"] == 2
    assert [v["iteration"] for v in json.loads((omni / "validation.json").read_text())] == [1, 2]
    got = torch.load(omni / "model.pt", weights_only=True)["state_dict"]
    from reptile_fast.distributed import IndexedSampler

    torch.manual_seed(0)
    model = OmniglotConvNet(3)
    trainer = Reptile(model, inner_lr=1e-3, inner_steps=2, inner_batch_size=6, outer_lr=1.0, outer_lr_final=0.0,
                      loss="cross_entropy", inner_optimizer="adam", backend="reference")
    train = Omniglot(fake_data["zip1"], ways=3, shots=2, query_shots=0, rotations=ROTATIONS)
    sampler = IndexedSampler(train, 3, seed=0, plan_rows=2, batch_size=6)
    for t in range(2):
        trainer.outer_lr = 1.0 - t / 2  # the paper's linear annealing to 0
        trainer.meta_step(*sampler.draw_step(t))
    for n, p in model.named_parameters():
        if cancelled_by_batchnorm(n, False):
            continue  # no effect on the function; Adam moves it on fp32 rounding noise
        torch.testing.assert_close(got[n], p.detach(), rtol=1e-4, atol=1e-5, msg=n)

    # ordered reduction on the reference backend: φ bitwise the same on both ranks, and one process's
    o0, o1 = (torch.load(tmp_path / f"ordered{r}.pt", weights_only=True) for r in (0, 1))
    assert all(torch.equal(o0[n], o1[n]) for n in o0)
    from reptile_fast.distributed import DistContext, distributed_fit

    torch.manual_seed(10)
    single = Reptile(MLP(1, 8, 1), backend="reference", inner_steps=2, outer_lr=0.3)
    distributed_fit(single, Sine(), 2, meta_batch_size=5, seed=4, context=DistContext.single(), reduction="ordered",
                    progress=False)
    for n, p in single.model.named_parameters():
        assert torch.equal(o0[n], p.detach()), n

    # resume the 2-rank run's meta-step-2 checkpoint in one process, without torchrun: the same draws
    import shutil

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copy(cli / "checkpoint.prev.pt", resumed / "checkpoint.pt")
    assert torch.load(resumed / "checkpoint.pt", weights_only=True)["trainer"]["iteration"] == 2
    assert _cli(["sine", "--resume", resumed, "--iterations", 4, "--no-progress", "--eval-tasks", 2,
                 "--eval-steps", 1]) == 0
    got4 = torch.load(resumed / "model.pt", weights_only=True)["state_dict"]
    want4 = _indexed_oracle(4, 3, 0, sine_trainer, 5, 10)
    for n, p in want4.named_parameters():
        torch.testing.assert_close(got4[n], p.detach(), rtol=1e-5, atol=1e-6, msg=n)
