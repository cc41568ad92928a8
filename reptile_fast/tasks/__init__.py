"""Task families and the shared task/plan types."""
from .base import MINIBATCHES, TaskBatch, TaskDistribution, draw_plan, epoch_indices, sample_indices
from .episodes import Episodes
from .miniimagenet import MiniImageNet
from .omniglot import Omniglot, OmniglotImages, load_official_runs, load_omniglot_images, official_character_split
from .sine import Sine

__all__ = ["TaskBatch", "TaskDistribution", "sample_indices", "epoch_indices", "draw_plan", "MINIBATCHES",
           "Sine", "Episodes", "Omniglot", "OmniglotImages", "load_omniglot_images", "load_official_runs",
           "official_character_split", "MiniImageNet"]
