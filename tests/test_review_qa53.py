"""QA53: black-box review of the researcher's Python API for few-shot work, written from the README
("Few-shot image classification: Omniglot and Mini-ImageNet", "The evaluation protocol, spelled out
(`reptile_fast.fewshot`)" and "Several GPUs and several machines": the Python ``distributed_fit``).

Tests named ``test_qa53_bug_*`` fail on the reviewed code (commit 3d3c0c4); each docstring states
the expected behaviour and the README line it breaks.  The others pass and pin promises that no
earlier test checked in this form.  Everything is small (fake Omniglot PNGs, a 4-channel conv net,
one two-process gloo job shared by the distributed tests).
"""
from __future__ import annotations

import copy
import multiprocessing
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch

import _fake_omniglot as fo
from reptile_fast import OmniglotConvNet, Reptile
from reptile_fast.fewshot import evaluate_episodes
from reptile_fast.tasks import Episodes, MiniImageNet, Omniglot
from reptile_fast.tasks.omniglot import load_omniglot_images


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fo.make_folder(tmp_path_factory.mktemp("qa53_omniglot"))


@pytest.fixture(scope="module")
def images(folder):
    return load_omniglot_images(folder)


def g(seed):
    return torch.Generator().manual_seed(seed)


def conv_trainer(n=3, **kw):
    torch.manual_seed(0)
    net = OmniglotConvNet(n, channels=4)
    kw = {"inner_lr": 1e-3, "inner_steps": 2, "inner_batch_size": 3, "loss": "cross_entropy",
          "inner_optimizer": "adam", **kw}
    return Reptile(net, **kw)


def _same(a, b) -> bool:
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    return a == b


# ----------------------------------------------------------------------------------- bugs

def test_qa53_bug_explicit_image_size_28_on_preloaded_images_of_another_size_is_refused(folder):
    """Expected: ``Omniglot(images_at_20px, image_size=28)`` raises a ValueError naming
    ``image_size`` (the images are 20×20, not 28×28), as ``image_size=105`` already does.

    README ("Few-shot image classification", the QA46 list): "Also refused by name (QA46): ... an
    `image_size` other than that of preloaded `load_omniglot_images(...)` images (it was ignored)".
    The check is ``image_size != 28 and image_size != images.image_size``: 28, the default, is
    indistinguishable from "not given", so an explicit 28 is still silently ignored and the tasks
    come out 20×20 -- a net built for 28×28 then fails with a shape error deep in torch."""
    small = load_omniglot_images(folder, image_size=20)
    with pytest.raises(ValueError, match="image_size"):
        tasks = Omniglot(small, ways=2, shots=1, image_size=28).sample(1, generator=g(0))
        assert tasks.x.shape[-1] == 28, f"asked for 28×28, got {tuple(tasks.x.shape[-2:])}"


def test_qa53_bug_evaluate_episodes_does_not_score_non_finite_logits_as_predictions(images):
    """Expected: when adaptation diverges (or φ holds NaN), ``evaluate_episodes`` raises an error
    naming the non-finite values (a ``NonFiniteError``/``FloatingPointError`` or ``ValueError``)
    instead of returning an accuracy.

    README "The evaluation protocol" step 5: "Score: per task, the fraction of query images
    predicted right"; "Python API": bad input such as "NaN data ... raises ValueError/TypeError
    naming the problem", and training never lets a NaN meta-step pass silently.  Now every logit
    is NaN, ``argmax`` returns class 0 for every query, and the result is exactly chance
    (1/ways, with a confidence interval) -- a silently wrong number that reads like a bad model."""
    test = Omniglot(images, ways=3, shots=2, query_shots=1)
    episodes = test.sample_episodes(4, generator=g(0))
    # an SGD step this large overflows the adapted weights to inf/NaN on the first step
    trainer = conv_trainer(inner_lr=1e30, inner_optimizer="sgd")
    with pytest.raises((FloatingPointError, ValueError), match="(?i)finite|nan|inf"):
        result = evaluate_episodes(trainer, episodes, steps=3, batch_size=3, generator=g(1))
        raise AssertionError(f"accuracy {result.accuracy} ± {result.ci95} reported from NaN logits; "
                             f"predictions {result.predictions.tolist()}")


# ------------------------------------------------------------ passing: task families

