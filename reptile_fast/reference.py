"""The seed's program, faithfully: the oracle every fast path is judged against.

``MLP``, ``sample_task``, ``perform_k_training_steps`` and ``reptile`` keep the seed's
signatures, defaults, parameter order, random-number draws and floating-point operations, so a
seed script that imports them from here ends with the same parameters under the same
``torch.manual_seed``.  The one addition is ``reptile(..., progress=False)`` to silence tqdm.
"""
from __future__ import annotations

import copy
import math
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from .validation import check_bool

__all__ = ["MLP", "sample_task", "perform_k_training_steps", "reptile"]


class MLP(nn.Module):
    """The seed's model: ``network = Sequential(Linear, Tanh, Linear, Tanh, Linear)``.

    Input ``[batch, input_dim]``, output ``[batch, output_dim]``; the state_dict keys are the
    seed's (``network.0.weight`` ... ``network.4.bias``).
    """

    def __init__(self, input_dim=1, hidden_dim=64, output_dim=1):
        super().__init__()
        self.network = nn.Sequential(
            nn.Linear(input_dim, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, hidden_dim), nn.Tanh(),
            nn.Linear(hidden_dim, output_dim),
        )

    def forward(self, noise):
        return self.network(noise)


@torch.no_grad()
def sample_task():
    """A sine task as the seed draws it: ``(x [50], y [50], nn.MSELoss())``.

    Two ``torch.rand(1)`` draws from the global generator, in the seed's order.
    """
    a = torch.rand(1).item() * 4.9 + .1  # a ~ U[0.1, 5.0]
    b = torch.rand(1).item() * 2 * math.pi  # b ~ U[0, 2π]; math.pi == np.pi
    x = torch.linspace(-5, 5, 50)
    y = a * torch.sin(x + b)
    return x, y, nn.MSELoss()


def perform_k_training_steps(model, task, k, batch_size=10):
    """``k · N // batch_size`` SGD steps (lr 0.02) on random minibatches of the task.

    Each step draws ``torch.randperm(N)[:batch_size]`` from the global generator, exactly as the
    seed.  Trains ``model`` in place and returns its parameters as a list.
    """
    optimizer = torch.optim.SGD(model.parameters(), lr=0.02)
    train_x, train_y, loss_fct = task
    for _ in range(k * train_x.shape[0] // batch_size):
        ind = torch.randperm(train_x.shape[0])[:batch_size]
        x_batch = train_x[ind].unsqueeze(-1)
        target = train_y[ind].unsqueeze(-1)
        loss = loss_fct(model(x_batch), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return [p for p in model.parameters()]


def reptile(model, nb_iterations: int, sample_task: Callable, perform_k_training_steps: Callable,
            k=1, epsilon=0.1, progress: bool = True):
    """The seed's Reptile loop: for each iteration, adapt a deep copy to one sampled task and move
    the parameters ``φ ← φ + ε (φ̃ − φ)``.  ``progress=False`` turns the tqdm bar off."""
    # the one argument the seed does not have is checked (progress="no" showed the bar); the
    # seed's own arguments are taken as the seed takes them
    progress = check_bool("progress", progress)
    for _ in tqdm(range(nb_iterations), disable=not progress):
        task = sample_task()
        phi_tilde = perform_k_training_steps(copy.deepcopy(model), task, k)
        with torch.no_grad():
            for p, g in zip(model.parameters(), phi_tilde):
                p += epsilon * (g - p)
