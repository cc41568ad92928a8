"""QA68 (session 25): the paper's family of options — meaningless combinations.

(The algorithms themselves agreed with an independent float64 oracle on every backend: Reptile,
batched Reptile, FOMAML, Σ w_i g_i, inner SGD/Adam, outer optimizers, ε annealing, the loss.)

* ``InnerConfig(algorithm="fomaml", grad_weights=...)`` given to a backend directly ran plain
  FOMAML and ignored the weights (``Reptile`` refused the combination).
* ``Reptile(inner_optimizer="sgd", adam_betas=(0.9, 0.99))``: the betas were unused, yet recorded
  in ``hparams()`` and checkpoints.
"""
import pytest


from reptile_fast import MLP, Reptile
from reptile_fast.backends.base import InnerConfig


def test_inner_config_refuses_weights_with_fomaml():
    with pytest.raises(ValueError, match="inner_grad_weights defines its own outer direction"):
        InnerConfig(lr=0.05, algorithm="fomaml", grad_weights=(1.0, -3.0))
    assert InnerConfig(lr=0.05, grad_weights=(1.0, -3.0)).needs_meta_grads  # with reptile: taken


def test_adam_betas_need_the_adam_inner_loop():
    with pytest.raises(ValueError, match=r"adam_betas=\(0.9, 0.99\) apply to inner_optimizer='adam'"):
        Reptile(MLP(hidden_dim=8), backend="torch", inner_optimizer="sgd", adam_betas=(0.9, 0.99))
    Reptile(MLP(hidden_dim=8), backend="torch", inner_optimizer="sgd", adam_betas=(0.0, 0.999))  # the default
    t = Reptile(MLP(hidden_dim=8), backend="torch", inner_optimizer="adam", adam_betas=(0.9, 0.99))
    assert t.hparams()["adam_betas"] == [0.9, 0.99]
    with pytest.raises(ValueError, match="adam_betas must be two numbers in"):  # the range first
        Reptile(MLP(hidden_dim=8), backend="torch", adam_betas=(0.0, 1.5))

