"""QA90 (session 26): review of the session's own changes for regressions and gaps.

1. ``hparams()["loss_settings"]`` of a TorchScript loss (QA73's fix) described only ``forward``'s
   code: a loss whose forward calls a helper method (where TorchScript folds its constants), or
   that reads a plain tensor attribute, read alike with other constants or tensors.
2. ``MiniImageNet``'s class-folder layout (new this session) read macOS's AppleDouble debris
   (``._n01_0.jpg`` beside each image) as images, which failed to decode mid-training; Omniglot
   skips it.
3. ``distributed_fit`` checked ``checkpoint_extra`` before any collective, but not for keys that
   are one as strings (QA88 added that to ``fit``): rank 0 refused it inside ``fit``, after the
   ranks had compared settings, and the others reported a dead rank.
4. The model claim of a running ``fit`` (QA89) was inherited by a forked child: the child's own
   copy of the model was refused a ``meta_step`` "called from a fit callback, or from another
   thread".
"""
import os
import warnings

import numpy as np
import pytest
import torch
import torch.nn as nn

from reptile_fast import MLP, Reptile, Sine
from reptile_fast.trainer_state import loss_settings


def _scripted(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script is deprecated, still served
        return torch.jit.script(module)


class _ViaHelper(nn.Module):
    __constants__ = ["delta"]  # folded into the helper's code by TorchScript

    def __init__(self, delta: float):
        super().__init__()
        self.delta = delta

    def scaled(self, prediction, target):
        return ((prediction - target).abs() * self.delta).mean()

    def forward(self, prediction, target):
        return self.scaled(prediction, target)


class _TensorWeight(nn.Module):
    def __init__(self, weight):
        super().__init__()
        self.weight = torch.tensor(weight)  # a plain attribute: no buffer, no parameter

    def forward(self, prediction, target):
        return ((prediction - target) ** 2 * self.weight).mean()


def test_scripted_losses_computing_in_a_helper_method_are_told_apart():
    one, five = _scripted(_ViaHelper(1.0)), _scripted(_ViaHelper(5.0))
    x, y = torch.ones(3), torch.zeros(3)
    assert float(one(x, y)) != float(five(x, y))  # they compute different losses
    assert loss_settings(one) != loss_settings(five)
    assert loss_settings(one) == loss_settings(_scripted(_ViaHelper(1.0)))


def test_scripted_losses_reading_other_plain_tensor_attributes_are_told_apart():
    a, b = _scripted(_TensorWeight([1.0])), _scripted(_TensorWeight([3.0]))
    assert loss_settings(a) != loss_settings(b)
    assert "weight=tensor([3.0]" in loss_settings(b)


def test_the_settings_of_scripted_losses_with_forward_alone_are_as_before():
    # (written by this session's checkpoints: a forward-only loss reads as it did)
    assert loss_settings(_scripted(nn.HuberLoss(delta=0.5))).startswith("torch.jit.ScriptModule HuberLoss(.:")
    assert loss_settings(_scripted(nn.CrossEntropyLoss(weight=torch.tensor([1.0, 2.0])))).endswith(
        "weight=tensor([1.0, 2.0], dtype=torch.float32))")


# ----------------------------------------------------------------------------- Mini-ImageNet debris
def test_class_folders_skip_macos_debris_and_hidden_folders(tmp_path):
    from PIL import Image

    from reptile_fast.tasks import MiniImageNet

    for split, classes in {"train": ["n01", "n02", "n03"], "test": ["n07", "n08"]}.items():
        for c in classes:
            d = tmp_path / split / c
            d.mkdir(parents=True)
            for k in range(3):
                Image.fromarray(np.full((6, 6, 3), 9 * k, dtype=np.uint8)).save(d / f"{c}_{k}.jpg", format="PNG")
                # what a copy from a Mac to another file system leaves beside each image
                (d / f"._{c}_{k}.jpg").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X" + bytes(200))
        (tmp_path / split / "__MACOSX").mkdir()
        (tmp_path / split / ".ipynb_checkpoints").mkdir()
    ds = MiniImageNet(tmp_path, "train", ways=2, shots=2, query_shots=1, image_size=6)
    assert ds.classes == ["n01", "n02", "n03"] and ds.counts.tolist() == [3, 3, 3]
    for seed in range(4):  # every image drawn decodes
        ds.sample_episodes(3, generator=torch.Generator().manual_seed(seed))
    assert MiniImageNet(tmp_path, "test", ways=2, shots=1, query_shots=1, image_size=6).classes == ["n07", "n08"]


# ----------------------------------------------------------------------------- distributed_fit's extra
def test_distributed_fit_refuses_extra_keys_one_as_strings_before_the_ranks_compare(tmp_path, monkeypatch):
    """Every rank must refuse it before the first collective (the settings' comparison): ``fit``
    refused it on rank 0 alone, after it."""
    from reptile_fast.distributed import DistContext, distributed_fit
    from reptile_fast.distributed import training as T

    collectives = []
    real = T._check_ranks_agree
    monkeypatch.setattr(T, "_check_ranks_agree", lambda ctx, settings: (collectives.append(1), real(ctx, settings)))
    trainer = Reptile(MLP(hidden_dim=4), backend="torch", inner_steps=1)
    with pytest.raises(ValueError, match="checkpoint_extra has keys that are one key as strings"):
        distributed_fit(trainer, Sine(), 2, meta_batch_size=2, seed=0, context=DistContext.single(),
                        progress=False, checkpoint_dir=tmp_path, checkpoint_extra={1: "a", "1": "b"})
    assert collectives == [] and trainer.iteration == 0


# ----------------------------------------------------------------------------- claims and fork
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_child_forked_from_a_fit_callback_trains_its_own_copy():
    torch.manual_seed(0)
    trainer = Reptile(MLP(hidden_dim=8), backend="torch", inner_steps=2)
    tasks = Sine().sample(2, generator=torch.Generator().manual_seed(5))
    reports = []

    def callback(iteration, metrics):
        if iteration != 2:
            return
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: its own copy of the model, which nothing else trains there
            try:
                trainer.meta_step(tasks)
                msg = "ok"
            except BaseException as exc:  # noqa: BLE001 - reported to the parent
                msg = f"{type(exc).__name__}: {exc}"
            os.write(w, msg.encode()[:400])
            os._exit(0)
        os.close(w)
        os.waitpid(pid, 0)
        reports.append(os.read(r, 500).decode())
        os.close(r)
        # ... while in the parent the running fit still refuses a meta-step from its callback
        with pytest.raises(ValueError, match="meta_step cannot run while a fit trains this model"):
            trainer.meta_step(tasks)

    trainer.fit(Sine(), 3, progress=False, callback=callback, generator=torch.Generator().manual_seed(0))
    assert reports == ["ok"] and trainer.iteration == 3


# ----------------------------------------------------------------------------- outputs' error
def test_an_output_error_without_errno_reads_without_errno_none():
    """Pillow's encoder failure (``OSError("encoder error -2 when writing image file")``) has no
    errno: the job's message began "[Errno None]"."""
    from reptile_fast.jobs import outputs_after_training

    with pytest.raises(OSError) as info:
        with outputs_after_training("run", 5, "sine"):
            raise OSError("encoder error -2 when writing image file")
    assert str(info.value).startswith("encoder error -2 when writing image file — the training finished")
    assert info.value.errno is None