def test_qa53_subset_keeps_the_selection_and_images_and_draws_alike(images):
    """``subset`` shares the images and keeps the alphabets left after ``exclude_alphabets``, the
    rotations and the characters; the same generator gives the same episodes from it as from a
    family built directly with those settings."""
    base = Omniglot(images, ways=3, shots=2, query_shots=1, rotations=(0, 180), exclude_alphabets=["Beta"])
    sub = base.subset(ways=2, shots=1, query_shots=2)
    assert sub.data is base.data and sub.alphabets == ["Alpha", "Gamma"] and sub.rotations == (0, 180)
    direct = Omniglot(images, ways=2, shots=1, query_shots=2, rotations=(0, 180), exclude_alphabets=["Beta"])
    a, b = sub.sample_episodes(3, generator=g(4)), direct.sample_episodes(3, generator=g(4))
    assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
    assert torch.equal(a.query.y, torch.tensor([0, 0, 1, 1]).expand(3, 4))  # class-major labels


def test_qa53_rotated_classes_pair_support_and_query_of_one_character_and_rotation(images):
    """Each label's support and query images are distinct drawings of the same character at the
    same rotation (``rot90`` of the stored drawing); different labels are different
    (character, rotation) classes."""
    fam = Omniglot(images, ways=4, shots=2, query_shots=2, rotations=(0, 90, 180, 270))
    ep = fam.sample_episodes(6, generator=g(2))
    stored = images.images[:, 0]                                            # [n_images, S, S]
    variants = {(i, k): torch.rot90(stored[i], k, dims=(-2, -1)) for i in range(len(stored)) for k in range(4)}

    def which(img):
        hits = [key for key, v in variants.items() if torch.equal(v, img[0])]
        assert len(hits) == 1, hits
        return hits[0]

    char_of = {int(i): c for c, row in enumerate(images.table.tolist()) for i in row if i >= 0}
    for t in range(6):
        seen, label_class = set(), {}
        for x, y in [*zip(ep.support.x[t], ep.support.y[t]), *zip(ep.query.x[t], ep.query.y[t])]:
            i, k = which(x)
            # support and query hold distinct drawings of a class (one drawing may appear in two
            # classes of a task: the same character at two rotations)
            assert (i, k) not in seen
            seen.add((i, k))
            assert label_class.setdefault(int(y), (char_of[i], k)) == (char_of[i], k)
        assert len(set(label_class.values())) == 4  # four distinct (character, rotation) classes


def test_qa53_miniimagenet_cache_does_not_change_the_draws(tmp_path):
    """``cache=True`` and ``cache=False`` give bitwise the same episodes under one generator seed,
    also across two draws from the cached family (decoded images are kept, not altered)."""
    from PIL import Image

    (tmp_path / "images").mkdir()
    rng = np.random.default_rng(0)
    for split, classes in {"train": ["a1", "a2", "a3"], "test": ["b1", "b2", "b3"]}.items():
        lines = ["filename,label"]
        for c in classes:
            for k in range(3):
                Image.fromarray(rng.integers(0, 256, (10, 10, 3), dtype=np.uint8)).save(tmp_path / "images" / f"{c}_{k}.png")
                lines.append(f"{c}_{k}.png,{c}")
        (tmp_path / f"{split}.csv").write_text("\n".join(lines) + "\n")
    cached = MiniImageNet(tmp_path, "test", ways=2, shots=1, query_shots=2, image_size=8)
    plain = MiniImageNet(tmp_path, "test", ways=2, shots=1, query_shots=2, image_size=8, cache=False)
    for _ in range(2):
        a, b = cached.sample_episodes(3, generator=g(7)), plain.sample_episodes(3, generator=g(7))
        assert torch.equal(a.support.x, b.support.x) and torch.equal(a.query.x, b.query.x)
        assert a.support.x.shape == (3, 2, 3, 8, 8) and a.query.x.shape == (3, 4, 3, 8, 8)


# ------------------------------------------------------------ passing: evaluation

