"""Task families and the shared task/plan types."""
from .base import TaskBatch, TaskDistribution, sample_indices
from .sine import Sine

__all__ = ["TaskBatch", "TaskDistribution", "sample_indices", "Sine"]
