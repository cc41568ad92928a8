"""reptile_fast: Reptile meta-learning, fast, with the seed's exact results.

Public API:
    Reptile                          the trainer (one API over every backend)
    reptile                          drop-in for the seed's reptile() call, on the fast backends
    ReferencePathWarning             the drop-in runs the reference loop (the message says why)
    TaskBatch, sample_indices        the data every backend shares (epoch_indices: the official
                                     code's epoch-by-epoch minibatches)
    tasks.Sine                       the seed's sine-wave task family
    Omniglot, MiniImageNet           few-shot image classification tasks (fewshot: evaluation)
    MLP, OmniglotConvNet, MiniImageNetConvNet   models
    save_checkpoint, load_checkpoint atomic checkpoints for exact resume
    reference                        the seed's program, faithfully (the oracle)

Architecture (README "Architecture"): ``core`` (the outer update), ``backends`` (inner loops),
``steppers`` (one meta-step), ``loop`` (the training loop) and ``callbacks``.
"""
from . import reference, tasks
from .checkpoint import load_checkpoint, save_checkpoint
from .dropin import ReferencePathWarning, reptile
from .models import MLP, MiniImageNetConvNet, OmniglotConvNet
from .signals import TrainingInterrupted
from .core import NonFiniteError
from .tasks import Episodes, MiniImageNet, Omniglot, Sine, TaskBatch, epoch_indices, sample_indices
from .trainer import Reptile

__version__ = "0.1.0"

__all__ = ["Reptile", "reptile", "ReferencePathWarning", "NonFiniteError", "TrainingInterrupted", "TaskBatch",
           "sample_indices", "epoch_indices", "Sine", "Omniglot", "MiniImageNet", "Episodes", "MLP",
           "OmniglotConvNet",
           "MiniImageNetConvNet", "save_checkpoint",
           "load_checkpoint", "reference", "tasks", "__version__"]
