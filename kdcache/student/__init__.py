"""`train-student`, `eval` and `init-student`: everything after the cache (see train.py)."""

from .evaluate import evaluate
from .hooks import TrainHooks
from .init import init_student
from .settings import TrainSettings
from .train import train_student

__all__ = ["TrainHooks", "TrainSettings", "evaluate", "init_student", "train_student"]