def test_qa53_evaluation_leaves_the_trainer_as_it_was(images):
    """``evaluate_episodes`` changes neither φ nor BatchNorm's running statistics, nor each
    submodule's mode (put back also after an error), ``trainer.iteration``, the global RNG (given a
    generator) or a carried inner Adam state; its result is the same for any ``max_images`` and for
    the same generator seed."""
    train = Omniglot(images, ways=3, shots=2, query_shots=0, alphabets=["Alpha", "Beta"], rotations=(0, 90))
    test = Omniglot(images, ways=3, shots=2, query_shots=1, exclude_alphabets=train.alphabets)
    trainer = conv_trainer(adam_state="carried", backend="reference")
    trainer.fit(train, 2, meta_batch_size=2, generator=g(0), progress=False)
    trainer.model.eval()
    trainer.model.features[1].train()  # a mixed set of modes
    modes = [m.training for m in trainer.model.modules()]
    state = copy.deepcopy(trainer.model.state_dict())
    adam = copy.deepcopy(trainer.carried_adam_state)
    assert adam is not None
    episodes = test.sample_episodes(4, generator=g(1))
    rng = torch.get_rng_state()
    r1 = evaluate_episodes(trainer, episodes, steps=3, batch_size=3, generator=g(2))
    r2 = evaluate_episodes(trainer, episodes, steps=3, batch_size=3, generator=g(2), max_images=7)
    r3 = evaluate_episodes(trainer, episodes, steps=3, batch_size=3, generator=g(2), transductive=True)
    assert torch.equal(r1.predictions, r2.predictions) and r1.accuracy == r2.accuracy and r1.ci95 == r2.ci95
    assert r3.predictions.shape == r1.predictions.shape
    assert torch.equal(rng, torch.get_rng_state())
    assert _same(state, trainer.model.state_dict()) and _same(adam, trainer.carried_adam_state)
    assert [m.training for m in trainer.model.modules()] == modes and trainer.iteration == 2
    bad = Episodes(episodes.support, episodes.query, 3)
    with pytest.raises(ValueError, match="batch_size"):
        evaluate_episodes(trainer, bad, steps=1, batch_size=7)
    assert [m.training for m in trainer.model.modules()] == modes


# ------------------------------------------------------------ distributed (one two-process job)

def _net(bn_eps=1e-5):
    torch.manual_seed(0)
    return OmniglotConvNet(3, channels=4, bn_eps=bn_eps)


def _omniglot_trainer(backend="reference", **kw):
    return Reptile(_net(kw.pop("bn_eps", 1e-5)), inner_lr=1e-3, inner_steps=2, inner_batch_size=3, outer_lr=1.0,
                   outer_lr_final=0.0, loss="cross_entropy", inner_optimizer="adam", minibatches="epochs",
                   backend=backend, **kw)


def _scenarios(rank, folder, out):
    """Every scenario on this rank: ``{name: {"params", "history", "error"}}``."""
    from reptile_fast import MLP, Sine
    from reptile_fast.distributed import distributed_fit

    train = Omniglot(str(folder), ways=3, shots=2, query_shots=0, rotations=(0, 90))
    results = {}

    def run(name, trainer, task_distribution, T, **kw):
        from reptile_fast.distributed import setup_from_env

        res = {"params": None, "history": None, "error": None}
        try:
            h = distributed_fit(trainer, task_distribution, kw.pop("iterations", 3), meta_batch_size=T, seed=5,
                                context=setup_from_env(), progress=False, **kw)
            res["params"] = {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}
            res["history"] = h["loss"]
        except Exception as exc:  # noqa: BLE001 - reported to the test
            res["error"] = (type(exc).__name__, str(exc))
        results[name] = res

    # BatchNorm conv net, inner Adam, epoch plans, T = 3 split 2 + 1, ordered reduction
    run("ordered", _omniglot_trainer(), train, 3, reduction="ordered", checkpoint_dir=str(out / "ckpt"),
        checkpoint_every=1)
    run("carried", _omniglot_trainer(adam_state="carried"), train, 2, iterations=1)
    torch.manual_seed(0)
    run("compiled", Reptile(MLP(1, 8, 1), backend="compiled", inner_steps=2, inner_batch_size=5), Sine(), 2,
        iterations=1)
    run("too_few_tasks", _omniglot_trainer(), train, 1, iterations=1)
    # rank 1 built with another BatchNorm ε (the official net's 1e-3): another model
    run("bn_eps", _omniglot_trainer(bn_eps=1e-3 if rank == 1 else 1e-5), train, 2, iterations=1)
    return results


