"""reptile_fast: Reptile meta-learning, fast, with the seed's exact results.

Public API:
    Reptile                      the trainer (one API over every backend)
    TaskBatch, sample_indices    the data every backend shares
    tasks.Sine                   the seed's sine-wave task family
    MLP, OmniglotConvNet         models
    reference                    the seed's program, faithfully (the oracle)
"""
from . import reference, tasks
from .models import MLP, OmniglotConvNet
from .tasks import Sine, TaskBatch, sample_indices
from .trainer import NonFiniteError, Reptile

__version__ = "0.1.0"

__all__ = ["Reptile", "NonFiniteError", "TaskBatch", "sample_indices", "Sine", "MLP",
           "OmniglotConvNet", "reference", "tasks", "__version__"]
