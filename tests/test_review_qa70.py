"""QA70 (session 25): tests for the behaviours a mutation run found unpinned.

43 mutants of the library's numerical and control paths; 41 were killed by the suite.  The two
that survived were real behaviour changes:

* M33 (``dropin._SineSource``): the task the seed's first ``sample_task()`` call returned must be
  the first one trained on — the drop-in draws the rest vectorised; a mutant that drew a fresh
  first task trained a model 1.5e-3 away from the seed's run.
* M31 (kernel v2's sigmoid padding mask): every padded hidden unit (sigmoid(0) = 0.5) must be
  zeroed; off by one, the first padded unit of a 20-wide sigmoid layer fed 0.5 downstream (two
  padded sigmoid layers, 4 steps: 2.5e-4 from the reference), which no case noticed.

Also pinned next to the code (each mutant was caught only indirectly): M03, the meta-step's loss is
the mean over every inner step of every task; M34, the drop-in's reference path leaves the global
RNG where the seed's loop leaves it.
"""
import copy
import warnings

import pytest
import torch

import reptile_fast
from reptile_fast import MLP, Reptile, Sine, TaskBatch, reference, sample_indices


def test_seed_sample_task_first_draw_is_the_first_task_trained():
    torch.manual_seed(0)
    model_fast = reference.MLP()
    model_ref = copy.deepcopy(model_fast)
    plan = sample_indices(1, 5, 50, 10, generator=torch.Generator().manual_seed(1))  # [1, 5, 10]
    torch.manual_seed(7)
    stats = reptile_fast.reptile(model_fast, 1, reference.sample_task, progress=False,
                                 indices=plan[None])  # [nb_iterations=1, meta_batch=1, 5, 10]
    assert "vectorised" in stats["tasks"]
    # the task the seed's sample_task draws right after manual_seed(7), trained on with the same plan
    torch.manual_seed(7)
    x, y, _ = reference.sample_task()
    trainer = Reptile(model_ref, backend="reference", inner_lr=0.02, inner_steps=5, inner_batch_size=10,
                      outer_lr=0.1)
    trainer.meta_step(TaskBatch(x[None, :, None], y[None, :, None]), plan)
    for a, b in zip(model_fast.parameters(), model_ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_reference_path_precheck_leaves_global_rng_alone():
    def frozen_seed_mlp():
        model = reference.MLP()
        next(model.parameters()).requires_grad_(False)  # frozen: the drop-in runs the reference path
        return model

    torch.manual_seed(3)
    model_seed = frozen_seed_mlp()
    model_drop = copy.deepcopy(model_seed)
    torch.manual_seed(11)
    reference.reptile(model_seed, 3, reference.sample_task, reference.perform_k_training_steps, progress=False)
    after_seed = torch.rand(1)
    torch.manual_seed(11)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        stats = reptile_fast.reptile(model_drop, 3, reference.sample_task, reference.perform_k_training_steps,
                                     progress=False)
    assert stats["path"] == "reference"
    after_drop = torch.rand(1)
    for a, b in zip(model_seed.parameters(), model_drop.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(after_seed, after_drop)  # the same draws from the global RNG, no more


@pytest.mark.parametrize("backend", ["reference", "torch"])
def test_meta_step_loss_is_the_mean_over_all_steps_and_tasks(backend):
    torch.manual_seed(0)
    trainer = Reptile(MLP(), backend=backend, inner_steps=5, inner_batch_size=10)
    g = torch.Generator().manual_seed(3)
    tasks = Sine().sample(3, generator=g)
    plan = sample_indices(3, 5, 50, 10, generator=g)
    per_step = trainer.adapt(tasks, 5, plan).losses  # [T, S], on a copy: the model is unchanged
    assert per_step.shape == (3, 5)
    # the losses fall during adaptation: the last step's mean differs clearly from the overall mean
    assert abs(float(per_step[:, -1].mean()) - float(per_step.mean())) > 1e-3
    loss = trainer.meta_step(tasks, plan)["loss"]
    torch.testing.assert_close(loss, per_step.mean(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("stream", [False, True])
def test_two_padded_sigmoid_layers_match_the_reference_in_kernel_v2(stream):
    pytest.importorskip("triton")
    from reptile_fast.kernels import mlp_inner_loop as K
    from test_kernel_mlp_meta_step_v2 import assert_inner_matches, reference_inner, regression_tasks, run_inner

    device = "cpu" if K.INTERPRETED else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("the kernels are compiled (no TRITON_INTERPRET) but there is no CUDA device")
    torch.manual_seed(1)
    model = MLP(2, output_dim=3, hidden_dims=[20, 20], activation="sigmoid").to(device)
    tasks = regression_tasks(2, 30, 2, 3, seed=2)
    indices = sample_indices(2, 4, 30, 5, generator=torch.Generator().manual_seed(3))
    params, losses = run_inner(model, tasks, indices, device, stream=stream)
    assert_inner_matches(params, losses, reference_inner(model, tasks, indices), f"2-20-20-3 sigmoid stream={stream}")