def _worker(rank, port, folder, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from reptile_fast.distributed import setup_from_env

    ctx = setup_from_env(timeout=30)
    try:
        results = _scenarios(rank, folder, Path(out))
    finally:
        if not ctx.failed:
            ctx.close()
    torch.save(results, Path(out) / f"rank{rank}.pt")


@pytest.fixture(scope="module")
def two_rank_job(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("qa53_dist")
    mp = multiprocessing.get_context("forkserver")
    # (the forkserver is shared with tests/_dist_worker.py's jobs in one pytest run: its preload list too)
    mp.set_forkserver_preload(["_dist_worker", "test_review_qa53", "reptile_fast.distributed",
                               "reptile_fast.backends.torch_func", "reptile_fast.backends.reference", "torch._dynamo"])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [mp.Process(target=_worker, args=(r, port, str(folder), str(out))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(150)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert [p.exitcode for p in procs] == [0, 0], [p.exitcode for p in procs]
    return out, [torch.load(out / f"rank{r}.pt") for r in range(2)]


def test_qa53_two_ranks_train_the_omniglot_net_bitwise_as_one_process_and_resume_alone(two_rank_job, folder):
    """README "Guarantees": φ bitwise identical on every rank; ``reduction="ordered"`` on backend
    reference is bitwise one process's (here: the Omniglot conv net with BatchNorm, inner Adam,
    ``minibatches="epochs"``, a meta-batch of 3 split 2 + 1); "a run resumes exactly with any
    number of processes, alone included": the two-rank meta-step-2 checkpoint continued in one
    process ends bitwise where the two ranks ended."""
    from reptile_fast.distributed import DistContext, distributed_fit

    out, ranks = two_rank_job
    r0, r1 = ranks[0]["ordered"], ranks[1]["ordered"]
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    assert _same(r0["params"], r1["params"]) and r0["history"] == r1["history"]
    train = Omniglot(str(folder), ways=3, shots=2, query_shots=0, rotations=(0, 90))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = _omniglot_trainer()
        h = distributed_fit(alone, train, 3, meta_batch_size=3, seed=5, context=DistContext.single(),
                            reduction="ordered", progress=False)
        assert _same(r0["params"], alone.model.state_dict()) and h["loss"] == r0["history"]
        resumed = _omniglot_trainer()
        distributed_fit(resumed, train, 3, meta_batch_size=3, seed=5, context=DistContext.single(),
                        reduction="ordered", progress=False, resume_from=str(out / "ckpt" / "checkpoint.prev.pt"))
    finally:
        torch.set_num_threads(threads)
    assert resumed.iteration == 3 and _same(r0["params"], resumed.model.state_dict())


@pytest.mark.parametrize("name, words", [("carried", "adam_state='carried'"), ("compiled", "backend 'compiled'"),
                                         ("too_few_tasks", "meta_batch_size (1) is smaller than the number of processes (2)")])
def test_qa53_bad_distributed_setups_are_refused_by_name_on_every_rank(two_rank_job, name, words):
    """README: ``adam_state="carried"`` and ``distributed_fit`` across processes "are refused by
    name"; backend compiled across processes is refused; "a meta-batch smaller than the number of
    ranks is refused with a ValueError" -- on both ranks, and the group stays usable (the later
    scenarios of the same job ran)."""
    _, ranks = two_rank_job
    for r in ranks:
        assert r[name]["error"] is not None and r[name]["error"][0] == "ValueError", r[name]["error"]
        assert words in r[name]["error"][1]
        assert "bn_eps" in r  # the job went on after the refusal


def test_qa53_bug_ranks_built_with_another_batchnorm_eps_are_refused(two_rank_job):
    """Expected: every rank raises the same ValueError listing the difference when rank 1 built
    ``OmniglotConvNet(3, bn_eps=1e-3)`` (the official net's ε) and rank 0 the default 1e-5.

    README "Several GPUs and several machines": "At the start the ranks compare their settings
    (... trainer hyper-parameters, ... parameter shapes ...) and all raise the same `ValueError`
    listing any difference (a mis-launched rank would otherwise train a wrong split, or hang)" and
    "Ranks built with different architectures (another activation) are refused."  The comparison
    sees only module class names and parameter shapes, so ranks whose BatchNorm ε differs (the
    README's own "BatchNorm ε" difference between the default and the official net) train together
    silently: every rank adapts another function, and the mean update is neither model's."""
    _, ranks = two_rank_job
    for r in ranks:
        err = r["bn_eps"]["error"]
        assert err is not None and err[0] == "ValueError" and ("eps" in err[1] or "different" in err[1]), \
            f"ranks with BatchNorm eps 1e-5 and 1e-3 trained together: {err}"


def test_module_settings_survive_an_extra_repr_that_raises(tmp_path):
    """``hparams()["module_settings"]`` (added for QA53) reads every module's ``extra_repr()``: a
    user module whose ``extra_repr`` raises must not stop ``hparams()`` or a checkpoint."""
    import torch.nn as nn

    from reptile_fast import Reptile

    class Odd(nn.Linear):
        def extra_repr(self):
            raise AttributeError("not set up yet")

    trainer = Reptile(nn.Sequential(Odd(3, 2)), backend="reference")
    assert "0:<extra_repr failed in Odd>" in trainer.hparams()["module_settings"]
    trainer.load_state_dict(trainer.state_dict())
