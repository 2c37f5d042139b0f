"""Tasks: data splits, batches, loss with carried state, evaluation streams (see :mod:`.base`)."""
from .base import TASKS, EnsembleStream, register_task, task_class
from .classification import Classification
from .language_model import LanguageModel

__all__ = ["TASKS", "EnsembleStream", "register_task", "task_class", "Classification", "LanguageModel"]
